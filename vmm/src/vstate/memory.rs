//! Guest memory: creation from the layout, registration with KVM, and the
//! page-level image used by snapshots and state transfer.

use std::io::{Read, Write};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::{GuestMemory, PAGE_SIZE};

/// Errors of guest memory handling.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    /// Guest RAM could not be allocated.
    Allocate {
        /// How much.
        mib: u64,
        /// Why.
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM refused memory slot {slot}: {source}")]
    /// KVM refused a memory slot.
    Register {
        /// The slot.
        slot: u32,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    #[error("guest memory access at {addr:#x}: {source}")]
    /// Guest memory could not be read or written.
    Access {
        /// The guest address.
        addr: u64,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    #[error("memory image: {0}")]
    /// Reading or writing a memory image failed.
    Io(#[from] std::io::Error),
    #[error("memory image does not match this VM: {0}")]
    /// A memory image of another VM (regions differ).
    Mismatch(String),
    #[error("{len} bytes at guest address {gpa:#x} lie outside guest memory")]
    /// A range outside guest memory.
    OutOfRange {
        /// Its guest address.
        gpa: u64,
        /// Its length.
        len: usize,
    },
}

/// Allocate guest RAM for `ranges` (see `loader::layout::ram_regions`).
pub fn create(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemory, MemoryError> {
    let total: usize = ranges.iter().map(|r| r.1).sum();
    GuestMemory::from_ranges(ranges).map_err(|source| MemoryError::Allocate {
        mib: (total >> 20) as u64,
        source,
    })
}

/// Register (or re-register, to switch dirty logging) every region with KVM.
/// Slot numbers are the region indices.
pub fn register(vm: &VmFd, mem: &GuestMemory, dirty_log: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|source| MemoryError::Access {
                addr: region.start_addr().0,
                source,
            })?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range belongs to `mem`, which the caller keeps
        // alive (it is owned by the same `Vm`) for as long as the VM exists.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::Register {
            slot: slot as u32,
            source,
        })?;
    }
    Ok(())
}

/// The regions of `mem` as `(start, size)` pairs.
pub fn layout(mem: &GuestMemory) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

fn is_zero(page: &[u8]) -> bool {
    // 16-byte words let the compiler vectorise; early exit per chunk of 256.
    page.chunks(256).all(|chunk| {
        chunk
            .chunks(16)
            .map(|w| {
                let mut b = [0u8; 16];
                b[..w.len()].copy_from_slice(w);
                u128::from_ne_bytes(b)
            })
            .fold(0, |acc, w| acc | w)
            == 0
    })
}

/// Does the page at `gpa` hold only zeroes?
pub fn page_is_zero(page: &[u8]) -> bool {
    is_zero(page)
}

/// Write the memory image: the region layout, then for every non-zero page
/// its guest-physical page number and contents, ended by `u64::MAX`.
pub fn write_image<W: Write>(mem: &GuestMemory, w: &mut W) -> Result<u64, MemoryError> {
    let regions = layout(mem);
    w.write_all(&(regions.len() as u32).to_le_bytes())?;
    for (start, len) in &regions {
        w.write_all(&start.to_le_bytes())?;
        w.write_all(&len.to_le_bytes())?;
    }
    let mut written = 0u64;
    for_each_nonzero_page(mem, |gpa, page| {
        w.write_all(&(gpa / PAGE_SIZE as u64).to_le_bytes())?;
        w.write_all(page)?;
        written += 1;
        Ok(())
    })?;
    w.write_all(&u64::MAX.to_le_bytes())?;
    Ok(written)
}

/// Call `f` with every page of guest RAM that is not all zeroes, in
/// ascending guest-physical order. Pages the guest never touched are not
/// even read (see [`possibly_nonzero`]), so this costs what the guest uses,
/// not what it was given.
pub fn for_each_nonzero_page(
    mem: &GuestMemory,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), MemoryError>,
) -> Result<(), MemoryError> {
    let all: Vec<u64> = layout(mem)
        .into_iter()
        .flat_map(|(start, len)| (0..len).step_by(PAGE_SIZE).map(move |off| start + off))
        .collect();
    let mut page = vec![0u8; PAGE_SIZE];
    for gpa in possibly_nonzero(mem, &all) {
        read_page(mem, gpa, &mut page)?;
        if !is_zero(&page) {
            f(gpa, &page)?;
        }
    }
    Ok(())
}

/// Read a memory image written by [`write_image`] into `mem`, whose layout
/// must be the same and which must be freshly allocated (all zero): pages
/// absent from the image are left as they are.
pub fn read_image<R: Read>(mem: &GuestMemory, r: &mut R) -> Result<u64, MemoryError> {
    let mut b4 = [0u8; 4];
    let mut b8 = [0u8; 8];
    r.read_exact(&mut b4)?;
    let n = u32::from_le_bytes(b4) as usize;
    if n > 64 {
        return Err(MemoryError::Mismatch(format!("{n} memory regions")));
    }
    let mut regions = Vec::with_capacity(n);
    for _ in 0..n {
        r.read_exact(&mut b8)?;
        let start = u64::from_le_bytes(b8);
        r.read_exact(&mut b8)?;
        regions.push((start, u64::from_le_bytes(b8)));
    }
    if regions != layout(mem) {
        return Err(MemoryError::Mismatch(format!(
            "image regions {:x?}, VM regions {:x?}",
            regions,
            layout(mem)
        )));
    }
    let mut page = vec![0u8; PAGE_SIZE];
    let mut count = 0;
    loop {
        r.read_exact(&mut b8)?;
        let pfn = u64::from_le_bytes(b8);
        if pfn == u64::MAX {
            return Ok(count);
        }
        r.read_exact(&mut page)?;
        let gpa = pfn
            .checked_mul(PAGE_SIZE as u64)
            .ok_or(MemoryError::OutOfRange {
                gpa: u64::MAX,
                len: PAGE_SIZE,
            })?;
        write_page(mem, gpa, &page)?;
        count += 1;
    }
}

