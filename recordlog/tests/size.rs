//! The log of an idle guest must stay far below VMware FT's 0.68 Mbit/s.

use recordlog::{
    BatchLimits, Entry, Fingerprint, Header, InitialState, Input, LogWriter, WriterOptions,
};

/// 60 s of a 250 Hz idle guest: per tick DeadlineReached and Interrupt 0x20
/// at the same exit, the next tick 3 exits later (plus the HLT exits in
/// between, which log nothing), a Fingerprint every 1000 exits.
fn idle_log(opts: WriterOptions, flush_every_ticks: u64) -> (u64, u64) {
    let h = Header::new(vec![0; 64], InitialState::Boot);
    let mut w = LogWriter::with_options(Vec::new(), &h, opts).unwrap();
    let header_bytes = w.bytes_written();
    let mut seq = 0u64;
    let mut next_fp = 1000u64;
    for tick in 0..(60 * 250u64) {
        seq += 1;
        w.append(&Entry::Input {
            exit_seq: seq,
            input: Input::DeadlineReached,
        })
        .unwrap();
        w.append(&Entry::Interrupt {
            exit_seq: seq,
            vector: 0x20,
        })
        .unwrap();
        seq += 3;
        if seq >= next_fp {
            w.append(&Entry::Fingerprint {
                exit_seq: seq,
                fp: Fingerprint {
                    exit_reason: 5, // KVM_EXIT_HLT
                    rip: 0xffff_ffff_8106_2f35,
                    rax: 0,
                    rcx: 0x1_0000 + tick,
                    rflags: 0x246,
                },
            })
            .unwrap();
            next_fp += 1000;
        }
        if (tick + 1) % flush_every_ticks == 0 {
            w.flush().unwrap();
        }
    }
    w.flush().unwrap();
    (w.bytes_written() - header_bytes, 60)
}

#[test]
fn idle_guest_bandwidth() {
    let (bytes, secs) = idle_log(WriterOptions::default(), 1);
    let bps = bytes * 8 / secs;
    println!(
        "idle 250 Hz, one frame per entry: {bytes} bytes in {secs} s = {bps} bit/s ({:.1} bytes/tick)",
        bytes as f64 / (secs * 250) as f64
    );
    assert!(bps < 34_000, "{bps} bit/s");

    // Batched, flushed every tick (latency-equivalent to unbatched).
    let batched = WriterOptions {
        batch: Some(BatchLimits::default()),
        ..WriterOptions::default()
    };
    let (bytes, secs) = idle_log(batched, 1);
    let bps1 = bytes * 8 / secs;
    println!("idle 250 Hz, batched, flushed every tick: {bps1} bit/s");
    assert!(bps1 < bps);

    // Batched, flushed every ~10 ms (3 ticks) and every 100 ms (25 ticks).
    let (bytes, secs) = idle_log(batched, 3);
    let bps3 = bytes * 8 / secs;
    println!("idle 250 Hz, batched, flushed every 3 ticks: {bps3} bit/s");
    assert!(bps3 < 20_000, "{bps3} bit/s");
    let (bytes, secs) = idle_log(batched, 25);
    let bps25 = bytes * 8 / secs;
    println!("idle 250 Hz, batched, flushed every 25 ticks: {bps25} bit/s");
    assert!(bps25 < 15_000, "{bps25} bit/s");
}
