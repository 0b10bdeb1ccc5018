//! Replayer: reach the instruction a kick stopped the recorder at, and
//! verify the whole state there before adopting the kick's sync point.
//!
//! A kick (and an interrupt-window exit, handled as one) stops the
//! recorder's vCPU at an arbitrary instruction after exit `S`; the sync
//! point it captured there is logged at `S` without a digest. At `S` the
//! replayer runs the guest with a hardware breakpoint on the sync point's
//! linear RIP (`KVM_SET_GUEST_DEBUG`, `KVM_GUESTDBG_USE_HW_BP`, DR0 and
//! DR7's L0 bit). At every hit it compares the registers with the sync
//! point's; where all are equal it compares the rest: the vCPU state as
//! digests compare it, the device state, and every page either side wrote
//! since the last sync point. The first hit where everything is equal is
//! the kick's instruction. To go on past a hit that is not, it single-steps
//! one instruction with the breakpoint off (`KVM_GUESTDBG_SINGLESTEP`; the
//! emulator of PVM-based KVM ignores RFLAGS.RF for userspace breakpoints)
//! and keeps single-stepping while RIP stays at the breakpoint (a `rep`
//! instruction interrupted mid-way).
//!
//! An exit the guest makes before the kick's instruction is reached, or a
//! failsafe of [`SEEK_LIMIT`] of host time, means the replay left the
//! recorder's path: a divergence. That exit is not handled (the log does
//! not cover it): its exit number is not counted, its device access not
//! done, and the sync point then overwrites whatever the guest did.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_guest_debug, kvm_regs, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuExit;
use recordlog::{Hasher, SyncPoint};

use crate::devices::DevicesState;
use crate::machine::Machine;
use crate::sync::{decode_states, devices_digest, vcpu_digest, SyncError};
use crate::vstate::memory;
use crate::vstate::vcpu::{VcpuError, VcpuState};
use crate::PAGE_SIZE;

/// Host time a replayer looks for a kick's instruction before it calls the
/// replay diverged (a diverged guest that never exits would hold it
/// forever). Generous: the recorder ran at least the kick grace there, and
/// breakpoint hits in a tight loop slow the replayer down.
pub const SEEK_LIMIT: Duration = Duration::from_secs(30);

/// EFER.LMA: long mode active (CS base ignored).
const EFER_LMA: u64 = 1 << 10;

/// What looking for a kick's instruction found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KickCheck {
    /// The replayer is at the kick's instruction with the recorder's state.
    Reached,
    /// It is not: what it found instead.
    Missed {
        /// The kick's RIP.
        rip: u64,
        /// What the replayer found.
        found: String,
    },
    /// This host's KVM refused `KVM_SET_GUEST_DEBUG`: the sync point can
    /// only be adopted, as before this check existed.
    Unsupported(String),
    /// Not reached within [`Machine::kick_seek_hits`] breakpoint hits (a
    /// kick in a tight loop): adopted unverified. The replayer ran on only
    /// along the recorder's path, short of the kick's instruction, so the
    /// sync point's comparison of the pages it wrote still holds.
    OverBudget,
}

fn regs_of(fd: &kvm_ioctls::VcpuFd) -> Result<kvm_regs, VcpuError> {
    fd.get_regs().map_err(|source| VcpuError::State {
        what: "KVM_GET_REGS",
        source,
    })
}

fn set_debug(fd: &kvm_ioctls::VcpuFd, dbg: &kvm_guest_debug) -> Result<(), VcpuError> {
    fd.set_guest_debug(dbg).map_err(|source| VcpuError::State {
        what: "KVM_SET_GUEST_DEBUG",
        source,
    })
}

