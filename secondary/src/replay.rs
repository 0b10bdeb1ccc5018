//! The replayer: an [`Inputs`] that serves every host-to-guest value from a
//! record log at the same `exit_seq`, checks every interrupt and
//! fingerprint against it, and hands the run loop the logged sync points.
//!
//! It reads the log as a stream, one entry ahead, so it works the same on a
//! finished file, a file that is still growing and (later) the network.

use std::time::Instant;

use recordlog::{Entry, Fingerprint, Input, ReadError, SyncPoint};
use vmm::inputs::{Divergence, Inputs, InputsError};
use vmm::outputs::{Output, OutputKind, Outputs};
use vmm::sync::{SyncError, SyncPointCheck};

/// Where entries come from.
pub trait EntrySource: Send {
    /// The next entry; `Ok(None)` at the end of the log.
    fn next_entry(&mut self) -> Result<Option<Entry>, ReadError>;
    /// Byte offset just past the last complete frame read.
    fn offset(&self) -> u64;
}

impl<R: std::io::Read + Send> EntrySource for recordlog::LogReader<R> {
    fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        recordlog::LogReader::next_entry(self)
    }
    fn offset(&self) -> u64 {
        recordlog::LogReader::offset(self)
    }
}

impl<R: std::io::Read + Send> EntrySource for recordlog::TailReader<R> {
    fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        recordlog::TailReader::next_entry(self)
    }
    fn offset(&self) -> u64 {
        recordlog::TailReader::offset(self)
    }
}

impl EntrySource for Box<dyn EntrySource> {
    fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        (**self).next_entry()
    }
    fn offset(&self) -> u64 {
        (**self).offset()
    }
}

/// A log entry that is well-framed (its CRC matched) but cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadEntry {
    /// The reader refused the bytes (CRC, framing, truncation inside).
    #[error("{0}")]
    Read(String),
    /// A sync point whose contents are invalid.
    #[error(
        "corrupt log entry at byte offset {offset}: the sync point at exit {exit_seq}: {reason}"
    )]
    SyncPoint {
        /// Offset of the frame holding the entry.
        offset: u64,
        /// The sync point's exit.
        exit_seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Bytes after the `End` entry.
    #[error("corrupt log entry at byte offset {offset}: data after the End entry")]
    AfterEnd {
        /// Where the extra bytes start.
        offset: u64,
    },
}

/// How the log ended, as far as the replayer read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEnd {
    /// Not reached yet.
    Open,
    /// An `End` entry: the recorded run finished with this status.
    End {
        /// The exit of the `End` entry.
        exit_seq: u64,
        /// The recorded run's exit status.
        status: i32,
    },
    /// The log stops without an `End` (the primary died or the file was
    /// cut): everything up to the last complete entry was replayed.
    Truncated,
    /// A damaged entry: reading stopped there.
    Corrupt(BadEntry),
}

/// The replaying [`Inputs`].
pub struct Replayer<S: EntrySource> {
    source: S,
    check: SyncPointCheck,
    /// Offset of the frame the last entry came from.
    frame_offset: u64,
    peeked: Option<Entry>,
    /// The entry read past `peeked` (looking for the log's end behind a
    /// sync point: [`Inputs::take_final_sync_point`]).
    after: Option<Entry>,
    end: LogEnd,
    /// The log's end is a handover at this exit.
    handover: Option<u64>,
    fingerprint_interval: u64,
    repair: bool,
    divergence: Option<Divergence>,
    last_clock: u64,
    /// Latest timer deadline the log says was reached.
    virtual_floor: u64,
    last_wall: u64,
    /// Entries consumed.
    pub entries: u64,
    /// Outputs checked against the log.
    pub outputs_checked: u64,
    /// Frames the replay sent (checked, then dropped or handed to the
    /// frame sink).
    pub frames_replayed: u64,
    /// Frames received from the log.
    pub frames_received: u64,
    /// Where the console output of the replay goes (the replayed guest's
    /// console, for comparison with the recorded one).
    console: Option<Box<dyn std::io::Write + Send>>,
    /// Told of every divergence and repair (a live secondary asks its
    /// primary for a sync point).
    hooks: Option<Box<dyn crate::repair::RepairHooks>>,
    /// Where the replay's sent frames go once checked (a secondary keeps
    /// the ones its primary may not have released, for going live).
    frames: Option<Box<dyn Outputs>>,
}

