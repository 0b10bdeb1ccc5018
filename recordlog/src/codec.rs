//! Entry payloads and frames: the byte layout of everything after the header.
//!
//! ```text
//! frame   = tag:u8  len:varint  payload[len]  crc:u32le
//!           crc = CRC32C(tag ‖ len ‖ payload)
//! payload = delta:varint  body            (entry frames, tag != 0x7f)
//!         | inner+                        (batch frame,  tag == 0x7f)
//! inner   = tag:u8  len:varint  payload[len]   (an entry frame without CRC)
//! ```
//!
//! `delta` is the entry's `exit_seq` minus the previous entry's (the first
//! entry of a log counts from 0), so it is non-negative by construction.
//! Bodies (`varint` = unsigned LEB128, at most 10 bytes):
//!
//! | tag  | entry                    | body |
//! |------|--------------------------|------|
//! | 0x01 | `Input::Clock`           | ns:varint |
//! | 0x02 | `Input::WallClock`       | ns:varint |
//! | 0x03 | `Input::DeadlineReached` | (empty) |
//! | 0x04 | `Input::Console`         | bytes (rest of payload) |
//! | 0x05 | `Input::NetFrame`        | bytes (rest of payload) |
//! | 0x10 | `Interrupt`              | vector:u8 |
//! | 0x11 | `Fingerprint`            | exit_reason, rip, rax, rcx, rflags: varint each |
//! | 0x12 | `SyncPoint`              | vcpu_len:varint vcpu, dev_len:varint dev, digest[32], npages:varint, npages × (gpa:varint len:varint delta) |
//! | 0x13 | `Digest`                 | digest[32] |
//! | 0x14 | `End`                    | status: zigzag varint |
//! | 0x15 | `Output`                 | kind:u8 len:varint hash:u64le |
//! | 0x16 | `Progress`               | (empty) |
//! | 0x17 | `Handover`               | (empty); only the `End` at the same exit may follow |
//!
//! A payload is at most [`MAX_FRAME_PAYLOAD`] bytes. A batch holds at least
//! one inner entry and no nested batch; an `End` entry is the last entry of
//! the log. See docs/log-format.md for the rationale and sizes.

use std::collections::VecDeque;

use thiserror::Error;

use crate::digest::Digest;
use crate::entry::{Entry, Fingerprint, Input, OutputKind, OutputRecord, SyncPoint};

/// Largest payload of one frame (entry or batch): 256 MiB. Sync points must
/// stay below it (take them often enough that the dirty set fits).
pub const MAX_FRAME_PAYLOAD: usize = 256 << 20;

/// Frame tags.
pub(crate) mod tag {
    pub const CLOCK: u8 = 0x01;
    pub const WALL_CLOCK: u8 = 0x02;
    pub const DEADLINE_REACHED: u8 = 0x03;
    pub const CONSOLE: u8 = 0x04;
    pub const NET_FRAME: u8 = 0x05;
    pub const INTERRUPT: u8 = 0x10;
    pub const FINGERPRINT: u8 = 0x11;
    pub const SYNC_POINT: u8 = 0x12;
    pub const DIGEST: u8 = 0x13;
    pub const END: u8 = 0x14;
    pub const OUTPUT: u8 = 0x15;
    pub const PROGRESS: u8 = 0x16;
    pub const HANDOVER: u8 = 0x17;
    pub const BATCH: u8 = 0x7f;

    pub fn is_entry(t: u8) -> bool {
        matches!(t, 0x01..=0x05 | 0x10..=0x17)
    }
}

/// Errors of encoding and decoding frames.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// The entry's `exit_seq` is lower than the previous entry's.
    #[error("exit_seq went backwards: previous entry at {prev}, new entry at {got}")]
    ExitSeqBackwards {
        /// `exit_seq` of the previous entry.
        prev: u64,
        /// `exit_seq` of the rejected entry.
        got: u64,
    },
    /// The encoded entry would exceed [`MAX_FRAME_PAYLOAD`].
    #[error("entry payload of {len} bytes exceeds the {max}-byte frame limit")]
    TooLarge {
        /// Payload size of the entry.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An entry was appended after the `End` entry.
    #[error("the log already ended at exit_seq {0}; no entry may follow End")]
    AfterEnd(u64),
    /// More bytes are needed to decode the next frame (not an error at the
    /// end of a growing stream).
    #[error("incomplete frame")]
    Incomplete,
    /// The bytes are not a valid frame.
    #[error("{0}")]
    Corrupt(String),
}

fn corrupt(reason: impl Into<String>) -> CodecError {
    CodecError::Corrupt(reason.into())
}

// ---------------------------------------------------------------- varints

