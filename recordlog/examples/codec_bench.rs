//! Codec throughput on one core: small (hot) entries and 1 MiB sync points,
//! encode and decode. Run with
//! `cargo run --release -p recordlog --example codec_bench`.
//!
//! Prints one line per case: `<case> <entries/s> <MB/s>` (MB = 10^6 bytes of
//! encoded log), so that the main benchmark can parse it.

use std::hint::black_box;
use std::time::{Duration, Instant};

use recordlog::{
    BatchLimits, Digest, Entry, Header, InitialState, Input, LogReader, LogWriter, SyncPoint,
    WriterOptions,
};

fn small_entries(n: u64) -> Vec<Entry> {
    (0..n)
        .map(|i| match i % 4 {
            0 => Entry::Input {
                exit_seq: i,
                input: Input::DeadlineReached,
            },
            1 => Entry::Interrupt {
                exit_seq: i,
                vector: 0x20,
            },
            2 => Entry::Input {
                exit_seq: i,
                input: Input::Clock(1_000_000_000 + i * 997),
            },
            _ => Entry::Fingerprint {
                exit_seq: i,
                fp: recordlog::Fingerprint {
                    exit_reason: 2,
                    rip: 0xffff_ffff_8100_0000 + i,
                    rax: i,
                    rcx: 0,
                    rflags: 0x246,
                },
            },
        })
        .collect()
}

fn sync_points(n: u64) -> Vec<Entry> {
    (0..n)
        .map(|i| Entry::SyncPoint {
            exit_seq: i * 100_000,
            sync: Box::new(SyncPoint {
                vcpu_state: vec![0x11; 2048],
                device_state: vec![0x22; 1024],
                pages: (0..256u64)
                    .map(|p| (p * 4096, vec![(p + i) as u8; 4096]))
                    .collect(),
                digest: Digest::of(&i.to_le_bytes()),
            }),
        })
        .collect()
}

fn encode(entries: &[Entry], opts: WriterOptions) -> Vec<u8> {
    let h = Header::new(vec![], InitialState::Boot);
    let mut w = LogWriter::with_options(Vec::with_capacity(1 << 20), &h, opts).unwrap();
    for e in entries {
        w.append(e).unwrap();
    }
    w.into_inner().unwrap()
}

/// Encodes into a sink (what a recorder writing to a file or socket costs,
/// without the page faults of growing a fresh in-memory log each run).
fn encode_to_sink(entries: &[Entry], opts: WriterOptions) -> u64 {
    let h = Header::new(vec![], InitialState::Boot);
    let mut w = LogWriter::with_options(std::io::sink(), &h, opts).unwrap();
    for e in entries {
        w.append(e).unwrap();
    }
    w.flush().unwrap();
    w.bytes_written()
}

fn decode(bytes: &[u8]) -> u64 {
    let (mut r, _) = LogReader::open(bytes).unwrap();
    let mut n = 0;
    while let Some(e) = r.next_entry().unwrap() {
        black_box(&e);
        n += 1;
    }
    n
}

/// Runs `f` repeatedly for at least `min`; returns the best time of one run.
fn best_of(min: Duration, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    let mut best = Duration::MAX;
    while start.elapsed() < min || best == Duration::MAX {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
    }
    best
}

fn report(case: &str, entries: usize, bytes: usize, t: Duration) {
    let s = t.as_secs_f64();
    println!(
        "{case:<28} {:>14.0} entries/s {:>10.1} MB/s",
        entries as f64 / s,
        bytes as f64 / s / 1e6
    );
}

fn main() {
    let min = Duration::from_millis(
        std::env::var("BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
    );
    let batched = WriterOptions {
        batch: Some(BatchLimits::default()),
        ..WriterOptions::default()
    };

    let small = small_entries(1_000_000);
    for (name, opts) in [
        ("small", WriterOptions::default()),
        ("small batched", batched),
    ] {
        let bytes = encode(&small, opts);
        let t = best_of(min, || {
            black_box(encode_to_sink(&small, opts));
        });
        report(&format!("encode {name}"), small.len(), bytes.len(), t);
        let t = best_of(min, || {
            assert_eq!(decode(&bytes), small.len() as u64);
        });
        report(&format!("decode {name}"), small.len(), bytes.len(), t);
    }

    let big = sync_points(64);
    let bytes = encode(&big, WriterOptions::default());
    let t = best_of(min, || {
        black_box(encode_to_sink(&big, WriterOptions::default()));
    });
    report("encode syncpoint 1MiB", big.len(), bytes.len(), t);
    let t = best_of(min, || {
        assert_eq!(decode(&bytes), big.len() as u64);
    });
    report("decode syncpoint 1MiB", big.len(), bytes.len(), t);
}
