//! The versioned header at the start of every log.
//!
//! ```text
//! magic[8] = "TNDMLOG\0"
//! format_version: u32 le          (== FORMAT_VERSION)
//! body_len: u32 le                (<= MAX_HEADER_BODY)
//! body:
//!   vm_config_len: varint, vm_config[vm_config_len]
//!   initial_state: u8             0 = Boot
//!                                 1 = Snapshot: digest[32], path_len: varint, path (UTF-8)
//! crc: u32 le = CRC32C(format_version ‖ body_len ‖ body)
//! ```
//!
//! The version is fixed-width and comes first so that a reader can name a
//! version it does not know before trying to parse anything else.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::codec::{put_varint, CodecError, Cursor};
use crate::digest::Digest;

/// The version this crate writes and reads.
/// Version 2 added `Output` entries (0x15); version 3 encodes sync point
/// pages against their previous version (`crate::page::encode_delta`);
/// version 4 added `Progress` marks (0x16); version 5 added the
/// `Handover` end (0x17: a planned switchover to the secondary).
/// A version-4 log is a version-5 log without handovers and is read as one
/// (one set of rules; [`OLDEST_READABLE`]). Older logs are refused: a
/// version-1 replay would miss every output check, a version-2 sync point's
/// raw pages would be read as deltas, a version-3 reader would call a
/// progress mark an unknown entry (so a version-3 log is refused too
/// rather than read by two rules). A version-4 reader refuses a version-5
/// log by its version, not at its first handover.
pub const FORMAT_VERSION: u32 = 5;
/// The oldest format version read (as [`FORMAT_VERSION`]: it is a subset).
pub const OLDEST_READABLE: u32 = 4;
/// First 8 bytes of every log.
pub const MAGIC: [u8; 8] = *b"TNDMLOG\0";
/// Largest accepted header body (the VM configuration is small).
pub const MAX_HEADER_BODY: usize = 16 << 20;

/// Where the recorded run starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InitialState {
    /// A fresh boot of the configured kernel.
    Boot,
    /// A snapshot (or a state received by migration/seeding).
    Snapshot {
        /// Digest of the full state the run starts from.
        digest: Digest,
        /// Where the snapshot was found (advisory; the digest is the identity).
        path_hint: String,
    },
}

/// The log header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT_VERSION`] for headers this crate reads or writes.
    pub format_version: u32,
    /// The VM configuration, opaque to the log (serialized by the vmm).
    pub vm_config: Vec<u8>,
    /// The identity of the state the run starts from.
    pub initial_state: InitialState,
}

/// Errors of header encoding and decoding.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// The input does not start with [`MAGIC`].
    #[error("not a Tandem log: expected magic \"{}\", found \"{}\"", .expected.escape_ascii(), .found.escape_ascii())]
    BadMagic {
        /// [`MAGIC`].
        expected: [u8; 8],
        /// The first bytes of the input (up to 8).
        found: Vec<u8>,
    },
    /// The log was written in a format version this crate does not handle.
    #[error(
        "unsupported log format version: expected {expected} (or {OLDEST_READABLE}), found {found}"
    )]
    UnsupportedVersion {
        /// [`FORMAT_VERSION`].
        expected: u32,
        /// The version in the log (or in the `Header` being written).
        found: u32,
    },
    /// The header is damaged.
    #[error("corrupt log header: {0}")]
    Corrupt(String),
    /// The header is too large to write.
    #[error("header body of {0} bytes exceeds the {MAX_HEADER_BODY}-byte limit")]
    TooLarge(usize),
    /// The input ends inside the header.
    #[error("log header is incomplete")]
    Truncated,
}

impl Header {
    /// A header of the current format version.
    pub fn new(vm_config: Vec<u8>, initial_state: InitialState) -> Header {
        Header {
            format_version: FORMAT_VERSION,
            vm_config,
            initial_state,
        }
    }

