//! Protecting a VM that already runs (`tandem protect`), over loopback: a
//! `tandem run --api-socket` guest is seeded into a `tandem secondary`
//! mid-run (the migration's pre-copy, then a measured pause), which then
//! replays its log to the end: the final digests are equal, the
//! secondary's console is exactly the primary's from the seed on, a disk
//! copied during the seeding ends identical. `tandem status` shows the
//! protection on both sides; `tandem unprotect` ends it in order and the VM
//! finishes unprotected; a protect to nobody fails and the VM runs on.
//! Everything is triggered by guest events (console lines), never by
//! sleeping.

mod common;

use std::path::Path;

use common::cluster::{
    final_digest as digest, loopback_secondary, make_disk, migrate, receiver, reference,
    run_tandem, source, status, unprotect_verified, Pki, Proc,
};
use common::{result_line, TempDir};

/// `tandem protect --api SOCK --to ADDR`: (status, stdout, stderr).
fn protect(sock: &str, to: &str, creds: &[String]) -> (i32, String, String) {
    let mut args = vec!["protect", "--api", sock, "--to", to];
    args.extend(creds.iter().map(String::as_str));
    run_tandem(&args)
}

/// The measured pause `tandem protect` printed (ms).
#[track_caller]
fn pause_ms(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("primary paused "))
        .and_then(|r| r.strip_suffix(" ms"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no pause in\n{out}"))
}

#[track_caller]
fn num(v: &serde_json::Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {field} in {v}"))
}

/// Protect `cmdline` once `marker` is on its console (with a disk of
/// `disk_len` bytes: the secondary gets a copy at a fresh path during the
/// seeding), check both status views mid-run, and everything at the end.
fn protect_mid_run(cmdline: &str, marker: &str, disk_len: Option<usize>) {
    let dir = TempDir::new("protect");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let (sock, sec_sock) = (dir.s("pri.sock"), dir.s("sec.sock"));
    let sec_serial = format!("file:{}", dir.s("sec.txt"));
    let (pri_img, sec_img) = (dir.s("pri.img"), dir.s("sec.img"));
    let mut sec_extra = vec!["--serial", &sec_serial, "--api-socket", &sec_sock];
    let mut pri_extra = vec![];
    if let Some(len) = disk_len {
        make_disk(Path::new(&pri_img), len);
        sec_extra.extend(["--disk", &sec_img]);
        pri_extra.extend(["--disk", &pri_img]);
    }
    let (sec, addr) = loopback_secondary(&pki.creds("sec"), &sec_extra);
    let mut pri = source(&[], &sock, cmdline, &pri_extra);
    pri.wait_for(marker, false);
    let (code, out, err) = protect(&sock, &addr, &pki.creds("pri"));
    assert_eq!(code, 0, "protect failed\n{out}\n{err}\n{}", pri.describe());
    assert!(out.contains("protected by sec at"), "{out}");
    let pause = pause_ms(&out);
    eprintln!("{cmdline}: primary paused {pause:.1} ms");
    assert!(pause > 0.0, "{out}");
    // Both sides say what protects what (unless the guest ended already).
    let p = status(&sock);
    if p["state"] != "stopped" {
        let pp = &p["protection"];
        assert_eq!(pp["role"], "primary", "{p}");
        assert!(pp["peer"].as_str().unwrap().starts_with("sec at"), "{p}");
        assert!(num(pp, "exit_seq") >= num(pp, "start_exit"), "{p}");
        assert!(num(pp, "replayed_exit") <= num(pp, "exit_seq"), "{p}");
        assert!(num(pp, "log_bytes") >= num(pp, "acked_bytes"), "{p}");
        for f in [
            "lag_us",
            "log_bandwidth_bps",
            "oldest_held_ms",
            "ack_rtt_ms",
        ] {
            assert!(num(pp, f) >= 0.0, "{f}: {p}");
        }
        assert!(num(pp, "outputs_held") >= 0.0, "{p}");
        eprintln!("{cmdline}: primary status {pp}");
    }
    if let Ok(s) = std::panic::catch_unwind(|| status(&sec_sock)) {
        let sp = &s["protection"];
        assert_eq!(sp["role"], "secondary", "{s}");
        assert!(sp["peer"].as_str().unwrap().starts_with("pri at"), "{s}");
        assert!(num(sp, "replayed_exit") >= num(sp, "start_exit"), "{s}");
        assert!(num(sp, "log_bytes") > 0.0, "{s}");
        eprintln!("{cmdline}: secondary status {sp}");
    }
    let (pcode, pout, perr) = pri.finish();
    let (scode, _, serr) = sec.finish();
    let both = format!("--- primary ---\n{perr}\n--- secondary ---\n{serr}");
    assert_eq!(pcode, 0, "primary\n{pout}\n{both}");
    assert_eq!(scode, 0, "secondary\n{both}");
    assert!(serr.contains("seeded at exit"), "{both}");
    assert!(serr.contains("replay verified"), "{both}");
    assert_eq!(digest(&perr), digest(&serr), "final digests differ\n{both}");
    assert!(result_line(&pout).is_some(), "{pout}");
    let sec_console = std::fs::read_to_string(dir.file("sec.txt")).unwrap();
    assert!(
        !sec_console.is_empty() && pout.ends_with(&sec_console),
        "the secondary's console is not the primary's from the seed on\n--- primary ---\n{pout}\n--- secondary ---\n{sec_console}"
    );
    if disk_len.is_some() {
        assert!(
            std::fs::read(&pri_img).unwrap() == std::fs::read(&sec_img).unwrap(),
            "the disk images differ after the run"
        );
    }
}

#[test]
fn protect_busy_mid_run() {
    protect_mid_run("busy 300000", "busy ", None);
}

#[test]
fn protect_dirty_mid_run() {
    protect_mid_run("dirty 64 1500", "round 100\n", None);
}

#[test]
fn protect_disk_mid_run() {
    protect_mid_run("disk 512", "disk capacity", Some(4 << 20));
}

/// `tandem unprotect`: the secondary stops saying why, the VM finishes
/// unprotected with the result of an unprotected run.
#[test]
fn unprotect_then_the_vm_finishes_alone() {
    let cmdline = "dirty 64 1500";
    let expected = reference(cmdline, None);
    let dir = TempDir::new("unprotect");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let sock = dir.s("pri.sock");
    let (sec, addr) = loopback_secondary(&pki.creds("sec"), &[]);
    let mut pri = source(&[], &sock, cmdline, &[]);
    pri.wait_for("round 100\n", false);
    let (code, out, err) = protect(&sock, &addr, &pki.creds("pri"));
    assert_eq!(code, 0, "protect failed\n{out}\n{err}\n{}", pri.describe());
    pri.wait_for("round 400\n", false);
    let (code, out, err) = run_tandem(&["unprotect", "--api", &sock]);
    assert_eq!(
        code,
        0,
        "unprotect failed\n{out}\n{err}\n{}",
        pri.describe()
    );
    assert!(out.contains("unprotected at exit"), "{out}");
    let s = status(&sock);
    assert!(
        s.get("protection").is_none() || s["state"] == "stopped",
        "{s}"
    );
    let (scode, _, serr) = sec.finish();
    assert_eq!(scode, 0, "secondary\n{serr}");
    assert!(serr.contains("ended protection"), "{serr}");
    assert!(serr.contains("replay verified"), "{serr}");
    let (pcode, pout, perr) = pri.finish();
    assert_eq!(pcode, 0, "primary\n{perr}");
    assert_eq!(
        pout, expected,
        "the console differs from an unprotected run"
    );
}

/// A VM protected from boot with a control socket (`tandem run
/// --protect-to ADDR --api-socket SOCK`) is protected the one way `tandem
/// protect` protects a running VM (seeded before its first instruction),
/// so `tandem unprotect` ends it as it ends any protection: the secondary
/// replays verified to the log's end and stops, the primary runs on to the
/// guest's end unprotected with the console of an unprotected run, and
/// `tandem status` says unprotected, ended by the operator.
#[test]
fn protected_from_boot_with_a_control_socket_then_unprotected() {
    // Long enough to outlive the unprotect on a loaded host.
    let cmdline = "dirty 64 6000";
    let expected = reference(cmdline, None);
    let dir = TempDir::new("boot-unprotect");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let sock = dir.s("pri.sock");
    let sec_serial = format!("file:{}", dir.s("sec.txt"));
    let (sec, addr) = loopback_secondary(&pki.creds("sec"), &["--serial", &sec_serial]);
    let mut args = vec![
        "run",
        "--cmdline",
        cmdline,
        "--api-socket",
        &sock,
        "--protect-to",
        &addr,
    ];
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    let mut pri = Proc::spawn(&[], &args);
    pri.wait_for("protected by the secondary", true);
    pri.wait_for("round 300\n", false);
    let s = status(&sock);
    assert_eq!(s["protection"]["role"], "primary", "{s}");
    assert_eq!(s["protection"]["start_exit"], 0, "{s}");
    assert_eq!(s["lineage"]["role"], "protected", "{s}");
    let serr = unprotect_verified(&sock, &pri, sec);
    assert!(serr.contains("seeded at exit 0"), "{serr}");
    let s = status(&sock);
    assert!(s.get("protection").is_none(), "{s}");
    assert_eq!(s["lineage"]["role"], "ended_by_operator", "{s}");
    let (_, text, _) = run_tandem(&["status", "--api", &sock]);
    assert!(
        text.contains("unprotected (protection ended by tandem unprotect)"),
        "{text}"
    );
    let (pcode, pout, perr) = pri.finish();
    assert_eq!(pcode, 0, "primary\n{perr}");
    assert_eq!(
        pout, expected,
        "the console differs from an unprotected run\n{perr}"
    );
    assert!(
        perr.contains("the run ended at exit ")
            && perr.contains("unprotected (protection ended by tandem unprotect)"),
        "{perr}"
    );
    // The secondary's console (replayed from the first exit) is the
    // primary's up to where protection ended.
    let sec_console = std::fs::read_to_string(dir.file("sec.txt")).unwrap();
    assert!(
        sec_console.contains("round 300\n") && expected.starts_with(&sec_console),
        "the secondary's console is not the primary's up to the unprotect\n{sec_console}"
    );
}

/// `tandem migrate` of a protected VM is refused before anything is sent:
/// the secondary would find its primary gone and go live beside the
/// migrated copy. The VM stays protected and the secondary follows it to
/// its end.
#[test]
fn migrating_a_protected_vm_is_refused() {
    let dir = TempDir::new("protect-migrate");
    let pki = Pki::new(&["pri", "sec", "dst"], &[]);
    let sock = dir.s("pri.sock");
    let (sec, addr) = loopback_secondary(&pki.creds("sec"), &[]);
    let (dst, dst_addr) = receiver(&[], "127.0.0.1:0", &pki.creds("dst"), &[]);
    // Long enough to outlive the protect and the refusal on any load;
    // protection is ended below.
    let mut pri = source(&[], &sock, "dirty 64 1000000", &[]);
    pri.wait_for("round 10\n", false);
    let (code, out, err) = protect(&sock, &addr, &pki.creds("pri"));
    assert_eq!(code, 0, "protect failed\n{out}\n{err}\n{}", pri.describe());
    let (code, out, err) = migrate(&sock, &dst_addr, &pki.creds("pri"), &[]);
    assert_eq!(code, 1, "migrate of a protected VM\n{out}\n{err}");
    assert!(
        err.contains("protected by the secondary") && err.contains("two live copies"),
        "{err}"
    );
    assert!(!dst.err().contains("receiving a VM"), "{}", dst.describe());
    let s = status(&sock);
    assert_eq!(s["protection"]["role"], "primary", "{s}");
    // Still protected: the secondary follows to the end of the log that
    // unprotect ends, verified.
    unprotect_verified(&sock, &pri, sec);
    drop(pri);
}

/// A secondary whose `--disk` is the primary's own image (the same file on
/// one host) would write every block again behind the primary and corrupt
/// the live image: the image lock refuses it at its start (status 2,
/// naming the image), before it could be protected onto. The image is left
/// as it was and the VM runs on, unprotected. (Across hosts on shared
/// storage the seed's identity check refuses it: `lockstep_replica`.)
#[test]
fn a_secondary_on_the_primarys_own_image_is_refused() {
    let dir = TempDir::new("protect-same-image");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let img = dir.file("disk.img");
    make_disk(&img, 1 << 20);
    let before = std::fs::read(&img).unwrap();
    let sock = dir.s("pri.sock");
    let mut pri = source(
        &[],
        &sock,
        "dirty 64 1000000",
        &["--disk", &dir.s("disk.img")],
    );
    pri.wait_for("round 10\n", false);
    let mut args = vec!["secondary", "--listen", "127.0.0.1:0"];
    let creds = pki.creds("sec");
    args.extend(creds.iter().map(String::as_str));
    let disk = dir.s("disk.img");
    args.extend(["--disk", disk.as_str()]);
    let (code, _, err) = run_tandem(&args);
    assert_eq!(code, 2, "a secondary on the primary's image\n{err}");
    assert!(err.contains(&disk) && err.contains("in use"), "{err}");
    let s = status(&sock);
    assert_eq!(s["state"], "running", "{s}");
    assert!(s.get("protection").is_none(), "{s}");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the image was changed"
    );
    drop(pri);
}

