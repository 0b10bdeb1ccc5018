//! The migration stream's own pieces, shared by the source (`primary`) and
//! the destination (`secondary`): the header that opens a transfer, the
//! destination's acceptance, and the page codec. See `docs/migration.md`.
//!
//! On the control stream, after the channel's `Hello` exchange:
//!
//! 1. source → destination: a frame of kind [`kind::HEADER`] carrying a
//!    postcard [`Header`] (stream version, VM config, memory layout, disk
//!    offer: size, file name, identity of the source's image);
//! 2. destination → source: a frame of kind [`kind::ACCEPTED`] carrying a
//!    postcard [`Accepted`] (copy the disk, or not: the destination reaches
//!    the source's own image), or `Message::Abort { reason }` if it cannot
//!    take the VM (or is busy with another);
//! 3. pre-copy rounds: `MemoryPages`, `ZeroPages`, `DiskBlocks`, then
//!    `RoundDone`; the destination answers each `RoundDone` with the same
//!    `RoundDone` once it has applied the round (the source measures the
//!    drain rate from these acknowledgements);
//! 4. stop-and-copy: the final pages and blocks, `DeviceState` (a postcard
//!    `vmm::machine::MachineState`: vCPU, devices, exit counter and virtual
//!    time), `SwitchoverReady { paused }` (`paused`: the operator paused
//!    the guest; it stays paused at the destination);
//! 5. destination → source: `Running` once the VM is restored and about to
//!    run; the source then closes the connection and ends.
//!
//! Either side may send `Message::Abort` at any point before `Running`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use vmm::machine::VmConfig;
use vmm::PAGE_SIZE;

/// Version of the migration stream (on top of the channel's protocol
/// version). A destination refuses another version with a clear `Abort`.
/// 3: the VM configuration and machine state carry the NIC.
/// 4: `DeviceState` carries the versioned machine state
/// (`vmm::persist::encode_state`).
/// 5: the header's VM configuration carries the CPU model; the
/// destination builds that model or refuses, naming what its host lacks.
pub const MIGRATION_VERSION: u32 = 5;

/// Application frame kinds of the migration stream.
pub mod kind {
    /// The [`super::Header`] (source → destination).
    pub const HEADER: u8 = 16;
    /// The destination accepts the VM (a postcard [`super::Accepted`]).
    pub const ACCEPTED: u8 = 17;
}

/// What the destination needs to know before the first page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// [`MIGRATION_VERSION`] of the source.
    pub version: u32,
    /// The VM's configuration (memory size, command line, disk).
    pub config: VmConfig,
    /// Guest memory regions `(start, size)`; must equal the destination's.
    pub memory: Vec<(u64, u64)>,
    /// The VM's disk, if it has one.
    pub disk: Option<DiskOffer>,
}

/// The source's disk, as the destination learns of it. Nothing here is a
/// path the destination opens: the receiver's operator chooses where the
/// image goes (`tandem receive --disk PATH`, or `--disk-dir DIR` with
/// [`DiskOffer::name`] checked by [`check_disk_name`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskOffer {
    /// Guest-visible size of the disk in bytes.
    pub len: u64,
    /// File name (no directory) of the source's image.
    pub name: String,
    /// What lets the destination recognise the source's own image.
    pub identity: DiskIdentity,
}

/// Identity of the source's image, so that a destination that reaches the
/// very same file (the same host under another address, or storage both
/// hosts share) migrates memory only and never writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    /// The source host's boot id (`/proc/sys/kernel/random/boot_id`):
    /// device and inode numbers only identify a file on the same host.
    pub boot_id: String,
    /// `st_dev` of the image (`st_rdev` for a device node).
    pub dev: u64,
    /// `st_ino` of the image (0 for a device node).
    pub ino: u64,
    /// The nonce of the marker file the source created next to its image
    /// for the migration ([`marker_path`]); `None` if it could not.
    pub marker: Option<String>,
}

impl DiskIdentity {
    /// Device and inode of `path` as seen on this host, with this host's
    /// boot id and no marker.
    pub fn of(path: &Path) -> std::io::Result<DiskIdentity> {
        let m = std::fs::metadata(path)?;
        let (dev, ino) = file_id(&m);
        Ok(DiskIdentity {
            boot_id: boot_id()?,
            dev,
            ino,
            marker: None,
        })
    }

