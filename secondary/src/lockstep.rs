//! The secondary's side of lockstep protection (first slice): accept one
//! primary (through the same desk as migration: concurrent set-up, time
//! limits before the header, busy refusals naming the peer), check that
//! this host holds the VM's disk byte for byte, then receive the log
//! stream, keep it in the operator's `--log` file, acknowledge every chunk
//! and hand the bytes to the replayer as a [`Read`]. Protocol:
//! `failover::lockstep`, `docs/lockstep.md`. Heartbeats and the loss of
//! the primary: [`crate::watch`].

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use failover::channel::{BlockingConnection, BlockingListener, ChannelError, Role};
use failover::heartbeat::Timing;
use failover::lockstep::{
    check_header, decode_header, kind, Ack, ChunkTime, ExitTimes, Header, ProtectionStatus,
};
use recordlog::{Entry, Input, ReadError};

use crate::replay::EntrySource;
use crate::seed::Seeded;

use crate::migration::accept::{take_one, Intake};
use crate::watch::{PrimaryWatch, StreamEnd};

/// Nanoseconds of the real-time clock.
pub(crate) fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
use crate::migration::{abort, read_first_frame, ReceiveError};

/// How the secondary is set up (paths are its operator's).
#[derive(Debug, Default)]
pub struct SecondaryOptions {
    /// This host's copy of the VM's disk.
    pub disk: Option<PathBuf>,
    /// Keep the received log here (opened by the caller).
    pub log: Option<File>,
    /// One JSON line per acknowledgement sent (opened by the caller).
    pub ack_log: Option<File>,
    /// Heartbeat interval and failover timeout.
    pub timing: Timing,
    /// This side's arbiter (`Arbiter::identity`): a primary asking another
    /// is refused.
    pub arbiter: Option<String>,
}

/// A primary that was accepted: its log arrives through `reader`.
pub struct Protected {
    /// The log stream, as it arrives (ends when the primary is gone).
    pub reader: LogPipe,
    /// Whether the stream has ended (for `TailReader::stop_when`).
    pub closed: Arc<AtomicBool>,
    /// `NAME at ADDR` of the primary.
    pub from: String,
    /// The receiving thread: log bytes received and how the stream
    /// ended, or why it failed.
    pub thread: std::thread::JoinHandle<Result<(u64, StreamEnd), String>>,
    /// Life, releases and identity of the primary.
    pub watch: Arc<PrimaryWatch>,
    /// A running VM's seed (`tandem protect`): replay starts from it.
    pub seeded: Option<Seeded>,
    /// How far the replay is, what was received (acks and status).
    pub follow: Arc<Follow>,
    /// Frames for the primary (sync point requests, repair reports: see
    /// [`crate::repair::ChannelRepair`]), sent by the receiving thread.
    pub to_primary: std::sync::mpsc::Sender<crate::repair::Outgoing>,
}

/// How far the secondary is: updated by the replay ([`Tracked`]) and the
/// receiver, read by acknowledgements and `tandem status`.
#[derive(Debug)]
pub struct Follow {
    started: Instant,
    /// How far the received log reaches, chunk by chunk (the primary's
    /// [`ChunkTime`]s: exit and guest time), behind the replay forgotten.
    received: std::sync::Mutex<Received>,
    replayed_exit: AtomicU64,
    replayed_ns: AtomicU64,
    bytes: AtomicU64,
    start_exit: AtomicU64,
    /// The primary ended protection (`tandem unprotect`).
    unprotected: AtomicBool,
    /// The primary handed the VM over (`tandem switchover`), when.
    handed_over: std::sync::Mutex<Option<Instant>>,
    ended: AtomicBool,
    from: std::sync::Mutex<String>,
    /// Divergences repaired ([`crate::repair`]).
    pub(crate) repaired: AtomicU64,
    /// Sync points asked of the primary.
    pub(crate) sync_requests: AtomicU64,
}

