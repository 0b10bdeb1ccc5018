//! Async connections: listener, connector, framed streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{ConnectionError, Endpoint, ReadError, RecvStream, SendStream, VarInt, WriteError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{debug, warn};

use super::frame::{decode_header, encode_header, kind, ReadState, FRAME_HEADER_LEN};
use super::message::{Hello, Message};
use super::{close_code, tls, ChannelConfig, ChannelError, Credentials, Result};

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's UDP address.
    pub addr: SocketAddr,
    /// The peer's [`Hello`].
    pub hello: Hello,
}

/// State shared by streams of one connection (for error reporting).
#[derive(Clone)]
struct Ctx {
    conn: quinn::Connection,
    peer: SocketAddr,
    ours: u32,
    max_frame: u32,
    linger: Duration,
}

impl Ctx {
    fn conn_err(&self, e: &ConnectionError) -> ChannelError {
        map_conn_err(self.peer, self.ours, e)
    }

    /// Turn a stream error into a channel error, preferring the connection's
    /// close reason when there is one.
    fn stream_err(&self, what: &str, detail: String) -> ChannelError {
        match self.conn.close_reason() {
            Some(e) => self.conn_err(&e),
            None => ChannelError::Closed {
                peer: self.peer,
                reason: format!("{what}: {detail}"),
            },
        }
    }

    fn write_err(&self, e: WriteError) -> ChannelError {
        match e {
            WriteError::ConnectionLost(e) => self.conn_err(&e),
            e => self.stream_err("send stream", e.to_string()),
        }
    }

    fn read_err(&self, e: ReadError) -> ChannelError {
        match e {
            ReadError::ConnectionLost(e) => self.conn_err(&e),
            e => self.stream_err("receive stream", e.to_string()),
        }
    }

    fn protocol_violation(&self, reason: String) -> ChannelError {
        self.conn.close(
            VarInt::from_u32(close_code::PROTOCOL_ERROR),
            reason.as_bytes(),
        );
        ChannelError::Protocol {
            peer: self.peer,
            reason,
        }
    }
}

fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

const VERSION_REASON_PREFIX: &str = "protocol version ";

fn map_conn_err(peer: SocketAddr, ours: u32, e: &ConnectionError) -> ChannelError {
    match e {
        ConnectionError::TransportError(t) if is_crypto(t.code) => ChannelError::Handshake {
            peer,
            reason: t.to_string(),
        },
        ConnectionError::ConnectionClosed(c) if is_crypto(c.error_code) => {
            ChannelError::Handshake {
                peer,
                reason: format!("refused by peer: {c}"),
            }
        }
        ConnectionError::ApplicationClosed(a)
            if a.error_code == VarInt::from_u32(close_code::VERSION_MISMATCH) =>
        {
            let reason = String::from_utf8_lossy(&a.reason);
            match reason
                .strip_prefix(VERSION_REASON_PREFIX)
                .and_then(|v| v.trim().parse::<u32>().ok())
            {
                Some(theirs) => ChannelError::Version { ours, theirs },
                None => ChannelError::Closed {
                    peer,
                    reason: format!("peer refused our protocol version {ours}: {reason}"),
                },
            }
        }
        ConnectionError::ApplicationClosed(a) => ChannelError::Closed {
            peer,
            reason: format!(
                "closed by peer (code {}): {}",
                a.error_code,
                String::from_utf8_lossy(&a.reason)
            ),
        },
        ConnectionError::TimedOut => ChannelError::Closed {
            peer,
            reason: "timed out: nothing heard from the peer within the idle timeout".into(),
        },
        ConnectionError::LocallyClosed => ChannelError::Closed {
            peer,
            reason: "closed locally".into(),
        },
        e => ChannelError::Closed {
            peer,
            reason: e.to_string(),
        },
    }
}

/// Sending side of a framed stream (the control stream's send half, or a bulk
/// unidirectional stream). Sends are pipelined: a send returns once the data
/// is queued in QUIC's send buffer, without waiting for the peer.
pub struct SendHalf {
    stream: SendStream,
    ctx: Ctx,
}