/// The registers that differ between `a` and `b`, named.
fn differing_regs(a: &kvm_regs, b: &kvm_regs) -> Vec<&'static str> {
    let pairs = [
        ("RIP", a.rip, b.rip),
        ("RFLAGS", a.rflags, b.rflags),
        ("RAX", a.rax, b.rax),
        ("RBX", a.rbx, b.rbx),
        ("RCX", a.rcx, b.rcx),
        ("RDX", a.rdx, b.rdx),
        ("RSI", a.rsi, b.rsi),
        ("RDI", a.rdi, b.rdi),
        ("RSP", a.rsp, b.rsp),
        ("RBP", a.rbp, b.rbp),
        ("R8", a.r8, b.r8),
        ("R9", a.r9, b.r9),
        ("R10", a.r10, b.r10),
        ("R11", a.r11, b.r11),
        ("R12", a.r12, b.r12),
        ("R13", a.r13, b.r13),
        ("R14", a.r14, b.r14),
        ("R15", a.r15, b.r15),
    ];
    pairs
        .iter()
        .filter(|(_, x, y)| x != y)
        .map(|(n, _, _)| *n)
        .collect()
}

/// The recorder's state at the kick, decoded once.
struct Target {
    vcpu: VcpuState,
    devices: recordlog::Digest,
    vcpu_digest: recordlog::Digest,
    /// The pages the recorder wrote since the last sync point, in full.
    pages: HashMap<u64, Vec<u8>>,
}

impl Machine {
    /// At the exit of a kick's sync point `sp`: run to the instruction the
    /// recorder was kicked at and compare the whole state there. The guest
    /// debug state is off again when this returns.
    pub fn seek_kick(&mut self, sp: &SyncPoint) -> Result<KickCheck, SyncError> {
        let target = self.kick_target(sp)?;
        self.vcpu.complete_pending_io()?;
        let found = self.seek(&target);
        let off = set_debug(&self.vcpu.fd, &kvm_guest_debug::default());
        let found = found?;
        off?;
        Ok(found)
    }

    fn kick_target(&self, sp: &SyncPoint) -> Result<Target, SyncError> {
        let (vcpu, devices) = decode_states(sp)?;
        let cp = &self.sync.as_ref().ok_or(SyncError::NotEnabled)?.checkpoint;
        let mut pages = HashMap::with_capacity(sp.pages.len());
        for (gpa, data) in &sp.pages {
            let mut page = vec![0u8; PAGE_SIZE];
            recordlog::page::decode_delta(data, cp.page(*gpa), &mut page)
                .map_err(|source| SyncError::PageCode { gpa: *gpa, source })?;
            pages.insert(*gpa, page);
        }
        Ok(Target {
            devices: hash_devices(&devices)?,
            vcpu_digest: hash_vcpu(&vcpu)?,
            vcpu,
            pages,
        })
    }

