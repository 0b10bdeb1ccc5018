//! A push-style decoder: feed it bytes as they arrive (from a file, a pipe or
//! a network stream), pull header and entries out.
//!
//! It never allocates more than the bytes it was fed plus the entries it
//! decodes from them: length fields are checked against the bytes present,
//! never used to reserve memory ahead.

use std::collections::VecDeque;
use std::io::{self, Read};

use crate::codec::{self, CodecError, DecodeState};
use crate::entry::Entry;
use crate::header::{Header, HeaderError};
use crate::reader::ReadError;

/// Bytes read at a time by [`StreamDecoder::fill_from`] (more when a large
/// frame is known to be incomplete).
const READ_CHUNK: usize = 64 << 10;
/// Upper bound of one read when a large frame is pending.
const MAX_READ: usize = 16 << 20;

#[derive(Debug, Clone)]
enum Fault {
    Header(HeaderError),
    Corrupt { offset: u64, reason: String },
}

/// Incremental decoder of a log byte stream (header, then frames).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    buf: Vec<u8>,
    /// Start of the undecoded bytes in `buf`.
    pos: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    header: Option<Header>,
    st: DecodeState,
    pending: VecDeque<Entry>,
    /// Size of the incomplete frame at `pos`, when known.
    want: usize,
    fault: Option<Fault>,
}

impl StreamDecoder {
    /// A decoder expecting the header first.
    pub fn new() -> Self {
        StreamDecoder::default()
    }

    /// Appends bytes received from the stream.
    pub fn feed(&mut self, data: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(data);
    }

    /// Reads once from `r` into the decoder (retrying on `Interrupted`).
    /// Returns the number of bytes read; 0 means end of input for now.
    pub fn fill_from<R: Read + ?Sized>(&mut self, r: &mut R) -> io::Result<usize> {
        self.compact();
        let missing = self.want.saturating_sub(self.buffered());
        let chunk = missing.clamp(READ_CHUNK, MAX_READ);
        let old = self.buf.len();
        self.buf.resize(old + chunk, 0);
        let res = loop {
            match r.read(&mut self.buf[old..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let n = *res.as_ref().unwrap_or(&0);
        self.buf.truncate(old + n);
        res
    }

    fn compact(&mut self) {
        if self.pos > 0 && (self.pos == self.buf.len() || self.pos >= self.buf.len() / 2) {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
    }

    /// Bytes fed but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Stream offset of the first byte not yet decoded: the end of the header
    /// or of the last complete frame. Entries of a batch frame are all
    /// counted as soon as the frame is decoded, even before they are pulled.
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// The header, once decoded.
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// Whether the `End` entry was decoded (it may still be pending).
    pub fn is_ended(&self) -> bool {
        self.st.ended
    }

    /// `exit_seq` of the last decoded entry (0 before the first).
    pub fn last_exit_seq(&self) -> u64 {
        self.st.last_seq
    }

    fn fault_error(f: &Fault) -> ReadError {
        match f {
            Fault::Header(h) => ReadError::Header(h.clone()),
            Fault::Corrupt { offset, reason } => ReadError::Corrupt {
                offset: *offset,
                reason: reason.clone(),
            },
        }
    }

    fn fail(&mut self, f: Fault) -> ReadError {
        let e = Self::fault_error(&f);
        self.fault = Some(f);
        e
    }

    /// Decodes the header if enough bytes are present. `Ok(None)`: feed more.
    pub fn read_header(&mut self) -> Result<Option<&Header>, ReadError> {
        if let Some(f) = &self.fault {
            return Err(Self::fault_error(f));
        }
        if self.header.is_none() {
            match Header::decode(&self.buf[self.pos..]) {
                Ok((h, n)) => {
                    self.header = Some(h);
                    self.pos += n;
                }
                Err(HeaderError::Truncated) => return Ok(None),
                Err(e) => return Err(self.fail(Fault::Header(e))),
            }
        }
        Ok(self.header.as_ref())
    }

    /// The next entry, decoding the header first if needed. `Ok(None)`: feed
    /// more bytes (or the log ended: see [`StreamDecoder::is_ended`]). A
    /// corrupt frame is reported with its offset and the decoder stays
    /// failed.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        match self.pending.pop_front() {
            Some(e) => Ok(Some(e)),
            None => self.decode_next(),
        }
    }

    /// [`StreamDecoder::next_entry`] when no decoded entry is pending.
    fn decode_next(&mut self) -> Result<Option<Entry>, ReadError> {
        if self.read_header()?.is_none() || self.pos == self.buf.len() {
            return Ok(None);
        }
        let offset = self.offset();
        let mut one = None;
        match codec::decode_frame(
            &self.buf[self.pos..],
            &mut self.st,
            &mut one,
            &mut self.pending,
        ) {
            Ok(n) => {
                self.pos += n;
                self.want = 0;
                // A plain entry frame: returned without passing through the
                // queue.
                Ok(match one {
                    Some(e) => Some(e),
                    None => self.pending.pop_front(),
                })
            }
            Err(CodecError::Incomplete) => {
                self.want = codec::frame_extent(&self.buf[self.pos..]).unwrap_or(0);
                Ok(None)
            }
            Err(e) => Err(self.fail(Fault::Corrupt {
                offset,
                reason: e.to_string(),
            })),
        }
    }

    /// Call at the end of the input, after [`StreamDecoder::next_entry`]
    /// returned `Ok(None)`: `Ok(())` if the input ended at a frame boundary,
    /// [`ReadError::Truncated`] (with the offset of the incomplete header or
    /// frame) if not.
    pub fn finish(&self) -> Result<(), ReadError> {
        if let Some(f) = &self.fault {
            return Err(Self::fault_error(f));
        }
        if self.header.is_none() || self.buffered() > 0 {
            return Err(ReadError::Truncated {
                offset: self.offset(),
            });
        }
        Ok(())
    }
}
