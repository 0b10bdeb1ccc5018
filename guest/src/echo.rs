//! The `echo` workload: interrupt-driven serial receive into a ring buffer.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::interrupts::{self, cli, sti, sti_hlt};
use crate::io;
use crate::rt::Hash;
use crate::Racy;

const RX_SIZE: usize = 256;
static RX_BUF: Racy<[u8; RX_SIZE]> = Racy::new([0; RX_SIZE]);
/// Producer (IRQ) and consumer (main flow) positions, free-running.
static RX_HEAD: AtomicU32 = AtomicU32::new(0);
static RX_TAIL: AtomicU32 = AtomicU32::new(0);

/// IRQ4: drain the UART into the ring (bytes beyond a full ring are dropped).
pub fn serial_irq() {
    let _ = io::serial_read_iir();
    while let Some(c) = io::serial_try_read() {
        let head = RX_HEAD.load(Ordering::Relaxed);
        let tail = RX_TAIL.load(Ordering::Relaxed);
        if head.wrapping_sub(tail) < RX_SIZE as u32 {
            // SAFETY: interrupts are off in the handler; the consumer reads
            // only below head.
            unsafe { (*RX_BUF.get())[head as usize % RX_SIZE] = c };
            RX_HEAD.store(head.wrapping_add(1), Ordering::Release);
        }
    }
}

/// Next received byte, idling in HLT until one arrives.
fn getc() -> u8 {
    loop {
        cli();
        let head = RX_HEAD.load(Ordering::Acquire);
        let tail = RX_TAIL.load(Ordering::Relaxed);
        if head != tail {
            // SAFETY: interrupts are off; slot `tail` was published by the IRQ.
            let c = unsafe { (*RX_BUF.get())[tail as usize % RX_SIZE] };
            RX_TAIL.store(tail.wrapping_add(1), Ordering::Relaxed);
            sti();
            return c;
        }
        sti_hlt();
    }
}

const LINE_MAX: usize = 200;

/// Echo lines until `quit`; returns the checksum over all received lines.
/// A line ends at `\n` or `\r` (a `\n` right after `\r` is ignored); bytes
/// beyond 200 per line are dropped.
pub fn run() -> u64 {
    interrupts::pic_unmask(interrupts::IRQ_SERIAL);
    io::serial_enable_rx_irq();
    sti();
    io::putln(b"echo ready");
    let mut hash = Hash::new();
    let mut line = [0u8; LINE_MAX];
    let mut len = 0usize;
    let mut prev_cr = false;
    loop {
        let c = getc();
        if c == b'\n' && prev_cr {
            prev_cr = false;
            continue;
        }
        prev_cr = c == b'\r';
        if c == b'\n' || c == b'\r' {
            let l = &line[..len.min(LINE_MAX)];
            hash.bytes(l);
            hash.byte(b'\n');
            io::puts(b"echo: ");
            io::putln(l);
            if l == b"quit" {
                return hash.finish();
            }
            len = 0;
        } else if let Some(slot) = line.get_mut(len) {
            *slot = c;
            len += 1;
        }
    }
}