    /// Is `path` (on this host) the file this identity describes? True if
    /// both are on this host (same boot id) with the same device and inode,
    /// or if the marker of this identity sits next to `path` under `path`'s
    /// own name (storage shared between hosts, where device and inode
    /// numbers differ). `path` should be canonical.
    pub fn matches(&self, path: &Path) -> std::io::Result<bool> {
        let m = std::fs::metadata(path)?;
        if boot_id()? == self.boot_id && file_id(&m) == (self.dev, self.ino) {
            return Ok(true);
        }
        let Some(nonce) = self.marker.as_deref().filter(|n| valid_nonce(n)) else {
            return Ok(false);
        };
        Ok(marker_path(path, nonce).is_some_and(|p| p.symlink_metadata().is_ok()))
    }
}

/// `(dev, ino)` of a file; a device node is identified by the device it
/// stands for.
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_block_device() || t.is_char_device() {
        (m.rdev(), 0)
    } else {
        (m.dev(), m.ino())
    }
}

/// This host's boot id.
pub fn boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

/// Length of a marker nonce (hex digits).
pub const NONCE_LEN: usize = 32;

/// A fresh random nonce of [`NONCE_LEN`] hex digits.
pub fn new_nonce() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; NONCE_LEN / 2];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Is `n` a nonce as [`new_nonce`] makes them (it comes from the peer)?
pub fn valid_nonce(n: &str) -> bool {
    n.len() == NONCE_LEN && n.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The marker file of a migration of the image at `image`:
/// `DIR/.NAME.tandem-migration-NONCE`. `None` if `image` has no file name.
pub fn marker_path(image: &Path, nonce: &str) -> Option<PathBuf> {
    let name = image.file_name()?.to_str()?;
    Some(image.with_file_name(format!(".{name}.tandem-migration-{nonce}")))
}

/// Longest disk name a destination accepts under `--disk-dir` (room is
/// left for the prefix and suffix of its temporary file within NAME_MAX).
pub const MAX_DISK_NAME: usize = 160;

/// Check a disk file name sent by the peer before it is joined to the
/// receiver's `--disk-dir`: a plain file name (no `/`, not `.` or `..`, not
/// hidden, no NUL or other control characters), at most
/// [`MAX_DISK_NAME`] bytes.
pub fn check_disk_name(name: &str) -> Result<(), String> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_DISK_NAME {
        Some("it is longer than 160 bytes")
    } else if name.contains('/') {
        Some("it contains '/'")
    } else if name.starts_with('.') {
        Some("it starts with '.'")
    } else if name.chars().any(char::is_control) {
        Some("it contains a control character")
    } else {
        None
    };
    match why {
        Some(why) => Err(format!(
            "the source's disk name {:?} is not a plain file name: {why}",
            name.chars().take(MAX_DISK_NAME).collect::<String>()
        )),
        None => Ok(()),
    }
}

/// The destination's answer to the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// What happens to the VM's disk.
    pub disk: DiskPlan,
}

/// What the destination does with the VM's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskPlan {
    /// The VM has no disk.
    None,
    /// Send every block: the destination writes its own image.
    Copy,
    /// The destination reaches the source's own image (same file): send no
    /// block; the source makes its writes durable before the switchover and
    /// the destination opens the same image.
    Shared,
}

/// A value from the stream outside what the VM has: the transfer is
/// aborted with this error (nothing is written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    /// A page address that is not a multiple of the page size.
    #[error("page at guest address {gpa:#x} is not page-aligned")]
    Unaligned {
        /// The address sent.
        gpa: u64,
    },
    /// A page that does not lie inside guest memory.
    #[error("page at guest address {gpa:#x} lies outside guest memory")]
    PageOutside {
        /// The address sent.
        gpa: u64,
    },
    /// A disk block that does not lie inside the disk.
    #[error(
        "disk block of {len} bytes at offset {offset} lies beyond the disk's {disk_len} bytes"
    )]
    DiskBlock {
        /// Offset sent.
        offset: u64,
        /// Length sent.
        len: u64,
        /// The disk's size.
        disk_len: u64,
    },
}

