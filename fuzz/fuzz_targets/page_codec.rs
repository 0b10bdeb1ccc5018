//! The migration page codec: any bytes decode to exactly one page or an
//! error; any page encodes and decodes back to itself.
#![no_main]

use failover::migration::{decode_page, encode_page};
use libfuzzer_sys::fuzz_target;

const PAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut page = vec![0u8; PAGE];
    if let Some((&flag, rest)) = data.split_first() {
        let _ = decode_page(rest, flag & 1 == 1, &mut page);
    }
    // Round trip of a page built from the input.
    let mut src = vec![0u8; PAGE];
    for (i, b) in data.iter().enumerate() {
        src[(i * 61) % PAGE] = *b;
    }
    let mut enc = Vec::new();
    let compressed = encode_page(&src, &mut enc);
    decode_page(&enc, compressed, &mut page).expect("an encoded page decodes");
    assert_eq!(page, src);
});
