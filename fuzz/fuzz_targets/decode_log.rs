//! Feeds arbitrary bytes to the log decoders: they must end with an entry
//! stream, `Ok(None)` or an error, never a panic, hang or huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recordlog::{LogReader, StreamDecoder, MAGIC};

fn read_all(data: &[u8]) -> Vec<recordlog::Entry> {
    let mut out = Vec::new();
    if let Ok((mut r, _h)) = LogReader::open(data) {
        while let Ok(Some(e)) = r.next_entry() {
            out.push(e);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    // As given (exercises the header checks)...
    let a = read_all(data);
    // ...and behind a valid-looking magic + version, so frames get reached
    // even when the fuzzer has not discovered the header yet.
    let mut with_magic = MAGIC.to_vec();
    with_magic.extend_from_slice(&1u32.to_le_bytes());
    with_magic.extend_from_slice(data);
    let _ = read_all(&with_magic);

    // The push decoder, fed in small pieces, must agree with the reader.
    let mut dec = StreamDecoder::new();
    let mut b = Vec::new();
    'outer: for chunk in data.chunks(7) {
        dec.feed(chunk);
        loop {
            match dec.next_entry() {
                Ok(Some(e)) => b.push(e),
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
    }
    assert_eq!(a, b, "LogReader and StreamDecoder disagree");
});
