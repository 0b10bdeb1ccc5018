//! Lockstep protection from the first exit (issue 8, first slice), over
//! loopback: `tandem run --protect-to` streams its log to a `tandem
//! secondary`, which replays it as it arrives. The secondary follows to the
//! end with the primary's final state digest, both consoles are the same
//! bytes, the secondary's kept log replays verified, the Output Rule holds
//! console bytes while the secondary cannot acknowledge, and a secondary
//! outside the cluster, or without the same disk, is refused before any VM
//! byte.

mod common;

use std::path::Path;

use common::cluster::{
    final_digest as digest, loopback_secondary, make_disk, run_tandem, Pki, Proc,
};
use common::{arg, result_line, TempDir};
use recordlog::{Entry, LogReader, OutputKind};

/// Protect `cmdline` from boot (with a disk: the primary runs on
/// `primary.img`, the secondary on an identical copy) and check everything
/// the slice promises.
fn protected(cmdline: &str, disk_len: Option<usize>) {
    let dir = TempDir::new("lockstep");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let sec_serial = dir.s("sec.txt");
    let sec_log = dir.s("sec.log");
    let (pri_img, sec_img, orig_img) = (dir.s("pri.img"), dir.s("sec.img"), dir.s("orig.img"));
    let mut sec_extra = vec!["--log", &sec_log];
    let sec_serial_arg = format!("file:{sec_serial}");
    sec_extra.extend(["--serial", &sec_serial_arg]);
    if let Some(len) = disk_len {
        make_disk(Path::new(&orig_img), len);
        std::fs::copy(&orig_img, &pri_img).unwrap();
        std::fs::copy(&orig_img, &sec_img).unwrap();
        sec_extra.extend(["--disk", &sec_img]);
    }
    let (sec, addr) = loopback_secondary(&pki.creds("sec"), &sec_extra);
    let mut args = vec!["run", "--cmdline", cmdline, "--protect-to", &addr];
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    if disk_len.is_some() {
        args.extend(["--disk", &pri_img]);
    }
    let (status, pri_out, pri_err) = run_tandem(&args);
    let (sec_status, _, sec_err) = sec.finish();
    let both = format!("--- primary ---\n{pri_err}\n--- secondary ---\n{sec_err}");
    assert_eq!(status, 0, "primary failed\n{pri_out}\n{both}");
    assert_eq!(sec_status, 0, "secondary failed\n{both}");
    assert!(result_line(&pri_out).is_some(), "no RESULT\n{pri_out}");
    assert!(sec_err.contains("replay verified"), "{both}");
    assert_eq!(
        digest(&pri_err),
        digest(&sec_err),
        "final digests differ\n{both}"
    );
    let sec_console = std::fs::read_to_string(&sec_serial).unwrap();
    assert_eq!(pri_out, sec_console, "the consoles differ\n{both}");
    if disk_len.is_some() {
        assert!(
            std::fs::read(&pri_img).unwrap() == std::fs::read(&sec_img).unwrap(),
            "the disk images differ after the run"
        );
    }
    // The secondary's log replays like any record log.
    let mut replay = vec!["replay", "--log", &sec_log, "--quiet"];
    if disk_len.is_some() {
        replay.extend(["--disk", &orig_img]);
    }
    let (rs, _, rerr) = run_tandem(&replay);
    assert_eq!(rs, 0, "replay of the secondary's log failed\n{rerr}");
    assert!(rerr.contains("replay verified"), "{rerr}");
    assert_eq!(digest(&rerr), digest(&pri_err));
}

#[test]
fn hello_protected_from_boot() {
    protected("hello", None);
}

#[test]
fn busy_protected_from_boot() {
    protected("busy 3000", None);
}

#[test]
fn dirty_protected_from_boot() {
    protected("dirty 64 4", None);
}

#[test]
fn disk_protected_from_boot() {
    protected("disk 64", Some(1 << 20));
}

