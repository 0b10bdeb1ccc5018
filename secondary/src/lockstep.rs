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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

use failover::channel::{BlockingConnection, BlockingListener, ChannelError, Role};
use failover::heartbeat::Timing;
use failover::lockstep::{check_header, kind, Header};

use crate::migration::accept::{take_one, Intake};
use crate::watch::{PrimaryWatch, StreamEnd};

/// Nanoseconds of the real-time clock.
pub(crate) fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
use crate::migration::{abort, read_first, ReceiveError};

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
        },
    )
}

struct Lockstep {
    disk: Option<PathBuf>,
    log: std::sync::Mutex<(Option<File>, Option<File>)>,
    timing: Timing,
}

impl Intake for Lockstep {
    type Header = Header;
    type Taken = Protected;
    const WHAT: &'static str = "log stream";

    fn read_header(&self, conn: &mut BlockingConnection) -> Result<Header, ReceiveError> {
        read_first(
            conn,
            Role::Primary,
            "a primary",
            kind::HEADER,
            "lockstep header",
        )
    }

    fn take(
        &self,
        mut conn: BlockingConnection,
        header: &Header,
    ) -> Result<Protected, ReceiveError> {
        if let Err(reason) = check_header(header, self.disk.as_deref()) {
            abort(&mut conn, &reason);
            return Err(ReceiveError::Refused(reason));
        }
        conn.send_frame(kind::ACCEPTED, &[])?;
        let peer = conn.peer().clone();
        let from = format!("{} at {}", peer.hello.name, peer.addr);
        let (log, ack_log) =
            std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()));
        let (tx, rx) = channel();
        let closed = Arc::new(AtomicBool::new(false));
        let c = closed.clone();
        let watch = Arc::new(PrimaryWatch::default());
        let w = watch.clone();
        let timing = self.timing;
        let thread = std::thread::Builder::new()
            .name("lockstep-in".into())
            .spawn(move || {
                let r = crate::watch::receive(&mut conn, (log, ack_log), &tx, &w, timing);
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
