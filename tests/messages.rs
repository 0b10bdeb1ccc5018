//! What a user reads on stderr when something fails: each failure once
//! per process (not once per layer that saw it), and no ANSI colour codes
//! when stderr is not a terminal.

mod common;

use std::time::Instant;

use common::cluster::{migrate, receiver, run_tandem, source, Pki, Proc};
use common::{TempDir, TIMEOUT};

/// `needle` occurs exactly once in `text`, which has no escape byte.
#[track_caller]
fn once(text: &str, needle: &str, what: &str) {
    let n = text.matches(needle).count();
    assert_eq!(n, 1, "{what}: {needle:?} printed {n} times:\n{text}");
    assert!(
        !text.contains('\x1b'),
        "{what}: ANSI escape codes:\n{text:?}"
    );
}

/// Poll `tandem status` until the VM is in pre-copy.
fn wait_precopy(sock: &str) {
    let start = Instant::now();
    while !run_tandem(&["status", "--api", sock]).1.contains("precopy") {
        assert!(start.elapsed() < TIMEOUT, "never saw pre-copy");
    }
}

/// Migrate to a destination of another CA, the source and the receiver
/// started with `prefix`; returns the stderr of `migrate`, the source and
/// the receiver.
fn wrong_ca(prefix: &[&str]) -> (String, String, String) {
    let pki = Pki::new(&["a", "b"], &[]);
    let other = Pki::new(&["a"], &[]);
    let tmp = TempDir::new("msg-ca");
    let sock = tmp.s("a.sock");
    let (mut dst, addr) = receiver(
        prefix,
        "127.0.0.1:0",
        &pki.creds("b"),
        &["--serial", "null"],
    );
    let mut src = source(prefix, &sock, "ticks 100000", &["--serial", "null"]);
    let (code, _, err) = migrate(&sock, &addr, &other.creds("a"), &[]);
    assert_eq!(code, 1, "{err}");
    dst.wait_for("refused a connection", true);
    src.wait_for("keeps running here", true);
    (err, src.err(), dst.err())
}

/// A destination with another CA: `migrate`, the source and the receiver
/// each say so once.
#[test]
fn wrong_ca_is_reported_once_by_each_process() {
    let (mig, src, dst) = wrong_ca(&[]);
    once(&mig, "UnknownIssuer", "tandem migrate");
    once(&mig, "keeps running", "tandem migrate");
    once(&src, "UnknownIssuer", "the source");
    once(&dst, "UnknownIssuer", "the receiver");
}

/// Tracing output into a pipe has no colour codes (it had them before:
/// `ESC[33m WARN`).
#[test]
fn no_ansi_codes_in_a_pipe() {
    let (_, src, dst) = wrong_ca(&["env", "TANDEM_LOG=debug"]);
    for (what, err) in [("the source", src), ("the receiver", dst)] {
        assert!(
            err.contains("DEBUG"),
            "{what}: no tracing output to check:\n{err}"
        );
        assert!(!err.contains('\x1b'), "{what}: ANSI escape codes:\n{err:?}");
    }
}

/// The destination dies mid-migration: `migrate` and the source each
/// report it once.
#[test]
fn lost_destination_is_reported_once() {
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("msg-gone");
    let sock = tmp.s("a.sock");
    let (mut dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &["--serial", "null"]);
    let mut src = source(&[], &sock, "dirty 256 1000000", &["--serial", "null"]);
    let s2 = sock.clone();
    let killer = std::thread::spawn(move || {
        wait_precopy(&s2);
        let _ = dst.child.kill();
        dst
    });
    // Slow enough that pre-copy is still running when it is killed.
    let (code, _, err) = migrate(&sock, &addr, &pki.creds("a"), &["--max-bandwidth", "20000"]);
    drop(killer.join().unwrap());
    assert_eq!(code, 1, "{err}");
    once(&err, "lost the destination", "tandem migrate");
    src.wait_for("keeps running here", true);
    once(&src.err(), "lost the destination", "the source");
    once(&src.err(), "failed", "the source");
}

/// The source dies mid-migration: the receiver reports it once.
#[test]
fn lost_source_is_reported_once_by_the_receiver() {
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("msg-src");
    let sock = tmp.s("a.sock");
    let (mut dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &["--serial", "null"]);
    let mut src = source(&[], &sock, "dirty 256 1000000", &["--serial", "null"]);
    let mut args = vec![
        "migrate",
        "--api",
        &sock,
        "--to",
        &addr,
        "--max-bandwidth",
        "20000",
    ];
    let creds = pki.creds("a");
    args.extend(creds.iter().map(String::as_str));
    let mig = Proc::spawn(&[], &args);
    wait_precopy(&sock);
    let _ = src.child.kill();
    let (code, _, err) = mig.finish();
    assert_eq!(code, 1, "{err}");
    once(&err, "closed without a result", "tandem migrate");
    dst.wait_for("waiting for another", true);
    once(&dst.err(), "failed", "the receiver");
}
