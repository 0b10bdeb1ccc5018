//! When an iterative pre-copy stops, and auto-converge: the end-of-round
//! policy shared by live migration ([`super::migrate`]) and local disk
//! moves ([`super::move_disk`]).

use std::time::Duration;

use super::control::VmController;
use super::Progress;

/// Rounds before the switch is forced even if the pause target is not met
/// (the guest is throttled long before that).
pub(crate) const MAX_ROUNDS: u32 = 30;
/// While a round still shrinks the dirty set and the estimate is above
/// this, do up to [`EXTRA_ROUNDS`] more rounds even below the target: a
/// cheap round now saves pause time later.
const GOOD_ENOUGH: Duration = Duration::from_millis(2);
/// At most this many such extra rounds.
const EXTRA_ROUNDS: u32 = 3;

/// The state of the end-of-round policy across the rounds of one pre-copy.
pub(crate) struct Precopy<'a> {
    ctl: &'a VmController,
    target: Duration,
    extra: u32,
    prev_dirty: u64,
    converged: bool,
    gave_up: bool,
    max_throttle_pct: u32,
}

impl<'a> Precopy<'a> {
    /// A pre-copy of the VM behind `ctl` aiming at a pause of at most
    /// `target`.
    pub(crate) fn new(ctl: &'a VmController, target: Duration) -> Self {
        Precopy {
            ctl,
            target,
            extra: 0,
            prev_dirty: u64::MAX,
            converged: false,
            gave_up: false,
            max_throttle_pct: 0,
        }
    }

    /// What the previous round left dirty (`u64::MAX` before the end of the
    /// first round).
    pub(crate) fn prev_dirty(&self) -> u64 {
        self.prev_dirty
    }

    /// Did a round's estimate fit the target?
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
    /// guest dirtied meanwhile, `estimate` the pause if the switch happened
    /// now and `shrinking` whether the round shrank the dirty set enough to
    /// be worth another. Auto-converge: from the second round on, while the
    /// dirty set does not halve from one round to the next, the guest is
    /// throttled harder (20 %, then 20 more up to 99 %) through `ctl` and
    /// `progress.throttle_pct`. Returns whether pre-copy should stop (see
    /// [`Self::converged`] and [`Self::gave_up`] for why).
    pub(crate) fn end_round(
        &mut self,
        progress: &mut Progress,
        rounds: u32,
        dirty: u64,
        estimate: Duration,
        shrinking: bool,
    ) -> bool {
        if estimate <= self.target {
            self.converged = true;
            if !(shrinking && estimate > GOOD_ENOUGH && self.extra < EXTRA_ROUNDS) {
                return true;
            }
            self.extra += 1;
        }
        if rounds >= MAX_ROUNDS {
            self.gave_up = true;
            return true;
        }
        // Auto-converge: the guest dirties faster than we copy.
        if rounds >= 2 && dirty * 2 > self.prev_dirty {
            let pct = match progress.throttle_pct {
                0 => 20,
                p => (p + 20).min(99),
            };
            progress.throttle_pct = pct;
            self.max_throttle_pct = pct;
            self.ctl.set_throttle(pct);
        }
        self.prev_dirty = dirty;
        false
    }
}
