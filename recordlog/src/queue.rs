//! An in-memory queue of encoded log bytes between the recorder (which
//! appends) and the sender (which drains and ships them to the secondary).
//!
//! The queue holds *chunks*: byte strings made of whole frames (or the
//! header). A drain never splits a chunk, so whatever it returns can be fed
//! to a [`crate::StreamDecoder`] on the other side in any grouping. Byte
//! accounting: every byte pushed is either pending or drained; the drained
//! total is the stream offset the sender has reached.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::codec::{BatchLimits, CodecError, FrameEncoder};
use crate::entry::Entry;
use crate::header::{Header, HeaderError};

/// Errors of the queue.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// The queue was closed; nothing more can be pushed.
    #[error("log queue is closed")]
    Closed,
    /// The entry was rejected by the encoder.
    #[error("entry rejected: {0}")]
    Encode(#[from] CodecError),
    /// The header could not be encoded.
    #[error(transparent)]
    Header(#[from] HeaderError),
}

#[derive(Debug)]
struct Chunk {
    len: usize,
    last_exit_seq: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    data: VecDeque<u8>,
    chunks: VecDeque<Chunk>,
    pushed: u64,
    drained: u64,
    closed: bool,
    /// Most bytes pending at once ([`LogQueue::bounded`]; 0: unbounded).
    bound: u64,
    /// Most bytes ever pending.
    high_water: u64,
    /// Pushes that waited for room, and how long in all.
    full_waits: u64,
    full_wait_ns: u64,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

/// What one drain returned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Drained {
    /// Whole chunks, concatenated.
    pub bytes: Vec<u8>,
    /// How many chunks.
    pub chunks: usize,
    /// The highest `exit_seq` of an entry in `bytes`, if any. Entries with
    /// the same `exit_seq` may still follow in later chunks.
    pub last_exit_seq: Option<u64>,
    /// Stream offset of `bytes[0]` (bytes drained before this drain).
    pub start_offset: u64,
}

/// Byte accounting of a [`LogQueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Bytes ever pushed.
    pub pushed_bytes: u64,
    /// Bytes ever drained (= the sender's stream offset).
    pub drained_bytes: u64,
    /// Bytes waiting (`pushed_bytes - drained_bytes`).
    pub pending_bytes: u64,
    /// Chunks waiting.
    pub pending_chunks: usize,
    /// Whether [`LogQueue::close`] was called.
    pub closed: bool,
    /// The bound on pending bytes (0: unbounded).
    pub bound_bytes: u64,
    /// Most bytes ever pending at once.
    pub high_water_bytes: u64,
    /// Pushes that waited because the queue was full.
    pub full_waits: u64,
    /// Time those pushes waited, in all.
    pub full_wait: Duration,
}

/// A cloneable handle to a shared queue of encoded log chunks
/// (`Mutex` + `Condvar`; unbounded unless made [`LogQueue::bounded`]).
#[derive(Debug, Clone, Default)]
pub struct LogQueue {
    shared: Arc<Shared>,
}

impl LogQueue {
    /// An empty, open, unbounded queue.
    pub fn new() -> Self {
        LogQueue::default()
    }

