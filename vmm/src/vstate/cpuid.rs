//! The CPUID table given to the vCPU: a named CPU model
//! ([`super::cpu_model`]), checked against what this host's KVM supports.
//!
//! Nothing of the host's CPUID reaches the guest: the table is the model's,
//! leaf for leaf. `KVM_GET_SUPPORTED_CPUID` only decides whether the model
//! can run here (every feature bit it sets must be supported) and which
//! model is the default (`--cpu-model`). Leaves outside the table read as
//! KVM defines for a missing leaf (zeros, or for a GenuineIntel model above
//! the highest leaf, the highest basic leaf: here the empty leaf 0xd).
//!
//! The TSC itself (RDTSC) cannot be trapped from userspace: it is a known
//! divergence source, detected by fingerprints and repaired by sync points.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::Kvm;

use super::cpu_model::{CpuModel, CpuModelError, CpuidLeaf};

/// Errors of the CPUID table.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// /dev/kvm could not be opened.
    #[error("opening /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    /// KVM_GET_SUPPORTED_CPUID failed.
    Supported(kvm_ioctls::Error),
    /// The model cannot run here, or is not one of ours.
    #[error(transparent)]
    Model(#[from] CpuModelError),
    #[error("building the CPUID table failed")]
    /// The table could not be built.
    Build,
}

/// What this host's KVM can give a guest (`KVM_GET_SUPPORTED_CPUID`).
pub fn supported(kvm: &Kvm) -> Result<Vec<CpuidLeaf>, CpuidError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    Ok(supported
        .as_slice()
        .iter()
        .map(|e| CpuidLeaf {
            function: e.function,
            index: e.index,
            indexed: e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect())
}

/// The default CPU model of this host: the most capable one its KVM
/// provides.
pub fn host_default() -> Result<CpuModel, CpuidError> {
    let kvm = Kvm::new().map_err(CpuidError::Open)?;
    Ok(CpuModel::most_capable(&supported(&kvm)?)?)
}

/// Can this host run `model`? (What [`build`] checks, without a VM.)
pub fn check(model: &CpuModel) -> Result<(), CpuidError> {
    let kvm = Kvm::new().map_err(CpuidError::Open)?;
    Ok(model.check(&supported(&kvm)?)?)
}

/// The CPUID table of `model`, refused if this host cannot provide it or
/// it is not exactly this Tandem's model of that name.
pub fn build(kvm: &Kvm, model: &CpuModel) -> Result<CpuId, CpuidError> {
    model.check(&supported(kvm)?)?;
    let entries: Vec<kvm_cpuid_entry2> = model
        .leaves
        .iter()
        .map(|l| kvm_cpuid_entry2 {
            function: l.function,
            index: l.index,
            flags: if l.indexed {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: l.eax,
            ebx: l.ebx,
            ecx: l.ecx,
            edx: l.edx,
            ..Default::default()
        })
        .collect();
    CpuId::from_entries(&entries).map_err(|_| CpuidError::Build)
}
