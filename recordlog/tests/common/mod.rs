#![allow(dead_code)]

use proptest::prelude::*;
use recordlog::{
    Digest, Entry, Fingerprint, Header, InitialState, Input, OutputKind, OutputRecord, SyncPoint,
};

pub fn header() -> Header {
    Header::new(
        b"mem=64M;vcpus=1".to_vec(),
        InitialState::Snapshot {
            digest: Digest::of(b"init"),
            path_hint: "seed.snap".into(),
        },
    )
}

/// A small log with every kind of entry.
pub fn sample_entries() -> Vec<Entry> {
    vec![
        Entry::Input {
            exit_seq: 1,
            input: Input::Clock(1_000_000_123),
        },
        Entry::Input {
            exit_seq: 1,
            input: Input::WallClock(1_700_000_000_000_000_000),
        },
        Entry::Input {
            exit_seq: 5,
            input: Input::DeadlineReached,
        },
        Entry::Interrupt {
            exit_seq: 5,
            vector: 0x20,
        },
        Entry::Input {
            exit_seq: 9,
            input: Input::Console(b"ls\n".to_vec()),
        },
        Entry::Input {
            exit_seq: 9,
            input: Input::NetFrame(vec![0xaa; 60]),
        },
        Entry::Output {
            exit_seq: 9,
            output: OutputRecord::of(OutputKind::NetFrame, &[0xbb; 60]),
        },
        Entry::Output {
            exit_seq: 12,
            output: OutputRecord::of(OutputKind::Console, b"hello\n"),
        },
        Entry::Fingerprint {
            exit_seq: 1000,
            fp: Fingerprint {
                exit_reason: 2,
                rip: 0xffff_ffff_8100_0000,
                rax: 7,
                rcx: 0,
                rflags: 0x246,
            },
        },
        Entry::SyncPoint {
            exit_seq: 1003,
            sync: Box::new(SyncPoint {
                vcpu_state: vec![1, 2, 3],
                device_state: vec![4; 20],
                pages: vec![(0x1000, vec![9; 64]), (0x7000, vec![])],
                digest: Digest::of(b"state"),
            }),
        },
        Entry::Digest {
            exit_seq: 1003,
            digest: Digest::of(b"d"),
        },
        Entry::Handover { exit_seq: 2000 },
        Entry::End {
            exit_seq: 2000,
            status: -1,
        },
    ]
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        any::<u64>().prop_map(Input::Clock),
        any::<u64>().prop_map(Input::WallClock),
        Just(Input::DeadlineReached),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Input::Console),
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(Input::NetFrame),
    ]
}

fn fingerprint() -> impl Strategy<Value = Fingerprint> {
    (
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(exit_reason, rip, rax, rcx, rflags)| Fingerprint {
            exit_reason,
            rip,
            rax,
            rcx,
            rflags,
        })
}

fn sync_point() -> impl Strategy<Value = SyncPoint> {
    (
        proptest::collection::vec(any::<u8>(), 0..50),
        proptest::collection::vec(any::<u8>(), 0..50),
        proptest::collection::vec(
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64)),
            0..4,
        ),
        any::<[u8; 32]>(),
    )
        .prop_map(|(vcpu_state, device_state, pages, d)| SyncPoint {
            vcpu_state,
            device_state,
            pages,
            digest: Digest(d),
        })
}

/// An entry without exit_seq: the kind and its data.
#[derive(Debug, Clone)]
pub enum Kind {
    Input(Input),
    Interrupt(u8),
    Fingerprint(Fingerprint),
    SyncPoint(SyncPoint),
    Digest([u8; 32]),
    Output(OutputRecord),
    Progress,
}

fn output() -> impl Strategy<Value = OutputRecord> {
    (any::<bool>(), any::<u64>(), any::<u64>()).prop_map(|(net, len, hash)| OutputRecord {
        kind: if net {
            OutputKind::NetFrame
        } else {
            OutputKind::Console
        },
        len,
        hash,
    })
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => input().prop_map(Kind::Input),
        3 => any::<u8>().prop_map(Kind::Interrupt),
        2 => fingerprint().prop_map(Kind::Fingerprint),
        1 => sync_point().prop_map(Kind::SyncPoint),
        1 => any::<[u8; 32]>().prop_map(Kind::Digest),
        2 => output().prop_map(Kind::Output),
        1 => Just(Kind::Progress),
    ]
}

/// Delta sizes from 0 to full-width, so varints of every length occur.
fn delta() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..4,
        2 => 0u64..100_000,
        1 => 0u64..(1 << 40),
    ]
}

/// A valid log body: non-decreasing exit_seq, optionally ending with End.
pub fn entries() -> impl Strategy<Value = Vec<Entry>> {
    (
        proptest::collection::vec((delta(), kind()), 0..60),
        proptest::option::of((delta(), any::<i32>())),
    )
        .prop_map(|(items, end)| {
            let mut seq = 0u64;
            let mut out = Vec::new();
            for (d, k) in items {
                seq = seq.saturating_add(d);
                out.push(match k {
                    Kind::Input(input) => Entry::Input {
                        exit_seq: seq,
                        input,
                    },
                    Kind::Interrupt(vector) => Entry::Interrupt {
                        exit_seq: seq,
                        vector,
                    },
                    Kind::Fingerprint(fp) => Entry::Fingerprint { exit_seq: seq, fp },
                    Kind::SyncPoint(s) => Entry::SyncPoint {
                        exit_seq: seq,
                        sync: Box::new(s),
                    },
                    Kind::Digest(d) => Entry::Digest {
                        exit_seq: seq,
                        digest: Digest(d),
                    },
                    Kind::Output(output) => Entry::Output {
                        exit_seq: seq,
                        output,
                    },
                    Kind::Progress => Entry::Progress { exit_seq: seq },
                });
            }
            if let Some((d, status)) = end {
                let exit_seq = seq.saturating_add(d);
                // Some logs end in a handover (the End follows it at once).
                if status % 2 == 0 {
                    out.push(Entry::Handover { exit_seq });
                }
                out.push(Entry::End { exit_seq, status });
            }
            out
        })
}
