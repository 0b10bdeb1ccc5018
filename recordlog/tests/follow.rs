//! Following a growing file while a writer thread appends to it.

mod common;

use std::fs::OpenOptions;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::header;
use recordlog::{
    BatchLimits, Entry, Input, LogWriter, ReadError, TailOptions, TailReader, WriterOptions,
};

fn entry(i: u64) -> Entry {
    if i & 1 == 0 {
        Entry::Input {
            exit_seq: i / 2 * 4,
            input: Input::Console(vec![i as u8; (i % 37) as usize]),
        }
    } else {
        Entry::Interrupt {
            exit_seq: i / 2 * 4,
            vector: 0x20,
        }
    }
}

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("recordlog-{}-{name}.tlog", std::process::id()))
}

fn follow(batch: Option<BatchLimits>, with_end: bool) {
    const N: u64 = 2000;
    let path = temp_path(&format!("{}-{with_end}", batch.is_some()));
    let _ = std::fs::remove_file(&path);
    std::fs::File::create(&path).unwrap();
    let done = Arc::new(AtomicBool::new(false));

    let wpath = path.clone();
    let wdone = done.clone();
    let writer = std::thread::spawn(move || {
        // The header is written late, so the reader also waits for it.
        std::thread::sleep(Duration::from_millis(20));
        let f = OpenOptions::new().append(true).open(&wpath).unwrap();
        let opts = WriterOptions {
            batch,
            buffer_bytes: 0,
        };
        let mut w = LogWriter::with_options(f, &header(), opts).unwrap();
        for i in 0..N {
            w.append(&entry(i)).unwrap();
            // Flush at odd points so the reader sees partial frames too.
            if i % 97 == 1 {
                w.flush().unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if with_end {
            w.append(&Entry::End {
                exit_seq: N * 2,
                status: 0,
            })
            .unwrap();
        }
        w.flush().unwrap();
        wdone.store(true, Ordering::SeqCst);
    });

    let f = std::fs::File::open(&path).unwrap();
    let opts = TailOptions {
        poll_interval: Duration::from_millis(1),
        idle_timeout: Some(Duration::from_secs(20)),
    };
    let rdone = done.clone();
    let mut r =
        TailReader::new(f, opts).stop_when(move || !with_end && rdone.load(Ordering::SeqCst));
    assert_eq!(r.wait_header().unwrap(), header());
    let mut got = Vec::new();
    while let Some(e) = r.next_entry().unwrap() {
        got.push(e);
    }
    writer.join().unwrap();
    let mut want: Vec<Entry> = (0..N).map(entry).collect();
    if with_end {
        want.push(Entry::End {
            exit_seq: N * 2,
            status: 0,
        });
        assert!(r.is_ended());
    }
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
    assert_eq!(r.offset(), std::fs::metadata(&path).unwrap().len());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn follows_growing_file_until_end_entry() {
    follow(None, true);
}

#[test]
fn follows_growing_file_until_stopped() {
    follow(None, false);
}

#[test]
fn follows_batched_log() {
    follow(
        Some(BatchLimits {
            max_entries: 10,
            max_bytes: 200,
        }),
        true,
    );
}

#[test]
fn idle_timeout_mid_frame_is_truncated_and_resumable() {
    let path = temp_path("partial");
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    w.append(&entry(0)).unwrap();
    w.append(&entry(2)).unwrap();
    let bytes = w.into_inner().unwrap();
    let cut = bytes.len() - 3;
    std::fs::write(&path, &bytes[..cut]).unwrap();

    let opts = TailOptions {
        poll_interval: Duration::from_millis(1),
        idle_timeout: Some(Duration::from_millis(30)),
    };
    let (mut r, _) = TailReader::open(std::fs::File::open(&path).unwrap(), opts).unwrap();
    assert_eq!(r.next_entry().unwrap(), Some(entry(0)));
    let off = r.offset();
    match r.next_entry() {
        Err(ReadError::Truncated { offset }) => assert_eq!(offset, off),
        other => panic!("{other:?}"),
    }
    // The rest arrives: following resumes.
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, &bytes[cut..]).unwrap();
    assert_eq!(r.next_entry().unwrap(), Some(entry(2)));
    assert_eq!(r.next_entry().unwrap(), None);
    let _ = std::fs::remove_file(&path);
}
