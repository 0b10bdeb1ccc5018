//! Userspace devices. Each is a deterministic state machine: its inputs are
//! the guest's port/MMIO accesses and values passed in explicitly by the run
//! loop (virtual time, console bytes). None reads the host by itself.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Devices, DevicesError, DevicesState, IoAction};