/// Appends `v` as unsigned LEB128.
#[inline]
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Encoded size of `v` as a varint.
#[inline]
pub(crate) fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn zigzag(v: i32) -> u64 {
    u64::from(((v << 1) ^ (v >> 31)) as u32)
}

fn unzigzag(v: u32) -> i32 {
    ((v >> 1) as i32) ^ -((v & 1) as i32)
}

/// A read position in a byte slice. Running out of bytes is
/// [`CodecError::Incomplete`]; callers decoding a complete payload turn that
/// into corruption.
///
/// The cursor reads `buf[..end]`. `buf` may extend past `end` (the rest of a
/// frame, the CRC, following frames): the varint fast path then loads 8
/// bytes at once even near `end`, and checks the decoded length against
/// `end` afterwards, so the result is exactly that of reading byte by byte
/// up to `end`.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

/// Removes the continuation bits of the 8 varint bytes in `x` (little
/// endian) and packs their 7-bit groups: the value of those 56 bits.
#[inline(always)]
fn pack7x8(x: u64) -> u64 {
    let x = x & 0x7f7f_7f7f_7f7f_7f7f;
    let x = (x & 0x007f_007f_007f_007f) | ((x & 0x7f00_7f00_7f00_7f00) >> 1);
    let x = (x & 0x0000_3fff_0000_3fff) | ((x & 0x3fff_0000_3fff_0000) >> 2);
    (x & 0x0000_0000_0fff_ffff) | ((x & 0x0fff_ffff_0000_0000) >> 4)
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor {
            buf,
            pos: 0,
            end: buf.len(),
        }
    }

    /// A cursor over `buf[start..end]` that may look ahead into the rest of
    /// `buf`. Requires `start <= end <= buf.len()`.
    #[inline]
    fn window(buf: &'a [u8], start: usize, end: usize) -> Self {
        debug_assert!(start <= end && end <= buf.len());
        Cursor {
            buf,
            pos: start,
            end,
        }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8, CodecError> {
        if self.pos >= self.end {
            return Err(CodecError::Incomplete);
        }
        let b = *self.buf.get(self.pos).ok_or(CodecError::Incomplete)?;
        self.pos += 1;
        Ok(b)
    }

    #[inline(always)]
    pub(crate) fn varint(&mut self) -> Result<u64, CodecError> {
        match self.buf.get(self.pos) {
            Some(&b) if b < 0x80 && self.pos < self.end => {
                self.pos += 1;
                Ok(u64::from(b))
            }
            _ => self.varint_multi(),
        }
    }

    /// Varints of 2 to 10 bytes (and the end-of-input cases): 8 bytes at a
    /// time when that many are readable, byte by byte otherwise.
    #[inline]
    fn varint_multi(&mut self) -> Result<u64, CodecError> {
        let ahead = self.buf.get(self.pos..).unwrap_or_default();
        if let Some(w) = ahead.first_chunk::<8>() {
            let x = u64::from_le_bytes(*w);
            let stops = !x & 0x8080_8080_8080_8080;
            if stops != 0 {
                // The first byte without a continuation bit ends the varint.
                let n = (stops.trailing_zeros() as usize >> 3) + 1;
                if n > self.remaining() {
                    return Err(CodecError::Incomplete);
                }
                let x = if n == 8 {
                    x
                } else {
                    x & ((1u64 << (8 * n)) - 1)
                };
                self.pos += n;
                return Ok(pack7x8(x));
            }
            if let Some(&[b8, b9]) = ahead.get(8..10).and_then(|t| t.first_chunk::<2>()) {
                let lo = pack7x8(x);
                if b8 < 0x80 {
                    if self.remaining() < 9 {
                        return Err(CodecError::Incomplete);
                    }
                    self.pos += 9;
                    return Ok(lo | (u64::from(b8) << 56));
                }
                if self.remaining() < 10 {
                    return Err(CodecError::Incomplete);
                }
                if b9 > 1 {
                    return Err(corrupt("varint overflows 64 bits"));
                }
                self.pos += 10;
                return Ok(lo | (u64::from(b8 & 0x7f) << 56) | (u64::from(b9) << 63));
            }
        }
        self.varint_bytewise()
    }

    /// The reference decoder: one byte at a time, never reading past `end`.
    #[cold]
    fn varint_bytewise(&mut self) -> Result<u64, CodecError> {
        let mut v = 0u64;
        for i in 0..10 {
            if self.pos + i >= self.end {
                return Err(CodecError::Incomplete);
            }
            let b = *self.buf.get(self.pos + i).ok_or(CodecError::Incomplete)?;
            if i == 9 && b > 1 {
                return Err(corrupt("varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.pos += i + 1;
                return Ok(v);
            }
        }
        Err(corrupt("varint longer than 10 bytes"))
    }

    #[inline]
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if n > self.remaining() {
            return Err(CodecError::Incomplete);
        }
        let s = self
            .buf
            .get(self.pos..self.pos + n)
            .ok_or(CodecError::Incomplete)?;
        self.pos += n;
        Ok(s)
    }

    /// A varint length followed by that many bytes (checked against the input).
    fn len_prefixed(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| CodecError::Incomplete)?;
        self.bytes(n)
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.pos..self.end).unwrap_or_default();
        self.pos = self.end;
        s
    }

    fn digest(&mut self) -> Result<Digest, CodecError> {
        let b = self.bytes(32)?;
        let mut d = [0u8; 32];
        d.copy_from_slice(b);
        Ok(Digest(d))
    }
}

