//! When an iterative pre-copy stops, the pause estimate, and auto-converge:
//! the end-of-round policy shared by live migration ([`super::migrate`])
//! and local disk moves ([`super::move_disk`]). Pure functions of what the
//! rounds measured, so that they are tested without a VM.
//!
//! The pause the guest experiences is the time from its stop on the source
//! to its start on the destination: capturing its state, sending what is
//! still dirty, the one-way trip of the last byte, restoring. So the
//! estimate is `one-way delay + transfer + fixed costs` ([`Link::estimate`]);
//! the acknowledgement's trip back is not part of the guest's pause. A
//! target below what the link alone costs (`one-way + fixed`) cannot be met
//! by any number of rounds: [`Precopy::new`] says so up front and aims at
//! that floor plus the target instead of throttling the guest for nothing.

use std::time::Duration;

use super::Progress;

/// Rounds before the switch is forced even if the pause target is not met
/// (the guest is throttled long before that).
pub(crate) const MAX_ROUNDS: u32 = 30;
/// While a round still shrinks the dirty set and the estimated transfer is
/// above this, do up to [`EXTRA_ROUNDS`] more rounds even below the target:
/// a cheap round now saves pause time later.
const GOOD_ENOUGH: Duration = Duration::from_millis(2);
/// At most this many such extra rounds.
const EXTRA_ROUNDS: u32 = 3;
/// Auto-converge: the first throttle, and the step up each round the dirty
/// set does not halve.
const THROTTLE_STEP: u32 = 20;
/// Auto-converge never holds the guest more than this (it always runs).
pub(crate) const MAX_THROTTLE: u32 = vmm::throttle::MAX_PCT;

/// The link as the pre-copy sees it at the end of a round.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Link {
    /// The link's round trip: the smallest one seen (the smoothed one is
    /// inflated by the handshake's own processing, queueing and
    /// retransmissions; the transfer term covers the bytes' own time).
    pub rtt: Duration,
    /// Drain rate measured on rounds big enough to tell (bytes/s).
    pub measured: Option<f64>,
    /// Assumed before a round measured one (bytes/s).
    pub initial: f64,
    /// `--max-bandwidth` (bytes/s). Pre-copy rounds never go faster, so
    /// the estimate never assumes more; the stop-and-copy itself is not
    /// capped (the guest is frozen), so it takes at most the estimate.
    pub cap: Option<u64>,
    /// State capture and restore, besides the transfer.
    pub fixed: Duration,
}

impl Link {
    /// The rate the estimate assumes (bytes/s).
    pub fn rate(&self) -> f64 {
        let r = self.measured.unwrap_or(self.initial);
        match self.cap.filter(|&c| c > 0) {
            Some(c) => r.min(c as f64),
            None => r,
        }
    }

    /// Half the round trip.
    pub fn one_way(&self) -> Duration {
        self.rtt / 2
    }

    /// The shortest pause this link allows: nothing dirty left to send.
    pub fn floor(&self) -> Duration {
        self.one_way() + self.fixed
    }

    /// The pause if the guest stopped now with `bytes` still to send, which
    /// cost at least `cpu_secs` to read, encode, decode and apply.
    pub fn estimate(&self, bytes: f64, cpu_secs: f64) -> Duration {
        let transfer = (bytes / self.rate()).max(cpu_secs).max(0.0);
        self.floor() + Duration::from_secs_f64(transfer)
    }
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Another round; `throttle`: set auto-converge to this % first.
    Round { throttle: Option<u32> },
    /// Stop the guest and copy the rest.
    Switch,
}

/// The state of the end-of-round policy across the rounds of one pre-copy.
#[derive(Debug)]
pub(crate) struct Precopy {
    /// The target asked for.
    asked: Duration,
    /// The target pursued: `asked`, or the link's floor plus `asked`
    /// when the link alone exceeds it.
    target: Duration,
    floor: Duration,
    extra: u32,
    prev_dirty: u64,
    converged: bool,
    gave_up: bool,
    throttle_pct: u32,
    max_throttle_pct: u32,
}

