//! The migration header a source sends first: decoding it never panics,
//! and the bounds checks it feeds (pages, disk blocks) never overflow.
#![no_main]

use failover::migration::{check_disk_block, check_page, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = postcard::from_bytes::<Header>(data) {
        let probe = |i: usize| {
            data.get(i..i + 8)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
        };
        let _ = check_page(&h.memory, probe(0));
        if let Some(d) = &h.disk {
            let _ = check_disk_block(probe(8), probe(16), d.len);
            let _ = failover::migration::check_disk_name(&d.name);
        }
    }
});