// ---------------------------------------------------------------- encoding

fn entry_tag(e: &Entry) -> u8 {
    match e {
        Entry::Input { input, .. } => match input {
            Input::Clock(_) => tag::CLOCK,
            Input::WallClock(_) => tag::WALL_CLOCK,
            Input::DeadlineReached => tag::DEADLINE_REACHED,
            Input::Console(_) => tag::CONSOLE,
            Input::NetFrame(_) => tag::NET_FRAME,
        },
        Entry::Output { .. } => tag::OUTPUT,
        Entry::Interrupt { .. } => tag::INTERRUPT,
        Entry::Fingerprint { .. } => tag::FINGERPRINT,
        Entry::SyncPoint { .. } => tag::SYNC_POINT,
        Entry::Digest { .. } => tag::DIGEST,
        Entry::End { .. } => tag::END,
        Entry::Progress { .. } => tag::PROGRESS,
        Entry::Handover { .. } => tag::HANDOVER,
    }
}

fn fp_len(fp: &Fingerprint) -> usize {
    varint_len(u64::from(fp.exit_reason))
        + varint_len(fp.rip)
        + varint_len(fp.rax)
        + varint_len(fp.rcx)
        + varint_len(fp.rflags)
}

fn sync_len(s: &SyncPoint) -> usize {
    let mut n = varint_len(s.vcpu_state.len() as u64)
        + s.vcpu_state.len()
        + varint_len(s.device_state.len() as u64)
        + s.device_state.len()
        + 32
        + varint_len(s.pages.len() as u64);
    for (gpa, data) in &s.pages {
        n += varint_len(*gpa) + varint_len(data.len() as u64) + data.len();
    }
    n
}

/// Payload size of `e` encoded with `delta`.
fn payload_len(e: &Entry, delta: u64) -> usize {
    varint_len(delta)
        + match e {
            Entry::Input { input, .. } => match input {
                Input::Clock(v) | Input::WallClock(v) => varint_len(*v),
                Input::DeadlineReached => 0,
                Input::Console(b) | Input::NetFrame(b) => b.len(),
            },
            Entry::Output { output, .. } => 1 + varint_len(output.len) + 8,
            Entry::Interrupt { .. } => 1,
            Entry::Fingerprint { fp, .. } => fp_len(fp),
            Entry::SyncPoint { sync, .. } => sync_len(sync),
            Entry::Digest { .. } => 32,
            Entry::End { status, .. } => varint_len(zigzag(*status)),
            Entry::Progress { .. } | Entry::Handover { .. } => 0,
        }
}

fn put_payload(out: &mut Vec<u8>, e: &Entry, delta: u64) {
    put_varint(out, delta);
    match e {
        Entry::Input { input, .. } => match input {
            Input::Clock(v) | Input::WallClock(v) => put_varint(out, *v),
            Input::DeadlineReached => {}
            Input::Console(b) | Input::NetFrame(b) => out.extend_from_slice(b),
        },
        Entry::Output { output, .. } => {
            out.push(output.kind.code());
            put_varint(out, output.len);
            out.extend_from_slice(&output.hash.to_le_bytes());
        }
        Entry::Interrupt { vector, .. } => out.push(*vector),
        Entry::Fingerprint { fp, .. } => {
            put_varint(out, u64::from(fp.exit_reason));
            put_varint(out, fp.rip);
            put_varint(out, fp.rax);
            put_varint(out, fp.rcx);
            put_varint(out, fp.rflags);
        }
        Entry::SyncPoint { sync, .. } => {
            put_varint(out, sync.vcpu_state.len() as u64);
            out.extend_from_slice(&sync.vcpu_state);
            put_varint(out, sync.device_state.len() as u64);
            out.extend_from_slice(&sync.device_state);
            out.extend_from_slice(&sync.digest.0);
            put_varint(out, sync.pages.len() as u64);
            for (gpa, data) in &sync.pages {
                put_varint(out, *gpa);
                put_varint(out, data.len() as u64);
                out.extend_from_slice(data);
            }
        }
        Entry::Digest { digest, .. } => out.extend_from_slice(&digest.0),
        Entry::End { status, .. } => put_varint(out, zigzag(*status)),
        Entry::Progress { .. } | Entry::Handover { .. } => {}
    }
}

