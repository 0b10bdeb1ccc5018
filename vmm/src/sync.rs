//! Sync points and state digests (DESIGN.md rules 4 and 5).
//!
//! A sync point is the full vCPU and device state plus every guest page
//! dirtied since the previous sync point. The recorder captures one when
//! it had to kick the vCPU (the guest did not exit by itself) and
//! periodically; the replayer applies it instead of executing.
//!
//! Both sides keep a [`Checkpoint`]: a copy of guest memory as of the last
//! sync point (the initial memory before the first), maintained
//! incrementally (only the pages of each sync point are copied). A sync
//! point's pages are encoded against it (`recordlog::page::encode_delta`:
//! the XOR with the previous version, then the page codec), so a page the
//! guest changed in a few words costs a few bytes; the replayer decodes
//! against its own checkpoint, which holds the same versions because it
//! applies every sync point in order. With it, too, a diverged replayer can
//! roll memory back to the last sync point and adopt the next one exactly:
//! the next sync point carries every page the primary wrote in between,
//! and the pages only the replayer wrote get their checkpoint contents
//! back.

use std::collections::{HashMap, HashSet};

use recordlog::{Digest, Hasher, SyncPoint};

use crate::devices::DevicesState;
use crate::dirty::{ConsumerId, DirtyError};
use crate::machine::Machine;
use crate::persist::{decode_state, encode_state, StateError};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{VcpuError, VcpuState};
use crate::{GuestMemory, PAGE_SIZE};