/// Check a page address from the stream against the memory layout.
pub fn check_page(layout: &[(u64, u64)], gpa: u64) -> Result<(), BoundsError> {
    if !gpa.is_multiple_of(PAGE_SIZE as u64) {
        return Err(BoundsError::Unaligned { gpa });
    }
    if !vmm::vstate::memory::range_in_layout(layout, gpa, PAGE_SIZE as u64) {
        return Err(BoundsError::PageOutside { gpa });
    }
    Ok(())
}

/// Check a disk block from the stream against the disk's size (checked
/// arithmetic: an offset near `u64::MAX` does not wrap).
pub fn check_disk_block(offset: u64, len: u64, disk_len: u64) -> Result<(), BoundsError> {
    match offset.checked_add(len) {
        Some(end) if end <= disk_len => Ok(()),
        _ => Err(BoundsError::DiskBlock {
            offset,
            len,
            disk_len,
        }),
    }
}

/// The page codec (sparse / lz4 / raw), shared with the record log's sync
/// points.
pub use recordlog::page::{decode_page, encode_page, PageError};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names_are_plain_file_names() {
        for ok in ["vm.img", "disk 1,raw", "a..b", &"x".repeat(MAX_DISK_NAME)] {
            assert_eq!(check_disk_name(ok), Ok(()), "{ok:?}");
        }
        let long = "x".repeat(MAX_DISK_NAME + 1);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc/passwd",
            "a/b",
            ".hidden",
            "a\0b",
            "a\nb",
            &long,
        ] {
            assert!(check_disk_name(bad).is_err(), "{bad:?}");
        }
        assert!(valid_nonce(&new_nonce().unwrap()));
        assert!(!valid_nonce("../../etc/passwd"));
        assert!(!valid_nonce(""));
    }

    #[test]
    fn same_image_by_inode_here_and_by_marker_on_shared_storage() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("vm.img");
        let other = dir.path().join("other.img");
        std::fs::write(&img, b"image").unwrap();
        std::fs::write(&other, b"image").unwrap();
        let link = dir.path().join("link.img");
        std::fs::hard_link(&img, &link).unwrap();
        let here = DiskIdentity::of(&img).unwrap();
        assert!(here.matches(&img).unwrap());
        assert!(
            here.matches(&link).unwrap(),
            "another name of the same file"
        );
        assert!(
            !here.matches(&other).unwrap(),
            "a copy is not the same file"
        );

        // Shared storage seen from another host: device and inode numbers
        // (and the boot id) differ; the marker the source created next to
        // its image is what tells.
        let nonce = new_nonce().unwrap();
        let remote = DiskIdentity {
            boot_id: "the source host".into(),
            dev: here.dev + 1,
            ino: here.ino + 1,
            marker: Some(nonce.clone()),
        };
        assert!(!remote.matches(&img).unwrap());
        let marker = marker_path(&img, &nonce).unwrap();
        std::fs::write(&marker, b"").unwrap();
        assert!(remote.matches(&img).unwrap());
        assert!(
            !remote.matches(&other).unwrap(),
            "the marker names one image"
        );
        // A nonce that is not one is never joined to a path.
        let evil = DiskIdentity {
            marker: Some("../../x".into()),
            ..remote
        };
        std::fs::write(dir.path().join(".vm.img.tandem-migration-../../x"), b"").ok();
        assert!(!evil.matches(&img).unwrap());
    }

    #[test]
    fn stream_values_are_bounded() {
        let layout = [(0, 1 << 20), (1 << 32, 1 << 20)];
        assert_eq!(check_page(&layout, 0x1000), Ok(()));
        assert_eq!(check_page(&layout, (1 << 32) + 0xff000), Ok(()));
        assert!(matches!(
            check_page(&layout, 1 << 20),
            Err(BoundsError::PageOutside { .. })
        ));
        assert!(matches!(
            check_page(&layout, !0xfff),
            Err(BoundsError::PageOutside { .. })
        ));
        assert!(matches!(
            check_page(&layout, 0x1001),
            Err(BoundsError::Unaligned { .. })
        ));
        assert_eq!(check_disk_block(0, 4096, 4096), Ok(()));
        assert!(check_disk_block(1, 4096, 4096).is_err());
        assert!(check_disk_block(u64::MAX - 10, 4096, 1 << 30).is_err());
        assert!(check_disk_block(1 << 30, 1, 1 << 20).is_err());
    }
}