/// A protect to an address where nobody listens fails with a clear error;
/// the VM runs on, unprotected (its console goes on growing).
#[test]
fn protect_to_nobody_fails_and_the_vm_runs_on() {
    let dir = TempDir::new("protect-nobody");
    let pki = Pki::new(&["pri"], &[]);
    let sock = dir.s("pri.sock");
    // A port nobody listens on: bound and closed again.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let to = format!("127.0.0.1:{port}");
    // Long enough to outlive the failed attempt on any load; ended below.
    let mut pri = source(&[], &sock, "dirty 64 1000000", &[]);
    pri.wait_for("round 10\n", false);
    let (code, out, err) = protect(&sock, &to, &pki.creds("pri"));
    assert_eq!(code, 1, "protect to nobody did not fail\n{out}\n{err}");
    assert!(err.contains("protect failed"), "{err}");
    assert!(err.contains("keeps running unprotected"), "{err}");
    let s = status(&sock);
    assert_eq!(s["state"], "running", "{s}");
    assert!(s.get("protection").is_none(), "{s}");
    // It runs on: rounds it had not reached when the protect failed.
    let (_, text, _) = run_tandem(&["status", "--api", &sock]);
    assert!(text.contains("unprotected"), "{text}");
    let rounds = pri.out().matches("round ").count();
    pri.wait_for(&format!("round {}\n", rounds + 20), false);
    let _ = pri.child.kill();
}

