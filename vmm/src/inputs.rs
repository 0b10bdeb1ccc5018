//! The determinism boundary: the one interface through which host-to-guest
//! values enter the VM.
//!
//! Every call happens while the vCPU is stopped at an exit numbered
//! `exit_seq` (the VM's logical clock). The live implementation reads the
//! host; a recorder wraps it and logs `(exit_seq, value)`; a replayer returns
//! the logged value for the same `exit_seq`. Device models never read the
//! host themselves.
//!
//! Every `Inputs` is also the VM's [`Outputs`] (the other direction of the
//! same boundary): the object that knows how an input is obtained (live,
//! from the log) also knows what to do with an output (send it, log its
//! hash, check it against the log).

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;

use crate::devices::virtio::net::tap::TapReceiver;
use crate::outputs::{LiveOutputs, Output, Outputs};
pub use recordlog::{Fingerprint, Input, SyncPoint};

/// Host-to-guest values, requested by the run loop and the devices at exits.
pub trait Inputs: Outputs + Send {
    /// Virtual monotonic time in ns (PIT counter reads, port 0x61).
    fn clock_ns(&mut self, exit_seq: u64) -> u64;
    /// Wall-clock time in ns since the Unix epoch (RTC reads).
    fn wall_clock_ns(&mut self, exit_seq: u64) -> u64;
    /// Has virtual time reached `deadline_ns` (the next timer interrupt)?
    /// Only a `true` answer is an input worth logging.
    fn deadline_reached(&mut self, exit_seq: u64, deadline_ns: u64) -> bool;
    /// Bytes that arrived on the serial console since the last call.
    fn console_input(&mut self, exit_seq: u64) -> Option<Vec<u8>>;
    /// The next network frame that arrived, if any. Asked only while the
    /// guest's NIC has a receive buffer posted (a deterministic condition),
    /// at most `MAX_RX_PER_EXIT` times per exit.
    fn net_frame(&mut self, _exit_seq: u64) -> Option<Vec<u8>> {
        None
    }
    /// The guest halted with nothing pending: wait until `deadline_ns`
    /// (virtual) or until input (console bytes, a frame) may have arrived. Live only; a replayer
    /// returns at once because its inputs come from the log.
    /// Returns `false` when nothing can ever wake the guest again.
    fn wait_idle(&mut self, exit_seq: u64, deadline_ns: Option<u64>) -> bool;
    /// An interrupt with `vector` was injected at `exit_seq`. The recorder
    /// logs it; the replayer checks it against the log.
    fn interrupt_injected(&mut self, exit_seq: u64, vector: u8) -> Result<(), Divergence>;
    /// Host time at which `deadline_ns` falls, for kicking a vCPU that does
    /// not exit by itself. `None` when virtual time is not host time (replay).
    fn host_instant_of(&self, deadline_ns: u64) -> Option<Instant>;
    /// How much longer a vCPU that has not exited by the host instant of a
    /// deadline may run before it is kicked: CPU time of the vCPU thread,
    /// so that a thread the host did not schedule is not kicked for it.
    fn kick_grace(&self) -> Duration {
        Duration::ZERO
    }

    // ---- Verification and sync points (DESIGN.md rules 4 and 5). The live
    // ---- implementation keeps the defaults: nothing to log or check.

