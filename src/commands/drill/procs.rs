//! The processes of a drill run: their output is read line by line, with
//! the time each line arrived (the clients' acknowledgements time the
//! gaps), and they are killed when dropped.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines a process printed, each with its arrival time.
pub type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// Why a wait ended early.
#[derive(Debug)]
pub enum WaitError {
    /// Ctrl-C (or SIGTERM) reached the drill.
    Interrupted,
    /// What went wrong, with the process's output.
    Failed(String),
}

pub type WaitResult<T> = Result<T, WaitError>;

/// Bytes a process printed, exactly (a last line without its newline
/// stays without one).
pub type Raw = Arc<Mutex<Vec<u8>>>;

fn read_lines<R: Read + Send + 'static>(r: R) -> (Lines, Raw) {
    let lines: Lines = Arc::default();
    let raw: Raw = Arc::default();
    let (l, b) = (lines.clone(), raw.clone());
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            b.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&buf);
            let text = String::from_utf8_lossy(&buf);
            let line = text.strip_suffix('\n').unwrap_or(&text).to_string();
            l.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((Instant::now(), line));
            buf.clear();
        }
    });
    (lines, raw)
}

/// A process of the drill.
pub struct Proc {
    pub what: String,
    child: Child,
    pub out: Lines,
    /// Its stdout byte for byte (a VMM's console).
    pub out_raw: Raw,
    pub err: Lines,
    status: Option<std::process::ExitStatus>,
}

impl Proc {
    pub fn spawn(what: &str, mut cmd: Command) -> Result<Proc, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {what}: {e}"))?;
        let (out, out_raw) = read_lines(child.stdout.take().expect("piped"));
        let (err, _) = read_lines(child.stderr.take().expect("piped"));
        Ok(Proc {
            what: what.to_string(),
            child,
            out,
            out_raw,
            err,
            status: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its exit status, once it ended.
    pub fn ended(&mut self) -> Option<std::process::ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn text(lines: &Lines) -> String {
        let l = lines.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = String::new();
        for (_, line) in l.iter() {
            s.push_str(line);
            s.push('\n');
        }
        s
    }

    /// Its output, for an error message (the last lines of each stream).
    pub fn describe(&self) -> String {
        let tail = |lines: &Lines| {
            let t = Proc::text(lines);
            let v: Vec<&str> = t.lines().collect();
            v[v.len().saturating_sub(15)..].join("\n")
        };
        format!(
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            tail(&self.out),
            tail(&self.err)
        )
    }

    /// Wait until a line of stdout (`err`: stderr) contains `needle`;
    /// returns the rest of that line after it.
    pub fn wait_line(
        &mut self,
        needle: &str,
        err: bool,
        timeout: Duration,
        stop: &AtomicBool,
    ) -> WaitResult<String> {
        let start = Instant::now();
        loop {
            let found = {
                let lines = if err { &self.err } else { &self.out };
                let l = lines.lock().unwrap_or_else(|e| e.into_inner());
                l.iter().find_map(|(_, line)| {
                    line.find(needle)
                        .map(|i| line[i + needle.len()..].trim().to_string())
                })
            };
            if let Some(rest) = found {
                return Ok(rest);
            }
            if stop.load(Ordering::Relaxed) {
                return Err(WaitError::Interrupted);
            }
            if let Some(st) = self.ended() {
                std::thread::sleep(Duration::from_millis(50));
                let lines = if err { &self.err } else { &self.out };
                if Proc::text(lines).contains(needle) {
                    continue;
                }
                return Err(WaitError::Failed(format!(
                    "ended ({st}) before printing {needle:?}: {}",
                    self.describe()
                )));
            }
            if start.elapsed() > timeout {
                return Err(WaitError::Failed(format!(
                    "no {needle:?} within {timeout:?}: {}",
                    self.describe()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait for the end (at most `timeout`).
    pub fn wait_end(
        &mut self,
        timeout: Duration,
        stop: &AtomicBool,
    ) -> WaitResult<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.ended() {
                // Let the readers drain.
                std::thread::sleep(Duration::from_millis(50));
                return Ok(st);
            }
            if stop.load(Ordering::Relaxed) {
                return Err(WaitError::Interrupted);
            }
            if start.elapsed() > timeout {
                return Err(WaitError::Failed(format!(
                    "did not end within {timeout:?}: {}",
                    self.describe()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Send `sig`.
    pub fn signal(&mut self, sig: i32) {
        if self.ended().is_none() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the status.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        while self.ended().is_none() && start.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.ended().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.ended().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run a command to its end; (status, stdout, stderr).
pub fn output(mut cmd: Command) -> Result<(i32, String, String), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {cmd:?}: {e}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
