//! The virtio-mmio (version 2, "modern") transport and split virtqueues,
//! shared by the block ([`blk`]) and network ([`net`]) drivers.
//!
//! Each device sits in its own 4 KiB (or, under QEMU microvm, 512-byte)
//! MMIO window with its own 8259 IRQ line:
//!
//! | device | default window | IRQ | override |
//! |---|---|---|---|
//! | virtio-blk | 0xd000_0000 | 5 | `virtio=ADDR[,IRQ]` (and `virtio_irq=N`) |
//! | virtio-net | 0xd000_1000 | 6 | `virtio-net=ADDR[,IRQ]` |
//!
//! The driver negotiates VIRTIO_F_VERSION_1 plus the device-specific bits
//! it asks for (net: VIRTIO_NET_F_MAC only), whatever else the device
//! offers.

pub mod blk;
pub mod net;

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, AtomicBool, AtomicU8, AtomicUsize, Ordering};

pub use blk::{Blk, Buffer, BATCH_SECTORS, SECTOR_SIZE};

/// Where a device lives: its MMIO window and IRQ line (set once at boot
/// from the command line, read by the IRQ dispatcher).
pub struct Slot {
    base: AtomicUsize,
    irq: AtomicU8,
    /// Set once the driver is live: the IRQ handler may touch MMIO.
    present: AtomicBool,
}

impl Slot {
    pub const fn new(base: usize, irq: u8) -> Slot {
        Slot {
            base: AtomicUsize::new(base),
            irq: AtomicU8::new(irq),
            present: AtomicBool::new(false),
        }
    }
    pub fn configure(&self, base: usize, irq: u8) {
        self.base.store(base, Ordering::Relaxed);
        self.irq.store(irq, Ordering::Relaxed);
    }
    pub fn base(&self) -> usize {
        self.base.load(Ordering::Relaxed)
    }
    pub fn irq(&self) -> u8 {
        self.irq.load(Ordering::Relaxed)
    }
    fn mmio(&self) -> Mmio {
        Mmio(self.base())
    }
    /// Acknowledge the device's interrupt (IRQ context). Returns whether
    /// this device was live.
    fn ack(&self) -> bool {
        if !self.present.load(Ordering::Relaxed) {
            return false;
        }
        let m = self.mmio();
        let s = m.rd(INTERRUPT_STATUS);
        m.wr(INTERRUPT_ACK, s);
        true
    }
}

/// The block device (`virtio=`).
pub static BLK: Slot = Slot::new(0xd000_0000, 5);
/// The network device (`virtio-net=`).
pub static NET: Slot = Slot::new(0xd000_1000, 6);

/// IRQ dispatch for the virtio lines (called with the PIC line number).
/// Returns whether the line belonged to a virtio device.
pub fn irq(line: u8) -> bool {
    let mut ours = false;
    if line == BLK.irq() {
        BLK.ack();
        ours = true;
    }
    if line == NET.irq() {
        if NET.ack() {
            net::NET_EVENT.store(true, Ordering::Release);
        }
        ours = true;
    }
    ours
}

const MAGIC: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const INTERRUPT_STATUS: usize = 0x060;
const INTERRUPT_ACK: usize = 0x064;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
/// Device-specific configuration space.
pub const CONFIG: usize = 0x100;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_FAILED: u32 = 128;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// VRING_AVAIL_F_NO_INTERRUPT: the driver does not want used-buffer IRQs.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

