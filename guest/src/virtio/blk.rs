//! Minimal virtio-blk driver: queue 0, one request in flight at a time,
//! completion by interrupt (HLT until the used ring moves).

use core::ptr::{read_volatile, write_volatile};

use super::{Desc, Mmio, ProbeError, Queue, QueueState, BLK, DESC_F_NEXT, DESC_F_WRITE};
use crate::interrupts::{self, cli, sti};
use crate::io;
use crate::Racy;

const DEVICE_ID_BLOCK: u32 = 2;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;

pub const SECTOR_SIZE: usize = 512;
/// Sectors per request of [`Blk::rw`] (one 4 KiB buffer).
pub const BATCH_SECTORS: usize = 8;

const QUEUE_SIZE: usize = 16;

#[repr(C)]
struct ReqHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

#[repr(C, align(4096))]
pub struct Buffer(pub [u8; BATCH_SECTORS * SECTOR_SIZE]);

static QUEUE: Racy<Queue<QUEUE_SIZE>> = Racy::new(Queue::new());
static HEADER: Racy<ReqHeader> = Racy::new(ReqHeader {
    kind: 0,
    reserved: 0,
    sector: 0,
});
static STATUS_BYTE: Racy<u8> = Racy::new(0);

pub struct Blk {
    pub capacity: u64,
    mmio: Mmio,
    queue: QueueState<QUEUE_SIZE>,
}

impl Blk {
    /// Probe and initialise the device.
    pub fn probe() -> Result<Blk, ProbeError> {
        let mmio = BLK.mmio();
        mmio.begin(DEVICE_ID_BLOCK, 0)?;
        let queue = mmio.setup_queue(0, QUEUE.get())?;
        if queue.size < 4 {
            return Err(ProbeError::Failed(b"virtio-blk queue too small"));
        }
        let capacity = mmio.rd(super::CONFIG) as u64 | ((mmio.rd(super::CONFIG + 4) as u64) << 32);
        mmio.finish(&BLK);
        Ok(Blk {
            capacity,
            mmio,
            queue,
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
        let h = HEADER.get();
        // SAFETY: one request in flight; the device only touches these
        // statics between notify and the used-ring update we wait for.
        unsafe {
            write_volatile(
                h,
                ReqHeader {
                    kind,
                    reserved: 0,
                    sector,
                },
            );
            write_volatile(STATUS_BYTE.get(), 0xff);
        }
        self.queue.set_desc(
            0,
            Desc {
                addr: h as u64,
                len: 16,
                flags: DESC_F_NEXT,
                next: 1,
            },
        );
        let status_idx = if let Some((addr, len)) = data {
            let flags = if kind == VIRTIO_BLK_T_IN {
                DESC_F_NEXT | DESC_F_WRITE
            } else {
                DESC_F_NEXT
            };
            self.queue.set_desc(
                1,
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
        self.queue.set_desc(
            status_idx,
            Desc {
                addr: STATUS_BYTE.get() as u64,
                len: 1,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        self.queue.push(0);
        self.mmio.notify(0);

        // Wait: HLT until the used ring moves (the IRQ wakes us).
        let start = interrupts::ticks();
        loop {
            cli();
            if self.queue.has_used() {
                break;
            }
            // Generous timeout (timer-based; only matters on failure).
            if interrupts::ticks().wrapping_sub(start) > interrupts::hz() * 60 {
                sti();
                return Err(b"virtio request timed out");
            }
            interrupts::idle();
        }
        sti();
        let (id, _) = self.queue.pop().unwrap_or((u16::MAX, 0));
        if id != 0 {
            return Err(b"virtio used ring returned an unknown descriptor");
        }
        // SAFETY: the device is done with the status byte.
        let st = unsafe { read_volatile(STATUS_BYTE.get()) };
        if st != 0 {
            io::puts(b"virtio-blk status ");
            io::put_dec(st as u64);
            io::putc(b'\n');
            return Err(b"virtio-blk request failed");
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
        self.rw_raw(write, sector, buf as *mut u8, count * SECTOR_SIZE)
    }

    /// Read or write `len` bytes (a multiple of 512) at `addr`, in one
    /// request.
    pub fn rw_raw(
        &mut self,
        write: bool,
        sector: u64,
        addr: *mut u8,
        len: usize,
    ) -> Result<(), &'static [u8]> {
        let kind = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        self.request(kind, sector, Some((addr as u64, len as u32)))
    }

    pub fn flush(&mut self) -> Result<(), &'static [u8]> {
        self.request(VIRTIO_BLK_T_FLUSH, 0, None)
    }
}
