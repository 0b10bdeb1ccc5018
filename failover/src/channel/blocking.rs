//! Blocking facade over the async channel, for synchronous callers such as a
//! vCPU run loop. A process-wide multi-threaded tokio runtime (2–4 worker
//! threads named `tandem-channel`, created on first use) drives QUIC in the
//! background; calls block the calling thread until done. Do not call these
//! from inside an async context (tokio panics on nested `block_on`).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::runtime::Runtime;

use super::conn::{
    connect_with, Connection, Handle, Listener, PeerInfo, Pending, RecvHalf, SendHalf,
};
use super::{ChannelConfig, Credentials, Result};

/// The process-wide runtime that drives every blocking channel object.
///
/// It is shared and never shut down, so dropping a connection on a sync
/// thread still lets QUIC deliver the close (and pending acknowledgements) to
/// the peer instead of vanishing mid-conversation.
fn runtime() -> Result<Arc<Runtime>> {
    static RT: OnceLock<Arc<Runtime>> = OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt.clone());
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("tandem-channel")
            .enable_all()
            .build()?,
    );
    // If another thread won the race, its runtime is used and ours dropped
    // here (outside any async context, so that is fine).
    Ok(RT.get_or_init(|| rt).clone())
}

/// Run `fut` on `rt` for at most `timeout`: `Ok(None)` if it did not finish.
fn block_on_timeout<T>(
    rt: &Runtime,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<Option<T>> {
    match rt.block_on(async { tokio::time::timeout(timeout, fut).await }) {
        Ok(r) => r.map(Some),
        Err(_) => Ok(None),
    }
}

/// Blocking [`Listener`]. Clones share the listener.
#[derive(Clone)]
pub struct BlockingListener {
    rt: Arc<Runtime>,
    inner: Listener,
}

impl BlockingListener {
    /// Bind on `addr` (port 0: ephemeral). See [`Listener::bind`].
    pub fn bind(addr: SocketAddr, creds: &Credentials, cfg: &ChannelConfig) -> Result<Self> {
        let rt = runtime()?;
        let inner = {
            let _guard = rt.enter();
            Listener::bind(addr, creds, cfg)?
        };
        Ok(Self { rt, inner })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Accept the next authenticated connection. See [`Listener::accept`]:
    /// a refused peer gives an error and the listener stays usable.
    pub fn accept(&self) -> Result<BlockingConnection> {
        let inner = self.rt.block_on(self.inner.accept())?;
        Ok(BlockingConnection {
            rt: self.rt.clone(),
            inner,
        })
    }

    /// The next connection attempt, not yet authenticated (see
    /// [`Listener::next_pending`]); establish it on another thread to go on
    /// taking attempts meanwhile.
    pub fn next_pending(&self) -> Result<BlockingPending> {
        let inner = self.rt.block_on(self.inner.next_pending())?;
        Ok(BlockingPending {
            rt: self.rt.clone(),
            inner,
        })
    }

    /// Like [`accept`](Self::accept) but gives up after `timeout` (`Ok(None)`).
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Option<BlockingConnection>> {
        match self
            .rt
            .block_on(async { tokio::time::timeout(timeout, self.inner.accept()).await })
        {
            Ok(r) => Ok(Some(BlockingConnection {
                rt: self.rt.clone(),
                inner: r?,
            })),
            Err(_) => Ok(None),
        }
    }

    /// Stop accepting and close the listener's connections.
    pub fn close(&self) {
        self.inner.close();
    }
}

/// Blocking [`Pending`].
pub struct BlockingPending {
    rt: Arc<Runtime>,
    inner: Pending,
}

impl BlockingPending {
    /// The peer's UDP address (not authenticated).
    pub fn peer(&self) -> SocketAddr {
        self.inner.peer()
    }

    /// See [`Pending::establish`].
    pub fn establish(self) -> Result<BlockingConnection> {
        let inner = self.rt.block_on(self.inner.establish())?;
        Ok(BlockingConnection { rt: self.rt, inner })
    }

    /// See [`Pending::refuse`].
    pub fn refuse(self) {
        self.inner.refuse();
    }

    /// See [`Pending::validated_or_retry`].
    pub fn validated_or_retry(self) -> Option<BlockingPending> {
        let BlockingPending { rt, inner } = self;
        inner
            .validated_or_retry()
            .map(|inner| BlockingPending { rt, inner })
    }
}

/// Blocking [`Connection`].
pub struct BlockingConnection {
    rt: Arc<Runtime>,
    inner: Connection,
}

impl BlockingConnection {
    /// Connect to `addr` (see [`connect`]) on a runtime owned by the connection.
    pub fn connect(
        addr: SocketAddr,
        server_name: &str,
        creds: &Credentials,
        cfg: &ChannelConfig,
    ) -> Result<Self> {
        Self::connect_with(addr, server_name, creds, cfg, None)
    }

    /// Connect, sending `first` right behind our Hello, without waiting
    /// for the peer's (see [`connect_with`] and
    /// [`BlockingConnection::finish_hello`]).
    pub fn connect_with(
        addr: SocketAddr,
        server_name: &str,
        creds: &Credentials,
        cfg: &ChannelConfig,
        first: Option<(u8, &[u8])>,
    ) -> Result<Self> {
        let rt = runtime()?;
        let inner = rt.block_on(connect_with(addr, server_name, creds, cfg, first))?;
        Ok(Self { rt, inner })
    }

    /// Who the peer is.
    pub fn peer(&self) -> &PeerInfo {
        self.inner.peer()
    }

    /// See [`Connection::finish_hello`].
    pub fn finish_hello(&mut self) -> Result<()> {
        self.rt.block_on(self.inner.finish_hello())
    }

    /// Send a typed message on the control stream (pipelined: returns once queued).
    pub fn send_msg<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        self.rt.block_on(self.inner.send_msg(msg))
    }

    /// Receive a typed message from the control stream.
    pub fn recv_msg<T: DeserializeOwned>(&mut self) -> Result<T> {
        self.rt.block_on(self.inner.recv_msg())
    }

    /// Receive a typed message, or `Ok(None)` if none arrives within
    /// `timeout`. Safe to retry: no data is lost on timeout.
    pub fn recv_msg_timeout<T: DeserializeOwned>(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<T>> {
        let fut = self.inner.recv_msg();
        block_on_timeout(&self.rt, timeout, fut)
    }

    /// Send one frame on the control stream.
    pub fn send_frame(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        self.rt.block_on(self.inner.send_frame(kind, payload))
    }

    /// Receive one frame from the control stream.
    pub fn recv_frame(&mut self) -> Result<(u8, Vec<u8>)> {
        self.rt.block_on(self.inner.recv_frame())
    }

    /// Receive one frame, or `Ok(None)` if none arrives within `timeout`.
    /// Safe to retry: no data is lost on timeout.
    pub fn recv_frame_timeout(&mut self, timeout: Duration) -> Result<Option<(u8, Vec<u8>)>> {
        let fut = self.inner.recv_frame();
        block_on_timeout(&self.rt, timeout, fut)
    }

    /// Open a unidirectional bulk stream.
    pub fn open_bulk(&self) -> Result<BlockingSender> {
        let tx = self.rt.block_on(self.inner.open_bulk())?;
        Ok(BlockingSender {
            rt: self.rt.clone(),
            tx,
        })
    }

    /// Accept the next bulk stream opened by the peer.
    pub fn accept_bulk(&self) -> Result<BlockingReceiver> {
        let rx = self.rt.block_on(self.inner.accept_bulk())?;
        Ok(BlockingReceiver {
            rt: self.rt.clone(),
            rx,
        })
    }

    /// Split into a sender and a receiver usable from different threads (e.g.
    /// the vCPU thread streams the log while another thread reads acks), plus
    /// a [`Handle`] for bulk streams and closing.
    pub fn split(self) -> (BlockingSender, BlockingReceiver, Handle) {
        let (tx, rx, h) = self.inner.split();
        (
            BlockingSender {
                rt: self.rt.clone(),
                tx,
            },
            BlockingReceiver { rt: self.rt, rx },
            h,
        )
    }

    /// Orderly close (see [`Connection::close`]).
    pub fn close(self) -> Result<()> {
        self.rt.block_on(self.inner.close())
    }

    /// Close immediately with a reason.
    pub fn abort(&self, reason: &str) {
        self.inner.abort(reason);
    }

    /// The async connection, for code that wants both styles.
    pub fn as_async(&mut self) -> &mut Connection {
        &mut self.inner
    }

    /// Run a future on this connection's runtime.
    pub fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.rt.block_on(fut)
    }
}

/// Blocking sending half (control stream or bulk stream).
pub struct BlockingSender {
    rt: Arc<Runtime>,
    tx: SendHalf,
}

impl BlockingSender {
    /// Send a typed message (pipelined).
    pub fn send_msg<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        self.rt.block_on(self.tx.send_msg(msg))
    }

    /// Send one frame (pipelined).
    pub fn send_frame(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        self.rt.block_on(self.tx.send_frame(kind, payload))
    }

    /// Finish the stream and wait until the peer acknowledged it.
    pub fn finish(self) -> Result<()> {
        self.rt.block_on(self.tx.finish())
    }
}

/// Blocking receiving half (control stream or bulk stream).
pub struct BlockingReceiver {
    rt: Arc<Runtime>,
    rx: RecvHalf,
}

impl BlockingReceiver {
    /// Receive a typed message.
    pub fn recv_msg<T: DeserializeOwned>(&mut self) -> Result<T> {
        self.rt.block_on(self.rx.recv_msg())
    }

    /// Receive a typed message or `Ok(None)` after `timeout` (no data lost).
    pub fn recv_msg_timeout<T: DeserializeOwned>(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<T>> {
        let fut = self.rx.recv_msg();
        block_on_timeout(&self.rt, timeout, fut)
    }

    /// Receive one frame.
    pub fn recv_frame(&mut self) -> Result<(u8, Vec<u8>)> {
        self.rt.block_on(self.rx.recv_frame())
    }

    /// Receive one frame or `Ok(None)` after `timeout` (no data lost: a
    /// partly read frame is kept for the next call).
    pub fn recv_frame_timeout(&mut self, timeout: Duration) -> Result<Option<(u8, Vec<u8>)>> {
        let fut = self.rx.recv_frame();
        block_on_timeout(&self.rt, timeout, fut)
    }
}
