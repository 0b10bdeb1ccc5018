//! Initial vCPU state for the boot protocols: boot GDT, identity page
//! tables, general-purpose/segment/control registers and FPU.
//!
//! * PVH: 32-bit protected mode, paging off. GDT: null, flat 4 GiB 32-bit
//!   code (selector 0x08), flat data (0x10), TSS (0x18). CR0 = PE|ET,
//!   EBX = `hvm_start_info`, EIP = the note's entry, EFLAGS = 2.
//! * Linux64: long mode. GDT: null, 64-bit code (0x08), data (0x10), TSS
//!   (0x18). Identity mapping of the first 1 GiB with 2 MiB pages
//!   (PML4 -> PDPT -> PD), CR0 = PE|ET|PG, CR4 = PAE, EFER = LME|LMA,
//!   RSI = `boot_params`, RIP = 64-bit entry, RSP = RBP = `BOOT_STACK`.
//!
//! Both: FPU control word 0x37f, MXCSR 0x1f80; interrupts disabled.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK, PDE_START, PDPTE_START, PML4_START,
};
use super::{BootEntry, BootProtocol, LoaderError};
use crate::GuestMemory;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selectors of the boot GDT.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data selector (DS, ES, FS, GS, SS).
pub const DATA_SELECTOR: u16 = 0x10;
/// TSS selector.
pub const TSS_SELECTOR: u16 = 0x18;

/// Builds a GDT descriptor from its access/flags word (bits 0-7 = access
/// byte, bits 12-15 = G, D/B, L, AVL), base and limit (20 bits).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The `kvm_segment` KVM wants for descriptor `entry` loaded with `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24);
    let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The boot GDT for `protocol`.
pub fn boot_gdt(protocol: BootProtocol) -> [u64; 4] {
    match protocol {
        BootProtocol::Pvh => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code, 4 GiB
            gdt_entry(0xc093, 0, 0xfffff), // data, 4 GiB
            gdt_entry(0x008b, 0, 0x67),    // TSS (busy)
        ],
        BootProtocol::Linux64 => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS (busy)
        ],
    }
}

fn mem_err(entry: &BootEntry, what: &'static str, e: vm_memory::GuestMemoryError) -> LoaderError {
    LoaderError::Vcpu {
        protocol: entry.protocol,
        entry: entry.entry,
        what,
        source: kvm_ioctls::Error::new(match e {
            vm_memory::GuestMemoryError::IOError(io) => io.raw_os_error().unwrap_or(libc::EFAULT),
            _ => libc::EFAULT,
        }),
    }
}

/// Writes the identity page tables for the first 1 GiB (2 MiB pages).
fn write_page_tables(mem: &GuestMemory, entry: &BootEntry) -> Result<(), LoaderError> {
    let e = |err| mem_err(entry, "writing the boot page tables", err);
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
        .map_err(e)?;
    mem.write_obj(PDE_START | 0x3, GuestAddress(PDPTE_START))
        .map_err(e)?;
    let mut pd = [0u8; 4096];
    for (i, slot) in pd.chunks_exact_mut(8).enumerate() {
        // Present, writable, 2 MiB page.
        slot.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_START)).map_err(e)
}

pub(super) fn configure_vcpu(
    vcpu: &VcpuFd,
    entry: &BootEntry,
    mem: &GuestMemory,
) -> Result<(), LoaderError> {
    let kvm_err = |what: &'static str| {
        move |source| LoaderError::Vcpu {
            protocol: entry.protocol,
            entry: entry.entry,
            what,
            source,
        }
    };

    // GDT and (empty) IDT in guest memory.
    let gdt = boot_gdt(entry.protocol);
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| mem_err(entry, "writing the boot GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| mem_err(entry, "writing the boot IDT", e))?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let code = segment_from_gdt(gdt[1], CODE_SELECTOR);
    let data = segment_from_gdt(gdt[2], DATA_SELECTOR);
    let tss = segment_from_gdt(gdt[3], TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    // LDT stays as reset (unusable).

    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.entry,
        ..Default::default()
    };

    match entry.protocol {
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = entry.boot_info;
        }
        BootProtocol::Linux64 => {
            write_page_tables(mem, entry)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = entry.boot_info;
        }
    }

    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::guest;
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let c = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 8);
        assert_eq!(
            (c.l, c.db, c.g, c.present, c.s, c.type_),
            (1, 0, 1, 1, 1, 0xb)
        );
        assert_eq!(c.limit, 0xffff_ffff);
        assert_eq!(c.base, 0);
        let c32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 8);
        assert_eq!((c32.l, c32.db), (0, 1));
        let t = segment_from_gdt(gdt_entry(0x008b, 0x1234_5678, 0x67), 0x18);
        assert_eq!(
            (t.base, t.limit, t.g, t.type_, t.s),
            (0x1234_5678, 0x67, 0, 0xb, 0)
        );
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    /// A vCPU to configure. These tests need /dev/kvm (as every machine
    /// and CI here has); without it they fail rather than pass silently.
    fn kvm_vcpu() -> Option<(kvm_ioctls::VmFd, VcpuFd)> {
        let kvm =
            kvm_ioctls::Kvm::new().unwrap_or_else(|e| panic!("this test needs /dev/kvm: {e}"));
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        Some((vm, vcpu))
    }

    #[test]
    fn configure_linux64_sets_long_mode() {
        let Some((_vm, vcpu)) = kvm_vcpu() else {
            return;
        };
        let mem = guest(64 << 20);
        let entry = BootEntry {
            protocol: BootProtocol::Linux64,
            entry: 0x10_0200,
            boot_info: super::super::layout::ZERO_PAGE_START,
        };
        configure_vcpu(&vcpu, &entry, &mem).unwrap();
        let s = vcpu.get_sregs().unwrap();
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!((s.cs.l, s.cs.selector), (1, CODE_SELECTOR));
        assert_eq!(s.ds.selector, DATA_SELECTOR);
        assert_eq!(s.gdt.base, BOOT_GDT_START);
        let r = vcpu.get_regs().unwrap();
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x10_0200, 0x7000, BOOT_STACK, 2)
        );
        let f = vcpu.get_fpu().unwrap();
        assert_eq!(f.fcw, 0x37f);
        let x = vcpu.get_xsave().unwrap();
        // MXCSR is at byte 24 of the XSAVE area (KVM_GET_FPU does not
        // report it on every host).
        assert_eq!(x.region[6], 0x1f80);
        // Page tables: 2 MiB page 3 maps 6 MiB.
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 3 * 8)).unwrap();
        assert_eq!(pde, (3 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
    }

    #[test]
    fn configure_pvh_sets_protected_mode() {
        let Some((_vm, vcpu)) = kvm_vcpu() else {
            return;
        };
        let mem = guest(64 << 20);
        let entry = BootEntry {
            protocol: BootProtocol::Pvh,
            entry: 0x100_0040,
            boot_info: super::super::layout::PVH_INFO_START,
        };
        configure_vcpu(&vcpu, &entry, &mem).unwrap();
        let s = vcpu.get_sregs().unwrap();
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!(s.efer & EFER_LMA, 0);
        assert_eq!((s.cs.db, s.cs.l, s.cs.limit), (1, 0, 0xffff_ffff));
        assert_eq!(s.tr.selector, TSS_SELECTOR);
        let r = vcpu.get_regs().unwrap();
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0040, 0x6000, 2));
        let d: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(d, gdt_entry(0xc09b, 0, 0xfffff));
    }
}