impl Precopy {
    /// A pre-copy aiming at a pause of at most `target` on a link whose
    /// shortest possible pause is `floor` (see [`Link::floor`]).
    pub(crate) fn new(target: Duration, floor: Duration) -> Self {
        let pursued = if target < floor {
            floor + target
        } else {
            target
        };
        Precopy {
            asked: target,
            target: pursued,
            floor,
            extra: 0,
            prev_dirty: u64::MAX,
            converged: false,
            gave_up: false,
            throttle_pct: 0,
            max_throttle_pct: 0,
        }
    }

    /// The target pursued (see [`Self::unreachable`]).
    pub(crate) fn target(&self) -> Duration {
        self.target
    }

    /// When the target asked for cannot be met on this link: the one line
    /// that says so, and what is pursued instead.
    pub(crate) fn unreachable(&self) -> Option<String> {
        (self.target != self.asked).then(|| {
            format!(
                "a {:.0} ms downtime cannot be met on this link (its delay alone makes the pause at least {:.1} ms); aiming at {:.1} ms instead",
                ms(self.asked),
                ms(self.floor),
                ms(self.target)
            )
        })
    }

    /// What the previous round left dirty (`u64::MAX` before the end of the
    /// first round).
    pub(crate) fn prev_dirty(&self) -> u64 {
        self.prev_dirty
    }

    /// Did the estimate of the last round fit the target (the switch was
    /// not forced)?
    pub(crate) fn converged(&self) -> bool {
        self.converged
    }

    /// Did pre-copy stop because [`MAX_ROUNDS`] ran without converging (the
    /// switch is forced)?
    pub(crate) fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// Highest auto-converge throttle set (%).
    pub(crate) fn max_throttle_pct(&self) -> u32 {
        self.max_throttle_pct
    }

