//! KVM state: the VM, its vCPU, the CPU model and its CPUID table, guest
//! memory.

pub mod cpu_model;
pub mod cpuid;
pub mod memory;
pub mod vcpu;
pub mod vm;
