//! The on-disk mailbox: an append-only log of records on the virtio-blk
//! disk, every record checksummed, replayed at boot.
//!
//! Layout (sectors of 512 bytes, integers little-endian):
//! * sector 0, the superblock: `TNDMBOX1`, format version (1), epoch,
//!   boot count, then a hash of those 32 bytes.
//! * from sector 8, records back to back, each a header sector followed by
//!   its data rounded up to whole sectors. Header: magic `TNDMREC1`,
//!   epoch, sequence number (0, 1, ...), kind (1 = message, 2 = deletion),
//!   data length, data hash, uid (messages), its own sector number, and at
//!   byte 504 a hash of bytes 0..504.
//! * a message record's data is the message as received (CRLF line ends,
//!   dot-unstuffed); a deletion record's data is the list of deleted uids
//!   (u64 each).
//!
//! A record is written (header and data in one go) and flushed before the
//! SMTP `250` (or the POP3 `+OK` to QUIT) is sent. At boot the log is
//! read until the first header that is not the expected next one (bad
//! magic, hash, epoch, sequence or position): that is the end. Every
//! record's header is checked; the last record's data is checked too (the
//! only one a crash can have torn; an unchecked one is dropped, its client
//! never got its `250`). Messages are checked again when read (RETR).

use crate::rt::mix64;
use crate::virtio::blk::Blk;
use crate::virtio::SECTOR_SIZE;

pub const MAX_MSGS: usize = 1024;
/// Largest message accepted (the SMTP `SIZE`).
pub const MAX_MSG: usize = 2 << 20;
const SB_MAGIC: u64 = u64::from_le_bytes(*b"TNDMBOX1");
const REC_MAGIC: u64 = u64::from_le_bytes(*b"TNDMREC1");
const FORMAT_VERSION: u64 = 1;
const LOG_START: u64 = 8;
const KIND_MSG: u64 = 1;
const KIND_DEL: u64 = 2;
/// Largest single disk request.
const CHUNK: usize = 256 * 1024;

/// The per-message checksum: a Fletcher-style pair of 64-bit sums over
/// little-endian words (a position-weighted sum: any changed, swapped or
/// torn word shows), finished with a mix. Two additions per 8 bytes: the
/// cheapest pass that still catches torn and stale sectors, on a CPU that
/// is emulated instruction by instruction.
pub fn hash(data: &[u8]) -> u64 {
    let (mut a, mut b) = (0x7461_6e64_656du64, 0x6d61_696cu64);
    let mut chunks = data.chunks_exact(32);
    for (n, c) in (&mut chunks).enumerate() {
        for k in 0..4 {
            a = a.wrapping_add(get(c, k * 8));
            b = b.wrapping_add(a);
        }
        // 2 KiB hashed: ~550 instructions, weighed as 400 scanned bytes.
        if n % 64 == 63 {
            crate::io::progress(400);
        }
    }
    let mut words = chunks.remainder().chunks_exact(8);
    for c in &mut words {
        a = a.wrapping_add(get(c, 0));
        b = b.wrapping_add(a);
    }
    let mut tail = [0u8; 8];
    let rest = words.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    a = a.wrapping_add(u64::from_le_bytes(tail));
    b = b.wrapping_add(a);
    mix64(a ^ b.rotate_left(32) ^ mix64(data.len() as u64))
}

