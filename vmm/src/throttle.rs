//! Auto-converge throttling as a duty cycle that the vCPU thread honours
//! itself.
//!
//! Another thread (a migration) sets a percentage on a shared [`Throttle`];
//! the run loop ([`crate::machine::Machine::run`]) keeps a [`DutyCycle`] and,
//! at every exit or kick, sleeps once the guest has run its share of the
//! current period: after running `ran`, it sleeps `ran * pct / (100 - pct)`,
//! so that `slept / (ran + slept)` never exceeds `pct` (an oversleep is
//! taken off the next sleep). The loop arms the kicker at the end of the
//! guest's share, so a guest that makes no exits is throttled too.
//!
//! The sleep is a wait on a condition variable: setting the percentage (to
//! 0 when the migration ends or fails) or [`Throttle::wake`] (a request for
//! the vCPU thread, e.g. a pause or the stop-and-copy) ends it at once.
//! Nothing is ever queued, so a throttle cannot outlast its migration.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Highest throttle: the guest always runs at least 1 % of the time.
pub const MAX_PCT: u32 = 99;

/// One run-and-sleep cycle. Short, so that the guest's progress is smooth
/// and a throttle change takes effect within a few milliseconds.
pub const PERIOD: Duration = Duration::from_millis(20);

/// The throttle of one VM, shared by the vCPU thread and its controllers.
#[derive(Debug, Default)]
pub struct Throttle {
    pct: AtomicU32,
    /// Time the vCPU thread spent throttled, in all.
    slept_ns: AtomicU64,
    /// Bumped by every change and wake-up; the sleeper waits for a change.
    generation: Mutex<u64>,
    cond: Condvar,
}

impl Throttle {
    /// No throttling (0 %).
    pub fn new() -> Self {
        Self::default()
    }

    /// Hold the guest `pct` % of the time (0: not at all; at most
    /// [`MAX_PCT`]). Takes effect at once, also for a sleeping vCPU.
    pub fn set(&self, pct: u32) {
        self.pct.store(pct.min(MAX_PCT), Ordering::SeqCst);
        self.wake();
    }

    /// The current percentage.
    pub fn pct(&self) -> u32 {
        self.pct.load(Ordering::SeqCst)
    }

    /// End the current sleep, if any (the vCPU thread has a request).
    pub fn wake(&self) {
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        *g = g.wrapping_add(1);
        self.cond.notify_all();
    }

    /// Time the guest was held by the throttle so far (all migrations).
    pub fn throttled(&self) -> Duration {
        Duration::from_nanos(self.slept_ns.load(Ordering::Relaxed))
    }

    /// Sleep up to `d`; return early when the throttle changes, is woken,
    /// or `pause` is raised. Returns the time slept.
    fn sleep(&self, d: Duration, pause: Option<&AtomicBool>) -> Duration {
        let start = Instant::now();
        let deadline = start + d;
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        let gen = *g;
        loop {
            let now = Instant::now();
            if now >= deadline
                || *g != gen
                || self.pct() == 0
                || pause.is_some_and(|p| p.load(Ordering::SeqCst))
            {
                break;
            }
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(g);
        let slept = start.elapsed();
        self.slept_ns
            .fetch_add(slept.as_nanos() as u64, Ordering::Relaxed);
        slept
    }
}

/// The vCPU thread's side of a [`Throttle`]: where the current period
/// started and how much it overslept.
#[derive(Debug, Default)]
pub struct DutyCycle {
    /// When the guest last started running under the throttle.
    mark: Option<Instant>,
    /// Slept beyond what was owed; taken off the next sleep.
    overslept: Duration,
}

impl DutyCycle {
    /// At an exit (or kick): if the guest has run its share of the period,
    /// sleep the rest. Returns when the vCPU must be kicked to come back
    /// here (the end of its next share), or `None` while not throttled.
    pub fn at_exit(&mut self, throttle: &Throttle, pause: Option<&AtomicBool>) -> Option<Instant> {
        let pct = throttle.pct();
        if pct == 0 {
            self.mark = None;
            self.overslept = Duration::ZERO;
            return None;
        }
        let share = share(pct);
        let now = Instant::now();
        let mark = *self.mark.get_or_insert(now);
        let ran = now - mark;
        if ran < share {
            return Some(mark + share);
        }
        let owed = owed_sleep(pct, ran).saturating_sub(self.overslept);
        let slept = throttle.sleep(owed, pause);
        self.overslept = slept.saturating_sub(owed);
        let now = Instant::now();
        self.mark = Some(now);
        Some(now + share)
    }
}

/// How long the guest runs in each [`PERIOD`] at `pct` (`pct` > 0).
fn share(pct: u32) -> Duration {
    PERIOD * (100 - pct.min(MAX_PCT)) / 100
}

/// The sleep owed after the guest ran `ran` at `pct` % (`pct` > 0):
/// `ran * pct / (100 - pct)`, so that the sleep is `pct` % of the cycle.
/// `ran` is capped at one [`PERIOD`]: time the loop spent elsewhere (a
/// halted guest waiting for its timer, a pause) is not owed in full.
fn owed_sleep(pct: u32, ran: Duration) -> Duration {
    let pct = pct.min(MAX_PCT);
    ran.min(PERIOD) * pct / (100 - pct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_never_exceeds_the_percentage() {
        for pct in [1, 20, 40, 60, 80, 99] {
            for ran_us in [share(pct).as_micros() as u64, 5_000, 20_000, 1_000_000] {
                let ran = Duration::from_micros(ran_us).max(share(pct));
                let slept = owed_sleep(pct, ran);
                let frac = slept.as_secs_f64() / (ran + slept).as_secs_f64();
                assert!(
                    frac <= pct as f64 / 100.0 + 1e-9,
                    "pct {pct} ran {ran:?}: slept {slept:?} = {frac}"
                );
            }
        }
        // 100 % is never reached.
        assert_eq!(share(100), PERIOD / 100);
    }

    #[test]
    fn duty_cycle_holds_about_pct_and_stops_at_once() {
        let t = std::sync::Arc::new(Throttle::new());
        let mut duty = DutyCycle::default();
        assert_eq!(duty.at_exit(&t, None), None);
        t.set(60);
        // Simulate a guest that exits every 100 us for 200 ms.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(200) {
            duty.at_exit(&t, None);
            std::thread::sleep(Duration::from_micros(100));
        }
        let slept = t.throttled();
        let elapsed = start.elapsed();
        // Every oversleep is paid back by the next sleep; only the last
        // one is still outstanding. Without it, the sleeps are at most
        // 60 % of the time, however late the host woke us.
        let owed = slept.saturating_sub(duty.overslept);
        let frac = owed.as_secs_f64() / elapsed.as_secs_f64();
        assert!(frac <= 0.6 + 1e-3, "slept {frac} of the time at 60 %");
        assert!(slept > Duration::ZERO, "the throttle never slept");
        // A long sleep ends as soon as the throttle is lifted.
        t.set(99);
        let t2 = t.clone();
        let lifter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            t2.set(0);
        });
        let before = t.throttled();
        let mut duty = DutyCycle {
            mark: Some(Instant::now() - PERIOD),
            overslept: Duration::ZERO,
        };
        duty.at_exit(&t, None);
        lifter.join().unwrap();
        let one = t.throttled() - before;
        assert!(one < owed_sleep(99, PERIOD), "slept {one:?} after the lift");
        assert_eq!(duty.at_exit(&t, None), None);
    }
}