    fn seek(&mut self, target: &Target) -> Result<KickCheck, SyncError> {
        let want = &target.vcpu.regs;
        let mut first_miss: Option<String> = None;
        // Kicked before it ran an instruction (or its state is here again).
        if regs_of(&self.vcpu.fd)? == *want {
            match self.state_difference(target)? {
                None => return Ok(KickCheck::Reached),
                Some(d) => first_miss = Some(d),
            }
        }
        let sregs = &target.vcpu.sregs;
        let base = if sregs.efer & EFER_LMA != 0 {
            0
        } else {
            sregs.cs.base
        };
        let linear = want.rip.wrapping_add(base);
        let mut breakpoint = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
            ..Default::default()
        };
        breakpoint.arch.debugreg[0] = linear;
        // L0: DR0 enabled, execute, length 1 (R/W0 = LEN0 = 0).
        breakpoint.arch.debugreg[7] = 1;
        let step = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
            ..Default::default()
        };
        if let Err(e) = set_debug(&self.vcpu.fd, &breakpoint) {
            return Ok(KickCheck::Unsupported(e.to_string()));
        }
        let mut stepping = false;
        let mut hits = 0u32;
        self.vcpu.request_interrupt_window(false);
        let kicker = self.vcpu.kicker().clone();
        kicker.bind_current_thread();
        let deadline = Instant::now() + SEEK_LIMIT;
        kicker.arm(deadline);
        let rip = want.rip;
        let missed = |what: String, first: &Option<String>| KickCheck::Missed {
            rip,
            found: match first {
                Some(f) => format!("{f}; then {what}"),
                None => what,
            },
        };
        let result = loop {
            self.vcpu.forget_readiness_override();
            let exit = match self.vcpu.fd.run() {
                Ok(VcpuExit::Debug(_)) => None,
                Ok(VcpuExit::IrqWindowOpen) => {
                    self.vcpu.request_interrupt_window(false);
                    continue;
                }
                Ok(other) => Some(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if Instant::now() >= deadline {
                        break missed(
                            format!("not reached within {} s", SEEK_LIMIT.as_secs()),
                            &first_miss,
                        );
                    }
                    continue;
                }
                Err(source) => {
                    break Err(VcpuError::State {
                        what: "KVM_RUN",
                        source,
                    })?
                }
            };
            let regs = regs_of(&self.vcpu.fd)?;
            if let Some(exit) = exit {
                break missed(
                    format!(
                        "the guest exited ({exit}, RIP {:#x}) before reaching it",
                        regs.rip
                    ),
                    &first_miss,
                );
            }
            hits += 1;
            if self.kick_seek_hits.is_some_and(|max| hits > max) {
                break KickCheck::OverBudget;
            }
            if regs == *want {
                match self.state_difference(target)? {
                    None => break KickCheck::Reached,
                    Some(d) if first_miss.is_none() => first_miss = Some(d),
                    Some(_) => {}
                }
            }
            // On past this instruction with the breakpoint off; stay
            // stepping while RIP is the breakpoint's (a `rep` prefix).
            let stay = regs.rip == want.rip;
            if stepping && !stay {
                set_debug(&self.vcpu.fd, &breakpoint)?;
                stepping = false;
            } else if !stepping {
                set_debug(&self.vcpu.fd, &step)?;
                stepping = true;
            }
        };
        kicker.disarm();
        Ok(result)
    }

    /// With registers equal: what differs from the recorder's state at the
    /// kick (vCPU, devices, the pages either side wrote since the last
    /// sync point), or `None`.
    fn state_difference(&mut self, target: &Target) -> Result<Option<String>, SyncError> {
        let own = self.vcpu.save()?;
        if hash_vcpu(&own)? != target.vcpu_digest {
            let regs = differing_regs(&own.regs, &target.vcpu.regs);
            return Ok(Some(if regs.is_empty() {
                "at the kick's RIP with equal registers, other vCPU state differs".into()
            } else {
                format!("at the kick's RIP, {} differ", regs.join(", "))
            }));
        }
        if hash_devices(&self.devices.save())? != target.devices {
            return Ok(Some(
                "at the kick's instruction, the device state differs".into(),
            ));
        }
        let sync = self.sync.as_ref().ok_or(SyncError::NotEnabled)?;
        let own_dirty = self
            .dirty
            .peek(&self.vm.fd, &self.vm.memory, sync.consumer)?;
        let mut cur = vec![0u8; PAGE_SIZE];
        let mut differ = 0usize;
        let mut check = |gpa: u64, theirs: &[u8]| -> Result<(), SyncError> {
            memory::read_page(&self.vm.memory, gpa, &mut cur)?;
            if cur != theirs {
                differ += 1;
            }
            Ok(())
        };
        for (gpa, page) in &target.pages {
            check(*gpa, page)?;
        }
        for gpa in own_dirty.iter().filter(|g| !target.pages.contains_key(g)) {
            check(*gpa, sync.checkpoint.page(*gpa))?;
        }
        Ok((differ > 0).then(|| {
            format!("at the kick's instruction with equal registers, {differ} pages differ")
        }))
    }
}

fn hash_vcpu(s: &VcpuState) -> Result<recordlog::Digest, SyncError> {
    let mut h = Hasher::new();
    vcpu_digest(&mut h, s)?;
    Ok(h.finalize())
}

fn hash_devices(d: &DevicesState) -> Result<recordlog::Digest, SyncError> {
    let mut h = Hasher::new();
    devices_digest(&mut h, d)?;
    Ok(h.finalize())
}
