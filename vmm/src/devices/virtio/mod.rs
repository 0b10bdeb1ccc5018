//! virtio devices on the MMIO transport.

pub mod block;
pub mod mmio;
pub mod net;
pub mod persist;
