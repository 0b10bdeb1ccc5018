//! Snapshot and restore through the binary: a run stopped at exit N and
//! restored from its snapshot ends exactly like an uninterrupted run (same
//! RESULT line, same console output before + after, same disk contents);
//! `--snapshot-at` past the end of the guest is refused; damaged, foreign,
//! wrong-version and missing snapshot files are refused before any VM
//! runs.

mod common;

use std::path::{Path, PathBuf};

use common::{arg, tandem, Output, TempDir};

/// The exit number the guest ended at, from `--snapshot-at` past the end:
/// "... the guest ended at exit N (status S) before reaching it ...".
/// Also checks that refusal: status 2, no snapshot written, and the full
/// run's console output on stdout.
fn exit_count(cmdline: &str, disk: Option<&Path>, dir: &TempDir) -> (u64, Output) {
    let snap = dir.file("never.snap");
    let mut args = vec![
        "run",
        "--cmdline",
        cmdline,
        "--snapshot-at",
        "1000000000",
        "--snapshot",
        arg(&snap),
    ];
    if let Some(d) = disk {
        args.extend_from_slice(&["--disk", arg(d)]);
    }
    let out = tandem(&args);
    out.assert_status(2);
    assert!(
        !snap.exists(),
        "a snapshot was written although the point was never reached"
    );
    let tail = out
        .stderr
        .split("the guest ended at exit ")
        .nth(1)
        .unwrap_or_else(|| panic!("no 'the guest ended at exit' message\n{}", out.describe()));
    assert!(
        out.stderr.contains("--snapshot-at 1000000000") && out.stderr.contains("(status 0)"),
        "{}",
        out.describe()
    );
    let n: u64 = tail
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exit number\n{}", out.describe()));
    out.expect_result();
    (n, out)
}

/// Uninterrupted run vs. snapshot at each of `points` + restore. With a
/// `disk_size`, every run gets its own fresh copy of the same (zero) image
/// and the final images are compared too.
fn roundtrip(cmdline: &str, points: &[u64], disk_size: Option<u64>) {
    let dir = TempDir::new("snap");
    let fresh_disk = |name: &str| disk_size.map(|s| dir.disk(name, s));
    let disk_args = |d: &Option<PathBuf>| -> Vec<String> {
        d.iter()
            .flat_map(|p| ["--disk".to_string(), arg(p).to_string()])
            .collect()
    };

    let ref_disk = fresh_disk("reference.img");
    let mut args: Vec<String> = vec!["run".into(), "--cmdline".into(), cmdline.into()];
    args.extend(disk_args(&ref_disk));
    let reference = tandem(&args.iter().map(String::as_str).collect::<Vec<_>>());
    reference.assert_status(0);
    let expected = reference.expect_result().to_string();

    let count_disk = fresh_disk("count.img");
    let (count, full) = exit_count(cmdline, count_disk.as_deref(), &dir);
    assert_eq!(full.result_line(), Some(expected.as_str()));

    for &at in points {
        assert!(
            at < count,
            "{cmdline}: snapshot point {at} is not below the {count} exits of a whole run; pick smaller points"
        );
        let disk = fresh_disk(&format!("at{at}.img"));
        let snap = dir.file(&format!("at{at}.snap"));
        let at_s = at.to_string();
        let mut args: Vec<String> = vec!["run".into(), "--cmdline".into(), cmdline.into()];
        args.extend(disk_args(&disk));
        args.extend([
            "--snapshot-at".into(),
            at_s.clone(),
            "--snapshot".into(),
            arg(&snap).into(),
        ]);
        let before = tandem(&args.iter().map(String::as_str).collect::<Vec<_>>());
        before.assert_status(0);
        assert!(
            snap.is_file(),
            "{cmdline} @{at}: no snapshot file\n{}",
            before.describe()
        );
        assert!(
            before
                .stderr
                .contains(&format!("snapshot at exit {at} written")),
            "{}",
            before.describe()
        );
        // (The RESULT line may already be out: the guest's last exits are
        // the result's characters and the debug-exit write.)
        assert!(
            before.stdout.len() < reference.stdout.len(),
            "{cmdline} @{at}: nothing left for the restore to print\n{}",
            before.describe()
        );

        let after = tandem(&["restore", "--snapshot", arg(&snap)]);
        after.assert_status(0);
        assert!(
            !after.stdout.is_empty(),
            "{cmdline} @{at}: the restored VM printed nothing\n{}",
            after.describe()
        );
        // The RESULT line may be split between the two runs' output.
        let joined = format!("{}{}", before.stdout, after.stdout);
        assert_eq!(
            common::result_line(&joined),
            Some(expected.as_str()),
            "{cmdline} @{at}: restored run ends differently\n{}",
            after.describe()
        );
        assert_eq!(
            joined, reference.stdout,
            "{cmdline} @{at}: console before + after snapshot differs from an uninterrupted run"
        );
        if let (Some(r), Some(d)) = (&ref_disk, &disk) {
            assert!(
                common::read(r) == common::read(d),
                "{cmdline} @{at}: disk contents differ from an uninterrupted run"
            );
        }
    }
}

#[test]
fn dirty_snapshot_restore() {
    // 277 exits in a whole run (deterministic: no timer-dependent exits
    // between the first and the last output).
    roundtrip("dirty 64 4", &[50, 150, 250], None);
}

#[test]
fn ticks_snapshot_restore() {
    // ~243 exits; the ticks loop runs from about exit 60 on.
    roundtrip("ticks 30", &[50, 120, 200], None);
}

#[test]
fn busy_snapshot_restore() {
    // ~210 exits: banner until ~115, then timer interrupts inside the busy
    // loop (their number depends on the host's speed), then the result.
    roundtrip("busy 20000", &[50, 120, 140], None);
}

