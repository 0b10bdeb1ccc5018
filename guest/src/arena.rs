//! Large buffers outside the kernel image: a bump allocator over the RAM
//! from 8 MiB up (checked against the PVH memory map), so that the image's
//! .bss — zeroed instruction by instruction at boot on an emulated CPU —
//! stays small. Nothing is ever freed; the memory's initial content is
//! not relied upon.

use core::ptr::read_volatile;

use crate::boot::{HvmMemmapEntry, HvmStartInfo, E820_RAM};

pub const ARENA_BASE: u64 = 8 << 20;

pub struct Arena {
    next: u64,
    end: u64,
}

impl Arena {
    /// The RAM region that holds ARENA_BASE (empty if none does).
    pub fn new(info: &HvmStartInfo) -> Arena {
        let mut end = ARENA_BASE;
        let entries = (info.memmap_entries as usize).min(256);
        if info.memmap_paddr != 0 {
            for i in 0..entries {
                // SAFETY: the loader's memory map, identity mapped.
                let e: HvmMemmapEntry = unsafe {
                    read_volatile((info.memmap_paddr as usize as *const HvmMemmapEntry).add(i))
                };
                if e.kind == E820_RAM && e.addr <= ARENA_BASE && e.addr.saturating_add(e.size) > end
                {
                    end = e.addr.saturating_add(e.size).min(4 << 30);
                }
            }
        }
        Arena {
            next: ARENA_BASE,
            end,
        }
    }

    /// `len` bytes, 4 KiB aligned, or None when RAM runs out.
    pub fn alloc(&mut self, len: usize) -> Option<&'static mut [u8]> {
        let start = self.next;
        let stop = start.checked_add(len as u64)?;
        if stop > self.end {
            return None;
        }
        self.next = (stop + 4095) & !4095;
        // SAFETY: [start, stop) is RAM (memory map), above the kernel image
        // (linked at 1 MiB, far below 8 MiB), identity mapped, and handed
        // out once.
        Some(unsafe { core::slice::from_raw_parts_mut(start as usize as *mut u8, len) })
    }

    /// `n` copies of `init`, 16-byte aligned (failing like `take`).
    pub fn array<T: Copy>(&mut self, n: usize, init: T, what: &[u8]) -> &'static mut [T] {
        let bytes = self.take(n * core::mem::size_of::<T>() + 16, what);
        let p = bytes.as_mut_ptr();
        let p = p.wrapping_add(p.align_offset(core::mem::align_of::<T>().max(16))) as *mut T;
        for i in 0..n {
            // SAFETY: p..p+n lies inside `bytes` (16 bytes of slack for the
            // alignment), which is ours alone.
            unsafe { p.add(i).write(init) };
            if i % 256 == 255 {
                crate::io::progress(1024);
            }
        }
        // SAFETY: all n elements were just initialised.
        unsafe { core::slice::from_raw_parts_mut(p, n) }
    }

    /// Like `alloc`, failing the workload (status 3) when RAM runs out.
    pub fn take(&mut self, len: usize, what: &[u8]) -> &'static mut [u8] {
        match self.alloc(len) {
            Some(b) => b,
            None => {
                crate::io::puts(b"ERROR not enough RAM above 8 MiB for ");
                crate::io::putln(what);
                crate::io::exit(3)
            }
        }
    }
}
