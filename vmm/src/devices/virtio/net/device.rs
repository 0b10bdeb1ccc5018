//! virtio-net over virtio-mmio (virtio 1.2 §5.1), with no offloads.
//!
//! Offered features: VIRTIO_NET_F_MAC and VIRTIO_F_VERSION_1, nothing else:
//! no checksum or segmentation offloads, no mergeable receive buffers, no
//! control queue, no event index. What the guest sees therefore never
//! depends on the host's NIC. Queue 0 is the receive queue, queue 1 the
//! transmit queue; every buffer starts with the 12-byte `virtio_net_hdr`
//! (version-1 layout, with `num_buffers`).
//!
//! The device is a deterministic state machine, like the block device:
//! * **Transmit**: when the guest notifies queue 1, every available chain is
//!   read (header skipped) and its frame queued in the device; the run loop
//!   takes them with [`VirtioNet::take_tx_frames`] and hands them to
//!   `Outputs` with the exit that produced them (DESIGN.md rule 6). A chain
//!   whose frame is longer than [`MAX_FRAME_LEN`] or shorter than the header
//!   is returned and counted as dropped.
//! * **Receive**: frames are inputs (rule 2). The run loop asks the host for
//!   one only while [`VirtioNet::rx_ready`] says the guest posted a buffer,
//!   and passes it to [`VirtioNet::receive`] at an exit. A frame larger than
//!   the guest's buffer (or than [`MAX_FRAME_LEN`]) is dropped and counted;
//!   the buffer stays available for the next frame.
//!
//! Counters ([`NetStats`]) are host-side diagnostics, not guest-visible state,
//! and are not saved.

use std::io::{Read, Write};

use virtio_queue::{QueueOwnedT, QueueT};

use super::mac::MacAddr;
use crate::devices::virtio::mmio::{
    read_config_space, MmioEvent, MmioTransport, CONFIG_SPACE_OFFSET, VIRTIO_F_VERSION_1,
};
use crate::GuestMemory;

/// virtio device type of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// VIRTIO_NET_F_MAC: the device has a MAC address in its configuration.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Features offered.
pub const NET_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC;
/// Size of `virtio_net_hdr` with VERSION_1 (num_buffers included).
pub const NET_HDR_LEN: usize = 12;
/// Largest Ethernet frame (without FCS) the device moves: 1500-byte MTU plus
/// the 14-byte header. Nothing larger exists without offloads.
pub const MAX_FRAME_LEN: usize = 1514;
/// Receive queue index.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue index.
pub const TX_QUEUE: u16 = 1;
/// Frames delivered at one exit, at most (the rest wait for the next exit).
pub const MAX_RX_PER_EXIT: usize = 64;

/// Counters of a network device (host diagnostics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames written into the guest's receive buffers.
    pub rx_frames: u64,
    /// Frames dropped because they did not fit the guest's buffer.
    pub rx_too_large: u64,
    /// Frames dropped because the guest's receive chain was unusable.
    pub rx_bad_chain: u64,
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Transmit chains dropped (too short, too long, unreadable).
    pub tx_dropped: u64,
}

/// What [`VirtioNet::receive`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// In the guest's buffer; an interrupt is raised.
    Delivered,
    /// The guest has no buffer posted (or the device is not running).
    NoBuffer,
    /// Larger than the guest's buffer or than [`MAX_FRAME_LEN`]: dropped.
    TooLarge,
    /// The guest's buffer chain was malformed: returned empty, frame dropped.
    BadChain,
}

/// A virtio-net device on the virtio-mmio transport.
#[derive(Debug)]
pub struct VirtioNet {
    mac: MacAddr,
    transport: MmioTransport,
    tx_frames: Vec<Vec<u8>>,
    stats: NetStats,
}

