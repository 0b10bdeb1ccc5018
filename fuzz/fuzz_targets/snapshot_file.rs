//! Snapshot files: any bytes give a decoded snapshot or a clear error;
//! loading the memory image into a small VM's memory checks every page.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm::snapshot::{self, SNAPSHOT_MAGIC, SNAPSHOT_VERSION};

fuzz_target!(|data: &[u8]| {
    let _ = snapshot::parse(Path::new("fuzz.snap"), data.to_vec());
    // Behind a valid header and checksum, so the fuzzer reaches the state
    // and memory image decoders.
    let mut b = SNAPSHOT_MAGIC.to_vec();
    b.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    b.extend_from_slice(data);
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    if let Ok(s) = snapshot::parse(Path::new("fuzz.snap"), b) {
        let mem = vmm::vstate::memory::create(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let _ = s.load_memory(&mem);
    }
});
