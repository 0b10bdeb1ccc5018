//! The run loop: KVM_RUN, exit handling, inputs and interrupts at exits.
//!
//! Order at every exit (and at the start of a run, which is "at" the exit
//! the machine was saved or booted at):
//! 1. stop here if asked (`stop_at_exit`), completing pending I/O first;
//!    a replayer whose log ends here with the recorder's final sync point
//!    (taken when the recorder stopped at this step) applies it and ends;
//! 2. take inputs: console bytes, network frames (while the NIC has a
//!    receive buffer), timer deadline (through [`Inputs`]);
//! 3. propagate device interrupt lines to the PIC;
//! 4. inject the PIC's interrupt if the vCPU can take it, else ask for an
//!    interrupt-window exit;
//! 5. sync points: a replayer applies the logged one instead of running
//!    (then goes back to 2); a recorder captures a periodic one (and also
//!    goes back to 2, so both sides make the same calls in the same order);
//! 6. arm the kicker at the host time of the next timer deadline (plus the
//!    grace, in vCPU CPU time, of [`Inputs::kick_grace`]);
//! 7. `KVM_RUN`; a guest-caused exit increments `exit_seq`, is handled, its
//!    outputs (console bytes, sent frames) are emitted through
//!    [`crate::outputs::Outputs`] tagged with that `exit_seq`, and every N
//!    exits it is fingerprinted.
//!
//! Console bytes of a line not yet ended when a run stops (`Stopped`,
//! `Paused`, `LogEnded`) stay in the serial device's state: they move with
//! a snapshot or a migration and leave with the rest of their line.
//!
//! A kick (`EINTR`) is not an exit: nothing is counted. A recorder captures
//! a sync point right after it (DESIGN.md rule 4); the replayer meets that
//! sync point at step 5 of the same exit. The interrupt-window exit is
//! treated the same way: DESIGN.md counts it, but on this project's
//! PVM-based KVM it does not land at a reproducible instruction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::devices::IoAction;
use crate::inputs::{Divergence, Fingerprint, Inputs, InputsError, SyncReason};
use crate::kick::KickCheck;
use crate::machine::Machine;
use crate::outputs::Output;
use crate::sync::SyncError;
use crate::throttle::{DutyCycle, Throttle};
use crate::vstate::vcpu::VcpuError;
use kvm_ioctls::VcpuExit;

/// How a run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest wrote its status to the debug-exit port.
    Exited(i32),
    /// The guest asked for a reset (i8042 0xfe, KVM system event).
    Reset,
    /// The run reached `stop_at_exit`; state is ready to be captured.
    Stopped,
    /// The guest halted and nothing can ever wake it.
    Halted,
    /// `RunLimits::pause` was raised; state is ready to be captured and
    /// `run` may be called again to continue.
    Paused,
    /// A replayer's log ended (the primary stopped writing); the machine is
    /// at the last exit the log covers.
    LogEnded,
}

/// Where to stop.
#[derive(Debug, Clone, Default)]
pub struct RunLimits {
    /// Stop at this exit (after handling it, before re-entering).
    pub stop_at_exit: Option<u64>,
    /// Pause at the next exit or kick once this is set (see
    /// [`crate::vstate::vcpu::Kicker::kick_now`] to force one).
    pub pause: Option<Arc<AtomicBool>>,
    /// Auto-converge: hold the guest this share of the time (see
    /// [`crate::throttle`]).
    pub throttle: Option<Arc<Throttle>>,
}

/// Counters of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Kicks (exits the guest did not cause).
    pub kicks: u64,
    /// Sync points captured or applied.
    pub sync_points: u64,
    /// Fingerprints logged or checked.
    pub fingerprints: u64,
    /// Divergences found and repaired (replay with repair).
    pub repaired: u64,
    /// Kicks' sync points a replayer reached at their instruction and
    /// verified in full there ([`crate::kick`]).
    pub kicks_verified: u64,
    /// Kicks' sync points adopted unverified: their instruction was more
    /// breakpoint hits away than the replayer may spend.
    pub kicks_unverified: u64,
    /// The exit of the sync point that repaired the last divergence: the
    /// replica is exact again from there on.
    pub last_repair_exit: Option<u64>,
}