/// Errors capturing or applying a sync point.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    /// vCPU state could not be read or set.
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    /// Dirty pages could not be collected.
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    /// Guest memory could not be read or written.
    Memory(#[from] MemoryError),
    #[error("devices: {0}")]
    /// Device state could not be applied.
    Devices(#[from] crate::devices::DevicesError),
    #[error(transparent)]
    /// Saved state could not be encoded or decoded.
    State(#[from] StateError),
    #[error("sync point page at {gpa:#x} does not decode: {source}")]
    /// A page of a sync point does not decode to exactly one page.
    PageCode {
        /// Its guest address.
        gpa: u64,
        /// Why.
        source: recordlog::page::PageError,
    },
    #[error("sync point page at {gpa:#x} is not page-aligned")]
    /// A page of a sync point is not page-aligned.
    PageAlign {
        /// Its guest address.
        gpa: u64,
    },
    #[error("sync point page at {gpa:#x} lies outside guest memory")]
    /// A page of a sync point lies outside guest memory.
    PageOutside {
        /// Its guest address.
        gpa: u64,
    },
    #[error("sync points are not enabled on this machine")]
    /// [`crate::machine::Machine::enable_sync_points`] was not called.
    NotEnabled,
}

/// Checks a sync point that came from outside (a log, a stream) before
/// anything of it is applied: both states decode, every page is exactly one
/// aligned page inside guest memory (checked arithmetic: an address near
/// `u64::MAX` does not wrap).
#[derive(Debug, Clone)]
pub struct SyncPointCheck {
    regions: Vec<(u64, u64)>,
}

impl SyncPointCheck {
    /// A check against the memory layout of `mem`.
    pub fn new(mem: &GuestMemory) -> Self {
        SyncPointCheck {
            regions: memory::layout(mem),
        }
    }

    /// A check against explicit `(start, size)` regions (tests, tools).
    pub fn from_regions(regions: Vec<(u64, u64)>) -> Self {
        SyncPointCheck { regions }
    }

    /// Is `[gpa, gpa + len)` inside one region?
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        memory::range_in_layout(&self.regions, gpa, len)
    }

    /// Decode and check `sp`.
    pub fn check(&self, sp: &SyncPoint) -> Result<(VcpuState, DevicesState), SyncError> {
        let (vcpu, devices) = decode_states(sp)?;
        let mut scratch = vec![0u8; PAGE_SIZE];
        for (gpa, data) in &sp.pages {
            let gpa = *gpa;
            recordlog::page::check_delta(data, &mut scratch)
                .map_err(|source| SyncError::PageCode { gpa, source })?;
            if !gpa.is_multiple_of(PAGE_SIZE as u64) {
                return Err(SyncError::PageAlign { gpa });
            }
            if !self.contains(gpa, PAGE_SIZE as u64) {
                return Err(SyncError::PageOutside { gpa });
            }
        }
        Ok((vcpu, devices))
    }
}

pub(crate) fn decode_states(sp: &SyncPoint) -> Result<(VcpuState, DevicesState), SyncError> {
    let vcpu: VcpuState = decode_state("sync point's vCPU state", &sp.vcpu_state)?;
    let devices: DevicesState = decode_state("sync point's device state", &sp.device_state)?;
    Ok((vcpu, devices))
}

/// MSRs whose value depends on host time, left out of digests.
fn msr_in_digest(index: u32) -> bool {
    // IA32_TSC, IA32_TSC_ADJUST, IA32_TSC_AUX is deterministic but keep the
    // clock-like pair out.
    !matches!(index, 0x10 | 0x3b)
}

/// Hash the postcard form of `v`; a value that cannot be encoded is an
/// error, never hashed as if it were empty.
fn hash_pod<T: serde::Serialize>(
    h: &mut Hasher,
    what: &'static str,
    v: &T,
) -> Result<(), StateError> {
    let bytes = postcard::to_stdvec(v).map_err(|source| StateError::Encode { what, source })?;
    h.update_field(&bytes);
    Ok(())
}

/// The XSAVE area as the guest can observe it. KVM sometimes reports a
/// component that is in its initial state with its XSTATE_BV bit set and
/// sometimes clear (seen on the x87/SSE bits of a freshly booted vCPU:
/// about one boot in a hundred), and the software-reserved bytes 464..512
/// of the legacy area belong to the host kernel. Both are normalised: a
/// component whose contents are its initial values counts as not in use.
fn canonical_xsave(xsave: &[u32]) -> Vec<u32> {
    // Word offsets in the legacy region (4-byte words).
    const SW_RESERVED: std::ops::Range<usize> = 116..128;
    const XSTATE_BV: usize = 128;
    const X87_HEADER: std::ops::Range<usize> = 0..6; // FCW..FDP
    const X87_REGS: std::ops::Range<usize> = 8..40; // ST0-ST7
    const XMM_REGS: std::ops::Range<usize> = 40..104; // XMM0-XMM15
    let mut x = xsave.to_vec();
    if x.len() <= XSTATE_BV {
        return x;
    }
    x[SW_RESERVED].fill(0);
    // A component whose bit is clear is in its initial state, whatever the
    // area holds.
    if x[XSTATE_BV] & 1 == 0 {
        x[X87_HEADER].fill(0);
        x[0] = 0x037f;
        x[X87_REGS].fill(0);
    }
    if x[XSTATE_BV] & 2 == 0 {
        x[XMM_REGS].fill(0);
    }
    let zero = |r: std::ops::Range<usize>, x: &[u32]| x[r].iter().all(|&w| w == 0);
    // x87 initial state: FCW 0x037f, everything else zero.
    let x87_init =
        x[0] == 0x037f && x[X87_HEADER][1..].iter().all(|&w| w == 0) && zero(X87_REGS, &x);
    if x87_init {
        x[XSTATE_BV] &= !1;
    }
    if zero(XMM_REGS, &x) {
        x[XSTATE_BV] &= !2;
    }
    x
}

/// Digest of the vCPU state, without host-time-dependent parts.
pub fn vcpu_digest(h: &mut Hasher, s: &VcpuState) -> Result<(), StateError> {
    hash_pod(h, "vCPU registers", &s.regs)?;
    hash_pod(h, "vCPU special registers", &s.sregs)?;
    hash_pod(h, "vCPU XSAVE area", &canonical_xsave(&s.xsave))?;
    hash_pod(h, "vCPU XCRs", &s.xcrs)?;
    for m in s.msrs.iter().filter(|m| msr_in_digest(m.index)) {
        h.update_u64(m.index as u64).update_u64(m.data);
    }
    hash_pod(h, "vCPU debug registers", &s.debug_regs)?;
    hash_pod(h, "vCPU MP state", &s.mp_state)
}

/// Digest of guest memory: the region layout, then every non-zero page
/// with its address.
pub fn memory_digest(h: &mut Hasher, mem: &GuestMemory) -> Result<(), MemoryError> {
    for (start, len) in memory::layout(mem) {
        h.update_u64(start).update_u64(len);
    }
    memory::for_each_nonzero_page(mem, |gpa, page| {
        h.update_u64(gpa).update(page);
        Ok(())
    })
}

/// The full state digest: memory + vCPU + devices.
pub fn state_digest(
    mem: &GuestMemory,
    vcpu: &VcpuState,
    devices: &DevicesState,
) -> Result<Digest, SyncError> {
    let mut h = Hasher::new();
    memory_digest(&mut h, mem)?;
    vcpu_digest(&mut h, vcpu)?;
    devices_digest(&mut h, devices)?;
    Ok(h.finalize())
}

/// Digest of the device state, without host resources: each side replays
/// its own copy of the disk, wherever it lives (DESIGN.md rule 7).
pub fn devices_digest(h: &mut Hasher, devices: &DevicesState) -> Result<(), StateError> {
    let mut devices = devices.clone();
    if let Some(b) = devices.block.as_mut() {
        b.path = Default::default();
    }
    hash_pod(h, "device state", &devices)
}

#[cfg(test)]
mod tests {
    use super::canonical_xsave;

    #[test]
    fn init_components_hash_alike_whatever_xstate_bv_says() {
        let mut a = vec![0u32; 1024];
        a[0] = 0x037f;
        a[6] = 0x1f80;
        a[116] = 0x600e7;
        let mut b = a.clone();
        b[116] = 0;
        b[128] = 0x3;
        assert_eq!(canonical_xsave(&a), canonical_xsave(&b));
        // A live XMM register keeps its bit.
        let mut c = b.clone();
        c[40] = 1;
        assert_ne!(canonical_xsave(&c), canonical_xsave(&a));
        assert_eq!(canonical_xsave(&c)[128], 0x2);
    }
}

/// The replayer's copy of memory as of the last applied sync point. Only
/// non-zero pages are held; a page it does not hold was all zeroes.
pub struct Checkpoint {
    pages: HashMap<u64, Vec<u8>>,
}

const ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

impl Checkpoint {
    fn new(mem: &GuestMemory) -> Result<Self, MemoryError> {
        let mut pages = HashMap::new();
        memory::for_each_nonzero_page(mem, |gpa, page| {
            pages.insert(gpa, page.to_vec());
            Ok(())
        })?;
        Ok(Checkpoint { pages })
    }

    /// The page at `gpa` as of the checkpoint.
    pub(crate) fn page(&self, gpa: u64) -> &[u8] {
        self.pages.get(&gpa).map_or(&ZERO_PAGE[..], Vec::as_slice)
    }

    fn set(&mut self, gpa: u64, data: &[u8]) {
        if memory::page_is_zero(data) {
            self.pages.remove(&gpa);
        } else {
            self.pages.insert(gpa, data.to_vec());
        }
    }
}

/// What applying a sync point found different on the replayer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The replayer's own state digest, when it differed from the one the
    /// sync point carries (compared at the same exit, before applying).
    pub digest_mismatch: Option<Digest>,
    /// Pages only the replayer had written, rolled back.
    pub rolled_back: usize,
}

