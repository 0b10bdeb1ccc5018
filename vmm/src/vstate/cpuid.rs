//! The fixed, migratable CPUID model.
//!
//! Built from `KVM_GET_SUPPORTED_CPUID`, then masked so that everything the
//! guest can observe is either replayable or trapped:
//!
//! | leaf / register / bit | masked | why |
//! |---|---|---|
//! | 0x1 ECX bit 3 (MONITOR/MWAIT) | cleared | MWAIT wake-ups depend on host timing |
//! | 0x1 ECX bit 13 (CMPXCHG16B) | cleared | PVM-based KVM cannot emulate `lock cmpxchg16b` (Linux's SLUB uses it when advertised); a fixed CPUID must run on such hosts too |
//! | 0x1 ECX bit 21 (x2APIC) | cleared | there is no in-kernel LAPIC |
//! | 0x1 ECX bit 24 (TSC-deadline) | cleared | needs a LAPIC; a host-timed interrupt source |
//! | 0x1 ECX bit 30 (RDRAND) | cleared | a nondeterministic value KVM cannot trap |
//! | 0x1 ECX bit 31 (hypervisor) | set | tells the guest it is virtualised; harmless |
//! | 0x1 EDX bit 9 (APIC) | cleared | no in-kernel LAPIC; guests use the 8259 PIC |
//! | 0x1 EBX bits 31..24 (initial APIC id) / 23..16 (logical count) | 0 / 1 | one vCPU |
//! | 0x6 (thermal and power) | zeroed | host power state, not migratable |
//! | 0x7.0 EBX bit 18 (RDSEED) | cleared | nondeterministic value |
//! | 0x7.0 ECX bit 5 (WAITPKG: UMWAIT/TPAUSE) | cleared | timed waits depend on host timing |
//! | 0xa (architectural PMU) | zeroed | performance counters are host-timed and not migratable |
//! | 0x4000_0000..=0x4000_00ff (KVM paravirt: kvmclock, steal time, PV EOI...) | removed | host-time sources and LAPIC-dependent features |
//! | 0x8000_0001 ECX bit 2 (SVM), 0x1 ECX bit 5 (VMX) | cleared | no nested virtualisation |
//! | 0x8000_0007 EDX bit 8 (invariant TSC) | cleared | the TSC is not a reliable clock across migration |
//!
//! The TSC itself (RDTSC) cannot be trapped from userspace: it is a known
//! divergence source, detected by fingerprints and repaired by sync points.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Errors of the CPUID model.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    /// KVM_GET_SUPPORTED_CPUID failed.
    Supported(kvm_ioctls::Error),
    #[error("building the CPUID table failed")]
    /// The table could not be built.
    Build,
}

const fn bit(n: u32) -> u32 {
    1 << n
}

/// The CPUID table Tandem gives every guest on this host.
pub fn build(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    let mut entries: Vec<_> = supported
        .as_slice()
        .iter()
        .filter(|e| !(0x4000_0000..=0x4000_00ff).contains(&e.function))
        .copied()
        .collect();
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (0x1, _) => {
                e.ecx &= !(bit(3) | bit(5) | bit(13) | bit(21) | bit(24) | bit(30));
                e.ecx |= bit(31);
                e.edx &= !bit(9);
                e.ebx = (e.ebx & 0x0000_ffff) | (1 << 16);
            }
            (0x6, _) | (0xa, _) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (0x7, 0) => {
                e.ebx &= !bit(18);
                e.ecx &= !bit(5);
            }
            (0x8000_0001, _) => e.ecx &= !bit(2),
            (0x8000_0007, _) => e.edx &= !bit(8),
            _ => {}
        }
    }
    CpuId::from_entries(&entries).map_err(|_| CpuidError::Build)
}
