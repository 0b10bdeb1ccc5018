//! Linux bzImage, entered through the 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").
//!
//! `linux_loader::loader::bzimage::BzImage` copies the protected-mode part
//! (everything after the setup sectors) to `code32_start` (1 MiB). We then
//! fill `boot_params` from the image's setup header: loader type 0xff,
//! command line pointer, initrd, and the e820 map; it is written to
//! [`ZERO_PAGE_START`]. The entry is the 64-bit entry point at load
//! address + 0x200; the vCPU starts in long mode (see `regs.rs`).
//!
//! The decompressor moves itself to `pref_address` (16 MiB for a stock
//! relocatable kernel) and needs `init_size` bytes from there, so the guest
//! must have RAM up to `pref_address + init_size`; the initrd is placed
//! above that, at the top of low RAM, below `initrd_addr_max`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE, XLF_KERNEL_64,
};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, ByteValued, GuestAddress};

use super::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, ZERO_PAGE_START};
use super::{BootEntry, BootProtocol, BootSource, LoaderError};
use crate::GuestMemory;

/// `type_of_loader` for a boot loader without an assigned ID.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `boot_flag` magic.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic ("HdrS").
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// Oldest boot protocol with `xloadflags` (and so `XLF_KERNEL_64`).
pub const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// Offset of the 64-bit entry point from the protected-mode kernel's start.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Default `initrd_addr_max` of kernels that do not announce one.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Reads the setup header at 0x1f1.
fn read_setup_header(file: &mut File) -> std::io::Result<setup_header> {
    let mut hdr = setup_header::default();
    file.seek(SeekFrom::Start(0x1f1))?;
    file.read_exact(hdr.as_mut_slice())?;
    Ok(hdr)
}

/// Loads a bzImage (the caller has seen the "HdrS" magic).
pub(crate) fn load(
    mem: &GuestMemory,
    file: &mut File,
    source: &BootSource,
) -> Result<BootEntry, LoaderError> {
    let path = source.kernel;
    let invalid = |reason: String| LoaderError::InvalidKernel {
        path: path.to_owned(),
        reason,
    };
    let map = super::guest_memory_map(mem, path)?;

    let hdr = read_setup_header(file).map_err(|e| invalid(format!("reading setup header: {e}")))?;
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoaderError::Not64Bit {
            path: path.to_owned(),
            version,
            xloadflags,
        });
    }

    // Does it fit? The protected-mode kernel goes to code32_start; the
    // decompressor then needs init_size bytes from pref_address.
    let file_len = file.metadata().map_err(|e| invalid(e.to_string()))?.len();
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        u64::from(hdr.setup_sects)
    };
    let setup_size = (setup_sects + 1) * 512;
    let pm_size = file_len
        .checked_sub(setup_size)
        .filter(|&s| s > 0)
        .ok_or_else(|| {
            invalid(format!(
                "file ends inside the setup sectors ({setup_size} bytes)"
            ))
        })?;
    let load_addr = u64::from(hdr.code32_start);
    let (pref_address, init_size) = (hdr.pref_address, u64::from(hdr.init_size));
    let kernel_end = load_addr + pm_size;
    let decompress_end = pref_address.max(load_addr) + init_size;
    let needed = kernel_end.max(decompress_end);
    if needed > super::low_ram_end(mem) {
        return Err(LoaderError::MemoryTooSmall {
            path: path.to_owned(),
            needed,
            mem_size: super::mem_size(mem),
        });
    }

    let result = BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| invalid(e.to_string()))?;
    let mut hdr = result
        .setup_header
        .ok_or_else(|| invalid("no setup header".into()))?;
    let load_addr = result.kernel_load.raw_value();

    // Command line: the kernel announces its limit (without the NUL).
    let max_cmdline = (hdr.cmdline_size as usize).clamp(1, CMDLINE_MAX_SIZE - 1);
    super::write_cmdline(mem, source, max_cmdline)?;

    let mut params = boot_params::default();
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.ramdisk_image = 0;
    hdr.ramdisk_size = 0;
    if let Some(initrd) = source.initrd {
        let max = match hdr.initrd_addr_max {
            0 => DEFAULT_INITRD_ADDR_MAX,
            m => u64::from(m),
        };
        let rd = super::load_initrd(mem, initrd, result.kernel_end.max(decompress_end), max + 1)?;
        hdr.ramdisk_image = rd.addr as u32;
        hdr.ramdisk_size = rd.size as u32;
    }
    params.hdr = hdr;

    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(invalid(format!("{} e820 entries do not fit", map.len())));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| LoaderError::GuestMemory {
        path: path.to_owned(),
        what: "boot_params",
        reason: e.to_string(),
    })?;

    Ok(BootEntry {
        protocol: BootProtocol::Linux64,
        entry: load_addr + ENTRY_64_OFFSET,
        boot_info: ZERO_PAGE_START,
    })
}

