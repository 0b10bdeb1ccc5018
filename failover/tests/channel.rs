//! Channel tests over loopback UDP (ephemeral ports).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failover::certs::{self, Credentials};
use failover::channel::{
    connect, connect_with, kind, BlockingConnection, BlockingListener, ChannelConfig, ChannelError,
    Listener, Message, Page, Role, PROTOCOL_VERSION,
};
use tempfile::TempDir;

struct Cluster {
    _dir: TempDir,
    dir: std::path::PathBuf,
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        certs::init_ca(&path).unwrap();
        Self {
            _dir: dir,
            dir: path,
        }
    }

    fn host(&self, name: &str) -> Credentials {
        if !self.dir.join(format!("{name}.pem")).exists() {
            certs::issue(&self.dir, name, None, &[]).unwrap();
        }
        Credentials::load_host(&self.dir, name).unwrap()
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn server_cfg() -> ChannelConfig {
    ChannelConfig::new(Role::Secondary, "beta")
}

fn client_cfg() -> ChannelConfig {
    ChannelConfig::new(Role::Primary, "alpha")
}

/// Captures tracing output of the current thread.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let me = self.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || me.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::set_default(sub)
    }
}

#[tokio::test]
async fn mutual_tls_round_trip() {
    let c = Cluster::new();
    let listener = Listener::bind(loopback(), &c.host("beta"), &server_cfg()).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut conn = listener.accept().await.unwrap();
        assert_eq!(conn.peer().hello.role, Role::Primary);
        assert_eq!(conn.peer().hello.name, "alpha");
        assert_eq!(conn.peer().hello.protocol_version, PROTOCOL_VERSION);
        // Echo three messages back, then a raw frame.
        for _ in 0..3 {
            let m: Message = conn.recv_msg().await.unwrap();
            conn.send_msg(&m).await.unwrap();
        }
        let (k, p) = conn.recv_frame().await.unwrap();
        assert_eq!((k, p.as_slice()), (kind::FIRST_APP, &b"raw"[..]));
        // Bulk stream.
        let mut bulk = conn.accept_bulk().await.unwrap();
        let m: Message = bulk.recv_msg().await.unwrap();
        assert!(matches!(
            m,
            Message::RoundDone {
                round: 1,
                dirty_pages: 2
            }
        ));
        assert!(matches!(
            bulk.recv_msg::<Message>().await,
            Err(ChannelError::Finished { .. })
        ));
        conn.send_msg(&Message::Running).await.unwrap();
        // The client closes.
        let e = conn.recv_msg::<Message>().await.unwrap_err();
        assert!(e.is_closed(), "{e}");
    });

    let mut conn = connect(addr, "localhost", &c.host("alpha"), &client_cfg())
        .await
        .unwrap();
    assert_eq!(conn.peer().hello.role, Role::Secondary);
    assert_eq!(conn.peer().hello.name, "beta");
    let big = Message::MemoryPages {
        round: 0,
        compressed: false,
        pages: (0..4096u64)
            .map(|i| Page {
                gpa: i * 4096,
                data: vec![i as u8; 4096],
            })
            .collect(),
    }; // 16 MiB of page data
    let msgs = vec![
        Message::Heartbeat {
            seq: 1,
            sent_micros: 5,
        },
        big,
        Message::Ack { exit_seq: 77 },
    ];
    // Pipelined: all sends before any receive.
    for m in &msgs {
        conn.send_msg(m).await.unwrap();
    }
    conn.send_frame(kind::FIRST_APP, b"raw").await.unwrap();
    for m in &msgs {
        let back: Message = conn.recv_msg().await.unwrap();
        assert_eq!(&back, m);
    }
    let mut bulk = conn.open_bulk().await.unwrap();
    bulk.send_msg(&Message::RoundDone {
        round: 1,
        dirty_pages: 2,
    })
    .await
    .unwrap();
    bulk.finish().await.unwrap();
    assert_eq!(conn.recv_msg::<Message>().await.unwrap(), Message::Running);
    conn.close().await.unwrap();
    server.await.unwrap();
}

/// Run one refused connection attempt; returns (server error, client error, logs).
async fn refused(client: Credentials, server: Credentials) -> (ChannelError, ChannelError, String) {
    let logs = LogBuf::default();
    let _guard = logs.install();
    let listener = Listener::bind(loopback(), &server, &server_cfg()).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = client_cfg();
    cfg.handshake_timeout = Duration::from_secs(5);
    let (s, c) = tokio::join!(listener.accept(), connect(addr, "localhost", &client, &cfg));
    let s = match s {
        Ok(_) => panic!("server accepted a bad peer"),
        Err(e) => e,
    };
    let c = match c {
        Ok(_) => panic!("client connected"),
        Err(e) => e,
    };
    (s, c, logs.text())
}

