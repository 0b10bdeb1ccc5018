//! The secondary's copy is the primary's VM (issue 8), over loopback:
//! its state digest at several exits equals that of a replay of the
//! primary's own log at the same exits, and the log a seeded secondary
//! keeps (`--log`, with the seed next to it, and the seed's disk for a VM
//! with one) replays to the primary's final digest.

mod common;

use std::collections::BTreeMap;

use common::cluster::{self, final_digest as digest, make_disk, run_tandem, source, Pki, Proc};
use common::TempDir;

fn secondary(creds: &[String], extra: &[&str]) -> (Proc, String) {
    cluster::secondary(&[], "127.0.0.1:0", creds, extra)
}

/// The `state digest at exit N: HEX` lines of `stderr`.
fn digests_at(stderr: &str) -> BTreeMap<u64, String> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.split("state digest at exit ").nth(1)?;
            let (exit, hex) = rest.split_once(": ")?;
            Some((exit.parse().ok()?, hex.trim().to_string()))
        })
        .collect()
}

#[test]
fn the_secondary_equals_a_replay_of_the_primary_log_at_several_exits() {
    let dir = TempDir::new("replica-digests");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let stops = "10,150,300";
    let (sec, addr) = secondary(&pki.creds("sec"), &["--digest-at", stops]);
    let pri_log = dir.s("pri.log");
    let mut args = vec![
        "run",
        "--cmdline",
        "dirty 64 8",
        "--protect-to",
        &addr,
        "--keep-log",
        &pri_log,
    ];
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    let (status, out, pri_err) = run_tandem(&args);
    let (sec_status, _, sec_err) = sec.finish();
    let both = format!("--- primary ---\n{out}\n{pri_err}\n--- secondary ---\n{sec_err}");
    assert_eq!(status, 0, "{both}");
    assert_eq!(sec_status, 0, "{both}");
    let (rs, _, replay_err) =
        run_tandem(&["replay", "--log", &pri_log, "--quiet", "--digest-at", stops]);
    assert_eq!(rs, 0, "{replay_err}");
    assert!(replay_err.contains("replay verified"), "{replay_err}");
    let (theirs, ours) = (digests_at(&replay_err), digests_at(&sec_err));
    assert_eq!(
        ours.keys().copied().collect::<Vec<_>>(),
        vec![10, 150, 300],
        "{both}"
    );
    assert_eq!(ours, theirs, "{both}\n--- replay ---\n{replay_err}");
    // The guest's state moves on between them (not one value thrice).
    let mut distinct: Vec<_> = ours.values().collect();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{both}");
    assert_eq!(digest(&sec_err), digest(&pri_err), "{both}");
    assert_eq!(digest(&replay_err), digest(&pri_err));
}

#[test]
fn a_seeded_secondary_log_replays_to_the_primary_digest() {
    let dir = TempDir::new("replica-seed");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let sec_log = dir.s("sec.log");
    let (sec, addr) = secondary(&pki.creds("sec"), &["--log", &sec_log]);
    let sock = dir.s("pri.sock");
    let mut pri = source(&[], &sock, "busy 300000", &[]);
    pri.wait_for("busy ", false);
    let mut args = vec!["protect", "--api", &sock, "--to", &addr];
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    let (code, out, err) = run_tandem(&args);
    assert_eq!(code, 0, "protect failed\n{out}\n{err}\n{}", pri.describe());
    let (pcode, _, perr) = pri.finish();
    let (scode, _, serr) = sec.finish();
    let both = format!("--- primary ---\n{perr}\n--- secondary ---\n{serr}");
    assert_eq!(pcode, 0, "{both}");
    assert_eq!(scode, 0, "{both}");
    assert!(serr.contains("the seed (exit "), "{both}");
    assert_eq!(digest(&perr), digest(&serr), "{both}");
    let seed = format!("{sec_log}.seed");
    assert!(std::path::Path::new(&seed).is_file(), "{both}");
    // `tandem replay` finds the seed next to the log.
    let (rs, _, rerr) = run_tandem(&["replay", "--log", &sec_log, "--quiet"]);
    assert_eq!(rs, 0, "{rerr}");
    assert!(rerr.contains("replay verified"), "{rerr}");
    assert_eq!(digest(&rerr), digest(&perr), "{rerr}\n{both}");
    // Without it, the replay says which snapshot it lacks.
    std::fs::remove_file(&seed).unwrap();
    let (rs, _, rerr) = run_tandem(&["replay", "--log", &sec_log, "--quiet"]);
    assert_ne!(rs, 0, "{rerr}");
    assert!(rerr.contains("the seed of a running VM"), "{rerr}");
}

/// A seeded secondary of a VM with a disk keeps the disk as it was at the
/// seed beside its log (`LOG.seed.disk`): `tandem replay --log LOG`
/// replays on a copy of it (`LOG.replay.disk`) to the primary's final
/// digest and final image, even once the secondary's own image has gone
/// (it went on being written, or went live), and leaves the kept image as
/// it was, so that the log replays again.
#[test]
fn a_seeded_secondary_log_of_a_disk_vm_replays_on_the_seed_s_disk() {
    let dir = TempDir::new("replica-seed-disk");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let (sec_log, pri_img, sec_img) = (dir.s("sec.log"), dir.s("pri.img"), dir.s("sec.img"));
    make_disk(std::path::Path::new(&pri_img), 4 << 20);
    let (sec, addr) = secondary(&pki.creds("sec"), &["--log", &sec_log, "--disk", &sec_img]);
    let sock = dir.s("pri.sock");
    let mut pri = source(&[], &sock, "disk 512", &["--disk", &pri_img]);
    pri.wait_for("disk capacity", false);
    let (code, out, err) = cluster::protect(&sock, &addr, &pki.creds("pri"), &[]);
    assert_eq!(code, 0, "protect failed\n{out}\n{err}\n{}", pri.describe());
    let (pcode, _, perr) = pri.finish();
    let (scode, _, serr) = sec.finish();
    let both = format!("--- primary ---\n{perr}\n--- secondary ---\n{serr}");
    assert_eq!((pcode, scode), (0, 0), "{both}");
    assert_eq!(digest(&perr), digest(&serr), "{both}");
    let kept = format!("{sec_log}.seed.disk");
    assert!(serr.contains(&format!("its disk in {kept}")), "{both}");
    let at_seed = std::fs::read(&kept).unwrap();
    let final_image = std::fs::read(&pri_img).unwrap();
    assert_eq!(at_seed.len(), final_image.len());
    assert!(at_seed != final_image, "the kept image is not the seed's");
    // The secondary's own image is no more.
    std::fs::remove_file(&sec_img).unwrap();
    for _ in 0..2 {
        let (rs, _, rerr) = run_tandem(&["replay", "--log", &sec_log, "--quiet"]);
        assert_eq!(rs, 0, "{rerr}\n{both}");
        assert!(rerr.contains("replay verified"), "{rerr}");
        assert_eq!(digest(&rerr), digest(&perr), "{rerr}\n{both}");
        assert!(
            std::fs::read(format!("{sec_log}.replay.disk")).unwrap() == final_image,
            "the replay's image differs from the primary's"
        );
        assert!(
            std::fs::read(&kept).unwrap() == at_seed,
            "the replay changed the kept image"
        );
    }
}
