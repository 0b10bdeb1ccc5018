//! PVH boot of an ELF kernel (Xen's `XEN_ELFNOTE_PHYS32_ENTRY` protocol, as
//! used by Linux with CONFIG_PVH and by the project's test guest).
//!
//! The ELF is loaded by `linux_loader::loader::elf::Elf` at the segments'
//! physical addresses; `hvm_start_info` (version 1) goes to
//! [`PVH_INFO_START`](super::layout::PVH_INFO_START) with the command line,
//! the memory map (same as the bzImage e820 map) and, if there is an
//! initrd, one module. The entry is the note's 32-bit physical address.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES,
    PVH_MEMMAP_START, PVH_MODLIST_START,
};
use super::{BootEntry, BootProtocol, BootSource, LoaderError};
use crate::GuestMemory;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

const PT_LOAD: u32 = 1;

/// A PT_LOAD segment: where it goes and how much of it is in the file.
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// `e_machine` of a 32-bit x86 ELF.
const EM_386: u16 = 3;

/// What a quick look at the program headers tells: the PT_LOAD segments and
/// whether a PT_NOTE holds the PVH entry note.
#[derive(Debug, Default)]
struct ElfSummary {
    segments: Vec<Segment>,
    /// The entry of the first `XEN_ELFNOTE_PHYS32_ENTRY` note.
    pvh_entry: Option<u64>,
    /// ELFCLASS32 (loaded here; linux-loader reads ELF64 only).
    class32: bool,
    /// `e_machine`.
    machine: u16,
}

const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 0x12;

/// Reads the program headers of a little-endian ELF file: for ELF64, only
/// to check up front that the kernel fits and is PVH-capable and to zero
/// its BSS (linux-loader does the loading and finds the entry); ELF32
/// (ELFCLASS32, the usual form of small PVH kernels) is loaded from this
/// summary. Returns `None` when the headers cannot be read: linux-loader
/// then reports what is wrong.
fn summarize(file: &mut File) -> Option<ElfSummary> {
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_exact(&mut ehdr).ok()?;
    if ehdr[5] != 1 {
        return None; // not ELFDATA2LSB
    }
    let class32 = match ehdr[4] {
        1 => true,
        2 => false,
        _ => return None,
    };
    // Field offsets of the two classes: (phoff, phentsize, phnum) in the
    // ELF header; (offset, paddr, filesz, memsz) in a program header.
    let (phoff, phentsize, phnum) = if class32 {
        (
            u64::from(u32_at(&ehdr, 0x1c)),
            u16_at(&ehdr, 0x2a) as usize,
            u16_at(&ehdr, 0x2c) as usize,
        )
    } else {
        (
            u64_at(&ehdr, 0x20),
            u16_at(&ehdr, 0x36) as usize,
            u16_at(&ehdr, 0x38) as usize,
        )
    };
    if phentsize != if class32 { 32 } else { 56 } {
        return None;
    }
    let field = |p: &[u8], o32: usize, o64: usize| {
        if class32 {
            u64::from(u32_at(p, o32))
        } else {
            u64_at(p, o64)
        }
    };
    let mut phdrs = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff)).ok()?;
    file.read_exact(&mut phdrs).ok()?;
    let mut summary = ElfSummary {
        class32,
        machine: u16_at(&ehdr, 0x12),
        ..Default::default()
    };
    for p in phdrs.chunks_exact(phentsize) {
        let (offset, filesz) = (field(p, 0x04, 0x08), field(p, 0x10, 0x20));
        match u32_at(p, 0) {
            PT_LOAD => summary.segments.push(Segment {
                offset,
                paddr: field(p, 0x0c, 0x18),
                filesz,
                memsz: field(p, 0x14, 0x28),
            }),
            PT_NOTE if filesz <= 1 << 20 => {
                let mut notes = vec![0u8; filesz as usize];
                file.seek(SeekFrom::Start(offset)).ok()?;
                file.read_exact(&mut notes).ok()?;
                // Notes: namesz, descsz, type, name (4-aligned), desc (4-aligned).
                let mut at = 0usize;
                while at + 12 <= notes.len() {
                    let namesz = u32_at(&notes, at) as usize;
                    let descsz = u32_at(&notes, at + 4) as usize;
                    let kind = u32_at(&notes, at + 8);
                    let name = notes.get(at + 12..at + 12 + namesz).unwrap_or(&[]);
                    let desc_at = at + 12 + namesz.next_multiple_of(4);
                    if kind == XEN_ELFNOTE_PHYS32_ENTRY
                        && name == b"Xen\0"
                        && descsz >= 4
                        && summary.pvh_entry.is_none()
                    {
                        summary.pvh_entry = notes
                            .get(desc_at..desc_at + 4)
                            .map(|d| u64::from(u32_at(d, 0)));
                    }
                    at += 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
                }
            }
            _ => {}
        }
    }
    Some(summary)
}

