//! Minimal virtio-blk driver over the virtio-mmio (version 2, "modern")
//! transport at physical 0xd000_0000, IRQ 5. One split virtqueue (queue 0),
//! one request in flight at a time, completion by interrupt (HLT until the
//! used ring moves).

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, AtomicBool, AtomicU8, AtomicUsize, Ordering};

use crate::interrupts::{self, cli, sti, sti_hlt};
use crate::io;
use crate::Racy;

/// Default location of the device (Tandem's layout).
pub const DEFAULT_MMIO_BASE: usize = 0xd000_0000;
pub const DEFAULT_IRQ: u8 = 5;

/// Overridable (`virtio=0xADDR`, `virtio_irq=N`) for testing under other
/// VMMs, e.g. QEMU microvm (0xfeb00000, IRQ 5).
static MMIO_BASE: AtomicUsize = AtomicUsize::new(DEFAULT_MMIO_BASE);
static IRQ: AtomicU8 = AtomicU8::new(DEFAULT_IRQ);

pub fn configure(base: usize, irq: u8) {
    MMIO_BASE.store(base, Ordering::Relaxed);
    IRQ.store(irq, Ordering::Relaxed);
}

pub fn mmio_base() -> usize {
    MMIO_BASE.load(Ordering::Relaxed)
}

pub fn irq_line() -> u8 {
    IRQ.load(Ordering::Relaxed)
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
const CONFIG: usize = 0x100;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const DEVICE_ID_BLOCK: u32 = 2;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_FAILED: u32 = 128;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;

pub const SECTOR_SIZE: usize = 512;
/// Sectors per request (one 4 KiB buffer).
pub const BATCH_SECTORS: usize = 8;

const QUEUE_SIZE: usize = 16;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_SIZE],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C)]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_SIZE],
    avail_event: u16,
}

/// One page holding the whole split virtqueue.
#[repr(C, align(4096))]
struct Queue {
    desc: [Desc; QUEUE_SIZE], // 256 bytes, 16-aligned
    avail: Avail,             // 38 bytes, 2-aligned
    _pad: [u8; 1024 - 256 - 38],
    used: Used, // at 1024, 4-aligned
}

#[repr(C)]
struct ReqHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

#[repr(C, align(4096))]
pub struct Buffer(pub [u8; BATCH_SECTORS * SECTOR_SIZE]);

static QUEUE: Racy<Queue> = Racy::new(Queue {
    desc: [Desc {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    }; QUEUE_SIZE],
    avail: Avail {
        flags: 0,
        idx: 0,
        ring: [0; QUEUE_SIZE],
        used_event: 0,
    },
    _pad: [0; 1024 - 256 - 38],
    used: Used {
        flags: 0,
        idx: 0,
        ring: [UsedElem { id: 0, len: 0 }; QUEUE_SIZE],
        avail_event: 0,
    },
});
static HEADER: Racy<ReqHeader> = Racy::new(ReqHeader {
    kind: 0,
    reserved: 0,
    sector: 0,
});
static STATUS_BYTE: Racy<u8> = Racy::new(0);

/// Set once the device is initialised: the IRQ handler may touch MMIO.
static PRESENT: AtomicBool = AtomicBool::new(false);

fn rd(off: usize) -> u32 {
    // SAFETY: the MMIO window is identity-mapped; only called with a device
    // offset inside the 4 KiB window.
    unsafe { read_volatile((mmio_base() + off) as *const u32) }
}

fn wr(off: usize, v: u32) {
    // SAFETY: as rd.
    unsafe { write_volatile((mmio_base() + off) as *mut u32, v) }
}

/// IRQ5 handler body: acknowledge the device's interrupt.
pub fn irq() {
    if PRESENT.load(Ordering::Relaxed) {
        let s = rd(INTERRUPT_STATUS);
        wr(INTERRUPT_ACK, s);
    }
}

pub struct Blk {
    pub capacity: u64,
    queue_size: u16,
    last_used: u16,
}

