//! 16550A UART at 0x3f8 (COM1, IRQ 4), wrapping `vm_superio::Serial`.
//!
//! * Output: bytes the guest writes to THR are gathered in the device and
//!   leave it through the run loop's `Outputs` (DESIGN.md rule 6), cut at
//!   deterministic points by [`SerialDevice::take_output`]: after a newline,
//!   when [`OUTPUT_CHUNK`] bytes wait, and when the run loop forces it (the
//!   guest halts, the run stops). Bytes not yet taken are part of the saved
//!   state, so a sync point or a migration loses none.
//! * Input: console bytes from `Inputs` enter through
//!   [`SerialDevice::enqueue_input`]. The UART's receive FIFO holds 64
//!   bytes; the rest waits in a pending queue inside the device (part of
//!   the saved state) and moves into the FIFO each time the guest has
//!   drained it. The pending queue is bounded by
//!   [`MAX_PENDING_INPUT`]; bytes beyond it are dropped (a guest that never
//!   reads its console cannot make the VMM grow without bound).
//! * Interrupt: vm-superio signals its interrupt through a `Trigger`; ours
//!   only records that it fired. The run loop polls
//!   [`SerialDevice::take_interrupt`] after serial accesses and input, and
//!   raises IRQ 4 on the PIC (an edge, as vm-superio's interrupt is an
//!   event rather than a level).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// Receive FIFO size of vm-superio's UART.
pub const FIFO_SIZE: usize = 64;
/// Console input bytes kept waiting for FIFO space, at most.
pub const MAX_PENDING_INPUT: usize = 1 << 20;
/// Console output bytes gathered before they leave as one output.
pub const OUTPUT_CHUNK: usize = 1024;

const DATA_OFFSET: u8 = 0;
const LCR_OFFSET: u8 = 3;
const MCR_OFFSET: u8 = 4;
const LCR_DLAB_BIT: u8 = 0x80;

/// Errors of the serial device (only restoring a corrupted state can fail).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SerialError {
    /// More bytes in the receive FIFO than it holds.
    #[error("invalid serial state: {0} bytes in the 64-byte receive FIFO")]
    FifoOverflow(usize),
    /// More pending input than the device keeps.
    #[error("invalid serial state: {0} pending input bytes (max {MAX_PENDING_INPUT})")]
    PendingOverflow(usize),
    /// More waiting output than the device gathers.
    #[error("invalid serial state: {0} bytes of waiting output (max {OUTPUT_CHUNK})")]
    OutputOverflow(usize),
    /// Reserved bits set in the interrupt enable register.
    #[error("invalid serial state: interrupt enable register {0:#x}")]
    InterruptEnable(u8),
}

/// vm-superio trigger that records "interrupt raised" for the run loop.
#[derive(Debug, Default)]
pub struct IrqLatch(pub(crate) AtomicBool);

impl Trigger for IrqLatch {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// Where the UART's transmitter puts bytes: a buffer the run loop drains.
#[derive(Debug, Default)]
pub struct SerialOut(pub(crate) Vec<u8>);

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// COM1.
pub struct SerialDevice {
    pub(crate) serial: Serial<IrqLatch, NoEvents, SerialOut>,
    /// Console input waiting for FIFO space.
    pub(crate) pending: VecDeque<u8>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("state", &self.serial.state())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl SerialDevice {
    /// A UART in its reset state.
    pub fn new() -> Self {
        SerialDevice {
            serial: Serial::new(IrqLatch::default(), SerialOut::default()),
            pending: VecDeque::new(),
        }
    }

    /// Rebuild from a vm-superio state (used by restore).
    pub(crate) fn from_parts(
        state: &SerialState,
        pending: &[u8],
        interrupt: bool,
        out: &[u8],
    ) -> Result<Self, SerialError> {
        if out.len() > OUTPUT_CHUNK {
            return Err(SerialError::OutputOverflow(out.len()));
        }
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(SerialError::FifoOverflow(state.in_buffer.len()));
        }
        if pending.len() > MAX_PENDING_INPUT {
            return Err(SerialError::PendingOverflow(pending.len()));
        }
        if state.interrupt_enable & !0x0f != 0 {
            return Err(SerialError::InterruptEnable(state.interrupt_enable));
        }
        let serial = Serial::from_state(
            state,
            IrqLatch::default(),
            NoEvents,
            SerialOut(out.to_vec()),
        )
        .map_err(|_| SerialError::FifoOverflow(state.in_buffer.len()))?;
        // from_state re-fires pending interrupts; the saved flag is the
        // truth.
        serial.interrupt_evt().0.store(interrupt, Ordering::Relaxed);
        Ok(SerialDevice {
            serial,
            pending: pending.iter().copied().collect(),
        })
    }

    /// Guest IN from 0x3f8 + `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        let dlab = self.serial.read(LCR_OFFSET) & LCR_DLAB_BIT != 0;
        let v = self.serial.read(offset);
        if offset == DATA_OFFSET && !dlab && self.serial.fifo_capacity() == FIFO_SIZE {
            self.refill();
        }
        v
    }

    /// Guest OUT to 0x3f8 + `offset` (0..8).
    pub fn write(&mut self, offset: u8, value: u8) {
        // The trigger and the buffer are infallible.
        let _ = self.serial.write(offset, value);
        if offset == MCR_OFFSET {
            // Leaving loopback mode: external input may flow again.
            self.refill();
        }
    }

