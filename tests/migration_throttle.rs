//! What the guest and the operator live through during a migration:
//! auto-converge as a duty cycle (the guest keeps running while throttled
//! and is back to full speed the moment a migration fails), the throttled
//! time in the summary, a paused VM arriving paused, progress during a long
//! round, and Ctrl-C on `tandem migrate`.
//!
//! The guest's speed is measured by its own events: the `dirty` workload's
//! `round K` lines. Speeds are only compared with an unthrottled baseline
//! taken in the same run, with generous factors, and the throttled phase
//! only has to show progress at all: a loaded host cannot fail these tests,
//! a frozen guest does.

mod common;

use std::time::Instant;

use common::cluster::{
    receiver, reference, run_ok, source, start_migrate, status, wait_status, Pki, Proc,
};
use common::TempDir;
use serde_json::Value;

/// A guest that outlives every test here (killed when the test ends).
const LONG: &str = "dirty 256 10000000";
/// Where the receivers listen.
const LOOPBACK: &str = "127.0.0.1:0";
/// Rounds timed for a speed measurement.
const SAMPLE: u64 = 100;

fn throttle_pct(s: &Value) -> u64 {
    s["migration"]["throttle_pct"].as_u64().unwrap_or(0)
}

/// The `round K` numbers of a console's complete lines, in order.
fn round_numbers(console: &str) -> Vec<u64> {
    console
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n')?.strip_prefix("round ")?.parse().ok())
        .collect()
}

/// The guest's console continues at the destination where it stopped at
/// the source: every round once, in order (a line may be split between
/// the two).
#[track_caller]
fn continues(src_out: &str, dst: &mut Proc) {
    let last = *round_numbers(src_out)
        .last()
        .expect("source printed rounds");
    dst.wait_round(last + 2);
    let rounds = round_numbers(&format!("{src_out}{}", dst.out()));
    let want: Vec<u64> = (1..=rounds.len() as u64).collect();
    assert_eq!(rounds, want, "{}", dst.describe());
}

#[test]
fn throttled_guest_keeps_running_and_is_at_full_speed_right_after_a_failed_migration() {
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("throttle-fail");
    let sock = tmp.s("a.sock");
    let (dst, addr) = receiver(&[], LOOPBACK, &pki.creds("b"), &[]);
    let mut src = source(&[], &sock, LONG, &[]);
    src.wait_round(20);
    let base = src.time_rounds(SAMPLE);
    // No round can meet a 0 ms target and the link is slow: rounds go on
    // and auto-converge steps up to 99 %.
    let mig = start_migrate(
        &sock,
        &addr,
        &pki.creds("a"),
        &["--downtime-ms", "0", "--max-bandwidth", "50000"],
    );
    // At the highest throttle a lingering one would make the guest 100
    // times slower: far outside the noise of a loaded host (seen: 3x).
    let s = wait_status(&sock, "auto-converge at 99 %", |s| throttle_pct(s) >= 99);
    // The destination dies; the source waits for it (its idle timeout)
    // with the guest throttled all along, then gives up.
    drop(dst);
    let (r0, t0) = (src.rounds(), Instant::now());
    let (code, out, err) = mig.finish();
    let (during, window) = (src.rounds() - r0, t0.elapsed());
    assert_eq!(code, 1, "the migration must fail\n{out}\n{err}");
    assert!(err.contains("lost the destination"), "{err}");
    assert!(err.contains("the VM keeps running on the source"), "{err}");
    assert!(
        during > 0,
        "the guest made no progress in {window:?} throttled at {}%\n{}",
        throttle_pct(&s),
        src.describe()
    );
    // Right after the failure: no throttle left (1 % speed if it were).
    let after = src.time_rounds(SAMPLE);
    eprintln!(
        "{SAMPLE} rounds: {base:?} before, {after:?} after the failure; {during} rounds in {window:?} throttled at {}%",
        throttle_pct(&s)
    );
    assert!(
        after < base * 10,
        "{SAMPLE} rounds took {after:?} after the failure, {base:?} before the migration"
    );
    let s = status(&sock);
    assert_eq!(s["state"], "running", "{s}");
    assert!(s["migration"].is_null(), "{s}");
}

#[test]
fn throttled_migration_counts_the_throttled_time_and_the_guest_goes_on_there() {
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("throttle-ok");
    let sock = tmp.s("a.sock");
    let (mut dst, addr) = receiver(&[], LOOPBACK, &pki.creds("b"), &[]);
    let mut src = source(&[], &sock, LONG, &[]);
    src.wait_round(20);
    let mig = start_migrate(
        &sock,
        &addr,
        &pki.creds("a"),
        &["--downtime-ms", "0", "--max-bandwidth", "50000", "--json"],
    );
    let (code, out, err) = mig.finish();
    assert_eq!(code, 0, "{out}\n{err}\n{}", src.describe());
    let done: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(done["event"], "done", "{out}");
    let throttled = done["throttled_ms"].as_f64().unwrap();
    let total = done["total_ms"].as_f64().unwrap();
    assert!(done["max_throttle_pct"].as_u64().unwrap() >= 60, "{done}");
    assert!(
        throttled > 0.0 && throttled < total,
        "throttled {throttled} ms of {total} ms: {done}"
    );
    // The target cannot be met on any link: said up front.
    let first: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let note = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["note"].as_str().map(str::to_string));
    assert!(
        note.as_deref().is_some_and(|n| n.contains("cannot be met")),
        "{first}\n{out}"
    );
    let (scode, sout, serr) = src.finish();
    assert_eq!(scode, 0, "{serr}");
    continues(&sout, &mut dst);
}

