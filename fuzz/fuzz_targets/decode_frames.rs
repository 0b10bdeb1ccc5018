//! Like `decode_log`, but the harness gives every frame a correct length and
//! CRC32C, so that the fuzzer reaches the payload decoders (random bytes
//! almost never pass the CRC).
//!
//! Input: a sequence of `tag:u8 n:u8 payload[n]`, turned into
//! `tag varint(n) payload crc32c` behind a valid header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recordlog::{Header, InitialState, LogReader};

fuzz_target!(|data: &[u8]| {
    let mut log = Header::new(b"fuzz".to_vec(), InitialState::Boot)
        .encode()
        .unwrap_or_default();
    let mut rest = data;
    while let [tag, n, tail @ ..] = rest {
        let n = usize::from(*n).min(tail.len());
        let start = log.len();
        log.push(*tag);
        log.push(n as u8 & 0x7f);
        if n >= 0x80 {
            // Two-byte varint.
            let l = log.len();
            log[l - 1] |= 0x80;
            log.push((n >> 7) as u8);
        }
        log.extend_from_slice(&tail[..n]);
        let crc = crc32c::crc32c(&log[start..]);
        log.extend_from_slice(&crc.to_le_bytes());
        rest = &tail[n..];
    }
    if let Ok((mut r, _)) = LogReader::open(&log[..]) {
        while let Ok(Some(e)) = r.next_entry() {
            let _ = e.exit_seq();
        }
    }
});
