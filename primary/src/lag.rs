//! The lag bound of a protected primary (issue 8, docs/lockstep.md "Lag
//! bound"): a secondary that falls behind (a busier host, a stop) must not
//! grow the primary's buffers without bound.
//!
//! Two limits, the first soft, the second hard:
//! - [`Governor`]: a thread that watches the secondary's lag
//!   ([`Acks::lag_now`]: how long ago the primary was where the secondary
//!   last said it was, growing while no acknowledgement comes) and, past
//!   the lag bound, slows the vCPU with the same duty-cycle throttle that
//!   migration's auto-converge uses ([`vmm::throttle`]): 20 % held, 20
//!   more every [`STEP_EVERY`] while the lag stays above the bound, up to
//!   [`vmm::throttle::MAX_PCT`]; once the lag is under half the bound the
//!   vCPU runs at full speed again.
//! - The log queue is bounded ([`recordlog::LogQueue::bounded`]): when it
//!   is full the vCPU waits at its next log write until the sender has
//!   made room. Nothing is ever dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use failover::lockstep::LagBoundStatus;
use recordlog::LogQueue;
use vmm::throttle::{Throttle, MAX_PCT};

use crate::lockstep::Acks;

/// Default lag bound, ms.
pub const DEFAULT_LAG_BOUND_MS: u64 = 500;
/// Default bound of the log queue, MiB.
pub const DEFAULT_LOG_QUEUE_MIB: u64 = 64;

/// How often the governor looks at the lag.
const CHECK_EVERY: Duration = Duration::from_millis(10);
/// The throttle rises by [`STEP`] at most this often.
pub const STEP_EVERY: Duration = Duration::from_millis(100);
/// Throttle step (%), as migration's auto-converge.
const STEP: u32 = 20;
/// Lag samples kept for the percentiles.
const MAX_SAMPLES: usize = 1 << 16;

/// Largest lag bound accepted, ms (an hour).
pub const MAX_LAG_BOUND_MS: u64 = 3_600_000;
/// Largest log queue bound accepted, MiB (64 GiB).
pub const MAX_LOG_QUEUE_MIB: u64 = 64 << 10;
/// The same in KiB.
pub const MAX_LOG_QUEUE_KIB: u64 = MAX_LOG_QUEUE_MIB << 10;
/// Largest progress mark interval accepted, ms.
pub const MAX_PROGRESS_MS: u64 = 60_000;

/// A limit out of its range (named as the option that sets it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The lag bound.
    #[error("--lag-bound-ms {0}: at most {MAX_LAG_BOUND_MS} (0: never slow down)")]
    LagBound(u64),
    /// The log queue's bound in MiB.
    #[error("--log-queue-mib {0}: at most {MAX_LOG_QUEUE_MIB} (0: unbounded)")]
    QueueMib(u64),
    /// The log queue's bound in KiB.
    #[error("--log-queue-kib {0}: at most {MAX_LOG_QUEUE_KIB} (0: unbounded)")]
    QueueKib(u64),
    /// The progress marks' interval.
    #[error("--progress-ms {0}: at most {MAX_PROGRESS_MS} (0: no progress marks)")]
    Progress(u64),
}

/// The two limits, and the progress marks' interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagLimits {
    /// Slow the vCPU past this lag (zero: never).
    pub bound: Duration,
    /// Most log bytes queued for the secondary (zero: unbounded).
    pub queue_bytes: u64,
    /// A progress mark after this long without a flush (zero: none).
    pub progress: Duration,
}

impl Default for LagLimits {
    fn default() -> Self {
        LagLimits {
            bound: Duration::from_millis(DEFAULT_LAG_BOUND_MS),
            queue_bytes: DEFAULT_LOG_QUEUE_MIB << 20,
            progress: Duration::from_millis(crate::lockstep::DEFAULT_PROGRESS_MS),
        }
    }
}