impl Follow {
    fn new() -> Arc<Follow> {
        Arc::new(Follow {
            started: Instant::now(),
            received: std::sync::Mutex::new(Received::default()),
            replayed_exit: AtomicU64::new(0),
            replayed_ns: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            start_exit: AtomicU64::new(0),
            unprotected: AtomicBool::new(false),
            handed_over: std::sync::Mutex::new(None),
            ended: AtomicBool::new(false),
            from: std::sync::Mutex::new(String::new()),
            repaired: AtomicU64::new(0),
            sync_requests: AtomicU64::new(0),
        })
    }

    /// Did the primary end protection by decision (not the guest's end)?
    pub fn unprotected(&self) -> bool {
        self.unprotected.load(Ordering::SeqCst)
    }

    /// The primary said protection ends by decision.
    pub(crate) fn set_unprotected(&self) {
        self.unprotected.store(true, Ordering::SeqCst);
    }

    /// The primary handed the VM over (its `Handover` frame arrived).
    pub(crate) fn set_handed_over(&self) {
        let mut h = self.handed_over.lock().unwrap_or_else(|e| e.into_inner());
        h.get_or_insert_with(Instant::now);
    }

    /// When the primary's `Handover` arrived, waiting up to `within` for
    /// it (it follows the log's handover end on the same stream).
    pub fn handed_over_within(&self, within: Duration) -> Option<Instant> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(at) = *self.handed_over.lock().unwrap_or_else(|e| e.into_inner()) {
                return Some(at);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The acknowledgement of `offset` received bytes, with the replay's
    /// position.
    pub(crate) fn ack(&self, offset: u64) -> Ack {
        self.bytes.store(offset, Ordering::SeqCst);
        Ack {
            offset,
            replayed: self.replayed_exit.load(Ordering::SeqCst),
            replayed_ns: self.replayed_ns.load(Ordering::SeqCst),
        }
    }

    /// The primary's [`ChunkTime`] of the chunk received last (`total`:
    /// the stream's bytes so far): checked against the one before it.
    pub(crate) fn chunk_time(&self, t: ChunkTime, total: u64) -> Result<(), String> {
        let mut r = self.received.lock().unwrap_or_else(|e| e.into_inner());
        if total == 0 {
            return Err(format!(
                "a chunk time (exit {}) before any log chunk",
                t.exit
            ));
        }
        if r.bytes == Some(total) {
            return Err(format!(
                "a second chunk time (exit {}) for the log chunk ending at byte {total}",
                t.exit
            ));
        }
        if let Some(prev) = &r.last {
            t.check_after(prev)?;
        }
        r.last = Some(t);
        r.bytes = Some(total);
        r.times
            .forget_behind(self.replayed_exit.load(Ordering::SeqCst));
        r.times.push(t.exit, t.guest_us);
        Ok(())
    }

    /// The replay has ended.
    pub fn set_ended(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }

    /// The secondary's side of `tandem status`.
    pub fn status(&self) -> ProtectionStatus {
        let replayed = self.replayed_exit.load(Ordering::SeqCst);
        let (primary, lag_us) = {
            let mut r = self.received.lock().unwrap_or_else(|e| e.into_inner());
            r.times.forget_behind(replayed);
            match r.times.last() {
                // The received log reaches further than the replay: the
                // guest time between the primary's being where the replay
                // is and the end of the received log.
                Some((exit, end_us)) if exit > replayed => {
                    let at = r.times.at(replayed).unwrap_or(end_us);
                    (exit, end_us.saturating_sub(at) as f64)
                }
                _ => (replayed, 0.0),
            }
        };
        let bytes = self.bytes.load(Ordering::SeqCst);
        let secs = self.started.elapsed().as_secs_f64();
        ProtectionStatus {
            role: "secondary".into(),
            state: if self.ended.load(Ordering::SeqCst) {
                "ended".into()
            } else {
                "replaying".into()
            },
            peer: self.from.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            start_exit: self.start_exit.load(Ordering::SeqCst),
            exit_seq: primary,
            replayed_exit: replayed,
            lag_exits: primary - replayed,
            lag_us,
            log_bytes: bytes,
            log_bandwidth_bps: if secs > 0.0 {
                bytes as f64 * 8.0 / secs
            } else {
                0.0
            },
            acked_bytes: bytes,
            repaired: self.repaired.load(Ordering::SeqCst),
            sync_requests: self.sync_requests.load(Ordering::SeqCst),
            ..Default::default()
        }
    }
}

/// What the secondary has received of the log, as the primary's
/// [`ChunkTime`]s say.
#[derive(Debug, Default)]
struct Received {
    /// The newest chunk time.
    last: Option<ChunkTime>,
    /// The stream's bytes when it came.
    bytes: Option<u64>,
    /// Exit → the primary's guest time (µs), one pair per chunk.
    times: ExitTimes<u64>,
}

/// An [`EntrySource`] that tells [`Follow`] how far the replay is. The
/// replayer reads one entry ahead: when it asks for entry k+1 it has
/// replayed up to the exit of entry k.
pub struct Tracked<S> {
    inner: S,
    follow: Arc<Follow>,
    last: Option<(u64, Option<u64>)>,
}

impl<S: EntrySource> Tracked<S> {
    /// Track `inner`'s entries into `follow`.
    pub fn new(inner: S, follow: Arc<Follow>, start_exit: u64) -> Self {
        follow.replayed_exit.store(start_exit, Ordering::SeqCst);
        follow.start_exit.store(start_exit, Ordering::SeqCst);
        Tracked {
            inner,
            follow,
            last: None,
        }
    }
}

impl<S: EntrySource> EntrySource for Tracked<S> {
    fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        if let Some((exit, ns)) = self.last.take() {
            self.follow.replayed_exit.fetch_max(exit, Ordering::SeqCst);
            if let Some(ns) = ns {
                self.follow.replayed_ns.fetch_max(ns, Ordering::SeqCst);
            }
        }
        let e = self.inner.next_entry()?;
        if let Some(entry) = &e {
            let ns = match entry {
                Entry::Input {
                    input: Input::Clock(v),
                    ..
                } => Some(*v),
                _ => None,
            };
            self.last = Some((entry.exit_seq(), ns));
        }
        Ok(e)
    }