/// Loads a PVH ELF kernel (the caller has seen the ELF magic).
pub(crate) fn load(
    mem: &GuestMemory,
    file: &mut File,
    source: &BootSource,
) -> Result<BootEntry, LoaderError> {
    let path = source.kernel;
    let map = super::guest_memory_map(mem, path)?;

    let summary = summarize(file).unwrap_or_default();
    if summary.pvh_entry.is_none() && !summary.segments.is_empty() {
        return Err(LoaderError::NoPvhNote {
            path: path.to_owned(),
        });
    }
    // Every loadable segment must lie in guest RAM.
    let segments = summary.segments.clone();
    let seg_end = |s: &Segment| s.paddr.saturating_add(s.memsz.max(s.filesz));
    if segments
        .iter()
        .any(|s| !mem.check_range(GuestAddress(s.paddr), (seg_end(s) - s.paddr) as usize))
    {
        return Err(LoaderError::MemoryTooSmall {
            path: path.to_owned(),
            needed: segments.iter().map(seg_end).max().unwrap_or(0),
            mem_size: super::mem_size(mem),
        });
    }

    let (loaded_end, loaded_cap) = if summary.class32 {
        load_elf32(mem, file, &summary, path)?
    } else {
        let result = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            LoaderError::InvalidKernel {
                path: path.to_owned(),
                reason: e.to_string(),
            }
        })?;
        (result.kernel_end, result.pvh_boot_cap)
    };
    let entry = match (loaded_cap, summary.pvh_entry) {
        (PvhBootCapability::PvhEntryPresent(addr), _) => addr.raw_value(),
        // linux-loader 0.14 keeps the result of the *last* PT_NOTE segment
        // only; an ELF with the Xen note in an earlier one is still PVH.
        (_, Some(entry)) => entry,
        _ => {
            return Err(LoaderError::NoPvhNote {
                path: path.to_owned(),
            })
        }
    };
    if entry < HIMEM_START || !mem.address_in_range(GuestAddress(entry)) {
        return Err(LoaderError::InvalidKernel {
            path: path.to_owned(),
            reason: format!("PVH entry point {entry:#x} is outside the loaded kernel's RAM"),
        });
    }

    // linux-loader copies p_filesz bytes; clear the rest of each segment
    // (BSS) so that loading into reused memory gives the same result.
    for s in segments.iter().filter(|s| s.memsz > s.filesz) {
        let zeros = vec![0u8; (s.memsz - s.filesz) as usize];
        mem.write_slice(&zeros, GuestAddress(s.paddr + s.filesz))
            .map_err(|e| LoaderError::GuestMemory {
                path: path.to_owned(),
                what: "the kernel's BSS",
                reason: e.to_string(),
            })?;
    }

    let kernel_end = segments
        .iter()
        .map(seg_end)
        .max()
        .unwrap_or(0)
        .max(loaded_end);

    super::write_cmdline(mem, source, CMDLINE_MAX_SIZE - 1)?;

    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        ..Default::default()
    };

    let mut modules = Vec::new();
    if let Some(initrd) = source.initrd {
        let rd = super::load_initrd(mem, initrd, kernel_end, u64::MAX)?;
        modules.push(hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        });
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
    }

    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    assert!(memmap.len() <= PVH_MEMMAP_MAX_ENTRIES);
    start_info.memmap_entries = memmap.len() as u32;

    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem).map_err(|e| {
        LoaderError::GuestMemory {
            path: path.to_owned(),
            what: "hvm_start_info",
            reason: e.to_string(),
        }
    })?;

    Ok(BootEntry {
        protocol: BootProtocol::Pvh,
        entry,
        boot_info: PVH_INFO_START,
    })
}

