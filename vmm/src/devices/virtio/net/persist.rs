//! Saved state of the virtio-net device, and its [`Persist`] implementation.
//!
//! What is saved: the MAC address the guest was shown and the transport
//! (registers, both queues). Nothing else is in flight at an exit: sent
//! frames leave the device at the exit that produced them, and received
//! frames wait on the host, not in the device. The counters are host
//! diagnostics and start at zero after a restore. The TAP backend is not
//! device state: the restoring host opens its own.

use serde::{Deserialize, Serialize};

use super::device::VirtioNet;
use super::mac::MacAddr;
use crate::devices::virtio::mmio::MmioError;
use crate::devices::virtio::persist::MmioTransportState;
use crate::persist::Persist;
use crate::GuestMemory;

/// Saved state of a [`VirtioNet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    /// The guest's MAC address (its network identity: it moves with it).
    pub mac: MacAddr,
    /// Transport registers and queues.
    pub transport: MmioTransportState,
}

impl Persist for VirtioNet {
    type State = VirtioNetState;
    /// The guest memory the queues must lie in.
    type ConstructorArgs = GuestMemory;
    type Error = MmioError;

    fn save(&self) -> VirtioNetState {
        VirtioNetState {
            mac: self.mac(),
            transport: self.transport().state(),
        }
    }

    fn restore(mem: GuestMemory, state: &VirtioNetState) -> Result<Self, MmioError> {
        let mut dev = VirtioNet::new(state.mac);
        dev.transport_mut().restore_state(&state.transport, &mem)?;
        Ok(dev)
    }
}