impl VirtioNet {
    /// A reset device with address `mac`.
    pub fn new(mac: MacAddr) -> Self {
        VirtioNet {
            mac,
            transport: MmioTransport::new(VIRTIO_ID_NET, NET_FEATURES, 2),
            tx_frames: Vec::new(),
            stats: NetStats::default(),
        }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub(crate) fn set_stats(&mut self, stats: NetStats) {
        self.stats = stats;
    }

    /// The transport (registers and queues).
    pub fn transport(&self) -> &MmioTransport {
        &self.transport
    }

    pub(crate) fn transport_mut(&mut self) -> &mut MmioTransport {
        &mut self.transport
    }

    /// The interrupt line: high while InterruptStatus != 0.
    pub fn interrupt_level(&self) -> bool {
        self.transport.interrupt_status() != 0
    }

    /// A guest read at `offset` in the MMIO window (the configuration
    /// space is the MAC address).
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            read_config_space(&self.mac.bytes(), offset - CONFIG_SPACE_OFFSET, data);
        } else {
            self.transport.read_register(offset, data);
        }
    }

    /// A guest write at `offset` in the MMIO window. A notify of the
    /// transmit queue sends every available frame (into
    /// [`Self::take_tx_frames`]).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], mem: &GuestMemory) {
        if offset >= CONFIG_SPACE_OFFSET {
            tracing::debug!(offset, "virtio-net: config space write ignored");
            return;
        }
        match self.transport.write_register(offset, data, mem) {
            MmioEvent::Notify(TX_QUEUE) => self.process_tx(mem),
            // Receive buffers posted: frames are delivered at the next exit.
            MmioEvent::Notify(_) | MmioEvent::Reset | MmioEvent::None => {}
        }
    }

    /// Frames the guest sent since the last call, in order.
    pub fn take_tx_frames(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.tx_frames)
    }

    /// Has the guest posted a receive buffer (and is the device running)?
    /// A deterministic function of guest memory and device state.
    pub fn rx_ready(&self, mem: &GuestMemory) -> bool {
        if !self.transport.is_live() {
            return false;
        }
        let q = self.transport.queue(RX_QUEUE.into());
        match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
            Ok(idx) => idx.0 != q.next_avail(),
            Err(_) => false,
        }
    }

    /// Put `frame` into the guest's next receive buffer.
    pub fn receive(&mut self, frame: &[u8], mem: &GuestMemory) -> RxOutcome {
        if !self.rx_ready(mem) {
            return RxOutcome::NoBuffer;
        }
        if frame.len() > MAX_FRAME_LEN {
            self.stats.rx_too_large += 1;
            return RxOutcome::TooLarge;
        }
        let q = self.transport.queue_mut(RX_QUEUE.into());
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return RxOutcome::NoBuffer;
        };
        let head = chain.head_index();
        let outcome = match chain.writer(mem) {
            Ok(w) if w.available_bytes() < NET_HDR_LEN + frame.len() => {
                // Leave the buffer for a frame that fits.
                self.transport
                    .queue_mut(RX_QUEUE.into())
                    .go_to_previous_position();
                self.stats.rx_too_large += 1;
                return RxOutcome::TooLarge;
            }
            Ok(mut w) => {
                let mut hdr = [0u8; NET_HDR_LEN];
                // num_buffers = 1 (no mergeable buffers).
                hdr[10] = 1;
                match w.write_all(&hdr).and_then(|()| w.write_all(frame)) {
                    Ok(()) => RxOutcome::Delivered,
                    Err(_) => RxOutcome::BadChain,
                }
            }
            Err(_) => RxOutcome::BadChain,
        };
        let len = match outcome {
            RxOutcome::Delivered => {
                self.stats.rx_frames += 1;
                (NET_HDR_LEN + frame.len()) as u32
            }
            _ => {
                tracing::debug!(head, "virtio-net: unusable receive chain");
                self.stats.rx_bad_chain += 1;
                0
            }
        };
        self.add_used(RX_QUEUE, head, len, mem);
        outcome
    }

    fn add_used(&mut self, queue: u16, head: u16, len: u32, mem: &GuestMemory) {
        match self
            .transport
            .queue_mut(queue.into())
            .add_used(mem, head, len)
        {
            Ok(()) => self.transport.signal_used(),
            Err(e) => tracing::debug!(head, error = %e, "virtio-net: cannot return chain"),
        }
    }

    fn process_tx(&mut self, mem: &GuestMemory) {
        if !self.transport.is_live() {
            tracing::debug!("virtio-net: transmit notify while not live ignored");
            return;
        }
        // At most one queue's worth per notify (the available index is read
        // once per chain, bounded by the queue size).
        let size = self.transport.queue(TX_QUEUE.into()).size();
        for _ in 0..size {
            let q = self.transport.queue_mut(TX_QUEUE.into());
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match read_tx_frame(chain, mem) {
                Some(frame) => {
                    self.stats.tx_frames += 1;
                    self.tx_frames.push(frame);
                }
                None => self.stats.tx_dropped += 1,
            }
            self.add_used(TX_QUEUE, head, 0, mem);
        }
    }
}

