//! The faults after which the secondary goes live: `kill-primary`
//! (SIGKILL of the primary's VMM), `pull-plug` (the same, and every link
//! of its host cut at that instant: the host's power and network gone at
//! once), `failover` (`tandem failover --api`, the operator's test
//! failover). Each waits, bounded, until the secondary says it won the
//! arbiter and went live; from then on that VMM is the VM. And
//! `reprotect`: the VM that went live is protected again (`tandem protect
//! --api` of its control socket, `--to` a new secondary), so that it can
//! fail over once more.

use std::time::{Duration, Instant};

use super::{ms, output, FaultKind, FaultReport, Run, WaitError, WaitResult, STEP};
use crate::commands::drill::scenario::WorkloadKind;

/// How long a new primary may take to produce its first guest output (a
/// console line, a frame) after going live: only turns a hang into a
/// failure.
const FIRST_OUTPUT: Duration = Duration::from_secs(60);

impl Run<'_> {
    pub(super) fn fail_over(&mut self, kind: FaultKind, fr: &mut FaultReport) -> WaitResult<()> {
        let stop = self.ctx.stop;
        if self.secondary.is_none() {
            return Err(WaitError::Failed(
                "no secondary to fail over to: the VM is unprotected".into(),
            ));
        }
        let host = self.ctx.scn.hosts[self.at].name.clone();
        let to = self.ctx.scn.hosts[self.secondary_at].name.clone();
        match kind {
            FaultKind::Failover => {
                let mut c = self.tandem();
                c.args(["failover", "--api"])
                    .arg(&self.sock)
                    .env_remove("TANDEM_LOG");
                let (code, out, err) = output(c).map_err(WaitError::Failed)?;
                if code != 0 {
                    return Err(WaitError::Failed(format!(
                        "tandem failover failed (status {code}): {}{}",
                        out.trim(),
                        err.trim()
                    )));
                }
                fr.detail = format!("tandem failover --api on host {host} -> host {to}");
            }
            FaultKind::PullPlug if self.topo.is_loopback() => {
                self.vm.as_mut().expect("a VM runs").signal(libc::SIGKILL);
                fr.detail = format!(
                    "SIGKILL of host {host}'s VMM (over loopback: no links to cut) -> host {to}"
                );
            }
            FaultKind::PullPlug => {
                // Links first: the kill follows within microseconds, and
                // nothing the dying VMM still sends leaves its host.
                let cut = self.topo.set_host_links(self.at, false);
                self.vm.as_mut().expect("a VM runs").signal(libc::SIGKILL);
                cut.map_err(WaitError::Failed)?;
                fr.detail = format!("SIGKILL + every link of host {host} cut -> host {to}");
            }
            _ => {
                self.vm.as_mut().expect("a VM runs").signal(libc::SIGKILL);
                fr.detail = format!("SIGKILL of the primary on host {host} -> host {to}");
            }
        }
        let old = self.vm.as_mut().expect("a VM runs");
        old.wait_end(STEP, stop)?;
        let last_out = old
            .out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .map(|(t, _)| *t);
        let sec = self.secondary.as_mut().expect("checked above");
        sec.wait_line("going LIVE", true, STEP, stop)?;
        fr.vmm_gap_ms = match sec.wait_line("failover gap: ", true, FIRST_OUTPUT, stop) {
            Ok(rest) => rest.split_whitespace().next().and_then(|n| n.parse().ok()),
            Err(WaitError::Interrupted) => return Err(WaitError::Interrupted),
            Err(WaitError::Failed(_)) => None,
        };
        if self.ctx.scn.workload() == WorkloadKind::Console {
            // The reader's gap: the old primary's last line to the new
            // one's first.
            let start = Instant::now();
            let first = loop {
                let first = sec
                    .out
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .first()
                    .map(|(t, _)| *t);
                if first.is_some() || sec.ended().is_some() || start.elapsed() > FIRST_OUTPUT {
                    break first;
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            if let (Some(a), Some(b)) = (last_out, first) {
                fr.client_gap_ms = Some(ms(b.saturating_duration_since(a)));
            }
        }
        let new = self.secondary.take().expect("checked above");
        let old = self.vm.replace(new).expect("a VM runs");
        self.retired.push(old);
        self.at = self.secondary_at;
        self.sock = self.secondary_sock.clone();
        Ok(())
    }

    /// Protect the VM again, to a new secondary on host `to` (after a
    /// failover it runs unprotected).
    pub(super) fn reprotect(&mut self, to: usize, fr: &mut FaultReport) -> WaitResult<()> {
        if self.secondary.is_some() {
            return Err(WaitError::Failed(
                "reprotect: the VM is still protected (no failover before it)".into(),
            ));
        }
        if to == self.at {
            return Err(WaitError::Failed(format!(
                "reprotect to host {}: the VM runs there",
                self.ctx.scn.hosts[to].name
            )));
        }
        fr.detail = format!(
            "host {} protected again to host {}",
            self.ctx.scn.hosts[self.at].name, self.ctx.scn.hosts[to].name
        );
        fr.downtime_ms = self.protect_vm(to)?;
        Ok(())
    }

    /// `tandem protect` the VM (its control socket) to a new secondary on
    /// host `to`; the primary's pause.
    pub(super) fn protect_vm(&mut self, to: usize) -> WaitResult<Option<f64>> {
        let listen = self.start_secondary(to)?;
        let mut c = self.tandem();
        c.args(["protect", "--api"])
            .arg(&self.sock)
            .args(["--to", &listen])
            .args(self.creds(self.at))
            .args(self.arbiter_args(self.at)?)
            .arg("--json")
            .env_remove("TANDEM_LOG");
        let (code, out, err) = output(c).map_err(WaitError::Failed)?;
        if code != 0 {
            return Err(WaitError::Failed(format!(
                "tandem protect failed (status {code}): {}{}",
                out.trim(),
                err.trim()
            )));
        }
        Ok(out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| super::find_number(&v, "pause_ms")))
    }

    /// The migrate fault of a protected VM: `tandem switchover` to its
    /// secondary's host `to` (no copy: the secondary holds the VM), then
    /// protected again onto the host it left, so that it is protected
    /// before the next fault.
    pub(super) fn switch_over(&mut self, to: usize, fr: &mut FaultReport) -> WaitResult<()> {
        let stop = self.ctx.stop;
        let hosts = &self.ctx.scn.hosts;
        if to != self.secondary_at {
            return Err(WaitError::Failed(format!(
                "migrate of a protected VM to host {}: it switches over to its secondary's host {} only",
                hosts[to].name, hosts[self.secondary_at].name
            )));
        }
        let from = self.at;
        let mut c = self.tandem();
        c.args(["switchover", "--api"])
            .arg(&self.sock)
            .arg("--json")
            .env_remove("TANDEM_LOG");
        let (code, out, err) = output(c).map_err(WaitError::Failed)?;
        if code != 0 {
            return Err(WaitError::Failed(format!(
                "tandem switchover failed (status {code}): {}{}",
                out.trim(),
                err.trim()
            )));
        }
        fr.downtime_ms = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| super::find_number(&v, "downtime_ms"));
        let mut old = self.vm.take().expect("a VM runs");
        let ended = old.wait_end(STEP, stop);
        let status = old.ended();
        self.retired.push(old);
        ended?;
        if status.is_some_and(|s| !s.success()) {
            return Err(WaitError::Failed(format!(
                "the old primary ended with {} after the switchover",
                status.map(|s| s.to_string()).unwrap_or_default()
            )));
        }
        let mut new = self.secondary.take().expect("checked by the caller");
        new.wait_line("going LIVE", true, STEP, stop)?;
        self.vm = Some(new);
        self.at = self.secondary_at;
        self.sock = self.secondary_sock.clone();
        let pause = self.protect_vm(from)?;
        fr.detail += &format!(
            " (tandem switchover, downtime {}); protected again onto host {} (primary paused {})",
            fr.downtime_ms.map_or("?".into(), |d| format!("{d:.1} ms")),
            hosts[from].name,
            pause.map_or("?".into(), |d| format!("{d:.1} ms")),
        );
        Ok(())
    }
}
