//! The run loop: KVM_RUN, exit handling, inputs and interrupts at exits.
//!
//! Order at every exit (and at the start of a run, which is "at" the exit
//! the machine was saved or booted at):
//! 1. stop here if asked (`stop_at_exit`), completing pending I/O first;
//! 2. take inputs: console bytes, timer deadline (through [`Inputs`]);
//! 3. propagate device interrupt lines to the PIC;
//! 4. inject the PIC's interrupt if the vCPU can take it, else ask for an
//!    interrupt-window exit;
//! 5. arm the kicker at the host time of the next timer deadline;
//! 6. `KVM_RUN`; a guest-caused exit increments `exit_seq` and is handled.
//!
//! A kick (`EINTR`) is not an exit: nothing is counted. In this live-only
//! version the due interrupt is then delivered at the kick point; recording
//! turns such a delivery into a sync point (DESIGN.md rule 4).

use crate::devices::IoAction;
use crate::inputs::{Divergence, Inputs};
use crate::machine::Machine;
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
}

/// Where to stop.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunLimits {
    /// Stop at this exit (after handling it, before re-entering).
    pub stop_at_exit: Option<u64>,
}

/// A run that ended in error. The report says what the vCPU was doing.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("KVM could not emulate a guest instruction (KVM_EXIT_INTERNAL_ERROR, suberror {suberror}) at exit {exit_seq}\n{report}")]
    Emulation {
        suberror: u32,
        exit_seq: u64,
        report: String,
    },
    #[error("the guest triple-faulted (KVM_EXIT_SHUTDOWN) at exit {exit_seq}\n{report}")]
    TripleFault { exit_seq: u64, report: String },
    #[error("VM entry failed (hardware reason {reason:#x}) at exit {exit_seq}\n{report}")]
    FailEntry {
        reason: u64,
        exit_seq: u64,
        report: String,
    },
    #[error("unexpected VM exit {what} at exit {exit_seq}\n{report}")]
    Unexpected {
        what: String,
        exit_seq: u64,
        report: String,
    },
    #[error("KVM_RUN failed: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Divergence(#[from] Divergence),
}

/// What a handled exit asks for.
enum Next {
    Continue,
    Halt,
    End(RunOutcome),
}

impl Machine {
    /// Run until the guest ends, errs, or reaches `limits.stop_at_exit`.
    pub fn run(
        &mut self,
        inputs: &mut dyn Inputs,
        limits: RunLimits,
    ) -> Result<RunOutcome, RunError> {
        let kicker = self.vcpu.kicker().clone();
        kicker.bind_current_thread();
        loop {
            if limits.stop_at_exit == Some(self.exit_seq) {
                self.vcpu.complete_pending_io()?;
                return Ok(RunOutcome::Stopped);
            }
            self.service(inputs)?;
            let deadline = self.devices.pit.next_irq0_deadline();
            if let Some(at) = deadline.and_then(|d| inputs.host_instant_of(d)) {
                kicker.arm(at);
            }
            let next = self.run_once(inputs);
            kicker.disarm();
            match next? {
                Next::Continue => {}
                Next::End(outcome) => return Ok(outcome),
                Next::Halt => {
                    // The guest waits for an interrupt. If one is already
                    // pending, `service` injects it; otherwise wait for
                    // the next event (live) or take it from the log.
                    self.devices.update_irq_lines();
                    if self.devices.pic.interrupt_pending() {
                        continue;
                    }
                    if !self.vcpu.interrupts_enabled() {
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

    /// Inputs, interrupt lines and injection at the current exit.
    fn service(&mut self, inputs: &mut dyn Inputs) -> Result<(), RunError> {
        let seq = self.exit_seq;
        if let Some(bytes) = inputs.console_input(seq) {
            self.devices.serial.enqueue_input(&bytes);
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
            return Ok(());
        }
        if self.vcpu.ready_for_interrupt() {
            if let Some(vector) = self.devices.pic.acknowledge() {
                self.vcpu.inject(vector)?;
                inputs.interrupt_injected(seq, vector)?;
            }
            self.vcpu.request_interrupt_window(false);
        } else {
            self.vcpu.request_interrupt_window(true);
        }
        Ok(())
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self, inputs: &mut dyn Inputs) -> Result<Next, RunError> {
        let exit = match self.vcpu.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: not an exit the guest caused.
                return Ok(Next::Continue);
            }
            Err(e) => return Err(RunError::Kvm(e)),
        };
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
                devices.mmio_write(addr, data, &self.vm.memory);
                Next::Continue
            }
            VcpuExit::Hlt => Next::Halt,
            VcpuExit::IrqWindowOpen | VcpuExit::Debug(_) => Next::Continue,
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
        Ok(next)
    }
}
