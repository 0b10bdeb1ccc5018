//! The embedded test guest must not execute SSE/MMX/AVX instructions or
//! `cmpxchg16b`: the PVM emulator on the development machines rejects them.
//! This disassembles every executable section of the embedded guest ELF
//! (`.boot32` as 32-bit code, the rest as 64-bit) and lists offenders. It
//! also checks the PVH boot contract: ELF64 x86-64, loaded at 1 MiB, with a
//! Xen `XEN_ELFNOTE_PHYS32_ENTRY` note pointing into executable code.

#[path = "../src/guest_image.rs"]
mod guest_image;

use guest_image::GUEST_ELF;
use iced_x86::{
    Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic, OpKind, Register,
};

const SHT_NOBITS: u32 = 8;
const SHF_EXECINSTR: u64 = 4;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

struct Section<'a> {
    name: String,
    flags: u64,
    addr: u64,
    data: &'a [u8],
}

fn sections(elf: &[u8]) -> Vec<Section<'_>> {
    let shoff = u64_at(elf, 0x28) as usize;
    let shentsize = u16_at(elf, 0x3a) as usize;
    let shnum = u16_at(elf, 0x3c) as usize;
    let shstrndx = u16_at(elf, 0x3e) as usize;
    assert!(shnum > 0, "guest ELF has no section headers");
    let hdr = |i: usize| &elf[shoff + i * shentsize..shoff + (i + 1) * shentsize];
    let strtab = hdr(shstrndx);
    let str_off = u64_at(strtab, 0x18) as usize;
    let str_size = u64_at(strtab, 0x20) as usize;
    let names = &elf[str_off..str_off + str_size];
    (0..shnum)
        .map(|i| {
            let h = hdr(i);
            let name_off = u32_at(h, 0) as usize;
            let end = names[name_off..].iter().position(|&c| c == 0).unwrap() + name_off;
            let kind = u32_at(h, 4);
            let offset = u64_at(h, 0x18) as usize;
            let size = u64_at(h, 0x20) as usize;
            Section {
                name: String::from_utf8_lossy(&names[name_off..end]).into_owned(),
                flags: u64_at(h, 8),
                addr: u64_at(h, 0x10),
                data: if kind == SHT_NOBITS {
                    &[]
                } else {
                    &elf[offset..offset + size]
                },
            }
        })
        .collect()
}

fn is_vector_reg(r: Register) -> bool {
    // XMM0..ZMM31 are contiguous in iced's Register enum.
    (Register::XMM0 <= r && r <= Register::ZMM31)
        || (Register::MM0 <= r && r <= Register::MM7)
        || (Register::K0 <= r && r <= Register::K7)
        || (Register::TMM0 <= r && r <= Register::TMM7)
}

/// Why `ins` is forbidden, if it is.
fn forbidden(ins: &Instruction) -> Option<&'static str> {
    match ins.mnemonic() {
        Mnemonic::Cmpxchg16b => return Some("cmpxchg16b"),
        Mnemonic::Fxsave
        | Mnemonic::Fxsave64
        | Mnemonic::Fxrstor
        | Mnemonic::Fxrstor64
        | Mnemonic::Ldmxcsr
        | Mnemonic::Stmxcsr
        | Mnemonic::Vldmxcsr
        | Mnemonic::Vstmxcsr
        | Mnemonic::Xsave
        | Mnemonic::Xsave64
        | Mnemonic::Xrstor
        | Mnemonic::Xrstor64
        | Mnemonic::Emms => return Some("SSE/x87 state instruction"),
        _ => {}
    }
    for i in 0..ins.op_count() {
        match ins.op_kind(i) {
            OpKind::Register if is_vector_reg(ins.op_register(i)) => {
                return Some("vector register operand")
            }
            OpKind::Memory if is_vector_reg(ins.memory_index()) => {
                return Some("vector index (VSIB)")
            }
            _ => {}
        }
    }
    None
}

#[test]
fn guest_is_pvh_elf64() {
    let elf = GUEST_ELF;
    assert!(elf.len() > 64, "guest image is empty");
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    assert_eq!(elf[5], 1, "not little endian");
    assert_eq!(u16_at(elf, 0x12), 62, "not x86-64");

    let phoff = u64_at(elf, 0x20) as usize;
    let phentsize = u16_at(elf, 0x36) as usize;
    let phnum = u16_at(elf, 0x38) as usize;
    let mut entry = None;
    let mut lowest_load = u64::MAX;
    for i in 0..phnum {
        let p = &elf[phoff + i * phentsize..phoff + (i + 1) * phentsize];
        let kind = u32_at(p, 0);
        let offset = u64_at(p, 8) as usize;
        let paddr = u64_at(p, 0x18);
        let filesz = u64_at(p, 0x20) as usize;
        if kind == PT_LOAD {
            lowest_load = lowest_load.min(paddr);
        }
        if kind != PT_NOTE {
            continue;
        }
        let mut notes = &elf[offset..offset + filesz];
        while notes.len() >= 12 {
            let namesz = u32_at(notes, 0) as usize;
            let descsz = u32_at(notes, 4) as usize;
            let ntype = u32_at(notes, 8);
            let name_end = 12 + namesz.next_multiple_of(4);
            let desc_end = name_end + descsz.next_multiple_of(4);
            if &notes[12..12 + namesz] == b"Xen\0" && ntype == 18 {
                assert!(descsz >= 4, "PHYS32_ENTRY desc too short");
                entry = Some(u32_at(notes, name_end) as u64);
            }
            notes = &notes[desc_end.min(notes.len())..];
        }
    }
    assert_eq!(lowest_load, 0x10_0000, "guest must load at 1 MiB");
    let entry = entry.expect("no XEN_ELFNOTE_PHYS32_ENTRY note in a PT_NOTE segment");
    let in_code = sections(elf).iter().any(|s| {
        s.flags & SHF_EXECINSTR != 0 && entry >= s.addr && entry < s.addr + s.data.len() as u64
    });
    assert!(
        in_code,
        "PVH entry {entry:#x} is not in an executable section"
    );
}

#[test]
fn guest_has_no_sse() {
    let mut offenders = Vec::new();
    let mut decoded = 0usize;
    let mut formatter = IntelFormatter::new();
    for s in sections(GUEST_ELF) {
        if s.flags & SHF_EXECINSTR == 0 || s.data.is_empty() {
            continue;
        }
        let bitness = if s.name == ".boot32" { 32 } else { 64 };
        let mut decoder = Decoder::with_ip(bitness, s.data, s.addr, DecoderOptions::NONE);
        let mut ins = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut ins);
            decoded += 1;
            if let Some(why) = forbidden(&ins) {
                let mut text = String::new();
                formatter.format(&ins, &mut text);
                offenders.push(format!("{}:{:#x}: {text}  ({why})", s.name, ins.ip()));
            }
        }
    }
    assert!(
        decoded > 100,
        "decoded only {decoded} instructions: no code found?"
    );
    assert!(
        offenders.is_empty(),
        "the test guest contains {} forbidden instruction(s):\n{}",
        offenders.len(),
        offenders.join("\n")
    );
}
