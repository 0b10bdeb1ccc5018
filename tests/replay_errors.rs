//! `tandem replay` on damaged input (issue 3): corrupted, truncated,
//! wrong-version, foreign and missing logs give clear errors with the
//! documented exit statuses and never a panic. Layout of the header:
//! docs/log-format.md (magic at 0..8, `format_version` u32 LE at 8..12).

mod common;

use std::path::{Path, PathBuf};

use common::{arg, noise, read, tandem, Output, TempDir};

/// A complete log of `ticks 20` (status 0), its bytes and its directory.
fn ticks_log() -> (TempDir, PathBuf, Vec<u8>) {
    ticks_log_with(&[])
}

/// [`ticks_log`] recorded with `extra` options.
fn ticks_log_with(extra: &[&str]) -> (TempDir, PathBuf, Vec<u8>) {
    let dir = TempDir::new("rr-err");
    let log = dir.file("ticks.tlog");
    let mut args = vec![
        "record",
        "--log",
        arg(&log),
        "--cmdline",
        "ticks 20",
        "--serial",
        "null",
    ];
    args.extend_from_slice(extra);
    let rec = tandem(&args);
    rec.assert_status(0);
    let bytes = read(&log);
    assert!(bytes.len() > 64, "log of {} bytes", bytes.len());
    assert_eq!(&bytes[..8], b"TNDMLOG\0");
    assert_eq!(
        u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
        recordlog::FORMAT_VERSION
    );
    (dir, log, bytes)
}

fn replay(log: &Path) -> Output {
    let out = tandem(&["replay", "--log", arg(log), "--quiet"]);
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"),
        "tandem panicked\n{}",
        out.describe()
    );
    out
}

