//! virtio-net: the device ([`device`]), its saved state ([`persist`]), the
//! TAP backend on the host ([`tap`]) and the gratuitous announcement a
//! migrated guest's new host sends ([`announce`]).

pub mod announce;
pub mod device;
pub mod mac;
pub mod persist;
pub mod tap;

pub use device::*;
pub use mac::{MacAddr, MacError};
pub use persist::VirtioNetState;