/// Is `[gpa, gpa + len)` (non-empty) inside guest memory? Checked
/// arithmetic: a range that would wrap past `u64::MAX` is outside.
pub fn range_in_memory(mem: &GuestMemory, gpa: u64, len: u64) -> bool {
    mem.iter()
        .any(|r| range_in_region(r.start_addr().0, r.len(), gpa, len))
}

/// [`range_in_memory`] for a layout of `(start, size)` regions (as
/// [`layout`] returns and peers send).
pub fn range_in_layout(regions: &[(u64, u64)], gpa: u64, len: u64) -> bool {
    regions
        .iter()
        .any(|&(start, size)| range_in_region(start, size, gpa, len))
}

fn range_in_region(start: u64, size: u64, gpa: u64, len: u64) -> bool {
    let Some(last) = len.checked_sub(1).and_then(|l| gpa.checked_add(l)) else {
        return false;
    };
    let Some(region_last) = size.checked_sub(1).and_then(|l| start.checked_add(l)) else {
        return false;
    };
    gpa >= start && last <= region_last
}

fn check_range(mem: &GuestMemory, gpa: u64, len: usize) -> Result<(), MemoryError> {
    if range_in_memory(mem, gpa, len as u64) {
        Ok(())
    } else {
        Err(MemoryError::OutOfRange { gpa, len })
    }
}

/// Read one page.
pub fn read_page(mem: &GuestMemory, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
    check_range(mem, gpa, buf.len())?;
    mem.read_slice(buf, GuestAddress(gpa))
        .map_err(|source| MemoryError::Access { addr: gpa, source })
}

/// Write one page (marks it dirty in the VMM bitmap).
pub fn write_page(mem: &GuestMemory, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
    check_range(mem, gpa, data.len())?;
    mem.write_slice(data, GuestAddress(gpa))
        .map_err(|source| MemoryError::Access { addr: gpa, source })
}

/// Of `gpas`, the pages that may hold data: those the host has ever backed
/// (resident or swapped out, per `/proc/self/pagemap`). A page of guest RAM
/// that was never touched is still the zero page of the anonymous mapping,
/// so a first full pass (migration round 0) can skip it without reading
/// it. When pagemap cannot be read, every page is returned.
pub fn possibly_nonzero(mem: &GuestMemory, gpas: &[u64]) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
        return gpas.to_vec();
    };
    // One pagemap read per region: host page frame entries, 8 bytes each.
    let mut maps: Vec<(u64, u64, Vec<u64>)> = Vec::new();
    for r in mem.iter() {
        let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else {
            return gpas.to_vec();
        };
        let pages = r.len() as usize / PAGE_SIZE;
        let mut raw = vec![0u8; pages * 8];
        let offset = (host as u64 / PAGE_SIZE as u64) * 8;
        if pagemap.read_exact_at(&mut raw, offset).is_err() {
            return gpas.to_vec();
        }
        let entries = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8])))
            .collect();
        maps.push((r.start_addr().0, r.len(), entries));
    }
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    gpas.iter()
        .copied()
        .filter(|&gpa| {
            maps.iter()
                .find(|(start, len, _)| (*start..start + len).contains(&gpa))
                .and_then(|(start, _, e)| e.get(((gpa - start) as usize) / PAGE_SIZE))
                .is_none_or(|&entry| entry & (PRESENT | SWAPPED) != 0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_near_the_top_of_the_address_space_are_outside() {
        let mem = create(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(range_in_memory(&mem, 0, 1 << 20));
        assert!(range_in_memory(&mem, (1 << 20) - 4096, 4096));
        assert!(!range_in_memory(&mem, (1 << 20) - 4095, 4096));
        assert!(!range_in_memory(&mem, 0, 0));
        assert!(!range_in_memory(&mem, u64::MAX, 1));
        assert!(!range_in_memory(&mem, u64::MAX - 4094, 4096));
        assert!(!range_in_memory(&mem, 4096, u64::MAX));
        let page = [0u8; PAGE_SIZE];
        assert!(matches!(
            write_page(&mem, !0xfff, &page),
            Err(MemoryError::OutOfRange { .. })
        ));
        let mut buf = [0u8; PAGE_SIZE];
        assert!(read_page(&mem, u64::MAX - 10, &mut buf).is_err());
    }

    #[test]
    fn untouched_pages_are_skipped_and_written_ones_kept() {
        let mem = create(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let all: Vec<u64> = (0..(64u64 << 20)).step_by(PAGE_SIZE).collect();
        write_page(&mem, 0x5000, &[1u8; PAGE_SIZE]).unwrap();
        write_page(&mem, 0x300_0000, &[2u8; PAGE_SIZE]).unwrap();
        let kept = possibly_nonzero(&mem, &all);
        assert!(
            kept.contains(&0x5000) && kept.contains(&0x300_0000),
            "{kept:x?}"
        );
        // Nearly all of a fresh 64 MiB mapping is untouched.
        assert!(
            kept.len() < all.len() / 4,
            "{} of {} kept",
            kept.len(),
            all.len()
        );
    }
}
