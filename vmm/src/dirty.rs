//! Dirty-page tracking shared by several consumers (migration pre-copy,
//! sync points, seeding a secondary).
//!
//! Two sources are merged: KVM's dirty log (pages the guest wrote) and the
//! `AtomicBitmap` of guest memory (pages the VMM itself wrote through the
//! vm-memory API: virtio buffers, loaders, restores). Each consumer has its
//! own bitmap; [`DirtyTracker::collect`] reads and clears both sources once
//! and ORs the result into every consumer, so consumers never steal pages
//! from each other. KVM dirty logging is switched on while at least one
//! consumer is registered.
//!
//! The tracker is a cheap, cloneable handle: the vCPU thread (sync points)
//! and a migration thread can use it at the same time.

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::vstate::memory::{self, MemoryError};
use crate::{GuestMemory, PAGE_SIZE};

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("KVM_GET_DIRTY_LOG for slot {slot}: {source}")]
    /// KVM's dirty log of a memory slot could not be read.
    DirtyLog {
        /// The slot.
        slot: u32,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    #[error("switching dirty logging: {0}")]
    /// Dirty logging could not be switched on or off.
    Memory(#[from] MemoryError),
    #[error("unknown dirty-tracking consumer {0}")]
    /// A consumer that was never registered (or already dropped).
    UnknownConsumer(usize),
}

/// A registered consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerId(usize);

/// The shared tracker. One per VM; clones share the same state.
#[derive(Debug, Clone, Default)]
pub struct DirtyTracker {
    inner: Arc<Mutex<Tracker>>,
}

#[derive(Debug, Default)]
struct Tracker {
    /// (guest start, pages) per memory slot.
    regions: Vec<(u64, usize)>,
    /// One bitmap per consumer (`None` = free slot), one bit per page over
    /// all regions concatenated.
    consumers: Vec<Option<Vec<u64>>>,
}

impl Tracker {
    fn new(mem: &GuestMemory) -> Self {
        Tracker {
            regions: mem
                .iter()
                .map(|r| (r.start_addr().0, r.len() as usize / PAGE_SIZE))
                .collect(),
            consumers: Vec::new(),
        }
    }

    fn total_pages(&self) -> usize {
        self.regions.iter().map(|r| r.1).sum()
    }

    fn active(&self) -> bool {
        self.consumers.iter().any(Option::is_some)
    }

    /// Register a consumer. With `all_dirty` it starts with every page
    /// marked (a full first pass); otherwise clean from now on.
    fn register(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        all_dirty: bool,
    ) -> Result<ConsumerId, DirtyError> {
        if self.active() {
            // Bring existing consumers up to date before the new one starts.
            self.collect(vm, mem)?;
        } else {
            memory::register(vm, mem, true)?;
            // Clear what the VMM wrote before anyone was listening.
            for r in mem.iter() {
                vm_memory::MmapRegion::bitmap(r).reset();
            }
        }
        let words = self.total_pages().div_ceil(64);
        let mut bits = vec![if all_dirty { u64::MAX } else { 0 }; words];
        if all_dirty && !self.total_pages().is_multiple_of(64) {
            if let Some(last) = bits.last_mut() {
                *last = (1u64 << (self.total_pages() % 64)) - 1;
            }
        }
        let slot = self.consumers.iter().position(Option::is_none);
        let id = match slot {
            Some(i) => {
                self.consumers[i] = Some(bits);
                i
            }
            None => {
                self.consumers.push(Some(bits));
                self.consumers.len() - 1
            }
        };
        Ok(ConsumerId(id))
    }

    /// Remove a consumer; dirty logging stops with the last one.
    fn unregister(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        id: ConsumerId,
    ) -> Result<(), DirtyError> {
        match self.consumers.get_mut(id.0) {
            Some(c @ Some(_)) => *c = None,
            _ => return Err(DirtyError::UnknownConsumer(id.0)),
        }
        if !self.active() {
            memory::register(vm, mem, false)?;
        }
        Ok(())
    }

    /// Read and clear KVM's dirty log and the VMM's bitmap, and add the
    /// pages to every consumer.
    fn collect(&mut self, vm: &VmFd, mem: &GuestMemory) -> Result<(), DirtyError> {
        if !self.active() {
            return Ok(());
        }
        let mut base = 0usize;
        for (slot, region) in mem.iter().enumerate() {
            let pages = region.len() as usize / PAGE_SIZE;
            let kvm = vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|source| DirtyError::DirtyLog {
                    slot: slot as u32,
                    source,
                })?;
            let vmm = vm_memory::MmapRegion::bitmap(region).get_and_reset();
            for w in 0..pages.div_ceil(64) {
                let word = kvm.get(w).copied().unwrap_or(0) | vmm.get(w).copied().unwrap_or(0);
                if word == 0 {
                    continue;
                }
                for bits in self.consumers.iter_mut().flatten() {
                    or_bits(bits, base + w * 64, word);
                }
            }
            base += pages;
        }
        Ok(())
    }

    /// Collect, then hand consumer `id` its dirty pages (guest-physical
    /// addresses, ascending) and clear its set.
    fn take(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        id: ConsumerId,
    ) -> Result<Vec<u64>, DirtyError> {
        let out = self.peek(vm, mem, id)?;
        if let Some(bits) = self.consumers.get_mut(id.0).and_then(Option::as_mut) {
            bits.iter_mut().for_each(|w| *w = 0);
        }
        Ok(out)
    }

    /// Collect, then list consumer `id`'s dirty pages (guest-physical
    /// addresses, ascending), keeping its set.
    fn peek(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        id: ConsumerId,
    ) -> Result<Vec<u64>, DirtyError> {
        self.collect(vm, mem)?;
        let regions = self.regions.clone();
        let bits = self
            .consumers
            .get(id.0)
            .and_then(Option::as_ref)
            .ok_or(DirtyError::UnknownConsumer(id.0))?;
        let mut out = Vec::new();
        let mut base = 0usize;
        for (start, pages) in regions {
            for p in 0..pages {
                let i = base + p;
                if bits[i / 64] & (1 << (i % 64)) != 0 {
                    out.push(start + (p * PAGE_SIZE) as u64);
                }
            }
            base += pages;
        }
        Ok(out)
    }

    /// How many pages consumer `id` has pending (without collecting).
    fn pending(&self, id: ConsumerId) -> usize {
        self.consumers
            .get(id.0)
            .and_then(Option::as_ref)
            .map(|b| b.iter().map(|w| w.count_ones() as usize).sum())
            .unwrap_or(0)
    }
}

