//! The recorder: an [`Inputs`] that takes every value from the live host
//! and logs it, with the exit it entered at, into a record log.
//!
//! What is logged (DESIGN.md rules 2-5): clock reads and other inputs at
//! the exit they were applied; every injected interrupt; a fingerprint
//! every `fingerprint_interval` exits; a sync point after every kick and
//! every `sync_interval` exits (the latter with a full state digest).
//! Only `true`/non-empty answers of the polling calls are logged, which is
//! what keeps an idle guest's log tiny. Every output (console bytes, sent
//! frames) is logged as a short record (kind, length, hash) at the exit
//! that produced it, then passed to the live outputs.

use std::time::Instant;

use recordlog::{Entry, Fingerprint, Input, SyncPoint};
use vmm::inputs::{Divergence, Inputs, InputsError, SyncReason};
use vmm::outputs::{Output, Outputs};

/// Why a sink could not take or push out entries.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The log file.
    #[error(transparent)]
    File(#[from] recordlog::WriteError),
    /// The in-memory queue to the network.
    #[error(transparent)]
    Queue(#[from] recordlog::QueueError),
}

/// Where entries go: a log file, an in-memory queue drained to the network.
pub trait EntrySink: Send {
    /// Append one entry.
    fn append(&mut self, entry: &Entry) -> Result<(), SinkError>;
    /// Push buffered entries out.
    fn flush(&mut self) -> Result<(), SinkError>;
}

impl<W: std::io::Write + Send> EntrySink for recordlog::writer::LogWriter<W> {
    fn append(&mut self, entry: &Entry) -> Result<(), SinkError> {
        Ok(recordlog::writer::LogWriter::append(self, entry)?)
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(recordlog::writer::LogWriter::flush(self)?)
    }
}

impl EntrySink for recordlog::QueueWriter {
    fn append(&mut self, entry: &Entry) -> Result<(), SinkError> {
        Ok(recordlog::QueueWriter::append(self, entry)?)
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(recordlog::QueueWriter::flush(self)?)
    }
}

/// Both sinks get every entry (a protected primary that also keeps its
/// own log file).
impl<A: EntrySink, B: EntrySink> EntrySink for (A, B) {
    fn append(&mut self, entry: &Entry) -> Result<(), SinkError> {
        self.0.append(entry)?;
        self.1.append(entry)
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        self.0.flush()?;
        self.1.flush()
    }
}

/// No sink at all when `None`.
impl<S: EntrySink> EntrySink for Option<S> {
    fn append(&mut self, entry: &Entry) -> Result<(), SinkError> {
        self.as_mut().map_or(Ok(()), |s| s.append(entry))
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        self.as_mut().map_or(Ok(()), |s| s.flush())
    }
}

/// Recording parameters.
#[derive(Debug, Clone, Copy)]
pub struct RecordOptions {
    /// A fingerprint every this many exits (0: none).
    pub fingerprint_interval: u64,
    /// A sync point with a full digest every this many exits (0: none).
    pub sync_interval: u64,
}

impl Default for RecordOptions {
    fn default() -> Self {
        RecordOptions {
            fingerprint_interval: 1000,
            sync_interval: 200_000,
        }
    }
}

/// Counters of a recording.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordStats {
    /// Entries written.
    pub entries: u64,
    /// Inputs logged.
    pub inputs: u64,
    /// Interrupts logged.
    pub interrupts: u64,
    /// Fingerprints logged.
    pub fingerprints: u64,
    /// Sync points logged.
    pub sync_points: u64,
    /// Pages in those sync points.
    pub sync_pages: u64,
    /// Outputs logged.
    pub outputs: u64,
    /// Network frames among the inputs.
    pub net_frames: u64,
}

/// The recording [`Inputs`].
pub struct Recorder<I: Inputs, S: EntrySink> {
    live: I,
    sink: S,
    opts: RecordOptions,
    last_sync_exit: u64,
    error: Option<InputsError>,
    flush_on_output: bool,
    /// What was logged so far.
    pub stats: RecordStats,
}

impl<I: Inputs, S: EntrySink> Recorder<I, S> {
    /// Record the values `live` provides into `sink`. `start_exit` is the
    /// exit the machine starts at (0 from boot, the snapshot's otherwise).
    pub fn new(live: I, sink: S, opts: RecordOptions, start_exit: u64) -> Self {
        Recorder {
            live,
            sink,
            opts,
            last_sync_exit: start_exit,
            error: None,
            flush_on_output: false,
            stats: RecordStats::default(),
        }
    }

    /// Flush the sink after logging each output, before passing it on (a
    /// protected primary: the output waits for the secondary to have its
    /// entry, so the entry must leave at once).
    pub fn flush_on_output(mut self) -> Self {
        self.flush_on_output = true;
        self
    }

