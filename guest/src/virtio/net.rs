//! virtio-net driver (device ID 1) behind smoltcp's `phy::Device`.
//!
//! Negotiates VIRTIO_NET_F_MAC and VIRTIO_F_VERSION_1 only: no offloads,
//! no mergeable rx buffers, so every rx buffer holds the 12-byte
//! `virtio_net_hdr` (v1, with `num_buffers`) followed by one whole frame
//! of at most 1514 bytes. Queue 0 receives, queue 1 transmits.
//!
//! Rx buffers are posted once and re-posted as soon as smoltcp has consumed
//! their frame; tx buffers return to a free list when the device hands
//! them back (tx interrupts are suppressed: reclaimed lazily). Notifies
//! are batched: [`NetDev::kick`] after each poll sends at most one per
//! queue, since every MMIO write is a VM exit.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::{Desc, Mmio, ProbeError, Queue, QueueState, DESC_F_WRITE, NET};
use crate::Racy;

const DEVICE_ID_NET: u32 = 1;
/// VIRTIO_NET_F_MAC.
const F_MAC: u64 = 1 << 5;

/// `virtio_net_hdr` with `num_buffers` (VERSION_1).
const HDR_LEN: usize = 12;
/// Largest frame without the FCS (1500-byte MTU + 14-byte Ethernet header).
pub const MAX_FRAME: usize = 1514;
const BUF_LEN: usize = 1536;

const RX_N: usize = 64;
const TX_N: usize = 32;

/// Set by the IRQ handler when the device raised an interrupt (a frame
/// arrived); the main loop clears it before polling.
pub static NET_EVENT: AtomicBool = AtomicBool::new(false);

/// The MAC used when the device does not offer one.
const FALLBACK_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

#[repr(C, align(64))]
struct Buf([u8; BUF_LEN]);

static RX_Q: Racy<Queue<RX_N>> = Racy::new(Queue::new());
static TX_Q: Racy<Queue<TX_N>> = Racy::new(Queue::new());
static RX_BUFS: Racy<[Buf; RX_N]> = Racy::new([const { Buf([0; BUF_LEN]) }; RX_N]);
static TX_BUFS: Racy<[Buf; TX_N]> = Racy::new([const { Buf([0; BUF_LEN]) }; TX_N]);

fn rx_buf(id: u16) -> *mut u8 {
    // SAFETY: in-bounds pointer arithmetic on our static.
    unsafe { (*RX_BUFS.get())[id as usize % RX_N].0.as_mut_ptr() }
}

fn tx_buf(id: u16) -> *mut u8 {
    // SAFETY: as rx_buf.
    unsafe { (*TX_BUFS.get())[id as usize % TX_N].0.as_mut_ptr() }
}

struct Rx {
    q: QueueState<RX_N>,
    notify: bool,
}

struct Tx {
    q: QueueState<TX_N>,
    free: [u16; TX_N],
    nfree: usize,
    notify: bool,
}

impl Tx {
    /// Take back every buffer the device has finished sending.
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.q.pop() {
            if let Some(slot) = self.free.get_mut(self.nfree) {
                *slot = id;
                self.nfree += 1;
            }
        }
    }
}

/// Frames received and sent, and queue notifies (MMIO writes: exits),
/// for the cost reports of the workloads (`XSTATS` in `mail`).
pub static RX_FRAMES: AtomicU64 = AtomicU64::new(0);
pub static TX_FRAMES: AtomicU64 = AtomicU64::new(0);
pub static NOTIFIES: AtomicU64 = AtomicU64::new(0);

fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

pub struct NetDev {
    mmio: Mmio,
    rx: Rx,
    tx: Tx,
    pub mac: [u8; 6],
}