    /// Encodes the header (magic included).
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        if self.format_version != FORMAT_VERSION {
            return Err(HeaderError::UnsupportedVersion {
                expected: FORMAT_VERSION,
                found: self.format_version,
            });
        }
        let mut body = Vec::with_capacity(self.vm_config.len() + 64);
        put_varint(&mut body, self.vm_config.len() as u64);
        body.extend_from_slice(&self.vm_config);
        match &self.initial_state {
            InitialState::Boot => body.push(0),
            InitialState::Snapshot { digest, path_hint } => {
                body.push(1);
                body.extend_from_slice(&digest.0);
                put_varint(&mut body, path_hint.len() as u64);
                body.extend_from_slice(path_hint.as_bytes());
            }
        }
        if body.len() > MAX_HEADER_BODY {
            return Err(HeaderError::TooLarge(body.len()));
        }
        let mut out = Vec::with_capacity(body.len() + 20);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.format_version.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32c::crc32c(&out[8..]);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes a header from the start of `buf`; returns it and its size.
    /// [`HeaderError::Truncated`] means more bytes are needed. Wrong magic
    /// or version is reported as soon as those bytes are present.
    pub fn decode(buf: &[u8]) -> Result<(Header, usize), HeaderError> {
        let m = buf.len().min(8);
        if buf[..m] != MAGIC[..m] {
            return Err(HeaderError::BadMagic {
                expected: MAGIC,
                found: buf[..m].to_vec(),
            });
        }
        let le32 = |at: usize| -> Result<u32, HeaderError> {
            let b = buf.get(at..at + 4).ok_or(HeaderError::Truncated)?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let version = le32(8)?;
        if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&version) {
            return Err(HeaderError::UnsupportedVersion {
                expected: FORMAT_VERSION,
                found: version,
            });
        }
        let body_len = le32(12)? as usize;
        if body_len > MAX_HEADER_BODY {
            return Err(HeaderError::Corrupt(format!(
                "header body length {body_len} exceeds the {MAX_HEADER_BODY}-byte limit"
            )));
        }
        let total = 16 + body_len + 4;
        if buf.len() < total {
            return Err(HeaderError::Truncated);
        }
        let stored = le32(16 + body_len)?;
        let computed = crc32c::crc32c(&buf[8..16 + body_len]);
        if stored != computed {
            return Err(HeaderError::Corrupt(format!(
                "CRC32C mismatch (stored {stored:08x}, computed {computed:08x})"
            )));
        }
        let header = decode_body(&buf[16..16 + body_len]).map_err(|e| match e {
            CodecError::Corrupt(r) => HeaderError::Corrupt(r),
            _ => HeaderError::Corrupt("header body ends inside a field".into()),
        })?;
        Ok((header, total))
    }
}

fn decode_body(body: &[u8]) -> Result<Header, CodecError> {
    let mut c = Cursor::new(body);
    let n = c.varint()?;
    let vm_config = c
        .bytes(usize::try_from(n).map_err(|_| CodecError::Incomplete)?)?
        .to_vec();
    let initial_state = match c.u8()? {
        0 => InitialState::Boot,
        1 => {
            let mut d = [0u8; 32];
            d.copy_from_slice(c.bytes(32)?);
            let n = c.varint()?;
            let p = c.bytes(usize::try_from(n).map_err(|_| CodecError::Incomplete)?)?;
            let path_hint = String::from_utf8(p.to_vec())
                .map_err(|_| CodecError::Corrupt("snapshot path hint is not UTF-8".into()))?;
            InitialState::Snapshot {
                digest: Digest(d),
                path_hint,
            }
        }
        k => {
            return Err(CodecError::Corrupt(format!(
                "unknown initial state kind {k}"
            )))
        }
    };
    if c.remaining() != 0 {
        return Err(CodecError::Corrupt(format!(
            "{} trailing bytes in header body",
            c.remaining()
        )));
    }
    Ok(Header {
        format_version: FORMAT_VERSION,
        vm_config,
        initial_state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Header {
        Header::new(
            b"{\"mem_mib\":64}".to_vec(),
            InitialState::Snapshot {
                digest: Digest::of(b"state"),
                path_hint: "/var/lib/tandem/a.snap".into(),
            },
        )
    }

    #[test]
    fn round_trip_and_truncation() {
        for h in [Header::new(vec![], InitialState::Boot), snap()] {
            let b = h.encode().unwrap();
            assert_eq!(Header::decode(&b), Ok((h.clone(), b.len())));
            for cut in 0..b.len() {
                assert_eq!(Header::decode(&b[..cut]), Err(HeaderError::Truncated));
            }
            for i in 0..b.len() {
                for x in [1u8, 0x80, 0xff] {
                    let mut c = b.clone();
                    c[i] ^= x;
                    assert!(Header::decode(&c).is_err(), "byte {i} ^ {x:#x}");
                }
            }
        }
    }

    #[test]
    fn clear_magic_and_version_errors() {
        let e = Header::decode(b"PK\x03\x04hello world").unwrap_err();
        assert!(matches!(e, HeaderError::BadMagic { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("TNDMLOG\\x00") && msg.contains("PK\\x03\\x04"),
            "{msg}"
        );
        let mut b = snap().encode().unwrap();
        b[8] = 7;
        let e = Header::decode(&b).unwrap_err();
        assert_eq!(
            e,
            HeaderError::UnsupportedVersion {
                expected: 5,
                found: 7
            }
        );
        assert_eq!(
            e.to_string(),
            "unsupported log format version: expected 5 (or 4), found 7"
        );
        for v in [0u32, 1, 2, 3, 6] {
            let mut b = snap().encode().unwrap();
            b[8..12].copy_from_slice(&v.to_le_bytes());
            assert!(
                matches!(Header::decode(&b), Err(HeaderError::UnsupportedVersion { found, .. }) if found == v),
                "version {v}"
            );
        }
        // A version-4 log (no handovers) is read as version 5.
        let mut b = snap().encode().unwrap();
        b[8..12].copy_from_slice(&4u32.to_le_bytes());
        let body_end = b.len() - 4;
        let crc = crc32c::crc32c(&b[8..body_end]);
        b[body_end..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Header::decode(&b), Ok((snap(), b.len())));
        let mut h = snap();
        h.format_version = 1;
        assert!(matches!(
            h.encode(),
            Err(HeaderError::UnsupportedVersion { found: 1, .. })
        ));
    }
}
