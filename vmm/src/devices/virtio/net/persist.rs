//! Saved state of the virtio-net device, and its [`Persist`] implementation.
//!
//! What is saved: the MAC address the guest was shown and the transport
//! (registers, both queues). Nothing else is in flight at an exit: sent
//! frames leave the device at the exit that produced them, and received
//! frames wait on the host, not in the device. The counters are host
//! diagnostics and start at zero after a restore (a sync point, applied in
//! place with [`VirtioNet::check_state`] and [`VirtioNet::commit_state`],
//! keeps them). The TAP backend is not
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

/// A saved state checked against guest memory, ready to be applied in
/// place with [`VirtioNet::commit_state`] (which cannot fail).
#[derive(Debug)]
pub struct CheckedNetState(VirtioNet);

impl VirtioNet {
    /// Check `state` for [`Self::commit_state`] (the transport and queues
    /// must fit guest memory); `self` is not changed.
    pub fn check_state(
        &self,
        state: &VirtioNetState,
        mem: &GuestMemory,
    ) -> Result<CheckedNetState, MmioError> {
        Ok(CheckedNetState(VirtioNet::restore(mem.clone(), state)?))
    }

    /// Overwrite the device's state in place (sync points): the MAC and
    /// transport become the checked state's, frames not yet taken are
    /// dropped (none are at an exit), and the host-side counters go on.
    pub fn commit_state(&mut self, checked: CheckedNetState) {
        let stats = self.stats();
        *self = checked.0;
        self.set_stats(stats);
    }
}
