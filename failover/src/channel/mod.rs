//! The authenticated network channel between Tandem hosts.
//!
//! One QUIC connection (quinn, TLS 1.3 via rustls with the *ring* provider)
//! between a primary and a secondary (or a migration source and destination)
//! carries the bootstrap (memory, disk and device state), then the log stream,
//! acknowledgements and heartbeats.
//!
//! # Trust model
//!
//! * Both sides authenticate with certificates issued by the cluster CA
//!   ([`crate::certs`]). The listening side *requires* a client certificate
//!   and verifies it against the cluster CA alone (rustls
//!   `WebPkiClientVerifier`); the connecting side verifies the listener's
//!   certificate against the same CA and the name it dialled. System roots are
//!   never consulted.
//! * A peer without a certificate from the cluster CA is refused during the
//!   TLS handshake: the connection is never handed to the application, so not
//!   one byte of application data is read from or sent to it. The refusal is
//!   reported as [`ChannelError::Handshake`], naming the peer's address, on
//!   both sides (the caller prints it; the channel only traces it at debug).
//! * Any cluster member is fully trusted (it may send a log or receive a VM).
//!   Roles are announced in the [`Hello`] message, not enforced by the
//!   certificate.
//! * Only TLS 1.3 is offered; no 0-RTT (no replayable early data).
//!
//! # Protocol
//!
//! After the handshake the connecting side opens one bidirectional *control*
//! stream and both sides send a [`Message::Hello`] as their first frame. A
//! peer speaking another [`PROTOCOL_VERSION`] is refused with
//! [`ChannelError::Version`]. Every frame is
//! `u32 LE payload length | u8 kind | payload`, with the length capped by
//! [`ChannelConfig::max_frame_len`] (64 MiB by default) and checked before any
//! allocation. Typed messages are [`Message`] values encoded with postcard in
//! frames of kind [`kind::MESSAGE`]. Bulk transfers may use extra
//! unidirectional streams ([`Connection::open_bulk`] /
//! [`Connection::accept_bulk`]) with the same framing. See `docs/channel.md`.
//!
//! Async API: [`Listener`], [`connect`], [`Connection`]. Blocking facade for
//! synchronous callers (the vCPU run loop): [`BlockingListener`],
//! [`BlockingConnection`].

mod blocking;
mod congestion;
mod conn;
mod frame;
mod message;
mod probe;
mod tls;
mod udp;

use std::net::SocketAddr;
use std::time::Duration;

pub use blocking::{
    BlockingConnection, BlockingListener, BlockingPending, BlockingReceiver, BlockingSender,
};
pub use conn::{
    connect, connect_with, Connection, Handle, Listener, PeerInfo, Pending, RecvHalf, SendHalf,
};
pub use frame::{decode_header, encode_header, kind, FRAME_HEADER_LEN};
pub use message::{DiskBlock, Hello, Message, Page, Role, PROTOCOL_VERSION};
pub use probe::{TailProbe, PROBE_GAP};

pub use crate::certs::Credentials;

/// ALPN protocol identifier. Deliberately version-free: versions are
/// negotiated by [`Hello`] so a mismatch gets a clear error, not a TLS alert.
pub const ALPN: &[u8] = b"tandem";

/// Default cap on a frame's payload length (64 MiB).
pub const DEFAULT_MAX_FRAME_LEN: u32 = 64 << 20;

/// QUIC application close codes used by the channel.
pub mod close_code {
    /// Orderly close.
    pub const NORMAL: u32 = 0;
    /// Protocol versions differ; the reason is `"protocol version N"`.
    pub const VERSION_MISMATCH: u32 = 1;
    /// The peer violated the protocol (bad frame, bad first message...).
    pub const PROTOCOL_ERROR: u32 = 2;
    /// The application aborted.
    pub const ABORT: u32 = 3;
}

/// Errors of the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// TLS handshake failed: the peer has no certificate from the cluster CA,
    /// or refused ours, or did not complete the handshake in time.
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer's address.
        peer: SocketAddr,
        /// What TLS said.
        reason: String,
    },
    /// The peer speaks another protocol version.
    #[error(
        "protocol version mismatch: we speak version {ours}, the peer speaks version {theirs}"
    )]
    Version {
        /// Our protocol version.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// A frame's declared length exceeds the cap; nothing was allocated.
    #[error("frame of {len} bytes from {peer} exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The peer's address.
        peer: SocketAddr,
        /// The declared length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A frame of another kind than expected arrived.
    #[error("unexpected frame kind {got} from {peer} (expected {expected})")]
    UnexpectedKind {
        /// The peer's address.
        peer: SocketAddr,
        /// The kind that came.
        got: u8,
        /// The kind that was expected.
        expected: u8,
    },
    /// The payload could not be decoded.
    #[error("malformed message from {peer}: {reason}")]
    Decode {
        /// The peer's address.
        peer: SocketAddr,
        /// What did not decode.
        reason: String,
    },
    /// The peer violated the protocol in another way.
    #[error("protocol error with {peer}: {reason}")]
    Protocol {
        /// The peer's address.
        peer: SocketAddr,
        /// What the peer did.
        reason: String,
    },
    /// The stream was finished by the peer at a frame boundary (orderly end).
    #[error("stream from {peer} finished")]
    Finished {
        /// The peer's address.
        peer: SocketAddr,
    },
    /// The connection is closed (by either side, or lost: timeout, reset...).
    #[error("connection with {peer} closed: {reason}")]
    Closed {
        /// The peer's address.
        peer: SocketAddr,
        /// Why (as QUIC reports it).
        reason: String,
    },
    /// A deadline passed.
    #[error("timed out {what}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
    },
    /// TLS or QUIC configuration is invalid (bad key, unusable certificate...).
    #[error("channel configuration error: {0}")]
    Config(String),
    /// Socket or runtime I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl ChannelError {
    /// True if the error means the connection or stream ended (orderly or not).
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Finished { .. } | Self::Closed { .. })
    }
}