/// A run that ended in error. The report says what the vCPU was doing.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("KVM could not emulate a guest instruction (KVM_EXIT_INTERNAL_ERROR, suberror {suberror}) at exit {exit_seq}\n{report}")]
    /// KVM could not emulate an instruction.
    Emulation {
        /// KVM's suberror.
        suberror: u32,
        /// The exit at which it happened.
        exit_seq: u64,
        /// RIP, instruction bytes, registers.
        report: String,
    },
    #[error("the guest triple-faulted (KVM_EXIT_SHUTDOWN) at exit {exit_seq}\n{report}")]
    /// The guest triple-faulted.
    TripleFault {
        /// The exit at which it happened.
        exit_seq: u64,
        /// RIP, instruction bytes, registers.
        report: String,
    },
    #[error("VM entry failed (hardware reason {reason:#x}) at exit {exit_seq}\n{report}")]
    /// VM entry failed.
    FailEntry {
        /// The hardware's reason.
        reason: u64,
        /// The exit at which it happened.
        exit_seq: u64,
        /// RIP, instruction bytes, registers.
        report: String,
    },
    #[error("unexpected VM exit {what} at exit {exit_seq}\n{report}")]
    /// An exit the run loop does not handle.
    Unexpected {
        /// The exit, as KVM reported it.
        what: String,
        /// The exit at which it happened.
        exit_seq: u64,
        /// RIP, instruction bytes, registers.
        report: String,
    },
    #[error("KVM_RUN failed: {0}")]
    /// KVM_RUN itself failed.
    Kvm(kvm_ioctls::Error),
    #[error(transparent)]
    /// Reading or setting vCPU state failed.
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    /// A replay disagreed with its log.
    Divergence(#[from] Divergence),
    #[error(transparent)]
    /// The inputs failed (the log cannot be written or read).
    Inputs(#[from] InputsError),
    #[error("sync point at exit {exit_seq}: {source}")]
    /// A sync point could not be captured or applied.
    Sync {
        /// The exit of the sync point.
        exit_seq: u64,
        /// Why.
        source: SyncError,
    },
    /// A host I/O error on the disk image: the vCPU is stopped at exit
    /// `exit_seq` with the request not completed (the guest saw nothing).
    /// Calling [`Machine::run`] again retries it; the machine's state
    /// cannot be saved meanwhile.
    #[error("{source} at exit {exit_seq}")]
    DiskIo {
        /// The exit the vCPU is stopped at.
        exit_seq: u64,
        /// The failed request.
        source: crate::devices::virtio::block::HostIoError,
    },
}

/// Errors the inputs found (replay divergences, log failures).
fn check_inputs(inputs: &mut dyn Inputs) -> Result<(), RunError> {
    if let Some(e) = inputs.take_error() {
        return Err(RunError::Inputs(e));
    }
    match inputs.take_divergence() {
        Some(d) => Err(RunError::Divergence(d)),
        None => Ok(()),
    }
}

/// How a pending interrupt that the vCPU cannot take yet (interrupts
/// disabled, an interrupt shadow) waits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum BlockedIrq {
    /// None is pending and blocked.
    #[default]
    No,
    /// For the guest's next exit, within the kick grace: a guest that
    /// exits often takes it there (an interrupt-window exit is handled as
    /// a kick and costs a recorder a sync point).
    UntilExit,
    /// For the interrupt window (no kick grace, or it ran out).
    Window,
}

/// What a handled exit asks for.
enum Next {
    Continue,
    Kicked,
    Halt,
    End(RunOutcome),
}

impl Machine {
    /// Run until the guest ends, errs, or reaches a limit.
    pub fn run(
        &mut self,
        inputs: &mut dyn Inputs,
        limits: RunLimits,
    ) -> Result<RunOutcome, RunError> {
        self.run_inner(inputs, limits)
    }

