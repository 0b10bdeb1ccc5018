//! rustls + quinn configuration: mutual TLS 1.3 against the cluster CA only,
//! with the *ring* provider installed explicitly (no process-default provider).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;

use super::{ChannelConfig, ChannelError, Credentials, Result, ALPN};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_err(what: &str) -> impl FnOnce(rustls::Error) -> ChannelError + '_ {
    move |e| ChannelError::Config(format!("{what}: {e}"))
}

fn roots(creds: &Credentials) -> Result<Arc<rustls::RootCertStore>> {
    if creds.ca.is_empty() {
        return Err(ChannelError::Config(
            "no cluster CA certificate given".into(),
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in &creds.ca {
        roots
            .add(c.clone())
            .map_err(config_err("cluster CA certificate"))?;
    }
    Ok(Arc::new(roots))
}

/// Assumed round trip before the first sample (see [`transport`]).
const INITIAL_RTT: Duration = Duration::from_millis(100);

/// QUIC transport settings tuned for bulk transfer (large windows) plus
/// keepalive and idle timeout.
pub(crate) fn transport(cfg: &ChannelConfig) -> Result<Arc<TransportConfig>> {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(cfg.stream_receive_window));
    t.receive_window(VarInt::from_u32(cfg.receive_window));
    t.send_window(cfg.send_window);
    t.max_concurrent_bidi_streams(VarInt::from_u32(16));
    t.max_concurrent_uni_streams(VarInt::from_u32(64));
    let idle = IdleTimeout::try_from(cfg.idle_timeout).map_err(|_| {
        ChannelError::Config(format!("idle timeout {:?} too large", cfg.idle_timeout))
    })?;
    t.max_idle_timeout(Some(idle));
    if cfg.keep_alive >= cfg.idle_timeout {
        return Err(ChannelError::Config(format!(
            "keep-alive interval {:?} must be below the idle timeout {:?}",
            cfg.keep_alive, cfg.idle_timeout
        )));
    }
    t.keep_alive_interval(Some(cfg.keep_alive));
    // Let path MTU discovery go beyond Ethernet's 1500 (jumbo frames,
    // loopback): fewer packets per byte is most of QUIC's bulk cost.
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(cfg.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    // Long, lossy links (a migration between sites 150 ms apart): a
    // loss-based controller (quinn's default, Cubic) shrinks its window at
    // every lost packet, and at 1% loss settles near MSS/RTT * 1.2/sqrt(p),
    // about 100 KB/s at 150 ms, whatever the link. BBR paces at the
    // measured bottleneck rate and treats random loss as loss, not as
    // congestion.
    // Its window never below the initial one (congestion.rs: quinn's BBR
    // stalls a new connection in ProbeRTT otherwise).
    t.congestion_controller_factory(Arc::new(super::congestion::FlooredBbr::new(
        cfg.initial_window,
    )));
    // Before the first RTT sample every timer derives from this; quinn's
    // default (333 ms) makes one lost handshake packet cost a second.
    t.initial_rtt(INITIAL_RTT);
    // Datagrams carry only tail-loss probes (probe.rs), never read: a
    // small buffer whose oldest entries quinn drops.
    t.datagram_receive_buffer_size(Some(super::probe::DATAGRAM_BUFFER));
    Ok(Arc::new(t))
}

/// A QUIC endpoint on a UDP socket bound to `addr` (a server if
/// `server` is given) that tells its peers it takes datagrams of up to
/// `cfg.max_udp_payload` bytes. quinn's default (1472) is also the ceiling
/// of the peer's path MTU discovery, which would otherwise never use a
/// jumbo or loopback MTU however high [`transport`] sets its upper bound.
pub(crate) fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    cfg: &ChannelConfig,
) -> Result<quinn::Endpoint> {
    let mut ec = quinn::EndpointConfig::default();
    ec.max_udp_payload_size(cfg.max_udp_payload).map_err(|_| {
        ChannelError::Config(format!(
            "max UDP payload {} out of range (1200..=65527)",
            cfg.max_udp_payload
        ))
    })?;
    let socket = std::net::UdpSocket::bind(addr)?;
    super::udp::enlarge_buffers(&socket);
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    let socket = Arc::new(super::udp::GsoCapped::new(
        runtime.wrap_udp_socket(socket)?,
        cfg.max_udp_payload,
    ));
    Ok(quinn::Endpoint::new_with_abstract_socket(
        ec, server, socket, runtime,
    )?)
}

/// Server side: require and verify a client certificate from the cluster CA.
pub(crate) fn server_config(
    creds: &Credentials,
    cfg: &ChannelConfig,
) -> Result<quinn::ServerConfig> {
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(creds)?,
        provider.clone(),
    )
    .build()
    .map_err(|e| ChannelError::Config(format!("client verifier: {e}")))?;
    if creds.cert_chain.is_empty() {
        return Err(ChannelError::Config(
            "a listener needs a certificate".into(),
        ));
    }
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err("TLS versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.cert_chain.clone(), creds.key.clone_key())
        .map_err(config_err("host certificate/key"))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls)
        .map_err(|e| ChannelError::Config(format!("QUIC TLS: {e}")))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    sc.transport_config(transport(cfg)?);
    Ok(sc)
}

/// Client side: verify the server against the cluster CA and present our
/// certificate (none if `creds.cert_chain` is empty; the server will refuse).
pub(crate) fn client_config(
    creds: &Credentials,
    cfg: &ChannelConfig,
) -> Result<quinn::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err("TLS versions"))?
        .with_root_certificates(roots(creds)?);
    let mut tls = if creds.cert_chain.is_empty() {
        builder.with_no_client_auth()
    } else {
        builder
            .with_client_auth_cert(creds.cert_chain.clone(), creds.key.clone_key())
            .map_err(config_err("host certificate/key"))?
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let quic = QuicClientConfig::try_from(tls)
        .map_err(|e| ChannelError::Config(format!("QUIC TLS: {e}")))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(quic));
    cc.transport_config(transport(cfg)?);
    Ok(cc)
}
