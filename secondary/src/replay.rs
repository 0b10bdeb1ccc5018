//! The replayer: an [`Inputs`] that serves every host-to-guest value from a
//! record log at the same `exit_seq`, checks every interrupt and
//! fingerprint against it, and hands the run loop the logged sync points.
//!
//! It reads the log as a stream, one entry ahead, so it works the same on a
//! finished file, a file that is still growing and (later) the network.

use std::time::Instant;

use recordlog::{Entry, Fingerprint, Input, ReadError, SyncPoint};
use vmm::inputs::{Divergence, Inputs};

/// Where entries come from.
pub trait EntrySource: Send {
    /// The next entry; `Ok(None)` at the end of the log.
    fn next_entry(&mut self) -> Result<Option<Entry>, ReadError>;
}

impl<R: std::io::Read + Send> EntrySource for recordlog::LogReader<R> {
    fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        recordlog::LogReader::next_entry(self)
    }
}

impl<R: std::io::Read + Send> EntrySource for recordlog::TailReader<R> {
    fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        recordlog::TailReader::next_entry(self)
    }
}

impl EntrySource for Box<dyn EntrySource> {
    fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        (**self).next_entry()
    }
}

/// How the log ended, as far as the replayer read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEnd {
    /// Not reached yet.
    Open,
    /// An `End` entry: the recorded run finished with this status.
    End { exit_seq: u64, status: i32 },
    /// The log stops without an `End` (the primary died or the file was
    /// cut): everything up to the last complete entry was replayed.
    Truncated,
    /// A damaged entry: reading stopped there.
    Corrupt(String),
}

/// The replaying [`Inputs`].
pub struct Replayer<S: EntrySource> {
    source: S,
    peeked: Option<Entry>,
    end: LogEnd,
    fingerprint_interval: u64,
    repair: bool,
    divergence: Option<Divergence>,
    last_clock: u64,
    last_wall: u64,
    /// Entries consumed.
    pub entries: u64,
}

impl<S: EntrySource> Replayer<S> {
    /// Replay from `source`, taking fingerprints every
    /// `fingerprint_interval` exits as the recorder did. With `repair`, a
    /// divergence is repaired by adopting the next sync point.
    pub fn new(source: S, fingerprint_interval: u64, repair: bool) -> Self {
        Replayer {
            source,
            peeked: None,
            end: LogEnd::Open,
            fingerprint_interval,
            repair,
            divergence: None,
            last_clock: 0,
            last_wall: 0,
            entries: 0,
        }
    }

    /// How the log ended (so far).
    pub fn log_end(&self) -> &LogEnd {
        &self.end
    }

    fn peek(&mut self) -> Option<&Entry> {
        if self.peeked.is_none() && self.end == LogEnd::Open {
            match self.source.next_entry() {
                Ok(Some(Entry::End { exit_seq, status })) => {
                    self.end = LogEnd::End { exit_seq, status };
                }
                Ok(Some(e)) => self.peeked = Some(e),
                Ok(None) | Err(ReadError::Truncated { .. }) => self.end = LogEnd::Truncated,
                Err(e) => self.end = LogEnd::Corrupt(e.to_string()),
            }
        }
        self.peeked.as_ref()
    }

    fn take(&mut self) -> Option<Entry> {
        self.peek();
        let e = self.peeked.take();
        if e.is_some() {
            self.entries += 1;
        }
        e
    }

    /// The next entry, if it is at `exit_seq` and `pred` accepts it.
    fn take_if(&mut self, exit_seq: u64, pred: impl Fn(&Entry) -> bool) -> Option<Entry> {
        match self.peek() {
            Some(e) if e.exit_seq() == exit_seq && pred(e) => self.take(),
            _ => None,
        }
    }

    fn diverge(&mut self, exit_seq: u64, expected: impl Into<String>) {
        if self.peek().is_none() && self.end == LogEnd::Truncated {
            // Not a divergence: the log stops here (the recorder died) and
            // the run loop stops at this exit.
            return;
        }
        let found = match self.peek() {
            Some(e) => format!("{e:?}"),
            None => format!("no entry ({:?})", self.end),
        };
        let found = truncate(found);
        self.divergence.get_or_insert(Divergence {
            exit_seq,
            expected: expected.into(),
            found: format!("log has {found}"),
        });
    }

    /// After the run: the sync point the recorder took at the very end (if
    /// the next entry is one at `exit_seq`).
    pub fn final_sync_point(&mut self, exit_seq: u64) -> Option<SyncPoint> {
        match self.take_if(exit_seq, |e| matches!(e, Entry::SyncPoint { .. })) {
            Some(Entry::SyncPoint { sync, .. }) => Some(*sync),
            _ => None,
        }
    }

    /// The state digest logged at `exit_seq`, if the next entry is one.
    pub fn take_digest(&mut self, exit_seq: u64) -> Option<recordlog::Digest> {
        match self.take_if(exit_seq, |e| matches!(e, Entry::Digest { .. })) {
            Some(Entry::Digest { digest, .. }) => Some(digest),
            _ => None,
        }
    }