    /// Take a fingerprint every this many exits (`None`: never).
    fn fingerprint_interval(&self) -> Option<u64> {
        None
    }
    /// A fingerprint at `exit_seq`: the recorder logs it, the replayer
    /// compares it with the log.
    fn fingerprint(&mut self, _exit_seq: u64, _fp: &Fingerprint) -> Result<(), Divergence> {
        Ok(())
    }
    /// A mismatch found inside a call that returns a value (replayer).
    fn take_divergence(&mut self) -> Option<Divergence> {
        None
    }
    /// Recorder: should a sync point be captured now, before the vCPU
    /// re-enters the guest at `exit_seq`?
    fn wants_sync_point(&mut self, _exit_seq: u64, _reason: SyncReason) -> bool {
        false
    }
    /// Recorder: a captured sync point, to be logged.
    fn sync_point(&mut self, _exit_seq: u64, _sp: SyncPoint) -> Result<(), Divergence> {
        Ok(())
    }
    /// Replayer, before the exit `exit_seq` is serviced: the recorder's
    /// final sync point, when the log ends with it at this exit (its `End`,
    /// a handover's too, right behind it). A recorder that stopped here
    /// (a pause, a signal, `--stop-at`, a switchover's handover) captured
    /// it before servicing the exit, so the replay must apply it before
    /// servicing it too: an interrupt pending here was never injected by
    /// the recorder.
    fn take_final_sync_point(&mut self, _exit_seq: u64) -> Option<SyncPoint> {
        None
    }
    /// Replayer: the logged sync point to apply at `exit_seq` instead of
    /// running the guest, if the log has one there.
    fn take_sync_point(&mut self, _exit_seq: u64) -> Option<SyncPoint> {
        None
    }
    /// Replayer in repair mode, after a divergence: skip the log to the next
    /// sync point and return it (with the exit it was taken at). `None`:
    /// not repairing, or the log has no further sync point.
    fn skip_to_sync_point(&mut self) -> Option<(u64, SyncPoint)> {
        None
    }
    /// Replayer in repair mode: the replay diverged (`divergence`), just
    /// before [`Inputs::skip_to_sync_point`]. A live secondary asks its
    /// primary for a sync point now instead of waiting for the next one.
    fn diverged(&mut self, _divergence: &Divergence) {}
    /// Replayer in repair mode: `divergence` was repaired by adopting the
    /// sync point at `sync_exit`.
    fn repaired(&mut self, _divergence: &Divergence, _sync_exit: u64) {}
    /// Is this the replaying side? A replayer ignores exits that are not
    /// clock ticks (interrupt-window exits): where they land is not
    /// reproducible, and the recorder logged a sync point wherever it
    /// acted on one.
    fn replaying(&self) -> bool {
        false
    }
    /// Replayer: is a divergence repaired (adopting the next sync point)
    /// rather than ending the run?
    fn repairs(&self) -> bool {
        false
    }
    /// A failure of the inputs themselves (the log cannot be written or
    /// read): ends the run with this error.
    fn take_error(&mut self) -> Option<InputsError> {
        None
    }
    /// Replayer: the vCPU is about to leave `exit_seq` (re-enter the
    /// guest). Anything the log still holds for this exit or an earlier one
    /// is an event the replay did not reproduce: a divergence.
    fn leaving_exit(&mut self, _exit_seq: u64) -> Result<(), Divergence> {
        Ok(())
    }
    /// Replayer: the guest ended (exit status, reset, halt) at `exit_seq`.
    /// If the recorded run did not end there, that is a divergence (which a
    /// repairing replayer repairs with the next sync point).
    fn guest_ended(&mut self, _exit_seq: u64) -> Result<(), Divergence> {
        Ok(())
    }
    /// Replayer: the log has ended at `exit_seq` (nothing more will come):
    /// stop here instead of running ahead of the primary.
    fn ended(&mut self, _exit_seq: u64) -> bool {
        false
    }
}

/// Why a sync point is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncReason {
    /// The vCPU was kicked (not an exit): the primary must ship its state.
    Kick,
    /// The periodic checkpoint (carries a full state digest).
    Interval,
}

/// A failure of an [`Inputs`] implementation itself (not of the guest):
/// ends the run ([`crate::run::RunError::Inputs`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum InputsError {
    /// A recorder could not write its log (file or network queue).
    #[error("writing the record log failed: {0}")]
    LogWrite(std::sync::Arc<dyn std::error::Error + Send + Sync>),
    /// A replayer met damage in its log (the error names the offset).
    #[error("{0}")]
    LogDamaged(std::sync::Arc<dyn std::error::Error + Send + Sync>),
}

impl InputsError {
    /// A recorder's log write failed with `e`.
    pub fn log_write(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        InputsError::LogWrite(std::sync::Arc::new(e))
    }

    /// A replayer's log is damaged: `e` says where and how.
    pub fn log_damaged(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        InputsError::LogDamaged(std::sync::Arc::new(e))
    }
}

/// A replayed run disagreed with its log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("divergence at exit {exit_seq}: expected {expected}, found {found}")]
pub struct Divergence {
    /// The exit at which the replay and the log disagree.
    pub exit_seq: u64,
    /// What the log (the recorded run) has.
    pub expected: String,
    /// What the replay produced.
    pub found: String,
}