impl<S: EntrySource> Replayer<S> {
    /// Replay from `source`, taking fingerprints every
    /// `fingerprint_interval` exits as the recorder did. With `repair`, a
    /// divergence is repaired by adopting the next sync point. Every sync
    /// point is validated by `check` as it is read (before it can be
    /// applied or trusted): a bad one ends the log as corrupt.
    pub fn new(source: S, fingerprint_interval: u64, repair: bool, check: SyncPointCheck) -> Self {
        let frame_offset = source.offset();
        Replayer {
            source,
            check,
            frame_offset,
            peeked: None,
            after: None,
            end: LogEnd::Open,
            handover: None,
            fingerprint_interval,
            repair,
            divergence: None,
            last_clock: 0,
            virtual_floor: 0,
            last_wall: 0,
            entries: 0,
            outputs_checked: 0,
            frames_replayed: 0,
            frames_received: 0,
            console: None,
            hooks: None,
            frames: None,
        }
    }

    /// Hand every sent frame, once checked, to `frames`.
    pub fn with_frames(mut self, frames: Box<dyn Outputs>) -> Self {
        self.frames = Some(frames);
        self
    }

    /// Tell `hooks` of every divergence and repair (repair mode).
    pub fn with_repair_hooks(mut self, hooks: Box<dyn crate::repair::RepairHooks>) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// Write the replayed console output to `out` (after checking it).
    pub fn with_console(mut self, out: Box<dyn std::io::Write + Send>) -> Self {
        self.console = Some(out);
        self
    }

    /// The latest virtual time the log shows the guest: its last clock
    /// read or the last timer deadline the recorder had reached, whichever
    /// is later (a go-live continues from here, never backwards).
    pub fn last_clock_ns(&self) -> u64 {
        self.last_clock.max(self.virtual_floor)
    }

    /// How the log ended (so far).
    pub fn log_end(&self) -> &LogEnd {
        &self.end
    }

    /// The log ends with a handover at this exit (`Entry::Handover`): the
    /// replaying side takes the VM on from there.
    pub fn handover(&self) -> Option<u64> {
        self.handover
    }

    /// The next entry from the source, with the offset of its frame.
    fn read(&mut self) -> (u64, Result<Option<Entry>, ReadError>) {
        let before = self.source.offset();
        let r = self.source.next_entry();
        if self.source.offset() != before {
            // A new frame was decoded (entries of one batch share it).
            self.frame_offset = before;
        }
        (self.frame_offset, r)
    }

    fn peek(&mut self) -> Option<&Entry> {
        if self.peeked.is_none() {
            self.peeked = self.after.take();
        }
        while self.peeked.is_none() && self.end == LogEnd::Open {
            let (offset, r) = self.read();
            match r {
                // The codec lets only the `End` at the same exit follow it.
                Ok(Some(Entry::Handover { exit_seq })) => self.handover = Some(exit_seq),
                Ok(Some(Entry::End { exit_seq, status })) => {
                    self.end = self.after_end(exit_seq, status);
                }
                Ok(Some(Entry::SyncPoint { exit_seq, sync })) => match self.check.check(&sync) {
                    Ok(_) => self.peeked = Some(Entry::SyncPoint { exit_seq, sync }),
                    Err(e) => self.end = LogEnd::Corrupt(bad_sync_point(offset, exit_seq, &e)),
                },
                Ok(Some(e)) => self.peeked = Some(e),
                Ok(None) | Err(ReadError::Truncated { .. }) => self.end = LogEnd::Truncated,
                Err(e) => self.end = LogEnd::Corrupt(BadEntry::Read(e.to_string())),
            }
        }
        self.peeked.as_ref()
    }