fn size(p: &str) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// The Output Rule: with the secondary stopped, the guest keeps running
/// (its log grows by several rounds) but no console byte of a log entry the
/// secondary had not acknowledged leaves the primary before SIGCONT; then
/// the held bytes come out and the run ends as usual. What the stopped
/// secondary can have acknowledged is bounded by what it had received (its
/// `--log`, written before each acknowledgement), not guessed from time.
#[test]
fn console_waits_for_the_secondary() {
    let dir = TempDir::new("lockstep-rule");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let sec_serial = format!("file:{}", dir.s("sec.txt"));
    let sec_log = dir.s("sec.log");
    let (sec, addr) = loopback_secondary(
        &pki.creds("sec"),
        &["--serial", &sec_serial, "--log", &sec_log],
    );
    let pri_console = dir.s("pri.txt");
    let pri_log = dir.s("pri.log");
    let out_log = dir.s("outputs.jsonl");
    let serial = format!("file:{pri_console}");
    let mut args = vec![
        "run",
        "--cmdline",
        "fill 4 60 3",
        "--serial",
        &serial,
        "--keep-log",
        &pri_log,
        "--output-log",
        &out_log,
        "--protect-to",
        &addr,
        // The secondary is stopped on purpose: not a failover.
        "--failover-timeout-ms",
        "600000",
    ];
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    let mut pri = Proc::spawn(&[], &args);
    let rounds = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .matches("round ")
            .count()
    };
    pri.wait_until("round 2 on the primary's console", || {
        rounds(&pri_console) >= 2
    });
    sec.signal(libc::SIGSTOP);
    pri.wait_until("the secondary to be stopped", || stopped(sec.pid()));
    // Every acknowledgement it sent covers at most what it had received.
    let acked_at_most = size(&sec_log);
    // The guest goes on: its log gets console outputs (lines) past what
    // the secondary can have acknowledged ...
    let mut logged = 0;
    pri.wait_until("two console lines logged past the acknowledged log", || {
        let ends = console_entry_ends(&pri_log);
        let past: Vec<_> = ends.iter().filter(|&&e| e > acked_at_most).collect();
        logged = past.get(1).map_or(0, |&&e| e);
        past.len() >= 2
    });
    let console_at = size(&pri_console);
    let cont_ns = realtime_ns();
    sec.signal(libc::SIGCONT);
    pri.wait_until("held output to be released", || {
        size(&pri_console) > console_at
    });
    let (status, _, pri_err) = pri.finish();
    let (sec_status, _, sec_err) = sec.finish();
    assert_eq!(status, 0, "{pri_err}\n{sec_err}");
    assert_eq!(sec_status, 0, "{pri_err}\n{sec_err}");
    let console = std::fs::read_to_string(&pri_console).unwrap();
    assert!(result_line(&console).is_some(), "{console}");
    assert_eq!(console, std::fs::read_to_string(dir.s("sec.txt")).unwrap());
    assert_eq!(digest(&pri_err), digest(&sec_err));
    // ... but its console does not: what had left by SIGCONT is at most the
    // console outputs of acknowledged entries, and every output past them
    // was released only after SIGCONT.
    let released: Vec<serde_json::Value> = std::fs::read_to_string(&out_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["kind"] == "console")
        .collect();
    let field = |v: &serde_json::Value, f: &str| v[f].as_u64().unwrap();
    let (acked, held): (Vec<_>, Vec<_>) = released
        .iter()
        .partition(|v| field(v, "entry_end") <= acked_at_most);
    let acked_bytes: u64 = acked.iter().map(|v| field(v, "len")).sum();
    assert!(
        console_at <= acked_bytes,
        "console output left the primary while the secondary was stopped: {console_at} bytes out, {acked_bytes} acknowledged"
    );
    for v in &held {
        assert!(
            field(v, "released_ns") >= cont_ns,
            "released while the secondary was stopped (it had received {acked_at_most} log bytes): {v}"
        );
    }
    let held_then = held
        .iter()
        .filter(|v| field(v, "entry_end") <= logged)
        .count();
    assert!(
        held_then > 0,
        "the guest produced no console output while the secondary was stopped"
    );
}

/// The log offsets at which the console `Output` entries of the log at
/// `path` (being written) end.
fn console_entry_ends(path: &str) -> Vec<u64> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let Ok((mut r, _)) = LogReader::open(std::io::BufReader::new(f)) else {
        return Vec::new();
    };
    let mut ends = Vec::new();
    // A partly written last entry ends the reading.
    while let Ok(Some(e)) = r.next_entry() {
        if let Entry::Output { output, .. } = e {
            if output.kind == OutputKind::Console {
                ends.push(r.offset());
            }
        }
    }
    ends
}

/// Has the process `pid` stopped (every thread of it: a group stop)?
fn stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| Some(s.rsplit_once(") ")?.1.starts_with('T')))
            .unwrap_or(false)
    })
}

