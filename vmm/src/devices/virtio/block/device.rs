//! virtio-blk over virtio-mmio, backed by a raw image file.
//!
//! Requests are processed synchronously, in available-ring order, when the
//! guest writes QueueNotify: the disk is replicated state (DESIGN.md rule 7),
//! so the secondary's replay must perform the same writes at the same
//! `exit_seq`, and a synchronous device needs no logged completions. I/O uses
//! `pread`/`pwrite` on the image; guest memory is only touched through the
//! `vm-memory` API, so the pages this device writes (read data, status bytes,
//! used ring) are recorded in the [`GuestMemory`] dirty bitmap.
//!
//! Offered features: VIRTIO_F_VERSION_1, VIRTIO_BLK_F_SEG_MAX,
//! VIRTIO_BLK_F_BLK_SIZE (512), VIRTIO_BLK_F_FLUSH, and VIRTIO_BLK_F_RO for a
//! read-only disk. No EVENT_IDX: an interrupt follows every notify that
//! completed at least one chain.
//!
//! Requests: IN, OUT, FLUSH (`fdatasync`), GET_ID (the serial, "tandem-disk"
//! unless [`VirtioBlock::set_serial`] says otherwise). Any other type gets
//! VIRTIO_BLK_S_UNSUPP. IOERR for: data length not a multiple of 512 (IN/OUT),
//! a range past the end of the disk, OUT on a read-only disk, a malformed chain (header shorter than 16 bytes, device-readable after
//! device-writable descriptors, buffers outside guest memory). A chain with no
//! room for a status byte (or whose status byte is outside guest memory) is
//! returned in the used ring with length 0 and otherwise ignored.
//!
//! Capacity is the image length divided by 512, rounded down: the tail of an
//! image whose size is not a multiple of 512 is invisible to the guest and is
//! not moved by [`VirtioBlock::read_block`]. A 0-byte image is a disk with
//! capacity 0 (every IN/OUT with data fails with IOERR; FLUSH and GET_ID work).
//!
//! **Host I/O errors stall the device** (QEMU's `werror=stop,rerror=stop`):
//! the guest may never see a result that a replay on another host could not
//! reproduce (DESIGN.md rule 7). When a host read, write or flush fails, the
//! failed request and every request after it in the available ring are left
//! unprocessed (`next_avail` is put back to the failed chain; the chains
//! completed before it stay in the used ring, their interrupt is held), the
//! device is *stalled* and the MMIO write that notified it returns the
//! [`HostIoError`]. The run loop stops the vCPU at that exit;
//! [`VirtioBlock::retry`] performs the rest of the notify once the operator
//! fixed the cause. The completed notify is then exactly what a run without
//! the error would have produced, so a recording holds only the retried
//! success and a replay reproduces it.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::devices::virtio::mmio::{
    read_config_space, MmioEvent, MmioTransport, CONFIG_SPACE_OFFSET, QUEUE_MAX_SIZE,
    VIRTIO_F_VERSION_1,
};
use crate::image::{Access, Image, ImageError, ImageLock};
use crate::GuestMemory;

/// Size of the MMIO window of one device.
pub const MMIO_SIZE: u64 = 0x1000;
/// Granularity of the dirty-block bitmap used by storage migration.
pub const DIRTY_BLOCK_SIZE: u64 = 64 * 1024;
/// virtio device type of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Serial returned by GET_ID unless set otherwise.
pub const DEFAULT_SERIAL: &str = "tandem-disk";
/// Length of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;
/// Maximum number of data segments per request (config `seg_max`); leaves
/// room for header and status in a ring of [`QUEUE_MAX_SIZE`] / 2 entries.
pub const SEG_MAX: u32 = QUEUE_MAX_SIZE as u32 / 2 - 2;

/// VIRTIO_BLK_F_SEG_MAX.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_BLK_SIZE.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Get the serial.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Size of the request header (type, reserved, sector).
const HEADER_SIZE: u64 = 16;
/// Largest bounce buffer used to move data between the image and guest memory.
const CHUNK: usize = 128 * 1024;
/// Size of the configuration space exposed (capacity .. blk_size, topology).
const CONFIG_SIZE: usize = 24;

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The path is a directory.
    #[error("disk image {path} is a directory")]
    IsDirectory {
        /// The image.
        path: PathBuf,
    },
    /// The size of the image could not be determined.
    #[error("cannot determine the size of disk image {path}: {source}")]
    Size {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A dirty-block index past the end of the disk.
    #[error("disk image {path}: block {index} is past the end of the disk ({blocks} blocks)")]
    BlockOutOfRange {
        /// The image.
        path: PathBuf,
        /// Requested block.
        index: u64,
        /// Number of blocks.
        blocks: u64,
    },
    /// A block write whose length is not the block's length.
    #[error("disk image {path}: block {index} is {expected} bytes, got {got}")]
    BlockLength {
        /// The image.
        path: PathBuf,
        /// Block.
        index: u64,
        /// Length of the block.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// A write to a read-only disk.
    #[error("disk image {path} is read-only")]
    ReadOnly {
        /// The image.
        path: PathBuf,
    },
    /// A host I/O error on the image.
    #[error("I/O error on disk image {path}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The image is locked by another process, or cannot be locked
    /// ([`crate::image`]).
    #[error(transparent)]
    Image(crate::image::ImageError),
    /// A replacement image whose size is not the disk's capacity.
    #[error("disk image {path} is {got} bytes, the disk is {expected} bytes")]
    SizeMismatch {
        /// The image.
        path: PathBuf,
        /// The disk's size (capacity × 512).
        expected: u64,
        /// The image's size.
        got: u64,
    },
}

/// The host operation that failed on a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    /// A read of `len` bytes at byte `offset` of the image.
    Read {
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A write of `len` bytes at byte `offset` of the image.
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// An `fdatasync` of the image.
    Flush,
}

impl std::fmt::Display for DiskOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskOp::Read { offset, len } => write!(f, "read of {len} bytes at offset {offset}"),
            DiskOp::Write { offset, len } => write!(f, "write of {len} bytes at offset {offset}"),
            DiskOp::Flush => f.write_str("flush"),
        }
    }
}

/// A guest request that failed on the host (the image's file system is
/// full, the device returned EIO, ...): the request was not completed and
/// the device is stalled until [`VirtioBlock::retry`] succeeds.
#[derive(Debug, Clone, thiserror::Error)]
#[error("disk {}: {op} failed: {source}", path.display())]
pub struct HostIoError {
    /// The image.
    pub path: PathBuf,
    /// What failed.
    pub op: DiskOp,
    /// The OS error.
    #[source]
    pub source: std::sync::Arc<std::io::Error>,
}

impl HostIoError {
    /// The OS error number, if there is one (e.g. `libc::ENOSPC`).
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// The image's file system is full or over quota (ENOSPC, EDQUOT).
    pub fn out_of_space(&self) -> bool {
        matches!(self.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
    }
}

/// Which image and how to open it.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Path of the raw image (a regular file or a block device).
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
}

/// A virtio-blk device on the virtio-mmio transport.
#[derive(Debug)]
pub struct VirtioBlock {
    config: BlockConfig,
    file: File,
    /// The image's lock, held while the device may write it.
    lock: ImageLock,
    capacity_sectors: u64,
    serial: String,
    transport: MmioTransport,
    /// One bit per [`DIRTY_BLOCK_SIZE`] block of the disk, shared with
    /// storage migration (see [`DirtyBlocks`]).
    dirty: DirtyBlocks,
    /// A notify left unfinished by a host I/O error (see the module docs).
    stall: Option<Stall>,
}

/// An unfinished notify.
#[derive(Debug, Clone)]
struct Stall {
    /// Why.
    error: HostIoError,
    /// Chains before the failed one were returned: their interrupt is due
    /// when the notify completes.
    used_any: bool,
}

/// The dirty-block record of a disk: one bit per [`DIRTY_BLOCK_SIZE`]
/// block. A cheap, cloneable handle so that a migration thread can collect
/// dirty blocks while the vCPU thread keeps running the device.
///
/// The device marks a block *after* its data reached the image, so a
/// collector that takes the set and then reads the blocks never misses a
/// write: a write that lands after the read marks the block again.
#[derive(Debug, Clone)]
pub struct DirtyBlocks {
    bits: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    blocks: u64,
}