impl DirtyTracker {
    /// A tracker for the regions of `mem`.
    pub fn new(mem: &GuestMemory) -> Self {
        DirtyTracker {
            inner: Arc::new(Mutex::new(Tracker::new(mem))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tracker> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a consumer. With `all_dirty` it starts with every page
    /// marked (a full first pass); otherwise clean from now on.
    pub fn register(
        &self,
        vm: &VmFd,
        mem: &GuestMemory,
        all_dirty: bool,
    ) -> Result<ConsumerId, DirtyError> {
        self.lock().register(vm, mem, all_dirty)
    }

    /// Remove a consumer; dirty logging stops with the last one.
    pub fn unregister(
        &self,
        vm: &VmFd,
        mem: &GuestMemory,
        id: ConsumerId,
    ) -> Result<(), DirtyError> {
        self.lock().unregister(vm, mem, id)
    }

    /// Read and clear KVM's dirty log and the VMM's bitmap, and add the
    /// pages to every consumer.
    pub fn collect(&self, vm: &VmFd, mem: &GuestMemory) -> Result<(), DirtyError> {
        self.lock().collect(vm, mem)
    }

    /// Collect, then hand consumer `id` its dirty pages (guest-physical
    /// addresses, ascending) and clear its set.
    pub fn take(
        &self,
        vm: &VmFd,
        mem: &GuestMemory,
        id: ConsumerId,
    ) -> Result<Vec<u64>, DirtyError> {
        self.lock().take(vm, mem, id)
    }

    /// Collect, then list consumer `id`'s dirty pages without clearing
    /// them (a replayer comparing its state before a sync point decides
    /// what to roll back).
    pub fn peek(
        &self,
        vm: &VmFd,
        mem: &GuestMemory,
        id: ConsumerId,
    ) -> Result<Vec<u64>, DirtyError> {
        self.lock().peek(vm, mem, id)
    }

    /// How many pages consumer `id` has pending (without collecting).
    pub fn pending(&self, id: ConsumerId) -> usize {
        self.lock().pending(id)
    }
}

/// OR a 64-page word of a region (starting at page index `start`, which is
/// not necessarily word-aligned in the concatenated map) into `bits`.
fn or_bits(bits: &mut [u64], start: usize, word: u64) {
    let (i, shift) = (start / 64, start % 64);
    if shift == 0 {
        if let Some(b) = bits.get_mut(i) {
            *b |= word;
        }
        return;
    }
    if let Some(b) = bits.get_mut(i) {
        *b |= word << shift;
    }
    if let Some(b) = bits.get_mut(i + 1) {
        *b |= word >> (64 - shift);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn or_bits_handles_unaligned_region_starts() {
        let mut bits = vec![0u64; 3];
        or_bits(&mut bits, 0, 1);
        or_bits(&mut bits, 70, 0b11);
        or_bits(&mut bits, 120, u64::MAX);
        assert_eq!(bits[0], 1);
        assert_eq!(bits[1], (0b11 << 6) | (u64::MAX << 56));
        assert_eq!(bits[2], u64::MAX >> 8);
    }
}