/// Appends `tag ‖ len ‖ payload` (no CRC); `plen` from [`payload_len`].
fn put_entry(out: &mut Vec<u8>, e: &Entry, delta: u64, plen: usize) {
    out.reserve(1 + varint_len(plen as u64) + plen + 4);
    out.push(entry_tag(e));
    put_varint(out, plen as u64);
    put_payload(out, e, delta);
}

fn put_crc(out: &mut Vec<u8>, frame_start: usize) {
    let crc = crc32c::crc32c(&out[frame_start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// When to close a batch frame (see [`FrameEncoder::batched`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Close the batch when it holds this many entries.
    pub max_entries: usize,
    /// Close the batch when its payload reaches this many bytes; entries
    /// larger than this get a frame of their own.
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_entries: 1024,
            max_bytes: 16 << 10,
        }
    }
}

/// Turns entries into frames. Keeps the previous `exit_seq` (for deltas) and,
/// in batched mode, the open batch. Pure: no I/O.
#[derive(Debug, Default)]
pub struct FrameEncoder {
    last_seq: u64,
    any: bool,
    ended: bool,
    limits: Option<BatchLimits>,
    batch: Vec<u8>,
    batch_entries: usize,
    batch_last_seq: u64,
    emitted_seq: Option<u64>,
}

impl FrameEncoder {
    /// One frame (with its own CRC) per entry.
    pub fn new() -> Self {
        FrameEncoder::default()
    }

    /// Entries are collected into batch frames that share one CRC and are
    /// emitted when `limits` are reached or on [`FrameEncoder::flush`].
    pub fn batched(limits: BatchLimits) -> Self {
        let max_bytes = limits.max_bytes.min(MAX_FRAME_PAYLOAD);
        FrameEncoder {
            limits: Some(BatchLimits {
                max_entries: limits.max_entries.max(1),
                max_bytes,
            }),
            ..FrameEncoder::default()
        }
    }

    /// `exit_seq` of the last accepted entry.
    pub fn last_exit_seq(&self) -> Option<u64> {
        self.any.then_some(self.last_seq)
    }

    /// `exit_seq` of the last entry whose frame has been emitted (is not
    /// waiting in the open batch).
    pub fn emitted_exit_seq(&self) -> Option<u64> {
        self.emitted_seq
    }

    /// Entries waiting in the open batch.
    pub fn pending_entries(&self) -> usize {
        self.batch_entries
    }

    /// Whether an `End` entry was accepted.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Encodes `e`, appending complete frames (if any) to `out`. Returns the
    /// number of bytes appended. On error nothing changes.
    pub fn encode(&mut self, e: &Entry, out: &mut Vec<u8>) -> Result<usize, CodecError> {
        let seq = e.exit_seq();
        if self.ended {
            return Err(CodecError::AfterEnd(self.last_seq));
        }
        if seq < self.last_seq {
            return Err(CodecError::ExitSeqBackwards {
                prev: self.last_seq,
                got: seq,
            });
        }
        let delta = seq - self.last_seq;
        let plen = payload_len(e, delta);
        if plen > MAX_FRAME_PAYLOAD {
            return Err(CodecError::TooLarge {
                len: plen,
                max: MAX_FRAME_PAYLOAD,
            });
        }
        let start = out.len();
        self.last_seq = seq;
        self.any = true;
        let is_end = matches!(e, Entry::End { .. });
        self.ended = is_end;
        match self.limits {
            None => {
                put_entry(out, e, delta, plen);
                put_crc(out, start);
                self.emitted_seq = Some(seq);
            }
            Some(lim) => {
                let inner = 1 + varint_len(plen as u64) + plen;
                if self.batch.len() + inner > lim.max_bytes {
                    self.flush(out);
                }
                if inner > lim.max_bytes {
                    let fstart = out.len();
                    put_entry(out, e, delta, plen);
                    put_crc(out, fstart);
                    self.emitted_seq = Some(seq);
                } else {
                    put_entry(&mut self.batch, e, delta, plen);
                    self.batch_entries += 1;
                    self.batch_last_seq = seq;
                    if self.batch_entries >= lim.max_entries || is_end {
                        self.flush(out);
                    }
                }
            }
        }
        Ok(out.len() - start)
    }