/// Result type of the channel.
pub type Result<T> = std::result::Result<T, ChannelError>;

/// Settings of one side of the channel.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// Role announced in our [`Hello`].
    pub role: Role,
    /// Name announced in our [`Hello`] (normally the host name of our certificate).
    pub name: String,
    /// The connection is considered dead after this long without any packet
    /// from the peer (keepalives included). Default 10 s.
    pub idle_timeout: Duration,
    /// Interval of QUIC keepalive pings; must be below `idle_timeout`. Default 1 s.
    pub keep_alive: Duration,
    /// Deadline for the TLS handshake plus the Hello exchange. Default 10 s.
    pub handshake_timeout: Duration,
    /// Largest accepted frame payload. Default [`DEFAULT_MAX_FRAME_LEN`].
    pub max_frame_len: u32,
    /// Per-stream receive window (bytes in flight on one stream). Default
    /// 16 MiB: 900 Mbit/s at 150 ms RTT. Larger is not better on lossy
    /// links: quinn keeps at most 1024 out-of-order pieces of a stream and
    /// kills the connection beyond that, and a full bottleneck queue drops
    /// every other packet; 16 MiB of jumbo packets stays below that.
    pub stream_receive_window: u32,
    /// Connection receive window. Default 256 MiB.
    pub receive_window: u32,
    /// Connection send window (unacknowledged bytes we buffer). Default 256 MiB.
    pub send_window: u64,
    /// Upper bound for path MTU discovery (UDP payload bytes). Default
    /// [`DEFAULT_MAX_UDP_PAYLOAD`] (6500: jumbo frames); discovery only
    /// uses what the path carries.
    pub max_udp_payload: u16,
    /// The congestion controller's (BBR) initial window, bytes. Default
    /// [`DEFAULT_INITIAL_WINDOW`].
    pub initial_window: u64,
    /// How long [`Connection::close`] waits for the peer to acknowledge what we
    /// sent before closing. Default 5 s.
    pub linger: Duration,
    /// Protocol version we announce. Leave at [`PROTOCOL_VERSION`]; settable so
    /// tests can impersonate another version.
    pub protocol_version: u32,
}

/// Default [`ChannelConfig::max_udp_payload`]. quinn hands the kernel up to
/// 10 datagrams per `sendmsg` (UDP GSO), and Linux refuses a batch above
/// 64 KiB (EMSGSIZE): at 9000-byte datagrams every full batch was lost
/// (330 of 2358 packets of a migration at 150 ms RTT). The socket wrapper
/// in `udp.rs` now caps every batch at 64 KiB whatever the datagram size;
/// 6500 is kept because a full batch of 10 fits and measured as fast as
/// 7 x 9000 on loopback, while larger datagrams cost path MTU probes.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 6500;

/// Default [`ChannelConfig::initial_window`]: 2 MiB. quinn's BBR starts
/// with 240 KB and doubles about once per round trip: at 150 ms RTT a
/// migration's first 1.2 MB took 880 ms, and its echo measured a 1.5 MB/s
/// "link" on a 1 Gbit/s one. The channel runs between the operator's own
/// hosts (a migration or protection link), where 2 MiB, paced over the
/// first round trip (BBR paces its initial window at window / RTT: 14 MB/s
/// at 150 ms), neither floods a 100 Mbit/s bottleneck nor leaves a long fat
/// pipe idle for a second.
pub const DEFAULT_INITIAL_WINDOW: u64 = 2 << 20;

impl ChannelConfig {
    /// Defaults with the given role and name.
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        Self {
            role,
            name: name.into(),
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(10),
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            stream_receive_window: 16 << 20,
            receive_window: 256 << 20,
            send_window: 256 << 20,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
            initial_window: DEFAULT_INITIAL_WINDOW,
            linger: Duration::from_secs(5),
            protocol_version: PROTOCOL_VERSION,
        }
    }

    /// The [`Hello`] we send.
    pub fn hello(&self) -> Hello {
        Hello {
            protocol_version: self.protocol_version,
            role: self.role,
            name: self.name.clone(),
        }
    }
}