impl Applied {
    /// Did the replayer differ from the primary?
    pub fn diverged(&self) -> bool {
        self.digest_mismatch.is_some() || self.rolled_back > 0
    }
}

/// Sync-point machinery attached to a machine.
pub struct SyncState {
    pub(crate) consumer: ConsumerId,
    /// Memory as of the last sync point: what its pages are encoded
    /// against, and where a replayer rolls back to.
    pub(crate) checkpoint: Checkpoint,
}

impl Machine {
    /// Start tracking pages for sync points, and keep the memory checkpoint
    /// the pages are encoded against (a copy of the non-zero guest pages;
    /// the recorder and the replayer must enable at the same state).
    /// `_replayer`: this machine applies sync points rather than capturing
    /// them (both keep the same checkpoint).
    pub fn enable_sync_points(&mut self, _replayer: bool) -> Result<(), SyncError> {
        let consumer = self.dirty.register(&self.vm.fd, &self.vm.memory, false)?;
        let checkpoint = Checkpoint::new(&self.vm.memory)?;
        self.sync = Some(SyncState {
            consumer,
            checkpoint,
        });
        Ok(())
    }

    /// The full state digest at the current exit (completes pending I/O).
    pub fn digest(&mut self) -> Result<Digest, SyncError> {
        self.vcpu.complete_pending_io()?;
        let vcpu = self.vcpu.save()?;
        let devices = self.devices.save();
        state_digest(&self.vm.memory, &vcpu, &devices)
    }