    /// The end of a round: `rounds` rounds are done, `dirty` is what the
    /// guest dirtied meanwhile (pages or blocks), `estimate` the pause if
    /// the switch happened now and `shrinking` whether the round shrank
    /// the dirty set enough to be worth another.
    ///
    /// Nothing dirty: switch (another round cannot make the pause shorter).
    /// Auto-converge: from the second round on, while the dirty set does
    /// not halve from one round to the next, the guest is throttled harder
    /// (20 %, then 20 more, up to [`MAX_THROTTLE`]); `progress.throttle_pct`
    /// follows.
    pub(crate) fn end_round(
        &mut self,
        progress: &mut Progress,
        rounds: u32,
        dirty: u64,
        estimate: Duration,
        shrinking: bool,
    ) -> Next {
        // Whether the pause, if the switch happened now, fits: not sticky,
        // an extra round can lose its bet (the guest dirtied more).
        let fits = estimate <= self.target;
        self.converged = fits;
        if dirty == 0 {
            return Next::Switch;
        }
        if fits {
            let transfer = estimate.saturating_sub(self.floor);
            if !(shrinking && transfer > GOOD_ENOUGH && self.extra < EXTRA_ROUNDS) {
                return Next::Switch;
            }
            self.extra += 1;
        }
        if rounds >= MAX_ROUNDS {
            self.gave_up = true;
            return Next::Switch;
        }
        let mut throttle = None;
        // Auto-converge: the guest dirties faster than we copy. Also after
        // a round that fitted, when an extra round no longer does: without
        // a harder throttle the rounds would go on at the same one until
        // one happens to fit again (measured: 20 rounds at 80 % at 150 ms
        // RTT under CPU load, the guest held 3.8 s).
        if rounds >= 2 && dirty.saturating_mul(2) > self.prev_dirty && !fits {
            let pct = match self.throttle_pct {
                0 => THROTTLE_STEP,
                p => (p + THROTTLE_STEP).min(MAX_THROTTLE),
            };
            if pct != self.throttle_pct {
                throttle = Some(pct);
            }
            self.throttle_pct = pct;
            self.max_throttle_pct = self.max_throttle_pct.max(pct);
        }
        progress.throttle_pct = self.throttle_pct;
        self.prev_dirty = dirty;
        Next::Round { throttle }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn link(rtt_ms: u64, measured: Option<f64>, cap: Option<u64>) -> Link {
        Link {
            rtt: MS * rtt_ms as u32,
            measured,
            initial: 100e6,
            cap,
            fixed: MS,
        }
    }

    /// Run rounds with the given (dirty, estimate) until the policy
    /// switches; returns the rounds done and the throttles set.
    fn run(p: &mut Precopy, rounds: &[(u64, Duration, bool)]) -> (u32, Vec<u32>) {
        let mut progress = Progress::default();
        let mut throttles = Vec::new();
        for (i, &(dirty, est, shrinking)) in rounds.iter().enumerate() {
            match p.end_round(&mut progress, i as u32 + 1, dirty, est, shrinking) {
                Next::Switch => return (i as u32 + 1, throttles),
                Next::Round { throttle } => throttles.extend(throttle),
            }
        }
        (rounds.len() as u32, throttles)
    }

    #[test]
    fn estimate_is_one_way_plus_transfer() {
        // 150 ms RTT, 1 Gbit/s measured, 1 MiB dirty.
        let l = link(150, Some(125e6), None);
        let e = l.estimate(1048576.0, 0.0);
        let want = 75.0 + 1.0 + 1048576.0 / 125e6 * 1e3;
        assert!((ms(e) - want).abs() < 0.01, "{e:?} vs {want} ms");
        // Not the full round trip.
        assert!(e < l.rtt);
        // The per-page cost dominates when the link is faster.
        let e = l.estimate(1000.0, 0.05);
        assert!((ms(e) - 126.0).abs() < 0.01, "{e:?}");
    }

    #[test]
    fn rtt_150ms_with_the_default_target_converges() {
        let l = link(150, Some(125e6), None);
        let mut p = Precopy::new(30 * MS, l.floor());
        // Said up front, with the numbers.
        let note = p
            .unreachable()
            .expect("30 ms is below a 75 ms one-way delay");
        assert!(note.contains("30 ms") && note.contains("76.0 ms"), "{note}");
        assert_eq!(p.target(), 106 * MS);
        // 32 MiB, then 4 MiB, then 128 KiB dirty: the last fits.
        let rounds: Vec<_> = [32u64 << 20, 4 << 20, 128 << 10, 64 << 10]
            .iter()
            .map(|&b| (b / 4096, l.estimate(b as f64, 0.0), true))
            .collect();
        let (n, throttles) = run(&mut p, &rounds);
        assert_eq!(n, 3, "switches at the first round that fits");
        assert!(throttles.is_empty(), "no throttling: {throttles:?}");
        assert!(p.converged() && !p.gave_up());
        // A target the link allows is kept.
        let p = Precopy::new(100 * MS, l.floor());
        assert_eq!(p.unreachable(), None);
        assert_eq!(p.target(), 100 * MS);
    }

    #[test]
    fn bandwidth_cap_is_in_the_estimate() {
        // Loopback, no round big enough to measure: 100 MB/s assumed, but
        // --max-bandwidth 20000 means 256 pages of ~30 bytes take 384 ms.
        let capped = link(0, None, Some(20_000));
        let free = link(0, None, None);
        let bytes = 256.0 * 30.0;
        assert!((ms(capped.estimate(bytes, 0.0)) - 385.0).abs() < 0.01);
        assert!(free.estimate(bytes, 0.0) < 2 * MS);
        // A measured rate above the cap is not believed either.
        assert_eq!(link(0, Some(1e9), Some(20_000)).rate(), 20_000.0);
        assert_eq!(link(0, Some(1e5), Some(20_000_000)).rate(), 1e5);
        // So a capped pre-copy does not claim convergence at 30 ms.
        let mut p = Precopy::new(30 * MS, capped.floor());
        let e = capped.estimate(bytes, 0.0);
        let (n, _) = run(&mut p, &vec![(256, e, false); MAX_ROUNDS as usize]);
        assert_eq!(n, MAX_ROUNDS);
        assert!(p.gave_up() && !p.converged());
    }

    #[test]
    fn empty_rounds_are_skipped() {
        // Nothing dirty: switch at once, even below an unreachable target.
        let l = link(0, None, None);
        let mut p = Precopy::new(Duration::ZERO, l.floor());
        let (n, throttles) = run(&mut p, &[(0, l.floor(), false), (0, l.floor(), false)]);
        assert_eq!((n, throttles.len()), (1, 0));
        // And no extra rounds on a converged, empty dirty set.
        let mut p = Precopy::new(30 * MS, l.floor());
        let (n, _) = run(&mut p, &[(0, 10 * MS, true), (0, 10 * MS, true)]);
        assert_eq!(n, 1);
        assert!(p.converged());
        // A shrinking dirty set that fits still gets extra rounds (at most
        // EXTRA_ROUNDS), while there is something to send.
        let mut p = Precopy::new(30 * MS, l.floor());
        let r = vec![(1000, 10 * MS, true); 10];
        let (n, _) = run(&mut p, &r);
        assert_eq!(n, EXTRA_ROUNDS + 1);
    }

    #[test]
    fn an_extra_round_that_no_longer_fits_throttles_harder() {
        // 150 ms RTT, 100 ms target: round 3 fits (92 ms) and shrank, so
        // an extra round; the guest dirtied more (100.3 ms): the throttle
        // steps up instead of staying where it was round after round.
        let l = link(150, Some(5e6), None);
        let mut p = Precopy::new(100 * MS, l.floor());
        let r = [
            (259, 300 * MS, false),
            (259, 300 * MS, false),
            (104, 155 * MS, false),
            (21, 92 * MS, true),
            (32, 101 * MS, false),
            (8, 80 * MS, true),
            (8, 80 * MS, false),
        ];
        let (n, throttles) = run(&mut p, &r);
        // Round 2 throttles (the set did not halve); round 5 steps up.
        assert_eq!(throttles, vec![20, 40], "{throttles:?}");
        assert_eq!(n, 7);
        assert!(p.converged() && !p.gave_up());
        // A round limit reached above the target is not convergence, even
        // if an earlier round fitted.
        let mut p = Precopy::new(100 * MS, l.floor());
        let mut r = vec![(21, 92 * MS, true)];
        r.extend(vec![(40, 120 * MS, false); MAX_ROUNDS as usize]);
        let (n, _) = run(&mut p, &r);
        assert_eq!(n, MAX_ROUNDS);
        assert!(p.gave_up() && !p.converged());
    }

    #[test]
    fn auto_converge_steps_up_to_the_maximum_and_no_further() {
        let l = link(0, Some(1e8), None);
        let mut p = Precopy::new(Duration::ZERO, l.floor());
        let r = vec![(1000, 50 * MS, false); MAX_ROUNDS as usize];
        let (n, throttles) = run(&mut p, &r);
        assert_eq!(n, MAX_ROUNDS);
        assert_eq!(throttles, vec![20, 40, 60, 80, MAX_THROTTLE]);
        assert_eq!(p.max_throttle_pct(), MAX_THROTTLE);
        const { assert!(MAX_THROTTLE < 100) };
        // A halving dirty set is not throttled.
        let mut p = Precopy::new(Duration::ZERO, l.floor());
        let r: Vec<_> = (0..10).map(|i| (1u64 << (20 - i), 50 * MS, true)).collect();
        let (_, throttles) = run(&mut p, &r);
        assert!(throttles.is_empty(), "{throttles:?}");
    }
}
