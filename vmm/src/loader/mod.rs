//! Boot loaders: PVH ELF and Linux bzImage (64-bit boot protocol).
//!
//! [`load`] detects the format of a kernel file, loads it with
//! `linux-loader`, writes the command line, the initrd and the boot
//! information (PVH `hvm_start_info` or Linux `boot_params`) into guest
//! memory and returns a [`BootEntry`]. [`configure_vcpu`] then puts the vCPU
//! into the state the protocol's entry point expects. Where everything lives
//! in guest memory is described in [`layout`].
//!
//! Formats, in the order they are tried:
//! * an ELF file (`\x7fELF`) with a `XEN_ELFNOTE_PHYS32_ENTRY` note: PVH.
//!   Segments are loaded at their physical addresses (`p_paddr`); the vCPU
//!   starts in 32-bit protected mode with paging off, EBX = start_info. This
//!   boots a stock `vmlinux` (CONFIG_PVH=y, e.g. Debian's) and the project's
//!   own test guest.
//! * a bzImage (`HdrS` at 0x202, boot protocol >= 2.12 with
//!   `XLF_KERNEL_64`): the protected-mode kernel is loaded at
//!   `code32_start` (1 MiB) and entered at its 64-bit entry (+0x200) in long
//!   mode with an identity mapping of the first 1 GiB, RSI = boot_params.
//!
//! The guest gets no ACPI, MP tables or LAPIC: Linux comes up uniprocessor
//! on the 8259 PIC and 8254 PIT.

pub mod bzimage;
pub mod layout;
pub mod pvh;
mod regs;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::Cmdline;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMemory;
use layout::MemoryMapEntry;

/// Which boot protocol the kernel is entered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Xen PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, RSI = `boot_params`.
    Linux64,
}

/// Where and how to enter a loaded kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// Protocol the kernel is entered with.
    pub protocol: BootProtocol,
    /// Guest physical address of the first instruction.
    pub entry: u64,
    /// Guest physical address of the boot information: `hvm_start_info`
    /// (PVH) or `boot_params` (Linux64).
    pub boot_info: u64,
}

/// What to boot.
#[derive(Clone, Copy, Debug)]
pub struct BootSource<'a> {
    /// Kernel image: PVH ELF or bzImage.
    pub kernel: &'a Path,
    /// Kernel command line (printable ASCII).
    pub cmdline: &'a str,
    /// Optional initial ramdisk.
    pub initrd: Option<&'a Path>,
}

/// Errors of [`load`] and [`configure_vcpu`]. Each names its input.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file is missing, unreadable or not a regular file.
    #[error("cannot read kernel {path}: {source}")]
    KernelUnreadable {
        /// Kernel path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The initrd file is missing, unreadable or not a regular file.
    #[error("cannot read initrd {path}: {source}")]
    InitrdUnreadable {
        /// Initrd path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Neither an ELF file nor a bzImage.
    #[error("{path}: not a kernel image (neither a PVH ELF nor a bzImage)")]
    NotAKernel {
        /// Kernel path.
        path: PathBuf,
    },
    /// An ELF file without the PVH entry point note.
    #[error("{path}: ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhNote {
        /// Kernel path.
        path: PathBuf,
    },
    /// A bzImage that cannot be entered in 64-bit mode.
    #[error(
        "{path}: bzImage does not support the 64-bit boot protocol \
         (boot protocol {version:#x}, xloadflags {xloadflags:#x}; need >= 0x20c with XLF_KERNEL_64)"
    )]
    Not64Bit {
        /// Kernel path.
        path: PathBuf,
        /// Boot protocol version from the setup header.
        version: u16,
        /// `xloadflags` from the setup header.
        xloadflags: u16,
    },
    /// A malformed ELF or bzImage.
    #[error("{path}: invalid kernel image: {reason}")]
    InvalidKernel {
        /// Kernel path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The command line does not fit.
    #[error("kernel command line for {path} is too long: {len} bytes, the limit is {max}")]
    CmdlineTooLong {
        /// Kernel path.
        path: PathBuf,
        /// Length of the command line (without NUL).
        len: usize,
        /// Longest accepted command line (without NUL).
        max: usize,
    },
    /// The command line contains characters other than printable ASCII.
    #[error("invalid kernel command line for {path}: {reason}")]
    InvalidCmdline {
        /// Kernel path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest memory: \
         the free space is {low:#x}..{high:#x}"
    )]
    InitrdTooLarge {
        /// Initrd path.
        path: PathBuf,
        /// Initrd size in bytes.
        size: u64,
        /// Lowest usable address (end of the kernel).
        low: u64,
        /// Highest usable address (exclusive).
        high: u64,
    },
    /// The guest has too little memory for this kernel.
    #[error(
        "guest memory ({mem_size} bytes) is too small for kernel {path}: \
         it needs RAM up to {needed:#x}"
    )]
    MemoryTooSmall {
        /// Kernel path.
        path: PathBuf,
        /// Highest address the kernel needs (exclusive).
        needed: u64,
        /// Total guest RAM.
        mem_size: u64,
    },
    /// Writing boot data into guest memory failed.
    #[error("{path}: writing {what} to guest memory failed: {reason}")]
    GuestMemory {
        /// Kernel path.
        path: PathBuf,
        /// What was being written.
        what: &'static str,
        /// Underlying error.
        reason: String,
    },
    /// A KVM call while setting up the vCPU failed.
    #[error(
        "setting up the vCPU for the {protocol:?} entry at {entry:#x}: {what} failed: {source}"
    )]
    Vcpu {
        /// Protocol being set up.
        protocol: BootProtocol,
        /// Entry point.
        entry: u64,
        /// Which step failed.
        what: &'static str,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
}