impl DirtyBlocks {
    fn new(blocks: u64) -> Self {
        DirtyBlocks {
            bits: std::sync::Arc::new(std::sync::Mutex::new(vec![0; blocks.div_ceil(64) as usize])),
            blocks,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.bits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn mark_range(&self, first: u64, last: u64) {
        if self.blocks == 0 {
            return;
        }
        let mut bits = self.lock();
        for b in first..=last.min(self.blocks.saturating_sub(1)) {
            bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// Indices of the blocks written since the last call (ascending), and
    /// clear the record.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, word) in self.lock().iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(w as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
        out
    }

    /// How many blocks are marked (without clearing).
    pub fn pending(&self) -> u64 {
        self.lock().iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Mark every block.
    pub fn mark_all(&self) {
        if self.blocks > 0 {
            self.mark_range(0, self.blocks - 1);
        }
    }
}

/// One guest buffer of a descriptor chain.
#[derive(Debug, Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

/// Why a request failed, for the status byte, or a host error that stalls
/// the device instead of completing the request.
#[derive(Debug)]
enum ReqError {
    /// VIRTIO_BLK_S_IOERR.
    Bad(BadRequest),
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupp,
    /// No status: the device stalls.
    Host(HostIoError),
}

/// Why a request gets VIRTIO_BLK_S_IOERR: the guest's own mistake, which a
/// replay meets in the same way (never a host error, see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum BadRequest {
    #[error("a device-readable descriptor after a device-writable one")]
    Order,
    #[error("a request header shorter than 16 bytes")]
    ShortHeader,
    #[error("data length {len} is not a multiple of 512")]
    NotSectors { len: u64 },
    #[error("{len} bytes at sector {sector} reach past the end of the disk")]
    PastEnd { sector: u64, len: u64 },
    #[error("a buffer of {len} bytes at {addr:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: u64 },
    #[error("a write to a read-only disk")]
    ReadOnly,
}

impl From<BadRequest> for ReqError {
    fn from(e: BadRequest) -> Self {
        ReqError::Bad(e)
    }
}

impl VirtioBlock {
    /// Opens the image (read-only when asked); errors name the path (missing
    /// file, permission, a directory).
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let (file, lock, len) = open_image(&config)?;
        let capacity_sectors = len / SECTOR_SIZE;
        let mut features =
            VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
        if config.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        let blocks = (capacity_sectors * SECTOR_SIZE).div_ceil(DIRTY_BLOCK_SIZE);
        Ok(VirtioBlock {
            config,
            file,
            lock,
            capacity_sectors,
            serial: DEFAULT_SERIAL.to_owned(),
            transport: MmioTransport::new(VIRTIO_ID_BLOCK, features, 1),
            dirty: DirtyBlocks::new(blocks),
            stall: None,
        })
    }

    /// The configuration the device was opened with.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Capacity in 512-byte sectors (image length / 512, rounded down).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// The serial returned by GET_ID.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Set the serial returned by GET_ID; longer than 20 bytes is truncated
    /// (at a character boundary). Part of the saved state.
    pub fn set_serial(&mut self, serial: &str) {
        let mut end = serial.len().min(ID_BYTES);
        while !serial.is_char_boundary(end) {
            end -= 1;
        }
        self.serial = serial[..end].to_owned();
    }

    /// The transport (registers and queue).
    pub fn transport(&self) -> &MmioTransport {
        &self.transport
    }

    pub(crate) fn transport_mut(&mut self) -> &mut MmioTransport {
        &mut self.transport
    }

    /// The interrupt line: high while InterruptStatus != 0.
    pub fn interrupt_level(&self) -> bool {
        self.transport.interrupt_status() != 0
    }

    /// A guest read of `data.len()` bytes at `offset` in the MMIO window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.read_config(offset - CONFIG_SPACE_OFFSET, data);
        } else {
            self.transport.read_register(offset, data);
        }
    }

    /// A guest write at `offset` in the MMIO window. A write to QueueNotify
    /// processes every available request before returning; a host I/O
    /// error stalls the device and is returned (see the module docs).
    pub fn mmio_write(
        &mut self,
        offset: u64,
        data: &[u8],
        mem: &GuestMemory,
    ) -> Result<(), HostIoError> {
        if offset >= CONFIG_SPACE_OFFSET {
            // All virtio-blk config fields we expose are read-only.
            tracing::debug!(offset, "virtio-blk: config space write ignored");
            return Ok(());
        }
        if let Some(stall) = &self.stall {
            // The vCPU is stopped at the stalled exit until `retry`.
            return Err(stall.error.clone());
        }
        match self.transport.write_register(offset, data, mem) {
            MmioEvent::Notify(_) => self.process_queue(mem, false),
            MmioEvent::Reset | MmioEvent::None => Ok(()),
        }
    }

    /// The host error the device is stalled on, if any.
    pub fn stalled(&self) -> Option<&HostIoError> {
        self.stall.as_ref().map(|s| &s.error)
    }

    pub(crate) fn clear_stall(&mut self) {
        self.stall = None;
    }

    /// Finish the notify a host I/O error left unfinished: the failed
    /// request and the ones after it are performed again, from the state
    /// they were left in. A new error stalls the device again. Nothing to
    /// do (Ok) when the device is not stalled.
    pub fn retry(&mut self, mem: &GuestMemory) -> Result<(), HostIoError> {
        match self.stall.take() {
            Some(stall) => self.process_queue(mem, stall.used_any),
            None => Ok(()),
        }
    }

    fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        // 8..12 size_max: not offered.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // 16..20 geometry: not offered.
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space(), offset, data);
    }

    /// Process every chain in the available ring (at most one queue's worth:
    /// the available index is read once). `used_any`: chains were already
    /// returned by the stalled part of this notify. A host I/O error stops
    /// at the failed chain and stalls the device.
    fn process_queue(&mut self, mem: &GuestMemory, mut used_any: bool) -> Result<(), HostIoError> {
        if !self.transport.is_live() {
            tracing::debug!("virtio-blk: notify while not live ignored");
            return Ok(());
        }
        let start = self.transport.queue(0).next_avail();
        let chains: Vec<DescriptorChain<&GuestMemory>> = match self.transport.queue_mut(0).iter(mem)
        {
            Ok(iter) => iter.collect(),
            Err(e) => {
                tracing::warn!(error = %e, "virtio-blk: bad available ring");
                self.transport.set_needs_reset();
                return Ok(());
            }
        };
        for (i, chain) in chains.into_iter().enumerate() {
            let head = chain.head_index();
            let len = match self.process_chain(mem, chain) {
                Ok(len) => len,
                Err(error) => {
                    // Not completed: this chain is taken again by `retry`.
                    let next = start.wrapping_add(i as u16);
                    self.transport.queue_mut(0).set_next_avail(next);
                    tracing::debug!(%error, "virtio-blk: host I/O error, device stalled");
                    self.stall = Some(Stall {
                        error: error.clone(),
                        used_any,
                    });
                    return Err(error);
                }
            };
            match self.transport.queue_mut(0).add_used(mem, head, len) {
                Ok(()) => used_any = true,
                Err(e) => {
                    tracing::debug!(head, error = %e, "virtio-blk: cannot return chain");
                }
            }
        }
        if used_any {
            self.transport.signal_used();
        }
        Ok(())
    }

    /// Execute one request; returns the used length (bytes written to guest
    /// memory, status byte included), 0 if the chain had no usable status;
    /// a host I/O error leaves the request without a status.
    fn process_chain(
        &mut self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Result<u32, HostIoError> {
        let descs: Vec<Descriptor> = chain.collect();
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut order_ok = true;
        for d in &descs {
            let seg = Seg {
                addr: d.addr(),
                len: u64::from(d.len()),
            };
            if d.is_write_only() {
                writable.push(seg);
            } else {
                if !writable.is_empty() {
                    order_ok = false;
                }
                readable.push(seg);
            }
        }
        let w_total: u64 = writable.iter().map(|s| s.len).sum();
        if w_total == 0 {
            tracing::debug!("virtio-blk: chain without a status byte");
            return Ok(0);
        }
        let data_w = w_total - 1;
        let mut status_byte = [0u8; 1];
        // The status byte must be writable before anything else happens.
        if copy_to_guest(mem, &writable, data_w, &status_byte).is_err() {
            tracing::debug!("virtio-blk: status byte outside guest memory");
            return Ok(0);
        }
        let (status, written) = match self.execute(mem, &readable, &writable, data_w, order_ok) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err((ReqError::Bad(e), written)) => {
                tracing::debug!(error = %e, "virtio-blk: request refused");
                (VIRTIO_BLK_S_IOERR, written)
            }
            Err((ReqError::Unsupp, written)) => (VIRTIO_BLK_S_UNSUPP, written),
            Err((ReqError::Host(e), _)) => return Err(e),
        };
        status_byte[0] = status;
        // Checked above; cannot fail now.
        let _ = copy_to_guest(mem, &writable, data_w, &status_byte);
        Ok(u32::try_from(written + 1).unwrap_or(u32::MAX))
    }

    /// The error of a failed host operation.
    fn host_error(&self, op: DiskOp, source: std::io::Error) -> ReqError {
        ReqError::Host(HostIoError {
            path: self.config.path.clone(),
            op,
            source: std::sync::Arc::new(source),
        })
    }

    /// Run the request; Ok/Err carry the number of data bytes written to
    /// guest memory.
    fn execute(
        &mut self,
        mem: &GuestMemory,
        readable: &[Seg],
        writable: &[Seg],
        data_w: u64,
        order_ok: bool,
    ) -> Result<u64, (ReqError, u64)> {
        let io = |e: BadRequest| (ReqError::Bad(e), 0);
        if !order_ok {
            return Err(io(BadRequest::Order));
        }
        let r_total: u64 = readable.iter().map(|s| s.len).sum();
        if r_total < HEADER_SIZE {
            return Err(io(BadRequest::ShortHeader));
        }
        let mut hdr = [0u8; HEADER_SIZE as usize];
        copy_from_guest(mem, readable, 0, &mut hdr).map_err(io)?;
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        match req_type {
            VIRTIO_BLK_T_IN => {
                let off = self.check_range(sector, data_w).map_err(io)?;
                check_segments(mem, writable).map_err(io)?;
                self.read_to_guest(mem, writable, off, data_w)
            }
            VIRTIO_BLK_T_OUT => {
                if self.config.read_only {
                    return Err(io(BadRequest::ReadOnly));
                }
                let len = r_total - HEADER_SIZE;
                let off = self.check_range(sector, len).map_err(io)?;
                check_segments(mem, readable).map_err(io)?;
                self.write_from_guest(mem, readable, off, len)
                    .map_err(|e| (e, 0))?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.config.read_only {
                    if let Err(e) = self.file.sync_data() {
                        return Err((self.host_error(DiskOp::Flush, e), 0));
                    }
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                id[..self.serial.len()].copy_from_slice(self.serial.as_bytes());
                let n = data_w.min(ID_BYTES as u64);
                copy_to_guest(mem, writable, 0, &id[..n as usize]).map_err(io)?;
                Ok(n)
            }
            other => {
                tracing::debug!(req_type = other, "virtio-blk: unsupported request");
                Err((ReqError::Unsupp, 0))
            }
        }
    }

    /// Byte offset of `sector` if `[sector, sector + len)` is on the disk and
    /// `len` is a whole number of sectors.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, BadRequest> {
        if len & (SECTOR_SIZE - 1) != 0 {
            return Err(BadRequest::NotSectors { len });
        }
        let past = BadRequest::PastEnd { sector, len };
        let end = sector.checked_add(len / SECTOR_SIZE).ok_or(past)?;
        if end > self.capacity_sectors {
            return Err(past);
        }
        Ok(sector * SECTOR_SIZE)
    }

    fn read_to_guest(
        &mut self,
        mem: &GuestMemory,
        segs: &[Seg],
        off: u64,
        len: u64,
    ) -> Result<u64, (ReqError, u64)> {
        let mut buf = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min((len - done) as usize);
            if let Err(e) = self.file.read_exact_at(&mut buf[..n], off + done) {
                let op = DiskOp::Read { offset: off, len };
                return Err((self.host_error(op, e), done));
            }
            if let Err(e) = copy_to_guest(mem, segs, done, &buf[..n]) {
                return Err((e.into(), done));
            }
            done += n as u64;
        }
        Ok(done)
    }

    fn write_from_guest(
        &mut self,
        mem: &GuestMemory,
        segs: &[Seg],
        off: u64,
        len: u64,
    ) -> Result<(), ReqError> {
        if len == 0 {
            return Ok(());
        }
        let mut buf = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0u64;
        let mut result = Ok(());
        while done < len {
            let n = CHUNK.min((len - done) as usize);
            if let Err(e) = copy_from_guest(mem, segs, HEADER_SIZE + done, &mut buf[..n]) {
                result = Err(e.into());
                break;
            }
            if let Err(e) = self.file.write_all_at(&buf[..n], off + done) {
                result = Err(self.host_error(DiskOp::Write { offset: off, len }, e));
                break;
            }
            done += n as u64;
        }
        // After the data (see `DirtyBlocks`), and even after a partial write.
        self.mark_dirty_range(off, len);
        result
    }

    fn num_blocks(&self) -> u64 {
        (self.capacity_sectors * SECTOR_SIZE).div_ceil(DIRTY_BLOCK_SIZE)
    }

    fn mark_dirty_range(&mut self, off: u64, len: u64) {
        let first = off / DIRTY_BLOCK_SIZE;
        let last = (off + len - 1) / DIRTY_BLOCK_SIZE;
        self.dirty.mark_range(first, last);
    }

    /// The shared dirty-block record (for storage migration from another
    /// thread).
    pub fn dirty_blocks(&self) -> DirtyBlocks {
        self.dirty.clone()
    }

    /// Indices of the [`DIRTY_BLOCK_SIZE`] blocks the guest wrote since the
    /// last call (ascending), and clear the record. Blocks written with
    /// [`Self::write_block`] are not recorded.
    pub fn take_dirty_blocks(&mut self) -> Vec<u64> {
        self.dirty.take()
    }

    /// Mark every block dirty (e.g. before copying the whole disk).
    pub fn mark_all_dirty(&mut self) {
        self.dirty.mark_all();
    }

    /// Length in bytes of block `index` (the last block may be short).
    fn block_len(&self, index: u64) -> Result<usize, BlockError> {
        let blocks = self.num_blocks();
        if index >= blocks {
            return Err(BlockError::BlockOutOfRange {
                path: self.config.path.clone(),
                index,
                blocks,
            });
        }
        let size = self.capacity_sectors * SECTOR_SIZE;
        Ok((size - index * DIRTY_BLOCK_SIZE).min(DIRTY_BLOCK_SIZE) as usize)
    }

    /// Read block `index` of the disk into `buf` (resized to the block's
    /// length: [`DIRTY_BLOCK_SIZE`], less for the last block).
    pub fn read_block(&self, index: u64, buf: &mut Vec<u8>) -> Result<(), BlockError> {
        let len = self.block_len(index)?;
        buf.clear();
        buf.resize(len, 0);
        self.file
            .read_exact_at(buf, index * DIRTY_BLOCK_SIZE)
            .map_err(|source| BlockError::Io {
                path: self.config.path.clone(),
                source,
            })
    }

    /// Write block `index` of the disk (`data` must be exactly the block's
    /// length, see [`Self::read_block`]). Not recorded as dirty. Fails on a
    /// read-only disk.
    pub fn write_block(&mut self, index: u64, data: &[u8]) -> Result<(), BlockError> {
        let len = self.block_len(index)?;
        if self.config.read_only {
            return Err(BlockError::ReadOnly {
                path: self.config.path.clone(),
            });
        }
        if data.len() != len {
            return Err(BlockError::BlockLength {
                path: self.config.path.clone(),
                index,
                expected: len,
                got: data.len(),
            });
        }
        self.file
            .write_all_at(data, index * DIRTY_BLOCK_SIZE)
            .map_err(|source| BlockError::Io {
                path: self.config.path.clone(),
                source,
            })
    }

    /// `fdatasync` the image (no-op for a read-only disk).
    pub fn flush(&mut self) -> Result<(), BlockError> {
        if self.config.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|source| BlockError::Io {
            path: self.config.path.clone(),
            source,
        })
    }

    /// Switch the device to another image holding the same data (a disk
    /// moved on the host while the guest was stopped): opens `config.path`
    /// as [`Self::new`] does, checks that its size is exactly the disk's
    /// size (capacity × 512) and swaps it in. The guest sees nothing: the
    /// capacity, transport state, serial and dirty-block record are kept;
    /// `config.read_only` must be the device's. On error the device keeps
    /// its current image. The old image is closed, not flushed.
    pub fn replace_backing(&mut self, config: BlockConfig) -> Result<(), BlockError> {
        let path = config.path.clone();
        if config.read_only != self.config.read_only {
            return Err(BlockError::Open {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the replacement image must have the same read-only mode",
                ),
            });
        }
        let (file, lock, len) = open_image(&config)?;
        let expected = self.capacity_sectors * SECTOR_SIZE;
        if len != expected {
            return Err(BlockError::SizeMismatch {
                path,
                expected,
                got: len,
            });
        }
        self.file = file;
        self.lock = lock;
        self.config = config;
        Ok(())
    }

    /// The lock on the image (a migration onto shared storage lets it go
    /// at the switchover, and takes it back if the switchover fails).
    pub fn image_lock(&self) -> &ImageLock {
        &self.lock
    }
}

/// Opens and locks the image at `config.path` (read-only and shared when
/// asked, else exclusive: [`crate::image`]) and returns it with its length
/// in bytes; errors name the path (missing file, permission, a directory,
/// another process holding the image, an unsizable image).
fn open_image(config: &BlockConfig) -> Result<(File, ImageLock, u64), BlockError> {
    let path = &config.path;
    let meta = std::fs::metadata(path).map_err(|source| BlockError::Open {
        path: path.clone(),
        source,
    })?;
    if meta.is_dir() {
        return Err(BlockError::IsDirectory { path: path.clone() });
    }
    let access = if config.read_only {
        Access::Read
    } else {
        Access::Write
    };
    let (file, lock) = Image::open(path, access)
        .map_err(|e| match e {
            ImageError::Open { path, source } => BlockError::Open { path, source },
            other => BlockError::Image(other),
        })?
        .into_parts();
    // Seeking to the end also sizes block devices, whose metadata length is 0.
    let len = (&file)
        .seek(SeekFrom::End(0))
        .map_err(|source| BlockError::Size {
            path: path.clone(),
            source,
        })?;
    Ok((file, lock, len))
}

/// Every segment lies in guest memory.
fn check_segments(mem: &GuestMemory, segs: &[Seg]) -> Result<(), BadRequest> {
    for s in segs {
        let ok = usize::try_from(s.len)
            .map(|len| len == 0 || GuestMemoryBackend::check_range(mem, s.addr, len))
            .unwrap_or(false);
        if !ok {
            return Err(BadRequest::OutsideMemory {
                addr: s.addr.0,
                len: s.len,
            });
        }
    }
    Ok(())
}

/// Apply `f(guest address, range in buf)` to the part of the chain's buffers
/// `segs` that covers bytes `[offset, offset + len)` of their concatenation.
fn for_each_piece(
    segs: &[Seg],
    offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), BadRequest>,
) -> Result<(), BadRequest> {
    let mut pos = 0u64; // start of the current segment in the concatenation
    let mut done = 0usize;
    for s in segs {
        if done == len {
            break;
        }
        let want = offset + done as u64;
        if want < pos + s.len {
            let in_seg = want - pos;
            let n = ((s.len - in_seg) as usize).min(len - done);
            let addr = s
                .addr
                .checked_add(in_seg)
                .ok_or(BadRequest::OutsideMemory {
                    addr: s.addr.0,
                    len: s.len,
                })?;
            f(addr, done..done + n)?;
            done += n;
        }
        pos += s.len;
    }
    if done == len {
        Ok(())
    } else {
        // The chain's buffers are shorter than the data.
        Err(BadRequest::OutsideMemory {
            addr: offset,
            len: len as u64,
        })
    }
}

fn outside(addr: GuestAddress, r: &std::ops::Range<usize>) -> BadRequest {
    BadRequest::OutsideMemory {
        addr: addr.0,
        len: r.len() as u64,
    }
}

