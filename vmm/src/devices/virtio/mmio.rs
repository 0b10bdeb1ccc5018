//! The virtio-mmio transport (virtio 1.2 §4.2.2, "modern", Version = 2) for
//! a device with one or more split virtqueues (QueueSel picks the one the
//! queue registers address).
//!
//! [`MmioTransport`] holds the transport registers and the queues; it decodes
//! register accesses below offset 0x100 and tells its device what to do
//! ([`MmioEvent`]). The device owns the configuration space (0x100 and up)
//! and the request processing. Everything here is a deterministic function of
//! the guest's accesses.
//!
//! Register accesses must be 32 bits wide and aligned; other widths read as 0
//! and are ignored on write. Registers the driver may only write read as 0
//! except the queue address registers, which read back. Queue configuration
//! writes are ignored while the queue is ready. The device is *live* (it
//! consumes buffers) only after the driver has set FEATURES_OK and DRIVER_OK,
//! every queue is ready, and neither FAILED nor DEVICE_NEEDS_RESET is set.
//! Driver errors the device cannot recover from (an invalid queue size, a
//! ready queue outside guest memory, an available index that runs more than
//! a queue size ahead) set DEVICE_NEEDS_RESET, as the specification asks.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::persist::{MmioTransportState, QueueSnapshot};
use crate::GuestMemory;

/// "virt" in little-endian: the MagicValue register.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Version register: 2 = the modern (virtio 1.x) transport.
pub const MMIO_VERSION: u32 = 2;
/// VendorID register: "TNDM" in little-endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"TNDM");
/// Maximum size of the queue offered in QueueNumMax.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Offset of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// VIRTIO_F_VERSION_1 (feature bit 32).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// InterruptStatus bit: the used ring was updated.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed (or DEVICE_NEEDS_RESET).
pub const INT_CONFIG: u32 = 2;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u32 = 1;
    /// DRIVER.
    pub const DRIVER: u32 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u32 = 0x40;
    /// FAILED.
    pub const FAILED: u32 = 0x80;
}

/// Register offsets (virtio 1.2 §4.2.2).
pub mod reg {
    /// MagicValue (R).
    pub const MAGIC: u64 = 0x00;
    /// Version (R).
    pub const VERSION: u64 = 0x04;
    /// DeviceID (R).
    pub const DEVICE_ID: u64 = 0x08;
    /// VendorID (R).
    pub const VENDOR_ID: u64 = 0x0c;
    /// DeviceFeatures (R).
    pub const DEVICE_FEATURES: u64 = 0x10;
    /// DeviceFeaturesSel (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    /// DriverFeatures (W).
    pub const DRIVER_FEATURES: u64 = 0x20;
    /// DriverFeaturesSel (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    /// QueueSel (W).
    pub const QUEUE_SEL: u64 = 0x30;
    /// QueueNumMax (R).
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    /// QueueNum (W).
    pub const QUEUE_NUM: u64 = 0x38;
    /// QueueReady (RW).
    pub const QUEUE_READY: u64 = 0x44;
    /// QueueNotify (W).
    pub const QUEUE_NOTIFY: u64 = 0x50;
    /// InterruptStatus (R).
    pub const INTERRUPT_STATUS: u64 = 0x60;
    /// InterruptACK (W).
    pub const INTERRUPT_ACK: u64 = 0x64;
    /// Status (RW).
    pub const STATUS: u64 = 0x70;
    /// QueueDescLow (W).
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    /// QueueDescHigh (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    /// QueueDriverLow (W).
    pub const QUEUE_DRIVER_LOW: u64 = 0x90;
    /// QueueDriverHigh (W).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x94;
    /// QueueDeviceLow (W).
    pub const QUEUE_DEVICE_LOW: u64 = 0xa0;
    /// QueueDeviceHigh (W).
    pub const QUEUE_DEVICE_HIGH: u64 = 0xa4;
    /// SHMSel (W).
    pub const SHM_SEL: u64 = 0xac;
    /// SHMLenLow (R).
    pub const SHM_LEN_LOW: u64 = 0xb0;
    /// SHMLenHigh (R).
    pub const SHM_LEN_HIGH: u64 = 0xb4;
    /// SHMBaseLow (R).
    pub const SHM_BASE_LOW: u64 = 0xb8;
    /// SHMBaseHigh (R).
    pub const SHM_BASE_HIGH: u64 = 0xbc;
    /// ConfigGeneration (R).
    pub const CONFIG_GENERATION: u64 = 0xfc;
}