impl LagLimits {
    /// The limits of `--lag-bound-ms`, `--log-queue-mib` (or the finer
    /// `--log-queue-kib`, which overrides it) and `--progress-ms`, each
    /// checked against its range (they may come from a control request).
    pub fn checked(
        lag_bound_ms: u64,
        log_queue_mib: u64,
        log_queue_kib: Option<u64>,
        progress_ms: u64,
    ) -> Result<LagLimits, LimitError> {
        if lag_bound_ms > MAX_LAG_BOUND_MS {
            return Err(LimitError::LagBound(lag_bound_ms));
        }
        if progress_ms > MAX_PROGRESS_MS {
            return Err(LimitError::Progress(progress_ms));
        }
        let queue_bytes = match log_queue_kib {
            Some(k) if k > MAX_LOG_QUEUE_KIB => return Err(LimitError::QueueKib(k)),
            Some(k) => k << 10,
            None if log_queue_mib > MAX_LOG_QUEUE_MIB => {
                return Err(LimitError::QueueMib(log_queue_mib))
            }
            None => log_queue_mib << 20,
        };
        Ok(LagLimits {
            bound: Duration::from_millis(lag_bound_ms),
            queue_bytes,
            progress: Duration::from_millis(progress_ms),
        })
    }

    /// The log queue these limits ask for.
    pub fn queue(&self) -> LogQueue {
        if self.queue_bytes == 0 {
            LogQueue::new()
        } else {
            LogQueue::bounded(self.queue_bytes)
        }
    }
}

/// The secondary's lag at each acknowledgement (the last
/// [`MAX_SAMPLES`]), for p50/p99.
#[derive(Debug, Default)]
pub struct LagSamples {
    us: VecDeque<u32>,
    max: u32,
    count: u64,
}

impl LagSamples {
    pub(crate) fn push(&mut self, lag: Duration) {
        let us = lag.as_micros().min(u32::MAX as u128) as u32;
        if self.us.len() >= MAX_SAMPLES {
            self.us.pop_front();
        }
        self.us.push_back(us);
        self.max = self.max.max(us);
        self.count += 1;
    }

    /// (p50, p99, max) in µs, and the number of samples.
    pub fn percentiles(&self) -> (f64, f64, f64, u64) {
        if self.us.is_empty() {
            return (0.0, 0.0, 0.0, 0);
        }
        let mut v: Vec<u32> = self.us.iter().copied().collect();
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64;
        (at(0.5), at(0.99), self.max as f64, self.count)
    }
}

/// What the governor did, shared with `tandem status`.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    slowed: AtomicBool,
    slow_downs: AtomicU64,
}

/// The thread that slows the vCPU past the lag bound (see the module
/// docs). Stops (and lifts its throttle) when dropped or [`Governor::stop`]ped.
pub struct Governor {
    shared: Arc<Shared>,
    throttle: Arc<Throttle>,
    bound: Duration,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Governor {
    /// Watch `acks` and hold the vCPU of `throttle` past `bound` (zero: the
    /// governor only measures).
    pub(crate) fn start(acks: Arc<Acks>, throttle: Arc<Throttle>, bound: Duration) -> Governor {
        let shared = Arc::new(Shared::default());
        let (sh, th) = (shared.clone(), throttle.clone());
        let thread = std::thread::Builder::new()
            .name("lockstep-lag".into())
            .spawn(move || govern(&acks, &th, bound, &sh))
            .ok();
        Governor {
            shared,
            throttle,
            bound,
            thread: Mutex::new(thread),
        }
    }

    /// Stop governing; the vCPU runs at full speed.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        self.throttle.set(0);
    }

