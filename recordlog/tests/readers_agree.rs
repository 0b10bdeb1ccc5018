//! `LogReader`, `StreamDecoder` (fed in arbitrary pieces) and `TailReader`
//! share the frame decoder but reach it by different paths (plain entry
//! frames bypass the queue of batch entries; the varint fast path looks past
//! a payload's end). On any bytes, damaged or not, they must return the same
//! entries, the same error and the same offset.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{entries, header};
use proptest::prelude::*;
use recordlog::{
    BatchLimits, Entry, LogReader, LogWriter, StreamDecoder, TailOptions, TailReader, WriterOptions,
};

#[derive(Debug, PartialEq)]
struct Outcome {
    entries: Vec<Entry>,
    /// `None`: clean end; otherwise the error's message.
    error: Option<String>,
    offset: u64,
}

fn write(es: &[Entry], batch: Option<BatchLimits>) -> Vec<u8> {
    let opts = WriterOptions {
        batch,
        buffer_bytes: 0,
    };
    let mut w = LogWriter::with_options(Vec::new(), &header(), opts).unwrap();
    for (i, e) in es.iter().enumerate() {
        w.append(e).unwrap();
        if i % 13 == 12 {
            w.flush().unwrap();
        }
    }
    w.into_inner().unwrap()
}

/// A reader handing out at most `chunk` bytes per `read`.
struct Trickle<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.chunk.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Read entries until the end or the first error (as its message).
fn drain<E: std::fmt::Display>(
    mut next: impl FnMut() -> Result<Option<Entry>, E>,
) -> (Vec<Entry>, Option<String>) {
    let mut entries = Vec::new();
    loop {
        match next() {
            Ok(Some(e)) => entries.push(e),
            Ok(None) => return (entries, None),
            Err(e) => return (entries, Some(e.to_string())),
        }
    }
}

fn log_reader(bytes: &[u8], chunk: usize) -> Outcome {
    let (mut r, _) = match LogReader::open(Trickle { data: bytes, chunk }) {
        Ok(x) => x,
        Err(e) => {
            return Outcome {
                entries: vec![],
                error: Some(e.to_string()),
                offset: 0,
            }
        }
    };
    let (entries, error) = drain(|| r.next_entry());
    Outcome {
        entries,
        error,
        offset: r.offset(),
    }
}

fn stream_decoder(bytes: &[u8], chunk: usize) -> Outcome {
    let mut d = StreamDecoder::new();
    let mut parts = bytes.chunks(chunk);
    let mut entries = Vec::new();
    let error = loop {
        match d.next_entry() {
            Ok(Some(e)) => entries.push(e),
            Ok(None) => match parts.next() {
                Some(p) => d.feed(p),
                None => break d.finish().err().map(|e| e.to_string()),
            },
            Err(e) => break Some(e.to_string()),
        }
    };
    Outcome {
        entries,
        error,
        offset: d.offset(),
    }
}

fn tail_reader(bytes: &[u8], chunk: usize) -> Outcome {
    let opts = TailOptions {
        poll_interval: Duration::ZERO,
        idle_timeout: Some(Duration::ZERO),
    };
    let mut t = TailReader::new(Trickle { data: bytes, chunk }, opts);
    if let Err(e) = t.wait_header() {
        return Outcome {
            entries: vec![],
            error: Some(e.to_string()),
            offset: 0,
        };
    }
    let (entries, error) = drain(|| t.next_entry());
    Outcome {
        entries,
        error,
        offset: t.offset(),
    }
}

fn assert_agree(bytes: &[u8], chunk: usize) -> Outcome {
    let a = log_reader(bytes, usize::MAX);
    assert_eq!(
        log_reader(bytes, chunk),
        a,
        "LogReader in pieces of {chunk}"
    );
    assert_eq!(stream_decoder(bytes, chunk), a, "StreamDecoder");
    assert_eq!(tail_reader(bytes, chunk), a, "TailReader");
    a
}

#[derive(Debug, Clone)]
enum Damage {
    None,
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        Just(Damage::None),
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Damage::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Damage::Set(i, v)),
        any::<usize>().prop_map(Damage::Truncate),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..12)
        )
            .prop_map(|(i, v)| Damage::Insert(i, v)),
    ]
}

fn header_len() -> usize {
    header().encode().unwrap().len()
}

/// Damage after the header (a damaged magic is reported with the bytes
/// present so far, which differ with how the input is split).
fn apply(mut b: Vec<u8>, d: &Damage) -> Vec<u8> {
    let h = header_len();
    let n = b.len() - h;
    match d {
        Damage::None => {}
        Damage::Flip(_, _) | Damage::Set(_, _) if n == 0 => {}
        Damage::Flip(i, bit) => b[h + i % n] ^= 1 << bit,
        Damage::Set(i, v) => b[h + i % n] = *v,
        Damage::Truncate(i) => b.truncate(h + i % (n + 1)),
        Damage::Insert(i, v) => {
            let i = h + i % (n + 1);
            b.splice(i..i, v.iter().copied());
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn prop_readers_agree(
        es in entries(),
        batch in prop_oneof![
            Just(None),
            (1usize..20, 1usize..400).prop_map(|(e, b)| Some(BatchLimits { max_entries: e, max_bytes: b })),
        ],
        d in damage(),
        chunk in 1usize..40,
    ) {
        let clean = write(&es, batch);
        let bytes = apply(clean, &d);
        let got = assert_agree(&bytes, chunk);
        if matches!(d, Damage::None) {
            prop_assert_eq!(got.entries, es);
            prop_assert_eq!(got.error, None);
        }
    }
}

/// Every single-byte change of the frames of a batched and of an unbatched
/// log, and every truncation, through all three readers.
#[test]
fn readers_agree_on_every_byte_change() {
    let es = common::sample_entries();
    for batch in [None, Some(BatchLimits::default())] {
        let clean = write(&es, batch);
        assert_eq!(assert_agree(&clean, 7).entries, es);
        for i in header_len()..clean.len() {
            for v in [clean[i] ^ 0x01, clean[i] ^ 0x80] {
                let mut b = clean.clone();
                b[i] = v;
                assert_agree(&b, 16);
            }
        }
        for i in 0..clean.len() {
            assert_agree(&clean[..i], 16);
        }
    }
}