    /// Read to the end of the log (after the guest ended): what remains
    /// besides the final sync point is a divergence.
    pub fn finish(&mut self) -> Option<Entry> {
        self.take()
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > 160 {
        s.truncate(160);
        s.push('…');
    }
    s
}

impl<S: EntrySource> Inputs for Replayer<S> {
    fn clock_ns(&mut self, exit_seq: u64) -> u64 {
        match self.take_if(exit_seq, |e| {
            matches!(
                e,
                Entry::Input {
                    input: Input::Clock(_),
                    ..
                }
            )
        }) {
            Some(Entry::Input {
                input: Input::Clock(v),
                ..
            }) => {
                self.last_clock = v;
                v
            }
            _ => {
                self.diverge(exit_seq, "a clock read (Input::Clock) here");
                self.last_clock
            }
        }
    }

    fn wall_clock_ns(&mut self, exit_seq: u64) -> u64 {
        match self.take_if(exit_seq, |e| {
            matches!(
                e,
                Entry::Input {
                    input: Input::WallClock(_),
                    ..
                }
            )
        }) {
            Some(Entry::Input {
                input: Input::WallClock(v),
                ..
            }) => {
                self.last_wall = v;
                v
            }
            _ => {
                self.diverge(exit_seq, "a wall-clock read (Input::WallClock) here");
                self.last_wall
            }
        }
    }

    fn deadline_reached(&mut self, exit_seq: u64, _deadline_ns: u64) -> bool {
        self.take_if(exit_seq, |e| {
            matches!(
                e,
                Entry::Input {
                    input: Input::DeadlineReached,
                    ..
                }
            )
        })
        .is_some()
    }

    fn console_input(&mut self, exit_seq: u64) -> Option<Vec<u8>> {
        match self.take_if(exit_seq, |e| {
            matches!(
                e,
                Entry::Input {
                    input: Input::Console(_),
                    ..
                }
            )
        }) {
            Some(Entry::Input {
                input: Input::Console(b),
                ..
            }) => Some(b),
            _ => None,
        }
    }

    fn wait_idle(&mut self, _exit_seq: u64, _deadline_ns: Option<u64>) -> bool {
        // Virtual time comes from the log: nothing to wait for.
        true
    }

    fn interrupt_injected(&mut self, exit_seq: u64, vector: u8) -> Result<(), Divergence> {
        match self.take_if(exit_seq, |e| matches!(e, Entry::Interrupt { .. })) {
            Some(Entry::Interrupt { vector: v, .. }) if v == vector => Ok(()),
            Some(Entry::Interrupt { vector: v, .. }) => Err(Divergence {
                exit_seq,
                expected: format!("interrupt vector {v:#x}"),
                found: format!("interrupt vector {vector:#x} injected"),
            }),
            _ => {
                self.diverge(
                    exit_seq,
                    format!("no interrupt (replay injected vector {vector:#x})"),
                );
                match self.divergence.take() {
                    Some(d) => Err(d),
                    None => Ok(()),
                }
            }
        }
    }

    fn host_instant_of(&self, _deadline_ns: u64) -> Option<Instant> {
        None
    }

    fn fingerprint_interval(&self) -> Option<u64> {
        (self.fingerprint_interval > 0).then_some(self.fingerprint_interval)
    }

    fn fingerprint(&mut self, exit_seq: u64, fp: &Fingerprint) -> Result<(), Divergence> {
        match self.peek() {
            // The log may legitimately end before this exit's fingerprint.
            None => Ok(()),
            Some(Entry::Fingerprint {
                exit_seq: s,
                fp: logged,
            }) if *s == exit_seq => {
                let logged = *logged;
                self.take();
                if logged == *fp {
                    Ok(())
                } else {
                    Err(Divergence {
                        exit_seq,
                        expected: format!("{logged:x?}"),
                        found: format!("{fp:x?}"),
                    })
                }
            }
            Some(_) => {
                self.diverge(exit_seq, format!("the fingerprint {fp:x?} here"));
                Err(self.divergence.take().unwrap_or(Divergence {
                    exit_seq,
                    expected: "a fingerprint".into(),
                    found: "none".into(),
                }))
            }
        }
    }

    fn take_divergence(&mut self) -> Option<Divergence> {
        self.divergence.take()
    }

    fn take_sync_point(&mut self, exit_seq: u64) -> Option<SyncPoint> {
        match self.take_if(exit_seq, |e| matches!(e, Entry::SyncPoint { .. })) {
            Some(Entry::SyncPoint { sync, .. }) => Some(*sync),
            _ => None,
        }
    }

    fn skip_to_sync_point(&mut self) -> Option<(u64, SyncPoint)> {
        if !self.repair {
            return None;
        }
        self.divergence = None;
        loop {
            match self.take()? {
                Entry::SyncPoint { exit_seq, sync } => return Some((exit_seq, *sync)),
                _ => continue,
            }
        }
    }

    fn repairs(&self) -> bool {
        self.repair
    }

    fn replaying(&self) -> bool {
        true
    }

    fn take_error(&mut self) -> Option<String> {
        match &self.end {
            LogEnd::Corrupt(e) => Some(e.clone()),
            _ => None,
        }
    }

    fn ended(&mut self, exit_seq: u64) -> bool {
        if self.peek().is_some() {
            return false;
        }
        match self.end {
            LogEnd::Truncated => true,
            // A run the recorder stopped (`record --stop-at`) ends here.
            LogEnd::End { exit_seq: end, .. } => exit_seq >= end,
            _ => false,
        }
    }
}