#[cfg(test)]
mod tests {
    use super::super::layout::{E820_RAM, E820_RESERVED, EBDA_START};
    use super::super::pvh::tests::load_kernel;
    use super::super::tests::{guest, TempFile};
    use super::*;
    use vm_memory::Bytes;

    /// A fake bzImage: 4 setup sectors + boot sector, header for protocol
    /// 2.15 with XLF_KERNEL_64, and `pm_size` bytes of protected-mode code.
    fn fake_bzimage(pm_size: usize, init_size: u32) -> Vec<u8> {
        let mut b = vec![0u8; 5 * 512 + pm_size];
        let mut hdr = setup_header {
            setup_sects: 4,
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            version: 0x020f,
            loadflags: 1,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags: XLF_KERNEL_64 | 2,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size,
            ..Default::default()
        };
        hdr.jump = 0x66eb;
        b[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()].copy_from_slice(hdr.as_slice());
        for (i, x) in b[5 * 512..].iter_mut().enumerate() {
            *x = i as u8;
        }
        b
    }

    #[test]
    fn loads_bzimage_and_writes_boot_params() {
        let mem = guest(64 << 20);
        let k = TempFile::new("bzImage", &fake_bzimage(0x3000, 0x100_0000));
        let rd = TempFile::new("initrd", &[7u8; 5000]);
        let entry = super::super::load(
            &mem,
            &BootSource {
                kernel: &k.0,
                cmdline: "earlyprintk=serial,ttyS0",
                initrd: Some(&rd.0),
            },
        )
        .unwrap();
        assert_eq!(
            entry,
            BootEntry {
                protocol: BootProtocol::Linux64,
                entry: 0x10_0200,
                boot_info: ZERO_PAGE_START
            }
        );
        let first: [u8; 4] = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(first, [0, 1, 2, 3]);

        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        let mut cmd = [0u8; 25];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"earlyprintk=serial,ttyS0\0");

        let (ri, rs) = ({ hdr.ramdisk_image }, { hdr.ramdisk_size });
        assert_eq!(rs, 5000);
        assert_eq!(ri % 4096, 0);
        assert!(u64::from(ri) >= 0x200_0000, "above the decompressor's area");
        assert!(u64::from(ri + rs) <= 64 << 20);
        let b: u8 = mem.read_obj(GuestAddress(u64::from(ri) + 4999)).unwrap();
        assert_eq!(b, 7);

        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table;
        assert_eq!(
            ({ e[0].addr }, { e[0].size }, { e[0].r#type }),
            (0, EBDA_START, E820_RAM)
        );
        assert_eq!(
            ({ e[1].addr }, { e[1].size }, { e[1].r#type }),
            (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)
        );
        assert_eq!(
            ({ e[2].addr }, { e[2].size }, { e[2].r#type }),
            (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn bzimage_needing_more_ram_is_rejected() {
        let mem = guest(64 << 20);
        // Decompressor needs 16 MiB + 64 MiB.
        let k = TempFile::new("bzImage", &fake_bzimage(0x3000, 0x400_0000));
        let err = load_kernel(&mem, &k.0, "").unwrap_err();
        assert!(matches!(err, LoaderError::MemoryTooSmall { .. }), "{err}");
        assert!(err.to_string().contains("bzImage"), "{err}");
    }

    #[test]
    fn bzimage_cmdline_limit_from_header() {
        let mem = guest(64 << 20);
        let mut img = fake_bzimage(0x1000, 0x10_0000);
        // cmdline_size = 16
        let off = 0x1f1 + std::mem::offset_of!(setup_header, cmdline_size);
        img[off..off + 4].copy_from_slice(&16u32.to_le_bytes());
        let k = TempFile::new("bzImage", &img);
        let err = load_kernel(&mem, &k.0, "0123456789abcdefg").unwrap_err();
        assert!(
            matches!(err, LoaderError::CmdlineTooLong { max: 16, .. }),
            "{err}"
        );
    }
}
