//! The primary's side of lockstep protection (first slice): the log
//! stream to the secondary, its acknowledgements, and the Output Rule.
//!
//! The recorder writes into a [`LogQueue`]; a sender thread ships whatever
//! is queued as `LogBytes` chunks; an ack thread reads the secondary's
//! [`Ack`]s (the log bytes it has). [`HeldOutputs`] is the [`Outputs`] of a
//! protected VM: each output is tagged with the log offset just past its
//! own `Output` entry (the recorder flushed it there) and handed to a
//! release thread, which passes it to the live outputs once the secondary
//! has acknowledged that offset. The vCPU never waits for an ack; only the
//! output does. Protocol: `failover::lockstep`, `docs/lockstep.md`.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Sender};
use failover::certs::Credentials;
use failover::channel::{BlockingConnection, ChannelConfig, Message, Role};
use failover::lockstep::{kind, Ack, Header};
use recordlog::LogQueue;
use vmm::inputs::Divergence;
use vmm::outputs::{Output, Outputs};

use crate::held_audit::{realtime_ns, HeldLatency, ReleaseAudit, Released};

/// Largest `LogBytes` chunk.
const MAX_CHUNK: usize = 4 << 20;
/// How long the secondary may take to answer the header.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct AckState {
    /// Log bytes the secondary has acknowledged.
    offset: u64,
    /// The secondary is gone (why).
    lost: Option<String>,
}

#[derive(Debug, Default)]
struct Acks {
    st: Mutex<AckState>,
    cond: Condvar,
}

