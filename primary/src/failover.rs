//! The primary's part of failover (issue 10, `docs/failover.md`): what
//! happens when its secondary is lost.
//!
//! The secondary is lost when nothing (acknowledgement, heartbeat) came
//! from it for the failover timeout, or the connection failed. The primary
//! then asks the arbiter for `(VM, generation)`:
//! - won: it releases every held output and runs on **unprotected** (said
//!   on stderr);
//! - lost (the secondary is live already) or the arbiter is unreachable,
//!   or no arbiter was configured: its held outputs never leave and the
//!   process stops at once with [`STOPPED`], saying why.

use std::sync::Arc;

use failover::arbiter::{Arbiter, Verdict};
use failover::heartbeat::{Protection, Timing};

/// Exit status of a side that stopped because it may not be live.
pub const STOPPED: i32 = failover::arbiter::STOPPED;

/// What the primary needs for failover.
#[derive(Clone)]
pub struct FailoverParams {
    /// Heartbeat interval and failover timeout.
    pub timing: Timing,
    /// The VM and generation (sent to the secondary first).
    pub protection: Protection,
    /// `--arbiter`, if given.
    pub arbiter: Option<Arc<dyn Arbiter>>,
    /// Its identity (`Arbiter::identity`, taken when it was opened): the
    /// secondary refuses a primary that asks another arbiter than its own.
    pub arbiter_id: Option<String>,
    /// Our identity in a claim.
    pub holder: String,
    /// Called (on its own thread's behalf: it must not block) once this
    /// primary has lost its secondary and won the arbiter: it runs alone
    /// now (`tandem protect` notes it, `--spare` seeds a new secondary).
    pub on_alone: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// What the loss of the secondary decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run on alone, outputs released.
    Alone,
    /// Stop now (the message says why).
    Stop(String),
}

/// Ask the arbiter whether we may go on alone after losing the secondary
/// (`why`).
pub fn decide(p: &FailoverParams, why: &str) -> Decision {
    let Some(arbiter) = &p.arbiter else {
        return Decision::Stop(format!(
            "protection lost ({why}) and no --arbiter was given: this primary may not run on alone; its held outputs are never released"
        ));
    };
    let vm = &p.protection.vm_id;
    let g = p.protection.generation;
    let say = |m: &str| eprintln!("tandem: protection lost ({why}): {m}");
    let patience = failover::arbiter::CLAIM_PATIENCE;
    match failover::arbiter::claim_patiently(arbiter.as_ref(), vm, g, &p.holder, patience, say) {
        Ok(Verdict::Won) => {
            let note = failover::arbiter::token_note(arbiter.as_ref(), vm, g);
            if !note.is_empty() {
                eprintln!(
                    "tandem: the arbiter {} gave VM {vm} generation {g} to this primary{note}",
                    arbiter.describe()
                );
            }
            Decision::Alone
        }
        Ok(Verdict::Lost { holder }) => Decision::Stop(format!(
            "protection lost ({why}); the arbiter {} gave VM {vm} generation {g} to {holder}: that copy is live, this one stops; its held outputs are never released",
            arbiter.describe()
        )),
        Err(e) => Decision::Stop(format!(
            "protection lost ({why}); {e}: not running on alone; held outputs are never released"
        )),
    }
}
