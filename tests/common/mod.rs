//! Helpers shared by the end-to-end tests: run the `tandem` binary with a
//! timeout, pick the `RESULT` line out of its console output, temporary
//! directories and disk images.
//!
//! Every test bounds its work by guest events (a workload that ends by
//! itself); the timeout here only turns a hang into a failure that shows
//! what the process printed.

#![allow(dead_code)]

pub mod cluster;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The `tandem` binary cargo built for these tests.
pub const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// Generous: the slowest test here takes well under a second on the
/// emulated development machines; this only catches hangs.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished `tandem` process left behind.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit status (a process killed by a signal fails the test earlier).
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// The first number after `after` in `text`.
pub fn num_after(text: &str, after: &str) -> Option<f64> {
    let rest = &text[text.find(after)? + after.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl Output {
    /// The `RESULT <workload> <checksum>` line of the console output.
    pub fn result_line(&self) -> Option<&str> {
        result_line(&self.stdout)
    }

    /// Assert the exit status, showing both streams if it differs.
    #[track_caller]
    pub fn assert_status(&self, expected: i32) -> &Self {
        assert_eq!(
            self.status,
            expected,
            "unexpected exit status\n{}",
            self.describe()
        );
        self
    }

    /// The result line, or a failure showing what the run printed.
    #[track_caller]
    pub fn expect_result(&self) -> &str {
        match self.result_line() {
            Some(l) => l,
            None => panic!("no RESULT line\n{}", self.describe()),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// The first complete (newline-terminated) line starting with `RESULT `.
pub fn result_line(console: &str) -> Option<&str> {
    console
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .map(|l| l.trim_end_matches('\r'))
        .find(|l| l.starts_with("RESULT "))
}

/// Run `tandem ARGS` with nothing on stdin.
#[track_caller]
pub fn tandem(args: &[&str]) -> Output {
    tandem_with_stdin(args, None)
}

/// Run `tandem ARGS`, feeding `stdin` (then EOF) if given, else an empty
/// stdin. Fails the test if the process does not end within [`TIMEOUT`] or
/// dies from a signal.
#[track_caller]
pub fn tandem_with_stdin(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(TANDEM)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("TANDEM_LOG")
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {TANDEM}: {e}"));

    let writer = match (stdin, child.stdin.take()) {
        (Some(bytes), Some(mut pipe)) => {
            let bytes = bytes.to_vec();
            // The guest may end before reading everything: ignore EPIPE.
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            }))
        }
        _ => None,
    };
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("stdout")));
    let err = reader(Box::new(child.stderr.take().expect("stderr")));

    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() > TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for tandem: {e}"),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if let Some(w) = writer {
        let _ = w.join();
    }
    let Some(status) = status else {
        panic!(
            "tandem {args:?} did not finish within {TIMEOUT:?}; killed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        );
    };
    let Some(code) = status.code() else {
        panic!("tandem {args:?} died from a signal ({status})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    };
    Output {
        status: code,
        stdout,
        stderr,
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "tandem-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory (not created).
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// [`file`](Self::file) as a `String` argument.
    pub fn s(&self, name: &str) -> String {
        arg(&self.file(name)).to_string()
    }

    /// Write `bytes` to a file inside the directory and return its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.file(name);
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    }

    /// A zero-filled raw disk image of `size` bytes.
    pub fn disk(&self, name: &str, size: u64) -> PathBuf {
        let p = self.file(name);
        let f =
            std::fs::File::create(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        f.set_len(size)
            .unwrap_or_else(|e| panic!("sizing {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A path as a `&str` argument.
pub fn arg(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Deterministic pseudo-random bytes (splitmix64), for "not a kernel" and
/// "not a snapshot" files.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Read a whole file, failing the test with its name.
pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}