fn assert_refused_client(s: &ChannelError, c: &ChannelError, logs: &str) {
    match s {
        ChannelError::Handshake { peer, reason } => {
            assert!(peer.ip().is_loopback(), "{peer}");
            assert!(
                logs.contains(&peer.to_string()),
                "peer address not logged: {logs}"
            );
            assert!(logs.contains("refused"), "{logs}");
            assert!(!reason.is_empty());
        }
        e => panic!("server: expected Handshake error, got {e}"),
    }
    assert!(
        matches!(c, ChannelError::Handshake { .. }),
        "client: expected Handshake error, got {c}"
    );
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let ours = Cluster::new();
    let theirs = Cluster::new();
    // Mallory trusts our CA (so it accepts our server) but its certificate
    // comes from another CA.
    let mut mallory = theirs.host("alpha");
    mallory.ca = ours.host("beta").ca;
    let (s, c, logs) = refused(mallory, ours.host("beta")).await;
    eprintln!("server: {s}\nclient: {c}");
    assert_refused_client(&s, &c, &logs);
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let c = Cluster::new();
    let mut anon = c.host("alpha");
    anon.cert_chain.clear();
    let (s, cl, logs) = refused(anon, c.host("beta")).await;
    eprintln!("server: {s}\nclient: {cl}");
    assert_refused_client(&s, &cl, &logs);
}

#[tokio::test]
async fn server_from_another_ca_is_refused() {
    let ours = Cluster::new();
    let theirs = Cluster::new();
    let mut fake_server = theirs.host("beta");
    fake_server.ca = ours.host("alpha").ca;
    let (s, c, _) = refused(ours.host("alpha"), fake_server).await;
    eprintln!("server: {s}\nclient: {c}");
    assert!(matches!(c, ChannelError::Handshake { .. }), "{c}");
    assert!(
        c.to_string().contains("UnknownIssuer") || c.to_string().contains("certificate"),
        "{c}"
    );
    assert!(matches!(s, ChannelError::Handshake { .. }), "{s}");
}

#[tokio::test]
async fn wrong_server_name_is_refused() {
    let c = Cluster::new();
    let listener = Listener::bind(loopback(), &c.host("beta"), &server_cfg()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (alpha, cfg) = (c.host("alpha"), client_cfg());
    let (_s, r) = tokio::join!(listener.accept(), connect(addr, "gamma", &alpha, &cfg));
    let e = r.err().expect("name mismatch must be refused");
    assert!(matches!(e, ChannelError::Handshake { .. }), "{e}");
}

#[tokio::test]
async fn other_protocol_version_is_refused() {
    let c = Cluster::new();
    let listener = Listener::bind(loopback(), &c.host("beta"), &server_cfg()).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = client_cfg();
    cfg.protocol_version = PROTOCOL_VERSION + 1;
    let alpha = c.host("alpha");
    let (s, cl) = tokio::join!(listener.accept(), connect(addr, "localhost", &alpha, &cfg));
    let s = s.err().expect("server must refuse");
    let cl = cl.err().expect("client must refuse");
    eprintln!("server: {s}\nclient: {cl}");
    match s {
        ChannelError::Version { ours, theirs } => {
            assert_eq!((ours, theirs), (PROTOCOL_VERSION, PROTOCOL_VERSION + 1))
        }
        e => panic!("server: {e}"),
    }
    match cl {
        ChannelError::Version { ours, theirs } => {
            assert_eq!((ours, theirs), (PROTOCOL_VERSION + 1, PROTOCOL_VERSION))
        }
        e => panic!("client: {e}"),
    }
    assert!(s_msg_names_both(PROTOCOL_VERSION, PROTOCOL_VERSION + 1));
    // Through `connect_with` the client sees the mismatch at
    // `finish_hello`, named the same way.
    let client = async {
        let mut conn = connect_with(addr, "localhost", &alpha, &cfg, Some((42, b"header")))
            .await
            .unwrap();
        conn.finish_hello().await.expect_err("client must refuse")
    };
    let (s, cl) = tokio::join!(listener.accept(), client);
    assert!(
        matches!(s, Err(ChannelError::Version { .. })),
        "{:?}",
        s.err()
    );
    match cl {
        ChannelError::Version { ours, theirs } => {
            assert_eq!((ours, theirs), (PROTOCOL_VERSION + 1, PROTOCOL_VERSION))
        }
        e => panic!("client (connect_with): {e}"),
    }
}

/// `connect_with`: the frame sent behind our Hello reaches the listener
/// after the Hello exchange; the listener's Hello is read by the first
/// receive, and until then `peer()` has no name.
#[tokio::test]
async fn a_frame_sent_behind_the_hello_arrives_after_it() {
    let c = Cluster::new();
    let listener = Listener::bind(loopback(), &c.host("beta"), &server_cfg()).unwrap();
    let addr = listener.local_addr().unwrap();
    let alpha = c.host("alpha");
    let server = async {
        let mut conn = listener.accept().await.unwrap();
        assert_eq!(conn.peer().hello.name, "alpha");
        let (k, payload) = conn.recv_frame().await.unwrap();
        conn.send_msg(&Message::Running).await.unwrap();
        (k, payload, conn)
    };
    let client = async {
        let mut conn = connect_with(
            addr,
            "localhost",
            &alpha,
            &client_cfg(),
            Some((42, b"header")),
        )
        .await
        .unwrap();
        assert_eq!(
            conn.peer().hello.name,
            "",
            "the listener's Hello is not read yet"
        );
        let m: Message = conn.recv_msg().await.unwrap();
        (m, conn)
    };
    let ((k, payload, _s), (m, cl)) = tokio::join!(server, client);
    assert_eq!((k, payload.as_slice()), (42, &b"header"[..]));
    assert_eq!(m, Message::Running);
    assert_eq!(cl.peer().hello.name, "beta");
}

fn s_msg_names_both(a: u32, b: u32) -> bool {
    let m = ChannelError::Version { ours: a, theirs: b }.to_string();
    m.contains(&a.to_string()) && m.contains(&b.to_string())
}

#[tokio::test]
async fn oversized_frame_is_rejected() {
    let c = Cluster::new();
    let listener = Listener::bind(loopback(), &c.host("beta"), &server_cfg()).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut conn = listener.accept().await.unwrap();
        let t = Instant::now();
        let e = conn.recv_frame().await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2));
        e
    });
    let mut conn = connect(addr, "localhost", &c.host("alpha"), &client_cfg())
        .await
        .unwrap();
    // Header claims ~4 GiB; no payload follows.
    conn.send_raw(&[0xf0, 0xff, 0xff, 0xff, kind::MESSAGE])
        .await
        .unwrap();
    match server.await.unwrap() {
        ChannelError::FrameTooLarge { len, max, .. } => {
            assert_eq!(len, 0xffff_fff0);
            assert_eq!(max, failover::channel::DEFAULT_MAX_FRAME_LEN);
        }
        e => panic!("{e}"),
    }
    // The server closed the connection with a protocol error.
    let e = conn.recv_frame().await.unwrap_err();
    assert!(e.is_closed(), "{e}");
}

