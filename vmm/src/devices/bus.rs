//! The device set of a Tandem VM and the dispatch of port and MMIO accesses.
//!
//! | device | where | IRQ |
//! |---|---|---|
//! | 8259A PIC pair | 0x20-0x21, 0xa0-0xa1, ELCR 0x4d0-0x4d1 | - |
//! | 8254 PIT | 0x40-0x43, port 0x61 | 0 |
//! | i8042 (reset only) | 0x60, 0x64 | - |
//! | CMOS RTC | 0x70-0x71 | - |
//! | POST code | 0x80 | - |
//! | debug exit | 0xf4 | - |
//! | 16550 UART (COM1) | 0x3f8-0x3ff | 4 |
//! | virtio-mmio block | 0xd000_0000 + 4 KiB | 5 |
//! | virtio-mmio net | 0xd000_1000 + 4 KiB | 6 |
//!
//! Unclaimed port reads return all ones, writes are ignored (as on a PC).

use serde::{Deserialize, Serialize};

use super::legacy::debug_exit::{DebugExit, PostCode};
use super::legacy::i8042::I8042;
use super::legacy::pic::Pic;
use super::legacy::pit::Pit;
use super::legacy::rtc::Rtc;
use super::legacy::serial::SerialDevice;
use super::virtio::block::{BlockConfig, HostIoError, VirtioBlock};
use super::virtio::net::{MacAddr, VirtioNet};
use crate::inputs::Inputs;
use crate::loader::layout::{
    VIRTIO_BLK_IRQ, VIRTIO_MMIO_BASE, VIRTIO_NET_IRQ, VIRTIO_NET_MMIO_BASE,
};
use crate::outputs::OutputKind;
use crate::persist::Persist;
use crate::GuestMemory;

/// COM1 base port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1 IRQ.
pub const SERIAL_IRQ: u8 = 4;
/// PIT channel 0 IRQ.
pub const TIMER_IRQ: u8 = 0;
/// The debug-exit port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Size of the virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

/// What a port write asks of the run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing: continue.
    None,
    /// The guest wrote its exit status to the debug-exit port.
    Exit(i32),
    /// The guest asked for a CPU reset (i8042 command 0xfe).
    Reset,
}

