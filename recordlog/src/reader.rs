//! Reading a complete log from any `Read` (a file, a pipe, a byte slice).

use std::io::{self, Read};

use thiserror::Error;

use crate::entry::Entry;
use crate::header::{Header, HeaderError};
use crate::stream::StreamDecoder;

/// Errors of reading a log.
#[derive(Debug, Error)]
pub enum ReadError {
    /// The underlying reader failed.
    #[error("I/O error reading the log: {0}")]
    Io(#[from] io::Error),
    /// Wrong magic, unsupported version, or a damaged header.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The frame starting at `offset` is damaged; nothing after it is read.
    #[error("corrupt log entry at byte offset {offset}: {reason}")]
    Corrupt {
        /// Byte offset of the damaged frame from the start of the log.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The input ends inside the header or a frame starting at `offset`
    /// (e.g. the recorder died mid-write); all earlier entries were returned.
    #[error("log truncated: incomplete entry at byte offset {offset}")]
    Truncated {
        /// Byte offset of the incomplete frame (0: incomplete header).
        offset: u64,
    },
}

/// Reads a log from `R` to its end.
///
/// `next_entry` returns `Ok(None)` at a clean end of input (at a frame
/// boundary, or after the `End` entry), [`ReadError::Truncated`] if the input
/// stops inside a frame, [`ReadError::Corrupt`] at the first damaged frame.
/// It does its own buffering; wrapping `R` in a `BufReader` is unnecessary.
#[derive(Debug)]
pub struct LogReader<R: Read> {
    r: R,
    dec: StreamDecoder,
    header: Header,
    failed: bool,
}

impl<R: Read> LogReader<R> {
    /// Reads and checks the header.
    pub fn open(r: R) -> Result<(Self, Header), ReadError> {
        let mut r = r;
        let mut dec = StreamDecoder::new();
        loop {
            if let Some(h) = dec.read_header()? {
                let header = h.clone();
                let me = LogReader {
                    r,
                    dec,
                    header: header.clone(),
                    failed: false,
                };
                return Ok((me, header));
            }
            if dec.fill_from(&mut r)? == 0 {
                dec.finish()?;
            }
        }
    }

    /// The header read by [`LogReader::open`].
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next entry; `Ok(None)` at the end of the log.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        loop {
            if let Some(e) = self.dec.next_entry()? {
                return Ok(Some(e));
            }
            if self.dec.fill_from(&mut self.r)? == 0 {
                self.dec.finish()?;
                return Ok(None);
            }
        }
    }

    /// Byte offset just past the last complete frame decoded (where reading
    /// would resume).
    pub fn offset(&self) -> u64 {
        self.dec.offset()
    }

    /// `exit_seq` of the last decoded entry (0 before the first).
    pub fn last_exit_seq(&self) -> u64 {
        self.dec.last_exit_seq()
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.r
    }
}

impl<R: Read> Iterator for LogReader<R> {
    type Item = Result<Entry, ReadError>;

    /// Entries until the end; the first error is yielded once and ends the
    /// iteration.
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = self.next_entry().transpose();
        self.failed = matches!(r, Some(Err(_)));
        r
    }
}