    /// Closes the open batch (if any), appending its frame to `out`. Returns
    /// the number of bytes appended.
    pub fn flush(&mut self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        match self.batch_entries {
            0 => {}
            // A batch of one is an ordinary entry frame: same bytes, one less
            // tag and length.
            1 => {
                out.extend_from_slice(&self.batch);
                put_crc(out, start);
            }
            _ => {
                out.reserve(1 + 10 + self.batch.len() + 4);
                out.push(tag::BATCH);
                put_varint(out, self.batch.len() as u64);
                out.extend_from_slice(&self.batch);
                put_crc(out, start);
            }
        }
        if self.batch_entries > 0 {
            self.emitted_seq = Some(self.batch_last_seq);
        }
        self.batch.clear();
        self.batch_entries = 0;
        out.len() - start
    }
}

// ---------------------------------------------------------------- decoding

/// The tag and payload length of the frame `c` is at, checked: a known
/// type and a length within [`MAX_FRAME_PAYLOAD`].
#[inline]
fn frame_header(c: &mut Cursor<'_>) -> Result<(u8, u64), CodecError> {
    let t = c.u8()?;
    if t != tag::BATCH && !tag::is_entry(t) {
        return Err(corrupt(format!("unknown frame type 0x{t:02x}")));
    }
    let len = c.varint()?;
    if len > MAX_FRAME_PAYLOAD as u64 {
        return Err(corrupt(format!(
            "frame length {len} exceeds the {MAX_FRAME_PAYLOAD}-byte limit"
        )));
    }
    Ok((t, len))
}

/// Total size of the frame at the start of `buf` (tag + len + payload + CRC),
/// checking only the tag and the length field.
pub(crate) fn frame_extent(buf: &[u8]) -> Result<usize, CodecError> {
    let mut c = Cursor::new(buf);
    let (_, len) = frame_header(&mut c)?;
    Ok(c.pos() + len as usize + 4)
}

/// Where decoded entries go: the queue of a batch's entries, or the one slot
/// of a plain entry frame.
pub(crate) trait Sink {
    fn put(&mut self, e: Entry);
}

impl Sink for VecDeque<Entry> {
    #[inline(always)]
    fn put(&mut self, e: Entry) {
        self.push_back(e);
    }
}

impl Sink for Option<Entry> {
    #[inline(always)]
    fn put(&mut self, e: Entry) {
        *self = Some(e);
    }
}

/// Decodes the entry of type `t` whose payload is the window of `c` and
/// appends it to `out`; `last_seq` is the previous entry's `exit_seq`.
/// Returns the entry's `exit_seq`. On error, `out` may have grown by the
/// entry (the caller truncates it).
///
/// Each arm builds its entry in place in `out`: building an `Entry` first and
/// moving it (through a `Result`) costs more than decoding it.
#[inline(always)]
fn decode_payload<S: Sink>(
    t: u8,
    mut c: Cursor<'_>,
    last_seq: u64,
    out: &mut S,
) -> Result<u64, CodecError> {
    let delta = c.varint()?;
    let exit_seq = last_seq
        .checked_add(delta)
        .ok_or_else(|| corrupt("exit_seq overflows 64 bits"))?;
    match t {
        tag::CLOCK => {
            let v = c.varint()?;
            out.put(Entry::Input {
                exit_seq,
                input: Input::Clock(v),
            })
        }
        tag::WALL_CLOCK => {
            let v = c.varint()?;
            out.put(Entry::Input {
                exit_seq,
                input: Input::WallClock(v),
            })
        }
        tag::DEADLINE_REACHED => out.put(Entry::Input {
            exit_seq,
            input: Input::DeadlineReached,
        }),
        tag::CONSOLE => out.put(Entry::Input {
            exit_seq,
            input: Input::Console(c.rest().to_vec()),
        }),
        tag::NET_FRAME => out.put(Entry::Input {
            exit_seq,
            input: Input::NetFrame(c.rest().to_vec()),
        }),
        tag::OUTPUT => {
            let code = c.u8()?;
            let kind = OutputKind::from_code(code)
                .ok_or_else(|| corrupt(format!("unknown output kind {code}")))?;
            let len = c.varint()?;
            let b = c.bytes(8)?;
            let mut h = [0u8; 8];
            h.copy_from_slice(b);
            out.put(Entry::Output {
                exit_seq,
                output: OutputRecord {
                    kind,
                    len,
                    hash: u64::from_le_bytes(h),
                },
            })
        }
        tag::INTERRUPT => {
            let vector = c.u8()?;
            out.put(Entry::Interrupt { exit_seq, vector })
        }
        tag::FINGERPRINT => {
            let exit_reason = u32::try_from(c.varint()?)
                .map_err(|_| corrupt("fingerprint exit_reason exceeds 32 bits"))?;
            let rip = c.varint()?;
            let rax = c.varint()?;
            let rcx = c.varint()?;
            let rflags = c.varint()?;
            out.put(Entry::Fingerprint {
                exit_seq,
                fp: Fingerprint {
                    exit_reason,
                    rip,
                    rax,
                    rcx,
                    rflags,
                },
            })
        }
        tag::SYNC_POINT => out.put(decode_sync_point(&mut c, exit_seq)?),
        tag::DIGEST => {
            let digest = c.digest()?;
            out.put(Entry::Digest { exit_seq, digest })
        }
        tag::END => {
            let z =
                u32::try_from(c.varint()?).map_err(|_| corrupt("End status exceeds 32 bits"))?;
            out.put(Entry::End {
                exit_seq,
                status: unzigzag(z),
            })
        }
        tag::PROGRESS => out.put(Entry::Progress { exit_seq }),
        tag::HANDOVER => out.put(Entry::Handover { exit_seq }),
        _ => return Err(corrupt(format!("unknown entry type 0x{t:02x}"))),
    };
    if c.remaining() != 0 {
        return Err(trailing(c.remaining(), t));
    }
    Ok(exit_seq)
}

