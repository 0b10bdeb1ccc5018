//! A secondary refuses what no real primary of this VM would send (issue
//! 8): a hand-made primary speaks the lockstep protocol and sends a real
//! record log, damaged on purpose. A corrupt frame mid-stream, a frame cut
//! short mid-stream, a stream that changes its VM, a chunk time that goes
//! back, a log that is not one, an older protocol: each is refused with a clear error that reaches the
//! primary, and changes nothing: the secondary stops, applies nothing of
//! the bad bytes, prints no final digest and does not go live although it
//! has an arbiter that would let it.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{self, run_tandem, Pki, Proc};
use common::{TempDir, TIMEOUT};
use failover::channel::{kind as chan_kind, BlockingConnection, Message, Role};
use failover::heartbeat::{kind as hb_kind, Protection};
use failover::lockstep::{kind, ChunkTime, Header, LOCKSTEP_VERSION};

/// A primary speaking the protocol by hand.
struct FakePrimary {
    conn: BlockingConnection,
}

impl FakePrimary {
    fn connect(addr: &str, pki: &Pki) -> FakePrimary {
        FakePrimary {
            conn: pki.connect(addr, "pri", Role::Primary),
        }
    }

    /// The lockstep header of a diskless VM from boot: `Ok` accepted,
    /// `Err(reason)` refused.
    fn offer(&mut self, version: u32) -> Result<(), String> {
        let h = Header {
            version,
            disk: None,
            seed: None,
            arbiter: None,
        };
        self.conn
            .send_frame(kind::HEADER, &postcard::to_stdvec(&h).unwrap())
            .unwrap();
        match self.conn.recv_frame_timeout(TIMEOUT).unwrap() {
            Some((kind::ACCEPTED, _)) => Ok(()),
            Some((chan_kind::MESSAGE, p)) => match postcard::from_bytes::<Message>(&p) {
                Ok(Message::Abort { reason }) => Err(reason),
                m => panic!("answer {m:?}"),
            },
            other => panic!("answer {other:?}"),
        }
    }

    fn protection(&mut self, vm_id: &str, generation: u64) {
        let p = Protection {
            vm_id: vm_id.into(),
            generation,
            heartbeat_ms: 50,
        };
        self.conn
            .send_frame(hb_kind::PROTECTION, &postcard::to_stdvec(&p).unwrap())
            .unwrap();
    }

    fn log(&mut self, bytes: &[u8]) {
        self.conn
            .send_msg(&Message::LogBytes(bytes.to_vec()))
            .unwrap();
    }