pub enum ProbeError {
    NoDevice,
    Failed(&'static [u8]),
}

impl ProbeError {
    /// The workload cannot run: `ERROR <what> at ADDR` (or the failure),
    /// exit status 3.
    pub fn exit(self, what: &[u8], slot: &Slot) -> ! {
        match self {
            ProbeError::NoDevice => {
                crate::io::puts(b"ERROR ");
                crate::io::puts(what);
                crate::io::puts(b" at ");
                crate::io::put_hex(slot.base() as u64);
                crate::io::putc(b'\n');
                crate::io::exit(3)
            }
            ProbeError::Failed(msg) => crate::fail(msg, 3),
        }
    }
}

/// A virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Mmio(usize);

impl Mmio {
    pub fn rd(self, off: usize) -> u32 {
        // SAFETY: the MMIO window is identity-mapped (first 4 GiB); only
        // called with an offset inside the device's window.
        unsafe { read_volatile((self.0 + off) as *const u32) }
    }
    pub fn wr(self, off: usize, v: u32) {
        // SAFETY: as rd.
        unsafe { write_volatile((self.0 + off) as *mut u32, v) }
    }
    pub fn rd8(self, off: usize) -> u8 {
        // SAFETY: as rd (config space is byte-addressable).
        unsafe { read_volatile((self.0 + off) as *const u8) }
    }
    pub fn notify(self, queue: u16) {
        self.wr(QUEUE_NOTIFY, queue as u32);
    }

    fn fail(self, msg: &'static [u8]) -> ProbeError {
        self.wr(STATUS, S_FAILED);
        ProbeError::Failed(msg)
    }

