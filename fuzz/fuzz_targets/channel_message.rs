//! Channel frames and `Message` from a peer: the frame header against the
//! cap, then the postcard message. Never a panic or a huge allocation; a
//! message that decodes re-encodes to one that decodes equal.
#![no_main]

use failover::channel::{decode_header, Message, FRAME_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((h, rest)) = data.split_first_chunk::<FRAME_HEADER_LEN>() {
        if let Ok((_kind, len)) = decode_header(h, 64 << 20) {
            let payload = &rest[..rest.len().min(len as usize)];
            let _ = postcard::from_bytes::<Message>(payload);
        }
    }
    if let Ok(m) = postcard::from_bytes::<Message>(data) {
        let again = postcard::to_stdvec(&m).expect("a decoded message re-encodes");
        let back: Message = postcard::from_bytes(&again).expect("and decodes");
        assert_eq!(back, m);
    }
});
