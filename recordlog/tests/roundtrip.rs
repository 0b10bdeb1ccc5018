//! Encode → decode round trips, through every reader.

mod common;

use common::{entries, header, sample_entries};
use proptest::prelude::*;
use recordlog::{
    BatchLimits, Entry, LogReader, LogWriter, ReadError, StreamDecoder, WriterOptions,
};

fn write(es: &[Entry], opts: WriterOptions) -> Vec<u8> {
    let mut w = LogWriter::with_options(Vec::new(), &header(), opts).unwrap();
    for e in es {
        w.append(e).unwrap();
    }
    w.flush().unwrap();
    let n = w.bytes_written();
    let out = w.into_inner().unwrap();
    assert_eq!(n, out.len() as u64);
    out
}

fn read_all(bytes: &[u8]) -> Result<Vec<Entry>, ReadError> {
    let (r, h) = LogReader::open(bytes)?;
    assert_eq!(h, header());
    r.collect()
}

fn batched() -> WriterOptions {
    WriterOptions {
        batch: Some(BatchLimits {
            max_entries: 7,
            max_bytes: 300,
        }),
        buffer_bytes: 0,
    }
}

#[test]
fn sample_round_trip() {
    for opts in [WriterOptions::default(), batched()] {
        let bytes = write(&sample_entries(), opts);
        assert_eq!(read_all(&bytes).unwrap(), sample_entries());
    }
}

#[test]
fn empty_log_is_just_a_header() {
    let bytes = write(&[], WriterOptions::default());
    assert_eq!(read_all(&bytes).unwrap(), vec![]);
}

#[test]
fn writer_rejects_backwards_and_after_end() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    w.append(&Entry::Interrupt {
        exit_seq: 10,
        vector: 1,
    })
    .unwrap();
    let before = w.bytes_written();
    let e = w
        .append(&Entry::Interrupt {
            exit_seq: 9,
            vector: 1,
        })
        .unwrap_err();
    assert!(e.to_string().contains("backwards"), "{e}");
    assert_eq!(w.bytes_written(), before);
    w.append(&Entry::End {
        exit_seq: 10,
        status: 0,
    })
    .unwrap();
    assert!(w
        .append(&Entry::Interrupt {
            exit_seq: 10,
            vector: 1
        })
        .is_err());
    let bytes = w.into_inner().unwrap();
    assert_eq!(read_all(&bytes).unwrap().len(), 2);
}

#[test]
fn data_after_end_is_corrupt() {
    let mut bytes = write(&sample_entries(), WriterOptions::default());
    let end_at = bytes.len();
    // A valid-looking Interrupt frame after End.
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    w.append(&Entry::Interrupt {
        exit_seq: 0,
        vector: 1,
    })
    .unwrap();
    let hlen = header_len();
    let extra = w.into_inner().unwrap();
    bytes.extend_from_slice(&extra[hlen..]);
    match read_all(&bytes) {
        Err(ReadError::Corrupt { offset, .. }) => assert_eq!(offset, end_at as u64),
        other => panic!("{other:?}"),
    }
}

fn header_len() -> usize {
    header().encode().unwrap().len()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_round_trip(es in entries()) {
        let plain = write(&es, WriterOptions::default());
        prop_assert_eq!(read_all(&plain).unwrap(), es.clone());
        let b = write(&es, batched());
        prop_assert_eq!(read_all(&b).unwrap(), es);
    }

    #[test]
    fn prop_stream_decoder_any_split(es in entries(), chunk in 1usize..50) {
        let bytes = write(&es, batched());
        let mut dec = StreamDecoder::new();
        let mut got = Vec::new();
        for part in bytes.chunks(chunk) {
            dec.feed(part);
            while let Some(e) = dec.next_entry().unwrap() {
                got.push(e);
            }
        }
        dec.finish().unwrap();
        prop_assert_eq!(dec.offset(), bytes.len() as u64);
        prop_assert_eq!(got, es);
    }

    #[test]
    fn prop_random_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut bytes = header().encode().unwrap();
        bytes.extend_from_slice(&tail);
        let _ = read_all(&bytes);
        let _ = read_all(&tail);
    }
}