#[tokio::test]
async fn garbage_message_is_a_decode_error() {
    let c = Cluster::new();
    let listener = Listener::bind(loopback(), &c.host("beta"), &server_cfg()).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut conn = listener.accept().await.unwrap();
        let e = conn.recv_msg::<Message>().await.unwrap_err();
        let next: Message = conn.recv_msg().await.unwrap();
        (e, next)
    });
    let mut conn = connect(addr, "localhost", &c.host("alpha"), &client_cfg())
        .await
        .unwrap();
    conn.send_frame(kind::MESSAGE, &[0xee, 0xff, 0x01])
        .await
        .unwrap();
    conn.send_msg(&Message::Running).await.unwrap();
    let (e, next) = server.await.unwrap();
    assert!(matches!(e, ChannelError::Decode { .. }), "{e}");
    assert_eq!(next, Message::Running);
}

#[test]
fn blocking_round_trip_and_split() {
    let c = Cluster::new();
    let listener = BlockingListener::bind(loopback(), &c.host("beta"), &server_cfg()).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let conn = listener.accept().unwrap();
        let (mut tx, mut rx, _h) = conn.split();
        // Ack every LogBytes until the peer finishes.
        loop {
            match rx.recv_msg::<Message>() {
                Ok(Message::LogBytes(b)) => tx
                    .send_msg(&Message::Ack {
                        exit_seq: b[0] as u64,
                    })
                    .unwrap(),
                Ok(m) => panic!("unexpected {m:?}"),
                Err(e) => {
                    assert!(e.is_closed(), "{e}");
                    break;
                }
            }
        }
    });
    let mut conn =
        BlockingConnection::connect(addr, "localhost", &c.host("alpha"), &client_cfg()).unwrap();
    assert_eq!(
        conn.recv_msg_timeout::<Message>(Duration::from_millis(50))
            .unwrap(),
        None
    );
    for i in 0..10u8 {
        conn.send_msg(&Message::LogBytes(vec![i; 100])).unwrap();
    }
    for i in 0..10u64 {
        let m: Message = conn
            .recv_msg_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(m, Message::Ack { exit_seq: i });
    }
    conn.close().unwrap();
    server.join().unwrap();
}

