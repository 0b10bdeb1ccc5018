//! Port I/O, the 16550 console, the debug-exit port and tiny number
//! formatters (no `core::fmt`: its precompiled code uses SSE).

use core::arch::asm;

#[inline(always)]
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: see outb.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

pub const COM1: u16 = 0x3f8;
const THR: u16 = COM1; // transmit holding register (DLAB=0)
const RBR: u16 = COM1; // receive buffer register (DLAB=0)
const IER: u16 = COM1 + 1;
const IIR_FCR: u16 = COM1 + 2;
const LCR: u16 = COM1 + 3;
const MCR: u16 = COM1 + 4;
const LSR: u16 = COM1 + 5;

pub const LSR_DATA_READY: u8 = 0x01;
pub const LSR_THRE: u8 = 0x20;

/// 115200 8N1, FIFOs on, DTR|RTS|OUT2 (OUT2 gates the IRQ line), no interrupts yet.
pub fn serial_init() {
    outb(IER, 0x00);
    outb(LCR, 0x80); // DLAB
    outb(COM1, 0x01); // divisor 1 = 115200
    outb(COM1 + 1, 0x00);
    outb(LCR, 0x03); // 8N1, DLAB off
    outb(IIR_FCR, 0xc7);
    outb(MCR, 0x0b);
}

/// Enable the "received data available" interrupt (IRQ4).
pub fn serial_enable_rx_irq() {
    outb(IER, 0x01);
}

/// Read one byte if the receiver holds one.
pub fn serial_try_read() -> Option<u8> {
    if inb(LSR) & LSR_DATA_READY != 0 {
        Some(inb(RBR))
    } else {
        None
    }
}

/// Reading IIR acknowledges a pending THRE-type interrupt condition.
pub fn serial_read_iir() -> u8 {
    inb(IIR_FCR)
}

pub fn putc(c: u8) {
    while inb(LSR) & LSR_THRE == 0 {
        core::hint::spin_loop();
    }
    outb(THR, c);
}

pub fn puts(s: &[u8]) {
    for &c in s {
        putc(c);
    }
}

pub fn putln(s: &[u8]) {
    puts(s);
    putc(b'\n');
}

/// 16 lowercase hex digits.
pub fn put_hex64(v: u64) {
    let mut i = 16;
    while i > 0 {
        i -= 1;
        putc(hex_digit((v >> (i * 4)) as u8));
    }
}

/// Hex without leading zeros (at least one digit), with a `0x` prefix.
pub fn put_hex(v: u64) {
    puts(b"0x");
    let mut started = false;
    let mut i = 16;
    while i > 0 {
        i -= 1;
        let d = ((v >> (i * 4)) & 0xf) as u8;
        if d != 0 || started || i == 0 {
            started = true;
            putc(hex_digit(d));
        }
    }
}

#[inline]
fn hex_digit(d: u8) -> u8 {
    let d = d & 0xf;
    if d < 10 {
        b'0' + d
    } else {
        b'a' + d - 10
    }
}

pub fn put_dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut n = 0usize;
    for slot in buf.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &c in buf.iter().skip(20 - n) {
        putc(c);
    }
}

/// Bytes of bulk work since the last [`progress`] exit.
static WORK: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
/// Exit-free work allowed between two exits: about 1 KiB of per-byte
/// work is ~1.5k instructions, ~1.5 ms on the emulated CPU.
const WORK_PER_EXIT: usize = 1024;

/// Account `bytes` of bulk work (scanning, copying, hashing); every
/// ~1 KiB, take a cheap VM exit (a POST-code write to port 0x80). Long
/// exit-free stretches make a recording VMM kick the vCPU to deliver a
/// timer interrupt, and every kick costs a sync point (vCPU state and
/// dirty pages) in the log; an exit the guest takes itself is a
/// deterministic point where the interrupt can be delivered instead. It
/// costs one exit (~6 µs) per ~1.5 ms of work.
pub fn progress(bytes: usize) {
    use core::sync::atomic::Ordering::Relaxed;
    let w = WORK.load(Relaxed) + bytes;
    if w >= WORK_PER_EXIT {
        WORK.store(0, Relaxed);
        outb(0x80, 0);
    } else {
        WORK.store(w, Relaxed);
    }
}

/// isa-debug-exit style port: writing a status byte ends the VM.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

pub fn exit(status: u8) -> ! {
    outb(DEBUG_EXIT_PORT, status);
    // The VMM should never resume us; if it does, park the CPU.
    loop {
        // SAFETY: cli/hlt only stop this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