/// Load the PT_LOAD segments of an ELF32 x86 kernel at their physical
/// addresses (what linux-loader does for ELF64). The segments were checked
/// to lie in guest RAM; the entry is the PVH note's. Returns the end of the
/// loaded image and the PVH capability (from the note).
fn load_elf32(
    mem: &GuestMemory,
    file: &mut File,
    summary: &ElfSummary,
    path: &Path,
) -> Result<(u64, PvhBootCapability), LoaderError> {
    let invalid = |reason: String| LoaderError::InvalidKernel {
        path: path.to_owned(),
        reason,
    };
    if summary.machine != EM_386 {
        return Err(invalid(format!(
            "32-bit ELF for machine {} (only EM_386 x86 kernels boot)",
            summary.machine
        )));
    }
    let Some(entry) = summary.pvh_entry else {
        return Err(LoaderError::NoPvhNote {
            path: path.to_owned(),
        });
    };
    let mut end = 0;
    for s in &summary.segments {
        if s.filesz > s.memsz {
            return Err(invalid(format!(
                "segment at {:#x} has more file bytes ({}) than memory ({})",
                s.paddr, s.filesz, s.memsz
            )));
        }
        if s.paddr < HIMEM_START {
            return Err(invalid(format!(
                "segment at {:#x} is below 1 MiB, where the boot structures live",
                s.paddr
            )));
        }
        let mut data = vec![0u8; s.filesz as usize];
        file.seek(SeekFrom::Start(s.offset))
            .and_then(|_| file.read_exact(&mut data))
            .map_err(|e| invalid(format!("reading the segment at {:#x}: {e}", s.paddr)))?;
        mem.write_slice(&data, GuestAddress(s.paddr))
            .map_err(|e| LoaderError::GuestMemory {
                path: path.to_owned(),
                what: "a kernel segment",
                reason: e.to_string(),
            })?;
        end = end.max(s.paddr + s.memsz);
    }
    Ok((end, PvhBootCapability::PvhEntryPresent(GuestAddress(entry))))
}