impl NetDev {
    pub fn probe() -> Result<NetDev, ProbeError> {
        let mmio = NET.mmio();
        let features = mmio.begin(DEVICE_ID_NET, F_MAC)?;
        let mut rx = Rx {
            q: mmio.setup_queue(0, RX_Q.get())?,
            notify: false,
        };
        let mut tx = Tx {
            q: mmio.setup_queue(1, TX_Q.get())?,
            free: [0; TX_N],
            nfree: 0,
            notify: false,
        };
        let mut mac = FALLBACK_MAC;
        if features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = mmio.rd8(super::CONFIG + i);
            }
        }
        for id in 0..rx.q.size {
            rx.q.set_desc(
                id,
                Desc {
                    addr: rx_buf(id) as u64,
                    len: BUF_LEN as u32,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            );
            rx.q.push(id);
        }
        for id in 0..tx.q.size {
            tx.q.set_desc(
                id,
                Desc {
                    addr: tx_buf(id) as u64,
                    len: 0,
                    flags: 0,
                    next: 0,
                },
            );
            tx.free[id as usize % TX_N] = id;
        }
        tx.nfree = tx.q.size as usize;
        tx.q.suppress_interrupts();
        mmio.finish(&NET);
        mmio.notify(0);
        Ok(NetDev { mmio, rx, tx, mac })
    }

    /// Whether a received frame is waiting.
    pub fn rx_ready(&self) -> bool {
        self.rx.q.has_used()
    }

    /// Send the batched notifies (at most one per queue).
    pub fn kick(&mut self) {
        if self.rx.notify {
            self.rx.notify = false;
            self.mmio.notify(0);
            bump(&NOTIFIES);
        }
        if self.tx.notify {
            self.tx.notify = false;
            self.mmio.notify(1);
            bump(&NOTIFIES);
        }
    }
}

pub struct RxToken<'a> {
    rx: &'a mut Rx,
    id: u16,
    len: usize,
}

pub struct TxToken<'a> {
    tx: &'a mut Tx,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let len = self.len.clamp(HDR_LEN, BUF_LEN);
        // SAFETY: the device has returned this buffer (it is off the
        // avail ring) and wrote `len` bytes of it; re-posted only below.
        let frame =
            unsafe { core::slice::from_raw_parts(rx_buf(self.id).add(HDR_LEN), len - HDR_LEN) };
        let r = f(frame);
        crate::io::progress(frame.len());
        self.rx.q.push(self.id);
        self.rx.notify = true;
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let len = len.min(MAX_FRAME);
        // Device::receive/transmit hand out a token only with a free buffer.
        self.tx.nfree -= 1;
        let id = self.tx.free[self.tx.nfree % TX_N];
        let p = tx_buf(id);
        // SAFETY: buffer `id` is ours (on the free list) until pushed.
        let r = unsafe {
            core::ptr::write_bytes(p, 0, HDR_LEN);
            f(core::slice::from_raw_parts_mut(p.add(HDR_LEN), len))
        };
        self.tx.q.set_desc_len(id, (HDR_LEN + len) as u32);
        self.tx.q.push(id);
        self.tx.notify = true;
        bump(&TX_FRAMES);
        r
    }
}

impl phy::Device for NetDev {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.tx.reclaim();
        if self.tx.nfree == 0 {
            return None;
        }
        let (id, len) = self.rx.q.pop()?;
        bump(&RX_FRAMES);
        Some((
            RxToken {
                rx: &mut self.rx,
                id,
                len: len as usize,
            },
            TxToken { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        self.tx.reclaim();
        if self.tx.nfree == 0 {
            return None;
        }
        Some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = None;
        // Received checksums are not verified (the frames come from the
        // host's TAP, whose kernel checksummed them; verifying costs about
        // an instruction per byte on an emulated CPU); sent ones are
        // computed in full (no offloads are negotiated).
        let mut ck = ChecksumCapabilities::default();
        ck.ipv4 = Checksum::Tx;
        ck.tcp = Checksum::Tx;
        ck.udp = Checksum::Tx;
        ck.icmpv4 = Checksum::Tx;
        caps.checksum = ck;
        caps
    }
}
