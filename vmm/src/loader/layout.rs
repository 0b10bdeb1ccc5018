//! Guest physical memory layout used by the boot loaders.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA (left zero: there is no BIOS)
//! 0x0000_0500  BOOT_GDT_START   boot GDT: null, code (0x08), data (0x10), TSS (0x18)
//! 0x0000_0520  BOOT_IDT_START   empty IDT (limit 0)
//! 0x0000_6000  PVH_INFO_START   hvm_start_info (PVH only)
//! 0x0000_6040  PVH_MODLIST_START hvm_modlist_entry[] (PVH initrd = module 0)
//! 0x0000_6100  PVH_MEMMAP_START hvm_memmap_table_entry[] up to 0x7000
//! 0x0000_7000  ZERO_PAGE_START  Linux boot_params ("zero page", bzImage only)
//! 0x0000_8ff0  BOOT_STACK       initial RSP/RBP for the 64-bit entry (grows down)
//! 0x0000_9000  PML4_START       identity page tables for the first 1 GiB:
//! 0x0000_a000  PDPTE_START        PML4 -> one PDPT -> one PD of 512 x 2 MiB pages
//! 0x0000_b000  PDE_START
//! 0x0002_0000  CMDLINE_START    kernel command line (CMDLINE_MAX_SIZE bytes incl. NUL)
//! 0x0009_fc00  EBDA_START       EBDA / VGA / BIOS area, reserved in the e820 map up to 1 MiB
//! 0x0010_0000  HIMEM_START      kernels load here or above (bzImage at code32_start,
//!                               ELF at its p_paddr — Debian's vmlinux at 16 MiB)
//!   ...        initrd           placed at the top of low RAM, page aligned
//! 0xc000_0000  MMIO_HOLE_START  no RAM from 3 GiB to 4 GiB: virtio-mmio devices
//! 0xd000_0000  VIRTIO_MMIO_BASE   live here (IRQ VIRTIO_BLK_IRQ on the 8259;
//!                                  the NIC at VIRTIO_NET_MMIO_BASE, IRQ 6)
//! 0x1_0000_0000 MMIO_HOLE_END   RAM beyond the first 3 GiB continues here
//! ```
//!
//! Everything below 1 MiB that the loaders write lies in what the kernel
//! sees as usable RAM below the EBDA; Linux reserves the whole first MiB
//! itself and copies what it needs (boot_params, start_info, command line)
//! before it reuses that memory.

use vm_memory::GuestAddress;

/// Boot GDT (4 descriptors, 32 bytes).
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty boot IDT, right after the GDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`; its address is passed in EBX.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (`hvm_modlist_entry`, 32 bytes each); the initrd is module 0.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry`, 24 bytes each), up to `ZERO_PAGE_START`.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Maximum number of PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;
/// Linux `boot_params` (the zero page); its address is passed in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page-map level 4 of the boot identity mapping.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 x 2 MiB pages = the first 1 GiB) of the boot identity mapping.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted, including the terminating NUL. This is
/// x86 Linux's `COMMAND_LINE_SIZE`; a bzImage may announce a smaller limit
/// in its header (`cmdline_size`), which is then enforced too.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; from here to `HIMEM_START` is
/// reported as reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the real-mode area: the lowest address a kernel is loaded at.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the hole below 4 GiB that holds no RAM (device MMIO).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the MMIO hole; RAM above `MMIO_HOLE_START` is relocated here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Base of the virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// 8259 IRQ line of the virtio block device.
pub const VIRTIO_BLK_IRQ: u32 = 5;
/// The virtio-mmio network device's window (4 KiB), right after the disk's.
pub const VIRTIO_NET_MMIO_BASE: u64 = VIRTIO_MMIO_BASE + 0x1000;
/// The network device's interrupt on the 8259.
pub const VIRTIO_NET_IRQ: u32 = 6;

// The layout's regions must not overlap (checked at compile time).
const _: () = {
    assert!(BOOT_IDT_START >= BOOT_GDT_START + 32);
    assert!(PVH_INFO_START >= BOOT_IDT_START + 8);
    assert!(PVH_MODLIST_START >= PVH_INFO_START + 56);
    assert!(PVH_MEMMAP_START >= PVH_MODLIST_START + 32);
    assert!(PVH_MEMMAP_MAX_ENTRIES >= 8);
    assert!(BOOT_STACK > ZERO_PAGE_START + 4096 && BOOT_STACK < PML4_START);
    assert!(PDPTE_START == PML4_START + 4096 && PDE_START == PDPTE_START + 4096);
    assert!(CMDLINE_START >= PDE_START + 4096);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(VIRTIO_MMIO_BASE >= MMIO_HOLE_START && VIRTIO_MMIO_BASE < MMIO_HOLE_END);
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// RAM regions for a guest of `mem_size` bytes: up to 3 GiB from address 0
/// (below the MMIO hole), and the rest from 4 GiB up.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(MMIO_HOLE_END),
                (mem_size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// One entry of the memory map given to the guest (e820 / PVH memmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Guest physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The guest's memory map, built from the RAM regions `(start, len)`:
/// every region is RAM, except that `EBDA_START..HIMEM_START` (EBDA, VGA
/// window, BIOS ROM area) is reported as reserved. Entries are sorted and
/// do not overlap. Empty if the first region does not start at 0 or does not
/// reach `HIMEM_START` (such a guest cannot boot; the loaders reject it).
pub fn memory_map(regions: &[(u64, u64)]) -> Vec<MemoryMapEntry> {
    let mut regions: Vec<(u64, u64)> = regions.iter().copied().filter(|r| r.1 > 0).collect();
    regions.sort_unstable();
    let mut map = Vec::new();
    for &(start, len) in &regions {
        let end = start + len;
        if start < HIMEM_START {
            if start != 0 || end < HIMEM_START {
                return Vec::new();
            }
            map.push(MemoryMapEntry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM,
            });
            map.push(MemoryMapEntry {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                kind: E820_RESERVED,
            });
            if end > HIMEM_START {
                map.push(MemoryMapEntry {
                    addr: HIMEM_START,
                    size: end - HIMEM_START,
                    kind: E820_RAM,
                });
            }
        } else {
            map.push(MemoryMapEntry {
                addr: start,
                size: len,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn ram_regions_small() {
        assert_eq!(ram_regions(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
    }

    #[test]
    fn ram_regions_exactly_3g() {
        assert_eq!(
            ram_regions(3 * GIB),
            vec![(GuestAddress(0), (3 * GIB) as usize)]
        );
    }

    #[test]
    fn ram_regions_5g_skips_hole() {
        assert_eq!(
            ram_regions(5 * GIB),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (2 * GIB) as usize)
            ]
        );
    }

    #[test]
    fn memory_map_reserves_bios_area() {
        let map = memory_map(&[(0, 3 * GIB), (4 * GIB, 2 * GIB)]);
        assert_eq!(
            map,
            vec![
                MemoryMapEntry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                MemoryMapEntry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820_RESERVED
                },
                MemoryMapEntry {
                    addr: 0x100000,
                    size: 3 * GIB - 0x100000,
                    kind: E820_RAM
                },
                MemoryMapEntry {
                    addr: 4 * GIB,
                    size: 2 * GIB,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn memory_map_rejects_tiny_guest() {
        assert!(memory_map(&[(0, 512 << 10)]).is_empty());
        assert_eq!(memory_map(&[(0, 1 << 20)]).len(), 2);
    }
}