impl SendHalf {
    /// Send one frame. `kind` is free-form; see [`kind`] for reserved values.
    pub async fn send_frame(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        let len = self.check_len(payload.len())?;
        let header = encode_header(kind, len);
        if payload.len() <= 4096 {
            let mut buf = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
            buf.extend_from_slice(&header);
            buf.extend_from_slice(payload);
            self.write(&buf).await
        } else {
            self.write(&header).await?;
            self.write(payload).await
        }
    }

    /// Send a postcard-encoded value in a frame of kind [`kind::MESSAGE`].
    pub async fn send_msg<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        let buf = vec![0u8; FRAME_HEADER_LEN];
        let mut buf = postcard::to_extend(msg, buf).map_err(|e| ChannelError::Decode {
            peer: self.ctx.peer,
            reason: format!("cannot encode message: {e}"),
        })?;
        let len = self.check_len(buf.len() - FRAME_HEADER_LEN)?;
        buf[..FRAME_HEADER_LEN].copy_from_slice(&encode_header(kind::MESSAGE, len));
        self.write(&buf).await
    }

    /// Finish the stream (the peer's receiver then gets
    /// [`ChannelError::Finished`] after the last frame) and wait up to the
    /// configured linger time until the peer has acknowledged all of it.
    pub async fn finish(mut self) -> Result<()> {
        let _ = self.stream.finish();
        match tokio::time::timeout(self.ctx.linger, self.stream.stopped()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(quinn::StoppedError::ConnectionLost(e))) => Err(self.ctx.conn_err(&e)),
            Ok(Err(e)) => Err(self.ctx.stream_err("finish", e.to_string())),
            Err(_) => Err(ChannelError::Timeout {
                what: "waiting for the peer to acknowledge the stream",
            }),
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.ctx.peer
    }

    fn check_len(&self, len: usize) -> Result<u32> {
        match u32::try_from(len) {
            Ok(l) if l <= self.ctx.max_frame => Ok(l),
            _ => Err(ChannelError::FrameTooLarge {
                peer: self.ctx.peer,
                len: u32::try_from(len).unwrap_or(u32::MAX),
                max: self.ctx.max_frame,
            }),
        }
    }

    async fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.stream
            .write_all(buf)
            .await
            .map_err(|e| self.ctx.write_err(e))
    }

    /// Write raw bytes, bypassing framing (protocol tests only).
    #[doc(hidden)]
    pub async fn send_raw(&mut self, buf: &[u8]) -> Result<()> {
        self.write(buf).await
    }
}

/// Receiving side of a framed stream. Receiving is cancel-safe: a
/// `recv_*` future dropped before completion (e.g. under
/// `tokio::time::timeout`) loses no data; the next call resumes.
pub struct RecvHalf {
    stream: RecvStream,
    ctx: Ctx,
    state: ReadState,
}

impl RecvHalf {
    /// Receive the next frame as `(kind, payload)`. A frame longer than
    /// [`ChannelConfig::max_frame_len`] is refused before any allocation with
    /// [`ChannelError::FrameTooLarge`], and the connection is closed (the
    /// stream can no longer be parsed). An orderly end of the stream between
    /// frames gives [`ChannelError::Finished`].
    pub async fn recv_frame(&mut self) -> Result<(u8, Vec<u8>)> {
        let Self { stream, ctx, state } = self;
        loop {
            if let Some((kind, buf, filled)) = &mut state.payload {
                if *filled == buf.len() {
                    let kind = *kind;
                    let (_, buf, _) = state.payload.take().expect("payload present");
                    return Ok((kind, buf));
                }
                match stream.read(&mut buf[*filled..]).await {
                    Ok(Some(n)) => *filled += n,
                    Ok(None) => {
                        return Err(
                            ctx.protocol_violation("stream ended in the middle of a frame".into())
                        )
                    }
                    Err(e) => return Err(ctx.read_err(e)),
                }
            } else if state.header_filled == FRAME_HEADER_LEN {
                state.header_filled = 0;
                match decode_header(&state.header, ctx.max_frame) {
                    Ok((kind, len)) => state.payload = Some((kind, vec![0u8; len as usize], 0)),
                    Err(len) => {
                        let err = ChannelError::FrameTooLarge {
                            peer: ctx.peer,
                            len,
                            max: ctx.max_frame,
                        };
                        warn!(peer = %ctx.peer, len, max = ctx.max_frame, "refusing oversized frame; closing connection");
                        ctx.conn.close(
                            VarInt::from_u32(close_code::PROTOCOL_ERROR),
                            err.to_string().as_bytes(),
                        );
                        return Err(err);
                    }
                }
            } else {
                match stream.read(&mut state.header[state.header_filled..]).await {
                    Ok(Some(n)) => state.header_filled += n,
                    Ok(None) if state.header_filled == 0 => {
                        return Err(ChannelError::Finished { peer: ctx.peer })
                    }
                    Ok(None) => {
                        return Err(ctx.protocol_violation(
                            "stream ended in the middle of a frame header".into(),
                        ))
                    }
                    Err(e) => return Err(ctx.read_err(e)),
                }
            }
        }
    }

