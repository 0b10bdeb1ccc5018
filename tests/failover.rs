//! Failover (issue 10), over loopback: heartbeats, the file arbiter,
//! go-live of the secondary, a primary that loses its secondary, and the
//! fences that keep two copies from being live. Every wait is bounded by a
//! guest event or a process's message; the only fixed time is the failover
//! timeout itself.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{make_disk, run_tandem, secondary, Pki, Proc};
use common::{result_line, TempDir, TIMEOUT};

/// Heartbeat and timeout of these tests: the defaults (the tests run
/// beside each other on a loaded host; a shorter timeout failed over
/// falsely there once).
const TIMING: [&str; 4] = ["--heartbeat-ms", "50", "--failover-timeout-ms", "1000"];

/// A guest point to fail at: round 5..=(5+span) chosen from the clock.
fn random_round(span: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    5 + n % span
}

fn rounds(text: &str) -> usize {
    text.matches("round ").count()
}

/// Send `sig` to `p`.
fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill(2) on a child this test spawned.
    assert_eq!(unsafe { libc::kill(p.child.id() as i32, sig) }, 0);
}

/// Wait (bounded by TIMEOUT) until `cond` holds.
#[track_caller]
fn wait_until(what: &str, p: &mut Proc, mut cond: impl FnMut(&Proc) -> bool) {
    let start = Instant::now();
    while !cond(p) {
        if let Ok(Some(st)) = p.child.try_wait() {
            std::thread::sleep(Duration::from_millis(50));
            if cond(p) {
                return;
            }
            panic!("ended ({st}) while waiting for {what}\n{}", p.describe());
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "timed out: {what}\n{}",
            p.describe()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `before` (the old primary's console) followed by `after` (the new
/// primary's), with the lines produced again at the boundary counted once.
fn joined(before: &str, after: &str) -> String {
    let b: Vec<&str> = before.lines().collect();
    let a: Vec<&str> = after.lines().collect();
    let overlap = (0..=b.len().min(a.len()))
        .rev()
        .find(|&k| b[b.len() - k..] == a[..k])
        .unwrap_or(0);
    let mut all: Vec<&str> = b.clone();
    all.extend_from_slice(&a[overlap..]);
    all.iter().map(|l| format!("{l}\n")).collect()
}

/// A protected pair over loopback with one arbiter directory.
struct Pair {
    dir: TempDir,
    pki: Pki,
    arbiter: String,
}

impl Pair {
    fn new(tag: &str) -> Pair {
        let dir = TempDir::new(tag);
        std::fs::create_dir(dir.file("arbiter")).unwrap();
        let arbiter = format!("file:{}", dir.s("arbiter"));
        Pair {
            dir,
            pki: Pki::new(&["pri", "sec"], &[]),
            arbiter,
        }
    }

    /// The secondary (live console to `live.txt`).
    fn secondary(&self, disk: Option<&str>) -> (Proc, String) {
        let live = format!("file:{}", self.dir.s("live.txt"));
        let mut extra = vec!["--arbiter", &self.arbiter, "--live-serial", &live];
        extra.extend(TIMING);
        if let Some(d) = disk {
            extra.extend(["--disk", d]);
        }
        secondary(&[], "127.0.0.1:0", &self.pki.creds("sec"), &extra)
    }

    /// The primary, its console in `pri.txt` (its control socket is
    /// `api.sock`).
    fn primary(&self, cmdline: &str, addr: &str, disk: Option<&str>) -> Proc {
        let serial = format!("file:{}", self.dir.s("pri.txt"));
        let sock = self.dir.s("api.sock");
        let mut args = vec![
            "run",
            "--api-socket",
            &sock,
            "--cmdline",
            cmdline,
            "--serial",
            &serial,
            "--protect-to",
            addr,
            "--arbiter",
            &self.arbiter,
        ];
        args.extend(TIMING);
        let creds = self.pki.creds("pri");
        args.extend(creds.iter().map(String::as_str));
        if let Some(d) = disk {
            args.extend(["--disk", d]);
        }
        Proc::spawn(&[], &args)
    }

    fn console(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.file(name)).unwrap_or_default()
    }

    /// The holder written in the one claim of the arbiter directory.
    fn holder(&self) -> String {
        let claims: Vec<_> = std::fs::read_dir(self.dir.file("arbiter"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(claims.len(), 1, "{claims:?}");
        let text = std::fs::read_to_string(&claims[0]).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("holder "))
            .unwrap_or_else(|| panic!("no holder in {text}"))
            .to_string()
    }
}

/// kill -9 of the primary at `kill_at` (console bytes of the primary that
/// must be out first): the secondary goes live, the guest finishes with the
/// unfailed run's console (old primary's, then the new one's).
fn primary_killed(
    tag: &str,
    cmdline: &str,
    disk_len: Option<usize>,
    kill_at: &dyn Fn(&str) -> bool,
) {
    primary_fails(tag, cmdline, disk_len, kill_at, false)
}

/// As [`primary_killed`]; with `test_failover` the primary is stopped by
/// `tandem failover --api` instead of kill -9.
fn primary_fails(
    tag: &str,
    cmdline: &str,
    disk_len: Option<usize>,
    kill_at: &dyn Fn(&str) -> bool,
    test_failover: bool,
) {
    let pair = Pair::new(tag);
    let (pri_img, sec_img, ref_img) = (
        pair.dir.s("pri.img"),
        pair.dir.s("sec.img"),
        pair.dir.s("ref.img"),
    );
    if let Some(len) = disk_len {
        make_disk(Path::new(&ref_img), len);
        std::fs::copy(&ref_img, &pri_img).unwrap();
        std::fs::copy(&ref_img, &sec_img).unwrap();
    }
    let disk = |p: &str| disk_len.map(|_| p.to_string());
    // The unfailed run.
    let mut reference = vec!["run", "--cmdline", cmdline];
    if disk_len.is_some() {
        reference.extend(["--disk", &ref_img]);
    }
    let (st, want, err) = run_tandem(&reference);
    assert_eq!(st, 0, "{err}");
    let (mut sec, addr) = pair.secondary(disk(&sec_img).as_deref());
    let mut pri = pair.primary(cmdline, &addr, disk(&pri_img).as_deref());
    wait_until("the kill point on the primary's console", &mut pri, |_| {
        kill_at(&pair.console("pri.txt"))
    });
    if test_failover {
        let sock = pair.dir.s("api.sock");
        let (st, out, err) = run_tandem(&["failover", "--api", &sock]);
        assert_eq!(st, 0, "{out}{err}");
        assert!(out.contains("stopped as if its host died"), "{out}");
    } else {
        signal(&pri, libc::SIGKILL);
    }
    let st = pri.child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL),
        "{}",
        pri.describe()
    );
    let before = pair.console("pri.txt");
    sec.wait_for("going LIVE", true);
    let sec_pid = sec.child.id();
    let (status, _, err) = sec.finish();
    assert_eq!(status, 0, "{err}");
    assert!(err.contains("UNPROTECTED"), "{err}");
    assert!(err.contains("failover gap: "), "{err}");
    let after = pair.console("live.txt");
    assert_eq!(result_line(&after), result_line(&want), "{err}");
    assert_eq!(
        joined(&before, &after),
        want,
        "old primary's console + new primary's != the unfailed run\n--- before ---\n{before}\n--- after ---\n{after}\n{err}"
    );
    assert_eq!(pair.holder(), format!("secondary sec (pid {sec_pid})"));
    if disk_len.is_some() {
        // The new primary's image is the unfailed run's.
        assert!(std::fs::read(&sec_img).unwrap() == std::fs::read(&ref_img).unwrap());
    }
}

#[test]
fn primary_killed_during_fill() {
    let at = random_round(40);
    primary_killed("fo-fill", "fill 4 60 3", None, &|c| rounds(c) as u64 >= at);
}

#[test]
fn primary_killed_during_dirty() {
    let at = random_round(1500);
    primary_killed("fo-dirty", "dirty 64 2000", None, &|c| {
        rounds(c) as u64 >= at
    });
}

#[test]
fn primary_killed_during_disk() {
    // `disk` prints only at its start and end: kill it after the first line.
    primary_killed("fo-disk", "disk 400", Some(1 << 20), &|c| {
        c.contains("disk capacity")
    });
}

/// kill -9 of the secondary: the primary wins the arbiter, runs on
/// unprotected and releases its held outputs: its console is the unfailed
/// run's.
#[test]
fn secondary_killed_primary_runs_on() {
    let pair = Pair::new("fo-sec-killed");
    let cmdline = "fill 4 60 3";
    let (st, want, err) = run_tandem(&["run", "--cmdline", cmdline]);
    assert_eq!(st, 0, "{err}");
    let (sec, addr) = pair.secondary(None);
    let mut pri = pair.primary(cmdline, &addr, None);
    let at = random_round(30) as usize;
    wait_until("the kill point", &mut pri, |_| {
        rounds(&pair.console("pri.txt")) >= at
    });
    signal(&sec, libc::SIGKILL);
    let pri_pid = pri.child.id();
    let (status, _, err) = pri.finish();
    assert_eq!(status, 0, "{err}");
    assert!(
        err.contains("won the arbiter and runs on UNPROTECTED"),
        "{err}"
    );
    assert!(
        err.contains("ended at exit") && err.contains("UNPROTECTED"),
        "{err}"
    );
    assert_eq!(pair.console("pri.txt"), want);
    assert_eq!(pair.holder(), format!("primary pri (pid {pri_pid})"));
}

/// A primary frozen (SIGSTOP) past the timeout: the secondary goes live;
/// continued, the old primary finds the arbiter taken, says by whom, stops,
/// and not one console byte leaves it after the secondary went live.
#[test]
fn frozen_primary_stops_when_it_wakes() {
    let pair = Pair::new("fo-frozen-pri");
    let cmdline = "fill 4 60 3";
    let (sec, addr) = pair.secondary(None);
    let mut sec = sec;
    let mut pri = pair.primary(cmdline, &addr, None);
    let at = random_round(30) as usize;
    wait_until("the freeze point", &mut pri, |_| {
        rounds(&pair.console("pri.txt")) >= at
    });
    signal(&pri, libc::SIGSTOP);
    sec.wait_for("going LIVE", true);
    let frozen = pair.console("pri.txt");
    signal(&pri, libc::SIGCONT);
    let (status, _, err) = pri.finish();
    assert_eq!(status, 3, "{err}");
    assert!(
        err.contains("gave VM")
            && err.contains("to secondary sec")
            && err.contains("this one stops"),
        "{err}"
    );
    assert_eq!(
        pair.console("pri.txt"),
        frozen,
        "the old primary emitted output after the secondary went live\n{err}"
    );
    let (status, _, serr) = sec.finish();
    assert_eq!(status, 0, "{serr}");
    assert!(result_line(&pair.console("live.txt")).is_some(), "{serr}");
}

/// A secondary frozen past the timeout: the primary wins and runs on; the
/// continued secondary finds the arbiter taken, says by whom and does not
/// go live.
#[test]
fn frozen_secondary_does_not_go_live() {
    let pair = Pair::new("fo-frozen-sec");
    let cmdline = "fill 4 60 3";
    let (mut sec, addr) = pair.secondary(None);
    let mut pri = pair.primary(cmdline, &addr, None);
    wait_until("round 5", &mut pri, |_| {
        rounds(&pair.console("pri.txt")) >= 5
    });
    signal(&sec, libc::SIGSTOP);
    pri.wait_for("runs on UNPROTECTED", true);
    signal(&sec, libc::SIGCONT);
    sec.wait_for("does not go live", true);
    let (status, _, err) = sec.finish();
    assert_eq!(status, 3, "{err}");
    assert!(err.contains("to primary pri"), "{err}");
    assert_eq!(pair.console("live.txt"), "", "{err}");
    let (status, _, perr) = pri.finish();
    assert_eq!(status, 0, "{perr}");
    assert!(result_line(&pair.console("pri.txt")).is_some(), "{perr}");
}

/// Without an arbiter neither side may go on alone: a primary that loses
/// its secondary stops with its outputs held.
#[test]
fn without_an_arbiter_the_primary_stops() {
    let dir = TempDir::new("fo-no-arbiter");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let mut extra = vec![];
    extra.extend(TIMING);
    let (sec, addr) = secondary(&[], "127.0.0.1:0", &pki.creds("sec"), &extra);
    let serial = format!("file:{}", dir.s("pri.txt"));
    let mut args = vec![
        "run",
        "--cmdline",
        "fill 4 60 3",
        "--serial",
        &serial,
        "--protect-to",
        &addr,
    ];
    args.extend(TIMING);
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    let mut pri = Proc::spawn(&[], &args);
    let console = || std::fs::read_to_string(dir.file("pri.txt")).unwrap_or_default();
    wait_until("round 5", &mut pri, |_| rounds(&console()) >= 5);
    signal(&sec, libc::SIGKILL);
    let (status, _, err) = pri.finish();
    assert_eq!(status, 3, "{err}");
    assert!(err.contains("no --arbiter"), "{err}");
    assert!(result_line(&console()).is_none(), "{err}");
}

/// `tandem failover --api`: the primary stops as if its host died and the
/// secondary takes over as after kill -9.
#[test]
fn test_failover_command() {
    let at = random_round(40);
    primary_fails(
        "fo-test",
        "fill 4 60 3",
        None,
        &|c| rounds(c) as u64 >= at,
        true,
    );
}
