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

use super::{ms, output, FaultKind, FaultReport, Proc, Run, WaitError, WaitResult, STEP};
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

    /// Cut the link between `x` and `y` (hosts, or `arbiter`: the etcd
    /// arbiter's host) for `duration_ms`, then heal it; then wait
    /// (bounded) for what the arbiter decided: the secondary went live and
    /// the primary stopped, or the primary runs on alone and the secondary
    /// stopped (a partition shorter than the failover timeout may change
    /// nothing). A cut that leaves the pair talking (a host and the
    /// arbiter), or one of a VM that runs alone already, decides nothing:
    /// the VM must run on through it (the live side rides out a cut from
    /// the arbiter on its lease).
    pub(super) fn partition(
        &mut self,
        x: &str,
        y: &str,
        duration_ms: u64,
        fr: &mut FaultReport,
    ) -> WaitResult<()> {
        let stop = self.ctx.stop;
        let scn = self.ctx.scn;
        let arbiter = self.etcd_host();
        let end = |n: &str| {
            if n == "arbiter" {
                arbiter
            } else {
                scn.hosts.iter().position(|h| h.name == n)
            }
        };
        let (Some(a), Some(b)) = (end(x), end(y)) else {
            return Err(WaitError::Failed(format!(
                "partition {x} - {y}: only a link between two hosts (the etcd arbiter's host among them) can be cut"
            )));
        };
        let to_arbiter = x == "arbiter" || y == "arbiter";
        let protected = self.secondary.is_some();
        self.topo.set_link(a, b, false).map_err(WaitError::Failed)?;
        let cut = Instant::now();
        let mut healed = false;
        let heal = |t: &crate::commands::drill::topo::Topology, healed: &mut bool| {
            if !*healed && cut.elapsed() >= Duration::from_millis(duration_ms) {
                *healed = true;
                t.set_link(a, b, true).map_err(WaitError::Failed)?;
            }
            WaitResult::Ok(())
        };
        fr.detail = if to_arbiter {
            let h = if x == "arbiter" { y } else { x };
            format!(
                "link {h} - {} (the arbiter's host) cut for {duration_ms} ms",
                scn.hosts[arbiter.expect("resolved above")].name
            )
        } else {
            format!("link {x} - {y} cut for {duration_ms} ms")
        };
        let deadline = Duration::from_millis(duration_ms) + STEP;
        loop {
            heal(&self.topo, &mut healed)?;
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(WaitError::Interrupted);
            }
            let sec_live = self
                .secondary
                .as_ref()
                .is_some_and(|p| Proc::text(&p.err).contains("going LIVE"));
            let pri_alone = self
                .vm
                .as_ref()
                .is_some_and(|p| Proc::text(&p.err).contains("runs on UNPROTECTED"));
            let pri_ended = self.vm.as_mut().is_some_and(|p| p.ended().is_some());
            let sec_ended = self.secondary.as_mut().is_some_and(|p| p.ended().is_some());
            if protected && sec_live && pri_ended {
                let sec = self.secondary.take().expect("it went live");
                let mut old = self.vm.replace(sec).expect("a VM runs");
                fr.detail += &format!(
                    "; the secondary on host {} won the arbiter and went live, the primary stopped ({})",
                    scn.hosts[self.secondary_at].name,
                    old.ended().map(|s| s.to_string()).unwrap_or_default()
                );
                fr.winner = Some("secondary".into());
                self.retired.push(old);
                self.at = self.secondary_at;
                self.sock = self.secondary_sock.clone();
                break;
            }
            if protected && pri_alone && sec_ended {
                let mut sec = self.secondary.take().expect("it ended");
                fr.detail += &format!(
                    "; the primary on host {} won the arbiter and runs on alone, the secondary stopped ({})",
                    scn.hosts[self.at].name,
                    sec.ended().map(|s| s.to_string()).unwrap_or_default()
                );
                fr.winner = Some("primary".into());
                self.stopped.push(sec);
                break;
            }
            let quiet = !sec_live && !pri_alone && !pri_ended && !sec_ended;
            if healed && !protected {
                if pri_ended {
                    let vm = self.vm.as_mut().expect("it ended");
                    return Err(WaitError::Failed(format!(
                        "the VM, running alone on host {}, stopped during the cut: {}",
                        scn.hosts[self.at].name,
                        vm.describe()
                    )));
                }
                fr.detail += &format!(
                    "; the VM runs alone on host {} (nothing to decide) and ran on",
                    scn.hosts[self.at].name
                );
                break;
            }
            if healed && to_arbiter && quiet {
                fr.detail += "; the pair kept talking over its own link: nothing to decide";
                break;
            }
            if healed && !sec_live && !pri_alone && (pri_ended || sec_ended) {
                // The guest ended (console workload) with the pair intact.
                fr.detail += "; no side lost the other";
                break;
            }
            if cut.elapsed() > deadline {
                return Err(WaitError::Failed(format!(
                    "partition: no decision within {deadline:?} (secondary went live: {sec_live}, primary runs alone: {pri_alone})"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Heal on time even when the decision came first.
        while !healed {
            heal(&self.topo, &mut healed)?;
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(WaitError::Interrupted);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}
