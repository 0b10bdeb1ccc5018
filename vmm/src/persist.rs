//! The one way Tandem captures and restores state.
//!
//! Every device implements [`Persist`]: `save` returns a plain serde value,
//! `restore` rebuilds the device from such a value plus whatever host
//! resources it needs (files, guest memory). The vCPU's state is read and
//! written with KVM ioctls that can fail, so it is captured by
//! `Vcpu::save`/`Vcpu::restore` into a serde `VcpuState`; together with
//! the devices' states and the logical clock it forms
//! `machine::MachineState`, the one value that snapshots, sync points and
//! migration (and later seeding a secondary) carry. Guest memory travels
//! beside it, page by page (`vstate::memory`).

use serde::{de::DeserializeOwned, Serialize};

/// Capture and restore of one component's state.
pub trait Persist: Sized {
    /// The serializable state.
    type State: Serialize + DeserializeOwned + Clone + std::fmt::Debug;
    /// Host resources needed to rebuild the component (files, memory, ...).
    type ConstructorArgs;
    /// Why a restore failed.
    type Error: std::error::Error;

    /// Capture the component's state.
    fn save(&self) -> Self::State;
    /// Rebuild the component from `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
