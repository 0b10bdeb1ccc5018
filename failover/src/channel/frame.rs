//! Framing: `u32 LE payload length | u8 kind | payload`.
//!
//! The length counts the payload only (not the kind byte). It is checked
//! against the receiver's cap before any buffer is allocated.

/// Size of a frame header.
pub const FRAME_HEADER_LEN: usize = 5;

/// Frame kinds. Kinds below 16 are reserved for the channel; applications may
/// use 16..=255 with [`super::Connection::send_frame`].
pub mod kind {
    /// A postcard-encoded [`super::super::Message`].
    pub const MESSAGE: u8 = 1;
    /// Raw bytes with no channel-defined meaning.
    pub const RAW: u8 = 2;
    /// First kind free for applications.
    pub const FIRST_APP: u8 = 16;
}

/// Encode a frame header.
pub fn encode_header(kind: u8, len: u32) -> [u8; FRAME_HEADER_LEN] {
    let l = len.to_le_bytes();
    [l[0], l[1], l[2], l[3], kind]
}

/// Decode a frame header: `(kind, payload length)`, or `Err(len)` if the
/// length exceeds `max`.
pub fn decode_header(h: &[u8; FRAME_HEADER_LEN], max: u32) -> Result<(u8, u32), u32> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if len > max {
        return Err(len);
    }
    Ok((h[4], len))
}

/// Incremental, cancel-safe frame reader state: all progress lives here, so a
/// read future may be dropped (e.g. by a timeout) between `read` calls
/// without losing bytes.
#[derive(Debug, Default)]
pub(crate) struct ReadState {
    pub header: [u8; FRAME_HEADER_LEN],
    pub header_filled: usize,
    /// Set once the header is complete: (kind, payload buffer, bytes filled).
    pub payload: Option<(u8, Vec<u8>, usize)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = encode_header(7, 123_456);
        assert_eq!(decode_header(&h, 1 << 20), Ok((7, 123_456)));
        assert_eq!(decode_header(&h, 1000), Err(123_456));
        let h = encode_header(1, u32::MAX);
        assert_eq!(decode_header(&h, 64 << 20), Err(u32::MAX));
        assert_eq!(decode_header(&encode_header(0, 0), 0), Ok((0, 0)));
    }
}
