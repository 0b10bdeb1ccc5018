//! State digests: BLAKE3 over memory, vCPU and device state.
//!
//! The recorder logs a [`Digest`] at sync points (and as [`crate::Entry::Digest`]);
//! the replayer computes the same digest over its own state and compares
//! (DESIGN.md rule 5). [`Hasher`] is a thin wrapper so that the hash function
//! is a property of the log format, not of each caller.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A 32-byte BLAKE3 digest of VM state.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

/// Errors of this module.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DigestError {
    /// [`Digest::from_hex`] got something that is not 64 hex digits.
    #[error("a digest is 64 hex digits, got {0:?}")]
    BadHex(String),
}

impl Digest {
    /// The all-zero digest (not the digest of anything in particular).
    pub const ZERO: Digest = Digest([0; 32]);

    /// The digest of one byte string.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Result<Digest, DigestError> {
        let bad = || DigestError::BadHex(s.chars().take(80).collect());
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(bad());
        }
        let nib = |c: u8| -> Option<u8> {
            match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                b'A'..=b'F' => Some(c - b'A' + 10),
                _ => None,
            }
        };
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            let hi = nib(b[2 * i]).ok_or_else(bad)?;
            let lo = nib(b[2 * i + 1]).ok_or_else(bad)?;
            *o = (hi << 4) | lo;
        }
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

/// Incremental BLAKE3 hasher producing a [`Digest`].
///
/// When hashing several variable-length parts (vCPU state, device state,
/// pages), use [`Hasher::update_field`] so that the boundaries are part of
/// the hash (`"ab" + "c"` and `"a" + "bc"` then differ).
#[derive(Clone, Default)]
pub struct Hasher(blake3::Hasher);

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Hasher {
        Hasher(blake3::Hasher::new())
    }

    /// Feeds raw bytes.
    pub fn update(&mut self, bytes: &[u8]) -> &mut Hasher {
        self.0.update(bytes);
        self
    }

    /// Feeds a `u64` (little endian).
    pub fn update_u64(&mut self, v: u64) -> &mut Hasher {
        self.0.update(&v.to_le_bytes());
        self
    }

    /// Feeds a length-prefixed byte string (length as `u64` LE, then the bytes).
    pub fn update_field(&mut self, bytes: &[u8]) -> &mut Hasher {
        self.update_u64(bytes.len() as u64);
        self.0.update(bytes);
        self
    }

    /// The digest of everything fed so far (the hasher stays usable).
    pub fn finalize(&self) -> Digest {
        Digest(*self.0.finalize().as_bytes())
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = Digest::of(b"tandem");
        let h = d.to_hex();
        assert_eq!(h.len(), 64);
        assert_eq!(Digest::from_hex(&h), Ok(d));
        assert_eq!(Digest::from_hex(&h.to_uppercase()), Ok(d));
        assert!(Digest::from_hex("xyz").is_err());
        assert!(Digest::from_hex(&"g".repeat(64)).is_err());
        assert!(Digest::from_hex("é").is_err());
    }

    #[test]
    fn hasher_matches_one_shot_and_fields_are_framed() {
        let mut h = Hasher::new();
        h.update(b"ab").update(b"c");
        assert_eq!(h.finalize(), Digest::of(b"abc"));
        let mut a = Hasher::new();
        a.update_field(b"ab").update_field(b"c");
        let mut b = Hasher::new();
        b.update_field(b"a").update_field(b"bc");
        assert_ne!(a.finalize(), b.finalize());
        assert_eq!(
            Digest::of(b"").to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }
}