/// A guest read of `data.len()` bytes at `offset` of a device's
/// configuration space `config`: bytes past its end read as 0.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(start) = usize::try_from(offset).ok().filter(|&o| o < config.len()) else {
        return;
    };
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Why a saved transport state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The queue's maximum size differs from this device's.
    #[error("saved queue maximum size {saved} differs from the device's {expected}")]
    QueueMaxSize {
        /// Saved QueueNumMax.
        saved: u16,
        /// This device's QueueNumMax.
        expected: u16,
    },
    /// The saved state has another number of queues than the device.
    #[error("saved state has {saved} queues, the device has {expected}")]
    QueueCount {
        /// Saved.
        saved: usize,
        /// The device's.
        expected: usize,
    },
    /// The queue fields are invalid (size, alignment).
    #[error("invalid saved queue: {0}")]
    Queue(#[source] virtio_queue::Error),
    /// A ready queue does not lie in guest memory.
    #[error(
        "saved queue (size {size}, descriptors {desc:#x}, driver ring {avail:#x}, \
         device ring {used:#x}) is not inside guest memory"
    )]
    QueueOutsideMemory {
        /// QueueNum.
        size: u16,
        /// Descriptor table address.
        desc: u64,
        /// Available ring address.
        avail: u64,
        /// Used ring address.
        used: u64,
    },
    /// The saved device features differ from what this device offers.
    #[error("saved device features {saved:#x} differ from the device's {offered:#x}")]
    DeviceFeatures {
        /// Saved.
        saved: u64,
        /// Offered by this device.
        offered: u64,
    },
    /// The driver acknowledged features the device does not offer.
    #[error("saved driver features {driver:#x} are not a subset of the device's {offered:#x}")]
    DriverFeatures {
        /// Saved acknowledged features.
        driver: u64,
        /// Offered by this device.
        offered: u64,
    },
}

/// What the device must do after a register write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioEvent {
    /// Nothing.
    None,
    /// The driver notified queue `n`: process it if live.
    Notify(u16),
    /// The driver reset the device (Status = 0); the transport is already
    /// reset.
    Reset,
}

/// Registers and queues of a virtio-mmio device.
#[derive(Debug)]
pub struct MmioTransport {
    device_id: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<Queue>,
}

impl MmioTransport {
    /// A reset transport for device type `device_id` offering
    /// `device_features`, with `num_queues` queues of at most
    /// [`QUEUE_MAX_SIZE`] entries.
    pub fn new(device_id: u32, device_features: u64, num_queues: usize) -> Self {
        MmioTransport {
            device_id,
            device_features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues: (0..num_queues)
                .map(|_| Queue::new(QUEUE_MAX_SIZE).expect("QUEUE_MAX_SIZE is a valid queue size"))
                .collect(),
        }
    }

    /// Features the device offers.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// Features the driver acknowledged.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// InterruptStatus register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Queue `n` (panics if the device has no such queue: a device bug).
    pub fn queue(&self, n: usize) -> &Queue {
        &self.queues[n]
    }

    /// Queue `n`, for the device's request processing.
    pub fn queue_mut(&mut self, n: usize) -> &mut Queue {
        &mut self.queues[n]
    }