    /// An empty, open queue that holds at most `bytes` pending bytes: a
    /// push that would exceed it waits until the drains make room (the
    /// producer waits; nothing is ever dropped). A chunk larger than the
    /// bound is taken once the queue is empty.
    pub fn bounded(bytes: u64) -> Self {
        let q = LogQueue::default();
        q.lock().bound = bytes;
        q
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock cannot leave `State`
        // inconsistent in a way that matters more than losing the log.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a chunk of whole frames (or the header). `last_exit_seq`: the
    /// highest `exit_seq` of an entry in it.
    /// With a bound, waits while the chunk does not fit (see
    /// [`LogQueue::bounded`]); a close ends the wait with `Closed`.
    pub fn push(&self, chunk: &[u8], last_exit_seq: Option<u64>) -> Result<(), QueueError> {
        let mut st = self.lock();
        if st.closed {
            return Err(QueueError::Closed);
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let full = |st: &State| {
            let pending = st.pushed - st.drained;
            st.bound > 0 && pending > 0 && pending + chunk.len() as u64 > st.bound
        };
        if full(&st) {
            let since = Instant::now();
            while full(&st) && !st.closed {
                st = self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.full_waits += 1;
            st.full_wait_ns += since.elapsed().as_nanos() as u64;
            if st.closed {
                return Err(QueueError::Closed);
            }
        }
        st.data.extend(chunk);
        st.chunks.push_back(Chunk {
            len: chunk.len(),
            last_exit_seq,
        });
        st.pushed += chunk.len() as u64;
        st.high_water = st.high_water.max(st.pushed - st.drained);
        drop(st);
        self.shared.cond.notify_all();
        Ok(())
    }

    fn drain_locked(&self, st: &mut State, max_bytes: usize) -> Drained {
        let mut n = 0usize;
        let mut chunks = 0usize;
        let mut last = None;
        while let Some(c) = st.chunks.front() {
            // Always return at least one chunk, however large.
            if chunks > 0 && n + c.len > max_bytes {
                break;
            }
            n += c.len;
            chunks += 1;
            last = c.last_exit_seq.or(last);
            st.chunks.pop_front();
        }
        let mut bytes = Vec::with_capacity(n);
        let (a, b) = st.data.as_slices();
        let from_a = n.min(a.len());
        bytes.extend_from_slice(&a[..from_a]);
        bytes.extend_from_slice(&b[..n - from_a]);
        st.data.drain(..n);
        let start_offset = st.drained;
        st.drained += n as u64;
        Drained {
            bytes,
            chunks,
            last_exit_seq: last,
            start_offset,
        }
    }

    /// Removes whole chunks totalling at most `max_bytes` (but at least one
    /// chunk if any is pending) and returns their bytes.
    pub fn drain_up_to(&self, max_bytes: usize) -> Vec<u8> {
        self.drain(max_bytes).bytes
    }

    /// Like [`LogQueue::drain_up_to`], with the details.
    pub fn drain(&self, max_bytes: usize) -> Drained {
        let mut st = self.lock();
        let d = self.drain_locked(&mut st, max_bytes);
        drop(st);
        self.shared.cond.notify_all();
        d
    }

    /// Waits up to `timeout` (forever if `None`) for data, then drains like
    /// [`LogQueue::drain`]. `None` if nothing came in time, or if the queue
    /// is closed and empty.
    pub fn wait_drain(&self, max_bytes: usize, timeout: Option<Duration>) -> Option<Drained> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        while st.chunks.is_empty() {
            if st.closed {
                return None;
            }
            st = match deadline {
                None => self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.shared
                        .cond
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        let d = self.drain_locked(&mut st, max_bytes);
        drop(st);
        self.shared.cond.notify_all();
        Some(d)
    }

    /// Back-pressure for the producer: waits up to `timeout` until at most
    /// `limit` bytes are pending. Returns whether that is the case.
    pub fn wait_below(&self, limit: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if st.pushed - st.drained <= limit {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || st.closed {
                return false;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// No more pushes; drains still return what is pending, then waiters
    /// get `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.shared.cond.notify_all();
    }

    /// Whether [`LogQueue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Byte accounting.
    pub fn stats(&self) -> QueueStats {
        let st = self.lock();
        QueueStats {
            pushed_bytes: st.pushed,
            drained_bytes: st.drained,
            pending_bytes: st.pushed - st.drained,
            pending_chunks: st.chunks.len(),
            closed: st.closed,
            bound_bytes: st.bound,
            high_water_bytes: st.high_water,
            full_waits: st.full_waits,
            full_wait: Duration::from_nanos(st.full_wait_ns),
        }
    }

    /// Bytes waiting to be drained.
    pub fn pending_bytes(&self) -> u64 {
        let st = self.lock();
        st.pushed - st.drained
    }
}

/// The recorder's side: encodes entries and pushes their frames to a
/// [`LogQueue`]. The header is pushed first, so the drained bytes form a
/// complete log stream.
#[derive(Debug)]
pub struct QueueWriter {
    queue: LogQueue,
    enc: FrameEncoder,
    scratch: Vec<u8>,
}

impl QueueWriter {
    /// One frame (one chunk) per entry.
    pub fn new(queue: LogQueue, header: &Header) -> Result<Self, QueueError> {
        QueueWriter::with_encoder(queue, header, FrameEncoder::new())
    }

    /// Batched frames: entries are pushed when a batch fills up or on
    /// [`QueueWriter::flush`].
    pub fn batched(
        queue: LogQueue,
        header: &Header,
        limits: BatchLimits,
    ) -> Result<Self, QueueError> {
        QueueWriter::with_encoder(queue, header, FrameEncoder::batched(limits))
    }

    fn with_encoder(
        queue: LogQueue,
        header: &Header,
        enc: FrameEncoder,
    ) -> Result<Self, QueueError> {
        queue.push(&header.encode()?, None)?;
        Ok(QueueWriter {
            queue,
            enc,
            scratch: Vec::with_capacity(256),
        })
    }

    /// Encodes `entry` and pushes the resulting frames (if any).
    pub fn append(&mut self, entry: &Entry) -> Result<(), QueueError> {
        self.scratch.clear();
        self.enc.encode(entry, &mut self.scratch)?;
        self.push_scratch()
    }

    /// Closes the open batch and pushes it.
    pub fn flush(&mut self) -> Result<(), QueueError> {
        self.scratch.clear();
        self.enc.flush(&mut self.scratch);
        self.push_scratch()
    }

    fn push_scratch(&mut self) -> Result<(), QueueError> {
        let r = self.queue.push(&self.scratch, self.enc.emitted_exit_seq());
        if self.scratch.capacity() > 1 << 20 {
            self.scratch = Vec::with_capacity(256);
        }
        r
    }

    /// `exit_seq` of the last appended entry.
    pub fn last_exit_seq(&self) -> Option<u64> {
        self.enc.last_exit_seq()
    }

    /// The queue.
    pub fn queue(&self) -> &LogQueue {
        &self.queue
    }
}
