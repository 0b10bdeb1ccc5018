//! The KVM VM: the /dev/kvm handle, the VM fd and guest memory.

use kvm_ioctls::{Kvm, VmFd};

use super::memory::{self, MemoryError};
use crate::GuestMemory;

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm-intel or kvm-amd, or enable nested virtualisation)")]
    /// /dev/kvm does not exist.
    NoKvm,
    #[error("no permission to open /dev/kvm: run as root or add the user to the 'kvm' group")]
    /// /dev/kvm cannot be opened by this user.
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    /// /dev/kvm cannot be opened.
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    /// An unsupported KVM API version.
    ApiVersion(i32),
    #[error("KVM_CREATE_VM failed: {0}")]
    /// KVM_CREATE_VM failed.
    Create(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    /// KVM_SET_TSS_ADDR failed.
    Tss(kvm_ioctls::Error),
    #[error(transparent)]
    /// Guest memory could not be allocated or registered.
    Memory(#[from] MemoryError),
}

/// Address of the 3-page TSS region KVM needs on Intel hosts (just below
/// the 4 GiB boundary, inside the MMIO hole, as other VMMs place it).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// One KVM VM with its memory.
pub struct Vm {
    /// /dev/kvm.
    pub kvm: Kvm,
    /// The VM.
    pub fd: VmFd,
    /// Guest RAM.
    pub memory: GuestMemory,
}

/// Open /dev/kvm with a clear error for the usual failures.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::KvmOpen(e),
    })?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    Ok(kvm)
}

impl Vm {
    /// Create a VM whose RAM covers `ranges`, registered with KVM (dirty
    /// logging off until a consumer asks for it).
    pub fn new(ranges: &[(vm_memory::GuestAddress, usize)]) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(VmError::Tss)?;
        let memory = memory::create(ranges)?;
        memory::register(&fd, &memory, false)?;
        Ok(Vm { kvm, fd, memory })
    }
}
