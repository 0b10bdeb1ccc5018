//! Migration never harms the destination's or the source's data, and a
//! peer never chooses a path on the destination:
//!
//! - a destination that reaches the source's own image (here: the same host
//!   under a non-loopback address, another name of the same file) moves
//!   memory only and leaves the image alone;
//! - a failed migration leaves the destination's image exactly as it was
//!   (nothing is truncated or created before the header is accepted, the
//!   incoming image is staged next to its place);
//! - the disk's place is the receiver's `--disk` / `--disk-dir`; a file name
//!   sent by the source is checked, never a path.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::cluster::{
    make_disk, migrate, receiver, reference, run_tandem, same_image, source, Netns, Pki, Proc,
};
use common::{noise, read, result_line, TempDir, TIMEOUT};
use failover::channel::{kind as channel_kind, BlockingConnection, Message, Role};
use failover::migration::{
    kind, new_nonce, DiskIdentity, DiskOffer, Header, MAX_DISK_NAME, MIGRATION_VERSION,
};

/// Wait until `needle` appears `n` times on the stderr of `p`.
#[track_caller]
fn wait_count(p: &Proc, needle: &str, n: usize) {
    let start = Instant::now();
    while p.err().matches(needle).count() < n {
        assert!(
            start.elapsed() < TIMEOUT,
            "waiting for {n} x {needle:?}\n{}",
            p.describe()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Files in `dir` (names), sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// How the destination reaches the source's image in [`shared_image`].
enum Reach {
    /// Same host, another name (a hard link) of the same file.
    HardLink,
    /// As if from another host on shared storage: the receiver sees another
    /// boot id (bind-mounted over /proc/sys/kernel/random/boot_id in its own
    /// mount namespace), so only the source's marker file can tell.
    OtherHost,
}

/// Source and destination reached through a veth pair (10.S.0.1 →
/// 10.S.0.2: the peer is not a loopback address), both with the same disk
/// image: only memory moves, and the image ends exactly as an unmigrated
/// run leaves it.
fn shared_image(tag: &str, subnet: u8, reach: Reach) {
    let ns = Netns::new(tag, subnet)
        .expect("two network namespaces joined by veth are needed (root, iproute2)");
    let cmdline = "disk 256";
    let tmp = TempDir::new(tag);
    let (ref_img, img) = (tmp.file("ref.img"), tmp.file("vm.img"));
    make_disk(&ref_img, 4 << 20);
    std::fs::copy(&ref_img, &img).unwrap();
    let expected = reference(cmdline, Some(&ref_img));
    let expected_img = read(&ref_img);
    let dst_ip = format!("10.{subnet}.0.2");
    let pki = Pki::new(&["a", "b"], &[&dst_ip]);
    let sock = tmp.s("a.sock");
    let in_a = ["ip", "netns", "exec", ns.a.as_str()];
    let mut in_b: Vec<String> = ["ip", "netns", "exec", ns.b.as_str()]
        .map(String::from)
        .to_vec();
    let dst_disk = match reach {
        Reach::HardLink => {
            std::fs::hard_link(&img, tmp.file("vm-link.img")).unwrap();
            tmp.s("vm-link.img")
        }
        Reach::OtherHost => {
            let boot_id = tmp.write("boot_id", b"00000000-0000-0000-0000-000000000001\n");
            let script = format!(
                "mount --bind {} /proc/sys/kernel/random/boot_id && exec \"$0\" \"$@\"",
                boot_id.display()
            );
            in_b.extend(["unshare", "-m", "sh", "-c", &script].map(String::from));
            tmp.s("vm.img")
        }
    };
    let in_b: Vec<&str> = in_b.iter().map(String::as_str).collect();
    let listen = format!("{dst_ip}:0");
    let (dst, addr) = receiver(&in_b, &listen, &pki.creds("b"), &["--disk", &dst_disk]);
    let img_s = tmp.s("vm.img");
    let mut src = source(&in_a, &sock, cmdline, &["--disk", &img_s]);
    src.wait_for("cmdline:", false);
    let before: Vec<String> = names(tmp.path());
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", src.describe());
    assert!(out.contains(&dst_ip), "{out}");
    assert!(out.contains("same image"), "the summary must say so: {out}");
    assert!(!out.contains("disk sent"), "{out}");
    let (scode, sout, _) = src.finish();
    let (dcode, dout, derr) = dst.finish();
    assert_eq!((scode, dcode), (0, 0), "{derr}");
    assert!(derr.contains("moving memory only"), "{derr}");
    assert_eq!(result_line(&dout), result_line(&expected), "{dout}");
    assert_eq!(format!("{sout}{dout}"), expected);
    // The one image holds exactly what an unmigrated run leaves.
    same_image(&img, &expected_img, "the shared image");
    let after: Vec<String> = names(tmp.path())
        .into_iter()
        .filter(|n| n != "a.sock")
        .collect();
    let before: Vec<String> = before.into_iter().filter(|n| n != "a.sock").collect();
    assert_eq!(after, before, "no marker or staging file is left behind");
}

#[test]
fn same_image_over_a_non_loopback_address_moves_memory_only() {
    shared_image("same", 214, Reach::HardLink);
}

#[test]
fn shared_storage_from_another_host_is_recognised_by_the_marker() {
    shared_image("shared", 215, Reach::OtherHost);
}

#[test]
fn failed_migration_leaves_the_destination_image_as_it_was() {
    let tmp = TempDir::new("keep");
    std::fs::create_dir(tmp.file("dst")).unwrap();
    let img = tmp.file("src.img");
    make_disk(&img, 1 << 20);
    let precious = noise(3 << 20, 7);
    let target = tmp.write("dst/precious.img", &precious);
    let pki = Pki::new(&["a", "b"], &[]);
    let sock = tmp.s("a.sock");
    let target_s = tmp.s("dst/precious.img");
    let (mut dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &["--disk", &target_s]);
    let img_s = tmp.s("src.img");
    let mut src = source(&[], &sock, "disk 1024", &["--disk", &img_s]);
    src.wait_for("cmdline:", false);
    // Slow enough that the disk is still being copied when the source dies.
    let creds = pki.creds("a");
    let mut args = vec!["migrate", "--api", &sock, "--to", &addr];
    args.extend(creds.iter().map(String::as_str));
    args.extend(["--max-bandwidth", "20000"]);
    let mig = Proc::spawn(&[], &args);
    let start = Instant::now();
    loop {
        let (_, out, _) = run_tandem(&["status", "--api", &sock]);
        if out.contains("precopy") {
            break;
        }
        assert!(start.elapsed() < TIMEOUT, "never saw pre-copy");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    same_image(&target, &precious, "the image while blocks were arriving");
    let _ = src.child.kill();
    dst.wait_for("waiting for another", true);
    same_image(&target, &precious, "the image after the failed migration");
    assert_eq!(names(&tmp.file("dst")), ["precious.img"]);
    drop(mig);
}

#[test]
fn disk_dest_with_to_is_refused_and_no_peer_path_is_written() {
    let tmp = TempDir::new("victim");
    let img = tmp.file("src.img");
    make_disk(&img, 1 << 20);
    let precious = noise(1 << 20, 9);
    let victim = tmp.write("victim.img", &precious);
    let pki = Pki::new(&["a", "b"], &[]);
    let sock = tmp.s("a.sock");
    // A receiver with no place for a disk.
    let (_dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &[]);
    let img_s = tmp.s("src.img");
    let mut src = source(&[], &sock, "disk 1024", &["--disk", &img_s]);
    src.wait_for("cmdline:", false);
    let victim_s = tmp.s("victim.img");
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &["--disk-dest", &victim_s]);
    assert_ne!(code, 0, "{out}\n{err}");
    same_image(&victim, &precious, "the victim file");
    // Without --disk-dest the receiver refuses the disk it has no place for.
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("--disk-dir"), "{err}");
    same_image(&victim, &precious, "the victim file");
    let (scode, _, serr) = src.finish();
    assert_eq!(scode, 0, "{serr}");
}

/// A hand-made migration source speaking the protocol (to send what a real
/// `tandem migrate` never would).
struct FakeSource {
    conn: BlockingConnection,
}

impl FakeSource {
    fn connect(addr: &str, pki: &Pki) -> FakeSource {
        FakeSource {
            conn: pki.connect(addr, "a", Role::MigrationSource),
        }
    }

    /// Send a header for a 16 MiB VM with a disk called `name`; the
    /// destination's answer: `Ok(())` accepted, `Err(reason)` refused.
    fn offer_disk(&mut self, name: &str, len: u64) -> Result<(), String> {
        self.offer(Some((name, len)))
    }

    /// Send a header for a 16 MiB VM (with a disk `(name, len)` if given).
    fn offer(&mut self, disk: Option<(&str, u64)>) -> Result<(), String> {
        let config = vmm::machine::VmConfig {
            mem_mib: 16,
            kernel: None,
            cmdline: "disk 1".into(),
            initrd: None,
            disk: disk.map(|_| vmm::machine::DiskConfig {
                path: PathBuf::from("/etc/passwd"),
                read_only: false,
            }),
            net: None,
            cpu: vmm::vstate::cpu_model::CpuModel::baseline(),
        };
        let memory = {
            let inc = vmm::machine::Machine::prepare_incoming(&config).unwrap();
            vmm::vstate::memory::layout(inc.memory())
        };
        let header = Header {
            version: MIGRATION_VERSION,
            config,
            memory,
            disk: disk.map(|(name, len)| DiskOffer {
                len,
                name: name.to_string(),
                identity: DiskIdentity {
                    boot_id: "another host".into(),
                    dev: 1,
                    ino: 1,
                    marker: Some(new_nonce().unwrap()),
                },
            }),
        };
        let bytes = postcard::to_stdvec(&header).unwrap();
        self.conn.send_frame(kind::HEADER, &bytes).unwrap();
        match self.conn.recv_frame() {
            Ok((kind::ACCEPTED, _)) => Ok(()),
            Ok((channel_kind::MESSAGE, payload)) => match postcard::from_bytes(&payload) {
                Ok(Message::Abort { reason }) => Err(reason),
                other => panic!("unexpected answer {other:?}"),
            },
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

#[test]
fn disk_names_from_the_source_are_checked() {
    let tmp = TempDir::new("names");
    std::fs::create_dir(tmp.file("in")).unwrap();
    let precious = noise(64 << 10, 11);
    let victim = tmp.write("victim.img", &precious);
    let resident = tmp.write("in/resident.img", &precious);
    let pki = Pki::new(&["a", "b"], &[]);
    let dir_s = tmp.s("in");
    let (dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &["--disk-dir", &dir_s]);
    let long = "x".repeat(MAX_DISK_NAME + 1);
    let abs = tmp.s("victim.img");
    let bad: [(&str, &str); 7] = [
        ("../victim.img", "'/'"),
        (&abs, "'/'"),
        ("..", "'.'"),
        (".hidden", "'.'"),
        ("a\0b", "control"),
        (&long, "longer"),
        ("resident.img", "does not replace"),
    ];
    for (i, (name, why)) in bad.into_iter().enumerate() {
        let mut fake = FakeSource::connect(&addr, &pki);
        let reason = fake
            .offer_disk(name, 1 << 20)
            .expect_err(&format!("disk name {name:?} was accepted"));
        assert!(reason.contains(why), "{name:?}: {reason}");
        wait_count(&dst, "waiting for another", i + 1);
    }
    same_image(&victim, &precious, "the file next to --disk-dir");
    same_image(&resident, &precious, "the file in --disk-dir");
    assert_eq!(names(&tmp.file("in")), ["resident.img"]);
    // A plain new name is accepted; the source going away leaves nothing.
    let mut fake = FakeSource::connect(&addr, &pki);
    fake.offer_disk("fresh.img", 1 << 20).unwrap();
    drop(fake);
    wait_count(&dst, "waiting for another", bad.len() + 1);
    assert_eq!(names(&tmp.file("in")), ["resident.img"]);
}

// ---- A receiver nobody can block ----

/// `cmdline` migrated to the receiver at `addr`: succeeds, and source +
/// destination print the console of an unmigrated run.
fn real_migration(pki: &Pki, tmp: &TempDir, dst: Proc, addr: &str, cmdline: &str) {
    let expected = reference(cmdline, None);
    let sock = tmp.s("a.sock");
    let mut src = source(&[], &sock, cmdline, &[]);
    src.wait_for("round 20\n", false);
    let (code, out, err) = migrate(&sock, addr, &pki.creds("a"), &[]);
    assert_eq!(
        code,
        0,
        "{out}\n{err}\n{}\n{}",
        src.describe(),
        dst.describe()
    );
    let (scode, sout, _) = src.finish();
    let (dcode, dout, derr) = dst.finish();
    assert_eq!((scode, dcode), (0, 0), "{derr}");
    assert_eq!(format!("{sout}{dout}"), expected);
}

#[test]
fn a_peer_that_sends_only_hello_does_not_block_a_migration() {
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("hello");
    let (dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &[]);
    // Authenticated, Hello sent, then silence (the connection kept alive).
    let idle = FakeSource::connect(&addr, &pki);
    real_migration(&pki, &tmp, dst, &addr, "dirty 256 1000");
    drop(idle);
}

#[test]
fn a_peer_silent_before_its_header_is_dropped_by_name() {
    let pki = Pki::new(&["a", "b"], &[]);
    let (dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &[]);
    let mut idle = FakeSource::connect(&addr, &pki);
    wait_count(&dst, "sent nothing for 10s", 1);
    let err = dst.err();
    assert!(
        err.contains("dropped the connection of a at 127.0.0.1:"),
        "{err}"
    );
    // The receiver closed it.
    match idle.conn.recv_frame() {
        Ok((channel_kind::MESSAGE, payload)) => {
            let m: Message = postcard::from_bytes(&payload).unwrap();
            assert!(matches!(m, Message::Abort { .. }), "{m:?}");
        }
        other => assert!(other.is_err(), "{other:?}"),
    }
}

#[test]
fn a_second_source_is_refused_busy_naming_the_first() {
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("busy");
    let (dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &[]);
    // A source whose header was accepted, then stalls: it holds the receiver.
    let mut holder = FakeSource::connect(&addr, &pki);
    holder.offer(None).unwrap();
    wait_count(&dst, "receiving a VM from a at 127.0.0.1:", 1);
    // Long enough to outlive the refused attempt and the wait for the
    // holder to go (up to the 3 s idle timeout).
    let cmdline = "dirty 256 3000";
    let sock = tmp.s("a.sock");
    let mut src = source(&[], &sock, cmdline, &[]);
    src.wait_for("round 20\n", false);
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("busy: receiving a VM from a at 127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains("keeps running"), "{err}");
    wait_count(&dst, "refused a migration from a at 127.0.0.1:", 1);
    // Once the holder goes, the next migration goes through.
    drop(holder);
    wait_count(&dst, "waiting for another", 1);
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", dst.describe());
    let expected = reference(cmdline, None);
    let (scode, sout, _) = src.finish();
    let (dcode, dout, derr) = dst.finish();
    assert_eq!((scode, dcode), (0, 0), "{derr}");
    assert_eq!(format!("{sout}{dout}"), expected);
}

/// The destination dies after the source sent `SwitchoverReady` and
/// before its `Running` came back: the source cannot know whether the guest
/// runs there, so it must not resume it (two live copies; with shared
/// storage, two writers of one image). It stays paused, says why, and
/// `tandem resume` lets it go on.
#[test]
fn an_unconfirmed_switchover_keeps_the_source_paused() {
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("indoubt");
    let (dst, addr) = receiver(
        &["env", "TANDEM_TEST_FAULT=die-before-running"],
        "127.0.0.1:0",
        &pki.creds("b"),
        &[],
    );
    let cmdline = "dirty 256 3000";
    let sock = tmp.s("a.sock");
    let mut src = source(&[], &sock, cmdline, &[]);
    src.wait_round(20);
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    assert_eq!(code, 1, "{out}\n{err}\n{}", dst.describe());
    assert!(err.contains("the switchover's outcome is unknown"), "{err}");
    assert!(err.contains("stays paused"), "{err}");
    let (dcode, _, derr) = dst.finish();
    assert_eq!(dcode, 137, "{derr}");
    // Paused for real: the guest's counter stands still.
    let s1 = common::cluster::wait_status(&sock, "paused", |s| s["state"] == "paused");
    let r1 = src.rounds();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s2 = common::cluster::status(&sock);
    assert_eq!(s1["exit_seq"], s2["exit_seq"], "{s1} {s2}");
    assert_eq!(src.rounds(), r1);
    // The operator decides: resume, and the guest finishes here intact.
    let (code, _, err) = run_tandem(&["resume", "--api", &sock]);
    assert_eq!(code, 0, "{err}");
    let (scode, sout, serr) = src.finish();
    assert_eq!(scode, 0, "{serr}");
    assert_eq!(sout, reference(cmdline, None));
}