    /// Receive a postcard-encoded value from a frame of kind [`kind::MESSAGE`].
    /// Malformed payloads give [`ChannelError::Decode`] (never a panic).
    pub async fn recv_msg<T: DeserializeOwned>(&mut self) -> Result<T> {
        let (k, payload) = self.recv_frame().await?;
        if k != kind::MESSAGE {
            return Err(ChannelError::UnexpectedKind {
                peer: self.ctx.peer,
                got: k,
                expected: kind::MESSAGE,
            });
        }
        postcard::from_bytes(&payload).map_err(|e| ChannelError::Decode {
            peer: self.ctx.peer,
            reason: e.to_string(),
        })
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.ctx.peer
    }
}

/// A cloneable handle on a connection, for what is not tied to the control
/// stream: bulk streams, closing, statistics.
#[derive(Clone)]
pub struct Handle {
    ctx: Ctx,
    endpoint: Endpoint,
    /// Client connections own their endpoint and wait for it on close.
    owns_endpoint: bool,
    peer: Arc<PeerInfo>,
}

impl Handle {
    /// Who the peer is.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// Open a unidirectional bulk stream (e.g. for memory pages), framed like
    /// the control stream. The peer sees it on its first frame.
    pub async fn open_bulk(&self) -> Result<SendHalf> {
        let stream = self
            .ctx
            .conn
            .open_uni()
            .await
            .map_err(|e| self.ctx.conn_err(&e))?;
        Ok(SendHalf {
            stream,
            ctx: self.ctx.clone(),
        })
    }

    /// Accept the next bulk stream opened by the peer.
    pub async fn accept_bulk(&self) -> Result<RecvHalf> {
        let stream = self
            .ctx
            .conn
            .accept_uni()
            .await
            .map_err(|e| self.ctx.conn_err(&e))?;
        Ok(RecvHalf {
            stream,
            ctx: self.ctx.clone(),
            state: ReadState::default(),
        })
    }

    /// Close the connection now with an application `code` and `reason`;
    /// unacknowledged data is discarded.
    pub fn close_now(&self, code: u32, reason: &str) {
        self.ctx
            .conn
            .close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Wait until the connection is closed, and say why.
    pub async fn closed(&self) -> ChannelError {
        let e = self.ctx.conn.closed().await;
        self.ctx.conn_err(&e)
    }

    /// Current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.ctx.conn.rtt()
    }

    /// The underlying quinn connection.
    pub fn quinn(&self) -> &quinn::Connection {
        &self.ctx.conn
    }

    async fn finish_close(&self) {
        self.ctx
            .conn
            .close(VarInt::from_u32(close_code::NORMAL), b"done");
        if self.owns_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        }
    }
}

/// An established, authenticated connection with its control stream.
pub struct Connection {
    handle: Handle,
    tx: SendHalf,
    rx: RecvHalf,
    /// Made by [`connect_with`]: the peer's Hello is still to be read,
    /// within this time.
    hello_pending: Option<Duration>,
}

