//! How closely a secondary follows its primary (issue 8, docs/lockstep.md
//! "Lag"): progress marks let an idle guest's secondary replay up to the
//! exit where the primary idles, not only to its last logged event.

mod common;

use std::time::Duration;

use common::cluster::{self, status, Pki, Proc};
use common::TempDir;
use recordlog::{Entry, LogReader};

/// The entries of a log file that may still be growing (read up to its
/// last complete frame).
fn entries(path: &str) -> Vec<Entry> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let Ok((mut r, _)) = LogReader::open(&bytes[..]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Ok(Some(e)) = r.next_entry() {
        out.push(e);
    }
    out
}

/// Start the protected primary `args` (without credentials) with the
/// credentials of "pri", and wait for its control socket `sock`.
fn primary_on(args: Vec<&str>, pki: &Pki, sock: &str) -> Proc {
    let creds = pki.creds("pri");
    let mut args: Vec<&str> = args;
    let more: Vec<&str> = creds.iter().map(String::as_str).collect();
    args.extend(more);
    let mut pri = Proc::spawn(&[], &args);
    pri.wait_until("the control socket", || std::path::Path::new(sock).exists());
    pri
}

/// A secondary with a control socket and its received log kept, that
/// takes no silence for a failover (the tests stop one side on purpose):
/// (the process, its address, its socket, its log).
fn watched_secondary(dir: &TempDir, pki: &Pki) -> (Proc, String, String, String) {
    let (sec_sock, sec_log) = (dir.s("sec.sock"), dir.s("sec.log"));
    let (sec, addr) = cluster::secondary(
        &[],
        "127.0.0.1:0",
        &pki.creds("sec"),
        &[
            "--api-socket",
            &sec_sock,
            "--log",
            &sec_log,
            "--failover-timeout-ms",
            "600000",
        ],
    );
    (sec, addr, sec_sock, sec_log)
}

/// The `echo` guest idles in HLT between timer ticks once it said `echo
/// ready`: before each idle wait the primary logs a progress mark at the
/// exit it idles at, after the tick's last event. Stopped there (SIGSTOP,
/// nothing more is logged), the primary leaves the secondary with a log
/// whose last entry is such a mark, and the secondary replays exactly up
/// to the mark's exit: past its last event, never past what the log covers.
#[test]
fn an_idle_guest_s_secondary_replays_up_to_the_primary_s_exit() {
    let dir = TempDir::new("lag-idle");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let (sec, addr, sec_sock, sec_log) = watched_secondary(&dir, &pki);
    let console = dir.s("pri.txt");
    let serial = format!("file:{console}");
    let mut args = vec![
        "run",
        "--cmdline",
        "echo",
        "--serial",
        &serial,
        "--protect-to",
        &addr,
        // The primary is stopped on purpose: not a failover.
        "--failover-timeout-ms",
        "600000",
    ];
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    let mut pri = Proc::spawn(&[], &args);
    pri.wait_until("echo ready on the console", || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("echo ready")
    });
    // Stop the primary until what the secondary received ends with a mark
    // (it idles most of the time; a stop during a tick's events is retried).
    let mut tries = 0;
    let (mark, last_event, s) = loop {
        tries += 1;
        assert!(tries <= 20, "never stopped at a mark\n{}", pri.describe());
        pri.signal(libc::SIGSTOP);
        // Let what was sent arrive and be replayed: the received log and
        // the replay stand still.
        let mut last = (0, u64::MAX);
        let s = loop {
            std::thread::sleep(Duration::from_millis(100));
            let s = status(&sec_sock);
            let now = (
                std::fs::metadata(&sec_log).map(|m| m.len()).unwrap_or(0),
                s["protection"]["replayed_exit"].as_u64().unwrap_or(0),
            );
            if now == last {
                break s;
            }
            last = now;
        };
        let es = entries(&sec_log);
        let last_event = es
            .iter()
            .rev()
            .find(|e| !matches!(e, Entry::Progress { .. }))
            .map(Entry::exit_seq)
            .unwrap_or(0);
        if let Some(&Entry::Progress { exit_seq }) = es.last() {
            if exit_seq > last_event {
                break (exit_seq, last_event, s);
            }
        }
        pri.signal(libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        s["protection"]["replayed_exit"].as_u64(),
        Some(mark),
        "the secondary is not at the primary's exit {mark} (its last event at {last_event}): {s}"
    );
    assert_eq!(s["protection"]["lag_exits"].as_u64(), Some(0), "{s}");
    pri.signal(libc::SIGKILL);
    sec.signal(libc::SIGKILL);
}

