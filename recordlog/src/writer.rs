//! Writing a log to any `Write` (a file, a pipe, a socket).

use std::io::{self, Write};

use thiserror::Error;

use crate::codec::{BatchLimits, CodecError, FrameEncoder};
use crate::entry::Entry;
use crate::header::{Header, HeaderError};

/// Errors of writing a log.
#[derive(Debug, Error)]
pub enum WriteError {
    /// The underlying writer failed; the log must be considered broken.
    #[error("I/O error writing the log: {0}")]
    Io(#[from] io::Error),
    /// The entry was rejected (exit_seq going backwards, too large, after
    /// End); nothing was written.
    #[error("entry rejected: {0}")]
    Encode(#[from] CodecError),
    /// The header could not be encoded.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// An earlier I/O error left the log in an unknown state.
    #[error("log writer failed earlier; refusing to write more")]
    Poisoned,
}

/// How a [`LogWriter`] frames and buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// Share one CRC among several entries (see [`FrameEncoder::batched`]);
    /// `None`: one frame per entry.
    pub batch: Option<BatchLimits>,
    /// Write to the underlying writer when this many encoded bytes are
    /// buffered (0: after every entry).
    pub buffer_bytes: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            batch: None,
            buffer_bytes: 64 << 10,
        }
    }
}

/// Appends entries to a log.
///
/// Encoded frames are buffered in memory and handed to `W` when
/// `buffer_bytes` accumulate, on [`LogWriter::flush`], and (best effort) on
/// drop. A recorder flushes at least before it relies on the log being
/// durable or visible to a follower. In batched mode entries sit in the open
/// batch until the batch is full or `flush` is called.
#[derive(Debug)]
pub struct LogWriter<W: Write> {
    w: Option<W>,
    enc: FrameEncoder,
    buf: Vec<u8>,
    buffer_bytes: usize,
    /// Bytes of header and complete frames produced (buffered or written).
    produced: u64,
    poisoned: bool,
}

impl<W: Write> LogWriter<W> {
    /// Starts a log with `header`, one frame per entry.
    pub fn new(w: W, header: &Header) -> Result<Self, WriteError> {
        LogWriter::with_options(w, header, WriterOptions::default())
    }

    /// Starts a log with `header` and explicit options.
    pub fn with_options(w: W, header: &Header, opts: WriterOptions) -> Result<Self, WriteError> {
        let buf = header.encode()?;
        let enc = match opts.batch {
            Some(l) => FrameEncoder::batched(l),
            None => FrameEncoder::new(),
        };
        let mut me = LogWriter {
            w: Some(w),
            enc,
            produced: buf.len() as u64,
            buf,
            buffer_bytes: opts.buffer_bytes,
            poisoned: false,
        };
        me.write_out_if_full()?;
        Ok(me)
    }

    /// Appends one entry. Its `exit_seq` must not be lower than the previous
    /// entry's ([`CodecError::ExitSeqBackwards`]); nothing may follow `End`.
    pub fn append(&mut self, entry: &Entry) -> Result<(), WriteError> {
        if self.poisoned {
            return Err(WriteError::Poisoned);
        }
        self.produced += self.enc.encode(entry, &mut self.buf)? as u64;
        self.write_out_if_full()
    }

    fn write_out_if_full(&mut self) -> Result<(), WriteError> {
        if self.buf.len() >= self.buffer_bytes.max(1) {
            self.write_out()?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<(), WriteError> {
        if self.poisoned {
            return Err(WriteError::Poisoned);
        }
        if let Some(w) = self.w.as_mut() {
            if let Err(e) = w.write_all(&self.buf) {
                self.poisoned = true;
                return Err(e.into());
            }
        }
        self.buf.clear();
        Ok(())
    }

    /// Closes the open batch, writes everything buffered and flushes `W`.
    pub fn flush(&mut self) -> Result<(), WriteError> {
        if self.poisoned {
            return Err(WriteError::Poisoned);
        }
        self.produced += self.enc.flush(&mut self.buf) as u64;
        self.write_out()?;
        if let Some(w) = self.w.as_mut() {
            if let Err(e) = w.flush() {
                self.poisoned = true;
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Size of the log so far: header plus every complete frame, whether
    /// still buffered or already written (entries in an open batch are not
    /// counted until it closes).
    pub fn bytes_written(&self) -> u64 {
        self.produced
    }

    /// Encoded bytes not yet handed to `W`.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// `exit_seq` of the last appended entry.
    pub fn last_exit_seq(&self) -> Option<u64> {
        self.enc.last_exit_seq()
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        match self.w.as_ref() {
            Some(w) => w,
            // `w` is only taken by `into_inner`, which consumes `self`.
            None => unreachable!("LogWriter used after into_inner"),
        }
    }

    /// Flushes and returns the underlying writer.
    pub fn into_inner(mut self) -> Result<W, WriteError> {
        self.flush()?;
        self.w.take().ok_or(WriteError::Poisoned)
    }
}

impl<W: Write> Drop for LogWriter<W> {
    fn drop(&mut self) {
        if self.w.is_some() && !self.poisoned {
            let _ = self.flush();
        }
    }
}