fn get(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

fn put(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

#[derive(Clone, Copy)]
pub struct Meta {
    pub uid: u64,
    /// First data sector.
    pub sector: u64,
    pub len: u64,
    pub hash: u64,
    pub deleted: bool,
}

pub const NO_META: Meta = Meta {
    uid: 0,
    sector: 0,
    len: 0,
    hash: 0,
    deleted: false,
};

pub struct Store {
    blk: Blk,
    epoch: u64,
    pub boots: u64,
    next_seq: u64,
    /// Sector where the next record goes.
    tail: u64,
    next_uid: u64,
    pub msgs: &'static mut [Meta],
    pub n: usize,
    /// One sector-aligned scratch area (headers, deletion records).
    scratch: &'static mut [u8],
}

pub enum StoreError {
    Full,
    Io(&'static [u8]),
    Corrupt(&'static [u8]),
}

fn sectors(len: u64) -> u64 {
    len.div_ceil(SECTOR_SIZE as u64)
}

impl Store {
    /// Open (or format) the mailbox on `blk`. `scratch` must hold at least
    /// 8 sectors; `tmp` (a message buffer, MAX_MSG rounded up) is used
    /// only while opening, to check the last message.
    pub fn open(
        mut blk: Blk,
        scratch: &'static mut [u8],
        msgs: &'static mut [Meta],
        tmp: &mut [u8],
    ) -> Result<Store, &'static [u8]> {
        let cap = blk.capacity;
        if cap < LOG_START + 16 {
            return Err(b"mail: disk too small for a mailbox");
        }
        blk.rw_raw(false, 0, scratch.as_mut_ptr(), SECTOR_SIZE)?;
        let sb = &mut scratch[..SECTOR_SIZE];
        let valid = get(sb, 0) == SB_MAGIC
            && get(sb, 8) == FORMAT_VERSION
            && get(sb, 32) == hash(&sb[..32]);
        let (epoch, boots) = if valid {
            (get(sb, 16), get(sb, 24) + 1)
        } else {
            crate::io::putln(b"mail: formatting the disk as an empty mailbox");
            (mix64(cap ^ 0x6d61_696c_626f_7831), 1)
        };
        sb.fill(0);
        put(sb, 0, SB_MAGIC);
        put(sb, 8, FORMAT_VERSION);
        put(sb, 16, epoch);
        put(sb, 24, boots);
        let h = hash(&sb[..32]);
        put(sb, 32, h);
        if !valid {
            // A fresh log: make sure no old header sits at its start.
            scratch[SECTOR_SIZE..2 * SECTOR_SIZE].fill(0);
            blk.rw_raw(
                true,
                LOG_START,
                scratch[SECTOR_SIZE..].as_mut_ptr(),
                SECTOR_SIZE,
            )?;
        }
        blk.rw_raw(true, 0, scratch.as_mut_ptr(), SECTOR_SIZE)?;
        blk.flush()?;
        let mut st = Store {
            blk,
            epoch,
            boots,
            next_seq: 0,
            tail: LOG_START,
            next_uid: 1,
            msgs,
            n: 0,
            scratch,
        };
        st.replay(tmp)?;
        Ok(st)
    }

    /// Read the log; see the module docs.
    fn replay(&mut self, tmp: &mut [u8]) -> Result<(), &'static [u8]> {
        let cap = self.blk.capacity;
        let mut last_msg: Option<(usize, u64)> = None; // (index, record start)
        loop {
            if self.tail >= cap {
                break;
            }
            let p = self.scratch.as_mut_ptr();
            self.blk.rw_raw(false, self.tail, p, SECTOR_SIZE)?;
            let h = &self.scratch[..SECTOR_SIZE];
            let len = get(h, 32);
            if get(h, 0) != REC_MAGIC
                || get(h, 504) != hash(&h[..504])
                || get(h, 8) != self.epoch
                || get(h, 16) != self.next_seq
                || get(h, 56) != self.tail
                || len > MAX_MSG as u64
                || self.tail + 1 + sectors(len) > cap
            {
                break;
            }
            let (kind, dhash, uid) = (get(h, 24), get(h, 40), get(h, 48));
            let start = self.tail;
            match kind {
                KIND_MSG if self.n < self.msgs.len() => {
                    self.msgs[self.n] = Meta {
                        uid,
                        sector: start + 1,
                        len,
                        hash: dhash,
                        deleted: false,
                    };
                    last_msg = Some((self.n, start));
                    self.n += 1;
                    self.next_uid = self.next_uid.max(uid + 1);
                }
                KIND_DEL
                    if len <= (self.scratch.len() - SECTOR_SIZE) as u64
                        && len.is_multiple_of(8) =>
                {
                    last_msg = None;
                    let n = sectors(len) as usize * SECTOR_SIZE;
                    let p = self.scratch[SECTOR_SIZE..].as_mut_ptr();
                    if n > 0 {
                        self.blk.rw_raw(false, start + 1, p, n)?;
                    }
                    let data = &self.scratch[SECTOR_SIZE..SECTOR_SIZE + len as usize];
                    if hash(data) != dhash {
                        break;
                    }
                    for i in 0..len as usize / 8 {
                        let uid = get(data, i * 8);
                        if let Some(m) = self.msgs[..self.n].iter_mut().find(|m| m.uid == uid) {
                            m.deleted = true;
                        }
                    }
                }
                _ => break,
            }
            self.next_seq += 1;
            self.tail = start + 1 + sectors(len);
        }
        // The last record may be torn: check its data.
        if let Some((i, start)) = last_msg {
            if self.read(i, tmp).is_err() {
                crate::io::putln(b"mail: dropping a torn last message");
                self.n -= 1;
                self.next_seq -= 1;
                self.tail = start;
            }
        }
        Ok(())
    }

    fn header(&mut self, kind: u64, data: &[u8], uid: u64) -> [u8; SECTOR_SIZE] {
        let mut h = [0u8; SECTOR_SIZE];
        put(&mut h, 0, REC_MAGIC);
        put(&mut h, 8, self.epoch);
        put(&mut h, 16, self.next_seq);
        put(&mut h, 24, kind);
        put(&mut h, 32, data.len() as u64);
        put(&mut h, 40, hash(data));
        put(&mut h, 48, uid);
        put(&mut h, 56, self.tail);
        let x = hash(&h[..504]);
        put(&mut h, 504, x);
        h
    }

    /// Write `buf[..SECTOR_SIZE + len]` (header sector then data) at the
    /// tail, in chunks, then flush.
    fn write_record(&mut self, buf: &mut [u8], len: usize) -> Result<(), StoreError> {
        let total = SECTOR_SIZE + sectors(len as u64) as usize * SECTOR_SIZE;
        if self.tail + (total / SECTOR_SIZE) as u64 > self.blk.capacity || total > buf.len() {
            return Err(StoreError::Full);
        }
        let mut off = 0;
        while off < total {
            let n = (total - off).min(CHUNK);
            let sector = self.tail + (off / SECTOR_SIZE) as u64;
            self.blk
                .rw_raw(true, sector, buf[off..].as_mut_ptr(), n)
                .map_err(StoreError::Io)?;
            off += n;
        }
        self.blk.flush().map_err(StoreError::Io)?;
        self.next_seq += 1;
        self.tail += (total / SECTOR_SIZE) as u64;
        Ok(())
    }

    /// Store a message held in `buf[SECTOR_SIZE..SECTOR_SIZE + len]` (the
    /// first sector of `buf` is room for the header; `buf` must extend to
    /// the next sector boundary after the message). Durable on return.
    pub fn append(&mut self, buf: &mut [u8], len: usize) -> Result<u64, StoreError> {
        if self.n >= self.msgs.len() {
            return Err(StoreError::Full);
        }
        let uid = self.next_uid;
        let h = self.header(KIND_MSG, &buf[SECTOR_SIZE..SECTOR_SIZE + len], uid);
        buf[..SECTOR_SIZE].copy_from_slice(&h);
        let sector = self.tail + 1;
        let dhash = get(&h, 40);
        self.write_record(buf, len)?;
        self.msgs[self.n] = Meta {
            uid,
            sector,
            len: len as u64,
            hash: dhash,
            deleted: false,
        };
        self.n += 1;
        self.next_uid += 1;
        Ok(uid)
    }

    /// Durably delete the messages with these uids.
    pub fn delete(&mut self, uids: &[u64]) -> Result<(), StoreError> {
        let per = (self.scratch.len() - SECTOR_SIZE) / 8;
        for group in uids.chunks(per) {
            let len = group.len() * 8;
            let scratch = core::mem::take(&mut self.scratch);
            for (i, &u) in group.iter().enumerate() {
                put(scratch, SECTOR_SIZE + i * 8, u);
            }
            let h = self.header(KIND_DEL, &scratch[SECTOR_SIZE..SECTOR_SIZE + len], 0);
            scratch[..SECTOR_SIZE].copy_from_slice(&h);
            let r = self.write_record(scratch, len);
            self.scratch = scratch;
            r?;
            for &u in group {
                if let Some(m) = self.msgs[..self.n].iter_mut().find(|m| m.uid == u) {
                    m.deleted = true;
                }
            }
        }
        Ok(())
    }

    /// Read message `i` into `buf` (which must hold its length rounded up
    /// to whole sectors) and check its hash.
    pub fn read(&mut self, i: usize, buf: &mut [u8]) -> Result<usize, StoreError> {
        let m = self.msgs[i];
        let total = sectors(m.len) as usize * SECTOR_SIZE;
        if total > buf.len() {
            return Err(StoreError::Corrupt(b"message larger than the buffer"));
        }
        let mut off = 0;
        while off < total {
            let n = (total - off).min(CHUNK);
            self.blk
                .rw_raw(
                    false,
                    m.sector + (off / SECTOR_SIZE) as u64,
                    buf[off..].as_mut_ptr(),
                    n,
                )
                .map_err(StoreError::Io)?;
            off += n;
        }
        if hash(&buf[..m.len as usize]) != m.hash {
            return Err(StoreError::Corrupt(b"message checksum mismatch"));
        }
        Ok(m.len as usize)
    }
}
