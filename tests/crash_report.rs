//! A guest that dies gets a clear report. Each test boots a minimal PVH ELF
//! built here as bytes: one PT_LOAD at 1 MiB whose 32-bit entry code is
//! the instruction under test, and the Xen `XEN_ELFNOTE_PHYS32_ENTRY` note.
//! The loader leaves no IDT, so any exception becomes a triple fault.

mod common;

use common::{arg, tandem, Output, TempDir};

const LOAD_ADDR: u64 = 0x10_0000;
const ENTRY: u32 = 0x10_0040;
const CODE_OFF: usize = 0x1000;

/// A PVH ELF whose entry (32-bit protected mode, paging off) runs `code`;
/// the rest of the 256-byte segment is HLT.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let note_off = 0x800usize;
    let mut b = vec![0u8; CODE_OFF + 0x100];
    let put = |b: &mut Vec<u8>, off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
    // ELF header.
    put(&mut b, 0, b"\x7fELF");
    b[4] = 2; // ELFCLASS64
    b[5] = 1; // little endian
    b[6] = 1; // EV_CURRENT
    put(&mut b, 0x10, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut b, 0x12, &0x3eu16.to_le_bytes()); // EM_X86_64
    put(&mut b, 0x14, &1u32.to_le_bytes());
    put(&mut b, 0x18, &LOAD_ADDR.to_le_bytes()); // e_entry (64-bit; unused by PVH)
    put(&mut b, 0x20, &64u64.to_le_bytes()); // e_phoff
    put(&mut b, 0x34, &64u16.to_le_bytes()); // e_ehsize
    put(&mut b, 0x36, &56u16.to_le_bytes()); // e_phentsize
    put(&mut b, 0x38, &2u16.to_le_bytes()); // e_phnum
                                            // PT_LOAD: file 0x1000.. -> 1 MiB, R+X.
    let ph = 64;
    put(&mut b, ph, &1u32.to_le_bytes());
    put(&mut b, ph + 4, &5u32.to_le_bytes());
    put(&mut b, ph + 8, &(CODE_OFF as u64).to_le_bytes());
    put(&mut b, ph + 16, &LOAD_ADDR.to_le_bytes());
    put(&mut b, ph + 24, &LOAD_ADDR.to_le_bytes());
    put(&mut b, ph + 32, &0x100u64.to_le_bytes()); // filesz
    put(&mut b, ph + 40, &0x1000u64.to_le_bytes()); // memsz
    put(&mut b, ph + 48, &0x1000u64.to_le_bytes()); // align
                                                    // PT_NOTE with one note: "Xen", type 18, desc = 32-bit entry.
    let ph = 64 + 56;
    put(&mut b, ph, &4u32.to_le_bytes());
    put(&mut b, ph + 4, &4u32.to_le_bytes());
    put(&mut b, ph + 8, &(note_off as u64).to_le_bytes());
    put(&mut b, ph + 32, &20u64.to_le_bytes());
    put(&mut b, ph + 48, &4u64.to_le_bytes());
    put(&mut b, note_off, &4u32.to_le_bytes()); // namesz
    put(&mut b, note_off + 4, &4u32.to_le_bytes()); // descsz
    put(&mut b, note_off + 8, &18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    put(&mut b, note_off + 12, b"Xen\0");
    put(&mut b, note_off + 16, &ENTRY.to_le_bytes());
    // Code: HLT everywhere, the test's bytes at the entry.
    b[CODE_OFF..].fill(0xf4);
    let entry = CODE_OFF + (ENTRY as u64 - LOAD_ADDR) as usize;
    put(&mut b, entry, code);
    b
}

fn boot(name: &str, code: &[u8]) -> Output {
    let dir = TempDir::new("crash");
    let k = dir.write(name, &pvh_elf(code));
    tandem(&["run", "--kernel", arg(&k)])
}

/// The register part of the report.
#[track_caller]
fn has_registers(out: &Output) {
    for n in [
        "RIP 0x",
        "RAX 0x",
        "RSP 0x",
        "RFLAGS 0x",
        "CR0 0x",
        "CR4 0x",
    ] {
        assert!(
            out.stderr.contains(n),
            "report lacks {n:?}\n{}",
            out.describe()
        );
    }
}

