//! What the Output Rule did, output by output: the added latency of each
//! held output (from the exit that produced it to its release) and, when
//! the operator asks for it (`tandem run --protect-to ... --output-log
//! PATH`), one JSON line per released output, so that "every output left
//! only after the secondary had its log entry" can be checked from records
//! rather than assumed (tests/lockstep_net.rs compares these lines with the
//! secondary's `--ack-log` and with what a client captured).
//!
//! A line: `{"exit_seq":E,"kind":"net"|"console","len":N,"hash":"HEX",
//! "entry_end":O,"acked":A,"emitted_ns":T0,"released_ns":T1}` — `hash` is
//! the log's [`OutputRecord`] hash (16 hex digits), `entry_end` the log
//! offset just past the output's `Output` entry, `acked` the secondary's
//! acknowledged offset when the output was released (never below
//! `entry_end`), times in ns of the host's real-time clock.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use recordlog::{OutputKind, OutputRecord};

/// Nanoseconds of the real-time clock (comparable between the processes
/// of one host).
pub fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Added output latency, p50 and p99 over the released outputs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HeldLatency {
    /// Outputs measured.
    pub count: u64,
    /// Median time from the output to its release.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

/// Collects the release of each output (and writes the lines, if asked).
pub struct ReleaseAudit {
    file: Option<BufWriter<File>>,
    waits: Vec<Duration>,
    error: Option<String>,
}

/// One output as the audit sees it when it is released.
pub struct Released<'a> {
    /// The exit that produced it.
    pub exit_seq: u64,
    /// Its kind and bytes.
    pub kind: OutputKind,
    /// The bytes.
    pub bytes: &'a [u8],
    /// The log offset just past its entry.
    pub entry_end: u64,
    /// The acknowledged offset at release.
    pub acked: u64,
    /// When the guest produced it (real time, ns).
    pub emitted_ns: u64,
    /// When the guest produced it (monotonic; `Output::produced`).
    pub emitted: Instant,
    /// When it was released (real time, ns; taken just before it left).
    pub released_ns: u64,
}

impl ReleaseAudit {
    /// An audit that writes its lines to `file` (none: latencies only).
    pub fn new(file: Option<File>) -> Self {
        ReleaseAudit {
            file: file.map(BufWriter::new),
            waits: Vec::new(),
            error: None,
        }
    }

    /// `out` was just released.
    pub fn released(&mut self, out: &Released<'_>) {
        self.waits.push(out.emitted.elapsed());
        let Some(f) = self.file.as_mut() else { return };
        if self.error.is_some() {
            return;
        }
        let rec = OutputRecord::of(out.kind, out.bytes);
        let kind = match out.kind {
            OutputKind::Console => "console",
            OutputKind::NetFrame => "net",
        };
        let line = format!(
            "{{\"exit_seq\":{},\"kind\":\"{kind}\",\"len\":{},\"hash\":\"{:016x}\",\"entry_end\":{},\"acked\":{},\"emitted_ns\":{},\"released_ns\":{}}}\n",
            out.exit_seq,
            rec.len,
            rec.hash,
            out.entry_end,
            out.acked,
            out.emitted_ns,
            out.released_ns
        );
        // Each line reaches the file at once: a reader may be checking
        // while the VM runs.
        if let Err(e) = f.write_all(line.as_bytes()).and_then(|()| f.flush()) {
            tracing::warn!("the output log: {e}");
            self.error = Some(e.to_string());
        }
    }

    /// p50/p99 of the added latency so far.
    pub fn latency(&self) -> HeldLatency {
        let mut w = self.waits.clone();
        if w.is_empty() {
            return HeldLatency::default();
        }
        w.sort_unstable();
        let at = |q: f64| w[((w.len() - 1) as f64 * q).round() as usize];
        HeldLatency {
            count: w.len() as u64,
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_the_waits() {
        let mut a = ReleaseAudit::new(None);
        assert_eq!(a.latency(), HeldLatency::default());
        a.waits = (1..=100).map(Duration::from_millis).collect();
        let l = a.latency();
        assert_eq!(l.count, 100);
        assert_eq!(l.p50, Duration::from_millis(51));
        assert_eq!(l.p99, Duration::from_millis(99));
    }
}
