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

use std::time::{Duration, Instant};

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
    /// Progress marks (a protected primary): when nothing was flushed for
    /// this long, the recorder logs `Entry::Progress` at the exit it has
    /// reached and flushes, so that a secondary that replays as the log
    /// arrives may run on to that exit; also before the guest idles.
    /// Zero: none (`tandem record`).
    pub progress: Duration,
}

impl Default for RecordOptions {
    fn default() -> Self {
        RecordOptions {
            fingerprint_interval: 1000,
            sync_interval: 200_000,
            progress: Duration::ZERO,
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
    /// Progress marks logged.
    pub progress_marks: u64,
}

/// The recording [`Inputs`].
pub struct Recorder<I: Inputs, S: EntrySink> {
    live: I,
    sink: S,
    opts: RecordOptions,
    last_sync_exit: u64,
    error: Option<InputsError>,
    flush_on_output: bool,
    /// Progress marks: at most one per this interval, when nothing else
    /// reached the sink in it (`None`: none).
    progress: Option<Duration>,
    /// When the sink was last flushed.
    flushed_at: Instant,
    /// The exit of the last entry logged.
    logged_exit: u64,
    /// Where the exit the vCPU is leaving is published (`tandem status`).
    exit_gauge: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
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
            progress: (!opts.progress.is_zero()).then_some(opts.progress),
            flushed_at: Instant::now(),
            logged_exit: start_exit,
            exit_gauge: None,
            stats: RecordStats::default(),
        }
    }

    /// Publish every exit the vCPU leaves in `gauge` (for a status asked
    /// from another thread).
    pub fn with_exit_gauge(mut self, gauge: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.exit_gauge = Some(gauge);
        self
    }

    /// A progress mark at `exit_seq` if the log says nothing of it yet
    /// (its last entry is at an earlier exit), then a flush.
    fn mark(&mut self, exit_seq: u64) {
        if exit_seq > self.logged_exit {
            self.log(Entry::Progress { exit_seq });
            self.stats.progress_marks += 1;
        }
        self.flush_sink();
    }

