//! Divergence repair on a live secondary (DESIGN.md rule 5, issue 8).
//!
//! When the replay diverges, the secondary does not wait for the next sync
//! point the primary happens to log (a kick, the periodic one, the final
//! one): it asks the primary for one at once ([`kind::SYNC_REQUEST`]); the
//! primary captures it, with its state digest, at its next exit. The
//! replayer meanwhile skips the log to the next sync point and adopts it;
//! the repair is then reported to the primary ([`kind::REPAIRED`]) and
//! counted on both sides (`tandem status`). The frames go out through the
//! receiving thread, which owns the connection ([`crate::watch::receive`]).

use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use failover::lockstep::{kind, Repaired, SyncRequest};
use vmm::inputs::Divergence;

use crate::lockstep::Follow;

/// Refuse the log stream (damaged, another VM's, unusable): `reason` goes
/// to the primary as an `Abort` and the receiving thread stops taking and
/// acknowledging its bytes.
pub fn refuse(to_primary: &Sender<Outgoing>, reason: &str) {
    let msg = failover::channel::Message::Abort {
        reason: reason.to_string(),
    };
    if let Ok(bytes) = postcard::to_stdvec(&msg) {
        let _ = to_primary.send((failover::channel::kind::MESSAGE, bytes));
    }
}

/// What a replayer in repair mode tells the world about its repairs.
pub trait RepairHooks: Send {
    /// The replay diverged; it is about to skip to the next sync point.
    fn diverged(&mut self, divergence: &Divergence);
    /// `divergence` was repaired by the sync point at `sync_exit`.
    fn repaired(&mut self, divergence: &Divergence, sync_exit: u64);
}

/// A frame for the primary, sent by the receiving thread.
pub type Outgoing = (u8, Vec<u8>);

/// The secondary's [`RepairHooks`]: requests and reports go to the
/// primary, counts to [`Follow`] (status), lines to stderr.
pub struct ChannelRepair {
    to_primary: Sender<Outgoing>,
    follow: Arc<Follow>,
}

impl ChannelRepair {
    /// Frames for the primary go to `to_primary`.
    pub fn new(to_primary: Sender<Outgoing>, follow: Arc<Follow>) -> Self {
        ChannelRepair { to_primary, follow }
    }

    fn send<T: serde::Serialize>(&self, k: u8, msg: &T) {
        if let Ok(bytes) = postcard::to_stdvec(msg) {
            // The stream may have ended: nothing to ask then.
            let _ = self.to_primary.send((k, bytes));
        }
    }
}

impl RepairHooks for ChannelRepair {
    fn diverged(&mut self, d: &Divergence) {
        self.follow.sync_requests.fetch_add(1, Ordering::SeqCst);
        eprintln!("tandem: replay {d}; asking the primary for a sync point");
        self.send(
            kind::SYNC_REQUEST,
            &SyncRequest {
                exit_seq: d.exit_seq,
            },
        );
    }

    fn repaired(&mut self, d: &Divergence, sync_exit: u64) {
        let repaired = self.follow.repaired.fetch_add(1, Ordering::SeqCst) + 1;
        eprintln!(
            "tandem: divergence at exit {} repaired with the sync point at exit {sync_exit} ({} exits later; {repaired} repaired so far)",
            d.exit_seq,
            sync_exit.saturating_sub(d.exit_seq)
        );
        self.send(
            kind::REPAIRED,
            &Repaired {
                diverged_at: d.exit_seq,
                sync_exit,
                repaired,
            },
        );
    }
}