/// Nanoseconds of the real-time clock (the `--output-log` times).
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A secondary whose certificate comes from another CA is refused in the
/// TLS handshake: the primary gets a clear error and no console byte, the
/// secondary receives no log byte.
#[test]
fn secondary_from_another_cluster_is_refused() {
    let dir = TempDir::new("lockstep-ca");
    let ours = Pki::new(&["pri"], &[]);
    let theirs = Pki::new(&["sec"], &[]);
    let sec_log = dir.s("sec.log");
    let (sec, addr) = loopback_secondary(&theirs.creds("sec"), &["--log", &sec_log]);
    let mut args = vec!["run", "--cmdline", "hello", "--protect-to", &addr];
    let creds = ours.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    let (status, out, err) = run_tandem(&args);
    assert_ne!(status, 0, "{err}");
    assert!(err.contains("handshake"), "no handshake error: {err}");
    assert!(out.is_empty(), "console output without protection: {out}");
    assert_eq!(size(&sec_log), 0, "the secondary received log bytes");
    assert!(sec.child.id() > 0);
    drop(sec);
    let _ = arg(dir.path());
}

/// A secondary whose disk is not the primary's image is refused before any
/// VM byte, with a message naming the difference.
#[test]
fn different_disk_is_refused() {
    let dir = TempDir::new("lockstep-disk");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let (pri_img, sec_img, sec_log) = (dir.s("pri.img"), dir.s("sec.img"), dir.s("sec.log"));
    make_disk(Path::new(&pri_img), 1 << 20);
    make_disk(Path::new(&sec_img), 1 << 20);
    let mut other = std::fs::read(&sec_img).unwrap();
    other[70_000] ^= 0xff;
    std::fs::write(&sec_img, other).unwrap();
    let (mut sec, addr) =
        loopback_secondary(&pki.creds("sec"), &["--disk", &sec_img, "--log", &sec_log]);
    let mut args = vec![
        "run",
        "--cmdline",
        "disk 64",
        "--disk",
        &pri_img,
        "--protect-to",
        &addr,
    ];
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    let (status, out, err) = run_tandem(&args);
    assert_ne!(status, 0, "{err}");
    assert!(
        err.contains("refused the VM") && err.contains("differs"),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");
    assert_eq!(size(&sec_log), 0);
    sec.wait_for("differs from the primary's image", true);
}

/// `tsc` reads the TSC, which the secondary's replay cannot reproduce:
/// every round of it diverges on the secondary, which asks the primary for
/// a sync point at once (DESIGN.md rule 5) instead of waiting for the next
/// one in the log, adopts it within a bounded number of exits, and carries
/// on protecting; both sides count the repairs; the final digests are equal.
#[test]
fn tsc_divergence_is_repaired_on_the_secondary() {
    let pki = Pki::new(&["pri", "sec"], &[]);
    let (sec, addr) = loopback_secondary(&pki.creds("sec"), &[]);
    let mut args = vec!["run", "--cmdline", "tsc 200 100", "--protect-to", &addr];
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    let (status, pri_out, pri_err) = run_tandem(&args);
    let (sec_status, _, sec_err) = sec.finish();
    let both = format!("--- primary ---\n{pri_out}\n{pri_err}\n--- secondary ---\n{sec_err}");
    assert_eq!(status, 0, "{both}");
    assert_eq!(sec_status, 0, "{both}");
    assert_eq!(digest(&pri_err), digest(&sec_err), "{both}");
    assert!(sec_err.contains("replay repaired: "), "{both}");
    // Each repair: the divergence's exit, the adopted sync point's exit.
    let repairs: Vec<(u64, u64)> = sec_err
        .lines()
        .filter_map(|l| {
            let rest = l.split("divergence at exit ").nth(1)?;
            let (d, rest) = rest.split_once(" repaired with the sync point at exit ")?;
            let s = rest.split_whitespace().next()?;
            Some((d.parse().ok()?, s.parse().ok()?))
        })
        .collect();
    assert!(!repairs.is_empty(), "no repair reported\n{both}");
    let asked = sec_err
        .matches("asking the primary for a sync point")
        .count();
    assert!(asked >= 1, "the secondary never asked\n{both}");
    // The primary answered: a sync point at its next exit after the
    // request arrived, long before the next periodic one (200000 exits).
    assert!(
        pri_err.contains("it gets a sync point at the next exit"),
        "{both}"
    );
    let worst = repairs.iter().map(|(d, s)| s - d).max().unwrap();
    println!(
        "{} repairs, {asked} sync points asked for, worst {worst} exits from divergence to repair",
        repairs.len()
    );
    assert!(worst < 20_000, "a repair took {worst} exits\n{both}");
    // Both sides count them (the primary: as far as reported before it
    // closed the stream).
    let total = num_after(&sec_err, "replay repaired: ").unwrap_or(0);
    assert_eq!(total as usize, repairs.len(), "{both}");
    let pri_count = num_after(&pri_err, "the secondary repaired ").expect("primary count");
    assert!(pri_count >= 1 && pri_count <= total, "{both}");
}

/// The number right after the first `prefix` in `text`.
fn num_after(text: &str, prefix: &str) -> Option<u64> {
    let rest = text.split(prefix).nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}