/// The live implementation: the host's clocks and console.
pub struct LiveInputs {
    start: Instant,
    /// Virtual ns at `start` (non-zero after a restore: virtual time
    /// continues from the snapshot).
    base_ns: u64,
    console: Option<Receiver<Vec<u8>>>,
    /// Bytes that arrived while waiting in `wait_idle`, handed to the guest
    /// at the next `console_input`.
    pending: Vec<u8>,
    /// Frames from the TAP's reader thread.
    net: Option<TapReceiver>,
    /// A frame that arrived while waiting in `wait_idle` (at most one: a
    /// guest without receive buffers is not woken by further frames).
    pending_frame: Option<Vec<u8>>,
    outputs: Box<dyn Outputs>,
    /// Wakes `wait_idle` when the run must stop (a signal).
    wakeup: Option<Receiver<()>>,
    /// How long (CPU time of the vCPU thread) after a timer deadline a vCPU
    /// that has not exited is kicked.
    kick_grace: Duration,
    /// Set by a protected primary's link when its secondary asks for a
    /// sync point (a divergence to repair): taken at the next exit.
    sync_requested: Option<Arc<AtomicBool>>,
}

impl LiveInputs {
    /// Live inputs whose virtual clock starts at `base_ns`, with console
    /// input from `console` (a channel fed by a reader thread).
    pub fn new(base_ns: u64, console: Option<Receiver<Vec<u8>>>) -> Self {
        LiveInputs {
            start: Instant::now(),
            base_ns,
            console,
            pending: Vec::new(),
            net: None,
            pending_frame: None,
            outputs: Box::new(LiveOutputs::discard()),
            wakeup: None,
            kick_grace: Duration::ZERO,
            sync_requested: None,
        }
    }

    /// A sync point is wanted at the next exit whenever `flag` is set (it
    /// is cleared then); `None`: no more requests.
    pub fn set_sync_requests(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.sync_requested = flag;
    }

    /// Send the VM's outputs to `outputs` (default: discarded).
    pub fn with_outputs(mut self, outputs: Box<dyn Outputs>) -> Self {
        self.outputs = outputs;
        self
    }

    /// Send the VM's outputs to `outputs` from now on; returns where they
    /// went so far (a running VM that becomes protected, and back).
    pub fn replace_outputs(&mut self, outputs: Box<dyn Outputs>) -> Box<dyn Outputs> {
        std::mem::replace(&mut self.outputs, outputs)
    }

    /// A message on `wakeup` ends an idle wait (the run loop then sees why,
    /// e.g. its pause flag).
    pub fn with_wakeup(mut self, wakeup: Receiver<()>) -> Self {
        self.wakeup = Some(wakeup);
        self
    }

    /// Take received frames from `net` (a TAP's reader thread).
    pub fn with_net(mut self, net: Option<TapReceiver>) -> Self {
        self.net = net;
        self
    }

    /// Frames the host dropped before the guest could take them (queue
    /// full), so far.
    pub fn net_frames_dropped(&self) -> u64 {
        self.net
            .as_ref()
            .map_or(0, |n| n.dropped.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Kick a vCPU that has not exited only once it ran `grace` (CPU time)
    /// past a deadline, so that guests which exit often take their
    /// interrupts at exits (a recorder then needs no sync point).
    pub fn with_kick_grace(mut self, grace: Duration) -> Self {
        self.kick_grace = grace;
        self
    }

    /// Spawn a thread that forwards bytes from `reader` (e.g. stdin) and
    /// return the receiving end for [`LiveInputs::new`].
    pub fn spawn_console_reader<R: Read + Send + 'static>(mut reader: R) -> Receiver<Vec<u8>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                let mut buf = [0u8; 256];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tx.send(buf[..n].to_vec()).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .expect("spawn console reader thread");
        rx
    }

    fn now_ns(&self) -> u64 {
        self.base_ns + self.start.elapsed().as_nanos() as u64
    }
}

impl Outputs for LiveInputs {
    fn emit(&mut self, output: Output) -> Result<(), Divergence> {
        self.outputs.emit(output)
    }
}

impl Inputs for LiveInputs {
    fn clock_ns(&mut self, _exit_seq: u64) -> u64 {
        self.now_ns()
    }

    fn wall_clock_ns(&mut self, _exit_seq: u64) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }

    fn deadline_reached(&mut self, _exit_seq: u64, deadline_ns: u64) -> bool {
        self.now_ns() >= deadline_ns
    }

    fn console_input(&mut self, _exit_seq: u64) -> Option<Vec<u8>> {
        let mut out = std::mem::take(&mut self.pending);
        while let Some(rx) = self.console.as_ref() {
            match rx.try_recv() {
                Ok(bytes) => out.extend_from_slice(&bytes),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => self.console = None,
            }
        }
        (!out.is_empty()).then_some(out)
    }