    fn offset(&self) -> u64 {
        self.inner.offset()
    }
}

/// Bind the listener of `tandem secondary`.
pub fn listen(
    addr: SocketAddr,
    creds: &failover::certs::Credentials,
    name: &str,
) -> Result<BlockingListener, ChannelError> {
    let cfg = failover::channel::ChannelConfig::new(Role::Secondary, name);
    BlockingListener::bind(addr, creds, &cfg)
}

/// Wait for a primary on `listener` and start receiving its log.
pub fn accept(
    listener: &BlockingListener,
    opts: SecondaryOptions,
) -> Result<Protected, ReceiveError> {
    take_one(
        listener,
        Lockstep {
            disk: opts.disk,
            log: std::sync::Mutex::new((opts.log, opts.ack_log)),
            timing: opts.timing,
            arbiter: opts.arbiter,
        },
    )
}

struct Lockstep {
    disk: Option<PathBuf>,
    log: std::sync::Mutex<(Option<File>, Option<File>)>,
    timing: Timing,
    arbiter: Option<String>,
}

impl Intake for Lockstep {
    type Header = Header;
    type Taken = Protected;
    const WHAT: &'static str = "log stream";

    fn read_header(&self, conn: &mut BlockingConnection) -> Result<Header, ReceiveError> {
        let payload = read_first_frame(
            conn,
            Role::Primary,
            "a primary",
            kind::HEADER,
            "lockstep header",
        )?;
        decode_header(&payload).map_err(|e| {
            let reason = e.to_string();
            abort(conn, &reason);
            ReceiveError::Refused(reason)
        })
    }