    /// Append an entry; the first failure is kept and ends the run.
    pub fn log(&mut self, entry: Entry) {
        if self.error.is_some() {
            return;
        }
        match &entry {
            Entry::Input { input, .. } => {
                self.stats.inputs += 1;
                if matches!(input, Input::NetFrame(_)) {
                    self.stats.net_frames += 1;
                }
            }
            Entry::Output { .. } => self.stats.outputs += 1,
            Entry::Interrupt { .. } => self.stats.interrupts += 1,
            Entry::Fingerprint { .. } => self.stats.fingerprints += 1,
            Entry::SyncPoint { sync, .. } => {
                self.stats.sync_points += 1;
                self.stats.sync_pages += sync.pages.len() as u64;
            }
            _ => {}
        }
        self.stats.entries += 1;
        if let Err(e) = self.sink.append(&entry) {
            self.error = Some(InputsError::log_write(e));
        }
    }

    /// Flush the sink.
    pub fn flush(&mut self) -> Result<(), InputsError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        self.sink.flush().map_err(InputsError::log_write)
    }

    /// The live inputs (e.g. to read the clock for a final snapshot).
    pub fn live_mut(&mut self) -> &mut I {
        &mut self.live
    }

    /// The sink, to finish the log.
    pub fn into_sink(self) -> S {
        self.sink
    }
}

impl<I: Inputs, S: EntrySink> Outputs for Recorder<I, S> {
    fn emit(&mut self, output: Output) -> Result<(), Divergence> {
        self.log(Entry::Output {
            exit_seq: output.exit_seq,
            output: output.record(),
        });
        if self.flush_on_output {
            if let Err(e) = self.sink.flush() {
                self.error.get_or_insert(InputsError::log_write(e));
            }
        }
        self.live.emit(output)
    }
}

impl<I: Inputs, S: EntrySink> Inputs for Recorder<I, S> {
    fn clock_ns(&mut self, exit_seq: u64) -> u64 {
        let v = self.live.clock_ns(exit_seq);
        self.log(Entry::Input {
            exit_seq,
            input: Input::Clock(v),
        });
        v
    }

    fn wall_clock_ns(&mut self, exit_seq: u64) -> u64 {
        let v = self.live.wall_clock_ns(exit_seq);
        self.log(Entry::Input {
            exit_seq,
            input: Input::WallClock(v),
        });
        v
    }

    fn deadline_reached(&mut self, exit_seq: u64, deadline_ns: u64) -> bool {
        let reached = self.live.deadline_reached(exit_seq, deadline_ns);
        if reached {
            self.log(Entry::Input {
                exit_seq,
                input: Input::DeadlineReached,
            });
        }
        reached
    }

    fn console_input(&mut self, exit_seq: u64) -> Option<Vec<u8>> {
        let bytes = self.live.console_input(exit_seq)?;
        self.log(Entry::Input {
            exit_seq,
            input: Input::Console(bytes.clone()),
        });
        Some(bytes)
    }

    fn net_frame(&mut self, exit_seq: u64) -> Option<Vec<u8>> {
        let frame = self.live.net_frame(exit_seq)?;
        self.log(Entry::Input {
            exit_seq,
            input: Input::NetFrame(frame.clone()),
        });
        Some(frame)
    }

    fn wait_idle(&mut self, exit_seq: u64, deadline_ns: Option<u64>) -> bool {
        // Entries waiting in a buffer should reach the secondary while the
        // guest idles.
        if let Err(e) = self.sink.flush() {
            self.error.get_or_insert(InputsError::log_write(e));
        }
        self.live.wait_idle(exit_seq, deadline_ns)
    }

    fn interrupt_injected(&mut self, exit_seq: u64, vector: u8) -> Result<(), Divergence> {
        self.log(Entry::Interrupt { exit_seq, vector });
        Ok(())
    }

    fn host_instant_of(&self, deadline_ns: u64) -> Option<Instant> {
        self.live.host_instant_of(deadline_ns)
    }

    fn fingerprint_interval(&self) -> Option<u64> {
        (self.opts.fingerprint_interval > 0).then_some(self.opts.fingerprint_interval)
    }

    fn fingerprint(&mut self, exit_seq: u64, fp: &Fingerprint) -> Result<(), Divergence> {
        self.log(Entry::Fingerprint { exit_seq, fp: *fp });
        Ok(())
    }

    fn wants_sync_point(&mut self, exit_seq: u64, reason: SyncReason) -> bool {
        match reason {
            SyncReason::Kick => true,
            SyncReason::Interval => {
                self.opts.sync_interval > 0
                    && exit_seq >= self.last_sync_exit + self.opts.sync_interval
            }
        }
    }

    fn sync_point(&mut self, exit_seq: u64, sp: SyncPoint) -> Result<(), Divergence> {
        self.last_sync_exit = exit_seq;
        self.log(Entry::SyncPoint {
            exit_seq,
            sync: Box::new(sp),
        });
        Ok(())
    }

    fn take_error(&mut self) -> Option<InputsError> {
        self.error.clone()
    }
}
