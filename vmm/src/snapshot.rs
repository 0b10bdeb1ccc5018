//! Snapshot files: a whole VM (machine state + guest memory) on disk.
//!
//! Layout (all integers little-endian):
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `TNDMSNAP` |
//! | 4 | format version ([`SNAPSHOT_VERSION`]) |
//! | 8 | length N of the machine state |
//! | N | [`MachineState`], postcard-encoded |
//! | ... | memory image (`vstate::memory::write_image`: regions, then non-zero pages) |
//! | 4 | CRC32C of everything before it |
//!
//! A snapshot is written to a temporary file beside the target and renamed
//! into place, so a failed write never leaves a half snapshot under the
//! requested name. Reading checks magic, version and checksum before
//! anything is built.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::machine::{Machine, MachineError, MachineState};
use crate::persist::{decode_state, encode_state};
use crate::vstate::memory::{self, MemoryError};
use crate::GuestMemory;

/// Magic at the start of every snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"TNDMSNAP";
/// Version of the snapshot format this build reads and writes. 2: the
/// machine state has the NIC (config and device state), virtio transports
/// save a list of queues, and the serial device its unsent output.
/// 3: the machine state carries the state version header
/// ([`crate::persist::STATE_VERSION`]).
pub const SNAPSHOT_VERSION: u32 = 3;

/// Errors reading or writing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    /// Reading or writing the file failed.
    Io {
        /// The snapshot file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    #[error("{path} is not a Tandem snapshot (bad magic)")]
    /// Not a snapshot file.
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    #[error(
        "snapshot {path} has format version {found}; this Tandem reads version {SNAPSHOT_VERSION}"
    )]
    /// A snapshot of another format version.
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    #[error("snapshot {path} is corrupted: checksum {found:#010x}, expected {expected:#010x}")]
    /// The checksum does not match the contents.
    Checksum {
        /// The file.
        path: PathBuf,
        /// The checksum the file carries.
        expected: u32,
        /// The checksum of its contents.
        found: u32,
    },
    #[error("snapshot {path} is truncated or malformed: {reason}")]
    /// The file is cut short or does not decode.
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    #[error("snapshot {path}: {source}")]
    /// The memory image does not fit this VM.
    Memory {
        /// The file.
        path: PathBuf,
        /// Why.
        source: MemoryError,
    },
    #[error("restoring snapshot {path}: {source}")]
    /// The machine could not be rebuilt from the snapshot.
    Restore {
        /// The file.
        path: PathBuf,
        /// Why.
        source: MachineError,
    },
}

/// A writer that keeps a running CRC32C.
struct CrcWriter<W> {
    inner: W,
    crc: u32,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Write `state` and `mem` to `path` (atomically: temp file + rename).
pub fn write(path: &Path, state: &MachineState, mem: &GuestMemory) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp-snapshot");
    let file = File::create(&tmp).map_err(io)?;
    let result = (|| -> Result<(), SnapshotError> {
        let mut w = CrcWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            crc: 0,
        };
        let encoded =
            encode_state("machine state", state).map_err(|e| SnapshotError::Malformed {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        w.write_all(&SNAPSHOT_MAGIC).map_err(io)?;
        w.write_all(&SNAPSHOT_VERSION.to_le_bytes()).map_err(io)?;
        w.write_all(&(encoded.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&encoded).map_err(io)?;
        memory::write_image(mem, &mut w).map_err(|source| SnapshotError::Memory {
            path: path.to_path_buf(),
            source,
        })?;
        let crc = w.crc;
        let mut inner = w.inner;
        inner.write_all(&crc.to_le_bytes()).map_err(io)?;
        let file = inner.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, path).map_err(io),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// A verified snapshot in memory: the machine state and the memory image.
pub struct Snapshot {
    /// The file it was read from.
    pub path: PathBuf,
    /// vCPU, devices, exit counter, virtual time.
    pub state: MachineState,
    /// The memory image bytes (see `vstate::memory::read_image`).
    memory_image: Vec<u8>,
}

/// Read and verify a snapshot file. Nothing is built yet.
pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    parse(path, bytes)
}

/// Verify and decode the bytes of a snapshot file (`path` names it in
/// errors). Untrusted input: every length is checked, nothing is built.
pub fn parse(path: &Path, mut bytes: Vec<u8>) -> Result<Snapshot, SnapshotError> {
    let p = || path.to_path_buf();
    let malformed = |reason: &str| SnapshotError::Malformed {
        path: p(),
        reason: reason.to_string(),
    };
    if bytes.len() < 8 || bytes[..8] != SNAPSHOT_MAGIC {
        return Err(SnapshotError::BadMagic { path: p() });
    }
    if bytes.len() < 8 + 4 + 8 + 4 {
        return Err(malformed("shorter than its header"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version {
            path: p(),
            found: version,
        });
    }
    let body_len = bytes.len() - 4;
    let expected = u32::from_le_bytes(bytes[body_len..].try_into().unwrap_or_default());
    let found = crc32c::crc32c(&bytes[..body_len]);
    if expected != found {
        return Err(SnapshotError::Checksum {
            path: p(),
            expected,
            found,
        });
    }
    let state_len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    let state_end = 20usize
        .checked_add(usize::try_from(state_len).map_err(|_| malformed("state length"))?)
        .filter(|&end| end <= body_len)
        .ok_or_else(|| malformed("machine state runs past the end"))?;
    let state: MachineState = decode_state("machine state", &bytes[20..state_end])
        .map_err(|e| malformed(&e.to_string()))?;
    bytes.truncate(body_len);
    let memory_image = bytes.split_off(state_end);
    Ok(Snapshot {
        path: p(),
        state,
        memory_image,
    })
}

impl Snapshot {
    /// Load the memory image into `mem` (which must have the snapshot's
    /// layout), checking that nothing follows it.
    pub fn load_memory(&self, mem: &GuestMemory) -> Result<(), MemoryError> {
        let mut r = self.memory_image.as_slice();
        memory::read_image(mem, &mut r)?;
        if !r.is_empty() {
            return Err(MemoryError::Mismatch(format!(
                "{} bytes after the memory image",
                r.len()
            )));
        }
        Ok(())
    }

    /// Build the machine this snapshot describes. `disk` overrides the
    /// saved disk path.
    pub fn restore(
        &self,
        disk: Option<crate::machine::DiskConfig>,
    ) -> Result<Machine, SnapshotError> {
        Machine::restore(&self.state, disk, |mem| self.load_memory(mem)).map_err(|source| {
            SnapshotError::Restore {
                path: self.path.clone(),
                source,
            }
        })
    }
}
