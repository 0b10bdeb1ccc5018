//! Tandem's record log: the nondeterministic events of a recorded VM run
//! (DESIGN.md, "The determinism boundary"), their byte format, and readers
//! and writers for files and streams. No KVM code; decoding is fuzzed.
//!
//! # Format (version 4)
//!
//! A log is a [`Header`] followed by frames (full layout and rationale in
//! `docs/log-format.md`):
//!
//! ```text
//! header = "TNDMLOG\0" version:u32le body_len:u32le body crc32c:u32le
//! frame  = tag:u8 len:varint payload[len] crc32c:u32le   (CRC over tag..payload)
//! entry payload = exit_seq_delta:varint body              (tags 0x01..0x16)
//! batch payload = (tag:u8 len:varint payload[len])+       (tag 0x7f, one CRC for all)
//! ```
//!
//! `exit_seq` is stored as the delta from the previous entry, so entries are
//! in non-decreasing `exit_seq` order by construction. Hot entries are a few
//! bytes: `DeadlineReached` is 7 bytes as its own frame and 3 inside a batch,
//! an `Interrupt` 8 and 4. The log of an idle guest with a 250 Hz timer is
//! about 30 kbit/s with one frame per entry and 15–18 kbit/s batched
//! (flushed every 100 ms / 10 ms), against VMware FT's published 0.68 Mbit/s
//! (see `tests/size.rs`).
//!
//! # Example
//!
//! ```
//! use recordlog::{Entry, Header, InitialState, Input, LogReader, LogWriter};
//!
//! let header = Header::new(b"vm config".to_vec(), InitialState::Boot);
//! let mut w = LogWriter::new(Vec::new(), &header)?;
//! w.append(&Entry::Input { exit_seq: 3, input: Input::DeadlineReached })?;
//! w.append(&Entry::Interrupt { exit_seq: 3, vector: 0x20 })?;
//! w.append(&Entry::End { exit_seq: 9, status: 0 })?;
//! let bytes = w.into_inner()?;
//!
//! let (mut r, h) = LogReader::open(&bytes[..])?;
//! assert_eq!(h, header);
//! let mut n = 0;
//! while let Some(e) = r.next_entry()? {
//!     n += 1;
//! }
//! assert_eq!(n, 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Reading untrusted bytes
//!
//! Decoding never panics and never reserves memory from a length field:
//! lengths are capped ([`MAX_FRAME_PAYLOAD`], [`MAX_HEADER_BODY`]) and
//! checked against the bytes present. The first damaged frame ends reading
//! with [`ReadError::Corrupt`] and its byte offset; input that stops inside
//! a frame gives [`ReadError::Truncated`] after every complete entry before
//! it was returned.
//!
//! # Pieces
//!
//! - [`LogWriter`] / [`LogReader`]: a log on any `Write` / `Read`.
//! - [`TailReader`]: follows a log file that is still growing.
//! - [`StreamDecoder`]: push-style decoding of bytes from a network stream.
//! - [`LogQueue`] / [`QueueWriter`]: recorder → sender hand-off in memory.
//! - [`FrameEncoder`]: the framing without I/O.
//! - [`Hasher`] / [`Digest`]: BLAKE3 state digests.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod digest;
pub mod entry;
pub mod header;
pub mod page;
pub mod queue;
pub mod reader;
pub mod stream;
pub mod tail;
pub mod writer;

pub use codec::{BatchLimits, CodecError, FrameEncoder, MAX_FRAME_PAYLOAD};
pub use digest::{Digest, DigestError, Hasher};
pub use entry::{Entry, Fingerprint, Input, OutputKind, OutputRecord, SyncPoint};
pub use header::{
    Header, HeaderError, InitialState, FORMAT_VERSION, MAGIC, MAX_HEADER_BODY, OLDEST_READABLE,
};
pub use queue::{Drained, LogQueue, QueueError, QueueStats, QueueWriter};
pub use reader::{LogReader, ReadError};
pub use stream::StreamDecoder;
pub use tail::{TailOptions, TailReader};
pub use writer::{LogWriter, WriteError, WriterOptions};

/// Alias used in the API sketch: entry encoding errors.
pub type EncodeError = CodecError;