#[test]
fn blocking_listener_survives_refused_peer() {
    let c = Cluster::new();
    let other = Cluster::new();
    let listener = BlockingListener::bind(loopback(), &c.host("beta"), &server_cfg()).unwrap();
    let addr = listener.local_addr().unwrap();
    let good = c.host("alpha");
    let mut bad = other.host("alpha");
    bad.ca = good.ca.clone();
    let client = std::thread::spawn(move || {
        let r = BlockingConnection::connect(addr, "localhost", &bad, &client_cfg());
        assert!(r.is_err());
        let mut conn =
            BlockingConnection::connect(addr, "localhost", &good, &client_cfg()).unwrap();
        conn.send_msg(&Message::SwitchoverReady { paused: false })
            .unwrap();
        conn.close().unwrap();
    });
    let e = listener.accept().err().expect("bad peer refused");
    assert!(matches!(e, ChannelError::Handshake { .. }), "{e}");
    let mut conn = listener.accept().unwrap();
    assert_eq!(
        conn.recv_msg::<Message>().unwrap(),
        Message::SwitchoverReady { paused: false }
    );
    client.join().unwrap();
}

/// Loopback throughput of pipelined 4 MiB `MemoryPages` messages.
/// Run: `cargo test --release -p failover --test channel -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_throughput() {
    const MSG_PAGES: u64 = 1024; // 4 MiB per message
    const TOTAL: u64 = 2 << 30; // 2 GiB
    let mtu: u16 = std::env::var("TANDEM_BENCH_MTU")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9000);
    let (mut scfg, mut ccfg) = (server_cfg(), client_cfg());
    scfg.max_udp_payload = mtu;
    ccfg.max_udp_payload = mtu;
    let c = Cluster::new();
    let listener = BlockingListener::bind(loopback(), &c.host("beta"), &scfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let mut conn = listener.accept().unwrap();
        let mut got = 0u64;
        loop {
            match conn.recv_msg::<Message>().unwrap() {
                Message::MemoryPages { pages, .. } => {
                    got += pages.iter().map(|p| p.data.len() as u64).sum::<u64>()
                }
                Message::RoundDone { .. } => break,
                m => panic!("{m:?}"),
            }
        }
        conn.send_msg(&Message::Running).unwrap();
        let _ = conn.recv_msg::<Message>();
        got
    });
    let mut conn = BlockingConnection::connect(addr, "localhost", &c.host("alpha"), &ccfg).unwrap();
    let msg = Message::MemoryPages {
        round: 0,
        compressed: false,
        pages: (0..MSG_PAGES)
            .map(|i| Page {
                gpa: i * 4096,
                data: vec![(i * 7) as u8; 4096],
            })
            .collect(),
    };
    let t = Instant::now();
    let n = TOTAL / (MSG_PAGES * 4096);
    for _ in 0..n {
        conn.send_msg(&msg).unwrap();
    }
    conn.send_msg(&Message::RoundDone {
        round: 0,
        dirty_pages: 0,
    })
    .unwrap();
    assert_eq!(conn.recv_msg::<Message>().unwrap(), Message::Running);
    let secs = t.elapsed().as_secs_f64();
    conn.close().unwrap();
    let got = server.join().unwrap();
    assert_eq!(got, TOTAL);
    println!(
        "loopback throughput: {:.1} MiB/s ({} MiB in {:.2} s, MTU bound {mtu})",
        TOTAL as f64 / (1 << 20) as f64 / secs,
        TOTAL >> 20,
        secs
    );
}

#[test]
fn a_retried_attempt_comes_back_validated() {
    // What a server under pressure does: it answers unvalidated attempts
    // with a QUIC Retry; a real client passes it without noticing.
    let c = Cluster::new();
    let listener = BlockingListener::bind(loopback(), &c.host("beta"), &server_cfg()).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let mut retried = 0;
        loop {
            let p = listener.next_pending().unwrap();
            match p.validated_or_retry() {
                Some(p) => {
                    let mut conn = p.establish().unwrap();
                    let m: Message = conn.recv_msg().unwrap();
                    conn.send_msg(&m).unwrap();
                    let _ = conn.recv_msg::<Message>();
                    return retried;
                }
                None => retried += 1,
            }
        }
    });
    let mut conn =
        BlockingConnection::connect(addr, "localhost", &c.host("alpha"), &client_cfg()).unwrap();
    conn.send_msg(&Message::Running).unwrap();
    assert!(matches!(
        conn.recv_msg::<Message>().unwrap(),
        Message::Running
    ));
    drop(conn);
    assert_eq!(
        server.join().unwrap(),
        1,
        "one Retry, then the validated attempt"
    );
}
