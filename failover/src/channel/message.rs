//! Protocol messages (postcard-encoded in frames of kind [`super::kind::MESSAGE`]).
//!
//! Compatibility rule: [`Message::Hello`] must stay variant 0 and
//! [`Hello::protocol_version`] its first field, so that any version can read
//! another version's protocol number (postcard encodes this as the byte `0`
//! followed by the version as a varint) and refuse it with a clear error.
//! Everything else may change when [`PROTOCOL_VERSION`] is bumped.

use serde::{Deserialize, Serialize};

/// Version of the channel protocol (framing + [`Message`] encoding).
pub const PROTOCOL_VERSION: u32 = 2;

/// What a peer is in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Runs the guest and streams the log.
    Primary,
    /// Receives state and log, replays, takes over on failure.
    Secondary,
    /// Sends a VM in a planned live migration.
    MigrationSource,
    /// Receives a VM in a planned live migration.
    MigrationDestination,
}

/// First message on a connection, sent by both sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must stay the first field (see the module docs).
    pub protocol_version: u32,
    /// The sender's role.
    pub role: Role,
    /// The sender's name (normally its certificate's host name).
    pub name: String,
}

/// One guest page (or run of pages) in a memory transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// The bytes (compressed if the enclosing message says so).
    #[serde(with = "bytes")]
    pub data: Vec<u8>,
}

/// A run of disk bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskBlock {
    /// Byte offset on the disk.
    pub offset: u64,
    /// The bytes.
    #[serde(with = "bytes")]
    pub data: Vec<u8>,
}

/// Messages of the migration (source → destination, primary → secondary)
/// and log-streaming protocols.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Handshake; must stay variant 0.
    Hello(Hello),
    /// Guest memory sent during pre-copy round `round`.
    MemoryPages {
        /// The pre-copy round.
        round: u32,
        /// Whether each page's data is compressed (codec fixed per protocol version).
        compressed: bool,
        /// The pages.
        pages: Vec<Page>,
    },
    /// Pages that are all zero in round `round` (guest physical addresses).
    ZeroPages {
        /// The pre-copy round.
        round: u32,
        /// Guest physical addresses of the zero pages.
        gpas: Vec<u64>,
    },
    /// Disk contents.
    DiskBlocks {
        /// Which disk (0: the only one).
        disk: u32,
        /// The blocks, with their offsets.
        blocks: Vec<DiskBlock>,
    },
    /// Serialized device state (opaque to the channel).
    DeviceState(#[serde(with = "bytes")] Vec<u8>),
    /// Serialized vCPU state (opaque to the channel).
    VcpuState(#[serde(with = "bytes")] Vec<u8>),
    /// End of pre-copy round `round`; `dirty_pages` were dirtied meanwhile.
    RoundDone {
        /// The round that ended.
        round: u32,
        /// Pages dirtied during it.
        dirty_pages: u64,
    },
    /// The source has stopped the guest and sent everything; switch over.
    /// `paused`: the guest was paused by its operator and stays paused
    /// at the destination until resumed there.
    SwitchoverReady {
        /// The guest stays paused at the destination.
        paused: bool,
    },
    /// The destination confirms the guest runs there.
    Running,
    /// Give up the migration or replication.
    Abort {
        /// Why, for the other side's operator.
        reason: String,
    },
    /// A chunk of the record log (opaque to the channel).
    LogBytes(#[serde(with = "bytes")] Vec<u8>),
    /// The secondary has durably received the log up to `exit_seq`.
    Ack {
        /// The last exit durably received.
        exit_seq: u64,
    },
    /// Liveness; `sent_micros` is the sender's monotonic clock, echoed back if wanted.
    Heartbeat {
        /// Heartbeat number (increasing).
        seq: u64,
        /// The sender's monotonic clock, in µs.
        sent_micros: u64,
    },
}

/// Serialize `Vec<u8>` as a byte string (one memcpy in postcard) instead of a
/// sequence of u8.
mod bytes {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::Serializer;
    use std::fmt;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_is_variant_zero_with_leading_version() {
        let m = Message::Hello(Hello {
            protocol_version: 300,
            role: Role::Secondary,
            name: "b".into(),
        });
        let bytes = postcard::to_stdvec(&m).unwrap();
        assert_eq!(bytes[0], 0);
        let (v, _) = postcard::take_from_bytes::<u32>(&bytes[1..]).unwrap();
        assert_eq!(v, 300);
    }

    #[test]
    fn round_trip_all() {
        let msgs = vec![
            Message::MemoryPages {
                round: 3,
                compressed: false,
                pages: vec![Page {
                    gpa: 0x1000,
                    data: vec![7; 4096],
                }],
            },
            Message::ZeroPages {
                round: 1,
                gpas: vec![0, 4096],
            },
            Message::DiskBlocks {
                disk: 0,
                blocks: vec![DiskBlock {
                    offset: 512,
                    data: vec![1, 2, 3],
                }],
            },
            Message::DeviceState(vec![1]),
            Message::VcpuState(vec![2]),
            Message::RoundDone {
                round: 2,
                dirty_pages: 9,
            },
            Message::SwitchoverReady { paused: true },
            Message::Running,
            Message::Abort { reason: "x".into() },
            Message::LogBytes(vec![9; 100]),
            Message::Ack { exit_seq: 42 },
            Message::Heartbeat {
                seq: 1,
                sent_micros: 2,
            },
        ];
        for m in msgs {
            let b = postcard::to_stdvec(&m).unwrap();
            assert_eq!(postcard::from_bytes::<Message>(&b).unwrap(), m);
        }
        // Bytes are encoded compactly (length varint + raw bytes).
        let b = postcard::to_stdvec(&Message::LogBytes(vec![0xff; 1000])).unwrap();
        assert!(b.len() < 1010);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678_u64;
        for len in 0..600 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = postcard::from_bytes::<Message>(&buf);
        }
        // A huge declared length must not allocate it.
        let _ = postcard::from_bytes::<Message>(&[10, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    }
}
