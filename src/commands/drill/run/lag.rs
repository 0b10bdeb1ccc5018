//! The secondary's lag and log bandwidth while the drill runs: its
//! control socket (`tandem secondary --api-socket`) is asked for its
//! status every [`EVERY`] by a thread of the runner.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::{Event, Request};
use serde::Serialize;

use crate::commands::drill::report::Spread;

/// How often the secondary is asked.
const EVERY: Duration = Duration::from_millis(100);

/// One answer of a secondary.
#[derive(Debug, Clone, Copy)]
struct Sample {
    lag_exits: u64,
    lag_us: f64,
    log_bytes: u64,
    log_bit_s: f64,
}

/// What the secondaries of a run said.
#[derive(Debug, Clone, Serialize)]
pub struct SecondaryStats {
    /// Status answers collected.
    pub samples: usize,
    /// Exits the secondary's replay was behind the primary.
    pub lag_exits: Spread,
    /// Guest time the replay was behind (ms).
    pub lag_ms: Spread,
    /// Log bytes the (last) secondary had received, and its mean rate
    /// (bit/s) since its protection started.
    pub log_bytes: u64,
    pub log_bit_s: f64,
}

/// The sampling thread; stopped (and its samples summed up) by
/// [`Sampler::finish`].
pub struct Sampler {
    /// The socket of the secondary to ask now (it changes at a failover
    /// and a re-protection).
    pub sock: Arc<Mutex<PathBuf>>,
    done: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(sock: PathBuf) -> Sampler {
        let sock = Arc::new(Mutex::new(sock));
        let done = Arc::new(AtomicBool::new(false));
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let (s, d, v) = (sock.clone(), done.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                let path = s.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(x) = ask(&path) {
                    v.lock().unwrap_or_else(|e| e.into_inner()).push(x);
                }
                std::thread::sleep(EVERY);
            }
        });
        Sampler {
            sock,
            done,
            samples,
            thread: Some(thread),
        }
    }

    /// Stop sampling; the summary (None: no secondary ever answered).
    pub fn finish(&mut self) -> Option<SecondaryStats> {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let v = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let last = *v.last()?;
        Some(SecondaryStats {
            samples: v.len(),
            lag_exits: Spread::of(v.iter().map(|s| s.lag_exits as f64).collect())?,
            lag_ms: Spread::of(v.iter().map(|s| s.lag_us / 1e3).collect())?,
            log_bytes: last.log_bytes,
            log_bit_s: last.log_bit_s,
        })
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// The status of the secondary at `path`, if it answers as a secondary
/// that replays (not yet, or no longer: nothing).
fn ask(path: &std::path::Path) -> Option<Sample> {
    let mut got = None;
    crate::api::call(path, &Request::Status, |ev| {
        if let Event::Status(s) = ev {
            got = Some(s);
        }
        false
    })
    .ok()?;
    let s = got?;
    let p = s.protection.as_ref()?;
    (s.state == "secondary" && p.state == "replaying").then_some(Sample {
        lag_exits: p.lag_exits,
        lag_us: p.lag_us,
        log_bytes: p.log_bytes,
        log_bit_s: p.log_bandwidth_bps,
    })
}
