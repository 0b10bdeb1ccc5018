//! The one way Tandem captures and restores state.
//!
//! Every stateful component (vCPU, each device, the VM as a whole)
//! implements [`Persist`]: `save` returns a plain serde value, `restore`
//! rebuilds the component from such a value plus whatever host resources it
//! needs (files, guest memory). Snapshots, sync points, migration and
//! seeding a secondary all go through this trait.

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