impl Connection {
    /// Who the peer is (address and its [`Hello`]; for a connection made by
    /// [`connect_with`], only after [`Connection::finish_hello`]).
    pub fn peer(&self) -> &PeerInfo {
        self.handle.peer()
    }

    /// Read and check the peer's Hello if [`connect_with`] left it unread
    /// (a no-op otherwise); errors as [`connect`]'s would be (version,
    /// refused certificate, the handshake timeout). Handles taken before
    /// keep the address only.
    pub async fn finish_hello(&mut self) -> Result<()> {
        let Some(timeout) = self.hello_pending else {
            return Ok(());
        };
        let ctx = self.rx.ctx.clone();
        let theirs = match tokio::time::timeout(timeout, read_hello(&mut self.rx)).await {
            Ok(r) => r,
            Err(_) => Err(ChannelError::Handshake {
                peer: ctx.peer,
                reason: format!("no Hello within {timeout:?}"),
            }),
        };
        let hello = checked_hello(&ctx.conn, ctx.ours, false, theirs).await?;
        self.hello_pending = None;
        self.handle.peer = Arc::new(PeerInfo {
            addr: ctx.peer,
            hello,
        });
        Ok(())
    }

    /// A cloneable handle (bulk streams, close, stats).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Send one frame on the control stream.
    pub async fn send_frame(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        self.tx.send_frame(kind, payload).await
    }

    /// Send a typed message on the control stream.
    pub async fn send_msg<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        self.tx.send_msg(msg).await
    }

    /// Receive one frame from the control stream.
    pub async fn recv_frame(&mut self) -> Result<(u8, Vec<u8>)> {
        self.finish_hello().await?;
        self.rx.recv_frame().await
    }

    /// Receive a typed message from the control stream.
    pub async fn recv_msg<T: DeserializeOwned>(&mut self) -> Result<T> {
        self.finish_hello().await?;
        self.rx.recv_msg().await
    }

    /// See [`Handle::open_bulk`].
    pub async fn open_bulk(&self) -> Result<SendHalf> {
        self.handle.open_bulk().await
    }

    /// See [`Handle::accept_bulk`].
    pub async fn accept_bulk(&self) -> Result<RecvHalf> {
        self.handle.accept_bulk().await
    }

    /// Split into independently usable halves (e.g. one task sends the log,
    /// another receives acks) plus a handle. A connection made by
    /// [`connect_with`] must have read the peer's Hello first.
    pub fn split(self) -> (SendHalf, RecvHalf, Handle) {
        debug_assert!(self.hello_pending.is_none(), "split before finish_hello");
        (self.tx, self.rx, self.handle)
    }

    /// Orderly close: finish the control stream, wait (up to the linger time)
    /// until the peer acknowledged everything we sent, then close.
    ///
    /// A peer that closes the connection normally meanwhile is not an error.
    /// For end-to-end certainty that the peer *processed* the data, use an
    /// application-level reply (e.g. [`Message::Ack`]) before closing.
    pub async fn close(self) -> Result<()> {
        let handle = self.handle.clone();
        let r = match self.tx.finish().await {
            Err(ChannelError::Closed { .. })
                if matches!(
                    handle.ctx.conn.close_reason(),
                    Some(ConnectionError::ApplicationClosed(ref a))
                        if a.error_code == VarInt::from_u32(close_code::NORMAL)
                ) =>
            {
                Ok(())
            }
            r => r,
        };
        handle.finish_close().await;
        r
    }

    /// Close immediately, telling the peer why (`close_code::ABORT`).
    pub fn abort(&self, reason: &str) {
        self.handle.close_now(close_code::ABORT, reason);
    }

    /// Write raw bytes on the control stream, bypassing framing (protocol tests only).
    #[doc(hidden)]
    pub async fn send_raw(&mut self, buf: &[u8]) -> Result<()> {
        self.tx.send_raw(buf).await
    }
}

/// Accepts authenticated connections. Clones share the endpoint.
#[derive(Clone)]
pub struct Listener {
    endpoint: Endpoint,
    cfg: Arc<ChannelConfig>,
}

