//! The drill's arbiter: `--arbiter file:DIR` (a directory of the run both
//! hosts see) or a real etcd (Debian's `etcd-server`) started in the
//! namespace of the host the scenario names, listening on that host's
//! link addresses, its data in the run's directory, killed with the run's
//! other processes (also on Ctrl-C: it is a [`Proc`] of the run).
//!
//! Each VMM reaches etcd over the link between its host and the arbiter's
//! (`--arbiter etcd:http://ADDR:2379?ttl=T`, ADDR the arbiter host's end
//! of that link), so a `partition` with `arbiter` in `between` cuts
//! exactly that link.

use std::time::{Duration, Instant};

use super::{Proc, Run, WaitError, WaitResult};
use crate::commands::drill::scenario::{ArbiterKind, Scenario};
use crate::commands::drill::topo::Topology;

/// etcd's client and peer ports (each run's arbiter host is a namespace
/// of its own: nothing else listens there).
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// Bound of etcd's start (about 0.1 s here; a loaded host is slower).
const START: Duration = Duration::from_secs(60);
/// What etcd (`--logger zap`) prints for each client address it serves.
const SERVING: &str = "serving client traffic";

/// The lease TTL (seconds) the drill's VMMs ask etcd for.
///
/// The TTL does not lengthen a run: the key exists only once a side
/// claims the VM, and a failover waits for the heartbeat timeout, not for
/// the lease. It is how long the live side rides out a cut from the
/// arbiter: it renews every TTL/5 and stops TTL/5 before the lease's end,
/// so a cut that starts just before a renewal was due is ridden out for
/// 0.6·TTL. The drill asks for the smallest TTL (at least 5 s) whose
/// 0.6·TTL exceeds its longest cut from the arbiter by [`LOAD_SLACK`]:
/// 10 s for `mail-partition`'s 3 s cuts.
pub fn lease_ttl_s(scn: &Scenario) -> u64 {
    let longest = scn
        .faults
        .iter()
        .filter(|f| {
            f.between
                .as_ref()
                .is_some_and(|e| e.iter().any(|x| x == "arbiter"))
        })
        .filter_map(|f| f.duration_ms)
        .max()
        .unwrap_or(0);
    let need_ms = longest + LOAD_SLACK.as_millis() as u64;
    need_ms.div_ceil(600).max(5)
}

/// What the live side's renewals may lose to a loaded host on top of the
/// cut itself (silences of up to 1.1 s were measured under load,
/// docs/failover.md): twice that, and a reconnection.
const LOAD_SLACK: Duration = Duration::from_secs(3);

impl Run<'_> {
    /// The host the etcd arbiter runs on, if the drill has one.
    pub(super) fn etcd_host(&self) -> Option<usize> {
        let a = self.ctx.scn.arbiter.as_ref()?;
        if a.kind != ArbiterKind::Etcd {
            return None;
        }
        let name = a.host.as_deref()?;
        self.ctx.scn.hosts.iter().position(|h| h.name == name)
    }

    /// Start etcd on its host (a drill with an etcd arbiter) and wait
    /// until it serves every one of that host's link addresses.
    pub(super) fn start_arbiter(&mut self) -> WaitResult<()> {
        let Some(h) = self.etcd_host() else {
            return Ok(());
        };
        let addrs = self.topo.addrs_of(h);
        if addrs.is_empty() {
            return Err(WaitError::Failed(
                "the etcd arbiter's host has no link to any other host".into(),
            ));
        }
        let urls: Vec<String> = addrs
            .iter()
            .map(|a| format!("http://{a}:{CLIENT_PORT}"))
            .collect();
        let urls = urls.join(",");
        let peer = format!("http://127.0.0.1:{PEER_PORT}");
        let data = self.dir.join("etcd");
        let mut c = Topology::command(&self.topo.hosts[h], std::path::Path::new("etcd"));
        c.args(["--name", "drill", "--logger", "zap", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &urls])
            .args(["--advertise-client-urls", &urls])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("drill={peer}")]);
        let name = &self.ctx.scn.hosts[h].name;
        let mut p = Proc::spawn(&format!("etcd (the arbiter) on host {name}"), c)
            .map_err(WaitError::Failed)?;
        let start = Instant::now();
        loop {
            let serving = {
                let err = p.err.lock().unwrap_or_else(|e| e.into_inner());
                addrs
                    .iter()
                    .filter(|a| {
                        let at = format!("\"{a}:{CLIENT_PORT}\"");
                        err.iter()
                            .any(|(_, l)| l.contains(SERVING) && l.contains(&at))
                    })
                    .count()
            };
            if serving == addrs.len() {
                break;
            }
            if self.ctx.stop.load(std::sync::atomic::Ordering::Relaxed) {
                self.etcd = Some(p);
                return Err(WaitError::Interrupted);
            }
            if p.ended().is_some() || start.elapsed() > START {
                let e = format!(
                    "etcd did not serve {urls} within {START:?}: {}",
                    p.describe()
                );
                self.etcd = Some(p);
                return Err(WaitError::Failed(e));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.etcd = Some(p);
        Ok(())
    }

    /// `--arbiter SPEC` for a VMM on host `h`: `file:DIR` (a directory of
    /// the run both hosts see) or `etcd:http://ADDR:PORT?ttl=T` (ADDR the
    /// arbiter host's end of its link to `h`); none without an arbiter.
    pub(super) fn arbiter_args(&self, h: usize) -> WaitResult<Vec<String>> {
        let Some(a) = &self.ctx.scn.arbiter else {
            return Ok(Vec::new());
        };
        let spec = match a.kind {
            ArbiterKind::File => {
                let d = self.dir.join("arbiter");
                std::fs::create_dir_all(&d)
                    .map_err(|e| WaitError::Failed(format!("creating {}: {e}", d.display())))?;
                format!("file:{}", d.display())
            }
            ArbiterKind::Etcd => {
                let e = self
                    .etcd_host()
                    .expect("validated: an etcd arbiter has a host");
                let addr = self.topo.addr_towards(e, h).ok_or_else(|| {
                    WaitError::Failed(format!(
                        "no link between host {} and the arbiter's host {}",
                        self.ctx.scn.hosts[h].name, self.ctx.scn.hosts[e].name
                    ))
                })?;
                format!(
                    "etcd:http://{addr}:{CLIENT_PORT}?ttl={}",
                    lease_ttl_s(self.ctx.scn)
                )
            }
        };
        Ok(vec!["--arbiter".into(), spec])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_rides_out_the_longest_cut_from_the_arbiter() {
        let text = include_str!("../../../../scenarios/mail-partition.toml");
        let scn = Scenario::parse("mail-partition.toml", text).unwrap();
        let ttl = lease_ttl_s(&scn);
        assert_eq!(ttl, 10);
        // 0.6·TTL covers the 3 s cut plus the slack.
        assert!(ttl as f64 * 0.6 >= 3.0 + LOAD_SLACK.as_secs_f64());
    }
}
