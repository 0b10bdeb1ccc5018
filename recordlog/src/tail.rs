//! Following a log that is still being written (`tail -f`).
//!
//! [`TailReader`] reads like [`crate::LogReader`], but where the input ends
//! (at a frame boundary or in the middle of a frame) it polls for more
//! instead of ending, until the log's `End` entry, a stop condition or an
//! idle timeout. Reading a `File` past its end returns 0 bytes and later
//! returns what was appended, so a `File` opened for reading is the usual
//! input; any `Read` works.

use std::fmt;
use std::io::Read;
use std::time::{Duration, Instant};

use crate::entry::Entry;
use crate::header::Header;
use crate::reader::ReadError;
use crate::stream::StreamDecoder;

/// How a [`TailReader`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailOptions {
    /// Pause between reads that returned nothing.
    pub poll_interval: Duration,
    /// Give up after this long without new bytes (`None`: wait until the
    /// stop condition or the `End` entry).
    pub idle_timeout: Option<Duration>,
}

impl Default for TailOptions {
    fn default() -> Self {
        TailOptions {
            poll_interval: Duration::from_millis(5),
            idle_timeout: None,
        }
    }
}

type StopFn = Box<dyn FnMut() -> bool + Send>;

/// A log reader that follows a growing input.
///
/// `next_entry` returns `Ok(None)` after the `End` entry, or when it gave up
/// waiting (stop condition or idle timeout) at a frame boundary; if it gives
/// up inside a frame it returns [`ReadError::Truncated`]. Giving up is not
/// final: calling `next_entry` again resumes following.
pub struct TailReader<R: Read> {
    r: R,
    dec: StreamDecoder,
    opts: TailOptions,
    stop: Option<StopFn>,
}

impl<R: Read> fmt::Debug for TailReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TailReader")
            .field("offset", &self.dec.offset())
            .field("opts", &self.opts)
            .field("has_stop", &self.stop.is_some())
            .finish()
    }
}

impl<R: Read> TailReader<R> {
    /// A follower of `r`; nothing is read yet.
    pub fn new(r: R, opts: TailOptions) -> Self {
        TailReader {
            r,
            dec: StreamDecoder::new(),
            opts,
            stop: None,
        }
    }

    /// Stop waiting for more input once `stop` returns true (it is called
    /// each time the input is exhausted, before sleeping).
    pub fn stop_when(mut self, stop: impl FnMut() -> bool + Send + 'static) -> Self {
        self.stop = Some(Box::new(stop));
        self
    }

    /// [`TailReader::new`] followed by [`TailReader::wait_header`].
    pub fn open(r: R, opts: TailOptions) -> Result<(Self, Header), ReadError> {
        let mut me = TailReader::new(r, opts);
        let h = me.wait_header()?;
        Ok((me, h))
    }

    /// Waits until the header has been written and returns it.
    /// [`ReadError::Truncated`] (offset 0) if it gave up waiting first.
    pub fn wait_header(&mut self) -> Result<Header, ReadError> {
        let mut idle_since = Instant::now();
        loop {
            if let Some(h) = self.dec.read_header()? {
                return Ok(h.clone());
            }
            if !self.wait_for_bytes(&mut idle_since)? {
                self.dec.finish()?;
            }
        }
    }

    /// The header, once read.
    pub fn header(&self) -> Option<&Header> {
        self.dec.header()
    }

    /// The next entry, waiting for it if needed (see the type's docs).
    pub fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        let mut idle_since = Instant::now();
        loop {
            if let Some(e) = self.dec.next_entry()? {
                return Ok(Some(e));
            }
            if self.dec.is_ended() && self.dec.buffered() == 0 {
                return Ok(None);
            }
            if !self.wait_for_bytes(&mut idle_since)? {
                self.dec.finish()?;
                return Ok(None);
            }
        }
    }

    /// Reads once; if nothing came, decides whether to keep waiting (sleeping
    /// one poll interval). Returns false to give up.
    fn wait_for_bytes(&mut self, idle_since: &mut Instant) -> Result<bool, ReadError> {
        if self.dec.fill_from(&mut self.r)? > 0 {
            *idle_since = Instant::now();
            return Ok(true);
        }
        if let Some(stop) = self.stop.as_mut() {
            if stop() {
                // Bytes written just before the stop condition became true
                // must not be lost: read once more.
                return Ok(self.dec.fill_from(&mut self.r)? > 0);
            }
        }
        if let Some(t) = self.opts.idle_timeout {
            if idle_since.elapsed() >= t {
                return Ok(false);
            }
        }
        std::thread::sleep(self.opts.poll_interval);
        Ok(true)
    }

    /// Byte offset just past the last complete frame decoded.
    pub fn offset(&self) -> u64 {
        self.dec.offset()
    }

    /// `exit_seq` of the last decoded entry (0 before the first).
    pub fn last_exit_seq(&self) -> u64 {
        self.dec.last_exit_seq()
    }

    /// Whether the `End` entry has been read.
    pub fn is_ended(&self) -> bool {
        self.dec.is_ended()
    }
}