/// Errors of the device set.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("virtio-blk: {0}")]
    /// The disk image could not be opened.
    Block(#[from] super::virtio::block::BlockError),
    #[error("restoring virtio-blk: {0}")]
    /// The disk's saved state does not fit its image or guest memory.
    BlockRestore(#[from] super::virtio::block::PersistError),
    #[error("restoring virtio-net: {0}")]
    /// The NIC's saved transport state is invalid.
    NetRestore(#[from] super::virtio::mmio::MmioError),
    /// The saved PIC state is invalid.
    #[error("restoring the PIC: {0}")]
    PicRestore(#[from] super::legacy::pic::PicError),
    /// The saved PIT state is invalid.
    #[error("restoring the PIT: {0}")]
    PitRestore(#[from] super::legacy::pit::PitError),
    /// The saved RTC state is invalid.
    #[error("restoring the RTC: {0}")]
    RtcRestore(#[from] super::legacy::rtc::RtcError),
    /// The saved serial-port state is invalid.
    #[error("restoring the serial port: {0}")]
    SerialRestore(#[from] super::legacy::serial::SerialError),
    /// The saved i8042 state is invalid.
    #[error("restoring the i8042: {0}")]
    I8042Restore(#[from] super::legacy::i8042::I8042Error),
    #[error("the snapshot has a disk but no disk image was given to restore it")]
    /// The saved state has a disk, and no image was given.
    MissingDisk,
    #[error("a disk image was given but the snapshot has no disk")]
    /// An image was given, and the saved state has no disk.
    UnexpectedDisk,
    /// A sync point's devices have a NIC and the machine has none, or the
    /// other way round.
    #[error("the saved state and the machine differ in having a NIC")]
    NetMismatch,
}

/// Every device of the VM.
pub struct Devices {
    /// The interrupt controllers (8259A pair).
    pub pic: Pic,
    /// The timer (8254).
    pub pit: Pit,
    /// The CMOS RTC.
    pub rtc: Rtc,
    /// COM1.
    pub serial: SerialDevice,
    /// The keyboard controller (reset only).
    pub i8042: I8042,
    /// The debug-exit port (0xf4).
    pub debug_exit: DebugExit,
    /// The POST code port (0x80).
    pub post: PostCode,
    /// The virtio-blk disk, if the VM has one.
    pub block: Option<VirtioBlock>,
    /// The virtio-net NIC, if the VM has one.
    pub net: Option<VirtioNet>,
}

/// The state of every device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    /// PIC pair.
    pub pic: <Pic as Persist>::State,
    /// PIT and port 0x61.
    pub pit: <Pit as Persist>::State,
    /// RTC.
    pub rtc: <Rtc as Persist>::State,
    /// COM1.
    pub serial: <SerialDevice as Persist>::State,
    /// i8042.
    pub i8042: <I8042 as Persist>::State,
    /// POST code.
    pub post: <PostCode as Persist>::State,
    /// The disk, if any.
    pub block: Option<<VirtioBlock as Persist>::State>,
    /// The NIC, if any.
    pub net: Option<<VirtioNet as Persist>::State>,
}

impl Devices {
    /// A fresh device set: a disk if `disk`, a NIC with address `net` if
    /// given.
    pub fn new(
        mem_below_4g: u64,
        mem_above_4g: u64,
        disk: Option<BlockConfig>,
        net: Option<MacAddr>,
    ) -> Result<Self, DevicesError> {
        Ok(Devices {
            pic: Pic::new(),
            pit: Pit::new(),
            rtc: Rtc::new(mem_below_4g, mem_above_4g),
            serial: SerialDevice::new(),
            i8042: I8042::new(),
            debug_exit: DebugExit::new(),
            post: PostCode::default(),
            block: disk.map(VirtioBlock::new).transpose()?,
            net: net.map(VirtioNet::new),
        })
    }

    /// Port read. Time is requested from `inputs` only when the register
    /// depends on it.
    pub fn pio_in(&mut self, port: u16, data: &mut [u8], exit_seq: u64, inputs: &mut dyn Inputs) {
        let value = match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => self.pic.read(port),
            0x40..=0x42 | 0x61 => self.pit.read(port, &mut || inputs.clock_ns(exit_seq)),
            0x60 | 0x64 => self.i8042.read(port),
            0x70 | 0x71 => self.rtc.read(port, &mut || inputs.wall_clock_ns(exit_seq)),
            0x80 => self.post.read(),
            SERIAL_PORT..=0x3ff => self.serial.read((port - SERIAL_PORT) as u8),
            _ => 0xff,
        };
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    /// Port write.
    pub fn pio_out(
        &mut self,
        port: u16,
        data: &[u8],
        exit_seq: u64,
        inputs: &mut dyn Inputs,
    ) -> IoAction {
        let Some(&value) = data.first() else {
            return IoAction::None;
        };
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => self.pic.write(port, value),
            0x40..=0x43 | 0x61 => self
                .pit
                .write(port, value, &mut || inputs.clock_ns(exit_seq)),
            0x60 | 0x64 if self.i8042.write(port, value).is_some() => return IoAction::Reset,
            0x70 | 0x71 => self
                .rtc
                .write_timed(port, value, &mut || inputs.wall_clock_ns(exit_seq)),
            0x80 => self.post.write(value),
            DEBUG_EXIT_PORT => return IoAction::Exit(self.debug_exit.write(value).status),
            SERIAL_PORT..=0x3ff => self.serial.write((port - SERIAL_PORT) as u8, value),
            _ => {}
        }
        IoAction::None
    }

    /// MMIO read; unclaimed addresses read as all ones.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        let blk = VIRTIO_MMIO_BASE..VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE;
        let net = VIRTIO_NET_MMIO_BASE..VIRTIO_NET_MMIO_BASE + VIRTIO_MMIO_SIZE;
        match (&mut self.block, &mut self.net) {
            (Some(b), _) if blk.contains(&addr) => b.mmio_read(addr - blk.start, data),
            (_, Some(n)) if net.contains(&addr) => n.mmio_read(addr - net.start, data),
            _ => data.fill(0xff),
        }
    }

    /// MMIO write; unclaimed addresses are ignored. A host I/O error of
    /// the disk stalls it (the exit is unfinished until
    /// [`Self::retry_block`]).
    pub fn mmio_write(
        &mut self,
        addr: u64,
        data: &[u8],
        mem: &GuestMemory,
    ) -> Result<(), HostIoError> {
        let blk = VIRTIO_MMIO_BASE..VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE;
        let net = VIRTIO_NET_MMIO_BASE..VIRTIO_NET_MMIO_BASE + VIRTIO_MMIO_SIZE;
        match (&mut self.block, &mut self.net) {
            (Some(b), _) if blk.contains(&addr) => b.mmio_write(addr - blk.start, data, mem)?,
            (_, Some(n)) if net.contains(&addr) => n.mmio_write(addr - net.start, data, mem),
            _ => {}
        }
        Ok(())
    }

    /// The host I/O error the disk is stalled on, if any.
    pub fn block_stalled(&self) -> Option<&HostIoError> {
        self.block.as_ref().and_then(VirtioBlock::stalled)
    }

    /// Retry the disk's stalled requests (Ok if it is not stalled).
    pub fn retry_block(&mut self, mem: &GuestMemory) -> Result<(), HostIoError> {
        match &mut self.block {
            Some(b) => b.retry(mem),
            None => Ok(()),
        }
    }

    /// The outputs the devices produced at this exit, in a fixed order
    /// (console bytes, then sent frames). Console bytes are cut at their
    /// deterministic points, or now if `force` (see
    /// [`SerialDevice::take_output`]).
    pub fn take_outputs(&mut self, force: bool) -> Vec<(OutputKind, Vec<u8>)> {
        let mut out = Vec::new();
        if let Some(bytes) = self.serial.take_output(force) {
            out.push((OutputKind::Console, bytes));
        }
        if let Some(n) = &mut self.net {
            out.extend(
                n.take_tx_frames()
                    .into_iter()
                    .map(|f| (OutputKind::NetFrame, f)),
            );
        }
        out
    }

    /// Propagate device interrupt outputs to the PIC.
    pub fn update_irq_lines(&mut self) {
        if self.serial.take_interrupt() {
            self.pic.raise_irq(SERIAL_IRQ);
        }
        if let Some(b) = &self.block {
            self.pic
                .set_irq_level(VIRTIO_BLK_IRQ as u8, b.interrupt_level());
        }
        if let Some(n) = &self.net {
            self.pic
                .set_irq_level(VIRTIO_NET_IRQ as u8, n.interrupt_level());
        }
    }

    /// Capture every device.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            pic: self.pic.save(),
            pit: self.pit.save(),
            rtc: self.rtc.save(),
            serial: self.serial.save(),
            i8042: self.i8042.save(),
            post: self.post.save(),
            block: self.block.as_ref().map(Persist::save),
            net: self.net.as_ref().map(Persist::save),
        }
    }

    /// Overwrite every device's state in place (sync points), keeping the
    /// host resources: the disk image.
    pub fn load_state(
        &mut self,
        state: &DevicesState,
        mem: &GuestMemory,
    ) -> Result<(), DevicesError> {
        match (&self.block, &state.block) {
            (Some(_), None) => return Err(DevicesError::UnexpectedDisk),
            (None, Some(_)) => return Err(DevicesError::MissingDisk),
            _ => {}
        }
        // The legacy devices are plain state machines: rebuilt. The disk
        // keeps its open image and dirty-block tracker, the NIC its host
        // counters: both are restored in place. Everything is checked
        // before anything changes (the disk last: its `load_state` checks
        // first), so that a failure leaves `self` untouched.
        let net = match (&self.net, &state.net) {
            (Some(n), Some(s)) => Some(n.check_state(s, mem)?),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => return Err(DevicesError::NetMismatch),
        };
        // Only the legacy devices' states are copied.
        let others = DevicesState {
            pic: state.pic.clone(),
            pit: state.pit.clone(),
            rtc: state.rtc.clone(),
            serial: state.serial.clone(),
            i8042: state.i8042.clone(),
            post: state.post.clone(),
            block: None,
            net: None,
        };
        let mut fresh = Devices::restore(&others, None, mem)?;
        if let (Some(b), Some(s)) = (self.block.as_mut(), &state.block) {
            b.load_state(s, mem)?;
        }
        if let (Some(n), Some(checked)) = (self.net.as_mut(), net) {
            n.commit_state(checked);
        }
        fresh.block = self.block.take();
        fresh.net = self.net.take();
        *self = fresh;
        Ok(())
    }

    /// Rebuild every device from `state`.
    pub fn restore(
        state: &DevicesState,
        disk: Option<BlockConfig>,
        mem: &GuestMemory,
    ) -> Result<Self, DevicesError> {
        let block = match (&state.block, disk) {
            (Some(s), Some(cfg)) => Some(VirtioBlock::restore((cfg, mem.clone()), s)?),
            (Some(_), None) => return Err(DevicesError::MissingDisk),
            (None, Some(_)) => return Err(DevicesError::UnexpectedDisk),
            (None, None) => None,
        };
        Ok(Devices {
            pic: Pic::restore((), &state.pic)?,
            pit: Pit::restore((), &state.pit)?,
            rtc: Rtc::restore((), &state.rtc)?,
            serial: SerialDevice::restore((), &state.serial)?,
            i8042: I8042::restore((), &state.i8042)?,
            debug_exit: DebugExit::new(),
            post: match PostCode::restore((), &state.post) {
                Ok(p) => p,
                Err(never) => match never {},
            },
            block,
            net: state
                .net
                .as_ref()
                .map(|s| VirtioNet::restore(mem.clone(), s))
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::tests::{new_mem, TempImage};
    use crate::devices::virtio::net::NetStats;

    fn devices(img: &TempImage) -> Devices {
        let mac = "52:54:00:12:34:56".parse::<MacAddr>().unwrap();
        Devices::new(16 << 20, 0, Some(img.config(false)), Some(mac)).unwrap()
    }

    #[test]
    fn load_state_keeps_the_nics_counters_and_changes_nothing_on_error() {
        let img = TempImage::new("bus-load", 1 << 20);
        let mem = new_mem();
        let mut d = devices(&img);
        let stats = NetStats {
            rx_frames: 3,
            tx_frames: 5,
            ..NetStats::default()
        };
        d.net.as_mut().unwrap().set_stats(stats);
        let saved = d.save();
        d.pic.raise_irq(3);
        d.load_state(&saved, &mem).unwrap();
        assert_eq!(format!("{:?}", d.save()), format!("{saved:?}"));
        assert_eq!(d.net.as_ref().unwrap().stats(), stats, "host counters kept");

        // A NIC state that cannot be applied: nothing changes, not even
        // the devices restored before it.
        d.pic.raise_irq(3);
        let before = format!("{:?}", d.save());
        let mut bad = saved.clone();
        bad.net.as_mut().unwrap().transport.device_features ^= 1 << 40;
        assert!(matches!(
            d.load_state(&bad, &mem),
            Err(DevicesError::NetRestore(_))
        ));
        assert_eq!(format!("{:?}", d.save()), before);
        // A sync point of a machine without a NIC.
        let mut none = saved.clone();
        none.net = None;
        assert!(matches!(
            d.load_state(&none, &mem),
            Err(DevicesError::NetMismatch)
        ));
        assert_eq!(format!("{:?}", d.save()), before);
        assert_eq!(d.net.as_ref().unwrap().stats(), stats);
    }
}
