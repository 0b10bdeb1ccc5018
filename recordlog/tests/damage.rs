//! Corruption and truncation: detected, located, never a panic.

mod common;

use common::{header, sample_entries};
use recordlog::{BatchLimits, Entry, HeaderError, LogReader, LogWriter, ReadError, WriterOptions};

fn write(es: &[Entry], batch: bool) -> (Vec<u8>, Vec<u64>) {
    let opts = WriterOptions {
        batch: batch.then_some(BatchLimits {
            max_entries: 4,
            max_bytes: 1 << 10,
        }),
        buffer_bytes: 0,
    };
    let mut w = LogWriter::with_options(Vec::new(), &header(), opts).unwrap();
    // Frame boundaries, for the truncation test.
    let mut ends = vec![w.bytes_written()];
    for e in es {
        w.append(e).unwrap();
        if *ends.last().unwrap() != w.bytes_written() {
            ends.push(w.bytes_written());
        }
    }
    w.flush().unwrap();
    if *ends.last().unwrap() != w.bytes_written() {
        ends.push(w.bytes_written());
    }
    (w.into_inner().unwrap(), ends)
}

/// Reads everything; returns the entries read and how it ended.
fn read(bytes: &[u8]) -> (Vec<Entry>, Result<(), ReadError>) {
    let mut got = Vec::new();
    let mut r = match LogReader::open(bytes) {
        Ok((r, _)) => r,
        Err(e) => return (got, Err(e)),
    };
    loop {
        match r.next_entry() {
            Ok(Some(e)) => got.push(e),
            Ok(None) => return (got, Ok(())),
            Err(e) => return (got, Err(e)),
        }
    }
}

#[test]
fn every_single_byte_corruption_is_detected() {
    let es = sample_entries();
    for batch in [false, true] {
        let (bytes, _) = write(&es, batch);
        for i in 0..bytes.len() {
            for x in [0x01u8, 0x80, 0xff, 0x55] {
                let mut c = bytes.clone();
                c[i] ^= x;
                let (got, res) = read(&c);
                assert!(
                    res.is_err(),
                    "batch={batch} byte {i} ^ {x:#x} not detected; read {} entries",
                    got.len()
                );
                // What was returned before the error is a prefix of the truth.
                assert_eq!(got[..], es[..got.len()], "byte {i}");
                if let Err(ReadError::Corrupt { offset, .. }) = res {
                    assert!(offset <= i as u64, "offset {offset} after damage at {i}");
                }
            }
        }
    }
}

#[test]
fn truncation_at_every_offset() {
    let es = sample_entries();
    for batch in [false, true] {
        let (bytes, ends) = write(&es, batch);
        let hlen = ends[0] as usize;
        for cut in 0..bytes.len() {
            let (got, res) = read(&bytes[..cut]);
            if ends.contains(&(cut as u64)) {
                assert!(res.is_ok(), "cut {cut}: {res:?}");
            } else {
                match res {
                    Err(ReadError::Truncated { offset }) => {
                        let frame_start = if cut < hlen {
                            0
                        } else {
                            *ends.iter().filter(|&&e| e <= cut as u64).max().unwrap()
                        };
                        assert_eq!(offset, frame_start, "cut {cut}");
                    }
                    other => panic!("cut {cut}: {other:?}"),
                }
            }
            assert_eq!(got[..], es[..got.len()]);
        }
        assert_eq!(read(&bytes).0, es);
    }
}

#[test]
fn wrong_magic_and_version_are_named() {
    let (mut bytes, _) = write(&sample_entries(), false);
    // Versions 1 (before Output entries), 2 (raw sync point pages) and 3
    // (no progress marks) are refused, by name.
    for old in [1, 2, 3] {
        bytes[8] = old;
        match LogReader::open(&bytes[..]) {
            Err(ReadError::Header(HeaderError::UnsupportedVersion { expected, found })) => {
                assert_eq!((expected, found), (5, old as u32));
            }
            other => panic!("{other:?}"),
        }
    }
    let e = LogReader::open(&b"GIF89a........................"[..]).unwrap_err();
    assert!(matches!(e, ReadError::Header(HeaderError::BadMagic { .. })));
    assert!(e.to_string().contains("expected magic"), "{e}");
    let e = LogReader::open(&b""[..]).unwrap_err();
    assert!(matches!(e, ReadError::Truncated { offset: 0 }), "{e}");
}

#[test]
fn huge_length_field_does_not_allocate() {
    let (mut bytes, _) = write(&[], false);
    // Console entry claiming 200 MiB, followed by nothing.
    bytes.push(0x04);
    let mut v = 200u64 << 20;
    while v >= 0x80 {
        bytes.push(v as u8 | 0x80);
        v >>= 7;
    }
    bytes.push(v as u8);
    let (_, res) = read(&bytes);
    assert!(matches!(res, Err(ReadError::Truncated { .. })), "{res:?}");
    // Beyond the cap: corrupt immediately.
    let (mut bytes, _) = write(&[], false);
    bytes.extend_from_slice(&[0x04, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    let (_, res) = read(&bytes);
    assert!(matches!(res, Err(ReadError::Corrupt { .. })), "{res:?}");
}