    /// Hand the devices' outputs at the current exit to `inputs`' outputs;
    /// with `force`, console bytes that wait for the end of their line too.
    /// A live run that ends by being stopped calls this once with `force`
    /// (its last partial line); a recorder does not (the bytes stay in the
    /// device state of the log's final sync point).
    pub fn emit_outputs(&mut self, inputs: &mut dyn Inputs, force: bool) -> Result<(), RunError> {
        let exit_seq = self.exit_seq;
        let produced = std::time::Instant::now();
        for (kind, bytes) in self.devices.take_outputs(force) {
            inputs.emit(Output {
                exit_seq,
                kind,
                bytes,
                produced,
            })?;
        }
        Ok(())
    }

    fn run_inner(
        &mut self,
        inputs: &mut dyn Inputs,
        limits: RunLimits,
    ) -> Result<RunOutcome, RunError> {
        let kicker = self.vcpu.kicker().clone();
        kicker.bind_current_thread();
        let mut duty = DutyCycle::default();
        if self.devices.block_stalled().is_some() {
            // Stopped by a host I/O error in the middle of an exit: finish
            // that exit first, as if it had never failed.
            self.devices
                .retry_block(&self.vm.memory)
                .map_err(|source| RunError::DiskIo {
                    exit_seq: self.exit_seq,
                    source,
                })?;
            tracing::info!(exit_seq = self.exit_seq, "disk request retried");
            self.after_exit(inputs, false)?;
        }
        loop {
            // Throttled: sleep here once the guest ran its share (ends at
            // once when a pause is raised, checked next).
            let throttle_kick = limits
                .throttle
                .as_ref()
                .and_then(|t| duty.at_exit(t, limits.pause.as_deref()));
            if limits.stop_at_exit == Some(self.exit_seq) {
                self.vcpu.complete_pending_io()?;
                return Ok(RunOutcome::Stopped);
            }
            if limits
                .pause
                .as_ref()
                .is_some_and(|p| p.load(Ordering::SeqCst))
            {
                self.vcpu.complete_pending_io()?;
                return Ok(RunOutcome::Paused);
            }
            // A recorder that stopped at this exit (as just above) logged
            // its final sync point before servicing it: the replay ends
            // there too, without servicing it.
            if let Some(sp) = inputs.take_final_sync_point(self.exit_seq) {
                let seq = self.exit_seq;
                self.replay_sync_point(inputs, seq, &sp)?;
                if inputs.ended(seq) {
                    self.vcpu.complete_pending_io()?;
                    return Ok(RunOutcome::LogEnded);
                }
                continue;
            }
            let serviced = if std::mem::take(&mut self.skip_service) {
                Ok(())
            } else {
                self.service(inputs).and_then(|()| check_inputs(inputs))
            };
            if let Err(e) = serviced {
                self.repair(inputs, e)?;
                continue;
            }
            let seq = self.exit_seq;
            if let Some(sp) = inputs.take_sync_point(seq) {
                self.replay_sync_point(inputs, seq, &sp)?;
                continue;
            }
            if self.sync.is_some() && inputs.wants_sync_point(seq, SyncReason::Interval) {
                self.record_sync_point(inputs, true)?;
                continue;
            }
            if inputs.ended(seq) {
                self.vcpu.complete_pending_io()?;
                return Ok(RunOutcome::LogEnded);
            }
            if let Err(d) = inputs.leaving_exit(seq) {
                self.repair(inputs, RunError::Divergence(d))?;
                continue;
            }
            // A pending interrupt the guest cannot take yet waits for the
            // interrupt window, which ends the run by itself: no kick; or
            // for the next exit, kicked if none comes within the grace.
            let deadline = self.devices.pit.next_irq0_deadline();
            let timer_kick = if self.blocked_irq == BlockedIrq::UntilExit {
                Some(std::time::Instant::now())
            } else if self.devices.pic.interrupt_pending() {
                None
            } else {
                deadline.and_then(|d| inputs.host_instant_of(d))
            };
            // A throttled guest comes back at the end of its share even if
            // it makes no exit.
            let grace = inputs.kick_grace();
            match (timer_kick, throttle_kick) {
                (Some(t), th) if th.is_none_or(|th| t + grace <= th) => kicker.arm_after(t, grace),
                (_, Some(th)) => kicker.arm(th),
                _ => {}
            }
            let next = self.run_once(inputs);
            kicker.disarm();
            let next = match next {
                Err(RunError::Divergence(d)) => {
                    self.repair(inputs, RunError::Divergence(d))?;
                    continue;
                }
                other => other?,
            };
            match next {
                Next::Continue => {}
                Next::Kicked if inputs.replaying() => {
                    // Not a point the recorder saw (see `Inputs::replaying`):
                    // run on to the next exit without acting on it.
                    self.vcpu.request_interrupt_window(false);
                    self.skip_service = true;
                }
                Next::Kicked => {
                    self.stats.kicks += 1;
                    if self.blocked_irq == BlockedIrq::UntilExit {
                        // No exit within the grace: the interrupt window.
                        self.blocked_irq = BlockedIrq::Window;
                    }
                    self.vcpu.derive_readiness_from_state()?;
                    if self.sync.is_some() && inputs.wants_sync_point(seq, SyncReason::Kick) {
                        self.record_sync_point(inputs, false)?;
                    }
                }
                Next::End(outcome) => {
                    // A diverged replay may end where the recording did not.
                    if let Err(d) = inputs.guest_ended(self.exit_seq) {
                        self.repair(inputs, RunError::Divergence(d))?;
                        continue;
                    }
                    return Ok(outcome);
                }
                Next::Halt => {
                    // The guest waits for an interrupt. If one is already
                    // pending, `service` injects it; otherwise wait for
                    // the next event (live) or take it from the log.
                    self.devices.update_irq_lines();
                    if self.devices.pic.interrupt_pending() {
                        continue;
                    }
                    if !self.vcpu.interrupts_enabled() {
                        if let Err(d) = inputs.guest_ended(self.exit_seq) {
                            self.repair(inputs, RunError::Divergence(d))?;
                            continue;
                        }
                        return Ok(RunOutcome::Halted);
                    }
                    let deadline = self.devices.pit.next_irq0_deadline();
                    if !inputs.wait_idle(self.exit_seq, deadline) {
                        return Ok(RunOutcome::Halted);
                    }
                }
            }
        }
    }