    /// The queue QueueSel designates, if it exists.
    fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn selected_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The device may consume buffers: FEATURES_OK and DRIVER_OK set,
    /// FAILED and DEVICE_NEEDS_RESET clear, queue ready.
    pub fn is_live(&self) -> bool {
        let need = status::FEATURES_OK | status::DRIVER_OK;
        let bad = status::FAILED | status::NEEDS_RESET;
        self.status & need == need
            && self.status & bad == 0
            && self.queues.iter().all(|q| q.ready())
    }

    /// Raise "used buffer" in InterruptStatus.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= INT_VRING;
    }

    /// Set DEVICE_NEEDS_RESET after an unrecoverable driver error, with a
    /// configuration-change interrupt if the driver is already running.
    pub fn set_needs_reset(&mut self) {
        if self.status & status::NEEDS_RESET != 0 {
            return;
        }
        self.status |= status::NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt_status |= INT_CONFIG;
        }
    }

    /// Reset to the power-on state (Status = 0).
    pub fn reset(&mut self) {
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Read a register (offset < 0x100). Reads of other widths than 4 bytes
    /// or unaligned offsets return zeros.
    pub fn read_register(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 || offset & 3 != 0 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: bad register read width"
            );
            return;
        }
        let q = self.selected();
        let v: u32 = match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_NUM => q.map_or(0, |q| u32::from(q.size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::QUEUE_DESC_LOW => q.map_or(0, |q| q.desc_table() as u32),
            reg::QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc_table() >> 32) as u32),
            reg::QUEUE_DRIVER_LOW => q.map_or(0, |q| q.avail_ring() as u32),
            reg::QUEUE_DRIVER_HIGH => q.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            reg::QUEUE_DEVICE_LOW => q.map_or(0, |q| q.used_ring() as u32),
            reg::QUEUE_DEVICE_HIGH => q.map_or(0, |q| (q.used_ring() >> 32) as u32),
            // No shared memory regions: length reads as all ones (§4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Write a register (offset < 0x100). `mem` is used to check a queue the
    /// driver makes ready.
    pub fn write_register(&mut self, offset: u64, data: &[u8], mem: &GuestMemory) -> MmioEvent {
        if data.len() != 4 || offset & 3 != 0 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: bad register write width"
            );
            return MmioEvent::None;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if self.queue_writable() {
                    let size = u16::try_from(v).unwrap_or(0);
                    let bad = self
                        .selected_mut()
                        .is_some_and(|q| q.try_set_size(size).is_err());
                    if bad {
                        tracing::warn!(size = v, "virtio-mmio: invalid queue size");
                        self.set_needs_reset();
                    }
                }
            }
            reg::QUEUE_READY => self.write_queue_ready(v, mem),
            reg::QUEUE_NOTIFY => {
                if let Ok(n) = u16::try_from(v) {
                    if usize::from(n) < self.queues.len() {
                        return MmioEvent::Notify(n);
                    }
                }
            }
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => return self.write_status(v),
            reg::QUEUE_DESC_LOW..=reg::QUEUE_DEVICE_HIGH => self.write_queue_address(offset, v),
            _ => tracing::debug!(
                offset,
                "virtio-mmio: write to read-only or unknown register"
            ),
        }
        MmioEvent::None
    }

    fn queue_writable(&self) -> bool {
        self.selected().is_some_and(|q| !q.ready())
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            tracing::debug!("virtio-mmio: driver features written outside negotiation");
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => {
                self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32);
            }
            _ => {}
        }
    }

    fn write_queue_ready(&mut self, v: u32, mem: &GuestMemory) {
        let Some(q) = self.selected_mut() else {
            return;
        };
        if v == 0 {
            q.set_ready(false);
            return;
        }
        if q.ready() {
            return;
        }
        q.set_ready(true);
        if !q.is_valid(mem) {
            tracing::warn!(
                desc = q.desc_table(),
                avail = q.avail_ring(),
                used = q.used_ring(),
                size = q.size(),
                "virtio-mmio: queue made ready outside guest memory"
            );
            q.set_ready(false);
            self.set_needs_reset();
        }
    }

    fn write_queue_address(&mut self, offset: u64, v: u32) {
        if !self.queue_writable() {
            return;
        }
        let Some(q) = self.selected_mut() else {
            return;
        };
        match offset {
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
            reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
            reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
            reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) -> MmioEvent {
        if v == 0 {
            self.reset();
            return MmioEvent::Reset;
        }
        let mut new = v & !status::NEEDS_RESET;
        if new & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let acceptable = self.driver_features & !self.device_features == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !acceptable {
                tracing::warn!(
                    driver = self.driver_features,
                    device = self.device_features,
                    "virtio-mmio: refusing FEATURES_OK"
                );
                new &= !status::FEATURES_OK;
            }
        }
        self.status = new | (self.status & status::NEEDS_RESET);
        MmioEvent::None
    }

    /// Capture the registers and queues.
    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            device_features: self.device_features,
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let q = q.state();
                    QueueSnapshot {
                        max_size: q.max_size,
                        size: q.size,
                        ready: q.ready,
                        desc_table: q.desc_table,
                        avail_ring: q.avail_ring,
                        used_ring: q.used_ring,
                        next_avail: q.next_avail,
                        next_used: q.next_used,
                        event_idx_enabled: q.event_idx_enabled,
                    }
                })
                .collect(),
        }
    }

    /// Replace the registers and queue with `state`, validating it against
    /// this device's features and against guest memory. On error `self` is
    /// unchanged.
    pub fn restore_state(
        &mut self,
        state: &MmioTransportState,
        mem: &GuestMemory,
    ) -> Result<(), MmioError> {
        if state.device_features != self.device_features {
            return Err(MmioError::DeviceFeatures {
                saved: state.device_features,
                offered: self.device_features,
            });
        }
        if state.driver_features & !self.device_features != 0 {
            return Err(MmioError::DriverFeatures {
                driver: state.driver_features,
                offered: self.device_features,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(MmioError::QueueCount {
                saved: state.queues.len(),
                expected: self.queues.len(),
            });
        }
        let queues = state
            .queues
            .iter()
            .map(|s| restore_queue(s, mem))
            .collect::<Result<Vec<_>, _>>()?;
        self.device_features_sel = state.device_features_sel;
        self.driver_features = state.driver_features;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        self.queues = queues;
        Ok(())
    }
}

/// A queue from its saved state, checked (size, alignment, inside guest
/// memory when ready).
fn restore_queue(s: &QueueSnapshot, mem: &GuestMemory) -> Result<Queue, MmioError> {
    if s.max_size != QUEUE_MAX_SIZE {
        return Err(MmioError::QueueMaxSize {
            saved: s.max_size,
            expected: QUEUE_MAX_SIZE,
        });
    }
    let mut queue = Queue::new(s.max_size).map_err(MmioError::Queue)?;
    queue.try_set_size(s.size).map_err(MmioError::Queue)?;
    queue
        .try_set_desc_table_address(GuestAddress(s.desc_table))
        .map_err(MmioError::Queue)?;
    queue
        .try_set_avail_ring_address(GuestAddress(s.avail_ring))
        .map_err(MmioError::Queue)?;
    queue
        .try_set_used_ring_address(GuestAddress(s.used_ring))
        .map_err(MmioError::Queue)?;
    queue.set_next_avail(s.next_avail);
    queue.set_next_used(s.next_used);
    queue.set_event_idx(s.event_idx_enabled);
    queue.set_ready(s.ready);
    if s.ready && !queue.is_valid(mem) {
        return Err(MmioError::QueueOutsideMemory {
            size: s.size,
            desc: s.desc_table,
            avail: s.avail_ring,
            used: s.used_ring,
        });
    }
    Ok(queue)
}