    fn take(
        &self,
        mut conn: BlockingConnection,
        header: &Header,
    ) -> Result<Protected, ReceiveError> {
        if let Err(e) = check_header(header, self.disk.as_deref(), self.arbiter.as_deref()) {
            let reason = e.to_string();
            abort(&mut conn, &reason);
            return Err(ReceiveError::Refused(reason));
        }
        let seeded = match &header.seed {
            Some(seed) => Some(crate::seed::receive(&mut conn, seed, self.disk.clone())?),
            None => {
                conn.send_frame(kind::ACCEPTED, &[])?;
                None
            }
        };
        let peer = conn.peer().clone();
        let from = format!("{} at {}", peer.hello.name, peer.addr);
        let (log, ack_log) =
            std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()));
        let follow = Follow::new();
        *follow.from.lock().unwrap_or_else(|e| e.into_inner()) = from.clone();
        let (tx, rx) = channel();
        let closed = Arc::new(AtomicBool::new(false));
        let c = closed.clone();
        let watch = Arc::new(PrimaryWatch::default());
        let w = watch.clone();
        let f = follow.clone();
        let timing = self.timing;
        let (to_primary, outgoing) = channel();
        let thread = std::thread::Builder::new()
            .name("lockstep-in".into())
            .spawn(move || {
                let r = crate::watch::receive(
                    &mut conn,
                    (log, ack_log),
                    (&tx, &outgoing),
                    &w,
                    timing,
                    &f,
                );
                c.store(true, Ordering::SeqCst);
                drop(tx);
                match &r {
                    // The last acknowledgement must reach the primary:
                    // close only once it has taken what we sent.
                    Ok((_, StreamEnd::Closed)) => {
                        let _ = conn.close();
                    }
                    // Lost: nothing more from or to this primary.
                    Ok((_, StreamEnd::Lost(why))) => conn.abort(why),
                    Err(why) => conn.abort(why),
                }
                r
            })
            .map_err(|e| ReceiveError::Local(format!("starting the log receiver: {e}")))?;
        Ok(Protected {
            reader: LogPipe {
                rx,
                cur: Vec::new(),
                pos: 0,
            },
            closed,
            from,
            thread,
            watch,
            seeded,
            follow,
            to_primary,
        })
    }
}

/// The received log bytes as a blocking [`Read`]: waits for the next chunk;
/// end of input once the primary is gone.
pub struct LogPipe {
    rx: Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for LogPipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(v) => {
                    self.cur = v;
                    self.pos = 0;
                }
                // Nothing yet: the tail reader decides whether to wait on.
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Ok(0),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(exit: u64, guest_us: u64) -> ChunkTime {
        ChunkTime { exit, guest_us }
    }

    #[test]
    fn the_lag_is_what_was_received_against_what_was_replayed() {
        let f = Follow::new();
        let lag = |f: &Follow| {
            let s = f.status();
            (s.exit_seq, s.replayed_exit, s.lag_exits, s.lag_us)
        };
        assert_eq!(lag(&f), (0, 0, 0, 0.0));
        f.chunk_time(at(10, 1_000), 100).unwrap();
        f.chunk_time(at(20, 3_000), 200).unwrap();
        f.chunk_time(at(50, 9_000), 300).unwrap();
        // Nothing replayed yet: the primary was at exit 0 when the first
        // chunk left.
        assert_eq!(lag(&f), (50, 0, 50, 8_000.0));
        f.replayed_exit.store(15, Ordering::SeqCst);
        assert_eq!(lag(&f), (50, 15, 35, 6_000.0));
        f.replayed_exit.store(20, Ordering::SeqCst);
        assert_eq!(lag(&f), (50, 20, 30, 6_000.0));
        f.replayed_exit.store(50, Ordering::SeqCst);
        assert_eq!(lag(&f), (50, 50, 0, 0.0));
        // The replay may pass the last chunk time (it follows its chunk).
        f.replayed_exit.store(60, Ordering::SeqCst);
        assert_eq!(lag(&f), (60, 60, 0, 0.0));
    }

    #[test]
    fn bad_chunk_times_are_refused() {
        let f = Follow::new();
        assert!(f
            .chunk_time(at(1, 1), 0)
            .unwrap_err()
            .contains("before any log chunk"));
        f.chunk_time(at(10, 1_000), 100).unwrap();
        assert!(f
            .chunk_time(at(11, 1_001), 100)
            .unwrap_err()
            .contains("second chunk time"));
        assert!(f
            .chunk_time(at(9, 2_000), 200)
            .unwrap_err()
            .contains("goes back"));
        assert!(f.chunk_time(at(10, 999), 200).is_err());
        // The refused ones changed nothing.
        assert_eq!(f.status().exit_seq, 10);
        f.chunk_time(at(10, 1_000), 200).unwrap();
    }
}