/// [`Entry::kind`] of the entries with tag `t`.
fn tag_kind(t: u8) -> &'static str {
    match t {
        tag::CLOCK => "input.clock",
        tag::WALL_CLOCK => "input.wall_clock",
        tag::DEADLINE_REACHED => "input.deadline_reached",
        tag::CONSOLE => "input.console",
        tag::NET_FRAME => "input.net_frame",
        tag::INTERRUPT => "interrupt",
        tag::FINGERPRINT => "fingerprint",
        tag::SYNC_POINT => "sync_point",
        tag::DIGEST => "digest",
        tag::END => "end",
        tag::OUTPUT => "output",
        tag::PROGRESS => "progress",
        tag::HANDOVER => "handover",
        _ => "unknown",
    }
}

#[cold]
#[inline(never)]
fn trailing(n: usize, t: u8) -> CodecError {
    corrupt(format!("{n} trailing bytes in a {} entry", tag_kind(t)))
}

/// The body of a sync point (rare and large: kept out of the hot path).
#[inline(never)]
fn decode_sync_point(c: &mut Cursor<'_>, exit_seq: u64) -> Result<Entry, CodecError> {
    let vcpu_state = c.len_prefixed()?.to_vec();
    let device_state = c.len_prefixed()?.to_vec();
    let digest = c.digest()?;
    let n = c.varint()?;
    // Each page takes at least 2 bytes: never trust `n` further.
    let cap = usize::try_from(n)
        .unwrap_or(usize::MAX)
        .min(c.remaining() / 2);
    let mut pages = Vec::with_capacity(cap);
    for _ in 0..n {
        let gpa = c.varint()?;
        pages.push((gpa, c.len_prefixed()?.to_vec()));
    }
    Ok(Entry::SyncPoint {
        exit_seq,
        sync: Box::new(SyncPoint {
            vcpu_state,
            device_state,
            pages,
            digest,
        }),
    })
}

/// Decoder state carried from frame to frame.
#[derive(Debug, Default, Clone)]
pub(crate) struct DecodeState {
    /// `exit_seq` of the previous entry (0 before the first).
    pub last_seq: u64,
    /// An `End` entry was decoded.
    pub ended: bool,
    /// The previous entry was a `Handover` (only its `End` may follow).
    pub handover: bool,
}

/// Decodes the frame at the start of `buf`: the entry of a plain entry frame
/// goes to `one` (which must be `None`), the entries of a batch frame are
/// pushed to `many`. Returns the frame's size. `Incomplete` if `buf` holds
/// only part of it; on any error neither `st` nor `one` nor `many` change.
pub(crate) fn decode_frame(
    buf: &[u8],
    st: &mut DecodeState,
    one: &mut Option<Entry>,
    many: &mut VecDeque<Entry>,
) -> Result<usize, CodecError> {
    // The same checks, in the same order, as `frame_extent`.
    let mut c = Cursor::new(buf);
    let (t, len) = frame_header(&mut c)?;
    let start = c.pos();
    let end = start + len as usize;
    let (Some(body), Some(crc)) = (
        buf.get(..end),
        buf.get(end..).and_then(|b| b.first_chunk::<4>()),
    ) else {
        return Err(CodecError::Incomplete);
    };
    let want = u32::from_le_bytes(*crc);
    let got = crc32c::crc32c(body);
    if want != got {
        return Err(corrupt(format!(
            "CRC32C mismatch (stored {want:08x}, computed {got:08x})"
        )));
    }
    if st.ended {
        return Err(corrupt("entry after the End entry"));
    }
    // The payload's window may look ahead into the CRC and beyond.
    let payload = Cursor::window(buf, start, end);
    let before = many.len();
    let mut next = st.clone();
    let res = if t == tag::BATCH {
        decode_batch(payload, &mut next, many)
    } else {
        decode_one(t, payload, &mut next, one)
    };
    match res {
        Ok(()) => {
            *st = next;
            Ok(end + 4)
        }
        Err(e) => {
            many.truncate(before);
            *one = None;
            Err(match e {
                CodecError::Incomplete => corrupt("entry payload ends inside a field"),
                e => e,
            })
        }
    }
}