/// Detects the kernel format, loads kernel, command line and initrd and
/// writes the boot information. See the module documentation.
pub fn load(mem: &GuestMemory, source: &BootSource) -> Result<BootEntry, LoaderError> {
    let path = source.kernel;
    let mut file = open_regular(path).map_err(|source| LoaderError::KernelUnreadable {
        path: path.to_owned(),
        source,
    })?;
    let mut head = [0u8; 0x210];
    let n = read_up_to(&mut file, &mut head).map_err(|source| LoaderError::KernelUnreadable {
        path: path.to_owned(),
        source,
    })?;
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") {
        pvh::load(mem, &mut file, source)
    } else if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        bzimage::load(mem, &mut file, source)
    } else {
        Err(LoaderError::NotAKernel {
            path: path.to_owned(),
        })
    }
}

/// Sets the registers, segment/control registers and FPU of `vcpu` for
/// `entry` (and writes the boot GDT/IDT, and for Linux64 the identity page
/// tables, into `mem`). CPUID and MSRs are left to the caller.
pub fn configure_vcpu(
    vcpu: &kvm_ioctls::VcpuFd,
    entry: &BootEntry,
    mem: &GuestMemory,
) -> Result<(), LoaderError> {
    regs::configure_vcpu(vcpu, entry, mem)
}

/// Opens `path` for reading, rejecting directories and other non-files
/// with a clear error.
pub(crate) fn open_regular(path: &Path) -> io::Result<File> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::other("is a directory"));
    }
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(file)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    file.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The RAM regions of `mem` as `(start, len)`.
pub(crate) fn regions_of(mem: &GuestMemory) -> Vec<(u64, u64)> {
    mem.iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect()
}

/// Total RAM of `mem` in bytes.
pub(crate) fn mem_size(mem: &GuestMemory) -> u64 {
    regions_of(mem).iter().map(|r| r.1).sum()
}

/// End (exclusive) of the RAM region that starts at 0 (the RAM below the
/// MMIO hole), or 0 if there is none.
pub(crate) fn low_ram_end(mem: &GuestMemory) -> u64 {
    regions_of(mem)
        .iter()
        .find(|r| r.0 == 0)
        .map(|r| r.1)
        .unwrap_or(0)
}

/// The guest memory map, or an error if the guest is too small to boot
/// anything (no RAM from 0 to 1 MiB).
pub(crate) fn guest_memory_map(
    mem: &GuestMemory,
    path: &Path,
) -> Result<Vec<MemoryMapEntry>, LoaderError> {
    let map = layout::memory_map(&regions_of(mem));
    if map.is_empty() {
        return Err(LoaderError::MemoryTooSmall {
            path: path.to_owned(),
            needed: layout::HIMEM_START,
            mem_size: mem_size(mem),
        });
    }
    Ok(map)
}

