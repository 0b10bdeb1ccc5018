//! How closely a secondary follows its primary (issue 8, docs/lockstep.md
//! "Lag"): progress marks let an idle guest's secondary replay up to the
//! exit where the primary idles, not only to its last logged event.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{self, status, Pki, Proc};
use common::{TempDir, TIMEOUT};
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
    let (sec_sock, sec_log) = (dir.s("sec.sock"), dir.s("sec.log"));
    let (sec, addr) = cluster::secondary(
        &[],
        "127.0.0.1:0",
        &pki.creds("sec"),
        &["--api-socket", &sec_sock, "--log", &sec_log],
    );
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
    let start = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("echo ready")
    {
        assert!(
            start.elapsed() < TIMEOUT && !pri.ended(),
            "{}",
            pri.describe()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
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
