//! The lockstep protocol's frames from a peer (header, acknowledgements,
//! sync point requests, repair reports, heartbeats, the protection
//! identity, chunk times): decoding never panics, and the checks they feed
//! never panic.
#![no_main]

use failover::heartbeat::{PrimaryBeat, Protection, SecondaryBeat};
use failover::lockstep::{check_header, Ack, ChunkTime, Header, Repaired, SyncRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = postcard::from_bytes::<Header>(data) {
        // No --disk: nothing is read from the host. Without an arbiter of
        // our own, and with one (the identity comparison and its bounds).
        let _ = check_header(&h, None, None);
        let _ = check_header(&h, None, Some("file arbiter 12"));
    }
    if let Ok(p) = postcard::from_bytes::<Protection>(data) {
        let _ = p.check();
    }
    let _ = postcard::from_bytes::<Ack>(data);
    let _ = postcard::from_bytes::<SyncRequest>(data);
    let _ = postcard::from_bytes::<Repaired>(data);
    let _ = postcard::from_bytes::<PrimaryBeat>(data);
    let _ = postcard::from_bytes::<SecondaryBeat>(data);
    if let Ok(t) = ChunkTime::decode(data) {
        let prev = ChunkTime {
            exit: 1000,
            guest_us: 1000,
        };
        let _ = t.check_after(&prev);
        let _ = prev.check_after(&t);
    }
});