#[test]
fn ud2_without_idt_is_a_triple_fault_with_a_report() {
    let out = boot("ud2.elf", &[0x0f, 0x0b]);
    out.assert_status(126);
    assert!(out.stderr.contains("triple-fault"), "{}", out.describe());
    assert!(
        out.stderr.contains(&format!("RIP {:#018x}", ENTRY)),
        "RIP is not the ud2\n{}",
        out.describe()
    );
    assert!(
        out.stderr
            .contains(&format!("instruction bytes at {ENTRY:#x}: 0f 0b f4")),
        "{}",
        out.describe()
    );
    has_registers(&out);
    assert!(out.stdout.is_empty(), "{}", out.describe());
}

#[test]
fn register_values_are_reported() {
    // mov eax, 0x12345678; mov edx, 0xcafe0000; ud2
    let code = [
        0xb8, 0x78, 0x56, 0x34, 0x12, 0xba, 0x00, 0x00, 0xfe, 0xca, 0x0f, 0x0b,
    ];
    let out = boot("regs.elf", &code);
    out.assert_status(126);
    assert!(
        out.stderr.contains("RAX 0x0000000012345678"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("RDX 0x00000000cafe0000"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains(&format!("RIP {:#018x}", ENTRY + 10)),
        "{}",
        out.describe()
    );
    assert!(out.stderr.contains(": 0f 0b f4"), "{}", out.describe());
}

#[test]
fn hlt_with_interrupts_off_is_halted() {
    // cli; hlt
    let out = boot("hlt.elf", &[0xfa, 0xf4]);
    out.assert_status(124);
    assert!(out.stderr.contains("halted"), "{}", out.describe());
}

#[test]
fn guest_exit_port_from_a_foreign_kernel() {
    // mov al, 0x2a; out 0xf4, al  -> status 42 (isa-debug-exit style port).
    let out = boot("exit.elf", &[0xb0, 0x2a, 0xe6, 0xf4]);
    out.assert_status(42);
    assert!(out.stderr.is_empty(), "{}", out.describe());
}

/// `pxor xmm0, xmm0` after enabling SSE (CR4.OSFXSR/OSXMMEXCPT set,
/// CR0.EM clear, CR0.MP set), then `cli; hlt`. Where guest code is
/// emulated (the PVM development machines) KVM's emulator rejects the SSE
/// instruction: KVM_EXIT_INTERNAL_ERROR, reported with status 126. On a
/// VT-x/AMD-V host the instruction runs natively and the guest halts (124);
/// anything else is a failure.
#[test]
fn sse_instruction_the_emulator_rejects() {
    let code = [
        0x0f, 0x20, 0xe0, // mov eax, cr4
        0x0d, 0x00, 0x06, 0x00, 0x00, // or eax, 0x600
        0x0f, 0x22, 0xe0, // mov cr4, eax
        0x0f, 0x20, 0xc0, // mov eax, cr0
        0x25, 0xfb, 0xff, 0xff, 0xff, // and eax, ~CR0.EM
        0x83, 0xc8, 0x02, // or eax, CR0.MP
        0x0f, 0x22, 0xc0, // mov cr0, eax
        0x66, 0x0f, 0xef, 0xc0, // pxor xmm0, xmm0
        0xfa, 0xf4, // cli; hlt
    ];
    let pxor_at = ENTRY + 25;
    let out = boot("sse.elf", &code);
    match out.status {
        126 => {
            assert!(
                out.stderr.contains("could not emulate"),
                "{}",
                out.describe()
            );
            assert!(
                out.stderr.contains("KVM_EXIT_INTERNAL_ERROR"),
                "{}",
                out.describe()
            );
            assert!(
                out.stderr.contains(&format!("RIP {pxor_at:#018x}")),
                "{}",
                out.describe()
            );
            assert!(
                out.stderr.contains(&format!(
                    "instruction bytes at {pxor_at:#x}: 66 0f ef c0 fa f4"
                )),
                "{}",
                out.describe()
            );
            has_registers(&out);
        }
        124 => eprintln!("note: this host executed pxor natively (no emulation failure)"),
        _ => panic!("unexpected outcome\n{}", out.describe()),
    }
}
