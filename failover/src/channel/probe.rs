//! Tail-loss probes: after the last message of an exchange whose answer is
//! awaited (a migration's `SwitchoverReady`, the destination's `Running`),
//! a packet lost at the very end has no later packet whose acknowledgement
//! would reveal it, so QUIC finds it only by its probe timeout (the
//! smoothed RTT plus four variances plus the peer's ACK delay: 1.3-2.5
//! round trips on a lossy 150 ms link). [`Handle::probe_tail`] keeps
//! sending tiny ack-eliciting QUIC DATAGRAMs (one byte, every
//! [`PROBE_GAP`]) while the answer is awaited: their acknowledgements,
//! sent at once by a peer that sees a gap, show the lost packet to quinn's
//! packet-threshold loss detection after one round trip, and it is sent
//! again then. The peer never reads them: its datagram buffer is
//! [`DATAGRAM_BUFFER`] bytes and quinn drops the oldest when it is full.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::Handle;

/// Gap between two probes: three of them (quinn's packet threshold) follow
/// a lost packet within a few milliseconds.
pub const PROBE_GAP: Duration = Duration::from_millis(2);
/// What a peer buffers of datagrams nobody reads (bounded; oldest dropped).
pub const DATAGRAM_BUFFER: usize = 4096;

/// Probes running on a thread of their own until this is dropped (or the
/// time given to [`Handle::probe_tail`] is up, or the connection ends).
pub struct TailProbe {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl TailProbe {
    /// Stop probing; returns how many probes were sent.
    pub fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for TailProbe {
    fn drop(&mut self) {
        self.halt();
    }
}

impl Handle {
    /// Send tail-loss probes for at most `max` (see the module). A peer
    /// that takes no datagrams (an older Tandem) gets none: nothing else
    /// changes.
    pub fn probe_tail(&self, max: Duration) -> TailProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let conn = self.quinn().clone();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tail-probe".into())
            .spawn(move || {
                let start = Instant::now();
                let mut sent = 0;
                while !flag.load(Ordering::Relaxed) && start.elapsed() < max {
                    if conn.send_datagram(vec![0u8].into()).is_err() {
                        break;
                    }
                    sent += 1;
                    std::thread::sleep(PROBE_GAP);
                }
                sent
            })
            .ok();
        TailProbe { stop, thread }
    }
}
