//! The primary's side of `tandem status` for a protected VM, the same
//! for a VM protected from boot (`tandem run --protect-to`) and one
//! protected while running (`tandem protect`).

use std::time::Instant;

use failover::lockstep::{LagBoundStatus, ProtectionStatus};
use recordlog::LogQueue;

use crate::lockstep::{Acks, Waiting};

/// What the caller knows of its protection.
pub(crate) struct View<'a> {
    /// `seeding`, `protected`, ... (a lost secondary overrides it).
    pub state: String,
    /// `NAME at ADDR` of the secondary.
    pub peer: String,
    /// The exit protection started at.
    pub start_exit: u64,
    /// When the log started to stream.
    pub started: Option<Instant>,
    /// The outputs held now.
    pub waiting: Option<&'a Waiting>,
    /// The primary's exit (asked of the vCPU a moment ago).
    pub exit_seq: u64,
    /// The lag bound and log queue.
    pub bound: Option<LagBoundStatus>,
}

/// The status of the protection streaming `queue`, acknowledged into
/// `acks`.
pub(crate) fn primary_status(acks: &Acks, queue: &LogQueue, v: View<'_>) -> ProtectionStatus {
    let (failover, silent) = acks.heard();
    let (held, oldest) = v.waiting.map_or((0, None), |w| w.now());
    let st = acks.lock();
    let log_bytes = queue.stats().pushed_bytes;
    let elapsed = v.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let replayed = st.last.map_or(v.start_exit, |(a, _)| a.replayed);
    // Asked of the vCPU a moment before the last ack was read.
    let exit_seq = v.exit_seq.max(replayed);
    let state = match &st.lost {
        Some(why) => format!("lost: {why}"),
        None => v.state,
    };
    ProtectionStatus {
        role: "primary".into(),
        state,
        peer: v.peer,
        start_exit: v.start_exit,
        exit_seq,
        replayed_exit: replayed,
        lag_exits: exit_seq.saturating_sub(replayed),
        lag_us: st.lag.map_or(0.0, |d| d.as_secs_f64() * 1e6),
        log_bytes,
        log_bandwidth_bps: if elapsed > 0.0 {
            log_bytes as f64 * 8.0 / elapsed
        } else {
            0.0
        },
        acked_bytes: st.offset,
        outputs_held: held,
        oldest_held_ms: oldest.map_or(0.0, |d| d.as_secs_f64() * 1e3),
        ack_rtt_ms: st.rtt.map_or(0.0, |d| d.as_secs_f64() * 1e3),
        heartbeat_ms: failover.timing.interval.as_millis() as u64,
        failover_timeout_ms: failover.timing.timeout.as_millis() as u64,
        last_heard_ms: silent.as_secs_f64() * 1e3,
        vm_id: failover.protection.vm_id.clone(),
        generation: failover.protection.generation,
        repaired: st.repaired,
        sync_requests: st.sync_requests,
        bound: v.bound,
    }
}

/// `tandem status` of a VM protected from boot (`tandem run --protect-to
/// --api-socket`): made by [`crate::lockstep::Link::status_source`].
pub struct StatusSource {
    pub(crate) acks: std::sync::Arc<Acks>,
    pub(crate) queue: LogQueue,
    pub(crate) governor: Option<std::sync::Arc<crate::lag::Governor>>,
    pub(crate) waiting: std::sync::Arc<Waiting>,
    pub(crate) exit: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub(crate) peer: String,
    pub(crate) started: Instant,
}

impl StatusSource {
    /// The protection's status now.
    pub fn status(&self) -> ProtectionStatus {
        primary_status(
            &self.acks,
            &self.queue,
            View {
                state: "protected".into(),
                peer: self.peer.clone(),
                start_exit: 0,
                started: Some(self.started),
                waiting: Some(&self.waiting),
                exit_seq: self.exit.load(std::sync::atomic::Ordering::Relaxed),
                bound: self
                    .governor
                    .as_ref()
                    .map(|g| g.status(&self.acks, &self.queue)),
            },
        )
    }

    /// The primary's exit as the recorder last saw it.
    pub fn exit_seq(&self) -> u64 {
        self.exit.load(std::sync::atomic::Ordering::Relaxed)
    }
}
