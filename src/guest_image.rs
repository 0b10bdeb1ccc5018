//! The project's test guest, embedded in the `tandem` binary.
//!
//! `build.rs` builds `guest/` (a freestanding x86-64 kernel booted by PVH;
//! see `guest/src/main.rs` for its workloads and boot ABI) and this module
//! embeds the resulting ELF so that `tandem` can boot it without a separate
//! file.

/// The test guest: an ELF64 image with a Xen PVH note
/// (`XEN_ELFNOTE_PHYS32_ENTRY`), loaded at physical 1 MiB. Its command line
/// is `WORKLOAD [ARGS] [hz=N]`; every workload prints
/// `RESULT <workload> <16 hex digits>` and exits through port 0xf4.
#[allow(dead_code)]
pub const GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tandem-guest.elf"));