pub enum ProbeError {
    NoDevice,
    Failed(&'static [u8]),
}

impl Blk {
    /// Probe and initialise the device.
    pub fn probe() -> Result<Blk, ProbeError> {
        if rd(MAGIC) != MAGIC_VALUE || rd(DEVICE_ID) != DEVICE_ID_BLOCK {
            return Err(ProbeError::NoDevice);
        }
        if rd(VERSION) != 2 {
            return Err(ProbeError::Failed(b"virtio-mmio version is not 2"));
        }
        wr(STATUS, 0);
        let mut spins = 0u32;
        while rd(STATUS) != 0 {
            spins += 1;
            if spins > 1000 {
                return Err(ProbeError::Failed(b"virtio reset did not complete"));
            }
        }
        wr(STATUS, S_ACKNOWLEDGE);
        wr(STATUS, S_ACKNOWLEDGE | S_DRIVER);

        wr(DEVICE_FEATURES_SEL, 1);
        let hi = rd(DEVICE_FEATURES);
        if hi & 1 == 0 {
            wr(STATUS, S_FAILED);
            return Err(ProbeError::Failed(
                b"virtio device lacks VIRTIO_F_VERSION_1",
            ));
        }
        // Accept VIRTIO_F_VERSION_1 (bit 32) only.
        wr(DRIVER_FEATURES_SEL, 0);
        wr(DRIVER_FEATURES, 0);
        wr(DRIVER_FEATURES_SEL, 1);
        wr(DRIVER_FEATURES, 1);
        wr(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if rd(STATUS) & S_FEATURES_OK == 0 {
            wr(STATUS, S_FAILED);
            return Err(ProbeError::Failed(b"virtio device rejected features"));
        }

        wr(QUEUE_SEL, 0);
        if rd(QUEUE_READY) != 0 {
            wr(STATUS, S_FAILED);
            return Err(ProbeError::Failed(b"virtio queue 0 already ready"));
        }
        let max = rd(QUEUE_NUM_MAX) as usize;
        if max < 4 {
            wr(STATUS, S_FAILED);
            return Err(ProbeError::Failed(b"virtio queue 0 too small"));
        }
        let mut size = QUEUE_SIZE;
        while size > max {
            size /= 2;
        }
        wr(QUEUE_NUM, size as u32);

        // SAFETY: the device is not yet live; we own the queue memory.
        unsafe {
            let q = QUEUE.get();
            core::ptr::write_bytes(q as *mut u8, 0, core::mem::size_of::<Queue>());
        }
        let q = QUEUE.get() as u64;
        let desc = q;
        let avail = q + core::mem::offset_of!(Queue, avail) as u64;
        let used = q + core::mem::offset_of!(Queue, used) as u64;
        wr(QUEUE_DESC_LOW, desc as u32);
        wr(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        wr(QUEUE_DRIVER_LOW, avail as u32);
        wr(QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        wr(QUEUE_DEVICE_LOW, used as u32);
        wr(QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        wr(QUEUE_READY, 1);

        wr(
            STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );

        let capacity = rd(CONFIG) as u64 | ((rd(CONFIG + 4) as u64) << 32);
        PRESENT.store(true, Ordering::Relaxed);
        interrupts::pic_unmask(irq_line());
        Ok(Blk {
            capacity,
            queue_size: size as u16,
            last_used: 0,
        })
    }

    /// Issue one request and wait for it. `data` is (addr, len) of the data
    /// buffer, or None for FLUSH.
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<(u64, u32)>,
    ) -> Result<(), &'static [u8]> {
        // SAFETY: one request in flight; the device only touches these
        // statics between notify and the used-ring update we wait for.
        unsafe {
            let h = HEADER.get();
            write_volatile(
                h,
                ReqHeader {
                    kind,
                    reserved: 0,
                    sector,
                },
            );
            write_volatile(STATUS_BYTE.get(), 0xff);

            let q = QUEUE.get();
            let d = &raw mut (*q).desc;
            write_volatile(
                &raw mut (*d)[0],
                Desc {
                    addr: h as u64,
                    len: 16,
                    flags: VRING_DESC_F_NEXT,
                    next: 1,
                },
            );
            let status_idx = if let Some((addr, len)) = data {
                let flags = if kind == VIRTIO_BLK_T_IN {
                    VRING_DESC_F_NEXT | VRING_DESC_F_WRITE
                } else {
                    VRING_DESC_F_NEXT
                };
                write_volatile(
                    &raw mut (*d)[1],
                    Desc {
                        addr,
                        len,
                        flags,
                        next: 2,
                    },
                );
                2
            } else {
                1
            };
            write_volatile(
                &raw mut (*d)[status_idx as usize],
                Desc {
                    addr: STATUS_BYTE.get() as u64,
                    len: 1,
                    flags: VRING_DESC_F_WRITE,
                    next: 0,
                },
            );

            let avail = &raw mut (*q).avail;
            let idx = read_volatile(&raw const (*avail).idx);
            let slot = (idx % self.queue_size) as usize % QUEUE_SIZE;
            write_volatile(&raw mut (*avail).ring[slot], 0);
            compiler_fence(Ordering::SeqCst);
            write_volatile(&raw mut (*avail).idx, idx.wrapping_add(1));
            compiler_fence(Ordering::SeqCst);
            wr(QUEUE_NOTIFY, 0);

            // Wait: HLT until the used ring moves (IRQ5 wakes us).
            let used_idx = &raw const (*q).used.idx;
            let start = interrupts::ticks();
            loop {
                cli();
                if read_volatile(used_idx) != self.last_used {
                    break;
                }
                // Generous timeout (timer-based; only matters on failure).
                if interrupts::ticks().wrapping_sub(start) > interrupts::hz() * 60 {
                    sti();
                    return Err(b"virtio request timed out");
                }
                sti_hlt();
            }
            sti();
            compiler_fence(Ordering::SeqCst);
            let used_slot = (self.last_used % self.queue_size) as usize % QUEUE_SIZE;
            let id = read_volatile(&raw const (*q).used.ring[used_slot].id);
            self.last_used = self.last_used.wrapping_add(1);
            if id != 0 {
                return Err(b"virtio used ring returned an unknown descriptor");
            }
            let st = read_volatile(STATUS_BYTE.get());
            if st != 0 {
                io::puts(b"virtio-blk status ");
                io::put_dec(st as u64);
                io::putc(b'\n');
                return Err(b"virtio-blk request failed");
            }
        }
        Ok(())
    }

    /// Read or write `count` (≤ BATCH_SECTORS) sectors from/to `buf`.
    pub fn rw(
        &mut self,
        write: bool,
        sector: u64,
        count: usize,
        buf: *mut Buffer,
    ) -> Result<(), &'static [u8]> {
        let count = count.min(BATCH_SECTORS);
        let kind = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        self.request(
            kind,
            sector,
            Some((buf as u64, (count * SECTOR_SIZE) as u32)),
        )
    }

    pub fn flush(&mut self) -> Result<(), &'static [u8]> {
        self.request(VIRTIO_BLK_T_FLUSH, 0, None)
    }
}
