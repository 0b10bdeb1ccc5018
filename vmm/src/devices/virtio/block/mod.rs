//! virtio-blk: the device ([`device`]) and its saved state ([`persist`]).

pub mod device;
pub mod persist;

pub use device::*;
pub use persist::{PersistError, VirtioBlockState};
