//! KVM state: the VM, its vCPU, the CPUID model and guest memory.

pub mod cpuid;
pub mod memory;
pub mod vcpu;
pub mod vm;