/// A connection attempt that reached the listener: not authenticated yet.
/// [`Pending::establish`] runs the TLS handshake and the Hello exchange
/// (bounded by [`ChannelConfig::handshake_timeout`]); callers that must not
/// be held up by a slow or silent peer run it on their own task or thread
/// and take the next attempt meanwhile.
pub struct Pending {
    incoming: quinn::Incoming,
    peer: SocketAddr,
    endpoint: Endpoint,
    cfg: Arc<ChannelConfig>,
}

impl Pending {
    /// The peer's UDP address (not authenticated).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Authenticate: TLS handshake (client certificate required), then the
    /// Hello exchange, within the handshake timeout. A refused peer gives
    /// an error naming it (the caller reports it).
    pub async fn establish(self) -> Result<Connection> {
        let Pending {
            incoming,
            peer,
            endpoint,
            cfg,
        } = self;
        let res = tokio::time::timeout(cfg.handshake_timeout, async {
            let connecting = incoming.accept().map_err(|e| ChannelError::Handshake {
                peer,
                reason: e.to_string(),
            })?;
            establish(connecting, peer, &cfg, &endpoint, Side::Server).await
        })
        .await;
        let res = match res {
            Ok(r) => r,
            Err(_) => Err(ChannelError::Handshake {
                peer,
                reason: format!("not completed within {:?}", cfg.handshake_timeout),
            }),
        };
        match &res {
            Ok(c) => {
                debug!(peer = %peer, name = %c.peer().hello.name, role = ?c.peer().hello.role, "accepted connection")
            }
            // The caller reports the error it gets (once); these are for
            // tracing only.
            Err(ChannelError::Handshake { reason, .. }) => {
                debug!(peer = %peer, %reason, "refused connection: TLS handshake failed")
            }
            Err(e) => debug!(peer = %peer, error = %e, "refused connection"),
        }
        res
    }

    /// Refuse the attempt at once (the peer sees the connection refused).
    pub fn refuse(self) {
        self.incoming.refuse();
    }

    /// Has the peer proved that it receives what is sent to its address
    /// (a QUIC Retry token)? A peer that spoofs its source address cannot.
    pub fn address_validated(&self) -> bool {
        self.incoming.remote_address_validated()
    }

    /// Keep the attempt if the peer's address is validated; otherwise
    /// answer with a QUIC Retry (a real peer comes back validated, one
    /// round trip later, as a new attempt) and give `None`. Servers under
    /// pressure use this so that floods from spoofed addresses cost them
    /// nothing.
    pub fn validated_or_retry(self) -> Option<Pending> {
        if self.address_validated() {
            return Some(self);
        }
        if let Err(e) = self.incoming.retry() {
            e.into_incoming().refuse();
        }
        None
    }
}