/// The number after `prefix` in `s`.
fn number_after(s: &str, prefix: &str) -> Option<u64> {
    let i = s.find(prefix)? + prefix.len();
    s[i..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
}

#[test]
fn corrupted_byte_in_the_middle_is_reported_with_its_offset() {
    let (dir, _, bytes) = ticks_log();
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x5a;
    let log = dir.write("corrupt.tlog", &bad);
    let out = replay(&log);
    out.assert_status(2);
    let offset = number_after(&out.stderr, "corrupt log entry at byte offset ")
        .unwrap_or_else(|| panic!("no offset named\n{}", out.describe()));
    // The offset is the damaged frame's first byte: at or before the flip,
    // after the header.
    assert!(
        offset as usize <= mid && offset >= 16,
        "offset {offset} for a flip at {mid}\n{}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("replay verified"),
        "{}",
        out.describe()
    );
}

/// Flips spread over the whole log: each is caught (a CRC covers every
/// byte), none panics, none replays "verified".
#[test]
fn corrupted_bytes_anywhere_are_never_accepted() {
    let (dir, _, bytes) = ticks_log();
    let n = bytes.len();
    let mut positions: Vec<usize> = vec![0, 5, 9, 13, 16, 20, n - 1];
    positions.extend((1..8).map(|k| n * k / 8));
    for pos in positions {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x01;
        let log = dir.write(&format!("flip{pos}.tlog"), &bad);
        let out = replay(&log);
        assert!(
            out.status == 2 && !out.stderr.contains("replay verified"),
            "flip at byte {pos} of {n}\n{}",
            out.describe()
        );
        assert!(
            out.stderr.contains("corrupt")
                || out.stderr.contains("not a Tandem log")
                || out.stderr.contains("version")
                || out.stderr.contains("header"),
            "flip at byte {pos}: unclear message\n{}",
            out.describe()
        );
    }
}

#[test]
fn truncated_inside_the_header_is_a_clear_error() {
    let (dir, _, bytes) = ticks_log();
    for cut in [0usize, 4, 8, 11, 15, 20] {
        let log = dir.write(&format!("head{cut}.tlog"), &bytes[..cut]);
        let out = replay(&log);
        out.assert_status(2);
        assert!(
            out.stderr.contains(&format!("--log {}", arg(&log)))
                && (out.stderr.contains("truncated")
                    || out.stderr.contains("empty")
                    || out.stderr.contains("not a Tandem log")),
            "cut at {cut}: unclear message\n{}",
            out.describe()
        );
    }
}

/// A log cut anywhere after the header is what a primary that died leaves:
/// the replay stops cleanly at the last complete entry and says how far it
/// got (status 0), or — a cut inside the entries the replay needs before
/// the guest can even start — says the log is truncated (status 2).
#[test]
fn truncated_mid_way_stops_cleanly_and_says_where() {
    let (dir, _, bytes) = ticks_log();
    let n = bytes.len();
    // The whole log replays to exit E; every cut stops at or before E.
    let full = replay(&dir.write("full.tlog", &bytes));
    full.assert_status(0);
    let total = number_after(&full.stderr, "replay verified: ")
        .unwrap_or_else(|| panic!("{}", full.describe()));
    let mut stopped_early = 0;
    for cut in [40, 64, 100, 150, 300, n / 4, n / 2, 3 * n / 4, n - 100] {
        let log = dir.write(&format!("cut{cut}.tlog"), &bytes[..cut]);
        let out = replay(&log);
        match out.status {
            0 => {
                let at = number_after(&out.stderr, "the log ends at exit ").unwrap_or_else(|| {
                    panic!(
                        "cut at {cut} of {n}: no 'the log ends at exit N'\n{}",
                        out.describe()
                    )
                });
                assert!(
                    out.stderr.contains("without an end entry") && at <= total,
                    "cut at {cut}: {}",
                    out.describe()
                );
                assert!(
                    !out.stderr.contains("replay verified"),
                    "{}",
                    out.describe()
                );
                stopped_early += 1;
            }
            2 => assert!(
                out.stderr.contains("truncated") || out.stderr.contains("corrupt"),
                "cut at {cut}: unclear message\n{}",
                out.describe()
            ),
            s => panic!("cut at {cut}: status {s}\n{}", out.describe()),
        }
    }
    assert!(stopped_early > 0, "no cut replayed up to where it stopped");
}

/// Cutting off only the very end (the `End` entry, or part of it) still
/// loses the recorded exit status: the replay must not claim a verified
/// run, it must say the end entry is missing.
#[test]
fn truncated_end_entry_is_not_reported_as_verified() {
    let (dir, _, bytes) = ticks_log();
    let n = bytes.len();
    for cut in [n - 1, n - 3] {
        let log = dir.write(&format!("end{cut}.tlog"), &bytes[..cut]);
        let out = replay(&log);
        assert!(
            out.stderr.contains("without an end entry") || out.stderr.contains("truncated"),
            "cut {} bytes before the end: the missing end entry is not reported\n{}",
            n - cut,
            out.describe()
        );
        assert!(
            !out.stderr.contains("replay verified"),
            "cut {} bytes before the end: reported verified\n{}",
            n - cut,
            out.describe()
        );
    }
}

#[test]
fn wrong_version_names_both_versions() {
    let (dir, _, bytes) = ticks_log();
    // 1: the format before Output entries; 2: raw sync point pages; 3: no
    // progress marks (4: no handovers, read as 5).
    for v in [0u32, 1, 2, 3, 6, 7, u32::MAX] {
        let mut bad = bytes.clone();
        bad[8..12].copy_from_slice(&v.to_le_bytes());
        let log = dir.write(&format!("v{v}.tlog"), &bad);
        let out = replay(&log);
        out.assert_status(2);
        assert!(
            out.stderr.contains("version")
                && out.stderr.contains("expected 5 (or 4)")
                && out.stderr.contains(&format!("found {v}")),
            "version {v}\n{}",
            out.describe()
        );
    }
}

#[test]
fn wrong_magic_and_random_files_are_refused() {
    let (dir, _, bytes) = ticks_log();
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(b"NOTALOG\0");
    let cases = [
        ("magic.tlog", bad),
        ("random.tlog", noise(4096, 1)),
        ("text.tlog", b"hello, this is not a log\n".repeat(50)),
    ];
    for (name, content) in cases {
        let log = dir.write(name, &content);
        let out = replay(&log);
        out.assert_status(2);
        assert!(
            out.stderr.contains("not a Tandem log") && out.stderr.contains(arg(&log)),
            "{name}\n{}",
            out.describe()
        );
        assert!(out.stdout.is_empty(), "{}", out.describe());
    }
}

#[test]
fn missing_log_names_the_path() {
    let dir = TempDir::new("rr-missing");
    let log = dir.file("does-not-exist.tlog");
    let out = replay(&log);
    out.assert_status(2);
    assert!(out.stderr.contains(arg(&log)), "{}", out.describe());
    let dir_as_log = replay(dir.path());
    dir_as_log.assert_status(2);
    assert!(
        dir_as_log.stderr.contains(arg(dir.path())),
        "{}",
        dir_as_log.describe()
    );
}

/// Rewrite a log entry by entry (keeping its header): damage that every
/// CRC still covers, as a buggy or hostile primary would send.
fn rewrite(bytes: &[u8], edit: impl FnOnce(&mut Vec<recordlog::Entry>)) -> Vec<u8> {
    let (r, header) = recordlog::LogReader::open(bytes).expect("open the log");
    let mut entries: Vec<_> = r.map(|e| e.expect("read the log")).collect();
    edit(&mut entries);
    let mut w = recordlog::LogWriter::new(Vec::new(), &header).expect("writer");
    for e in &entries {
        w.append(e).expect("append");
    }
    w.into_inner().expect("finish")
}

/// The sync points of `entries`, by index.
fn sync_point_indices(entries: &[recordlog::Entry]) -> Vec<usize> {
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, recordlog::Entry::SyncPoint { .. }))
        .map(|(i, _)| i)
        .collect()
}