    /// Read what the secondary sends until it refuses the stream: its
    /// reason (an `Abort`, or the reason the connection was closed with).
    fn refusal(&mut self) -> String {
        let start = Instant::now();
        while start.elapsed() < TIMEOUT {
            match self.conn.recv_frame_timeout(Duration::from_millis(100)) {
                Ok(Some((chan_kind::MESSAGE, p))) => match postcard::from_bytes::<Message>(&p) {
                    Ok(Message::Abort { reason }) => return reason,
                    m => panic!("message {m:?}"),
                },
                // Acknowledgements, heartbeats: the secondary took bytes.
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
        panic!("the secondary never refused the stream");
    }
}

/// A real record log of `busy 3000` and the offsets its frames end at.
fn real_log(dir: &TempDir) -> (Vec<u8>, Vec<u64>) {
    let path = dir.s("real.log");
    let (st, _, err) = run_tandem(&["record", "--cmdline", "busy 3000", "--log", &path]);
    assert_eq!(st, 0, "{err}");
    let bytes = std::fs::read(&path).unwrap();
    let (mut r, _) = recordlog::LogReader::open(std::io::Cursor::new(bytes.clone())).unwrap();
    let mut ends = vec![r.offset()];
    while r.next_entry().unwrap().is_some() {
        if ends.last() != Some(&r.offset()) {
            ends.push(r.offset());
        }
    }
    assert!(ends.len() > 8, "too few frames: {}", ends.len());
    (bytes, ends)
}

/// A secondary with an arbiter (it could go live) and a long failover
/// timeout (a refusal is not a lost primary).
fn secondary(pki: &Pki, dir: &TempDir) -> (Proc, String) {
    let arbiter = format!("file:{}", dir.s("arbiter"));
    std::fs::create_dir_all(dir.s("arbiter")).unwrap();
    cluster::secondary(
        &[],
        "127.0.0.1:0",
        &pki.creds("sec"),
        &[
            "--arbiter",
            &arbiter,
            "--failover-timeout-ms",
            "60000",
            "--log",
            &dir.s("received.log"),
        ],
    )
}

/// The secondary stopped on `reason` without going live or finishing.
fn refused(sec: Proc, dir: &TempDir, reason: &str, want: &str) -> String {
    let (status, _, err) = sec.finish();
    assert!(reason.contains(want), "primary got {reason:?}\n{err}");
    assert_ne!(status, 0, "the secondary took the stream\n{err}");
    assert!(err.contains(want), "{err}");
    assert!(!err.contains("final state digest"), "{err}");
    assert!(!err.contains("replay verified"), "{err}");
    assert!(!err.contains("the primary is lost"), "{err}");
    let claims = cluster::file_claims(&dir.file("arbiter"));
    assert!(
        claims.is_empty(),
        "the secondary asked the arbiter: {claims:?}\n{err}"
    );
    err
}

fn protected_stream(tag: &str) -> (Pki, TempDir, Proc, FakePrimary, Vec<u8>, Vec<u64>) {
    let pki = Pki::new(&["pri", "sec"], &[]);
    let dir = TempDir::new(tag);
    let (log, ends) = real_log(&dir);
    let (sec, addr) = secondary(&pki, &dir);
    let mut p = FakePrimary::connect(&addr, &pki);
    p.offer(LOCKSTEP_VERSION).unwrap();
    p.protection("0123abcd", 1);
    (pki, dir, sec, p, log, ends)
}

/// The middle frame of a real log, damaged by `damage` (the log, where
/// the frame starts and ends: the chunks to send), is refused by offset.
fn a_damaged_frame_is_refused(tag: &str, damage: fn(Vec<u8>, usize, usize) -> Vec<Vec<u8>>) {
    let (_pki, dir, sec, mut p, log, ends) = protected_stream(tag);
    let k = ends.len() / 2;
    let (start, end) = (ends[k] as usize, ends[k + 1] as usize);
    for chunk in damage(log, start, end) {
        p.log(&chunk);
    }
    let reason = p.refusal();
    refused(
        sec,
        &dir,
        &reason,
        &format!("corrupt log entry at byte offset {start}"),
    );
}

#[test]
fn a_corrupt_frame_mid_stream_is_refused() {
    // Good frames first, then one whose CRC is wrong, then the rest.
    a_damaged_frame_is_refused("refuse-corrupt", |mut log, start, end| {
        log[end - 1] ^= 0x5a;
        vec![log[..start].to_vec(), log[start..].to_vec()]
    });
}

#[test]
fn a_truncated_frame_mid_stream_is_refused() {
    // The frame loses its last 3 bytes; the stream goes on.
    a_damaged_frame_is_refused("refuse-cut", |log, _, end| {
        vec![log[..end - 3].to_vec(), log[end..].to_vec()]
    });
}

#[test]
fn a_stream_that_changes_its_vm_is_refused() {
    let (_pki, dir, sec, mut p, log, ends) = protected_stream("refuse-vm");
    let half = ends[ends.len() / 2] as usize;
    p.log(&log[..half]);
    p.protection("ffff0000", 1);
    p.log(&log[half..]);
    let reason = p.refusal();
    refused(sec, &dir, &reason, "a log stream of another VM");
}

/// The primary's chunk times (how far the log reaches: exit and guest
/// time) never go back; one that does is refused, naming both.
#[test]
fn a_chunk_time_that_goes_back_is_refused() {
    let (_pki, dir, sec, mut p, log, ends) = protected_stream("refuse-chunk-time");
    let (a, b) = (ends[ends.len() / 3] as usize, ends[ends.len() / 2] as usize);
    let time = |p: &mut FakePrimary, exit, guest_us| {
        let t = ChunkTime { exit, guest_us };
        p.conn.send_frame(kind::CHUNK_TIME, &t.encode()).unwrap();
    };
    p.log(&log[..a]);
    time(&mut p, 100, 5000);
    p.log(&log[a..b]);
    time(&mut p, 99, 6000);
    let reason = p.refusal();
    refused(
        sec,
        &dir,
        &reason,
        "a bad chunk time from the primary: the log goes back: it reached exit 100 at 5000 µs, now exit 99 at 6000 µs",
    );
}

#[test]
fn a_log_stream_that_is_not_a_log_is_refused() {
    let (_pki, dir, sec, mut p, _, _) = protected_stream("refuse-garbage");
    p.log(&common::noise(4096, 7));
    let reason = p.refusal();
    refused(sec, &dir, &reason, "not a Tandem log");
}

#[test]
fn an_older_lockstep_protocol_is_refused() {
    let pki = Pki::new(&["pri", "sec"], &[]);
    let dir = TempDir::new("refuse-version");
    let (sec, addr) = secondary(&pki, &dir);
    let mut p = FakePrimary::connect(&addr, &pki);
    let reason = p.offer(LOCKSTEP_VERSION - 1).unwrap_err();
    assert!(
        reason.contains(&format!(
            "lockstep protocol version {} (this secondary speaks {LOCKSTEP_VERSION})",
            LOCKSTEP_VERSION - 1
        )),
        "{reason}"
    );
    drop(sec);
}

/// A primary and a secondary given different arbiters (two directories, as
/// when one host mounts the wrong share) could each win a partition and
/// both go live: the secondary refuses the VM before anything runs, naming
/// both arbiters.
#[test]
fn a_primary_with_another_arbiter_is_refused() {
    let pki = Pki::new(&["pri", "sec"], &[]);
    let dir = TempDir::new("arbmismatch");
    let (a, b) = (dir.file("arb-a"), dir.file("arb-b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let (sa, sb) = (
        format!("file:{}", common::arg(&a)),
        format!("file:{}", common::arg(&b)),
    );
    let (_sec, addr) = cluster::loopback_secondary(&pki.creds("sec"), &["--arbiter", &sb]);
    let pri =
        cluster::protected_primary(&[], "hello", &addr, &pki.creds("pri"), &["--arbiter", &sa]);
    let (code, out, err) = pri.finish();
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("both go live") && err.contains("--arbiter"),
        "{err}"
    );
    assert!(!out.contains("RESULT"), "the VM ran: {out}");
    // The same directory reached by another path is the same arbiter.
    let link = dir.file("arb-b-link");
    std::os::unix::fs::symlink(&b, &link).unwrap();
    let sl = format!("file:{}", common::arg(&link));
    let (sec, addr) = cluster::loopback_secondary(&pki.creds("sec"), &["--arbiter", &sb]);
    let pri =
        cluster::protected_primary(&[], "hello", &addr, &pki.creds("pri"), &["--arbiter", &sl]);
    let (code, _, err) = pri.finish();
    assert_eq!(code, 0, "{err}");
    let (code, _, serr) = sec.finish();
    assert_eq!(code, 0, "{serr}");
}