    fn flush_sink(&mut self) {
        self.flushed_at = Instant::now();
        if let Err(e) = self.sink.flush() {
            self.error.get_or_insert(InputsError::log_write(e));
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
        self.logged_exit = self.logged_exit.max(entry.exit_seq());
        if let Err(e) = self.sink.append(&entry) {
            self.error = Some(InputsError::log_write(e));
        }
    }

    /// Flush the sink.
    pub fn flush(&mut self) -> Result<(), InputsError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        self.flushed_at = Instant::now();
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

    /// The live inputs and the sink (recording ends; the run may go on
    /// with the live inputs alone).
    pub fn into_parts(self) -> (I, S) {
        (self.live, self.sink)
    }
}

impl<I: Inputs, S: EntrySink> Outputs for Recorder<I, S> {
    fn emit(&mut self, output: Output) -> Result<(), Divergence> {
        self.log(Entry::Output {
            exit_seq: output.exit_seq,
            output: output.record(),
        });
        if self.flush_on_output {
            self.flush_sink();
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
        // guest idles (with marks: and it may replay up to here).
        if self.progress.is_some() {
            self.mark(exit_seq);
        } else {
            self.flush_sink();
        }
        self.live.wait_idle(exit_seq, deadline_ns)
    }

    fn leaving_exit(&mut self, exit_seq: u64) -> Result<(), Divergence> {
        if let Some(g) = &self.exit_gauge {
            g.store(exit_seq, std::sync::atomic::Ordering::Relaxed);
        }
        // Everything of the exits before this one is logged (a kick's sync
        // point may still come at this one).
        if let Some(every) = self.progress {
            if exit_seq > self.logged_exit && self.flushed_at.elapsed() >= every {
                self.mark(exit_seq);
            }
        }
        Ok(())
    }

    fn interrupt_injected(&mut self, exit_seq: u64, vector: u8) -> Result<(), Divergence> {
        self.log(Entry::Interrupt { exit_seq, vector });
        Ok(())
    }

    fn host_instant_of(&self, deadline_ns: u64) -> Option<Instant> {
        self.live.host_instant_of(deadline_ns)
    }

    fn kick_grace(&self) -> std::time::Duration {
        self.live.kick_grace()
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
                // The secondary asked for one (a divergence to repair).
                let asked = self.live.wants_sync_point(exit_seq, reason);
                asked
                    || (self.opts.sync_interval > 0
                        && exit_seq >= self.last_sync_exit + self.opts.sync_interval)
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

#[cfg(test)]
mod tests {
    //! The recorder without KVM: a scripted host behind it, a sink that
    //! keeps what it is given.

    use super::*;
    use recordlog::Digest;
    use std::sync::{Arc, Mutex};
    use vmm::outputs::OutputKind;

    /// The host: fixed answers, and what reached the live outputs.
    #[derive(Default)]
    struct Host {
        console: Option<Vec<u8>>,
        frame: Option<Vec<u8>>,
        deadline: bool,
        emitted: Arc<Mutex<Vec<Output>>>,
    }

    impl Outputs for Host {
        fn emit(&mut self, output: Output) -> Result<(), Divergence> {
            self.emitted.lock().unwrap().push(output);
            Ok(())
        }
    }

    impl Inputs for Host {
        fn clock_ns(&mut self, exit_seq: u64) -> u64 {
            1000 * exit_seq
        }
        fn wall_clock_ns(&mut self, exit_seq: u64) -> u64 {
            7_000_000 + exit_seq
        }
        fn deadline_reached(&mut self, _exit_seq: u64, _deadline_ns: u64) -> bool {
            self.deadline
        }
        fn console_input(&mut self, _exit_seq: u64) -> Option<Vec<u8>> {
            self.console.take()
        }
        fn net_frame(&mut self, _exit_seq: u64) -> Option<Vec<u8>> {
            self.frame.take()
        }
        fn wait_idle(&mut self, _exit_seq: u64, _deadline_ns: Option<u64>) -> bool {
            true
        }
        fn interrupt_injected(&mut self, _exit_seq: u64, _vector: u8) -> Result<(), Divergence> {
            Ok(())
        }
        fn host_instant_of(&self, _deadline_ns: u64) -> Option<Instant> {
            None
        }
    }

    /// Keeps every entry; fails every append and flush once `fail` is set.
    #[derive(Default, Clone)]
    struct Sink {
        entries: Arc<Mutex<Vec<Entry>>>,
        fail: Arc<Mutex<bool>>,
        flushes: Arc<Mutex<u32>>,
    }

    fn broken() -> SinkError {
        SinkError::File(recordlog::WriteError::Io(std::io::Error::other(
            "disk gone",
        )))
    }

    impl EntrySink for Sink {
        fn append(&mut self, entry: &Entry) -> Result<(), SinkError> {
            if *self.fail.lock().unwrap() {
                return Err(broken());
            }
            self.entries.lock().unwrap().push(entry.clone());
            Ok(())
        }
        fn flush(&mut self) -> Result<(), SinkError> {
            if *self.fail.lock().unwrap() {
                return Err(broken());
            }
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        }
    }

    fn recorder(opts: RecordOptions, start: u64) -> (Recorder<Host, Sink>, Sink, Host) {
        let host = Host::default();
        let view = Host {
            emitted: host.emitted.clone(),
            ..Host::default()
        };
        let sink = Sink::default();
        (Recorder::new(host, sink.clone(), opts, start), sink, view)
    }

    fn sync_point() -> SyncPoint {
        SyncPoint {
            vcpu_state: vec![1],
            device_state: vec![2],
            pages: vec![(0x1000, vec![0; 4096]), (0x3000, vec![1; 4096])],
            digest: Digest([9; 32]),
        }
    }

    #[test]
    fn inputs_are_logged_at_their_exit_and_polls_only_when_they_deliver() {
        let (mut r, sink, _) = recorder(RecordOptions::default(), 0);
        assert_eq!(r.clock_ns(3), 3000);
        assert_eq!(r.wall_clock_ns(4), 7_000_004);
        // Nothing there: nothing logged.
        assert!(!r.deadline_reached(5, 100));
        assert_eq!(r.console_input(5), None);
        assert_eq!(r.net_frame(5), None);
        r.live_mut().deadline = true;
        r.live_mut().console = Some(b"ls\n".to_vec());
        r.live_mut().frame = Some(vec![0xab; 60]);
        assert!(r.deadline_reached(6, 100));
        assert_eq!(r.console_input(6).as_deref(), Some(&b"ls\n"[..]));
        assert_eq!(r.net_frame(7).map(|f| f.len()), Some(60));
        r.interrupt_injected(7, 0x20).unwrap();
        let entries = sink.entries.lock().unwrap().clone();
        let input = |exit_seq, input| Entry::Input { exit_seq, input };
        assert_eq!(
            entries,
            vec![
                input(3, Input::Clock(3000)),
                input(4, Input::WallClock(7_000_004)),
                input(6, Input::DeadlineReached),
                input(6, Input::Console(b"ls\n".to_vec())),
                input(7, Input::NetFrame(vec![0xab; 60])),
                Entry::Interrupt {
                    exit_seq: 7,
                    vector: 0x20
                },
            ]
        );
        let s = r.stats;
        assert_eq!(
            (s.entries, s.inputs, s.net_frames, s.interrupts),
            (6, 5, 1, 1)
        );
        assert!(r.take_error().is_none());
    }

    #[test]
    fn outputs_are_logged_as_records_then_reach_the_live_outputs() {
        let (mut r, sink, host) = recorder(RecordOptions::default(), 0);
        let out = Output {
            exit_seq: 12,
            kind: OutputKind::Console,
            bytes: b"hello\n".to_vec(),
            produced: std::time::Instant::now(),
        };
        r.emit(out.clone()).unwrap();
        assert_eq!(
            sink.entries.lock().unwrap().clone(),
            vec![Entry::Output {
                exit_seq: 12,
                output: out.record(),
            }]
        );
        assert_eq!(host.emitted.lock().unwrap().clone(), vec![out.clone()]);
        // Without flush_on_output the sink is not flushed per output; with
        // it, every output pushes the log out first.
        assert_eq!(*sink.flushes.lock().unwrap(), 0);
        let mut r = r.flush_on_output();
        r.emit(out).unwrap();
        assert_eq!(*sink.flushes.lock().unwrap(), 1);
        assert_eq!(r.stats.outputs, 2);
        // An idle guest's wait flushes too.
        assert!(r.wait_idle(13, None));
        assert_eq!(*sink.flushes.lock().unwrap(), 2);
    }

    #[test]
    fn sync_points_at_kicks_and_every_interval_from_the_start_exit() {
        let opts = RecordOptions {
            fingerprint_interval: 0,
            sync_interval: 100,
            ..RecordOptions::default()
        };
        // Started from a snapshot at exit 1000.
        let (mut r, sink, _) = recorder(opts, 1000);
        assert_eq!(r.fingerprint_interval(), None);
        assert!(r.wants_sync_point(1001, SyncReason::Kick));
        assert!(!r.wants_sync_point(1099, SyncReason::Interval));
        assert!(r.wants_sync_point(1100, SyncReason::Interval));
        r.sync_point(1100, sync_point()).unwrap();
        // The interval counts from the last sync point, kicks included.
        assert!(!r.wants_sync_point(1150, SyncReason::Interval));
        r.sync_point(1150, sync_point()).unwrap();
        assert!(!r.wants_sync_point(1249, SyncReason::Interval));
        assert!(r.wants_sync_point(1250, SyncReason::Interval));
        assert_eq!((r.stats.sync_points, r.stats.sync_pages), (2, 4));
        assert!(matches!(
            sink.entries.lock().unwrap()[0],
            Entry::SyncPoint { exit_seq: 1100, .. }
        ));
        // No interval: only kicks.
        let (mut r, _, _) = recorder(
            RecordOptions {
                fingerprint_interval: 50,
                sync_interval: 0,
                ..RecordOptions::default()
            },
            0,
        );
        assert_eq!(r.fingerprint_interval(), Some(50));
        assert!(!r.wants_sync_point(1 << 40, SyncReason::Interval));
        assert!(r.wants_sync_point(1, SyncReason::Kick));
        let fp = Fingerprint {
            exit_reason: 2,
            rip: 0x1234,
            rax: 1,
            rcx: 2,
            rflags: 0x202,
        };
        r.fingerprint(50, &fp).unwrap();
        assert_eq!(r.stats.fingerprints, 1);
    }

    #[test]
    fn progress_marks_only_when_nothing_else_was_flushed_for_the_interval() {
        let opts = RecordOptions {
            progress: Duration::from_millis(5),
            ..RecordOptions::default()
        };
        let (mut r, sink, _) = recorder(opts, 10);
        // Just flushed (the recorder was made): no mark yet.
        r.leaving_exit(11).unwrap();
        assert!(sink.entries.lock().unwrap().is_empty());
        std::thread::sleep(Duration::from_millis(6));
        r.leaving_exit(12).unwrap();
        r.leaving_exit(13).unwrap();
        assert_eq!(
            sink.entries.lock().unwrap().clone(),
            vec![Entry::Progress { exit_seq: 12 }]
        );
        assert_eq!(*sink.flushes.lock().unwrap(), 1);
        // An entry at this exit already says as much: no mark at it.
        std::thread::sleep(Duration::from_millis(6));
        r.clock_ns(14);
        r.leaving_exit(14).unwrap();
        assert_eq!(sink.entries.lock().unwrap().len(), 2);
        // Before the guest idles: a mark at once, and the flush.
        assert!(r.wait_idle(20, None));
        assert_eq!(
            sink.entries.lock().unwrap().last(),
            Some(&Entry::Progress { exit_seq: 20 })
        );
        assert_eq!(r.stats.progress_marks, 2);
        // Without marks nothing of the kind is logged.
        let (mut r, sink, _) = recorder(RecordOptions::default(), 0);
        std::thread::sleep(Duration::from_millis(6));
        r.leaving_exit(5).unwrap();
        assert!(r.wait_idle(6, None));
        assert!(sink.entries.lock().unwrap().is_empty());
    }

    #[test]
    fn a_failing_sink_ends_the_run_with_a_typed_error_and_logs_nothing_more() {
        let (mut r, sink, host) = recorder(RecordOptions::default(), 0);
        r.clock_ns(1);
        *sink.fail.lock().unwrap() = true;
        r.clock_ns(2);
        let e = r.take_error().expect("the failure is reported");
        assert!(matches!(e, InputsError::LogWrite(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "writing the record log failed: I/O error writing the log: disk gone"
        );
        // The first failure is kept; later entries are dropped, even once
        // the sink works again (the log has a hole: it must end here).
        *sink.fail.lock().unwrap() = false;
        r.clock_ns(3);
        assert_eq!(sink.entries.lock().unwrap().len(), 1);
        assert!(r.flush().is_err());
        // The guest's outputs still reach the world.
        r.emit(Output {
            exit_seq: 3,
            kind: OutputKind::Console,
            bytes: b"x".to_vec(),
            produced: std::time::Instant::now(),
        })
        .unwrap();
        assert_eq!(host.emitted.lock().unwrap().len(), 1);
        assert!(r.take_error().is_some());
    }
}