    /// The next entry that can concern exit `exit_seq`. A progress mark
    /// (`Entry::Progress`) up to `exit_seq` says nothing more and is
    /// dropped; one past it stays peeked: nothing is logged at the exits
    /// before it, so the replay runs on to it without waiting for more of
    /// the log.
    fn peek_at(&mut self, exit_seq: u64) -> Option<&Entry> {
        while matches!(self.peek(), Some(Entry::Progress { exit_seq: e }) if *e <= exit_seq) {
            self.peeked = None;
        }
        self.peek()
    }

    /// Is the next entry a sync point at `exit_seq` behind which the log
    /// ends at that exit (nothing but its `End`, after a handover's)?
    /// Reads one entry past the sync point to know.
    fn final_sync_point_next(&mut self, exit_seq: u64) -> bool {
        if !matches!(self.peek_at(exit_seq), Some(Entry::SyncPoint { exit_seq: s, .. }) if *s == exit_seq)
        {
            return false;
        }
        if self.after.is_none() {
            let sp = self.peeked.take();
            // Progress marks up to this exit say nothing (`peek_at`).
            self.after = loop {
                self.peek();
                match self.peeked.take() {
                    Some(Entry::Progress { exit_seq: e }) if e <= exit_seq => continue,
                    other => break other,
                }
            };
            self.peeked = sp;
        }
        self.after.is_none() && matches!(self.end, LogEnd::End { exit_seq: e, .. } if e == exit_seq)
    }

    /// After the `End` entry the log must end: anything more is damage.
    fn after_end(&mut self, exit_seq: u64, status: i32) -> LogEnd {
        if self.handover == Some(exit_seq) {
            // A handover's stream stays open after it (the old primary
            // waits for the new one's go-live): nothing more is read.
            return LogEnd::End { exit_seq, status };
        }
        let end = self.source.offset();
        match self.source.next_entry() {
            Ok(None) => LogEnd::End { exit_seq, status },
            Ok(Some(_)) | Err(ReadError::Truncated { .. }) => {
                LogEnd::Corrupt(BadEntry::AfterEnd { offset: end })
            }
            Err(e) => LogEnd::Corrupt(BadEntry::Read(e.to_string())),
        }
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
        match self.peek_at(exit_seq) {
            Some(e) if e.exit_seq() == exit_seq && pred(e) => self.take(),
            _ => None,
        }
    }