#[inline(always)]
fn decode_one<S: Sink>(
    t: u8,
    payload: Cursor<'_>,
    st: &mut DecodeState,
    out: &mut S,
) -> Result<(), CodecError> {
    if st.ended {
        return Err(corrupt("entry after the End entry"));
    }
    let before = st.last_seq;
    st.last_seq = decode_payload(t, payload, st.last_seq, out)?;
    if st.handover && (t != tag::END || st.last_seq != before) {
        return Err(corrupt(
            "a handover must be followed by the End entry at the same exit",
        ));
    }
    st.handover = t == tag::HANDOVER;
    st.ended = t == tag::END;
    Ok(())
}

fn decode_batch(
    mut c: Cursor<'_>,
    st: &mut DecodeState,
    out: &mut VecDeque<Entry>,
) -> Result<(), CodecError> {
    if c.remaining() == 0 {
        return Err(corrupt("empty batch"));
    }
    while c.remaining() > 0 {
        let t = c.u8()?;
        if !tag::is_entry(t) {
            return Err(corrupt(format!("unknown entry type 0x{t:02x} in batch")));
        }
        let len = c.varint()?;
        let len = usize::try_from(len).map_err(|_| CodecError::Incomplete)?;
        if len > c.remaining() {
            return Err(CodecError::Incomplete);
        }
        let p = Cursor::window(c.buf, c.pos, c.pos + len);
        c.pos += len;
        decode_one(t, p, st, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc_all(enc: &mut FrameEncoder, es: &[Entry]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in es {
            enc.encode(e, &mut out).unwrap();
        }
        enc.flush(&mut out);
        out
    }

    fn dec_all(mut buf: &[u8]) -> Result<Vec<Entry>, CodecError> {
        let mut st = DecodeState::default();
        let mut q = VecDeque::new();
        while !buf.is_empty() {
            let mut one = None;
            let n = decode_frame(buf, &mut st, &mut one, &mut q)?;
            q.extend(one);
            buf = &buf[n..];
        }
        Ok(q.into())
    }

    #[test]
    fn varint_edges() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX - 1, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
            let mut c = Cursor::new(&b);
            assert_eq!(c.varint(), Ok(v));
            assert_eq!(c.remaining(), 0);
            for cut in 0..b.len() {
                assert_eq!(Cursor::new(&b[..cut]).varint(), Err(CodecError::Incomplete));
            }
        }
        let over = [0xff; 10];
        assert!(matches!(
            Cursor::new(&over).varint(),
            Err(CodecError::Corrupt(_))
        ));
        for s in [0, 1, -1, i32::MIN, i32::MAX, 12345, -98765] {
            assert_eq!(unzigzag(zigzag(s) as u32), s);
        }
    }

    /// The 8-bytes-at-a-time varint path reads past the cursor's end; it must
    /// give exactly what the byte-by-byte reference gives, whatever follows.
    #[test]
    fn varint_fast_path_matches_bytewise() {
        let mut vals = vec![0, 1, 0x7f, 0x80, u64::MAX];
        for bits in 1..64 {
            vals.extend([(1u64 << bits) - 1, 1u64 << bits, (1u64 << bits) + 1]);
        }
        let mut bad = [[0xffu8; 10], [0x80; 10]];
        bad[1][9] = 0x02;
        let mut encs: Vec<Vec<u8>> = vals
            .iter()
            .map(|&v| {
                let mut b = Vec::new();
                put_varint(&mut b, v);
                b
            })
            .collect();
        encs.extend(bad.iter().map(|b| b.to_vec()));
        // Non-minimal encodings are accepted by the reference decoder too.
        encs.push(vec![0x80, 0x80, 0x00]);
        encs.push(vec![
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ]);
        for enc in &encs {
            for slack in [0x00u8, 0x80, 0xff] {
                for end in 0..=enc.len() {
                    for extra in [0usize, 3, 8, 12] {
                        let mut buf = enc[..end].to_vec();
                        buf.extend(std::iter::repeat_n(slack, extra));
                        let mut fast = Cursor::window(&buf, 0, end);
                        let mut slow = Cursor::window(&buf, 0, end);
                        let a = fast.varint();
                        let b = slow.varint_bytewise();
                        assert_eq!(a, b, "{enc:02x?} end {end} slack {slack:02x}+{extra}");
                        assert_eq!(fast.pos(), slow.pos());
                        // And at an offset inside a larger buffer.
                        let mut buf2 = vec![0x55u8; 5];
                        buf2.extend_from_slice(&buf);
                        let mut c = Cursor::window(&buf2, 5, 5 + end);
                        assert_eq!(c.varint(), b);
                    }
                }
            }
        }
    }

    #[test]
    fn hot_entries_are_small() {
        let mut enc = FrameEncoder::new();
        let mut out = Vec::new();
        let n = enc
            .encode(
                &Entry::Input {
                    exit_seq: 4,
                    input: Input::DeadlineReached,
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(n, 7);
        let n = enc
            .encode(
                &Entry::Interrupt {
                    exit_seq: 4,
                    vector: 0x20,
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(n, 8);
    }

    #[test]
    fn backwards_and_after_end_rejected_without_state_change() {
        let mut enc = FrameEncoder::new();
        let mut out = Vec::new();
        enc.encode(
            &Entry::Interrupt {
                exit_seq: 10,
                vector: 1,
            },
            &mut out,
        )
        .unwrap();
        let len = out.len();
        assert_eq!(
            enc.encode(
                &Entry::Interrupt {
                    exit_seq: 9,
                    vector: 1
                },
                &mut out
            ),
            Err(CodecError::ExitSeqBackwards { prev: 10, got: 9 })
        );
        assert_eq!(out.len(), len);
        enc.encode(
            &Entry::End {
                exit_seq: 10,
                status: 0,
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(
            enc.encode(
                &Entry::Interrupt {
                    exit_seq: 11,
                    vector: 1
                },
                &mut out
            ),
            Err(CodecError::AfterEnd(10))
        );
    }

    #[test]
    fn batched_and_unbatched_decode_the_same() {
        let mut es = Vec::new();
        for i in 0..500u64 {
            es.push(Entry::Input {
                exit_seq: i * 4,
                input: Input::DeadlineReached,
            });
            es.push(Entry::Interrupt {
                exit_seq: i * 4,
                vector: 0x20,
            });
            if i % 50 == 7 {
                es.push(Entry::SyncPoint {
                    exit_seq: i * 4 + 1,
                    sync: Box::new(SyncPoint {
                        vcpu_state: vec![1; 100],
                        device_state: vec![2; 10],
                        pages: vec![(0x1000, vec![3; 4096]), (0x5000, vec![4; 4096])],
                        digest: Digest::of(b"x"),
                    }),
                });
            }
        }
        es.push(Entry::End {
            exit_seq: 5000,
            status: -3,
        });
        let plain = enc_all(&mut FrameEncoder::new(), &es);
        let lim = BatchLimits {
            max_entries: 64,
            max_bytes: 1024,
        };
        let batched = enc_all(&mut FrameEncoder::batched(lim), &es);
        assert!(batched.len() < plain.len());
        assert_eq!(dec_all(&plain).unwrap(), es);
        assert_eq!(dec_all(&batched).unwrap(), es);
    }

    #[test]
    fn corrupt_payload_with_valid_crc_is_reported() {
        // Interrupt frame with an empty payload after the delta.
        let mut f = vec![tag::INTERRUPT, 1, 0];
        put_crc(&mut f, 0);
        assert!(matches!(dec_all(&f), Err(CodecError::Corrupt(_))));
        // Huge page count with nothing behind it: no big allocation, corrupt.
        let mut p = vec![0u8];
        put_varint(&mut p, 0);
        put_varint(&mut p, 0);
        p.extend_from_slice(&[0; 32]);
        put_varint(&mut p, u64::MAX);
        let mut f = vec![tag::SYNC_POINT];
        put_varint(&mut f, p.len() as u64);
        f.extend_from_slice(&p);
        put_crc(&mut f, 0);
        assert!(matches!(dec_all(&f), Err(CodecError::Corrupt(_))));
        // Batch containing a batch.
        let mut f = vec![tag::BATCH, 2, tag::BATCH, 0];
        put_crc(&mut f, 0);
        assert!(matches!(dec_all(&f), Err(CodecError::Corrupt(_))));
        // Oversized length: corrupt at once, not "incomplete".
        let mut f = vec![tag::CONSOLE];
        put_varint(&mut f, MAX_FRAME_PAYLOAD as u64 + 1);
        assert!(matches!(frame_extent(&f), Err(CodecError::Corrupt(_))));
    }
}
