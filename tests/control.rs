//! The control socket of a running VM (`tandem run --api-socket`): a
//! client cannot make it buffer without bound, and `tandem status` shows
//! the exit counter as it is now.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Instant;

use common::cluster::{source, Proc};
use common::{arg, TempDir, TANDEM, TIMEOUT};

/// A `tandem run --api-socket` in the background, killed on drop.
struct Vm {
    proc: Proc,
    sock: std::path::PathBuf,
    _dir: TempDir,
}

impl Vm {
    fn start(cmdline: &str) -> Vm {
        let dir = TempDir::new("control");
        let sock = dir.file("vm.sock");
        let proc = source(&[], arg(&sock), cmdline, &["--serial", "null"]);
        Vm {
            proc,
            sock,
            _dir: dir,
        }
    }

    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.proc.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("no VmRSS")
    }

    /// `tandem status` → (state, exit counter).
    fn status(&self) -> (String, u64) {
        let out = Command::new(TANDEM)
            .args(["status", "--api", arg(&self.sock)])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "status failed: {text}");
        // `running (exit 1234)`, then the protection (`unprotected`)
        let first = text.lines().next().unwrap_or_default();
        let (state, rest) = first.trim().split_once(" (exit ").expect(&text);
        let seq = rest.trim_end_matches(')').parse().expect(&text);
        (state.to_string(), seq)
    }
}

impl Vm {
    /// Call `tandem status` until the exit counter passes `seq` (the
    /// guest takes a timer exit every few ms); returns the new value.
    #[track_caller]
    fn wait_past(&self, seq: u64) -> u64 {
        let start = Instant::now();
        loop {
            let now = self.status().1;
            if now > seq {
                return now;
            }
            assert!(start.elapsed() < TIMEOUT, "exit counter stuck at {seq}");
        }
    }
}

/// A 300 MiB request line is refused with an error naming the limit, the
/// connection is closed, the process does not grow, and the VM runs on.
#[test]
fn huge_request_line_is_refused_without_growing() {
    let vm = Vm::start("ticks 1000000");
    let before = vm.rss_kib();
    let mut conn = UnixStream::connect(&vm.sock).unwrap();
    let reader = conn.try_clone().unwrap();
    // Send until the server closes (or 300 MiB went through).
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0u64;
    let mut peak = before;
    while sent < 300 << 20 {
        if conn.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len() as u64;
        peak = peak.max(vm.rss_kib());
    }
    assert!(
        peak < before + 16 * 1024,
        "VmRSS grew from {before} KiB to {peak} KiB"
    );
    assert!(
        sent < 300 << 20,
        "the server read all 300 MiB instead of closing the connection"
    );
    let mut answer = String::new();
    BufReader::new(reader).read_line(&mut answer).unwrap();
    assert!(
        answer.contains("\"error\"") && answer.contains("longer than 65536 bytes"),
        "answer: {answer}"
    );
    // The VM keeps running and still answers.
    let (state, a) = vm.status();
    assert_eq!(state, "running");
    vm.wait_past(a);
}

/// Two `tandem status` calls on a running guest show a growing exit
/// counter (it used to be the value of the last pause: 0 forever).
#[test]
fn status_shows_the_current_exit_counter() {
    let vm = Vm::start("ticks 1000000");
    let (state, first) = vm.status();
    assert_eq!(state, "running");
    let last = vm.wait_past(first);
    // Paused: the counter stands still, and is still the current one.
    let pause = |cmd: &str| {
        let out = Command::new(TANDEM)
            .args([cmd, "--api", arg(&vm.sock)])
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
    };
    pause("pause");
    let (state, p1) = vm.status();
    assert_eq!(state, "paused");
    assert!(p1 >= last);
    assert_eq!(vm.status().1, p1, "a paused guest's counter moved");
    pause("resume");
    vm.wait_past(p1);
}

/// Idle connections cannot pile up threads without bound: beyond the
/// limit a new one is answered `busy` and closed; once they close, the
/// socket serves again.
#[test]
fn too_many_connections_are_refused_as_busy() {
    let vm = Vm::start("ticks 1000000");
    // Each connection asks for the status and stays open: served ones
    // answer it, the first one over the limit is answered `busy`.
    let mut idle = Vec::new();
    let mut answer = String::new();
    for _ in 0..100 {
        let mut c = UnixStream::connect(&vm.sock).unwrap();
        // A refused connection may be closed before this arrives.
        let _ = c.write_all(b"{\"cmd\":\"status\"}\n");
        let mut r = BufReader::new(c.try_clone().unwrap());
        answer.clear();
        r.read_line(&mut answer).unwrap();
        if !answer.contains("\"event\":\"status\"") {
            break;
        }
        idle.push(c);
    }
    assert!(
        answer.contains("busy: 32 control connections are open"),
        "answer after {} connections: {answer:?}",
        idle.len()
    );
    // The start-up probe's connection may still hold a slot.
    assert!(
        (31..=32).contains(&idle.len()),
        "refused after {} connections",
        idle.len()
    );
    drop(idle);
    let start = Instant::now();
    loop {
        let out = Command::new(TANDEM)
            .args(["status", "--api", arg(&vm.sock)])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(start.elapsed() < TIMEOUT, "the socket never served again");
    }
}