    /// Console bytes from `Inputs`. Returns how many went into the FIFO at
    /// once; the rest are kept in order and delivered as the guest drains
    /// the FIFO (up to [`MAX_PENDING_INPUT`] waiting bytes).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let before = self.serial.fifo_capacity();
        let room = MAX_PENDING_INPUT - self.pending.len();
        if bytes.len() > room {
            tracing::warn!(
                dropped = bytes.len() - room,
                "serial console input queue full; dropping input"
            );
        }
        self.pending.extend(&bytes[..bytes.len().min(room)]);
        self.refill();
        before - self.serial.fifo_capacity()
    }

    /// Move pending input into the FIFO as far as it has room.
    fn refill(&mut self) {
        let n = self.serial.fifo_capacity().min(self.pending.len());
        if n == 0 {
            return;
        }
        let chunk: Vec<u8> = self.pending.iter().take(n).copied().collect();
        // In loopback mode the UART takes no external input (returns 0).
        if let Ok(taken) = self.serial.enqueue_raw_bytes(&chunk) {
            self.pending.drain(..taken);
        }
    }

    /// Bytes of console input not yet in the FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    /// Did the UART raise its interrupt since the last call? (The run loop
    /// then raises IRQ 4 on the PIC.)
    pub fn take_interrupt(&mut self) -> bool {
        self.serial.interrupt_evt().0.swap(false, Ordering::Relaxed)
    }

    /// The console bytes to emit now, if any: everything gathered, when
    /// it ends with a newline, fills [`OUTPUT_CHUNK`], or `force` is set.
    pub fn take_output(&mut self, force: bool) -> Option<Vec<u8>> {
        let buf = &mut self.serial.writer_mut().0;
        let cut = match buf.last() {
            None => false,
            Some(&b) => force || b == b'\n' || buf.len() >= OUTPUT_CHUNK,
        };
        cut.then(|| std::mem::take(buf))
    }

    /// Console bytes gathered and not yet taken (saved state).
    pub(crate) fn waiting_output(&self) -> &[u8] {
        &self.serial.writer().0
    }
}

impl Default for SerialDevice {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const IER: u8 = 1;
    const IIR: u8 = 2;
    const LSR: u8 = 5;

    #[test]
    fn output_is_cut_at_lines_and_thre_interrupt() {
        let mut s = SerialDevice::new();
        for &b in b"hello" {
            s.write(0, b);
            assert_eq!(s.take_output(false), None);
        }
        assert!(!s.take_interrupt());
        s.write(IER, 0x02); // THRE interrupt
        assert!(s.take_interrupt());
        assert!(!s.take_interrupt());
        assert_eq!(s.read(IIR) & 0x0f, 0x02);
        s.write(0, b'\n');
        assert_eq!(s.take_output(false).as_deref(), Some(&b"hello\n"[..]));
        assert_eq!(s.take_output(true), None);
        s.write(0, b'!');
        assert_eq!(s.waiting_output(), b"!");
        assert_eq!(s.take_output(true).as_deref(), Some(&b"!"[..]));
        for _ in 0..OUTPUT_CHUNK {
            s.write(0, b'x');
        }
        assert_eq!(s.take_output(false).map(|v| v.len()), Some(OUTPUT_CHUNK));
    }

    #[test]
    fn input_raises_interrupt() {
        let mut s = SerialDevice::new();
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert!(!s.take_interrupt(), "RDA interrupt disabled");
        assert_eq!(s.read(LSR) & 1, 1);
        s.write(IER, 0x01);
        assert!(s.take_interrupt());
        assert_eq!(s.read(IIR) & 0x0f, 0x04);
        assert_eq!(s.read(0), b'a');
        assert_eq!(s.read(0), b'b');
        assert_eq!(s.read(LSR) & 1, 0);
        s.enqueue_input(b"c");
        assert!(s.take_interrupt());
    }

    #[test]
    fn fifo_overflow_loses_nothing() {
        let mut s = SerialDevice::new();
        s.write(IER, 0x01);
        let input: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        assert_eq!(s.enqueue_input(&input[..150]), FIFO_SIZE);
        assert_eq!(s.enqueue_input(&input[150..]), 0);
        assert_eq!(s.pending_input(), 200 - FIFO_SIZE);
        let mut got = Vec::new();
        let mut interrupts = 0;
        loop {
            if s.take_interrupt() {
                interrupts += 1;
            }
            if s.read(LSR) & 1 == 0 {
                break;
            }
            got.push(s.read(0));
        }
        assert_eq!(got, input);
        assert_eq!(s.pending_input(), 0);
        assert!(interrupts >= 2, "refills raise the interrupt again");
    }

    #[test]
    fn dlab_reads_do_not_consume_input() {
        let mut s = SerialDevice::new();
        s.enqueue_input(b"z");
        s.write(LSR - 2, 0x80); // LCR: DLAB
        assert_eq!(s.read(0), 0x0c); // divisor low
        s.write(LSR - 2, 0x03);
        assert_eq!(s.read(0), b'z');
    }

    #[test]
    fn loopback_holds_input_until_left() {
        let mut s = SerialDevice::new();
        s.write(MCR_OFFSET, 0x10); // loopback
        assert_eq!(s.enqueue_input(b"q"), 0);
        assert_eq!(s.pending_input(), 1);
        s.write(0, b'L'); // looped back, not output
        assert_eq!(s.read(0), b'L');
        s.write(MCR_OFFSET, 0x08);
        assert_eq!(s.pending_input(), 0);
        assert_eq!(s.read(0), b'q');
    }

    #[test]
    fn pending_bound() {
        let mut s = SerialDevice::new();
        let big = vec![b'x'; MAX_PENDING_INPUT + 100];
        s.enqueue_input(&big);
        assert_eq!(s.pending_input(), MAX_PENDING_INPUT - FIFO_SIZE);
        s.enqueue_input(&big);
        assert_eq!(s.pending_input(), MAX_PENDING_INPUT);
    }
}