/// The frame of a transmit chain (header stripped), if the chain is sane.
fn read_tx_frame(
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
) -> Option<Vec<u8>> {
    let mut r = chain.reader(mem).ok()?;
    let total = r.available_bytes();
    if total < NET_HDR_LEN || total - NET_HDR_LEN > MAX_FRAME_LEN {
        tracing::debug!(total, "virtio-net: transmit chain of a bad length dropped");
        return None;
    }
    let mut hdr = [0u8; NET_HDR_LEN];
    r.read_exact(&mut hdr).ok()?;
    let mut frame = vec![0u8; total - NET_HDR_LEN];
    r.read_exact(&mut frame).ok()?;
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{reg, status};
    use vm_memory::{Bytes, GuestAddress};

    const MEM_SIZE: usize = 1 << 20;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn w32(dev: &mut VirtioNet, mem: &GuestMemory, off: u64, v: u32) {
        dev.mmio_write(off, &v.to_le_bytes(), mem);
    }

    fn r32(dev: &mut VirtioNet, off: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// One split queue as a driver lays it out in guest memory.
    struct Ring {
        desc: u64,
        avail: u64,
        used: u64,
        size: u16,
        next_desc: u16,
        avail_idx: u16,
        last_used: u16,
    }

    impl Ring {
        fn new(base: u64, size: u16) -> Ring {
            Ring {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                size,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
            }
        }

        /// Post a chain of `(addr, len, device_writable)`; returns its head.
        fn post(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let idx = (head + i as u16) % self.size;
                let mut flags = if write { F_WRITE } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= F_NEXT;
                }
                let a = GuestAddress(self.desc + 16 * u64::from(idx));
                mem.write_obj(addr, a).unwrap();
                mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
                mem.write_obj((idx + 1) % self.size, GuestAddress(a.0 + 14))
                    .unwrap();
            }
            self.next_desc = (head + bufs.len() as u16) % self.size;
            let slot = u64::from(self.avail_idx % self.size);
            mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
            head
        }

        fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u32, u32)> {
            let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            if idx == self.last_used {
                return None;
            }
            let slot = u64::from(self.last_used % self.size);
            let e = self.used + 4 + 8 * slot;
            self.last_used = self.last_used.wrapping_add(1);
            Some((
                mem.read_obj(GuestAddress(e)).unwrap(),
                mem.read_obj(GuestAddress(e + 4)).unwrap(),
            ))
        }
    }

    /// Initialize the device as Linux does; returns (rx ring, tx ring).
    fn setup(dev: &mut VirtioNet, mem: &GuestMemory) -> (Ring, Ring) {
        w32(dev, mem, reg::STATUS, 0);
        w32(dev, mem, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(dev, mem, reg::DEVICE_FEATURES_SEL, 0);
        let lo = r32(dev, reg::DEVICE_FEATURES);
        w32(dev, mem, reg::DEVICE_FEATURES_SEL, 1);
        let hi = r32(dev, reg::DEVICE_FEATURES);
        assert_eq!((u64::from(hi) << 32) | u64::from(lo), NET_FEATURES);
        w32(dev, mem, reg::DRIVER_FEATURES_SEL, 0);
        w32(dev, mem, reg::DRIVER_FEATURES, lo);
        w32(dev, mem, reg::DRIVER_FEATURES_SEL, 1);
        w32(dev, mem, reg::DRIVER_FEATURES, hi);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w32(dev, mem, reg::STATUS, s);
        assert_eq!(r32(dev, reg::STATUS), s);
        let rings = [Ring::new(0x10000, 16), Ring::new(0x20000, 16)];
        for (i, r) in rings.iter().enumerate() {
            w32(dev, mem, reg::QUEUE_SEL, i as u32);
            assert_eq!(r32(dev, reg::QUEUE_NUM_MAX), 256);
            w32(dev, mem, reg::QUEUE_NUM, u32::from(r.size));
            w32(dev, mem, reg::QUEUE_DESC_LOW, r.desc as u32);
            w32(dev, mem, reg::QUEUE_DRIVER_LOW, r.avail as u32);
            w32(dev, mem, reg::QUEUE_DEVICE_LOW, r.used as u32);
            w32(dev, mem, reg::QUEUE_READY, 1);
            assert_eq!(r32(dev, reg::QUEUE_READY), 1);
        }
        // A third queue does not exist.
        w32(dev, mem, reg::QUEUE_SEL, 2);
        assert_eq!(r32(dev, reg::QUEUE_NUM_MAX), 0);
        w32(dev, mem, reg::STATUS, s | status::DRIVER_OK);
        assert!(dev.transport().is_live());
        let [rx, tx] = rings;
        (rx, tx)
    }

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    #[test]
    fn config_space_holds_the_mac() {
        let mac = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        let mut dev = VirtioNet::new(mac);
        assert_eq!(r32(&mut dev, reg::DEVICE_ID), VIRTIO_ID_NET);
        let mut b = [0u8; 6];
        for (i, x) in b.iter_mut().enumerate() {
            let mut one = [0u8; 1];
            dev.mmio_read(CONFIG_SPACE_OFFSET + i as u64, &mut one);
            *x = one[0];
        }
        assert_eq!(b, mac.0);
        assert_eq!(r32(&mut dev, CONFIG_SPACE_OFFSET), 0xaa00_5452);
        assert_eq!(r32(&mut dev, CONFIG_SPACE_OFFSET + 4), 0xccbb);
        assert_eq!(r32(&mut dev, CONFIG_SPACE_OFFSET + 8), 0);
    }

    #[test]
    fn transmit_and_receive() {
        let mem = mem();
        let mut dev = VirtioNet::new(MacAddr::DEFAULT);
        assert!(!dev.rx_ready(&mem));
        assert_eq!(dev.receive(&[1; 60], &mem), RxOutcome::NoBuffer);
        let (mut rx, mut tx) = setup(&mut dev, &mem);

        // Transmit: header and frame in separate descriptors, then in one.
        let frame: Vec<u8> = (0..100u8).collect();
        mem.write_slice(&[0u8; 12], GuestAddress(0x40000)).unwrap();
        mem.write_slice(&frame, GuestAddress(0x41000)).unwrap();
        let h1 = tx.post(&mem, &[(0x40000, 12, false), (0x41000, 100, false)]);
        let mut one = vec![0u8; 12];
        one.extend_from_slice(b"second frame");
        mem.write_slice(&one, GuestAddress(0x42000)).unwrap();
        let h2 = tx.post(&mem, &[(0x42000, one.len() as u32, false)]);
        w32(&mut dev, &mem, reg::QUEUE_NOTIFY, 1);
        assert_eq!(
            dev.take_tx_frames(),
            vec![frame.clone(), b"second frame".to_vec()]
        );
        assert!(dev.take_tx_frames().is_empty());
        assert_eq!(tx.pop_used(&mem), Some((u32::from(h1), 0)));
        assert_eq!(tx.pop_used(&mem), Some((u32::from(h2), 0)));
        assert!(dev.interrupt_level());
        w32(&mut dev, &mem, reg::INTERRUPT_ACK, 1);
        assert!(!dev.interrupt_level());

        // Receive: no buffer, then one buffer of 1526 bytes.
        assert!(!dev.rx_ready(&mem));
        let h = rx.post(&mem, &[(0x50000, 1526, true)]);
        w32(&mut dev, &mem, reg::QUEUE_NOTIFY, 0);
        assert!(dev.take_tx_frames().is_empty());
        assert!(dev.rx_ready(&mem));
        assert_eq!(dev.receive(&frame, &mem), RxOutcome::Delivered);
        assert_eq!(rx.pop_used(&mem), Some((u32::from(h), 112)));
        let mut got = vec![0u8; 112];
        mem.read_slice(&mut got, GuestAddress(0x50000)).unwrap();
        assert_eq!(&got[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&got[12..], &frame[..]);
        assert!(dev.interrupt_level());
        assert!(!dev.rx_ready(&mem));
        assert_eq!(dev.receive(&frame, &mem), RxOutcome::NoBuffer);

        // A full-size frame into a buffer split in two descriptors.
        let big = vec![0x5a; MAX_FRAME_LEN];
        let h = rx.post(&mem, &[(0x60000, 12, true), (0x61000, 1514, true)]);
        assert_eq!(dev.receive(&big, &mem), RxOutcome::Delivered);
        assert_eq!(rx.pop_used(&mem), Some((u32::from(h), 1526)));
        let mut got = vec![0u8; 1514];
        mem.read_slice(&mut got, GuestAddress(0x61000)).unwrap();
        assert_eq!(got, big);
        assert_eq!(dev.stats().rx_frames, 2);
        assert_eq!(dev.stats().tx_frames, 2);
    }

    #[test]
    fn oversized_and_malformed_frames_are_counted_drops() {
        let mem = mem();
        let mut dev = VirtioNet::new(MacAddr::DEFAULT);
        let (mut rx, mut tx) = setup(&mut dev, &mem);

        // Larger than the buffer: dropped, and the buffer stays posted.
        let h = rx.post(&mem, &[(0x50000, 100, true)]);
        assert_eq!(dev.receive(&[7; 200], &mem), RxOutcome::TooLarge);
        assert!(rx.pop_used(&mem).is_none());
        assert!(dev.rx_ready(&mem));
        // Larger than any Ethernet frame: dropped before looking.
        assert_eq!(dev.receive(&vec![7; 9000], &mem), RxOutcome::TooLarge);
        // A frame that fits uses the same buffer.
        assert_eq!(dev.receive(&[8; 60], &mem), RxOutcome::Delivered);
        assert_eq!(rx.pop_used(&mem), Some((u32::from(h), 72)));
        assert_eq!(dev.stats().rx_too_large, 2);

        // A receive chain that is device-readable only, and one outside
        // guest memory: returned empty, the frame dropped.
        rx.post(&mem, &[(0x50000, 1526, false)]);
        assert_eq!(dev.receive(&[9; 60], &mem), RxOutcome::TooLarge);
        rx.pop_used(&mem);
        let h = rx.post(&mem, &[(MEM_SIZE as u64 - 16, 1526, true)]);
        let out = dev.receive(&[9; 60], &mem);
        assert!(
            matches!(out, RxOutcome::BadChain | RxOutcome::TooLarge),
            "{out:?}"
        );

        // Transmit: shorter than the header, longer than a frame, outside
        // memory: returned, nothing sent.
        let _ = h;
        tx.post(&mem, &[(0x40000, 4, false)]);
        tx.post(&mem, &[(0x40000, 12 + 1515, false)]);
        tx.post(&mem, &[(MEM_SIZE as u64 - 8, 100, false)]);
        w32(&mut dev, &mem, reg::QUEUE_NOTIFY, 1);
        assert!(dev.take_tx_frames().is_empty());
        assert_eq!(dev.stats().tx_dropped, 3);
        for _ in 0..3 {
            assert!(tx.pop_used(&mem).is_some());
        }
        // A notify of a queue that does not exist does nothing.
        w32(&mut dev, &mem, reg::QUEUE_NOTIFY, 7);
        assert!(dev.transport().is_live());
    }

    #[test]
    fn state_round_trip() {
        use crate::persist::Persist;
        let mem = mem();
        let mut dev = VirtioNet::new(MacAddr([0x52, 0x54, 0, 9, 9, 9]));
        let (mut rx, _tx) = setup(&mut dev, &mem);
        rx.post(&mem, &[(0x50000, 1526, true)]);
        rx.post(&mem, &[(0x51000, 1526, true)]);
        assert_eq!(dev.receive(&[1; 60], &mem), RxOutcome::Delivered);
        let state = dev.save();
        let bytes = postcard::to_allocvec(&state).unwrap();
        let back: super::super::VirtioNetState = postcard::from_bytes(&bytes).unwrap();
        let mut dev2 = VirtioNet::restore(mem.clone(), &back).unwrap();
        assert_eq!(dev2.save(), state);
        assert_eq!(dev2.mac(), MacAddr([0x52, 0x54, 0, 9, 9, 9]));
        assert_eq!(dev2.receive(&[2; 60], &mem), RxOutcome::Delivered);
        assert_eq!(rx.pop_used(&mem).unwrap().1, 72);
        assert_eq!(rx.pop_used(&mem), Some((1, 72)));
        // Another queue count, or rings outside memory: refused.
        let mut bad = state.clone();
        bad.transport.queues.pop();
        assert!(VirtioNet::restore(mem.clone(), &bad).is_err());
        let tiny = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(VirtioNet::restore(tiny, &state).is_err());
    }
}