/// One way to damage a sync point while keeping every CRC valid.
type SyncDamage = fn(&mut recordlog::SyncPoint);

const SYNC_DAMAGE: [(&str, SyncDamage); 5] = [
    ("undecodable vCPU state", |sp| sp.vcpu_state = vec![0xff; 7]),
    ("undecodable device state", |sp| sp.device_state.truncate(3)),
    ("a page near u64::MAX", |sp| {
        sp.pages.push((!0xfff, vec![0; 4096]))
    }),
    ("a page outside guest memory", |sp| {
        sp.pages.push((1 << 40, vec![0; 4096]))
    }),
    ("a page that does not decode to one page", |sp| {
        sp.pages.push((0x1000, vec![0; 5000]))
    }),
];

/// A replay of a damaged log: status 2 naming a byte offset, never
/// "verified", never a divergence.
#[track_caller]
fn assert_damage_reported(out: &Output, what: &str) {
    assert_eq!(
        out.status,
        2,
        "{what}: not reported as damage\n{}",
        out.describe()
    );
    assert!(
        number_after(&out.stderr, "corrupt log entry at byte offset ").is_some(),
        "{what}: no offset named\n{}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("replay verified") && !out.stderr.contains("diverged"),
        "{what}\n{}",
        out.describe()
    );
}

/// The recorder's *last* sync point is applied after the guest ended; a
/// damaged one (CRC valid) used to replay as "verified". Every entry is
/// validated as it is read: status 2 with the offset, with or without
/// `--repair`.
#[test]
fn damaged_last_sync_point_is_damage_not_verified() {
    let (dir, _, bytes) = ticks_log();
    for (i, (what, damage)) in SYNC_DAMAGE.iter().enumerate() {
        let bad = rewrite(&bytes, |es| {
            let last = *sync_point_indices(es).last().expect("a final sync point");
            let recordlog::Entry::SyncPoint { sync, .. } = &mut es[last] else {
                unreachable!()
            };
            damage(sync);
        });
        let log = dir.write(&format!("last{i}.tlog"), &bad);
        assert_damage_reported(&replay(&log), what);
        let repair = tandem(&["replay", "--log", arg(&log), "--quiet", "--repair"]);
        assert_damage_reported(&repair, what);
    }
}

/// The same damage in a sync point in the middle of the log (the guest
/// applies it while running): status 2, not an internal error or a
/// divergence.
#[test]
fn damaged_middle_sync_point_is_damage() {
    let (dir, _, bytes) = ticks_log_with(&["--sync-interval", "20"]);
    for (i, (what, damage)) in SYNC_DAMAGE.iter().enumerate() {
        let bad = rewrite(&bytes, |es| {
            let idx = sync_point_indices(es);
            assert!(idx.len() >= 3, "only {} sync points", idx.len());
            let recordlog::Entry::SyncPoint { sync, .. } = &mut es[idx[idx.len() / 2]] else {
                unreachable!()
            };
            damage(sync);
        });
        let log = dir.write(&format!("mid{i}.tlog"), &bad);
        assert_damage_reported(&replay(&log), what);
    }
}

/// Nothing may follow the `End` entry: a log with more frames after it is
/// refused, not replayed as verified.
#[test]
fn entries_after_the_end_are_refused() {
    let (dir, _, bytes) = ticks_log();
    // The End frame: what the log has beyond the same log without it.
    let bytes = rewrite(&bytes, |_| {});
    let without_end = rewrite(&bytes, |es| {
        assert!(matches!(es.pop(), Some(recordlog::Entry::End { .. })));
    });
    let end_frame = &bytes[without_end.len()..];
    assert!(!end_frame.is_empty());
    let mut twice = bytes.clone();
    twice.extend_from_slice(end_frame);
    let mut junk = bytes.clone();
    junk.extend_from_slice(b"\x01\x02");
    for (name, content) in [("twice.tlog", twice), ("junk.tlog", junk)] {
        let log = dir.write(name, &content);
        assert_damage_reported(&replay(&log), name);
    }
}
