//! `partition`: links cut and healed on a schedule, one cut or several
//! that overlap (a partition whose `when` is `counted_from = "start"` of
//! the one before), and the wait, bounded, for what the arbiter decided
//! over all of them.

use std::time::{Duration, Instant};

use super::{ms, FaultKind, FaultReport, Proc, Run, WaitError, WaitResult, STEP};
use crate::commands::drill::scenario::Trigger;

/// One cut of a partition fault.
#[derive(Debug, Clone)]
pub(super) struct Cut {
    /// Its two ends: host names or `arbiter` (the etcd arbiter's host).
    pub x: String,
    pub y: String,
    /// When it starts, after the start of the cut before (0 for the first).
    pub after_ms: u64,
    /// How long it lasts.
    pub duration_ms: u64,
}

/// A cut as it is carried out.
struct Planned {
    a: usize,
    b: usize,
    /// From the first cut's start.
    at: Duration,
    heal: Duration,
    to_arbiter: bool,
}

impl Run<'_> {
    /// Cut every link of `cuts` at its time and heal it `duration_ms`
    /// later; meanwhile wait (bounded) for what the arbiter decided: the
    /// secondary went live and the primary stopped, or the primary runs on
    /// alone and the secondary stopped. Cuts that leave the pair talking
    /// (a host and the arbiter) or of a VM that runs alone already decide
    /// nothing: the VM must run on through them (the live side rides out a
    /// cut from the arbiter on its lease), also after a decision while
    /// later cuts are still to come.
    ///
    /// `frs` holds the first cut's report (and when it started); the
    /// report of each later cut is added when it is made. The decision is
    /// told in the report of the first cut between the hosts (else the
    /// first cut's).
    pub(super) fn partitions(
        &mut self,
        cuts: &[Cut],
        frs: &mut Vec<(FaultReport, Instant)>,
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
        let mut plan = Vec::with_capacity(cuts.len());
        let mut at = Duration::ZERO;
        for c in cuts {
            let (Some(a), Some(b)) = (end(&c.x), end(&c.y)) else {
                return Err(WaitError::Failed(format!(
                    "partition {} - {}: only a link between two hosts (the etcd arbiter's host among them) can be cut",
                    c.x, c.y
                )));
            };
            at += Duration::from_millis(c.after_ms);
            plan.push(Planned {
                a,
                b,
                at,
                heal: at + Duration::from_millis(c.duration_ms),
                to_arbiter: c.x == "arbiter" || c.y == "arbiter",
            });
        }
        let describe = |i: usize| {
            let (c, p) = (&cuts[i], &plan[i]);
            let mut d = if p.to_arbiter {
                let h = if c.x == "arbiter" { &c.y } else { &c.x };
                format!(
                    "link {h} - {} (the arbiter's host) cut for {} ms",
                    scn.hosts[arbiter.expect("resolved above")].name,
                    c.duration_ms
                )
            } else {
                format!("link {} - {} cut for {} ms", c.x, c.y, c.duration_ms)
            };
            if i > 0 {
                let lasting: Vec<String> = (0..i)
                    .filter(|&j| plan[j].heal > p.at)
                    .map(|j| format!("{} - {}", cuts[j].x, cuts[j].y))
                    .collect();
                d += &format!(", {} ms after the cut before", c.after_ms);
                if !lasting.is_empty() {
                    d += &format!(", overlapping the cut of {}", lasting.join(", "));
                }
            }
            d
        };
        frs[0].0.detail = describe(0);
        // Whose report tells the decision.
        let decider = plan.iter().position(|p| !p.to_arbiter).unwrap_or(0);
        let pair_cut = plan.iter().any(|p| !p.to_arbiter);
        let protected = self.secondary.is_some();
        let deadline = plan.iter().map(|p| p.heal).max().unwrap_or_default() + STEP;
        let start = Instant::now();
        let mut note = String::new();
        let failed = |p: &mut Option<Proc>| {
            p.as_mut()
                .and_then(|p| p.ended())
                .is_some_and(|s| !s.success())
        };
        let (mut made, mut healed) = (vec![false; plan.len()], vec![false; plan.len()]);
        let mut decided = false;
        loop {
            let t = start.elapsed();
            for (i, p) in plan.iter().enumerate() {
                if !made[i] && t >= p.at {
                    self.topo
                        .set_link(p.a, p.b, false)
                        .map_err(WaitError::Failed)?;
                    made[i] = true;
                    if i > 0 {
                        let fr = self.cut_report(cuts[i].after_ms);
                        frs.push((fr, Instant::now()));
                        frs[i].0.detail = describe(i);
                    }
                }
                if made[i] && !healed[i] && t >= p.heal {
                    self.topo
                        .set_link(p.a, p.b, true)
                        .map_err(WaitError::Failed)?;
                    healed[i] = true;
                }
            }
            let healed = healed.iter().all(|h| *h);
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(WaitError::Interrupted);
            }
            if decided {
                // Later cuts must not stop the copy that is live now.
                let vm = self.vm.as_mut().expect("a VM runs");
                if vm.ended().is_some_and(|s| !s.success()) && !healed {
                    return Err(WaitError::Failed(format!(
                        "{note}; then the VM, live on host {}, stopped during a later cut: {}",
                        scn.hosts[self.at].name,
                        vm.describe()
                    )));
                }
                if healed {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
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
            let quiet = !sec_live && !pri_alone && !pri_ended && !sec_ended;
            if protected && sec_live && pri_ended {
                let sec = self.secondary.take().expect("it went live");
                let mut old = self.vm.replace(sec).expect("a VM runs");
                note = format!(
                    "the secondary on host {} won the arbiter and went live, the primary stopped ({})",
                    scn.hosts[self.secondary_at].name,
                    old.ended().map(|s| s.to_string()).unwrap_or_default()
                );
                frs[decider].0.winner = Some("secondary".into());
                self.retired.push(old);
                self.at = self.secondary_at;
                self.sock = self.secondary_sock.clone();
                decided = true;
            } else if protected && pri_alone && sec_ended {
                let mut sec = self.secondary.take().expect("it ended");
                note = format!(
                    "the primary on host {} won the arbiter and runs on alone, the secondary stopped ({})",
                    scn.hosts[self.at].name,
                    sec.ended().map(|s| s.to_string()).unwrap_or_default()
                );
                frs[decider].0.winner = Some("primary".into());
                self.stopped.push(sec);
                decided = true;
            } else if healed && !protected {
                if pri_ended {
                    let vm = self.vm.as_mut().expect("it ended");
                    return Err(WaitError::Failed(format!(
                        "the VM, running alone on host {}, stopped during the cut: {}",
                        scn.hosts[self.at].name,
                        vm.describe()
                    )));
                }
                note = format!(
                    "the VM runs alone on host {} (nothing to decide) and ran on",
                    scn.hosts[self.at].name
                );
                decided = true;
            } else if healed && !pair_cut && quiet {
                note = "the pair kept talking over its own link: nothing to decide".into();
                decided = true;
            } else if protected
                && !sec_live
                && !pri_alone
                && failed(&mut self.vm)
                && failed(&mut self.secondary)
            {
                let status = |p: &mut Option<Proc>| {
                    p.as_mut()
                        .and_then(|p| p.ended())
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                };
                note = format!(
                    "both copies stopped (the primary: {}, the secondary: {}): no copy is live",
                    status(&mut self.vm),
                    status(&mut self.secondary)
                );
                decided = true;
            } else if healed && !sec_live && !pri_alone && (pri_ended || sec_ended) {
                // The guest ended (console workload) with the pair intact.
                note = "no side lost the other".into();
                decided = true;
            }
            if decided {
                frs[decider].0.detail += &format!("; {note}");
                // Who could not reach the arbiter at first and asked again.
                let said = |p: &&Proc| Proc::text(&p.err).contains("asking again");
                let asked: Vec<&str> = (self.retired.iter().chain(&self.stopped))
                    .chain(self.vm.iter().chain(&self.secondary))
                    .filter(said)
                    .map(|p| p.what.as_str())
                    .collect();
                if !asked.is_empty() {
                    frs[decider].0.detail += &format!(
                        " (the arbiter could not be reached at first; asked again: {})",
                        asked.join(", ")
                    );
                }
                continue;
            }
            if start.elapsed() > deadline {
                return Err(WaitError::Failed(format!(
                    "partition: no decision within {deadline:?} (secondary went live: {sec_live}, primary runs alone: {pri_alone})"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// The report of a later cut of an overlapping partition, as it is made.
    fn cut_report(&self, after_ms: u64) -> FaultReport {
        let at = ms(self.started.elapsed());
        FaultReport::new(
            FaultKind::Partition,
            Trigger::Ms(after_ms),
            self.work_seen(),
            at,
        )
    }
}