impl Acks {
    fn lock(&self) -> std::sync::MutexGuard<'_, AckState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lose(&self, why: String) {
        self.lock().lost.get_or_insert(why);
        self.cond.notify_all();
    }

    /// Wait until `offset` is acknowledged (true), the secondary is lost or
    /// `deadline` passed (false).
    fn wait_for(&self, offset: u64, deadline: Option<Instant>) -> bool {
        let mut st = self.lock();
        loop {
            if st.offset >= offset {
                return true;
            }
            if st.lost.is_some() {
                return false;
            }
            st = match deadline {
                None => self.cond.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    self.cond
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

/// The connection to the secondary, streaming `queue`.
pub struct Link {
    queue: LogQueue,
    acks: Arc<Acks>,
    sender: Option<JoinHandle<()>>,
    handle: failover::channel::Handle,
    /// `NAME at ADDR` of the secondary.
    pub peer: String,
}

/// Where the secondary is and who we are.
pub struct LinkParams {
    pub to: SocketAddr,
    pub server_name: String,
    pub creds: Credentials,
    pub name: String,
}

impl Link {
    /// Connect, send `header`, wait for the secondary to accept it, then
    /// start streaming `queue` (which already holds the log's header).
    pub fn connect(p: &LinkParams, header: &Header, queue: LogQueue) -> Result<Link, String> {
        let cfg = ChannelConfig::new(Role::Primary, p.name.clone());
        let mut conn = BlockingConnection::connect(p.to, &p.server_name, &p.creds, &cfg)
            .map_err(|e| format!("connecting to the secondary at {}: {e}", p.to))?;
        let peer = format!("{} at {}", conn.peer().hello.name, conn.peer().addr);
        let bytes = postcard::to_stdvec(header).map_err(|e| e.to_string())?;
        conn.send_frame(kind::HEADER, &bytes)
            .map_err(|e| format!("the secondary {peer}: {e}"))?;
        match conn.recv_frame_timeout(ACCEPT_TIMEOUT) {
            Ok(Some((kind::ACCEPTED, _))) => {}
            Ok(Some((failover::channel::kind::MESSAGE, payload))) => {
                return Err(match postcard::from_bytes::<Message>(&payload) {
                    Ok(Message::Abort { reason }) => {
                        format!("the secondary {peer} refused the VM: {reason}")
                    }
                    Ok(m) => format!("the secondary {peer} answered {m:?}"),
                    Err(e) => format!("the secondary {peer} sent an unreadable message: {e}"),
                })
            }
            Ok(Some((k, _))) => return Err(format!("the secondary {peer} sent frame kind {k}")),
            Ok(None) => {
                return Err(format!(
                    "the secondary {peer} did not answer in {ACCEPT_TIMEOUT:?}"
                ))
            }
            Err(e) => return Err(format!("the secondary {peer}: {e}")),
        }
        let (mut tx, mut rx, handle) = conn.split();
        let acks = Arc::new(Acks::default());
        let a = acks.clone();
        let who = peer.clone();
        std::thread::Builder::new()
            .name("lockstep-acks".into())
            .spawn(move || loop {
                match rx.recv_frame() {
                    Ok((kind::ACK, payload)) => match postcard::from_bytes::<Ack>(&payload) {
                        Ok(ack) => {
                            let mut st = a.lock();
                            st.offset = st.offset.max(ack.offset);
                            drop(st);
                            a.cond.notify_all();
                        }
                        Err(e) => return a.lose(format!("unreadable ack from {who}: {e}")),
                    },
                    Ok((k, _)) => return a.lose(format!("frame kind {k} from {who}")),
                    Err(e) => return a.lose(format!("the secondary {who}: {e}")),
                }
            })
            .map_err(|e| e.to_string())?;
        let q = queue.clone();
        let a = acks.clone();
        let sender = std::thread::Builder::new()
            .name("lockstep-out".into())
            .spawn(move || {
                while let Some(d) = q.wait_drain(MAX_CHUNK, None) {
                    if let Err(e) = tx.send_msg(&Message::LogBytes(d.bytes)) {
                        return a.lose(format!("sending the log: {e}"));
                    }
                }
                let _ = tx.finish();
            })
            .map_err(|e| e.to_string())?;
        Ok(Link {
            queue,
            acks,
            sender: Some(sender),
            handle,
            peer,
        })
    }

    /// Outputs held until the secondary has their log entries; released
    /// to `live` by the returned [`Release`], each noted in `audit`.
    pub fn held_outputs(
        &self,
        live: Box<dyn Outputs>,
        audit: ReleaseAudit,
    ) -> Result<(HeldOutputs, Release), String> {
        HeldOutputs::new(self.queue.clone(), self.acks.clone(), live, audit)
    }

    /// After the log's `End` was queued: close the stream and wait (up to
    /// `timeout`) until the secondary has acknowledged all of it.
    pub fn finish(mut self, timeout: Duration) -> Result<(), String> {
        self.queue.close();
        if let Some(s) = self.sender.take() {
            let _ = s.join();
        }
        let total = self.queue.stats().pushed_bytes;
        let ok = self.acks.wait_for(total, Some(Instant::now() + timeout));
        let lost = self.acks.lock().lost.clone();
        self.handle
            .close_now(failover::channel::close_code::NORMAL, "done");
        match (ok, lost) {
            (true, _) => Ok(()),
            (false, Some(why)) => Err(why),
            (false, None) => Err(format!(
                "the secondary {} did not acknowledge the end of the log in {timeout:?}",
                self.peer
            )),
        }
    }
}

/// Counters of [`HeldOutputs`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HeldStats {
    pub released: u64,
    pub withheld: u64,
    /// Added latency of the released outputs.
    pub latency: HeldLatency,
}

/// The [`Outputs`] of a protected VM (see the module docs).
pub struct HeldOutputs {
    queue: LogQueue,
    tx: Sender<Held>,
}

/// An output waiting for the acknowledgement of `entry_end`.
struct Held {
    entry_end: u64,
    output: Output,
    emitted: Instant,
    emitted_ns: u64,
}

/// The thread that releases held outputs.
pub struct Release(JoinHandle<HeldStats>);

impl Release {
    /// After the run, once the [`HeldOutputs`] are dropped: wait until
    /// every output was released (or the secondary was lost).
    pub fn wait(self) -> HeldStats {
        self.0.join().unwrap_or_default()
    }
}

impl HeldOutputs {
    fn new(
        queue: LogQueue,
        acks: Arc<Acks>,
        mut live: Box<dyn Outputs>,
        mut audit: ReleaseAudit,
    ) -> Result<(Self, Release), String> {
        let (tx, rx) = unbounded::<Held>();
        let releaser = std::thread::Builder::new()
            .name("lockstep-release".into())
            .spawn(move || {
                let mut stats = HeldStats::default();
                for h in rx {
                    if stats.withheld == 0 && acks.wait_for(h.entry_end, None) {
                        let acked = acks.lock().offset;
                        let (exit_seq, kind) = (h.output.exit_seq, h.output.kind);
                        let bytes = h.output.bytes.clone();
                        // Taken before the output leaves: nobody outside
                        // can have it earlier.
                        let released_ns = realtime_ns();
                        let _ = live.emit(h.output);
                        audit.released(&Released {
                            exit_seq,
                            kind,
                            bytes: &bytes,
                            entry_end: h.entry_end,
                            acked,
                            emitted_ns: h.emitted_ns,
                            emitted: h.emitted,
                            released_ns,
                        });
                        stats.released += 1;
                    } else {
                        // Never acknowledged: it never leaves.
                        stats.withheld += 1;
                    }
                }
                stats.latency = audit.latency();
                stats
            })
            .map_err(|e| format!("starting the output release thread: {e}"))?;
        Ok((HeldOutputs { queue, tx }, Release(releaser)))
    }
}

impl Outputs for HeldOutputs {
    fn emit(&mut self, output: Output) -> Result<(), Divergence> {
        // The recorder flushed the output's entry: everything pushed so far
        // must be acknowledged before the output leaves.
        let _ = self.tx.send(Held {
            entry_end: self.queue.stats().pushed_bytes,
            output,
            emitted: Instant::now(),
            emitted_ns: realtime_ns(),
        });
        Ok(())
    }
}