/// Validates `source.cmdline` (printable ASCII, at most `max_len` bytes
/// without the NUL) and writes it NUL-terminated at `CMDLINE_START`.
/// Returns the number of bytes written without the NUL.
pub(crate) fn write_cmdline(
    mem: &GuestMemory,
    source: &BootSource,
    max_len: usize,
) -> Result<usize, LoaderError> {
    let path = source.kernel;
    let raw = source.cmdline;
    if raw.len() > max_len {
        return Err(LoaderError::CmdlineTooLong {
            path: path.to_owned(),
            len: raw.len(),
            max: max_len,
        });
    }
    if let Some(c) = raw.chars().find(|c| !matches!(c, ' '..='~')) {
        return Err(LoaderError::InvalidCmdline {
            path: path.to_owned(),
            reason: format!("character {c:?} is not printable ASCII"),
        });
    }
    let cmdline = Cmdline::try_from(raw, max_len + 1).map_err(|e| LoaderError::InvalidCmdline {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let bytes = cmdline
        .as_cstring()
        .map_err(|e| LoaderError::InvalidCmdline {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(|e| LoaderError::GuestMemory {
            path: path.to_owned(),
            what: "the command line",
            reason: e.to_string(),
        })?;
    Ok(bytes.as_bytes().len())
}

/// A loaded initrd: guest physical address and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

/// Page alignment of the initrd.
const INITRD_ALIGN: u64 = 4096;

/// Loads the initrd at `path` as high as possible in low RAM: ending at or
/// below `min(top of low RAM, max_end)`, page aligned, and starting at or
/// above `min_start` (the end of what the kernel occupies).
pub(crate) fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    min_start: u64,
    max_end: u64,
) -> Result<LoadedInitrd, LoaderError> {
    let unreadable = |source| LoaderError::InitrdUnreadable {
        path: path.to_owned(),
        source,
    };
    let mut file = open_regular(path).map_err(unreadable)?;
    let size = file.metadata().map_err(unreadable)?.len();
    let high = low_ram_end(mem).min(max_end);
    let low = min_start.next_multiple_of(INITRD_ALIGN);
    let too_large = || LoaderError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        low,
        high,
    };
    let addr = high
        .checked_sub(size)
        .map(|a| a & !(INITRD_ALIGN - 1))
        .filter(|&a| a >= low)
        .ok_or_else(too_large)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(source) => unreadable(source),
            other => unreadable(io::Error::other(other.to_string())),
        })?;
    Ok(LoadedInitrd { addr, size })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestMemoryMmap};

    pub fn guest(mem_size: u64) -> GuestMemory {
        GuestMemoryMmap::<AtomicBitmap>::from_ranges(&layout::ram_regions(mem_size)).unwrap()
    }

    /// A temporary file that is removed on drop.
    pub struct TempFile(pub PathBuf);

    impl TempFile {
        pub fn new(name: &str, contents: &[u8]) -> Self {
            static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "tandem-loader-{}-{}-{}",
                std::process::id(),
                n,
                name
            ));
            let mut f = File::create(&path).unwrap();
            f.write_all(contents).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn load_bytes(bytes: &[u8]) -> Result<BootEntry, LoaderError> {
        let f = TempFile::new("kernel", bytes);
        let mem = guest(64 << 20);
        load(
            &mem,
            &BootSource {
                kernel: &f.0,
                cmdline: "console=ttyS0",
                initrd: None,
            },
        )
    }

    #[test]
    fn random_bytes_are_not_a_kernel() {
        let mut x: u32 = 0x1234_5678;
        let bytes: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let err = load_bytes(&bytes).unwrap_err();
        assert!(matches!(err, LoaderError::NotAKernel { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("not a kernel image (neither a PVH ELF nor a bzImage)"));
        assert!(msg.contains("tandem-loader-"), "{msg}");
    }

    #[test]
    fn empty_file_is_not_a_kernel() {
        let err = load_bytes(&[]).unwrap_err();
        assert!(matches!(err, LoaderError::NotAKernel { .. }), "{err}");
    }

    #[test]
    fn directory_is_unreadable() {
        let mem = guest(64 << 20);
        let dir = std::env::temp_dir();
        let err = load(
            &mem,
            &BootSource {
                kernel: &dir,
                cmdline: "",
                initrd: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, LoaderError::KernelUnreadable { .. }), "{err}");
        assert!(err.to_string().contains("is a directory"), "{err}");
        assert!(err.to_string().contains(&dir.display().to_string()));
    }

    #[test]
    fn missing_file_is_unreadable() {
        let mem = guest(64 << 20);
        let path = Path::new("/nonexistent/tandem/vmlinux");
        let err = load(
            &mem,
            &BootSource {
                kernel: path,
                cmdline: "",
                initrd: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, LoaderError::KernelUnreadable { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/tandem/vmlinux"));
    }

    #[test]
    fn truncated_bzimage_is_invalid() {
        let mut bytes = vec![0u8; 0x400];
        bytes[0x202..0x206].copy_from_slice(b"HdrS");
        bytes[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        bytes[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        let err = load_bytes(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                LoaderError::InvalidKernel { .. } | LoaderError::MemoryTooSmall { .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn old_bzimage_is_rejected() {
        let mut bytes = vec![0u8; 0x1000];
        bytes[0x1f1] = 1;
        bytes[0x202..0x206].copy_from_slice(b"HdrS");
        bytes[0x206..0x208].copy_from_slice(&0x20au16.to_le_bytes());
        let err = load_bytes(&bytes).unwrap_err();
        assert!(matches!(err, LoaderError::Not64Bit { .. }), "{err}");
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let mem = guest(64 << 20);
        let f = TempFile::new("initrd", &[0xab; 10_000]);
        let rd = load_initrd(&mem, &f.0, 0x200_0000, u64::MAX).unwrap();
        assert_eq!(rd.size, 10_000);
        assert_eq!(rd.addr % INITRD_ALIGN, 0);
        assert!(rd.addr + rd.size <= 64 << 20);
        assert!(rd.addr + rd.size > (64 << 20) - INITRD_ALIGN * 2);
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(rd.addr + 9_999))
            .unwrap();
        assert_eq!(b[0], 0xab);

        let err = load_initrd(&mem, &f.0, (64 << 20) - 4096, u64::MAX).unwrap_err();
        assert!(matches!(err, LoaderError::InitrdTooLarge { .. }), "{err}");
        let err = load_initrd(&mem, Path::new("/nonexistent/initrd"), 0, u64::MAX).unwrap_err();
        assert!(matches!(err, LoaderError::InitrdUnreadable { .. }), "{err}");
    }
}