/// A secondary that falls behind (SIGSTOPped) does not grow the primary's
/// buffers without bound: past the lag bound the primary slows its vCPU
/// and says so in `tandem status`, its log queue stays under its bound, and
/// once the secondary runs again the vCPU is back at full speed and the
/// run ends verified on both sides.
#[test]
fn a_stopped_secondary_slows_the_primary_within_its_bounds() {
    let dir = TempDir::new("lag-bound");
    let pki = Pki::new(&["pri", "sec"], &[]);
    // Stopped on purpose: neither side takes the silence for a failure.
    let (sec, addr) = cluster::secondary(
        &[],
        "127.0.0.1:0",
        &pki.creds("sec"),
        &["--failover-timeout-ms", "600000"],
    );
    let sock = dir.s("pri.sock");
    let args = vec![
        "run",
        "--cmdline",
        "fill 4 400 1",
        "--api-socket",
        &sock,
        "--protect-to",
        &addr,
        "--lag-bound-ms",
        "100",
        "--log-queue-kib",
        "256",
        // The secondary is stopped on purpose: not a failover.
        "--failover-timeout-ms",
        "600000",
    ];
    let pri = primary_on(args, &pki, &sock);
    let bound = |s: &serde_json::Value| s["protection"]["bound"].clone();
    cluster::wait_status(&sock, "the log streaming", |s| {
        bound(s)["lag_samples"].as_u64() > Some(5)
    });
    sec.signal(libc::SIGSTOP);
    let slowed = cluster::wait_status(&sock, "the primary slowed", |s| {
        bound(s)["slowed"] == true && bound(s)["throttle_pct"].as_u64() >= Some(40)
    });
    let b = bound(&slowed);
    assert_eq!(b["lag_bound_ms"].as_u64(), Some(100), "{slowed}");
    assert!(b["lag_now_ms"].as_f64().unwrap() > 100.0, "{slowed}");
    // The text form says so too.
    let (_, text, _) = cluster::run_tandem(&["status", "--api", &sock]);
    assert!(text.contains("vCPU SLOWED"), "{text}");
    // Held while stopped: the guest ran less than it would have.
    let held = cluster::wait_status(&sock, "the vCPU held", |s| {
        bound(s)["held_ms"].as_f64() > Some(100.0)
    });
    let queue_bound = 256 << 10;
    for s in [&slowed, &held] {
        let b = bound(s);
        assert_eq!(b["queue_bound_bytes"].as_u64(), Some(queue_bound), "{s}");
        assert!(b["queue_bytes"].as_u64().unwrap() <= queue_bound, "{s}");
        assert!(
            b["queue_high_water_bytes"].as_u64().unwrap() <= queue_bound,
            "{s}"
        );
    }
    sec.signal(libc::SIGCONT);
    cluster::wait_status(&sock, "full speed again", |s| {
        bound(s)["slowed"] == false && bound(s)["throttle_pct"].as_u64() == Some(0)
    });
    let (status, out, pri_err) = pri.finish();
    let (sec_status, _, sec_err) = sec.finish();
    let both = format!("--- primary ---\n{pri_err}\n--- secondary ---\n{sec_err}");
    assert_eq!((status, sec_status), (0, 0), "{both}");
    assert!(common::result_line(&out).is_some(), "{out}");
    assert!(pri_err.contains("slowing this VM's vCPU"), "{both}");
    assert!(pri_err.contains("caught up"), "{both}");
    assert_eq!(
        cluster::final_digest(&pri_err),
        cluster::final_digest(&sec_err),
        "{both}"
    );
}

