//! The recorder → sender queue.

mod common;

use std::time::Duration;

use common::{header, sample_entries};
use recordlog::{BatchLimits, Entry, Input, LogQueue, QueueWriter, StreamDecoder};

#[test]
fn drain_returns_whole_frames_and_accounts_bytes() {
    let q = LogQueue::new();
    let mut w = QueueWriter::new(q.clone(), &header()).unwrap();
    let hlen = header().encode().unwrap().len() as u64;
    assert_eq!(q.stats().pending_bytes, hlen);
    for e in sample_entries() {
        w.append(&e).unwrap();
    }
    let total = q.stats().pushed_bytes;
    // Tiny limit: still at least one chunk per drain; every drain decodes.
    let mut dec = StreamDecoder::new();
    let mut got = Vec::new();
    let mut drains = 0;
    loop {
        let d = q.drain(10);
        if d.bytes.is_empty() {
            break;
        }
        drains += 1;
        assert_eq!(d.chunks, 1);
        assert_eq!(d.start_offset, dec.offset() + dec.buffered() as u64);
        dec.feed(&d.bytes);
        let mut last = None;
        while let Some(e) = dec.next_entry().unwrap() {
            last = Some(e.exit_seq());
            got.push(e);
        }
        assert_eq!(dec.buffered(), 0, "drain split a frame");
        assert_eq!(d.last_exit_seq, last);
    }
    assert_eq!(drains, 1 + sample_entries().len());
    assert_eq!(got, sample_entries());
    let s = q.stats();
    assert_eq!(
        (s.pushed_bytes, s.drained_bytes, s.pending_bytes),
        (total, total, 0)
    );
}

#[test]
fn drain_respects_max_bytes() {
    let q = LogQueue::new();
    for i in 0..100u8 {
        q.push(&[i; 10], Some(u64::from(i))).unwrap();
    }
    let d = q.drain(35);
    assert_eq!((d.bytes.len(), d.chunks, d.last_exit_seq), (30, 3, Some(2)));
    assert_eq!(q.drain_up_to(1000).len(), 970);
    assert!(q.drain_up_to(1000).is_empty());
}

#[test]
fn concurrent_recorder_and_sender() {
    const N: u64 = 50_000;
    let q = LogQueue::new();
    let mut w = QueueWriter::batched(
        q.clone(),
        &header(),
        BatchLimits {
            max_entries: 16,
            max_bytes: 512,
        },
    )
    .unwrap();
    let sender_q = q.clone();
    let sender = std::thread::spawn(move || {
        let mut dec = StreamDecoder::new();
        let mut n = 0u64;
        let mut last = 0;
        while let Some(d) = sender_q.wait_drain(4096, Some(Duration::from_secs(10))) {
            dec.feed(&d.bytes);
            while let Some(e) = dec.next_entry().unwrap() {
                assert!(e.exit_seq() >= last);
                last = e.exit_seq();
                n += 1;
            }
        }
        dec.finish().unwrap();
        n
    });
    for i in 0..N {
        w.append(&Entry::Input {
            exit_seq: i,
            input: Input::Clock(i * 1000),
        })
        .unwrap();
        if i % 1000 == 999 {
            w.flush().unwrap();
            assert!(q.wait_below(1 << 20, Duration::from_secs(10)));
        }
    }
    w.flush().unwrap();
    q.close();
    assert_eq!(
        w.append(&Entry::Interrupt {
            exit_seq: N,
            vector: 1,
        }),
        Err(recordlog::QueueError::Closed)
    );
    assert_eq!(sender.join().unwrap(), N);
    let s = q.stats();
    assert_eq!(s.pushed_bytes, s.drained_bytes);
    assert!(s.closed);
}

#[test]
fn wait_drain_times_out_and_sees_close() {
    let q = LogQueue::new();
    assert!(q.wait_drain(100, Some(Duration::from_millis(10))).is_none());
    let q2 = q.clone();
    let t = std::thread::spawn(move || q2.wait_drain(100, None));
    std::thread::sleep(Duration::from_millis(20));
    q.close();
    assert!(t.join().unwrap().is_none());
}

#[test]
fn a_bounded_queue_makes_the_producer_wait_and_drops_nothing() {
    let q = LogQueue::bounded(1000);
    let producer = {
        let q = q.clone();
        std::thread::spawn(move || {
            for i in 0..50u64 {
                q.push(&[i as u8; 300], Some(i)).unwrap();
            }
        })
    };
    // The producer fills the queue and waits: never more than the bound.
    std::thread::sleep(Duration::from_millis(50));
    let st = q.stats();
    assert!(st.pending_bytes <= 1000, "{st:?}");
    assert_eq!(st.pushed_bytes, 900, "three chunks fit, the fourth waits");
    let mut got = Vec::new();
    while got.len() < 50 * 300 {
        got.extend(
            q.wait_drain(400, Some(Duration::from_secs(10)))
                .unwrap()
                .bytes,
        );
        assert!(q.stats().pending_bytes <= 1000);
    }
    producer.join().unwrap();
    // Every chunk, in order.
    let want: Vec<u8> = (0..50u8).flat_map(|i| [i; 300]).collect();
    assert_eq!(got, want);
    let st = q.stats();
    assert_eq!((st.bound_bytes, st.high_water_bytes), (1000, 900));
    assert!(
        st.full_waits >= 1 && st.full_wait > Duration::ZERO,
        "{st:?}"
    );
    // A chunk larger than the bound goes into an empty queue; a close ends
    // a waiting push with an error.
    q.push(&[0; 5000], None).unwrap();
    let q2 = q.clone();
    let waiting = std::thread::spawn(move || q2.push(&[1; 10], None));
    std::thread::sleep(Duration::from_millis(20));
    q.close();
    assert_eq!(waiting.join().unwrap(), Err(recordlog::QueueError::Closed));
}