    fn net_frame(&mut self, _exit_seq: u64) -> Option<Vec<u8>> {
        if let Some(f) = self.pending_frame.take() {
            return Some(f);
        }
        self.net.as_ref()?.frames.try_recv().ok()
    }

    fn wait_idle(&mut self, _exit_seq: u64, deadline_ns: Option<u64>) -> bool {
        let timeout = deadline_ns.map(|d| Duration::from_nanos(d.saturating_sub(self.now_ns())));
        if !self.pending.is_empty() {
            return true;
        }
        let net = match (&self.net, &self.pending_frame) {
            (Some(n), None) => Some(n.frames.clone()),
            _ => None,
        };
        if self.console.is_none() && net.is_none() && self.wakeup.is_none() {
            return match timeout {
                Some(t) => {
                    std::thread::sleep(t);
                    true
                }
                None => false,
            };
        }
        let mut sel = crossbeam_channel::Select::new();
        let console_i = self.console.as_ref().map(|rx| sel.recv(rx));
        let net_i = net.as_ref().map(|rx| sel.recv(rx));
        let wake_i = self.wakeup.as_ref().map(|rx| sel.recv(rx));
        let op = match timeout {
            Some(t) => match sel.select_timeout(t) {
                Ok(op) => op,
                Err(_) => return true,
            },
            None => sel.select(),
        };
        let i = op.index();
        if Some(i) == console_i {
            let rx = self.console.as_ref().expect("selected");
            match op.recv(rx) {
                Ok(bytes) => self.pending = bytes,
                Err(_) => self.console = None,
            }
        } else if Some(i) == wake_i {
            let _ = op.recv(self.wakeup.as_ref().expect("selected"));
            self.wakeup = None;
            return true;
        } else if Some(i) == net_i {
            let rx = net.as_ref().expect("selected");
            match op.recv(rx) {
                Ok(frame) => self.pending_frame = Some(frame),
                Err(_) => self.net = None,
            }
        }
        // Woken by input, or by a source closing: with a deadline or another
        // source left, the guest can still be woken.
        deadline_ns.is_some() || self.console.is_some() || self.net.is_some()
    }

    fn interrupt_injected(&mut self, _exit_seq: u64, _vector: u8) -> Result<(), Divergence> {
        Ok(())
    }

    fn wants_sync_point(&mut self, _exit_seq: u64, reason: SyncReason) -> bool {
        reason == SyncReason::Interval
            && self
                .sync_requested
                .as_ref()
                .is_some_and(|f| f.swap(false, Ordering::SeqCst))
    }

    fn host_instant_of(&self, deadline_ns: u64) -> Option<Instant> {
        Some(self.start + Duration::from_nanos(deadline_ns.saturating_sub(self.base_ns)))
    }

    fn kick_grace(&self) -> Duration {
        self.kick_grace
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    #[test]
    fn a_frame_wakes_an_idle_guest_and_is_delivered_once() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        let net = TapReceiver {
            frames: rx,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let mut live = LiveInputs::new(0, None).with_net(Some(net));
        assert_eq!(live.net_frame(0), None);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            tx.send(vec![7u8; 60]).unwrap();
            tx
        });
        // No deadline: only the frame can wake it.
        assert!(live.wait_idle(0, None));
        assert_eq!(live.net_frame(1), Some(vec![7u8; 60]));
        assert_eq!(live.net_frame(1), None);
        // A frame already waiting (the guest has no buffer): further frames
        // do not wake it, the deadline does.
        let tx = sender.join().unwrap();
        tx.send(vec![1; 60]).unwrap();
        assert!(live.wait_idle(2, None));
        tx.send(vec![2; 60]).unwrap();
        let t = Instant::now();
        assert!(live.wait_idle(3, Some(live.now_ns() + 50_000_000)));
        assert!(t.elapsed() >= Duration::from_millis(40));
        assert_eq!(live.net_frame(4), Some(vec![1; 60]));
        assert_eq!(live.net_frame(4), Some(vec![2; 60]));
    }

    #[test]
    fn the_wakeup_ends_an_idle_wait() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let mut live = LiveInputs::new(0, None).with_wakeup(rx);
        tx.send(()).unwrap();
        assert!(live.wait_idle(0, None));
        // Nothing left to wake it: halted for good.
        assert!(!live.wait_idle(0, None));
    }
}