/// The secondary's own status measures its lag against what it has
/// received (the primary's chunk times: the exit and the guest time the
/// received log reaches), not against what its replayer has read. Stopped
/// (SIGSTOP) while the primary runs on unslowed, the secondary receives the
/// backlog at once when it runs again and replays it afterwards: asked at
/// once, it shows itself behind by many exits and by the guest time
/// between, never beyond what it received nor more than the primary ran;
/// once it caught up (the `fill` guest idles a tick every round, the
/// primary marks it), 0 and 0.
#[test]
fn a_stopped_secondary_s_own_status_shows_its_lag() {
    let dir = TempDir::new("lag-own");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let (sec, addr, sec_sock, sec_log) = watched_secondary(&dir, &pki);
    let sock = dir.s("pri.sock");
    let args = vec![
        "run",
        "--cmdline",
        "fill 4 100000 1",
        "--api-socket",
        &sock,
        "--protect-to",
        &addr,
        // The primary runs on at full speed while its secondary is stopped.
        "--lag-bound-ms",
        "0",
        "--failover-timeout-ms",
        "600000",
    ];
    let pri = primary_on(args, &pki, &sock);
    let mut sec = sec;
    sec.wait_until("the secondary's control socket", || {
        std::path::Path::new(&sec_sock).exists()
    });
    let p = |s: &serde_json::Value| s["protection"].clone();
    let num = |s: &serde_json::Value, k: &str| p(s)[k].as_u64().unwrap_or(0);
    cluster::wait_status(&sec_sock, "the secondary replaying", |s| {
        p(s)["state"] == "replaying" && num(s, "replayed_exit") > num(s, "start_exit")
    });
    // Stop the secondary until the primary ran `gap` exits past it, then
    // ask it at once; a replay that caught up before the answer (this host
    // is loaded) is stopped again for longer.
    let mut gap = 2000;
    let behind = loop {
        assert!(
            gap <= 32000,
            "the secondary never showed its lag\n{}",
            pri.describe()
        );
        let from = num(&status(&sec_sock), "replayed_exit");
        sec.signal(libc::SIGSTOP);
        let stopped = std::time::Instant::now();
        cluster::wait_status(&sock, "the primary running on", |s| {
            s["exit_seq"].as_u64() >= Some(from + gap)
        });
        sec.signal(libc::SIGCONT);
        let s = status(&sec_sock);
        let ran_us = stopped.elapsed().as_secs_f64() * 1e6;
        if num(&s, "lag_exits") >= 100 {
            break (s, ran_us);
        }
        gap *= 2;
    };
    let (s, ran_us) = behind;
    let (exit, replayed, lag) = (
        num(&s, "exit_seq"),
        num(&s, "replayed_exit"),
        num(&s, "lag_exits"),
    );
    let lag_us = p(&s)["lag_us"].as_f64().unwrap();
    assert_eq!(exit, replayed + lag, "{s}");
    // What it reaches was received: the kept log (written before the
    // chunk's time is taken) holds an entry at that exit.
    let received = entries(&sec_log);
    assert!(
        received.iter().any(|e| e.exit_seq() == exit),
        "the secondary says the log reaches exit {exit}, its kept log does not (last {:?}): {s}",
        received.last()
    );
    // Guest time behind: more than a millisecond (100 exits of `fill` are
    // several ticks), less than the primary ran since the stop plus its lag
    // before it.
    assert!(lag_us > 1000.0, "{s}");
    assert!(
        lag_us < ran_us + 1e6,
        "{lag_us} µs behind after {ran_us} µs: {s}"
    );
    eprintln!("the secondary behind: {lag} exits, {lag_us} µs (stopped {ran_us} µs)");
    // Caught up: the replay stands where the received log ends.
    cluster::wait_status(&sec_sock, "the secondary caught up", |s| {
        num(s, "exit_seq") > exit
            && num(s, "lag_exits") == 0
            && p(s)["lag_us"].as_f64() == Some(0.0)
    });
    pri.signal(libc::SIGKILL);
    sec.signal(libc::SIGKILL);
}
