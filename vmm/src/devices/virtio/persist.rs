//! Saved state shared by every virtio-mmio device: the transport registers
//! and the split virtqueues. Each device saves these inside its own state
//! (see `block::persist`, `net::persist`).

use serde::{Deserialize, Serialize};

/// Saved state of a split virtqueue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device (QueueNumMax).
    pub max_size: u16,
    /// Size chosen by the driver (QueueNum).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used (device) ring.
    pub used_ring: u64,
    /// Next available-ring entry the device will consume.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX in use (never offered today; kept for format
    /// stability).
    pub event_idx_enabled: bool,
}

/// Saved registers of the virtio-mmio transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Features the device offered (checked on restore).
    pub device_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status (including DEVICE_NEEDS_RESET if the device set it).
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The device's virtqueues, in queue index order.
    pub queues: Vec<QueueSnapshot>,
}