    /// Reset the device and negotiate features: VERSION_1 plus whatever
    /// of `wanted` the device offers. Returns the accepted feature bits.
    pub fn begin(self, device_id: u32, wanted: u64) -> Result<u64, ProbeError> {
        if self.rd(MAGIC) != MAGIC_VALUE || self.rd(DEVICE_ID) != device_id {
            return Err(ProbeError::NoDevice);
        }
        if self.rd(VERSION) != 2 {
            return Err(ProbeError::Failed(b"virtio-mmio version is not 2"));
        }
        self.wr(STATUS, 0);
        let mut spins = 0u32;
        while self.rd(STATUS) != 0 {
            spins += 1;
            if spins > 1000 {
                return Err(ProbeError::Failed(b"virtio reset did not complete"));
            }
        }
        self.wr(STATUS, S_ACKNOWLEDGE);
        self.wr(STATUS, S_ACKNOWLEDGE | S_DRIVER);
        self.wr(DEVICE_FEATURES_SEL, 0);
        let lo = self.rd(DEVICE_FEATURES) as u64;
        self.wr(DEVICE_FEATURES_SEL, 1);
        let hi = self.rd(DEVICE_FEATURES) as u64;
        let offered = hi << 32 | lo;
        if offered & F_VERSION_1 == 0 {
            return Err(self.fail(b"virtio device lacks VIRTIO_F_VERSION_1"));
        }
        let accepted = offered & (wanted | F_VERSION_1);
        self.wr(DRIVER_FEATURES_SEL, 0);
        self.wr(DRIVER_FEATURES, accepted as u32);
        self.wr(DRIVER_FEATURES_SEL, 1);
        self.wr(DRIVER_FEATURES, (accepted >> 32) as u32);
        self.wr(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.rd(STATUS) & S_FEATURES_OK == 0 {
            return Err(self.fail(b"virtio device rejected features"));
        }
        Ok(accepted)
    }

    /// Hand queue `index` (its memory at `q`) to the device; the size is
    /// the largest power of two ≤ both N and the device's maximum.
    pub fn setup_queue<const N: usize>(
        self,
        index: u16,
        q: *mut Queue<N>,
    ) -> Result<QueueState<N>, ProbeError> {
        self.wr(QUEUE_SEL, index as u32);
        if self.rd(QUEUE_READY) != 0 {
            return Err(self.fail(b"virtio queue already ready"));
        }
        let max = self.rd(QUEUE_NUM_MAX) as usize;
        if max < 2 {
            return Err(self.fail(b"virtio queue too small"));
        }
        let mut size = N;
        while size > max {
            size /= 2;
        }
        self.wr(QUEUE_NUM, size as u32);
        // SAFETY: the queue is not live yet; we own its memory.
        unsafe { core::ptr::write_bytes(q as *mut u8, 0, core::mem::size_of::<Queue<N>>()) };
        let desc = q as u64;
        let avail = desc + core::mem::offset_of!(Queue<N>, avail) as u64;
        let used = desc + core::mem::offset_of!(Queue<N>, used) as u64;
        self.wr(QUEUE_DESC_LOW, desc as u32);
        self.wr(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.wr(QUEUE_DRIVER_LOW, avail as u32);
        self.wr(QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.wr(QUEUE_DEVICE_LOW, used as u32);
        self.wr(QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.wr(QUEUE_READY, 1);
        Ok(QueueState {
            q,
            size: size as u16,
            last_used: 0,
        })
    }

    /// DRIVER_OK: the device may use the queues now; mark the slot live and
    /// unmask its IRQ.
    pub fn finish(self, slot: &Slot) {
        self.wr(
            STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        slot.present.store(true, Ordering::Relaxed);
        crate::interrupts::pic_unmask(slot.irq());
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

#[repr(C)]
pub struct Avail<const N: usize> {
    flags: u16,
    idx: u16,
    ring: [u16; N],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(4))]
pub struct Used<const N: usize> {
    flags: u16,
    idx: u16,
    ring: [UsedElem; N],
    avail_event: u16,
}

/// The memory of one split virtqueue of (at most) N entries (modern
/// transport: the three parts need only 16/2/4-byte alignment).
#[repr(C, align(16))]
pub struct Queue<const N: usize> {
    desc: [Desc; N],
    avail: Avail<N>,
    used: Used<N>,
}

impl<const N: usize> Queue<N> {
    pub const fn new() -> Self {
        Queue {
            desc: [Desc {
                addr: 0,
                len: 0,
                flags: 0,
                next: 0,
            }; N],
            avail: Avail {
                flags: 0,
                idx: 0,
                ring: [0; N],
                used_event: 0,
            },
            used: Used {
                flags: 0,
                idx: 0,
                ring: [UsedElem { id: 0, len: 0 }; N],
                avail_event: 0,
            },
        }
    }
}

/// The driver's side of one live queue.
pub struct QueueState<const N: usize> {
    q: *mut Queue<N>,
    pub size: u16,
    last_used: u16,
}

impl<const N: usize> QueueState<N> {
    /// Write descriptor `i` (i < size).
    pub fn set_desc(&mut self, i: u16, d: Desc) {
        let i = i as usize % N;
        // SAFETY: the descriptor is owned by the driver (not on the avail
        // ring) while we write it.
        unsafe { write_volatile(&raw mut (*self.q).desc[i], d) }
    }

    /// Set the length of descriptor `i` (a tx buffer being reused).
    pub fn set_desc_len(&mut self, i: u16, len: u32) {
        let i = i as usize % N;
        // SAFETY: as set_desc.
        unsafe { write_volatile(&raw mut (*self.q).desc[i].len, len) }
    }

    /// Put the chain headed by `head` on the available ring (the device
    /// sees it after the next notify).
    pub fn push(&mut self, head: u16) {
        // SAFETY: the avail ring is written only by the driver.
        unsafe {
            let avail = &raw mut (*self.q).avail;
            let idx = read_volatile(&raw const (*avail).idx);
            let slot = (idx % self.size) as usize % N;
            write_volatile(&raw mut (*avail).ring[slot], head);
            compiler_fence(Ordering::SeqCst);
            write_volatile(&raw mut (*avail).idx, idx.wrapping_add(1));
            compiler_fence(Ordering::SeqCst);
        }
    }

    /// Whether the device has returned a chain we have not taken yet.
    pub fn has_used(&self) -> bool {
        // SAFETY: reading the device-written index.
        unsafe { read_volatile(&raw const (*self.q).used.idx) != self.last_used }
    }

    /// Take the next returned chain: (head id, bytes written).
    pub fn pop(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let slot = (self.last_used % self.size) as usize % N;
        // SAFETY: the device published this element before moving idx.
        let e = unsafe { read_volatile(&raw const (*self.q).used.ring[slot]) };
        self.last_used = self.last_used.wrapping_add(1);
        Some((e.id as u16, e.len))
    }

    /// Ask the device not to interrupt when it returns buffers (a hint).
    pub fn suppress_interrupts(&mut self) {
        // SAFETY: the avail flags are written only by the driver.
        unsafe { write_volatile(&raw mut (*self.q).avail.flags, AVAIL_F_NO_INTERRUPT) }
    }
}