    /// Capture a sync point: vCPU, devices and the pages dirtied since the
    /// previous one; with `with_digest`, the full state digest too.
    pub fn capture_sync_point(&mut self, with_digest: bool) -> Result<SyncPoint, SyncError> {
        let consumer = self.sync.as_ref().ok_or(SyncError::NotEnabled)?.consumer;
        self.vcpu.complete_pending_io()?;
        let vcpu = self.vcpu.save()?;
        let devices = self.devices.save();
        let dirty = self.dirty.take(&self.vm.fd, &self.vm.memory, consumer)?;
        let cp = &mut self.sync.as_mut().ok_or(SyncError::NotEnabled)?.checkpoint;
        let mut pages = Vec::with_capacity(dirty.len());
        let (mut cur, mut xor) = (vec![0u8; PAGE_SIZE], Vec::with_capacity(PAGE_SIZE));
        for gpa in dirty {
            memory::read_page(&self.vm.memory, gpa, &mut cur)?;
            let mut enc = Vec::new();
            recordlog::page::encode_delta(&cur, cp.page(gpa), &mut xor, &mut enc);
            cp.set(gpa, &cur);
            pages.push((gpa, enc));
        }
        let digest = if with_digest {
            state_digest(&self.vm.memory, &vcpu, &devices)?
        } else {
            Digest::ZERO
        };
        Ok(SyncPoint {
            vcpu_state: encode_state("sync point's vCPU state", &vcpu)?,
            device_state: encode_state("sync point's device state", &devices)?,
            pages,
            digest,
        })
    }

    /// Replayer: apply `sp` (taken by the primary at `exit_seq`). Before
    /// applying, a sync point that carries a digest is compared with this
    /// machine's own state at the same exit. Pages this replayer wrote that
    /// the primary did not are rolled back to the checkpoint.
    ///
    /// Returns what differed (and was repaired by applying).
    pub fn apply_sync_point(
        &mut self,
        exit_seq: u64,
        sp: &SyncPoint,
    ) -> Result<Applied, SyncError> {
        // Nothing is applied unless all of it is valid.
        let (vcpu, devices) = SyncPointCheck::new(&self.vm.memory).check(sp)?;
        self.vcpu.complete_pending_io()?;
        let mut applied = Applied::default();
        if sp.digest != Digest::ZERO && self.exit_seq == exit_seq {
            let own = self.digest()?;
            if own != sp.digest {
                applied.digest_mismatch = Some(own);
            }
        }
        let consumer = self.sync.as_ref().ok_or(SyncError::NotEnabled)?.consumer;
        let own_dirty = self.dirty.take(&self.vm.fd, &self.vm.memory, consumer)?;
        let theirs: HashSet<u64> = sp.pages.iter().map(|(gpa, _)| *gpa).collect();
        let mem = self.vm.memory.clone();
        let cp = &mut self.sync.as_mut().ok_or(SyncError::NotEnabled)?.checkpoint;
        let mut cur = vec![0u8; PAGE_SIZE];
        let mut rolled_back = 0;
        for gpa in own_dirty.iter().filter(|g| !theirs.contains(g)) {
            memory::read_page(&mem, *gpa, &mut cur)?;
            if cur != cp.page(*gpa) {
                memory::write_page(&mem, *gpa, cp.page(*gpa))?;
                rolled_back += 1;
            }
        }
        applied.rolled_back = rolled_back;
        for (gpa, data) in &sp.pages {
            // Checked above: every page decodes.
            recordlog::page::decode_delta(data, cp.page(*gpa), &mut cur)
                .map_err(|source| SyncError::PageCode { gpa: *gpa, source })?;
            memory::write_page(&mem, *gpa, &cur)?;
            cp.set(*gpa, &cur);
        }
        self.vcpu.restore(&vcpu)?;
        self.vcpu.derive_readiness_from_state()?;
        self.devices.load_state(&devices, &mem)?;
        self.exit_seq = exit_seq;
        // What the apply itself wrote is not the guest's doing.
        self.dirty.take(&self.vm.fd, &self.vm.memory, consumer)?;
        Ok(applied)
    }

    /// Replayer after a divergence: put back every page written since the
    /// last applied sync point, so that the next sync point makes memory
    /// exact again.
    pub fn roll_back_to_checkpoint(&mut self) -> Result<(), SyncError> {
        let consumer = self.sync.as_ref().ok_or(SyncError::NotEnabled)?.consumer;
        let own_dirty = self.dirty.take(&self.vm.fd, &self.vm.memory, consumer)?;
        let mem = self.vm.memory.clone();
        let cp = &self.sync.as_ref().ok_or(SyncError::NotEnabled)?.checkpoint;
        for gpa in own_dirty {
            memory::write_page(&mem, gpa, cp.page(gpa))?;
        }
        self.dirty.take(&self.vm.fd, &self.vm.memory, consumer)?;
        Ok(())
    }
}