/// `tandem protect --lag-bound-ms --log-queue-kib --progress-ms`: the
/// bounds are the protection's (its status shows them; with
/// `--progress-ms 0` the log has no progress mark although this guest
/// idles between its rounds); a value out of range is refused naming it,
/// and the VM runs on unprotected as if nothing was asked.
#[test]
fn protect_with_its_own_bounds() {
    let dir = TempDir::new("protect-bounds");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let (sock, sec_log) = (dir.s("pri.sock"), dir.s("sec.log"));
    let (sec, addr) = loopback_secondary(&pki.creds("sec"), &["--log", &sec_log]);
    let mut pri = source(&[], &sock, "fill 4 400 1", &[]);
    pri.wait_for("round 10\n", false);
    let creds = pki.creds("pri");
    let with = |extra: &[&str]| {
        let mut args = vec!["protect", "--api", &sock, "--to", &addr];
        args.extend(creds.iter().map(String::as_str));
        args.extend_from_slice(extra);
        run_tandem(&args)
    };
    let (code, out, err) = with(&["--lag-bound-ms", "99999999"]);
    assert_eq!(code, 1, "a bad lag bound was taken\n{out}\n{err}");
    assert!(err.contains("--lag-bound-ms 99999999"), "{err}");
    assert!(err.contains("keeps running unprotected"), "{err}");
    let s = status(&sock);
    assert_eq!(s["state"], "running", "{s}");
    assert!(s.get("protection").is_none(), "{s}");
    let (code, out, err) = with(&["--log-queue-mib", "99999999999"]);
    assert_eq!(code, 1, "a bad queue bound was taken\n{out}\n{err}");
    assert!(err.contains("--log-queue-mib 99999999999"), "{err}");
    assert!(status(&sock).get("protection").is_none());

    let (code, out, err) = with(&[
        "--lag-bound-ms",
        "123",
        "--log-queue-kib",
        "256",
        "--progress-ms",
        "0",
    ]);
    assert_eq!(code, 0, "protect failed\n{out}\n{err}\n{}", pri.describe());
    let s = status(&sock);
    if s["state"] != "stopped" {
        let b = &s["protection"]["bound"];
        assert_eq!(b["lag_bound_ms"].as_u64(), Some(123), "{s}");
        assert_eq!(b["queue_bound_bytes"].as_u64(), Some(256 << 10), "{s}");
    }
    let (pcode, pout, perr) = pri.finish();
    let (scode, _, serr) = sec.finish();
    let both = format!("--- primary ---\n{perr}\n--- secondary ---\n{serr}");
    assert_eq!((pcode, scode), (0, 0), "{both}");
    assert!(result_line(&pout).is_some(), "{pout}");
    assert_eq!(digest(&perr), digest(&serr), "{both}");
    let log = std::fs::read(&sec_log).unwrap();
    let (mut r, _) = recordlog::LogReader::open(&log[..]).unwrap();
    let (mut outputs, mut marks) = (0, 0);
    while let Some(e) = r.next_entry().unwrap() {
        match e {
            recordlog::Entry::Output { .. } => outputs += 1,
            recordlog::Entry::Progress { .. } => marks += 1,
            _ => {}
        }
    }
    assert!(outputs > 100, "{outputs} outputs in the secondary's log");
    assert_eq!(marks, 0, "progress marks in spite of --progress-ms 0");
}