    fn record_sync_point(
        &mut self,
        inputs: &mut dyn Inputs,
        with_digest: bool,
    ) -> Result<(), RunError> {
        let seq = self.exit_seq;
        let sp = self
            .capture_sync_point(with_digest)
            .map_err(|source| RunError::Sync {
                exit_seq: seq,
                source,
            })?;
        // The replayer decides readiness from the state it applies; so
        // does the recorder at the same point.
        self.vcpu.derive_readiness_from_state()?;
        inputs.sync_point(seq, sp)?;
        self.stats.sync_points += 1;
        Ok(())
    }

    /// A divergence: without repair it ends the run; with repair, roll back
    /// to the last sync point and adopt the next one from the log.
    fn repair(&mut self, inputs: &mut dyn Inputs, err: RunError) -> Result<(), RunError> {
        let RunError::Divergence(d) = err else {
            return Err(err);
        };
        if inputs.repairs() {
            inputs.diverged(&d);
        }
        let Some((seq, sp)) = inputs.skip_to_sync_point() else {
            // A damaged log met while looking for the sync point is damage,
            // not a divergence.
            check_inputs(inputs)?;
            return Err(RunError::Divergence(d));
        };
        tracing::warn!("{d}; repairing with the sync point at exit {seq}");
        let sync = |source| RunError::Sync {
            exit_seq: seq,
            source,
        };
        self.roll_back_to_checkpoint().map_err(sync)?;
        self.exit_seq = seq;
        self.apply_sync_point(seq, &sp).map_err(sync)?;
        self.stats.sync_points += 1;
        self.stats.repaired += 1;
        self.stats.last_repair_exit = Some(seq);
        inputs.repaired(&d, seq);
        Ok(())
    }

