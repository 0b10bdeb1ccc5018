//! One Tandem VM: a KVM VM with one x86-64 vCPU, guest memory, boot loaders,
//! userspace devices, the run loop, whole-VM state capture/restore and dirty
//! tracking.
//!
//! Everything the guest can observe from the host passes through the
//! [`inputs::Inputs`] interface at a VM exit, and everything the world sees
//! of the guest leaves through [`outputs::Outputs`] (see
//! `docs/architecture.md`,
//! "The determinism boundary"). Devices are deterministic state machines:
//! their only inputs are the guest's accesses and the values handed to them
//! by the run loop.

// Every unsafe block says why it is sound (`// SAFETY:`).
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod devices;
pub mod dirty;
pub mod image;
pub mod inputs;
pub mod kick;
pub mod loader;
pub mod machine;
pub mod outputs;
pub mod persist;
pub mod run;
pub mod snapshot;
pub mod sync;
pub mod throttle;
pub mod vstate;

/// Guest memory as every part of the VMM sees it: mmap-backed regions whose
/// writes made through the `vm-memory` API (virtio, loaders, restore) are
/// tracked in an atomic bitmap, merged with KVM's dirty log by [`dirty`].
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Size of a guest page for dirty tracking and state transfer.
pub const PAGE_SIZE: usize = 4096;