#[test]
fn disk_snapshot_restore() {
    // ~360 exits; the restore continues on the image the snapshot run
    // left, which is exactly as it was at the snapshot point.
    roundtrip("disk 32", &[50, 200, 300], Some(1 << 20));
}

/// A valid snapshot of `ticks 30` at exit 100 to damage.
fn good_snapshot(dir: &TempDir) -> (PathBuf, Vec<u8>) {
    let snap = dir.file("good.snap");
    let out = tandem(&[
        "run",
        "--cmdline",
        "ticks 30",
        "--snapshot-at",
        "100",
        "--snapshot",
        arg(&snap),
    ]);
    out.assert_status(0);
    let bytes = common::read(&snap);
    assert_eq!(&bytes[..8], b"TNDMSNAP", "snapshot magic");
    (snap, bytes)
}

/// `restore` of `path` must be refused with status 2, a message
/// containing every one of `needles`, and no guest output.
#[track_caller]
fn refused(path: &Path, needles: &[&str]) {
    let out = tandem(&["restore", "--snapshot", arg(path)]);
    out.assert_status(2);
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "message lacks {n:?}\n{}",
            out.describe()
        );
    }
    assert!(
        out.stdout.is_empty(),
        "a VM ran from a bad snapshot\n{}",
        out.describe()
    );
    assert_eq!(
        out.stderr.trim_end().lines().count(),
        1,
        "expected one clear line\n{}",
        out.describe()
    );
}

#[test]
fn restore_refuses_bad_snapshots() {
    let dir = TempDir::new("badsnap");
    let (good, bytes) = good_snapshot(&dir);
    let good_s = arg(&good);

    // The intact file restores (so the refusals below are about the damage).
    let ok = tandem(&["restore", "--snapshot", good_s]);
    ok.assert_status(0);
    ok.expect_result();

    // One flipped byte in the middle.
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    refused(
        &dir.write("flipped.snap", &flipped),
        &["corrupted", "flipped.snap"],
    );

    // The checksum itself damaged.
    let mut crc = bytes.clone();
    let last = crc.len() - 1;
    crc[last] ^= 0x80;
    refused(&dir.write("crc.snap", &crc), &["corrupted"]);

    // Truncated to half: the trailing checksum no longer matches.
    refused(
        &dir.write("half.snap", &bytes[..bytes.len() / 2]),
        &["half.snap"],
    );
    let half = tandem(&["restore", "--snapshot", arg(&dir.file("half.snap"))]);
    assert!(
        half.stderr.contains("corrupted") || half.stderr.contains("truncated"),
        "{}",
        half.describe()
    );
    // Truncated inside the header.
    refused(
        &dir.write("short.snap", &bytes[..16]),
        &["truncated", "short.snap"],
    );
    // Magic only.
    refused(&dir.write("magic.snap", &bytes[..8]), &["truncated"]);
    // Empty file.
    refused(&dir.write("empty.snap", b""), &["not a Tandem snapshot"]);

    // Another format version (the version check comes before the checksum).
    let mut version = bytes.clone();
    version[8..12].copy_from_slice(&99u32.to_le_bytes());
    refused(
        &dir.write("v99.snap", &version),
        &["version", "99", "v99.snap"],
    );

    // Not a snapshot at all.
    refused(
        &dir.write("noise.snap", &common::noise(64 << 10, 3)),
        &["not a Tandem snapshot", "noise.snap"],
    );
    // A missing file is named.
    let missing = dir.file("missing.snap");
    refused(&missing, &[arg(&missing)]);
}

#[test]
fn snapshot_then_restore_to_file_console() {
    // restore honours --serial: the after-part goes to the file.
    let dir = TempDir::new("snap-serial");
    let (snap, _) = good_snapshot(&dir);
    let log = dir.file("after.log");
    let target = format!("file:{}", arg(&log));
    let out = tandem(&["restore", "--snapshot", arg(&snap), "--serial", &target]);
    out.assert_status(0);
    assert!(out.stdout.is_empty(), "{}", out.describe());
    let text = String::from_utf8(common::read(&log)).expect("UTF-8 console");
    assert!(text.contains("ticks done 30\n"), "{text:?}");
    assert!(common::result_line(&text).is_some(), "{text:?}");
}

/// A snapshot written by the previous format (snapshot version 1, machine
/// state without a state version), kept in the repository: `restore` and
/// `record --from-snapshot` refuse it by name and version; the same state
/// behind a current file header is refused as unversioned state. Nothing
/// is misread.
#[test]
fn snapshot_of_the_previous_format_is_refused_clearly() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/snapshot-v1.snap");
    let bytes = common::read(&golden);
    assert_eq!(&bytes[..8], b"TNDMSNAP");
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
    refused(
        &golden,
        &["snapshot-v1.snap", "format version 1", "reads version 3"],
    );
    let dir = TempDir::new("oldsnap");
    let log = dir.file("r.tlog");
    let rec = tandem(&[
        "record",
        "--log",
        arg(&log),
        "--from-snapshot",
        arg(&golden),
    ]);
    rec.assert_status(2);
    assert!(
        rec.stderr.contains("format version 1"),
        "{}",
        rec.describe()
    );

    // The old machine state under a current header and a valid checksum.
    let mut relabeled = bytes[..bytes.len() - 4].to_vec();
    relabeled[8..12].copy_from_slice(&3u32.to_le_bytes());
    let crc = crc32c::crc32c(&relabeled);
    relabeled.extend_from_slice(&crc.to_le_bytes());
    refused(
        &dir.write("relabeled.snap", &relabeled),
        &["relabeled.snap", "no state version"],
    );
}