    fn diverge(&mut self, exit_seq: u64, expected: impl Into<String>) {
        if self.peek_at(exit_seq).is_none()
            && matches!(self.end, LogEnd::Truncated | LogEnd::Corrupt(_))
        {
            // Not a divergence: the log stops here (the recorder died) and
            // the run loop stops at this exit, or the log is damaged, which
            // `take_error` reports.
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
        loop {
            match self.take() {
                Some(Entry::Progress { .. }) => continue,
                e => return e,
            }
        }
    }
}

fn bad_sync_point(offset: u64, exit_seq: u64, e: &SyncError) -> BadEntry {
    BadEntry::SyncPoint {
        offset,
        exit_seq,
        reason: e.to_string(),
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > 160 {
        s.truncate(160);
        s.push('…');
    }
    s
}

impl<S: EntrySource> Outputs for Replayer<S> {
    /// Check the output against the record logged at its exit, then drop
    /// it (console bytes go to the replay's console, if it has one).
    fn emit(&mut self, output: Output) -> Result<(), Divergence> {
        let exit_seq = output.exit_seq;
        let mine = output.record();
        match self.take_if(exit_seq, |e| matches!(e, Entry::Output { .. })) {
            Some(Entry::Output { output: logged, .. }) if logged == mine => {}
            Some(Entry::Output { output: logged, .. }) => {
                return Err(Divergence {
                    exit_seq,
                    expected: format!("output {logged:x?}"),
                    found: format!("output {mine:x?} ({})", preview(&output)),
                })
            }
            _ => {
                self.diverge(
                    exit_seq,
                    format!(
                        "no output (replay produced {mine:x?}: {})",
                        preview(&output)
                    ),
                );
                if let Some(d) = self.divergence.take() {
                    return Err(d);
                }
            }
        }
        self.outputs_checked += 1;
        match output.kind {
            OutputKind::Console => {
                if let Some(c) = &mut self.console {
                    let _ = c.write_all(&output.bytes);
                }
            }
            OutputKind::NetFrame => {
                self.frames_replayed += 1;
                if let Some(f) = &mut self.frames {
                    f.emit(output)?;
                }
            }
        }
        Ok(())
    }
}

/// The start of an output, for divergence messages.
fn preview(o: &Output) -> String {
    match o.kind {
        OutputKind::Console => truncate(format!("{:?}", String::from_utf8_lossy(&o.bytes))),
        OutputKind::NetFrame => format!("{}-byte frame", o.bytes.len()),
    }
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

    fn deadline_reached(&mut self, exit_seq: u64, deadline_ns: u64) -> bool {
        let reached = self
            .take_if(exit_seq, |e| {
                matches!(
                    e,
                    Entry::Input {
                        input: Input::DeadlineReached,
                        ..
                    }
                )
            })
            .is_some();
        if reached {
            // The recorder's virtual time had reached the deadline.
            self.virtual_floor = self.virtual_floor.max(deadline_ns);
        }
        reached
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

    fn net_frame(&mut self, exit_seq: u64) -> Option<Vec<u8>> {
        match self.take_if(exit_seq, |e| {
            matches!(
                e,
                Entry::Input {
                    input: Input::NetFrame(_),
                    ..
                }
            )
        }) {
            Some(Entry::Input {
                input: Input::NetFrame(f),
                ..
            }) => {
                self.frames_received += 1;
                Some(f)
            }
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
        match self.peek_at(exit_seq) {
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

    fn take_final_sync_point(&mut self, exit_seq: u64) -> Option<SyncPoint> {
        if !self.final_sync_point_next(exit_seq) {
            return None;
        }
        match self.take() {
            Some(Entry::SyncPoint { sync, .. }) => Some(*sync),
            _ => None,
        }
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

    fn diverged(&mut self, divergence: &Divergence) {
        if let Some(h) = &mut self.hooks {
            h.diverged(divergence);
        }
    }

    fn repaired(&mut self, divergence: &Divergence, sync_exit: u64) {
        if let Some(h) = &mut self.hooks {
            h.repaired(divergence, sync_exit);
        }
    }

    fn replaying(&self) -> bool {
        true
    }

    fn take_error(&mut self) -> Option<InputsError> {
        match &self.end {
            LogEnd::Corrupt(e) => Some(InputsError::log_damaged(e.clone())),
            _ => None,
        }
    }

    fn leaving_exit(&mut self, exit_seq: u64) -> Result<(), Divergence> {
        match self.peek_at(exit_seq) {
            Some(e) if e.exit_seq() <= exit_seq => {
                let found = format!(
                    "the log has {} at exit {} that the replay did not take",
                    e.kind(),
                    e.exit_seq()
                );
                Err(Divergence {
                    exit_seq,
                    expected: "nothing more logged at this exit".into(),
                    found,
                })
            }
            _ => Ok(()),
        }
    }

    fn guest_ended(&mut self, exit_seq: u64) -> Result<(), Divergence> {
        let found = match self.peek_at(exit_seq) {
            // The recorder's final sync point, then its `End`.
            Some(Entry::SyncPoint { exit_seq: s, .. }) if *s == exit_seq => return Ok(()),
            Some(e) => format!(
                "the log continues with {} at exit {}",
                e.kind(),
                e.exit_seq()
            ),
            None => match self.end {
                LogEnd::End { exit_seq: end, .. } if end != exit_seq => {
                    format!("the recorded run ended at exit {end}")
                }
                _ => return Ok(()),
            },
        };
        Err(Divergence {
            exit_seq,
            expected: found,
            found: "the guest ended here".into(),
        })
    }

    fn ended(&mut self, exit_seq: u64) -> bool {
        if self.peek_at(exit_seq).is_some() {
            return false;
        }
        match self.end {
            LogEnd::Truncated | LogEnd::Corrupt(_) => true,
            // A run the recorder stopped (`record --stop-at`) ends here.
            LogEnd::End { exit_seq: end, .. } => exit_seq >= end,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recordlog::{Header, InitialState, LogReader, LogWriter, OutputRecord};
    use vmm::sync::SyncPointCheck;

    fn replayer(entries: &[Entry]) -> Replayer<LogReader<std::io::Cursor<Vec<u8>>>> {
        let header = Header::new(Vec::new(), InitialState::Boot);
        let mut w = LogWriter::new(Vec::new(), &header).unwrap();
        for e in entries {
            w.append(e).unwrap();
        }
        let bytes = w.into_inner().unwrap();
        let (r, _) = LogReader::open(std::io::Cursor::new(bytes)).unwrap();
        Replayer::new(r, 0, false, SyncPointCheck::from_regions(Vec::new()))
    }

    fn out(exit_seq: u64, kind: OutputKind, bytes: &[u8]) -> Output {
        Output {
            exit_seq,
            kind,
            bytes: bytes.to_vec(),
            produced: std::time::Instant::now(),
        }
    }

    #[test]
    fn outputs_are_checked_against_the_log_and_frames_replayed() {
        let frame = vec![0xab; 60];
        let mut r = replayer(&[
            Entry::Input {
                exit_seq: 3,
                input: Input::NetFrame(frame.clone()),
            },
            Entry::Output {
                exit_seq: 5,
                output: OutputRecord::of(OutputKind::NetFrame, b"sent"),
            },
            Entry::Output {
                exit_seq: 7,
                output: OutputRecord::of(OutputKind::Console, b"hello\n"),
            },
            Entry::Output {
                exit_seq: 9,
                output: OutputRecord::of(OutputKind::Console, b"ok\n"),
            },
        ]);
        // Frames only at their exit.
        assert_eq!(r.net_frame(2), None);
        assert_eq!(r.net_frame(3), Some(frame));
        assert_eq!(r.net_frame(3), None);
        r.emit(out(5, OutputKind::NetFrame, b"sent")).unwrap();
        r.emit(out(7, OutputKind::Console, b"hello\n")).unwrap();
        assert_eq!((r.outputs_checked, r.frames_replayed), (2, 1));
        // Other bytes than the recorded ones: a divergence naming both.
        let d = r.emit(out(9, OutputKind::Console, b"KO\n")).unwrap_err();
        assert_eq!(d.exit_seq, 9);
        assert!(d.expected.contains("Console"), "{d}");
        assert!(d.found.contains("KO"), "{d}");
    }

    #[test]
    fn an_output_the_log_does_not_have_is_a_divergence() {
        let mut r = replayer(&[Entry::Output {
            exit_seq: 8,
            output: OutputRecord::of(OutputKind::Console, b"late\n"),
        }]);
        let d = r.emit(out(4, OutputKind::NetFrame, &[1; 60])).unwrap_err();
        assert_eq!(d.exit_seq, 4);
        assert!(d.expected.contains("60-byte frame"), "{d}");
    }
}

#[cfg(test)]
mod validation_tests {
    //! The replayer without KVM: entries from a vector, the run loop's
    //! calls made by hand.
    use super::*;

    /// A log in memory; each entry is its own "frame" at offset 100 * i.
    struct VecSource {
        entries: Vec<Result<Option<Entry>, ReadError>>,
        at: usize,
    }

    impl VecSource {
        fn new(entries: Vec<Entry>) -> Self {
            let mut v: Vec<_> = entries.into_iter().map(|e| Ok(Some(e))).collect();
            v.push(Ok(None));
            VecSource { entries: v, at: 0 }
        }
    }

    impl EntrySource for VecSource {
        fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
            let r = match self.entries.get_mut(self.at) {
                Some(r) => std::mem::replace(r, Ok(None)),
                None => Ok(None),
            };
            self.at += 1;
            r
        }
        fn offset(&self) -> u64 {
            100 * self.at as u64
        }
    }

    fn replayer(entries: Vec<Entry>, repair: bool) -> Replayer<VecSource> {
        let check = SyncPointCheck::from_regions(vec![(0, 1 << 20)]);
        Replayer::new(VecSource::new(entries), 0, repair, check)
    }

    fn end(exit_seq: u64) -> Entry {
        Entry::End {
            exit_seq,
            status: 0,
        }
    }

    #[test]
    fn logged_inputs_are_served_at_their_exit() {
        let mut r = replayer(
            vec![
                Entry::Input {
                    exit_seq: 3,
                    input: Input::Clock(77),
                },
                end(5),
            ],
            false,
        );
        assert!(!r.deadline_reached(3, 0));
        assert_eq!(r.clock_ns(3), 77);
        assert!(r.take_divergence().is_none());
        assert!(r.leaving_exit(3).is_ok());
        assert!(r.guest_ended(5).is_ok());
        assert!(r.ended(5));
        assert_eq!(
            *r.log_end(),
            LogEnd::End {
                exit_seq: 5,
                status: 0
            }
        );
    }

    #[test]
    fn a_progress_mark_lets_the_replay_run_to_its_exit_and_changes_nothing() {
        let mut r = replayer(
            vec![
                Entry::Interrupt {
                    exit_seq: 2,
                    vector: 0x20,
                },
                Entry::Progress { exit_seq: 6 },
                Entry::Input {
                    exit_seq: 6,
                    input: Input::Clock(5),
                },
                Entry::Progress { exit_seq: 9 },
                end(9),
            ],
            false,
        );
        assert!(r.interrupt_injected(2, 0x20).is_ok());
        // Exits 2..6: nothing logged, nothing expected, the log not ended.
        for exit in 2..6 {
            assert!(!r.deadline_reached(exit, 0));
            assert!(r.leaving_exit(exit).is_ok());
            assert!(!r.ended(exit));
        }
        // At the mark's exit the next entry counts again.
        assert_eq!(r.clock_ns(6), 5);
        assert!(r.leaving_exit(6).is_ok());
        // A fingerprint the log does not have before the next mark.
        assert!(r.fingerprint(7, &Fingerprint::default()).is_err());
        assert!(r.guest_ended(9).is_ok());
        assert!(r.ended(9));
        assert!(r.finish().is_none());
        assert!(r.take_divergence().is_none());
        // The marks are read, not taken as events.
        assert_eq!(r.entries, 2);
    }

    #[test]
    fn an_input_the_replay_did_not_take_is_a_divergence() {
        let mut r = replayer(
            vec![
                Entry::Input {
                    exit_seq: 3,
                    input: Input::DeadlineReached,
                },
                end(5),
            ],
            false,
        );
        let d = r.leaving_exit(3).unwrap_err();
        assert_eq!(d.exit_seq, 3);
        assert!(d.found.contains("input.deadline_reached"), "{d}");
        // A clock read the log does not have.
        let mut r = replayer(vec![end(9)], false);
        r.clock_ns(4);
        assert!(r.take_divergence().is_some());
    }

    #[test]
    fn a_guest_that_ends_where_the_recording_did_not_diverges() {
        // The log goes on after the exit where the replay ended...
        let mut r = replayer(
            vec![
                Entry::Interrupt {
                    exit_seq: 8,
                    vector: 0x20,
                },
                end(9),
            ],
            true,
        );
        let d = r.guest_ended(6).unwrap_err();
        assert!(d.expected.contains("interrupt at exit 8"), "{d}");
        // ...or the recorded run ended at another exit.
        let mut r = replayer(vec![end(9)], true);
        let d = r.guest_ended(6).unwrap_err();
        assert!(d.expected.contains("ended at exit 9"), "{d}");
        assert!(r.guest_ended(9).is_ok());
    }

    #[test]
    fn a_sync_point_page_outside_memory_is_damage_not_divergence() {
        let vcpu = vmm::persist::encode_state("v", &()).unwrap();
        let sp = SyncPoint {
            vcpu_state: vcpu.clone(),
            device_state: vcpu,
            pages: vec![(!0xfff, vec![0; 4096])],
            digest: recordlog::Digest::ZERO,
        };
        let mut r = replayer(
            vec![
                Entry::Interrupt {
                    exit_seq: 1,
                    vector: 0x20,
                },
                Entry::SyncPoint {
                    exit_seq: 2,
                    sync: Box::new(sp),
                },
            ],
            false,
        );
        assert!(r.interrupt_injected(1, 0x20).is_ok());
        assert!(r.take_sync_point(2).is_none());
        let e = r.take_error().expect("damage reported");
        assert!(matches!(e, InputsError::LogDamaged(_)), "{e:?}");
        assert!(e.to_string().contains("byte offset 100"), "{e}");
        assert!(r.take_divergence().is_none());
        assert!(r.ended(2));
    }

    /// A sync point that passes the replayer's check (fresh states).
    fn sync_point(exit_seq: u64) -> Entry {
        let vcpu = vmm::vstate::vcpu::VcpuState {
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Vec::new(),
            xcrs: Default::default(),
            msrs: Vec::new(),
            debug_regs: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
        };
        let devices = vmm::devices::bus::Devices::new(1 << 20, 0, None, None)
            .unwrap()
            .save();
        Entry::SyncPoint {
            exit_seq,
            sync: Box::new(SyncPoint {
                vcpu_state: vmm::persist::encode_state("v", &vcpu).unwrap(),
                device_state: vmm::persist::encode_state("d", &devices).unwrap(),
                pages: Vec::new(),
                digest: recordlog::Digest::ZERO,
            }),
        }
    }

    #[test]
    fn the_recorder_s_final_sync_point_is_taken_before_the_exit_is_serviced() {
        // A switchover's end: the sync point, the handover, the end, all
        // at the exit where the recorder stopped.
        let mut r = replayer(
            vec![
                Entry::Interrupt {
                    exit_seq: 3,
                    vector: 0x20,
                },
                sync_point(5),
                Entry::Handover { exit_seq: 5 },
                end(5),
            ],
            false,
        );
        assert!(r.take_final_sync_point(3).is_none());
        assert!(r.interrupt_injected(3, 0x20).is_ok());
        assert!(r.take_final_sync_point(4).is_none());
        assert!(r.take_final_sync_point(5).is_some());
        assert!(r.ended(5));
        assert_eq!(r.handover(), Some(5));
        assert!(r.take_divergence().is_none());
        // Stopped by a signal (no handover), a progress mark between.
        let mut r = replayer(
            vec![sync_point(7), Entry::Progress { exit_seq: 7 }, end(7)],
            false,
        );
        assert!(r.take_final_sync_point(7).is_some());
        assert!(r.ended(7));
    }

    #[test]
    fn a_sync_point_the_log_goes_on_after_is_left_for_its_exit_s_service() {
        // A periodic sync point: the entries behind it stay in order.
        let mut r = replayer(
            vec![
                sync_point(5),
                Entry::Input {
                    exit_seq: 5,
                    input: Input::Clock(9),
                },
                sync_point(8),
                end(9),
            ],
            false,
        );
        assert!(r.take_final_sync_point(5).is_none());
        assert!(r.take_final_sync_point(5).is_none());
        assert!(r.take_sync_point(5).is_some());
        assert_eq!(r.clock_ns(5), 9);
        // The log ends at another exit than this sync point's.
        assert!(r.take_final_sync_point(8).is_none());
        assert!(r.take_sync_point(8).is_some());
        assert!(!r.ended(8));
        assert!(r.ended(9));
        assert!(r.take_divergence().is_none());
    }

    #[test]
    fn data_after_the_end_is_refused() {
        let mut src = VecSource::new(vec![end(4)]);
        src.entries[1] = Err(ReadError::Truncated { offset: 100 });
        let check = SyncPointCheck::from_regions(vec![(0, 1 << 20)]);
        let mut r = Replayer::new(src, 0, false, check);
        assert!(r.ended(4));
        assert!(matches!(
            r.log_end(),
            LogEnd::Corrupt(BadEntry::AfterEnd { .. })
        ));
    }
}