impl Listener {
    /// Bind a UDP socket on `addr` (port 0 for an ephemeral port). Must be
    /// called within a tokio runtime. Clients must present a certificate from
    /// the CA in `creds`.
    pub fn bind(addr: SocketAddr, creds: &Credentials, cfg: &ChannelConfig) -> Result<Self> {
        let sc = tls::server_config(creds, cfg)?;
        let endpoint = tls::endpoint(addr, Some(sc), cfg)?;
        Ok(Self {
            endpoint,
            cfg: Arc::new(cfg.clone()),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The next connection attempt, not yet authenticated. Returns
    /// [`ChannelError::Closed`] once the listener is closed.
    pub async fn next_pending(&self) -> Result<Pending> {
        let incoming = self
            .endpoint
            .accept()
            .await
            .ok_or_else(|| ChannelError::Closed {
                peer: self
                    .endpoint
                    .local_addr()
                    .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into()),
                reason: "listener closed".into(),
            })?;
        Ok(Pending {
            peer: incoming.remote_address(),
            incoming,
            endpoint: self.endpoint.clone(),
            cfg: self.cfg.clone(),
        })
    }

    /// Accept the next connection: TLS handshake (client certificate
    /// required), then the Hello exchange. A refused peer gives an error
    /// (the caller reports it); the listener stays usable, so callers typically
    /// loop. Returns [`ChannelError::Closed`] once the listener is closed.
    /// One attempt at a time: see [`Listener::next_pending`] to serve
    /// several.
    pub async fn accept(&self) -> Result<Connection> {
        self.next_pending().await?.establish().await
    }

    /// Stop accepting and close all connections of this listener.
    pub fn close(&self) {
        self.endpoint
            .close(VarInt::from_u32(close_code::NORMAL), b"listener closed");
    }
}

/// Read and check the peer's Hello. See the compatibility rule in
/// `message.rs`: variant 0, version first.
async fn read_hello(rx: &mut RecvHalf) -> Result<Hello> {
    let ours = rx.ctx.ours;
    let (k, payload) = rx.recv_frame().await?;
    if k != kind::MESSAGE || payload.first() != Some(&0) {
        return Err(rx
            .ctx
            .protocol_violation(format!("first frame (kind {k}) is not a Hello")));
    }
    let theirs = match postcard::take_from_bytes::<u32>(&payload[1..]) {
        Ok((v, _)) => v,
        Err(e) => return Err(rx.ctx.protocol_violation(format!("malformed Hello: {e}"))),
    };
    if theirs != ours {
        return Err(ChannelError::Version { ours, theirs });
    }
    match postcard::from_bytes::<Message>(&payload) {
        Ok(Message::Hello(h)) => Ok(h),
        Ok(_) => Err(rx
            .ctx
            .protocol_violation("first message is not a Hello".into())),
        Err(e) => Err(rx.ctx.protocol_violation(format!("malformed Hello: {e}"))),
    }
}

/// Connect to `addr`, verifying that the server's certificate is from the
/// cluster CA and valid for `server_name`, presenting our certificate, then
/// exchanging Hellos. Must be called within a tokio runtime.
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    creds: &Credentials,
    cfg: &ChannelConfig,
) -> Result<Connection> {
    connect_with(addr, server_name, creds, cfg, None).await
}

/// [`connect`], sending `first` (a frame `(kind, payload)`) right behind
/// our Hello and returning without waiting for the peer's Hello: a
/// protocol whose first steps after the Hello exchange are ours (a
/// migration's header, then its first pages) saves a round trip. The peer
/// reads `first` after our Hello, as if it had come later. The peer's
/// Hello is read (and checked: version, a refusal of our certificate) by
/// [`Connection::finish_hello`], which the first receive calls if the
/// caller did not; until then [`Connection::peer`] knows only the address.
pub async fn connect_with(
    addr: SocketAddr,
    server_name: &str,
    creds: &Credentials,
    cfg: &ChannelConfig,
    first: Option<(u8, &[u8])>,
) -> Result<Connection> {
    let client_cfg = tls::client_config(creds, cfg)?;
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = tls::endpoint(bind, None, cfg)?;
    endpoint.set_default_client_config(client_cfg);
    let res = tokio::time::timeout(
        cfg.handshake_timeout,
        connect_inner(&endpoint, addr, server_name, cfg, first),
    )
    .await;
    let res = match res {
        Ok(r) => r,
        Err(_) => Err(ChannelError::Handshake {
            peer: addr,
            reason: format!("not completed within {:?}", cfg.handshake_timeout),
        }),
    };
    if let Err(e) = &res {
        // The caller reports the error it gets; this is for tracing only.
        debug!(peer = %addr, error = %e, "connection failed");
        endpoint.close(VarInt::from_u32(close_code::NORMAL), b"");
    }
    res
}

async fn connect_inner(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
    cfg: &ChannelConfig,
    first: Option<(u8, &[u8])>,
) -> Result<Connection> {
    let connecting = endpoint.connect(addr, server_name).map_err(|e| {
        ChannelError::Config(format!("cannot connect to {addr} as {server_name:?}: {e}"))
    })?;
    establish(connecting, addr, cfg, endpoint, Side::Client(first)).await
}

/// Which end of a connection we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side<'a> {
    /// Accepted by a [`Listener`]: accepts the control stream, reads the
    /// peer's Hello first.
    Server,
    /// Made by [`connect`]: opens the control stream, sends its Hello first
    /// and owns its endpoint. With a frame ([`connect_with`]): sends it
    /// right behind the Hello and leaves the peer's Hello for
    /// [`Connection::finish_hello`].
    Client(Option<(u8, &'a [u8])>),
}

/// Finish a connection whose TLS handshake is under way: wait for the
/// handshake, open (client) or accept (server) the control stream and
/// exchange Hellos. On a version mismatch the connection is closed with
/// [`close_code::VERSION_MISMATCH`] and our version as the reason.
async fn establish(
    connecting: quinn::Connecting,
    peer: SocketAddr,
    cfg: &ChannelConfig,
    endpoint: &Endpoint,
    side: Side<'_>,
) -> Result<Connection> {
    let ours = cfg.protocol_version;
    let conn = connecting
        .await
        .map_err(|e| match map_conn_err(peer, ours, &e) {
            h @ ChannelError::Handshake { .. } => h,
            other => ChannelError::Handshake {
                peer,
                reason: other.to_string(),
            },
        })?;
    let ctx = Ctx {
        conn: conn.clone(),
        peer,
        ours,
        max_frame: cfg.max_frame_len,
        linger: cfg.linger,
    };
    let streams = match side {
        Side::Server => conn.accept_bi().await,
        Side::Client(_) => conn.open_bi().await,
    };
    let (send, recv) = streams.map_err(|e| ctx.conn_err(&e))?;
    let mut tx = SendHalf {
        stream: send,
        ctx: ctx.clone(),
    };
    let mut rx = RecvHalf {
        stream: recv,
        ctx: ctx.clone(),
        state: ReadState::default(),
    };
    let theirs = match side {
        Side::Server => {
            let theirs = read_hello(&mut rx).await;
            // Always answer with our Hello, so a peer of another version can
            // report the mismatch precisely.
            tx.send_msg(&Message::Hello(cfg.hello())).await?;
            theirs
        }
        Side::Client(first) => {
            // In TLS 1.3 the server checks our certificate after we consider
            // the handshake done; a refusal shows up here as a crypto close
            // code and is mapped to ChannelError::Handshake.
            tx.send_msg(&Message::Hello(cfg.hello())).await?;
            if let Some((kind, payload)) = first {
                tx.send_frame(kind, payload).await?;
                // The peer's Hello is read later (finish_hello).
                return Ok(Connection {
                    handle: Handle {
                        ctx,
                        endpoint: endpoint.clone(),
                        owns_endpoint: true,
                        peer: Arc::new(PeerInfo {
                            addr: peer,
                            hello: Hello {
                                protocol_version: 0,
                                role: cfg.role,
                                name: String::new(),
                            },
                        }),
                    },
                    tx,
                    rx,
                    hello_pending: Some(cfg.handshake_timeout),
                });
            }
            read_hello(&mut rx).await
        }
    };
    let hello = checked_hello(&conn, ours, side == Side::Server, theirs).await?;
    Ok(Connection {
        handle: Handle {
            ctx,
            endpoint: endpoint.clone(),
            owns_endpoint: side != Side::Server,
            peer: Arc::new(PeerInfo { addr: peer, hello }),
        },
        tx,
        rx,
        hello_pending: None,
    })
}

/// The peer's Hello as read; on a version mismatch the connection is
/// closed with [`close_code::VERSION_MISMATCH`] and our version.
async fn checked_hello(
    conn: &quinn::Connection,
    ours: u32,
    server: bool,
    theirs: Result<Hello>,
) -> Result<Hello> {
    match theirs {
        Ok(h) => Ok(h),
        Err(e @ ChannelError::Version { .. }) => {
            if server {
                // Give the peer a moment to read our Hello and close itself.
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
            }
            conn.close(
                VarInt::from_u32(close_code::VERSION_MISMATCH),
                format!("{VERSION_REASON_PREFIX}{ours}").as_bytes(),
            );
            Err(e)
        }
        Err(e) => Err(e),
    }
}