fn copy_to_guest(
    mem: &GuestMemory,
    segs: &[Seg],
    offset: u64,
    buf: &[u8],
) -> Result<(), BadRequest> {
    for_each_piece(segs, offset, buf.len(), |addr, r| {
        let bad = outside(addr, &r);
        mem.write_slice(&buf[r], addr).map_err(|_| bad)
    })
}

fn copy_from_guest(
    mem: &GuestMemory,
    segs: &[Seg],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), BadRequest> {
    let len = buf.len();
    for_each_piece(segs, offset, len, |addr, r| {
        let bad = outside(addr, &r);
        mem.read_slice(&mut buf[r], addr).map_err(|_| bad)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{reg, status, INT_VRING, MMIO_MAGIC, VENDOR_ID};
    use std::fs::OpenOptions;
    use std::sync::atomic::{AtomicU32, Ordering};
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryRegion;

    pub(crate) const MEM_SIZE: usize = 16 << 20;
    pub(crate) const DESC: u64 = 0x1000;
    pub(crate) const AVAIL: u64 = 0x3000;
    pub(crate) const USED: u64 = 0x4000;
    pub(crate) const HDR: u64 = 0x10000;
    pub(crate) const STATUS: u64 = 0x20000;
    pub(crate) const DATA: u64 = 0x100000;
    pub(crate) const DATA2: u64 = 0x200000;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    pub(crate) fn new_mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// A temporary image file, removed on drop.
    pub(crate) struct TempImage {
        pub path: PathBuf,
    }

    impl TempImage {
        pub(crate) fn new(name: &str, len: u64) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "tandem-vblk-{}-{}-{name}.img",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let f = File::create(&path).unwrap();
            f.set_len(len).unwrap();
            // Recognizable contents: byte i of sector s is (s + i) as u8.
            let mut buf = vec![0u8; len as usize];
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((i / 512) + (i % 512)) as u8;
            }
            f.write_all_at(&buf, 0).unwrap();
            TempImage { path }
        }

        pub(crate) fn config(&self, read_only: bool) -> BlockConfig {
            BlockConfig {
                path: self.path.clone(),
                read_only,
            }
        }

        pub(crate) fn contents(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    pub(crate) fn w32(dev: &mut VirtioBlock, mem: &GuestMemory, off: u64, v: u32) {
        dev.mmio_write(off, &v.to_le_bytes(), mem)
            .expect("no host I/O error");
    }

    pub(crate) fn r32(dev: &mut VirtioBlock, off: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The guest side: builds descriptor tables and rings in guest memory
    /// exactly as a driver does, through the MMIO registers.
    #[derive(Debug, Clone)]
    pub(crate) struct Driver {
        pub size: u16,
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
        pub next_desc: u16,
        pub avail_idx: u16,
        pub last_used: u16,
    }

    impl Driver {
        /// Virtio initialization (§3.1.1), accepting every offered feature.
        pub(crate) fn setup(dev: &mut VirtioBlock, mem: &GuestMemory, size: u16) -> Driver {
            Self::setup_at(dev, mem, size, DESC, AVAIL, USED)
        }

        /// As [`Self::setup`], with the rings at the given addresses.
        pub(crate) fn setup_at(
            dev: &mut VirtioBlock,
            mem: &GuestMemory,
            size: u16,
            desc: u64,
            avail: u64,
            used: u64,
        ) -> Driver {
            w32(dev, mem, reg::STATUS, 0);
            w32(dev, mem, reg::STATUS, status::ACKNOWLEDGE);
            w32(dev, mem, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
            w32(dev, mem, reg::DEVICE_FEATURES_SEL, 0);
            let lo = r32(dev, reg::DEVICE_FEATURES);
            w32(dev, mem, reg::DEVICE_FEATURES_SEL, 1);
            let hi = r32(dev, reg::DEVICE_FEATURES);
            w32(dev, mem, reg::DRIVER_FEATURES_SEL, 0);
            w32(dev, mem, reg::DRIVER_FEATURES, lo);
            w32(dev, mem, reg::DRIVER_FEATURES_SEL, 1);
            w32(dev, mem, reg::DRIVER_FEATURES, hi);
            let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
            w32(dev, mem, reg::STATUS, s);
            assert_eq!(r32(dev, reg::STATUS), s, "device refused FEATURES_OK");
            w32(dev, mem, reg::QUEUE_SEL, 0);
            assert_eq!(r32(dev, reg::QUEUE_READY), 0);
            assert!(r32(dev, reg::QUEUE_NUM_MAX) >= u32::from(size));
            w32(dev, mem, reg::QUEUE_NUM, u32::from(size));
            w32(dev, mem, reg::QUEUE_DESC_LOW, desc as u32);
            w32(dev, mem, reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
            w32(dev, mem, reg::QUEUE_DRIVER_LOW, avail as u32);
            w32(dev, mem, reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
            w32(dev, mem, reg::QUEUE_DEVICE_LOW, used as u32);
            w32(dev, mem, reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
            w32(dev, mem, reg::QUEUE_READY, 1);
            assert_eq!(r32(dev, reg::QUEUE_READY), 1);
            w32(dev, mem, reg::STATUS, s | status::DRIVER_OK);
            assert_eq!(r32(dev, reg::STATUS), s | status::DRIVER_OK);
            Driver {
                size,
                desc,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
            }
        }

        /// Write descriptor `index` raw.
        pub(crate) fn write_desc(
            &self,
            mem: &GuestMemory,
            index: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            let a = GuestAddress(self.desc + 16 * u64::from(index));
            mem.write_obj(addr, a).unwrap();
            mem.write_obj(len, a.unchecked_add(8)).unwrap();
            mem.write_obj(flags, a.unchecked_add(12)).unwrap();
            mem.write_obj(next, a.unchecked_add(14)).unwrap();
        }

        /// Put `head` in the available ring and publish it (no notify).
        pub(crate) fn publish(&mut self, mem: &GuestMemory, head: u16) {
            let slot = u64::from(self.avail_idx % self.size);
            mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        /// Post a chain of `(addr, len, device_writable)` buffers; returns
        /// its head. Does not notify.
        pub(crate) fn post(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let idx = (head + i as u16) % self.size;
                let last = i + 1 == bufs.len();
                let mut flags = if write { F_WRITE } else { 0 };
                if !last {
                    flags |= F_NEXT;
                }
                self.write_desc(mem, idx, addr, len, flags, (idx + 1) % self.size);
            }
            self.next_desc = (head + bufs.len() as u16) % self.size;
            self.publish(mem, head);
            head
        }

        pub(crate) fn notify(&self, dev: &mut VirtioBlock, mem: &GuestMemory) {
            w32(dev, mem, reg::QUEUE_NOTIFY, 0);
        }

        /// Next used element `(id, len)`, if any.
        pub(crate) fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u32, u32)> {
            let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            if idx == self.last_used {
                return None;
            }
            let slot = u64::from(self.last_used % self.size);
            let a = GuestAddress(self.used + 4 + 8 * slot);
            let id: u32 = mem.read_obj(a).unwrap();
            let len: u32 = mem.read_obj(a.unchecked_add(4)).unwrap();
            self.last_used = self.last_used.wrapping_add(1);
            Some((id, len))
        }

        /// Write a request header for chain number `slot`; returns its address.
        pub(crate) fn header(mem: &GuestMemory, slot: u64, req_type: u32, sector: u64) -> u64 {
            let a = HDR + 0x100 * slot;
            mem.write_obj(req_type, GuestAddress(a)).unwrap();
            mem.write_obj(0u32, GuestAddress(a + 4)).unwrap();
            mem.write_obj(sector, GuestAddress(a + 8)).unwrap();
            a
        }

        /// A whole request: header, optional data buffer `(addr, len)`
        /// (device-writable for IN and GET_ID), status. Notifies, expects one
        /// completion of that chain, acknowledges the interrupt. Returns
        /// `(status, used len)`.
        pub(crate) fn request(
            &mut self,
            dev: &mut VirtioBlock,
            mem: &GuestMemory,
            req_type: u32,
            sector: u64,
            data: Option<(u64, u32)>,
        ) -> (u8, u32) {
            let hdr = Self::header(mem, 0, req_type, sector);
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let dev_writes = req_type != VIRTIO_BLK_T_OUT;
            let mut bufs = vec![(hdr, 16, false)];
            if let Some((addr, len)) = data {
                bufs.push((addr, len, dev_writes));
            }
            bufs.push((STATUS, 1, true));
            let head = self.post(mem, &bufs);
            self.notify(dev, mem);
            let (id, len) = self.pop_used(mem).expect("request completed");
            assert_eq!(id, u32::from(head));
            assert!(self.pop_used(mem).is_none());
            assert!(dev.interrupt_level());
            let isr = r32(dev, reg::INTERRUPT_STATUS);
            assert_eq!(isr, INT_VRING);
            w32(dev, mem, reg::INTERRUPT_ACK, isr);
            assert!(!dev.interrupt_level());
            (mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }
    }

    fn expected_sector(s: u64) -> Vec<u8> {
        (0..512u64).map(|i| (s + i) as u8).collect()
    }

    fn setup(name: &str, len: u64, ro: bool) -> (TempImage, VirtioBlock, GuestMemory, Driver) {
        let img = TempImage::new(name, len);
        let mut dev = VirtioBlock::new(img.config(ro)).unwrap();
        let mem = new_mem();
        let drv = Driver::setup(&mut dev, &mem, 16);
        (img, dev, mem, drv)
    }

    fn dirty(mem: &GuestMemory, addr: u64) -> bool {
        let r = mem.find_region(GuestAddress(addr)).unwrap();
        r.bitmap()
            .dirty_at((addr - r.start_addr().raw_value()) as usize)
    }

    #[test]
    fn identification_and_config_space() {
        let img = TempImage::new("ident", 1 << 20);
        let mut dev = VirtioBlock::new(img.config(false)).unwrap();
        assert_eq!(r32(&mut dev, reg::MAGIC), MMIO_MAGIC);
        assert_eq!(r32(&mut dev, reg::VERSION), 2);
        assert_eq!(r32(&mut dev, reg::DEVICE_ID), 2);
        assert_eq!(r32(&mut dev, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(r32(&mut dev, reg::QUEUE_NUM_MAX), 256);
        assert_eq!(dev.capacity_sectors(), 2048);
        // capacity as one 8-byte and as two 4-byte reads
        let mut b = [0u8; 8];
        dev.mmio_read(0x100, &mut b);
        assert_eq!(u64::from_le_bytes(b), 2048);
        assert_eq!(r32(&mut dev, 0x100), 2048);
        assert_eq!(r32(&mut dev, 0x104), 0);
        assert_eq!(r32(&mut dev, 0x10c), SEG_MAX);
        assert_eq!(r32(&mut dev, 0x114), 512);
        let mut one = [0u8; 1];
        dev.mmio_read(0x101, &mut one);
        assert_eq!(one[0], 8); // 2048 = 0x800
        assert_eq!(r32(&mut dev, 0x200), 0);
        assert_eq!(r32(&mut dev, 0xffc), 0);
        // No shared memory regions.
        assert_eq!(r32(&mut dev, reg::SHM_LEN_LOW), u32::MAX);
        // Bad widths read as zero.
        let mut two = [0xffu8; 2];
        dev.mmio_read(reg::MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
    }

    #[test]
    fn feature_negotiation_and_status() {
        let img = TempImage::new("features", 1 << 20);
        let mut dev = VirtioBlock::new(img.config(false)).unwrap();
        let mem = new_mem();
        w32(&mut dev, &mem, reg::DEVICE_FEATURES_SEL, 0);
        let lo = r32(&mut dev, reg::DEVICE_FEATURES);
        w32(&mut dev, &mem, reg::DEVICE_FEATURES_SEL, 1);
        let hi = r32(&mut dev, reg::DEVICE_FEATURES);
        w32(&mut dev, &mem, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(r32(&mut dev, reg::DEVICE_FEATURES), 0);
        let f = (u64::from(hi) << 32) | u64::from(lo);
        assert_eq!(
            f,
            VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        );

        // Driver features before DRIVER are ignored.
        w32(&mut dev, &mem, reg::DRIVER_FEATURES, lo);
        assert_eq!(dev.transport().driver_features(), 0);

        // Without VERSION_1 the device refuses FEATURES_OK.
        w32(&mut dev, &mem, reg::STATUS, status::ACKNOWLEDGE);
        w32(
            &mut dev,
            &mem,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        w32(&mut dev, &mem, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut dev, &mem, reg::DRIVER_FEATURES, lo);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w32(&mut dev, &mem, reg::STATUS, s);
        assert_eq!(r32(&mut dev, reg::STATUS) & status::FEATURES_OK, 0);

        // A feature the device does not offer: refused too.
        w32(&mut dev, &mem, reg::DRIVER_FEATURES_SEL, 1);
        w32(&mut dev, &mem, reg::DRIVER_FEATURES, hi | 0x10);
        w32(&mut dev, &mem, reg::STATUS, s);
        assert_eq!(r32(&mut dev, reg::STATUS) & status::FEATURES_OK, 0);

        // The right set is accepted.
        w32(&mut dev, &mem, reg::DRIVER_FEATURES, hi);
        w32(&mut dev, &mem, reg::STATUS, s);
        assert_eq!(r32(&mut dev, reg::STATUS), s);
        assert_eq!(dev.transport().driver_features(), f);
        // Features are frozen after FEATURES_OK.
        w32(&mut dev, &mem, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut dev, &mem, reg::DRIVER_FEATURES, 0);
        assert_eq!(dev.transport().driver_features(), f);

        // Reset clears everything.
        w32(&mut dev, &mem, reg::STATUS, 0);
        assert_eq!(r32(&mut dev, reg::STATUS), 0);
        assert_eq!(dev.transport().driver_features(), 0);

        // The full sequence works, and a second reset takes the queue down.
        let _drv = Driver::setup(&mut dev, &mem, 16);
        assert!(dev.transport().is_live());
        assert_eq!(r32(&mut dev, reg::QUEUE_NUM), 16);
        assert_eq!(r32(&mut dev, reg::QUEUE_DESC_LOW), DESC as u32);
        w32(&mut dev, &mem, reg::STATUS, 0);
        assert_eq!(r32(&mut dev, reg::QUEUE_READY), 0);
        assert!(!dev.transport().is_live());
        // Other queues do not exist.
        w32(&mut dev, &mem, reg::QUEUE_SEL, 1);
        assert_eq!(r32(&mut dev, reg::QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn read_only_device_offers_ro() {
        let img = TempImage::new("rofeat", 4096);
        let mut dev = VirtioBlock::new(img.config(true)).unwrap();
        w32(&mut dev, &new_mem(), reg::DEVICE_FEATURES_SEL, 0);
        assert_ne!(
            u64::from(r32(&mut dev, reg::DEVICE_FEATURES)) & VIRTIO_BLK_F_RO,
            0
        );
    }

    #[test]
    fn write_then_read_back() {
        let (img, mut dev, mem, mut drv) = setup("rw", 1 << 20, false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        let (st, len) = drv.request(&mut dev, &mem, VIRTIO_BLK_T_OUT, 3, Some((DATA, 1024)));
        assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1));
        let file = img.contents();
        assert_eq!(&file[3 * 512..5 * 512], &pattern[..]);
        assert_eq!(&file[2 * 512..3 * 512], &expected_sector(2)[..]);
        assert_eq!(&file[5 * 512..6 * 512], &expected_sector(5)[..]);

        // Read back into a fresh buffer; the device's writes reach the
        // dirty bitmap.
        assert!(!dirty(&mem, DATA2));
        let (st, len) = drv.request(&mut dev, &mem, VIRTIO_BLK_T_IN, 3, Some((DATA2, 1024)));
        assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1025));
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(DATA2)).unwrap();
        assert_eq!(back, pattern);
        assert!(dirty(&mem, DATA2), "read data page not marked dirty");
        assert!(dirty(&mem, USED), "used ring page not marked dirty");
        assert!(!dirty(&mem, DATA2 + 0x10000), "untouched page marked dirty");

        // Unwritten sectors read back the original contents.
        let (st, _) = drv.request(&mut dev, &mem, VIRTIO_BLK_T_IN, 100, Some((DATA2, 512)));
        assert_eq!(st, VIRTIO_BLK_S_OK);
        let mut s = vec![0u8; 512];
        mem.read_slice(&mut s, GuestAddress(DATA2)).unwrap();
        assert_eq!(s, expected_sector(100));
    }

    #[test]
    fn scattered_buffers_and_many_requests() {
        // Header split over two descriptors, data over three, as allowed
        // without framing assumptions; and more requests than the ring
        // holds, so indices wrap.
        let (img, mut dev, mem, mut drv) = setup("sg", 1 << 20, false);
        for round in 0..40u64 {
            let hdr = Driver::header(&mem, 0, VIRTIO_BLK_T_OUT, round);
            let data: Vec<u8> = (0..512u64).map(|i| (i ^ round) as u8).collect();
            mem.write_slice(&data[..100], GuestAddress(DATA)).unwrap();
            mem.write_slice(&data[100..400], GuestAddress(DATA + 0x1000))
                .unwrap();
            mem.write_slice(&data[400..], GuestAddress(DATA + 0x3000))
                .unwrap();
            drv.post(
                &mem,
                &[
                    (hdr, 10, false),
                    (hdr + 10, 6, false),
                    (DATA, 100, false),
                    (DATA + 0x1000, 300, false),
                    (DATA + 0x3000, 112, false),
                    (STATUS, 1, true),
                ],
            );
            drv.notify(&mut dev, &mem);
            assert_eq!(drv.pop_used(&mem).unwrap().1, 1);
            let st: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
            assert_eq!(st, VIRTIO_BLK_S_OK);
            let file = img.contents();
            assert_eq!(&file[round as usize * 512..][..512], &data[..]);
        }
        // Read with data and status in one writable descriptor.
        let hdr = Driver::header(&mem, 0, VIRTIO_BLK_T_IN, 7);
        drv.post(&mem, &[(hdr, 16, false), (DATA2, 513, true)]);
        drv.notify(&mut dev, &mem);
        assert_eq!(drv.pop_used(&mem).unwrap().1, 513);
        let mut buf = vec![0u8; 513];
        mem.read_slice(&mut buf, GuestAddress(DATA2)).unwrap();
        assert_eq!(buf[512], VIRTIO_BLK_S_OK);
        let expect: Vec<u8> = (0..512u64).map(|i| (i ^ 7) as u8).collect();
        assert_eq!(&buf[..512], &expect[..]);
    }

    #[test]
    fn several_chains_per_notify() {
        let (_img, mut dev, mem, mut drv) = setup("batch", 1 << 20, false);
        let mut heads = Vec::new();
        for i in 0..4u64 {
            let hdr = Driver::header(&mem, i, VIRTIO_BLK_T_IN, i);
            heads.push(drv.post(
                &mem,
                &[
                    (hdr, 16, false),
                    (DATA + i * 0x1000, 512, true),
                    (STATUS + i, 1, true),
                ],
            ));
        }
        drv.notify(&mut dev, &mem);
        for (i, head) in heads.iter().enumerate() {
            assert_eq!(drv.pop_used(&mem), Some((u32::from(*head), 513)));
            let mut s = vec![0u8; 512];
            mem.read_slice(&mut s, GuestAddress(DATA + i as u64 * 0x1000))
                .unwrap();
            assert_eq!(s, expected_sector(i as u64));
        }
        assert!(drv.pop_used(&mem).is_none());
        assert_eq!(r32(&mut dev, reg::INTERRUPT_STATUS), INT_VRING);
    }

    #[test]
    fn flush_and_get_id() {
        let (_img, mut dev, mem, mut drv) = setup("flush", 1 << 20, false);
        assert_eq!(
            drv.request(&mut dev, &mem, VIRTIO_BLK_T_FLUSH, 0, None),
            (VIRTIO_BLK_S_OK, 1)
        );
        mem.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
        assert_eq!(
            drv.request(&mut dev, &mem, VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 20))),
            (VIRTIO_BLK_S_OK, 21)
        );
        let mut id = [0u8; 21];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..11], b"tandem-disk");
        assert!(id[11..20].iter().all(|&b| b == 0));
        assert_eq!(id[20], 0xaa, "wrote past the buffer");

        dev.set_serial("a-very-long-serial-number-indeed");
        assert_eq!(dev.serial(), "a-very-long-serial-n");
        mem.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
        assert_eq!(
            drv.request(&mut dev, &mem, VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 5))),
            (VIRTIO_BLK_S_OK, 6)
        );
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..5], b"a-ver");
        assert_eq!(id[5], 0xaa);

        // Unsupported types.
        for t in [11, 13, 2, 0xdead] {
            assert_eq!(
                drv.request(&mut dev, &mem, t, 0, None),
                (VIRTIO_BLK_S_UNSUPP, 1)
            );
        }
        dev.flush().unwrap();
    }

    #[test]
    fn read_only_refuses_writes() {
        let (img, mut dev, mem, mut drv) = setup("ro", 64 * 1024, true);
        let before = img.contents();
        mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(
            drv.request(&mut dev, &mem, VIRTIO_BLK_T_OUT, 0, Some((DATA, 512))),
            (VIRTIO_BLK_S_IOERR, 1)
        );
        assert_eq!(img.contents(), before);
        assert!(dev.take_dirty_blocks().is_empty());
        // Reads and flushes work.
        assert_eq!(
            drv.request(&mut dev, &mem, VIRTIO_BLK_T_IN, 1, Some((DATA, 512)))
                .0,
            VIRTIO_BLK_S_OK
        );
        assert_eq!(
            drv.request(&mut dev, &mem, VIRTIO_BLK_T_FLUSH, 0, None).0,
            VIRTIO_BLK_S_OK
        );
        assert!(matches!(
            dev.write_block(0, &vec![0; 64 * 1024]),
            Err(BlockError::ReadOnly { .. })
        ));
        assert_eq!(img.contents(), before);
    }

    #[test]
    fn out_of_range_and_bad_lengths() {
        let (img, mut dev, mem, mut drv) = setup("range", 8 * 512, false);
        let before = img.contents();
        let cases: [(u32, u64, u32); 6] = [
            (VIRTIO_BLK_T_IN, 7, 1024),
            (VIRTIO_BLK_T_OUT, 7, 1024),
            (VIRTIO_BLK_T_IN, 8, 512),
            (VIRTIO_BLK_T_OUT, u64::MAX, 512),
            (VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, 512),
            (VIRTIO_BLK_T_OUT, 0, 100),
        ];
        for (t, sector, len) in cases {
            let (st, _) = drv.request(&mut dev, &mem, t, sector, Some((DATA, len)));
            assert_eq!(st, VIRTIO_BLK_S_IOERR, "type {t} sector {sector} len {len}");
        }
        assert_eq!(img.contents(), before);
        // The last sector itself is fine.
        assert_eq!(
            drv.request(&mut dev, &mem, VIRTIO_BLK_T_IN, 7, Some((DATA, 512))),
            (VIRTIO_BLK_S_OK, 513)
        );
    }

    #[test]
    fn malformed_chains_do_not_panic() {
        let (img, mut dev, mem, mut drv) = setup("malformed", 1 << 20, false);
        let before = img.contents();
        let hdr = Driver::header(&mem, 0, VIRTIO_BLK_T_IN, 0);

        // No writable descriptor: returned with length 0.
        drv.post(&mem, &[(hdr, 16, false)]);
        drv.notify(&mut dev, &mem);
        assert_eq!(drv.pop_used(&mem).unwrap().1, 0);

        // Status outside guest memory: length 0.
        drv.post(&mem, &[(hdr, 16, false), (1 << 40, 1, true)]);
        drv.notify(&mut dev, &mem);
        assert_eq!(drv.pop_used(&mem).unwrap().1, 0);

        let check_ioerr = |drv: &mut Driver, dev: &mut VirtioBlock, bufs: &[(u64, u32, bool)]| {
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            drv.post(&mem, bufs);
            drv.notify(dev, &mem);
            assert!(drv.pop_used(&mem).is_some());
            let st: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
            assert_eq!(st, VIRTIO_BLK_S_IOERR, "{bufs:x?}");
        };
        // Header too short.
        check_ioerr(&mut drv, &mut dev, &[(hdr, 8, false), (STATUS, 1, true)]);
        // Data buffer outside guest memory (read and write).
        check_ioerr(
            &mut drv,
            &mut dev,
            &[(hdr, 16, false), (1 << 40, 512, true), (STATUS, 1, true)],
        );
        let whdr = Driver::header(&mem, 1, VIRTIO_BLK_T_OUT, 0);
        check_ioerr(
            &mut drv,
            &mut dev,
            &[(whdr, 16, false), (1 << 40, 512, false), (STATUS, 1, true)],
        );
        // Data straddling the end of guest memory.
        check_ioerr(
            &mut drv,
            &mut dev,
            &[
                (hdr, 16, false),
                (MEM_SIZE as u64 - 256, 512, true),
                (STATUS, 1, true),
            ],
        );
        // Readable after writable.
        check_ioerr(
            &mut drv,
            &mut dev,
            &[
                (whdr, 16, false),
                (STATUS, 1, true),
                (DATA, 512, false),
                (STATUS, 1, true),
            ],
        );
        // Huge lengths: past the disk and guest memory...
        check_ioerr(
            &mut drv,
            &mut dev,
            &[
                (hdr, 16, false),
                (DATA, 0xfff0_0000, true),
                (STATUS, 1, true),
            ],
        );
        // ...and overflowing the chain's 32-bit total: the chain ends there
        // (virtio-queue), leaving no status byte: returned with length 0.
        drv.post(
            &mem,
            &[(hdr, 16, false), (DATA, u32::MAX, true), (STATUS, 1, true)],
        );
        drv.notify(&mut dev, &mem);
        assert_eq!(drv.pop_used(&mem).unwrap().1, 0);

        // A descriptor loop (0 -> 1 -> 0 ...) and a next index past the table:
        // bounded, no panic.
        drv.write_desc(&mem, 0, hdr, 16, F_NEXT, 1);
        drv.write_desc(&mem, 1, STATUS, 1, F_NEXT | F_WRITE, 0);
        drv.publish(&mem, 0);
        drv.write_desc(&mem, 2, hdr, 16, F_NEXT, 999);
        drv.publish(&mem, 2);
        // A head index past the table: cannot be returned, skipped.
        drv.publish(&mem, 500);
        drv.notify(&mut dev, &mem);
        assert!(drv.pop_used(&mem).is_some());
        assert!(drv.pop_used(&mem).is_some());
        assert!(drv.pop_used(&mem).is_none());
        assert!(!dev.transport().status() & status::NEEDS_RESET != 0);
        assert_eq!(img.contents(), before);

        // The device still works afterwards (the skipped head consumed an
        // available entry but no used entry).
        drv.next_desc = 3;
        let (st, _) = drv.request(&mut dev, &mem, VIRTIO_BLK_T_IN, 1, Some((DATA, 512)));
        assert_eq!(st, VIRTIO_BLK_S_OK);

        // An available index running ahead by more than the queue size:
        // DEVICE_NEEDS_RESET, nothing consumed, and a config interrupt.
        w32(&mut dev, &mem, reg::INTERRUPT_ACK, 3);
        mem.write_obj(drv.avail_idx.wrapping_add(17), GuestAddress(AVAIL + 2))
            .unwrap();
        drv.notify(&mut dev, &mem);
        assert_ne!(r32(&mut dev, reg::STATUS) & status::NEEDS_RESET, 0);
        assert!(drv.pop_used(&mem).is_none());
        assert_eq!(r32(&mut dev, reg::INTERRUPT_STATUS), 2);
        assert!(!dev.transport().is_live());
        // Reset and start again.
        let mut drv = Driver::setup(&mut dev, &mem, 16);
        mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
        let (st, _) = drv.request(&mut dev, &mem, VIRTIO_BLK_T_IN, 1, Some((DATA, 512)));
        assert_eq!(st, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn bad_queue_setup_sets_needs_reset() {
        let img = TempImage::new("badq", 4096);
        let mut dev = VirtioBlock::new(img.config(false)).unwrap();
        let mem = new_mem();
        let mut drv = Driver::setup(&mut dev, &mem, 16);
        // Queue outside guest memory.
        w32(&mut dev, &mem, reg::STATUS, 0);
        w32(
            &mut dev,
            &mem,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        w32(&mut dev, &mem, reg::QUEUE_NUM, 16);
        w32(&mut dev, &mem, reg::QUEUE_DESC_LOW, 0x1000);
        w32(&mut dev, &mem, reg::QUEUE_DESC_HIGH, 0x10);
        w32(&mut dev, &mem, reg::QUEUE_READY, 1);
        assert_eq!(r32(&mut dev, reg::QUEUE_READY), 0);
        assert_ne!(r32(&mut dev, reg::STATUS) & status::NEEDS_RESET, 0);
        // Invalid size.
        w32(&mut dev, &mem, reg::STATUS, 0);
        w32(&mut dev, &mem, reg::QUEUE_NUM, 15);
        assert_ne!(r32(&mut dev, reg::STATUS) & status::NEEDS_RESET, 0);
        // Notify before DRIVER_OK is ignored.
        w32(&mut dev, &mem, reg::STATUS, 0);
        let hdr = Driver::header(&mem, 0, VIRTIO_BLK_T_IN, 0);
        drv.post(&mem, &[(hdr, 16, false), (STATUS, 1, true)]);
        drv.notify(&mut dev, &mem);
        assert!(!dev.interrupt_level());
    }

    #[test]
    fn dirty_blocks_and_block_copy() {
        // 200 KiB + 512: four 64 KiB blocks, the last one 8.5 KiB.
        let len = 200 * 1024 + 512;
        let (img, mut dev, mem, mut drv) = setup("dirty", len, false);
        assert_eq!(dev.take_dirty_blocks(), Vec::<u64>::new());
        mem.write_slice(&[1u8; 1024], GuestAddress(DATA)).unwrap();
        drv.request(&mut dev, &mem, VIRTIO_BLK_T_OUT, 0, Some((DATA, 512)));
        drv.request(&mut dev, &mem, VIRTIO_BLK_T_OUT, 255, Some((DATA, 1024)));
        drv.request(&mut dev, &mem, VIRTIO_BLK_T_IN, 300, Some((DATA, 512)));
        assert_eq!(dev.take_dirty_blocks(), vec![0, 1, 2]);
        assert!(dev.take_dirty_blocks().is_empty());
        drv.request(&mut dev, &mem, VIRTIO_BLK_T_OUT, 400, Some((DATA, 512)));
        assert_eq!(dev.take_dirty_blocks(), vec![3]);
        dev.mark_all_dirty();
        assert_eq!(dev.take_dirty_blocks(), vec![0, 1, 2, 3]);

        // Copy every block to a second disk, as migration does.
        let img2 = TempImage::new("dirty-dst", len);
        std::fs::write(&img2.path, vec![0u8; len as usize]).unwrap();
        let mut dst = VirtioBlock::new(img2.config(false)).unwrap();
        let mut buf = Vec::new();
        for b in 0..4 {
            dev.read_block(b, &mut buf).unwrap();
            assert_eq!(buf.len(), if b == 3 { 8 * 1024 + 512 } else { 64 * 1024 });
            dst.write_block(b, &buf).unwrap();
        }
        dst.flush().unwrap();
        assert!(dst.take_dirty_blocks().is_empty());
        assert_eq!(img.contents(), img2.contents());
        assert!(matches!(
            dev.read_block(4, &mut buf),
            Err(BlockError::BlockOutOfRange {
                index: 4,
                blocks: 4,
                ..
            })
        ));
        assert!(matches!(
            dst.write_block(0, &[0u8; 10]),
            Err(BlockError::BlockLength { .. })
        ));
    }

    #[test]
    fn replace_backing_switches_images() {
        let len = 128 * 1024;
        let (img, mut dev, mem, mut drv) = setup("replace", len, false);
        mem.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
        drv.request(&mut dev, &mem, VIRTIO_BLK_T_OUT, 3, Some((DATA, 512)));
        let before = img.contents();

        // Refused: wrong size, a directory, a missing file, another mode.
        let small = TempImage::new("replace-small", len - 512);
        let err = dev.replace_backing(small.config(false)).unwrap_err();
        assert!(
            matches!(err, BlockError::SizeMismatch { expected, got, .. }
                if expected == len && got == len - 512),
            "{err}"
        );
        let dir = BlockConfig {
            path: std::env::temp_dir(),
            read_only: false,
        };
        assert!(matches!(
            dev.replace_backing(dir),
            Err(BlockError::IsDirectory { .. })
        ));
        let missing = BlockConfig {
            path: std::env::temp_dir().join("tandem-vblk-replace-missing.img"),
            read_only: false,
        };
        assert!(matches!(
            dev.replace_backing(missing),
            Err(BlockError::Open { .. })
        ));
        let copy = TempImage::new("replace-copy", len);
        std::fs::write(&copy.path, &before).unwrap();
        assert!(dev.replace_backing(copy.config(true)).is_err());
        assert_eq!(dev.config().path, img.path);

        // Switched: reads come from, and writes go to, the new image only.
        dev.take_dirty_blocks();
        dev.replace_backing(copy.config(false)).unwrap();
        assert_eq!(dev.config().path, copy.path);
        assert_eq!(dev.capacity_sectors(), len / SECTOR_SIZE);
        let (st, _) = drv.request(&mut dev, &mem, VIRTIO_BLK_T_IN, 3, Some((DATA2, 512)));
        assert_eq!(st, VIRTIO_BLK_S_OK);
        let mut got = [0u8; 512];
        mem.read_slice(&mut got, GuestAddress(DATA2)).unwrap();
        assert_eq!(got, [7u8; 512]);
        mem.write_slice(&[9u8; 512], GuestAddress(DATA)).unwrap();
        drv.request(&mut dev, &mem, VIRTIO_BLK_T_OUT, 200, Some((DATA, 512)));
        assert_eq!(img.contents(), before, "the old image is not written");
        assert_eq!(&copy.contents()[200 * 512..201 * 512], &[9u8; 512]);
        assert_eq!(dev.take_dirty_blocks(), vec![1]);
    }

    #[test]
    fn open_errors_and_odd_sizes() {
        let missing = std::env::temp_dir().join("tandem-vblk-does-not-exist.img");
        let err = VirtioBlock::new(BlockConfig {
            path: missing.clone(),
            read_only: false,
        })
        .unwrap_err();
        assert!(
            err.to_string().contains(&*missing.to_string_lossy()),
            "{err}"
        );
        let dir = std::env::temp_dir();
        let err = VirtioBlock::new(BlockConfig {
            path: dir.clone(),
            read_only: true,
        })
        .unwrap_err();
        assert!(matches!(err, BlockError::IsDirectory { .. }));
        assert!(err.to_string().contains(&*dir.to_string_lossy()), "{err}");

        // Size not a multiple of 512: rounded down.
        let img = TempImage::new("odd", 1000);
        let dev = VirtioBlock::new(img.config(false)).unwrap();
        assert_eq!(dev.capacity_sectors(), 1);

        // Empty disk.
        let (_img, mut dev, mem, mut drv) = setup("empty", 0, false);
        assert_eq!(dev.capacity_sectors(), 0);
        assert_eq!(r32(&mut dev, 0x100), 0);
        assert_eq!(
            drv.request(&mut dev, &mem, VIRTIO_BLK_T_IN, 0, Some((DATA, 512)))
                .0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            drv.request(&mut dev, &mem, VIRTIO_BLK_T_OUT, 0, Some((DATA, 512)))
                .0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            drv.request(&mut dev, &mem, VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 20)))
                .0,
            VIRTIO_BLK_S_OK
        );
        dev.mark_all_dirty();
        assert!(dev.take_dirty_blocks().is_empty());
        let mut buf = Vec::new();
        assert!(dev.read_block(0, &mut buf).is_err());
    }

    #[test]
    fn permission_error_names_path() {
        let img = TempImage::new("perm", 4096);
        std::fs::set_permissions(
            &img.path,
            std::os::unix::fs::PermissionsExt::from_mode(0o400),
        )
        .unwrap();
        // Root ignores permissions; only check when the open really fails.
        if let Err(err) = VirtioBlock::new(img.config(false)) {
            assert!(matches!(err, BlockError::Open { .. }));
            assert!(err.to_string().contains(&*img.path.to_string_lossy()));
        }
        assert!(VirtioBlock::new(img.config(true)).is_ok());
    }

    #[test]
    fn an_image_another_process_holds_is_refused() {
        let img = TempImage::new("locked", 4096);
        let before = img.contents();
        // Another process's lock: an open file description of its own.
        let theirs = File::open(&img.path).unwrap();
        theirs.try_lock_shared().unwrap();
        let err = VirtioBlock::new(img.config(false)).unwrap_err();
        assert!(
            matches!(
                err,
                BlockError::Image(ImageError::Locked { write: true, .. })
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains(&*img.path.to_string_lossy()),
            "{err}"
        );
        // Readers share.
        let ro = VirtioBlock::new(img.config(true)).unwrap();
        drop(ro);
        theirs.unlock().unwrap();
        // While a device holds it, nobody else gets it; dropped, it is free.
        let dev = VirtioBlock::new(img.config(false)).unwrap();
        assert!(dev.image_lock().is_exclusive());
        assert!(theirs.try_lock_shared().is_err());
        drop(dev);
        theirs.try_lock().unwrap();
        assert_eq!(img.contents(), before);
    }

    /// Replace the device's image handle (same file) by one opened with
    /// `opts`: a handle that cannot write or read makes every such request
    /// fail on the host (EBADF), as a full or failing disk would.
    fn swap_handle(dev: &mut VirtioBlock, img: &TempImage, opts: &mut OpenOptions) {
        dev.file = opts.open(&img.path).unwrap();
    }

    #[test]
    fn host_io_error_stalls_and_retry_completes_as_if_nothing_failed() {
        let len = 64 * 1024;
        // The reference: the same three requests without a failure.
        let run = |fail: bool| {
            let (img, mut dev, mem, mut drv) = setup("stall", len, false);
            mem.write_slice(&[0x5a; 4096], GuestAddress(DATA)).unwrap();
            mem.write_slice(&[0u8; 4096], GuestAddress(DATA2)).unwrap();
            // Three chains in one notify: a read, a write, a read of what
            // was written.
            let h0 = Driver::header(&mem, 0, VIRTIO_BLK_T_IN, 0);
            let h1 = Driver::header(&mem, 1, VIRTIO_BLK_T_OUT, 8);
            let h2 = Driver::header(&mem, 2, VIRTIO_BLK_T_IN, 8);
            drv.post(
                &mem,
                &[(h0, 16, false), (DATA2, 512, true), (STATUS, 1, true)],
            );
            drv.post(
                &mem,
                &[(h1, 16, false), (DATA, 4096, false), (STATUS + 1, 1, true)],
            );
            drv.post(
                &mem,
                &[
                    (h2, 16, false),
                    (DATA2 + 4096, 4096, true),
                    (STATUS + 2, 1, true),
                ],
            );
            mem.write_slice(&[0xff; 3], GuestAddress(STATUS)).unwrap();
            if fail {
                swap_handle(&mut dev, &img, OpenOptions::new().read(true));
                let err = dev
                    .mmio_write(reg::QUEUE_NOTIFY, &0u32.to_le_bytes(), &mem)
                    .unwrap_err();
                assert_eq!(
                    err.op,
                    DiskOp::Write {
                        offset: 8 * 512,
                        len: 4096
                    }
                );
                assert_eq!(err.raw_os_error(), Some(libc::EBADF));
                let msg = err.to_string();
                assert!(
                    msg.starts_with(&format!(
                        "disk {}: write of 4096 bytes at offset 4096 failed: ",
                        img.path.display()
                    )),
                    "{msg}"
                );
                assert!(dev.stalled().is_some());
                // The first chain was returned, the failed one and the one
                // after it were not, and the guest was not interrupted.
                assert_eq!(drv.pop_used(&mem), Some((0, 513)));
                assert_eq!(drv.pop_used(&mem), None);
                assert!(!dev.interrupt_level());
                // (The status bytes are only probed before a request runs;
                // the guest cannot look while the vCPU is stopped.)
                // Still failing: stalled again, nothing changes.
                assert!(dev.retry(&mem).is_err());
                assert_eq!(drv.pop_used(&mem), None);
                // The cause is fixed: the rest of the notify completes.
                swap_handle(&mut dev, &img, OpenOptions::new().read(true).write(true));
                dev.retry(&mem).unwrap();
                assert!(dev.stalled().is_none());
                // A retry with nothing stalled does nothing.
                dev.retry(&mem).unwrap();
                drv.last_used = 0;
            } else {
                drv.notify(&mut dev, &mem);
            }
            assert!(dev.interrupt_level());
            let mut used = Vec::new();
            while let Some(u) = drv.pop_used(&mem) {
                used.push(u);
            }
            let mut st = [0u8; 3];
            mem.read_slice(&mut st, GuestAddress(STATUS)).unwrap();
            let mut data = vec![0u8; 8192];
            mem.read_slice(&mut data, GuestAddress(DATA2)).unwrap();
            (
                used,
                st,
                data,
                img.contents(),
                crate::persist::Persist::save(&dev),
            )
        };
        let good = run(false);
        assert_eq!(good.0, vec![(0, 513), (3, 1), (6, 4097)]);
        assert_eq!(good.1, [VIRTIO_BLK_S_OK; 3]);
        let retried = run(true);
        assert_eq!(retried.0, good.0);
        assert_eq!(retried.1, good.1);
        assert_eq!(retried.2, good.2);
        assert_eq!(retried.3, good.3);
        assert_eq!(retried.4.transport, good.4.transport);
    }

    #[test]
    fn host_read_and_flush_errors_stall_too() {
        let (img, mut dev, mem, mut drv) = setup("stall-read", 4096, false);
        swap_handle(&mut dev, &img, OpenOptions::new().write(true));
        let hdr = Driver::header(&mem, 0, VIRTIO_BLK_T_IN, 1);
        drv.post(
            &mem,
            &[(hdr, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
        );
        let err = dev
            .mmio_write(reg::QUEUE_NOTIFY, &0u32.to_le_bytes(), &mem)
            .unwrap_err();
        assert_eq!(
            err.op,
            DiskOp::Read {
                offset: 512,
                len: 1024
            }
        );
        assert!(
            err.to_string()
                .contains("read of 1024 bytes at offset 512 failed"),
            "{err}"
        );
        // Further MMIO writes report the same stall and do nothing.
        let again = dev.mmio_write(reg::QUEUE_NOTIFY, &0u32.to_le_bytes(), &mem);
        assert!(again.is_err());
        assert_eq!(drv.pop_used(&mem), None);
        swap_handle(&mut dev, &img, OpenOptions::new().read(true).write(true));
        dev.retry(&mem).unwrap();
        assert_eq!(drv.pop_used(&mem), Some((0, 1025)));
        assert_eq!(DiskOp::Flush.to_string(), "flush");
    }

    #[test]
    fn interrupt_ack() {
        let (_img, mut dev, mem, mut drv) = setup("irq", 4096, false);
        assert!(!dev.interrupt_level());
        let hdr = Driver::header(&mem, 0, VIRTIO_BLK_T_FLUSH, 0);
        drv.post(&mem, &[(hdr, 16, false), (STATUS, 1, true)]);
        drv.notify(&mut dev, &mem);
        assert!(dev.interrupt_level());
        assert_eq!(r32(&mut dev, reg::INTERRUPT_STATUS), 1);
        // Acknowledging another bit leaves the line up.
        w32(&mut dev, &mem, reg::INTERRUPT_ACK, 2);
        assert!(dev.interrupt_level());
        w32(&mut dev, &mem, reg::INTERRUPT_ACK, 1);
        assert!(!dev.interrupt_level());
        assert_eq!(r32(&mut dev, reg::INTERRUPT_STATUS), 0);
        // A notify with nothing available raises nothing.
        drv.pop_used(&mem).unwrap();
        drv.notify(&mut dev, &mem);
        assert!(!dev.interrupt_level());
    }

    #[test]
    fn tandem_guest_driver_pattern() {
        // The project's guest: whole queue in one page (descriptors, driver
        // ring at +256, device ring at +1024), size 16, every request
        // reusing descriptors 0..=2, header/data/status in separate buffers,
        // capacity read as two 32-bit halves, only VERSION_1 acknowledged.
        let img = TempImage::new("guest", 1 << 20);
        let mut dev = VirtioBlock::new(img.config(false)).unwrap();
        let mem = new_mem();
        let q = 0x8000;
        let mut drv = Driver::setup_at(&mut dev, &mem, 16, q, q + 256, q + 1024);
        w32(&mut dev, &mem, reg::STATUS, 0);
        w32(
            &mut dev,
            &mem,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        w32(&mut dev, &mem, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut dev, &mem, reg::DRIVER_FEATURES, 0);
        w32(&mut dev, &mem, reg::DRIVER_FEATURES_SEL, 1);
        w32(&mut dev, &mem, reg::DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w32(&mut dev, &mem, reg::STATUS, s);
        assert_eq!(r32(&mut dev, reg::STATUS), s);
        w32(&mut dev, &mem, reg::QUEUE_NUM, 16);
        w32(&mut dev, &mem, reg::QUEUE_DESC_LOW, q as u32);
        w32(&mut dev, &mem, reg::QUEUE_DRIVER_LOW, (q + 256) as u32);
        w32(&mut dev, &mem, reg::QUEUE_DEVICE_LOW, (q + 1024) as u32);
        w32(&mut dev, &mem, reg::QUEUE_READY, 1);
        w32(&mut dev, &mem, reg::STATUS, s | status::DRIVER_OK);
        mem.write_slice(&[0u8; 2048], GuestAddress(q)).unwrap();
        let cap = u64::from(r32(&mut dev, 0x100)) | (u64::from(r32(&mut dev, 0x104)) << 32);
        assert_eq!(cap, 2048);
        for i in 0..40u64 {
            drv.next_desc = 0;
            let write = i % 2 == 0;
            let sector = (i / 2) * 8;
            if write {
                mem.write_slice(&[i as u8; 4096], GuestAddress(DATA))
                    .unwrap();
            }
            let (t, buf) = if write {
                (VIRTIO_BLK_T_OUT, DATA)
            } else {
                (VIRTIO_BLK_T_IN, DATA2)
            };
            let (st, _) = drv.request(&mut dev, &mem, t, sector, Some((buf, 4096)));
            assert_eq!(st, VIRTIO_BLK_S_OK);
            if !write {
                let mut back = vec![0u8; 4096];
                mem.read_slice(&mut back, GuestAddress(DATA2)).unwrap();
                assert!(back.iter().all(|&b| b == (i - 1) as u8), "request {i}");
            }
        }
        drv.next_desc = 0;
        assert_eq!(
            drv.request(&mut dev, &mem, VIRTIO_BLK_T_FLUSH, 0, None).0,
            VIRTIO_BLK_S_OK
        );
    }
}
