//! Heartbeats and failure detection between a primary and its secondary
//! (issue 10). See `docs/failover.md`.
//!
//! On the lockstep connection (`crate::lockstep`), after the secondary
//! accepted the VM:
//! - primary → secondary: one [`kind::PROTECTION`] frame first (the VM's
//!   identity for the arbiter), then, besides the log, a [`kind::HEARTBEAT`]
//!   frame every interval carrying a [`PrimaryBeat`]: a stamp of the
//!   primary's monotonic clock and how far its outputs have been released;
//! - secondary → primary: a [`kind::HEARTBEAT`] frame carrying a
//!   [`SecondaryBeat`] at once for every primary heartbeat and every
//!   interval on its own: the log bytes it has and the newest primary stamp
//!   it has seen.
//!
//! Any frame (log bytes, acknowledgements, heartbeats) is a sign of life.
//! A side that hears nothing for the failover timeout considers its peer
//! lost.
//!
//! **The release lease.** The secondary goes live only after hearing
//! nothing for `timeout`. When it echoes the primary's stamp `T`, it has
//! heard the primary at or after `T` (real time), so it cannot go live
//! before `T + timeout`. The primary therefore releases outputs only while
//! its own clock is below `T + timeout - margin` for the newest echo `T`
//! ([`lease_end`]): a primary frozen (SIGSTOP) past the timeout finds its
//! lease expired when it wakes and releases nothing, however many
//! acknowledgements were waiting in its socket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Frame kinds of the failover messages (beside `crate::lockstep::kind`).
pub mod kind {
    /// [`super::PrimaryBeat`] or [`super::SecondaryBeat`] (by direction).
    pub const HEARTBEAT: u8 = 40;
    /// [`super::Protection`], primary → secondary, once, first after
    /// `ACCEPTED`.
    pub const PROTECTION: u8 = 41;
}

/// Default heartbeat interval (see `docs/failover.md`, "Choosing the
/// defaults", for the measurement behind it).
pub const DEFAULT_HEARTBEAT_MS: u64 = 50;
/// Default failover timeout (see `docs/failover.md`).
pub const DEFAULT_FAILOVER_TIMEOUT_MS: u64 = 1000;

/// Longest VM identifier accepted from a peer.
pub const MAX_VM_ID: usize = 64;

/// Heartbeat interval and failover timeout of one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A heartbeat at least this often.
    pub interval: Duration,
    /// Silence for this long: the peer is lost.
    pub timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            interval: Duration::from_millis(DEFAULT_HEARTBEAT_MS),
            timeout: Duration::from_millis(DEFAULT_FAILOVER_TIMEOUT_MS),
        }
    }
}

impl Timing {
    /// From `--heartbeat-ms` and `--failover-timeout-ms`; the timeout must
    /// cover at least three heartbeats.
    pub fn from_ms(heartbeat_ms: u64, timeout_ms: u64) -> Result<Timing, HeartbeatError> {
        if heartbeat_ms == 0 {
            return Err(HeartbeatError::ZeroInterval);
        }
        if timeout_ms < heartbeat_ms.saturating_mul(3) {
            return Err(HeartbeatError::TimeoutTooShort {
                timeout_ms,
                heartbeat_ms,
            });
        }
        if timeout_ms > MAX_FAILOVER_TIMEOUT_MS {
            return Err(HeartbeatError::TimeoutTooLong { timeout_ms });
        }
        Ok(Timing {
            interval: Duration::from_millis(heartbeat_ms),
            timeout: Duration::from_millis(timeout_ms),
        })
    }

    /// The safety margin the primary keeps off its release lease (clock
    /// rates of two hosts, scheduling): one heartbeat or a tenth of the
    /// timeout, whichever is larger.
    pub fn lease_margin(&self) -> Duration {
        self.interval.max(self.timeout / 10)
    }
}

/// Which VM, which protection: the key of the arbiter's test-and-set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protection {
    /// Identifier of the VM (hex, chosen by the primary when protection
    /// starts).
    pub vm_id: String,
    /// Protection generation (1 for a VM protected from boot; a new
    /// secondary seeded later gets the next one).
    pub generation: u64,
    /// The primary's `--heartbeat-ms` (the secondary warns if its own
    /// timeout is below three of them).
    pub heartbeat_ms: u64,
}

impl Protection {
    /// A peer's identity is checked before it names a claim file.
    pub fn check(&self) -> Result<(), HeartbeatError> {
        check_vm_id(&self.vm_id)?;
        if self.generation == 0 {
            return Err(HeartbeatError::GenerationZero);
        }
        Ok(())
    }
}

/// A VM id is 1..=64 lowercase hex digits or dashes.
pub fn check_vm_id(id: &str) -> Result<(), HeartbeatError> {
    if id.is_empty()
        || id.len() > MAX_VM_ID
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-')
    {
        return Err(HeartbeatError::VmId(id.chars().take(80).collect()));
    }
    Ok(())
}

