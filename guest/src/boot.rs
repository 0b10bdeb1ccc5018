//! PVH entry (32-bit protected mode) → long mode, the Xen ELF note, the boot
//! GDT and the boot page tables.
//!
//! The loader enters `pvh_start32` in 32-bit protected mode with paging off,
//! flat segments and EBX = physical address of `struct hvm_start_info`.
//! We zero .bss, identity-map the first 4 GiB with 2 MiB pages (so that the
//! virtio-mmio window at 0xd000_0000 is reachable), enable PAE, EFER.LME and
//! paging, load a 64-bit GDT, jump to 64-bit code, set up the boot stack and
//! call `kmain(start_info_paddr)`.

use core::arch::global_asm;

/// Size of the boot (kernel) stack.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    /* ---- Xen PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18) ---- */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz */
    .long 8                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32       /* 32-bit entry, zero-extended like Linux */
    .balign 4

    /* ---- GDT: null, code64 (0x08), data (0x10), TSS (0x18, 16 bytes) ---- */
    .section .data.boot_gdt, "aw"
    .balign 16
    .global boot_gdt
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0
    .quad 0
boot_gdt_end:
    .balign 8
    .global boot_gdt_ptr
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    /* ---- page tables and boot stack (zeroed at entry) ---- */
    .section .bss.boot_pt, "aw", @nobits
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
    .balign 16
boot_stack_bottom:
    .skip {stack_size}
    .global boot_stack_top
boot_stack_top:

    /* ---- 32-bit entry ---- */
    .section .boot32, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi                 /* keep start_info in esi */

    /* zero .bss (also covers the page tables and the stack) */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    /* PML4[0] -> PDPT */
    movl $boot_pdpt, %eax
    orl $3, %eax
    movl %eax, boot_pml4

    /* PDPT[0..4] -> the four page directories */
    movl $boot_pd, %eax
    orl $3, %eax
    movl %eax, boot_pdpt
    addl $4096, %eax
    movl %eax, boot_pdpt + 8
    addl $4096, %eax
    movl %eax, boot_pdpt + 16
    addl $4096, %eax
    movl %eax, boot_pdpt + 24

    /* 2048 x 2 MiB pages: identity map of 0..4 GiB (present, writable, PS) */
    movl $boot_pd, %edi
    movl $0x83, %eax
    movl $2048, %ecx
1:
    movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    decl %ecx
    jnz 1b

    /* PAE */
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4

    movl $boot_pml4, %eax
    movl %eax, %cr3

    /* EFER.LME */
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr

    /* PG | PE (and WP) */
    movl %cr0, %eax
    orl $0x80010001, %eax
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_entry

    .code64
    .section .text.boot64, "ax"
long_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl %esi, %edi                 /* kmain(start_info_paddr) */
    call kmain
2:
    cli
    hlt
    jmp 2b

    .text
"#,
    stack_size = const BOOT_STACK_SIZE,
    options(att_syntax)
);

/// The layout of `struct hvm_start_info` (Xen public/arch-x86/hvm/start_info.h), version ≥ 1.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HvmStartInfo {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
    pub reserved: u32,
}

/// `struct hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HvmMemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

pub const HVM_START_MAGIC: u32 = 0x336e_c578;
pub const E820_RAM: u32 = 1;