    /// Inputs, interrupt lines and injection at the current exit.
    fn service(&mut self, inputs: &mut dyn Inputs) -> Result<(), RunError> {
        let seq = self.exit_seq;
        if let Some(bytes) = inputs.console_input(seq) {
            self.devices.serial.enqueue_input(&bytes);
        }
        if let Some(net) = &mut self.devices.net {
            let mem = &self.vm.memory;
            for _ in 0..crate::devices::virtio::net::MAX_RX_PER_EXIT {
                if !net.rx_ready(mem) {
                    break;
                }
                let Some(frame) = inputs.net_frame(seq) else {
                    break;
                };
                net.receive(&frame, mem);
            }
        }
        if let Some(d) = self.devices.pit.next_irq0_deadline() {
            if inputs.deadline_reached(seq, d) {
                self.devices.pit.irq0_deadline_reached();
                self.devices.pic.raise_irq(crate::devices::bus::TIMER_IRQ);
            }
        }
        self.devices.update_irq_lines();
        if !self.devices.pic.interrupt_pending() {
            self.vcpu.request_interrupt_window(false);
            self.blocked_irq = BlockedIrq::No;
            return Ok(());
        }
        if self.vcpu.ready_for_interrupt() {
            if let Some(vector) = self.devices.pic.acknowledge() {
                self.vcpu.inject(vector)?;
                inputs.interrupt_injected(seq, vector)?;
            }
            self.vcpu.request_interrupt_window(false);
            self.blocked_irq = BlockedIrq::No;
        } else if self.blocked_irq != BlockedIrq::Window && !inputs.kick_grace().is_zero() {
            // The kick grace holds for a blocked interrupt as for a timer
            // deadline: the guest may take it at its next exit.
            self.vcpu.request_interrupt_window(false);
            self.blocked_irq = BlockedIrq::UntilExit;
        } else {
            self.vcpu.request_interrupt_window(true);
            self.blocked_irq = BlockedIrq::Window;
        }
        Ok(())
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self, inputs: &mut dyn Inputs) -> Result<Next, RunError> {
        // A readiness decided at the last exit does not outlive it.
        self.vcpu.forget_readiness_override();
        let exit = match self.vcpu.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: not an exit the guest caused.
                return Ok(Next::Kicked);
            }
            Err(e) => return Err(RunError::Kvm(e)),
        };
        if matches!(exit, VcpuExit::IrqWindowOpen) {
            // Not a clock tick: on PVM-based KVM the interrupt-window exit
            // lands at a different instruction from run to run (seen as
            // fingerprint mismatches), so it is handled like a kick: the
            // recorder ships a sync point, the replayer never depends on
            // where it lands.
            return Ok(Next::Kicked);
        }
        self.exit_seq += 1;
        let seq = self.exit_seq;
        let devices = &mut self.devices;
        let next = match exit {
            VcpuExit::IoIn(port, data) => {
                devices.pio_in(port, data, seq, inputs);
                Next::Continue
            }
            VcpuExit::IoOut(port, data) => match devices.pio_out(port, data, seq, inputs) {
                IoAction::None => Next::Continue,
                IoAction::Exit(status) => Next::End(RunOutcome::Exited(status)),
                IoAction::Reset => Next::End(RunOutcome::Reset),
            },
            VcpuExit::MmioRead(addr, data) => {
                devices.mmio_read(addr, data);
                Next::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                if let Err(source) = devices.mmio_write(addr, data, &self.vm.memory) {
                    // The rest of this exit waits for the retry.
                    return Err(RunError::DiskIo {
                        exit_seq: seq,
                        source,
                    });
                }
                Next::Continue
            }
            VcpuExit::Hlt => Next::Halt,
            VcpuExit::Debug(_) => Next::Continue,
            VcpuExit::SystemEvent(kind, _) => {
                if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    Next::End(RunOutcome::Reset)
                } else {
                    Next::End(RunOutcome::Halted)
                }
            }
            VcpuExit::Shutdown => {
                return Err(RunError::TripleFault {
                    exit_seq: seq,
                    report: self.vcpu.crash_report(&self.vm.memory),
                })
            }
            VcpuExit::InternalError => {
                let suberror = self.vcpu.internal_error_suberror();
                return Err(RunError::Emulation {
                    suberror,
                    exit_seq: seq,
                    report: self.vcpu.crash_report(&self.vm.memory),
                });
            }
            VcpuExit::FailEntry(reason, _) => {
                return Err(RunError::FailEntry {
                    reason,
                    exit_seq: seq,
                    report: self.vcpu.crash_report(&self.vm.memory),
                })
            }
            other => {
                let what = format!("{other:?}");
                return Err(RunError::Unexpected {
                    what,
                    exit_seq: seq,
                    report: self.vcpu.crash_report(&self.vm.memory),
                });
            }
        };
        // A halting guest's console is flushed (its prompt is shown while
        // it waits).
        self.after_exit(inputs, matches!(next, Next::Halt | Next::End(_)))?;
        Ok(next)
    }

    /// The end of a handled exit: its outputs (console bytes cut now if
    /// `flush`), its fingerprint when one is due, the inputs' errors.
    fn after_exit(&mut self, inputs: &mut dyn Inputs, flush: bool) -> Result<(), RunError> {
        let seq = self.exit_seq;
        self.emit_outputs(inputs, flush)?;
        if let Some(n) = inputs.fingerprint_interval() {
            if n > 0 && seq.is_multiple_of(n) {
                let fp = self.fingerprint(seq)?;
                self.stats.fingerprints += 1;
                inputs.fingerprint(seq, &fp)?;
            }
        }
        check_inputs(inputs)
    }

    /// Replayer: apply a logged sync point; a difference it reveals is a
    /// divergence (an error unless repairing).
    pub fn replay_sync_point(
        &mut self,
        inputs: &mut dyn Inputs,
        seq: u64,
        sp: &crate::inputs::SyncPoint,
    ) -> Result<(), RunError> {
        let sync = |source| RunError::Sync {
            exit_seq: seq,
            source,
        };
        // A kick's sync point (no digest: the recorder's state at an
        // instruction after this exit) is reached and verified first.
        let kick = if sp.digest == recordlog::Digest::ZERO && self.sync.is_some() {
            Some(self.seek_kick(sp).map_err(sync)?)
        } else {
            None
        };
        let applied = self.apply_sync_point(seq, sp).map_err(sync)?;
        self.stats.sync_points += 1;
        let kick_miss = match kick {
            Some(KickCheck::Reached) if !applied.diverged() => {
                self.stats.kicks_verified += 1;
                None
            }
            Some(KickCheck::Missed { rip, found }) => Some((rip, found)),
            Some(KickCheck::OverBudget) => {
                self.stats.kicks_unverified += 1;
                None
            }
            Some(KickCheck::Unsupported(why)) => {
                if !self.kick_check_warned {
                    self.kick_check_warned = true;
                    tracing::warn!("kicks' sync points are adopted unverified: {why}");
                }
                None
            }
            _ => None,
        };
        if applied.diverged() || kick_miss.is_some() {
            let (expected, found) = match (kick_miss, applied.digest_mismatch) {
                (Some((rip, found)), _) => (
                    format!(
                        "the primary's state at the instruction it was kicked at (RIP {rip:#x})"
                    ),
                    found,
                ),
                (None, Some(own)) => (
                    format!("state digest {}", sp.digest.to_hex()),
                    format!("state digest {}", own.to_hex()),
                ),
                (None, None) => (
                    "the primary's memory at the sync point".into(),
                    format!("{} pages written only by the replayer", applied.rolled_back),
                ),
            };
            let d = Divergence {
                exit_seq: seq,
                expected,
                found,
            };
            if !inputs.repairs() {
                return Err(RunError::Divergence(d));
            }
            tracing::warn!(
                exit_seq = seq,
                ?applied,
                "divergence repaired by a sync point"
            );
            self.stats.repaired += 1;
            self.stats.last_repair_exit = Some(seq);
            inputs.repaired(&d, seq);
        }
        Ok(())
    }

    /// The cheap per-exit check: exit reason, RIP, a few registers.
    fn fingerprint(&mut self, _seq: u64) -> Result<Fingerprint, RunError> {
        let exit_reason = self.vcpu.fd.get_kvm_run().exit_reason;
        let regs = self.vcpu.fd.get_regs().map_err(|source| VcpuError::State {
            what: "KVM_GET_REGS",
            source,
        })?;
        Ok(Fingerprint {
            exit_reason,
            rip: regs.rip,
            rax: regs.rax,
            rcx: regs.rcx,
            rflags: regs.rflags,
        })
    }
}