/// True if `path` looks like an ELF file (for callers that want to know
/// the protocol before loading).
pub fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"\x7fELF"
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::Path;

    use super::super::layout::{E820_RAM, E820_RESERVED, EBDA_START};
    use super::super::tests::{guest, TempFile};
    use super::*;

    /// [`super::super::load`] of `kernel` with `cmdline` and no initrd.
    pub(in crate::loader) fn load_kernel(
        mem: &GuestMemory,
        kernel: &Path,
        cmdline: &str,
    ) -> Result<BootEntry, LoaderError> {
        super::super::load(
            mem,
            &BootSource {
                kernel,
                cmdline,
                initrd: None,
            },
        )
    }
    use vm_memory::ByteValued;

    const LOAD_ADDR: u64 = 0x10_0000;
    const ENTRY: u32 = 0x10_0040;

    /// A minimal x86-64 ELF: one PT_LOAD of 0x100 bytes (code 0xf4 = HLT)
    /// at 1 MiB with a 0x1000-byte BSS, and, if `with_note`, a PT_NOTE
    /// holding "Xen" note 0x12 (XEN_ELFNOTE_PHYS32_ENTRY) = `ENTRY`.
    fn tiny_elf(with_note: bool) -> Vec<u8> {
        let phnum: u16 = if with_note { 2 } else { 1 };
        let code_off = 0x1000u64;
        let note_off = 0x800u64;
        let mut b = vec![0u8; 0x1100];
        // ELF header.
        b[0..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // little endian
        b[6] = 1; // EV_CURRENT
        b[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[0x12..0x14].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
        b[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        b[0x18..0x20].copy_from_slice(&(LOAD_ADDR).to_le_bytes()); // e_entry
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
        // PT_LOAD.
        let ph = 64;
        b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        b[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R X
        b[ph + 8..ph + 16].copy_from_slice(&code_off.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // vaddr
        b[ph + 24..ph + 32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // paddr
        b[ph + 32..ph + 40].copy_from_slice(&0x100u64.to_le_bytes()); // filesz
        b[ph + 40..ph + 48].copy_from_slice(&0x1100u64.to_le_bytes()); // memsz
        b[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        if with_note {
            // PT_NOTE.
            let ph = 64 + 56;
            b[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
            b[ph + 4..ph + 8].copy_from_slice(&4u32.to_le_bytes());
            b[ph + 8..ph + 16].copy_from_slice(&note_off.to_le_bytes());
            b[ph + 32..ph + 40].copy_from_slice(&(2 * 20u64).to_le_bytes()); // filesz
            b[ph + 48..ph + 56].copy_from_slice(&4u64.to_le_bytes());
            // A foreign note first (GNU, type 3, 4-byte desc), then Xen 0x12.
            let n = note_off as usize;
            b[n..n + 4].copy_from_slice(&4u32.to_le_bytes());
            b[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes());
            b[n + 8..n + 12].copy_from_slice(&3u32.to_le_bytes());
            b[n + 12..n + 16].copy_from_slice(b"GNU\0");
            let n = n + 20;
            b[n..n + 4].copy_from_slice(&4u32.to_le_bytes()); // namesz
            b[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes()); // descsz
            b[n + 8..n + 12].copy_from_slice(&0x12u32.to_le_bytes()); // type
            b[n + 12..n + 16].copy_from_slice(b"Xen\0");
            b[n + 16..n + 20].copy_from_slice(&ENTRY.to_le_bytes());
        }
        // Code: HLT.
        for x in &mut b[code_off as usize..code_off as usize + 0x100] {
            *x = 0xf4;
        }
        b
    }

    #[test]
    fn loads_pvh_elf_and_writes_start_info() {
        let mem = guest(64 << 20);
        // Dirty the BSS to check that it is cleared.
        mem.write_slice(&[0x55; 16], GuestAddress(LOAD_ADDR + 0x800))
            .unwrap();
        let k = TempFile::new("pvh.elf", &tiny_elf(true));
        let rd = TempFile::new("initrd", b"initrd contents");
        let entry = super::super::load(
            &mem,
            &BootSource {
                kernel: &k.0,
                cmdline: "console=ttyS0 panic=-1",
                initrd: Some(&rd.0),
            },
        )
        .unwrap();
        assert_eq!(
            entry,
            BootEntry {
                protocol: BootProtocol::Pvh,
                entry: ENTRY as u64,
                boot_info: PVH_INFO_START
            }
        );
        let code: u8 = mem.read_obj(GuestAddress(LOAD_ADDR)).unwrap();
        assert_eq!(code, 0xf4);
        let bss: [u8; 16] = mem.read_obj(GuestAddress(LOAD_ADDR + 0x800)).unwrap();
        assert_eq!(bss, [0; 16]);

        let si: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(si.version, 1);
        assert_eq!(si.cmdline_paddr, CMDLINE_START);
        let mut cmd = [0u8; 23];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 panic=-1\0");

        assert_eq!(si.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(si.memmap_entries, 3);
        let e: Vec<hvm_memmap_table_entry> = (0..3)
            .map(|i| {
                mem.read_obj(GuestAddress(PVH_MEMMAP_START + 24 * i))
                    .unwrap()
            })
            .collect();
        assert_eq!(
            (e[0].addr, e[0].size, e[0].type_),
            (0, EBDA_START, E820_RAM)
        );
        assert_eq!(
            (e[1].addr, e[1].size, e[1].type_),
            (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)
        );
        assert_eq!(
            (e[2].addr, e[2].size, e[2].type_),
            (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM)
        );

        assert_eq!(si.nr_modules, 1);
        assert_eq!(si.modlist_paddr, PVH_MODLIST_START);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(m.size, 15);
        assert_eq!(m.paddr % 4096, 0);
        let mut buf = [0u8; 15];
        mem.read_slice(&mut buf, GuestAddress(m.paddr)).unwrap();
        assert_eq!(&buf, b"initrd contents");
        assert_eq!(std::mem::size_of::<hvm_start_info>(), 56);
        let _ = si.as_slice();
    }

    #[test]
    fn pvh_note_in_an_earlier_note_segment_is_found() {
        // Two PT_NOTE segments: the Xen note first, the GNU note last.
        let mut b = tiny_elf(true);
        b[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let (ph2, ph3) = (64 + 56, 64 + 112);
        b[ph2 + 8..ph2 + 16].copy_from_slice(&(0x800u64 + 20).to_le_bytes());
        b[ph2 + 32..ph2 + 40].copy_from_slice(&20u64.to_le_bytes());
        b.copy_within(ph2..ph2 + 56, ph3);
        b[ph3 + 8..ph3 + 16].copy_from_slice(&0x800u64.to_le_bytes());
        let mem = guest(64 << 20);
        let k = TempFile::new("twonotes.elf", &b);
        let entry = load_kernel(&mem, &k.0, "").unwrap();
        assert_eq!(entry.entry, ENTRY as u64);
    }

    #[test]
    fn elf_without_note_is_rejected() {
        let mem = guest(64 << 20);
        let k = TempFile::new("nonote.elf", &tiny_elf(false));
        let err = load_kernel(&mem, &k.0, "").unwrap_err();
        assert!(matches!(err, LoaderError::NoPvhNote { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"),
            "{msg}"
        );
        assert!(msg.contains("nonote.elf"), "{msg}");
    }

    #[test]
    fn cmdline_too_long_is_rejected() {
        let mem = guest(64 << 20);
        let k = TempFile::new("pvh.elf", &tiny_elf(true));
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let err = load_kernel(&mem, &k.0, &long).unwrap_err();
        assert!(matches!(err, LoaderError::CmdlineTooLong { .. }), "{err}");
        // The longest allowed one is fine.
        let ok = "x".repeat(CMDLINE_MAX_SIZE - 1);
        load_kernel(&mem, &k.0, &ok).unwrap();
        // Control characters are not.
        let err = load_kernel(&mem, &k.0, "a\nb").unwrap_err();
        assert!(matches!(err, LoaderError::InvalidCmdline { .. }), "{err}");
    }

    #[test]
    fn kernel_beyond_ram_is_too_small() {
        let mem = guest((1 << 20) + 0x1000); // RAM ends inside the segment
        let k = TempFile::new("pvh.elf", &tiny_elf(true));
        let err = load_kernel(&mem, &k.0, "").unwrap_err();
        assert!(matches!(err, LoaderError::MemoryTooSmall { .. }), "{err}");
    }

    #[test]
    fn is_elf_detects_magic() {
        let k = TempFile::new("pvh.elf", &tiny_elf(true));
        assert!(is_elf(&k.0));
        let n = TempFile::new("notelf", b"hello");
        assert!(!is_elf(&n.0));
    }
}
