//! Taking connections for `tandem receive` so that nobody can block it.
//!
//! Each connection attempt is set up on its own thread: the TLS handshake
//! and the Hello exchange (bounded by the channel's handshake timeout), then
//! the header (bounded by [`HEADER_TIMEOUT`]). Meanwhile the listener takes
//! the next attempt, so a peer that stalls before its header — one that
//! completes the handshake and sends only `Hello`, or nothing at all —
//! holds nobody up and is dropped, by name, when its time is up. At most
//! [`MAX_PENDING`] attempts are set up at once; more are refused at once.
//! Beyond [`RETRY_ABOVE`] attempts, a new one must first prove its address
//! with a QUIC Retry, so that a flood from spoofed addresses fills nothing.
//!
//! One VM is received at a time: the first source whose header arrives
//! holds the receiver until its transfer ends; a source whose header
//! arrives meanwhile is refused with `busy: receiving a VM from NAME at
//! ADDR` (and the receiver's stderr says the same). Once a VM has been
//! received, later sources get `busy: running the VM received from ...`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use failover::channel::{BlockingListener, BlockingPending};

use failover::channel::BlockingConnection;

use super::{abort, read_header, receive_one, ReceiveError, ReceiveOptions, Received};

/// What a receiver takes from its one peer: a migrated VM, or (for a
/// secondary) a primary's log stream. The desk around it (concurrent set-up,
/// time limits before the header, busy refusals naming the peer) is shared.
pub(crate) trait Intake: Send + Sync + 'static {
    /// The peer's first application frame, checked.
    type Header: Send;
    /// What the receiver's caller gets.
    type Taken: Send + 'static;
    /// What is received, for messages ("migration", "log stream").
    const WHAT: &'static str;
    /// Read and check the header (bounded in time).
    fn read_header(&self, conn: &mut BlockingConnection) -> Result<Self::Header, ReceiveError>;
    /// Take what the header announced.
    fn take(
        &self,
        conn: BlockingConnection,
        header: &Self::Header,
    ) -> Result<Self::Taken, ReceiveError>;
}

/// Migration: [`receive_one`] after [`read_header`].
struct Migration(ReceiveOptions);

impl Intake for Migration {
    type Header = failover::migration::Header;
    type Taken = Received;
    const WHAT: &'static str = "migration";
    fn read_header(&self, conn: &mut BlockingConnection) -> Result<Self::Header, ReceiveError> {
        read_header(conn)
    }
    fn take(
        &self,
        conn: BlockingConnection,
        header: &Self::Header,
    ) -> Result<Received, ReceiveError> {
        receive_one(conn, header, &self.0)
    }
}

/// Connection attempts set up at once, at most.
pub const MAX_PENDING: usize = 128;
/// With this many attempts being set up, a new one must first prove its
/// address (QUIC Retry, one more round trip).
pub const RETRY_ABOVE: usize = 8;

/// Who holds the receiver.
struct Holder {
    /// `NAME at ADDR`.
    from: String,
    /// The VM arrived and runs here.
    running: bool,
}

/// What the connection threads share.
struct Desk<T: Intake> {
    intake: T,
    holder: Mutex<Option<Holder>>,
    /// Attempts not past their header yet.
    pending: AtomicUsize,
    done: Sender<T::Taken>,
}

impl<T: Intake> Desk<T> {
    fn holder(&self) -> std::sync::MutexGuard<'_, Option<Holder>> {
        self.holder.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts one attempt in [`Desk::pending`] while it lives.
struct Slot<T: Intake>(Arc<Desk<T>>);

impl<T: Intake> Drop for Slot<T> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accept connections on `listener` until one brings a VM, and restore it.
/// Connections are set up concurrently and every step before the header is
/// time-limited (see the module docs); refusals and failed transfers are
/// reported on stderr, naming the peer, and the receiver waits for the
/// next source. The listener keeps refusing late sources ("busy") until it
/// is closed.
pub fn receive(
    listener: &BlockingListener,
    opts: &ReceiveOptions,
) -> Result<Received, ReceiveError> {
    take_one(listener, Migration(opts.clone()))
}

/// [`receive`] for any [`Intake`].
pub(crate) fn take_one<T: Intake>(
    listener: &BlockingListener,
    intake: T,
) -> Result<T::Taken, ReceiveError> {
    let (tx, rx) = channel();
    let desk = Arc::new(Desk {
        intake,
        holder: Mutex::new(None),
        pending: AtomicUsize::new(0),
        done: tx,
    });
    let l = listener.clone();
    std::thread::Builder::new()
        .name("migration-accept".into())
        .spawn(move || take_connections(&l, &desk))
        .map_err(|e| ReceiveError::Local(format!("starting the listener thread: {e}")))?;
    rx.recv()
        .map_err(|_| ReceiveError::Local("the listener closed before a VM arrived".into()))
}

fn take_connections<T: Intake>(listener: &BlockingListener, desk: &Arc<Desk<T>>) {
    loop {
        let pending = match listener.next_pending() {
            Ok(p) => p,
            Err(e) if e.is_closed() => return,
            Err(e) => {
                eprintln!("tandem: incoming connection failed: {e}");
                continue;
            }
        };
        // Under pressure, only peers that prove their address get a slot:
        // a flood from spoofed addresses cannot fill them.
        let pending = if desk.pending.load(Ordering::SeqCst) >= RETRY_ABOVE {
            match pending.validated_or_retry() {
                Some(p) => p,
                None => continue,
            }
        } else {
            pending
        };
        if desk.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
            desk.pending.fetch_sub(1, Ordering::SeqCst);
            eprintln!(
                "tandem: refused a connection from {}: {MAX_PENDING} others are still being set up",
                pending.peer()
            );
            pending.refuse();
            continue;
        }
        let slot = Slot(desk.clone());
        let desk = desk.clone();
        let spawned = std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || serve(pending, slot, &desk));
        if let Err(e) = spawned {
            eprintln!("tandem: cannot serve an incoming connection: {e}");
        }
    }
}

/// Set up one connection and, if it is the first to bring a header, take
/// its VM.
fn serve<T: Intake>(pending: BlockingPending, slot: Slot<T>, desk: &Desk<T>) {
    let mut conn = match pending.establish() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem: refused a connection: {e}");
            return;
        }
    };
    let peer = conn.peer().clone();
    let from = format!("{} at {}", peer.hello.name, peer.addr);
    let header = match desk.intake.read_header(&mut conn) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("tandem: dropped the connection of {from}: {e}; waiting for another");
            return;
        }
    };
    drop(slot);
    {
        let mut holder = desk.holder();
        if let Some(h) = holder.as_ref() {
            let reason = if h.running {
                format!("busy: running the VM received from {}", h.from)
            } else {
                format!("busy: receiving a VM from {}", h.from)
            };
            drop(holder);
            eprintln!("tandem: refused a {} from {from}: {reason}", T::WHAT);
            abort(&mut conn, &reason);
            return;
        }
        *holder = Some(Holder {
            from: from.clone(),
            running: false,
        });
    }
    eprintln!("tandem: receiving a VM from {from}");
    match desk.intake.take(conn, &header) {
        Ok(r) => {
            if let Some(h) = desk.holder().as_mut() {
                h.running = true;
            }
            let _ = desk.done.send(r);
        }
        Err(e) => {
            *desk.holder() = None;
            eprintln!(
                "tandem: incoming {} from {from} failed: {e}; waiting for another",
                T::WHAT
            );
        }
    }
}