/// Longest accepted `--failover-timeout-ms` (10 minutes).
pub const MAX_FAILOVER_TIMEOUT_MS: u64 = 600_000;

/// Bad heartbeat settings or a bad protection identity from a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    /// `--heartbeat-ms 0`.
    #[error("--heartbeat-ms must be at least 1")]
    ZeroInterval,
    /// The timeout covers fewer than three heartbeats.
    #[error("--failover-timeout-ms {timeout_ms} must be at least three heartbeats (3 x --heartbeat-ms {heartbeat_ms})")]
    TimeoutTooShort {
        /// The timeout asked for.
        timeout_ms: u64,
        /// The heartbeat interval.
        heartbeat_ms: u64,
    },
    /// The timeout is over [`MAX_FAILOVER_TIMEOUT_MS`].
    #[error("--failover-timeout-ms {timeout_ms}: at most 600000 (10 minutes)")]
    TimeoutTooLong {
        /// The timeout asked for.
        timeout_ms: u64,
    },
    /// A VM id that is not 1..=64 lowercase hex digits or dashes (its
    /// first 80 characters).
    #[error("VM id {0:?}: must be 1 to {MAX_VM_ID} lowercase hex digits or dashes")]
    VmId(String),
    /// A protection of generation 0.
    #[error("protection generation 0")]
    GenerationZero,
}

/// A fresh VM id: BLAKE3 of the time, the process and `seed`, 32 hex digits.
pub fn new_vm_id(seed: &[u8]) -> String {
    let mut h = recordlog::Hasher::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(seed);
    h.finalize().to_hex()[..32].to_string()
}

/// Primary → secondary heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryBeat {
    /// The primary's monotonic clock in µs (since its link started).
    pub stamp_us: u64,
    /// Every output whose log entry ends at or before this log offset has
    /// been released to the outside world.
    pub released: u64,
}

/// Secondary → primary heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondaryBeat {
    /// Log bytes received so far.
    pub offset: u64,
    /// The newest [`PrimaryBeat::stamp_us`] received.
    pub echo_us: u64,
}

/// When the last sign of life of the peer came (any thread may touch it).
#[derive(Debug)]
pub struct Liveness {
    start: Instant,
    last_us: AtomicU64,
    longest_us: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::new()
    }
}

impl Liveness {
    /// Alive now.
    pub fn new() -> Self {
        Liveness {
            start: Instant::now(),
            last_us: AtomicU64::new(0),
            longest_us: AtomicU64::new(0),
        }
    }

    /// µs since this was created (the stamp clock).
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// A sign of life, now.
    pub fn touch(&self) {
        let now = self.now_us();
        let prev = self.last_us.fetch_max(now, Ordering::SeqCst);
        self.longest_us
            .fetch_max(now.saturating_sub(prev), Ordering::SeqCst);
    }

    /// The longest silence between two signs of life so far (what a
    /// timeout must stay above: `docs/failover.md`).
    pub fn longest_silence(&self) -> Duration {
        Duration::from_micros(self.longest_us.load(Ordering::SeqCst))
    }

    /// How long since the last sign of life.
    pub fn silent_for(&self) -> Duration {
        Duration::from_micros(
            self.now_us()
                .saturating_sub(self.last_us.load(Ordering::SeqCst)),
        )
    }

    /// The instant of the last sign of life.
    pub fn last(&self) -> Instant {
        self.start + Duration::from_micros(self.last_us.load(Ordering::SeqCst))
    }
}

/// The end of the primary's release lease for the newest echoed stamp
/// (µs on the primary's stamp clock): see the module docs.
pub fn lease_end(echo_us: u64, timing: &Timing) -> u64 {
    echo_us
        + timing
            .timeout
            .saturating_sub(timing.lease_margin())
            .as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_is_checked() {
        assert!(Timing::from_ms(0, 100).is_err());
        assert_eq!(
            Timing::from_ms(50, 100).unwrap_err(),
            HeartbeatError::TimeoutTooShort {
                timeout_ms: 100,
                heartbeat_ms: 50
            }
        );
        assert!(Timing::from_ms(50, 100)
            .unwrap_err()
            .to_string()
            .contains("three"));
        assert!(matches!(
            Timing::from_ms(50, 600_001),
            Err(HeartbeatError::TimeoutTooLong { .. })
        ));
        let t = Timing::from_ms(50, 1000).unwrap();
        assert_eq!(t.lease_margin(), Duration::from_millis(100));
        assert_eq!(lease_end(1_000, &t), 1_000 + 900_000);
    }

    #[test]
    fn vm_ids_from_a_peer_are_checked() {
        assert!(check_vm_id(&new_vm_id(b"x")).is_ok());
        assert!(check_vm_id("../etc").is_err());
        assert!(check_vm_id("").is_err());
        assert!(check_vm_id(&"a".repeat(65)).is_err());
        assert_eq!(new_vm_id(b"x").len(), 32);
    }
}
