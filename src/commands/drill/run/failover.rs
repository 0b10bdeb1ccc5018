//! The faults after which the secondary goes live: `kill-primary`
//! (SIGKILL of the primary's VMM), `pull-plug` (the same, and every link
//! of its host cut at that instant: the host's power and network gone at
//! once), `failover` (`tandem failover --api`, the operator's test
//! failover). Each waits, bounded, until the secondary says it won the
//! arbiter and went live; from then on that VMM is the VM.

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
}
