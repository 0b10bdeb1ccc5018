//! The secondary's side of lockstep protection (first slice): accept one
//! primary (through the same desk as migration: concurrent set-up, time
//! limits before the header, busy refusals naming the peer), check that
//! this host holds the VM's disk byte for byte, then receive the log
//! stream, keep it in the operator's `--log` file, acknowledge every chunk
//! and hand the bytes to the replayer as a [`Read`]. Protocol:
//! `failover::lockstep`, `docs/lockstep.md`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use failover::channel::{BlockingConnection, BlockingListener, ChannelError, Message, Role};
use failover::lockstep::{check_header, kind, Ack, Header};

use crate::migration::accept::{take_one, Intake};

/// Nanoseconds of the real-time clock.
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
use crate::migration::{abort, read_first, ReceiveError, STALL_TIMEOUT};

/// How the secondary is set up (paths are its operator's).
#[derive(Debug, Default)]
pub struct SecondaryOptions {
    /// This host's copy of the VM's disk.
    pub disk: Option<PathBuf>,
    /// Keep the received log here (opened by the caller).
    pub log: Option<File>,
    /// One JSON line per acknowledgement sent (opened by the caller).
    pub ack_log: Option<File>,
}

/// A primary that was accepted: its log arrives through `reader`.
pub struct Protected {
    /// The log stream, as it arrives (ends when the primary is gone).
    pub reader: LogPipe,
    /// Whether the stream has ended (for `TailReader::stop_when`).
    pub closed: Arc<AtomicBool>,
    /// `NAME at ADDR` of the primary.
    pub from: String,
    /// The receiving thread: log bytes received, or why it stopped.
    pub thread: std::thread::JoinHandle<Result<u64, String>>,
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
        },
    )
}

struct Lockstep {
    disk: Option<PathBuf>,
    log: std::sync::Mutex<(Option<File>, Option<File>)>,
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
        let thread = std::thread::Builder::new()
            .name("lockstep-in".into())
            .spawn(move || {
                let r = receive_log(&mut conn, log, ack_log, &tx);
                c.store(true, Ordering::SeqCst);
                drop(tx);
                // The last acknowledgement must reach the primary: close
                // only once it has taken what we sent.
                let _ = conn.close();
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
        })
    }
}

/// Receive log chunks until the primary closes: each is written to `log`,
/// passed on and acknowledged (with the stream offset it reaches).
fn receive_log(
    conn: &mut BlockingConnection,
    mut log: Option<File>,
    mut ack_log: Option<File>,
    tx: &Sender<Vec<u8>>,
) -> Result<u64, String> {
    let mut total = 0u64;
    loop {
        match conn.recv_msg_timeout::<Message>(STALL_TIMEOUT) {
            Ok(Some(Message::LogBytes(b))) => {
                if let Some(f) = log.as_mut() {
                    f.write_all(&b)
                        .map_err(|e| format!("writing the received log (--log): {e}"))?;
                }
                total += b.len() as u64;
                // The replayer may have stopped (the guest ended): the log
                // is still kept and acknowledged.
                let _ = tx.send(b);
                let ack = postcard::to_stdvec(&Ack { offset: total }).map_err(|e| e.to_string())?;
                // Taken before the ack leaves: the primary cannot have it
                // earlier than this.
                let sent_ns = realtime_ns();
                conn.send_frame(kind::ACK, &ack)
                    .map_err(|e| e.to_string())?;
                if let Some(f) = ack_log.as_mut() {
                    let line = format!("{{\"offset\":{total},\"sent_ns\":{sent_ns}}}\n");
                    f.write_all(line.as_bytes())
                        .map_err(|e| format!("writing the acknowledgement log (--ack-log): {e}"))?;
                }
            }
            Ok(Some(Message::Abort { reason })) => {
                return Err(format!("the primary aborted: {reason}"))
            }
            Ok(Some(other)) => {
                let reason = format!("unexpected message in the log stream: {other:?}");
                abort(conn, &reason);
                return Err(reason);
            }
            Ok(None) => return Err(format!("the primary sent nothing for {STALL_TIMEOUT:?}")),
            Err(e) if e.is_closed() => return Ok(total),
            Err(e) => return Err(e.to_string()),
        }
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