    /// The status of the bound, with the log queue `queue` and the lag
    /// samples of `acks`.
    pub(crate) fn status(&self, acks: &Acks, queue: &LogQueue) -> LagBoundStatus {
        status(
            acks,
            queue,
            self.bound,
            &self.throttle,
            self.shared.slowed.load(Ordering::SeqCst),
            self.shared.slow_downs.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Governor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The lag bound's status (also without a governor: `bound` zero).
pub(crate) fn status(
    acks: &Acks,
    queue: &LogQueue,
    bound: Duration,
    throttle: &Throttle,
    slowed: bool,
    slow_downs: u64,
) -> LagBoundStatus {
    let q = queue.stats();
    let (p50, p99, max, n) = acks.lock().lag_samples.percentiles();
    LagBoundStatus {
        lag_bound_ms: bound.as_millis() as u64,
        lag_now_ms: acks.lag_now().as_secs_f64() * 1e3,
        slowed,
        throttle_pct: throttle.pct(),
        slow_downs,
        held_ms: throttle.throttled().as_secs_f64() * 1e3,
        lag_p50_us: p50,
        lag_p99_us: p99,
        lag_max_us: max,
        lag_samples: n,
        queue_bytes: q.pending_bytes,
        queue_high_water_bytes: q.high_water_bytes,
        queue_bound_bytes: q.bound_bytes,
        queue_full_waits: q.full_waits,
        queue_full_wait_ms: q.full_wait.as_secs_f64() * 1e3,
    }
}

fn govern(acks: &Acks, throttle: &Throttle, bound: Duration, sh: &Shared) {
    let mut stepped: Option<Instant> = None;
    while !sh.stop.load(Ordering::SeqCst) {
        std::thread::sleep(CHECK_EVERY);
        if bound.is_zero() {
            continue;
        }
        // A lost secondary (or the end of protection) is not lag.
        let gone = {
            let st = acks.lock();
            st.lost.is_some() || st.unprotected
        };
        let lag = if gone { Duration::ZERO } else { acks.lag_now() };
        let pct = throttle.pct();
        if lag > bound {
            if stepped.is_none_or(|t| t.elapsed() >= STEP_EVERY) {
                let next = if pct == 0 {
                    STEP
                } else {
                    (pct + STEP).min(MAX_PCT)
                };
                if !sh.slowed.swap(true, Ordering::SeqCst) {
                    sh.slow_downs.fetch_add(1, Ordering::SeqCst);
                    eprintln!(
                        "tandem: the secondary is {:.0} ms behind (lag bound {} ms): slowing this VM's vCPU",
                        lag.as_secs_f64() * 1e3,
                        bound.as_millis()
                    );
                }
                throttle.set(next);
                stepped = Some(Instant::now());
            }
        } else if lag < bound / 2 && sh.slowed.swap(false, Ordering::SeqCst) {
            throttle.set(0);
            stepped = None;
            eprintln!(
                "tandem: the secondary caught up ({:.0} ms behind): the vCPU runs at full speed again",
                lag.as_secs_f64() * 1e3
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_the_samples() {
        let mut s = LagSamples::default();
        assert_eq!(s.percentiles(), (0.0, 0.0, 0.0, 0));
        for us in 1..=100u64 {
            s.push(Duration::from_micros(us));
        }
        let (p50, p99, max, n) = s.percentiles();
        assert_eq!((p50, p99, max, n), (51.0, 99.0, 100.0, 100));
    }

    #[test]
    fn limits_out_of_range_are_named() {
        let ok = LagLimits::checked(100, 1, Some(256), 2).unwrap();
        assert_eq!(ok.queue_bytes, 256 << 10);
        assert_eq!(LagLimits::checked(0, 0, None, 0).unwrap().queue_bytes, 0);
        let e = LagLimits::checked(MAX_LAG_BOUND_MS + 1, 1, None, 2).unwrap_err();
        assert!(e.to_string().starts_with("--lag-bound-ms 3600001"), "{e}");
        let e = LagLimits::checked(1, u64::MAX, None, 2).unwrap_err();
        assert!(e.to_string().starts_with("--log-queue-mib"), "{e}");
        let e = LagLimits::checked(1, 1, Some(u64::MAX), 2).unwrap_err();
        assert!(e.to_string().starts_with("--log-queue-kib"), "{e}");
        let e = LagLimits::checked(1, 1, None, 60_001).unwrap_err();
        assert!(e.to_string().starts_with("--progress-ms 60001"), "{e}");
    }
}