#[test]
fn paused_vm_arrives_paused() {
    let cmdline = "dirty 256 300";
    let expected = reference(cmdline, None);
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("paused");
    let (sock, dsock) = (tmp.s("a.sock"), tmp.s("b.sock"));
    let (mut dst, addr) = receiver(&[], LOOPBACK, &pki.creds("b"), &["--api-socket", &dsock]);
    let mut src = source(&[], &sock, cmdline, &[]);
    src.wait_round(20);
    assert_eq!(run_ok(&["pause", "--api", &sock]), "paused\n");
    let (code, out, err) = start_migrate(&sock, &addr, &pki.creds("a"), &[]).finish();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("arrived paused"), "{out}");
    let (scode, sout, serr) = src.finish();
    assert_eq!(scode, 0, "{serr}");
    dst.wait_for("stays paused", true);
    let s = status(&dsock);
    assert_eq!(s["state"], "paused", "{s}");
    assert_eq!(dst.out(), "", "the guest ran while paused");
    assert_eq!(run_ok(&["resume", "--api", &dsock]), "running\n");
    let (dcode, dout, derr) = dst.finish();
    assert_eq!(dcode, 0, "{derr}");
    assert_eq!(format!("{sout}{dout}"), expected);
}

#[test]
fn paused_vm_is_not_sent_to_a_receiver_that_cannot_resume_it() {
    let cmdline = "dirty 256 300";
    let expected = reference(cmdline, None);
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("paused-noapi");
    let sock = tmp.s("a.sock");
    let (dst, addr) = receiver(&[], LOOPBACK, &pki.creds("b"), &[]);
    let mut src = source(&[], &sock, cmdline, &[]);
    src.wait_round(20);
    run_ok(&["pause", "--api", &sock]);
    let (code, out, err) = start_migrate(&sock, &addr, &pki.creds("a"), &[]).finish();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("no --api-socket"), "{err}");
    assert!(err.contains("the VM stays paused on the source"), "{err}");
    assert!(!err.contains("keeps running"), "{err}");
    let s = status(&sock);
    assert_eq!(s["state"], "paused", "{s}");
    src.wait_for("stays paused here", true);
    run_ok(&["resume", "--api", &sock]);
    let (scode, sout, serr) = src.finish();
    assert_eq!(scode, 0, "{serr}");
    assert_eq!(sout, expected);
    drop(dst);
}

/// `sent N KiB` of a plain progress line.
fn sent_kib(line: &str) -> Option<f64> {
    let rest = line.split("sent").nth(1)?.trim_start();
    let (n, unit) = rest.split_once(' ')?;
    let n: f64 = n.parse().ok()?;
    Some(if unit.starts_with("MiB") {
        n * 1024.0
    } else {
        n
    })
}

#[test]
fn progress_during_a_long_round_and_ctrl_c_cancels_cleanly() {
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("ctrl-c");
    let sock = tmp.s("a.sock");
    let (mut dst, addr) = receiver(&[], LOOPBACK, &pki.creds("b"), &[]);
    // 4096 pages to send in round 0, at 20 kB/s: a round of seconds.
    let mut src = source(&[], &sock, "dirty 4096 10000000", &[]);
    src.wait_round(2);
    let mut mig = start_migrate(&sock, &addr, &pki.creds("a"), &["--max-bandwidth", "20000"]);
    // Progress lines during round 0, with the bytes moving.
    let start = Instant::now();
    let sent = loop {
        let sent: Vec<f64> = mig
            .out()
            .lines()
            .filter(|l| l.contains("precopy round  0"))
            .filter_map(sent_kib)
            .collect();
        if sent.len() >= 3 && sent.last() > sent.first() {
            break sent;
        }
        assert!(
            !mig.ended() && start.elapsed() < common::TIMEOUT,
            "no progress during round 0\n{}",
            mig.describe()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert_eq!(status(&sock)["migration"]["round"], 0, "{sent:?}");
    mig.signal(libc::SIGINT);
    let (code, out, err) = mig.finish();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("migration cancelled; the VM keeps running on the source"),
        "{err}"
    );
    // The source runs on, unthrottled and not migrating.
    let s = wait_status(&sock, "the end of the migration", |s| {
        s["migration"].is_null()
    });
    assert_eq!(s["state"], "running", "{s}");
    let r = src.rounds();
    src.wait_round(r + 2);
    // The destination dropped the transfer and takes the next one.
    dst.wait_for("cancelled by the operator", true);
    assert!(!dst.ended(), "{}", dst.describe());
    let (code, out, err) = start_migrate(&sock, &addr, &pki.creds("a"), &[]).finish();
    assert_eq!(code, 0, "{out}\n{err}\n{}", src.describe());
    let (scode, sout, serr) = src.finish();
    assert_eq!(scode, 0, "{serr}");
    continues(&sout, &mut dst);
}

#[test]
fn a_guest_that_ends_mid_migration_is_reported_once_and_clearly() {
    let cmdline = "dirty 256 300";
    let expected = reference(cmdline, None);
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("ends");
    let sock = tmp.s("a.sock");
    let (mut dst, addr) = receiver(&[], LOOPBACK, &pki.creds("b"), &[]);
    let mut src = source(&[], &sock, cmdline, &[]);
    src.wait_round(20);
    // Round 0 takes seconds at 2 kB/s; the guest's last 280 rounds do not.
    let (code, out, err) =
        start_migrate(&sock, &addr, &pki.creds("a"), &["--max-bandwidth", "2000"]).finish();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("the guest ended on the source before the switchover"),
        "{err}"
    );
    assert_eq!(err.matches("failed").count(), 1, "{err}");
    let (scode, sout, serr) = src.finish();
    assert_eq!(scode, 0, "{serr}");
    assert_eq!(sout, expected);
    dst.wait_for("failed", true);
    assert!(!dst.ended(), "the receiver waits for the next VM");
}
