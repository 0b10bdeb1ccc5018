//! Live migration end to end: `tandem run --api-socket` → `tandem migrate`
//! → `tandem receive`, on loopback and between two network namespaces.
//!
//! Every migrated run must print exactly the console output of an
//! unmigrated run (source's part followed by the destination's part), end
//! with the same `RESULT` line, and leave the same disk image. Failures
//! (wrong CA, destination killed, destination disk full) must leave the
//! source running to the same result. Migrations are triggered by guest
//! events (console lines), never by sleeping.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{
    make_disk, migrate, receiver, reference, run_tandem, same_image, source, Netns, Pki, Proc,
};
use common::{result_line, TempDir, TANDEM, TIMEOUT};

/// output of source + destination must be the unmigrated one.
fn migrate_once(cmdline: &str, marker: &str) {
    let expected = reference(cmdline, None);
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("once");
    let sock = tmp.s("a.sock");
    let (dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &[]);
    let mut src = source(&[], &sock, cmdline, &[]);
    src.wait_for(marker, false);
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    assert_eq!(code, 0, "migrate failed\n{out}\n{err}\n{}", src.describe());
    assert!(out.contains("migrated to b at"), "{out}");
    assert!(out.contains("downtime"), "{out}");
    let (scode, sout, serr) = src.finish();
    assert_eq!(scode, 0, "{serr}");
    assert!(serr.contains("migrated"), "{serr}");
    let (dcode, dout, derr) = dst.finish();
    assert_eq!(dcode, 0, "destination\n{dout}\n{derr}");
    assert_eq!(result_line(&dout), result_line(&expected), "{dout}");
    assert_eq!(format!("{sout}{dout}"), expected, "console differs\n{out}");
}

#[test]
fn migrate_dirty_mid_run() {
    migrate_once("dirty 256 2500", "round 40\n");
}

#[test]
fn migrate_dirty_early() {
    migrate_once("dirty 256 1500", "cmdline:");
}

#[test]
fn migrate_ticks_mid_run() {
    migrate_once("ticks 300", "cmdline:");
}

#[test]
fn migrate_busy_mid_run() {
    migrate_once("busy 200000", "cmdline:");
}

#[test]
fn migrate_a_to_b_and_back() {
    let cmdline = "dirty 256 4000";
    let expected = reference(cmdline, None);
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("aba");
    let (sock_a, sock_b) = (tmp.s("a.sock"), tmp.s("b.sock"));
    let (mut b, addr_b) = receiver(
        &[],
        "127.0.0.1:0",
        &pki.creds("b"),
        &["--api-socket", &sock_b],
    );
    let (a2, addr_a2) = receiver(&[], "127.0.0.1:0", &pki.creds("a"), &[]);
    let mut a = source(&[], &sock_a, cmdline, &[]);
    a.wait_for("round 50\n", false);
    let (code, out, err) = migrate(&sock_a, &addr_b, &pki.creds("a"), &[]);
    assert_eq!(code, 0, "A→B\n{out}\n{err}\n{}", a.describe());
    b.wait_for("round 300\n", false);
    let (code, out, err) = migrate(&sock_b, &addr_a2, &pki.creds("b"), &[]);
    assert_eq!(code, 0, "B→A\n{out}\n{err}\n{}", b.describe());
    let (ac, aout, _) = a.finish();
    let (bc, bout, berr) = b.finish();
    let (a2c, a2out, a2err) = a2.finish();
    assert_eq!((ac, bc, a2c), (0, 0, 0), "{berr}\n{a2err}");
    assert_eq!(format!("{aout}{bout}{a2out}"), expected);
}

/// Migrate a VM with a disk; the receiver names the image with `--disk
/// PATH` (`disk_dir`: false) or `--disk-dir DIR` (the image is DIR/src.img,
/// the source image's file name).
fn migrate_disk(disk_dir: bool) {
    let cmdline = "disk 256";
    let tmp = TempDir::new("disk");
    std::fs::create_dir(tmp.file("incoming")).unwrap();
    let (ref_img, src_img) = (tmp.file("ref.img"), tmp.file("src.img"));
    let dst_img = if disk_dir {
        tmp.file("incoming/src.img")
    } else {
        tmp.file("dst.img")
    };
    make_disk(&ref_img, 4 << 20);
    std::fs::copy(&ref_img, &src_img).unwrap();
    let expected = reference(cmdline, Some(&ref_img));
    let pki = Pki::new(&["a", "b"], &[]);
    let sock = tmp.s("a.sock");
    let (dst_s, dir_s) = (tmp.s("dst.img"), tmp.s("incoming"));
    let extra = if disk_dir {
        ["--disk-dir", &dir_s]
    } else {
        ["--disk", &dst_s]
    };
    let (dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &extra);
    let src_s = src_img.to_string_lossy().into_owned();
    let mut src = source(&[], &sock, cmdline, &["--disk", &src_s]);
    src.wait_for("cmdline:", false);
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", src.describe());
    assert!(out.contains("disk sent"), "{out}");
    let (scode, sout, _) = src.finish();
    let (dcode, dout, derr) = dst.finish();
    assert_eq!((scode, dcode), (0, 0), "{derr}");
    assert_eq!(format!("{sout}{dout}"), expected);
    same_image(
        &dst_img,
        &std::fs::read(&ref_img).unwrap(),
        "destination image",
    );
    // Nothing but the image is left in its directory.
    let dir = dst_img.parent().unwrap();
    let names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tandem-"))
        .collect();
    assert!(
        names.is_empty(),
        "left behind in {}: {names:?}",
        dir.display()
    );
}

#[test]
fn migrate_with_disk_keeps_every_block() {
    migrate_disk(false);
}

#[test]
fn migrate_disk_dir_places_the_image_by_name() {
    migrate_disk(true);
}

/// A failed migration: the source keeps running to the unmigrated result.
fn failed_migration(
    cmdline: &str,
    marker: &str,
    expect_in_error: &str,
    setup: impl FnOnce(&str, &Pki, &TempDir) -> (Proc, String, Vec<String>),
    during: impl FnOnce(&mut Proc, &str) + Send + 'static,
    migrate_extra: &[&str],
) {
    let expected = reference(cmdline, None);
    let pki = Pki::new(&["a", "b"], &[]);
    let tmp = TempDir::new("fail");
    let sock = tmp.s("a.sock");
    let (dst, addr, creds) = setup(&sock, &pki, &tmp);
    let mut src = source(&[], &sock, cmdline, &[]);
    src.wait_for(marker, false);
    let dst = Arc::new(Mutex::new(Some(dst)));
    let d2 = dst.clone();
    let s2 = sock.clone();
    let helper = std::thread::spawn(move || {
        let mut g = d2.lock().unwrap();
        if let Some(p) = g.as_mut() {
            during(p, &s2);
        }
    });
    let (code, out, err) = migrate(&sock, &addr, &creds, migrate_extra);
    helper.join().unwrap();
    assert_eq!(code, 1, "migration should fail\n{out}\n{err}");
    assert!(
        err.contains(expect_in_error),
        "error should mention {expect_in_error:?}: {err}"
    );
    assert!(err.contains("keeps running"), "{err}");
    let (scode, sout, serr) = src.finish();
    assert_eq!(scode, 0, "{serr}");
    assert!(serr.contains("failed"), "source must say so: {serr}");
    assert_eq!(sout, expected, "the source's run must be unaffected");
    drop(dst);
}

#[test]
fn wrong_ca_is_refused_and_source_continues() {
    failed_migration(
        "dirty 256 300",
        "round 20\n",
        "handshake",
        |_, pki, _| {
            let other = Pki::new(&["a"], &[]);
            let (dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &[]);
            let creds = other.creds("a");
            // Keep the other CA's files alive for the test's duration.
            std::mem::forget(other);
            (dst, addr, creds)
        },
        |dst, _| {
            dst.wait_for("refused", true);
        },
        &[],
    );
}

#[test]
fn destination_disk_full_aborts_and_source_continues() {
    let tmp = TempDir::new("full");
    let img = tmp.file("src.img");
    make_disk(&img, 1 << 20);
    let cmdline = "disk 1024";
    let expected = reference(
        cmdline,
        Some(&{
            let r = tmp.file("ref.img");
            make_disk(&r, 1 << 20);
            r
        }),
    );
    let pki = Pki::new(&["a", "b"], &[]);
    let sock = tmp.s("a.sock");
    let (_dst, addr) = receiver(
        &[],
        "127.0.0.1:0",
        &pki.creds("b"),
        &["--disk", "/dev/full"],
    );
    let img_s = img.to_string_lossy().into_owned();
    let mut src = source(&[], &sock, cmdline, &["--disk", &img_s]);
    src.wait_for("cmdline:", false);
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("No space left"), "{err}");
    let (scode, sout, serr) = src.finish();
    assert_eq!(scode, 0, "{serr}");
    assert_eq!(sout, expected);
}

#[test]
fn destination_killed_mid_migration_source_continues() {
    failed_migration(
        // Long enough that the guest is still running when the source,
        // 3 s after the destination went silent, declares it gone (with
        // 2000 rounds it sometimes ended first on a lightly loaded host).
        "dirty 256 6000",
        "round 20\n",
        "lost the destination",
        |_, pki, _| {
            let (dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &[]);
            (dst, addr, pki.creds("a"))
        },
        |dst, sock| {
            // Kill the destination once pre-copy is under way.
            let start = Instant::now();
            loop {
                let out = Command::new(TANDEM)
                    .args(["status", "--api", sock])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&out.stdout).contains("precopy") {
                    break;
                }
                assert!(start.elapsed() < TIMEOUT, "never saw pre-copy");
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = dst.child.kill();
        },
        // Slow enough that pre-copy is still running when it is killed.
        &["--max-bandwidth", "20000"],
    );
}

#[test]
fn migrate_between_network_namespaces() {
    let have_ip = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have_ip,
        "`ip netns` is not available (iproute2, installed by .ci/run; needs root)"
    );
    let Some(ns) = Netns::new("mig", 213) else {
        panic!("`ip netns` is available but two namespaces joined by veth could not be set up");
    };
    let cmdline = "dirty 256 1000";
    let expected = reference(cmdline, None);
    let pki = Pki::new(&["a", "b"], &["10.213.0.2"]);
    let tmp = TempDir::new("netns");
    let sock = tmp.s("a.sock");
    let in_a = ["ip", "netns", "exec", ns.a.as_str()];
    let in_b = ["ip", "netns", "exec", ns.b.as_str()];
    let (dst, addr) = receiver(&in_b, "10.213.0.2:0", &pki.creds("b"), &[]);
    let mut src = source(&in_a, &sock, cmdline, &[]);
    src.wait_for("round 40\n", false);
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", src.describe());
    assert!(out.contains("10.213.0.2"), "{out}");
    let (scode, sout, _) = src.finish();
    let (dcode, dout, derr) = dst.finish();
    assert_eq!((scode, dcode), (0, 0), "{derr}");
    assert_eq!(format!("{sout}{dout}"), expected);
}

// ---- Local disk moves: `tandem migrate --api SOCK --disk-dest NEW.img` ----

/// The workload of the disk-move tests: 128 writes of 8 sectors, then
/// reads, on a 1 MiB image.
const DISK_MOVE_CMDLINE: &str = "disk 1024";

/// `tandem migrate --api SOCK --disk-dest DEST` (no `--to`): a local disk
/// move; returns (status, stdout, stderr).
fn move_disk(sock: &str, dest: &Path, extra: &[&str]) -> (i32, String, String) {
    let d = dest.to_string_lossy().into_owned();
    let mut args = vec!["migrate", "--api", sock, "--disk-dest", &d];
    args.extend_from_slice(extra);
    run_tandem(&args)
}

/// A VM running [`DISK_MOVE_CMDLINE`] on `vm.img` that has printed its
/// disk's capacity and is about to write, with the console and final image
/// of an unmigrated run on an identical image.
struct DiskVm {
    tmp: TempDir,
    sock: String,
    img: PathBuf,
    src: Proc,
    expected: String,
    expected_img: Vec<u8>,
}

fn disk_vm(tag: &str) -> DiskVm {
    let tmp = TempDir::new(tag);
    let ref_img = tmp.file("ref.img");
    make_disk(&ref_img, 1 << 20);
    let img = tmp.file("vm.img");
    std::fs::copy(&ref_img, &img).unwrap();
    let expected = reference(DISK_MOVE_CMDLINE, Some(&ref_img));
    assert!(result_line(&expected).is_some(), "{expected}");
    let expected_img = std::fs::read(&ref_img).unwrap();
    assert_ne!(
        expected_img,
        std::fs::read(&img).unwrap(),
        "the workload must write"
    );
    let sock = tmp.s("vm.sock");
    let img_s = img.to_string_lossy().into_owned();
    let mut src = source(&[], &sock, DISK_MOVE_CMDLINE, &["--disk", &img_s]);
    src.wait_for("disk capacity", false);
    DiskVm {
        tmp,
        sock,
        img,
        src,
        expected,
        expected_img,
    }
}

impl DiskVm {
    /// The guest finishes normally, with the console of the unmigrated run.
    #[track_caller]
    fn finish(self) -> (TempDir, PathBuf, Vec<u8>, String) {
        let DiskVm {
            tmp,
            img,
            src,
            expected,
            expected_img,
            ..
        } = self;
        let (code, out, err) = src.finish();
        assert_eq!(code, 0, "{out}\n{err}");
        assert_eq!(result_line(&out), result_line(&expected), "{out}");
        assert_eq!(out, expected, "console differs\n{err}");
        (tmp, img, expected_img, err)
    }
}

#[test]
fn disk_move_mid_run() {
    let vm = disk_vm("dmove");
    let new = vm.tmp.file("new.img");
    // A capped copy rate keeps round 0 long enough for the guest to
    // dirty blocks behind it, so that there are dirty rounds to copy.
    let (code, out, err) = move_disk(&vm.sock, &new, &["--max-bandwidth", "2000000"]);
    // The old image as the switch left it.
    let old_at_switch = std::fs::read(&vm.img).unwrap();
    assert_eq!(code, 0, "{out}\n{err}\n{}", vm.src.describe());
    assert!(out.contains("moved the disk from"), "{out}");
    assert!(out.contains("pause"), "{out}");
    assert!(out.contains("rounds"), "{out}");
    assert!(out.contains("disk-copy round  0"), "{out}");
    let running_on = vm.src.out();
    let (_tmp, img, expected_img, err) = vm.finish();
    assert!(err.contains("the disk moved"), "{err}");
    same_image(&new, &expected_img, "the new image");
    same_image(&img, &old_at_switch, "the old image after the switch");
    eprintln!("{out}");
    if !running_on.contains("disk verified") {
        eprintln!("the disk moved while the guest was still running its workload");
    }
}

#[test]
fn disk_move_then_move_and_migrate_use_the_new_image() {
    let vm = disk_vm("dmove2");
    let (new, new2, dst) = (
        vm.tmp.file("new.img"),
        vm.tmp.file("new2.img"),
        vm.tmp.file("dst.img"),
    );
    // A pause target no round can meet (only a round without writes ends
    // the copy early): rounds go on, with auto-converge, until forced.
    let (code, out, err) = move_disk(
        &vm.sock,
        &new,
        &["--downtime-ms", "0", "--max-bandwidth", "4000000"],
    );
    assert_eq!(code, 0, "{out}\n{err}\n{}", vm.src.describe());
    eprintln!("{out}");
    // The VM's configuration names the new image: moving onto it is
    // refused as the current image, and the next move copies from it.
    let (code, _, err) = move_disk(&vm.sock, &new, &["--force"]);
    assert_ne!(code, 0);
    assert!(err.contains("current disk image"), "{err}");
    let (code, out, err) = move_disk(&vm.sock, &new2, &[]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", vm.src.describe());
    let new_after = std::fs::read(&new).unwrap();
    // And a migration sends the image the VM uses now.
    let pki = Pki::new(&["a", "b"], &[]);
    let dst_s = dst.to_string_lossy().into_owned();
    let (receiver, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &["--disk", &dst_s]);
    let (code, out, err) = migrate(&vm.sock, &addr, &pki.creds("a"), &[]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", vm.src.describe());
    let DiskVm {
        tmp: _tmp,
        src,
        expected,
        expected_img,
        ..
    } = vm;
    let (scode, sout, _) = src.finish();
    let (dcode, dout, derr) = receiver.finish();
    assert_eq!((scode, dcode), (0, 0), "{derr}");
    assert_eq!(format!("{sout}{dout}"), expected);
    same_image(&dst, &expected_img, "the destination image");
    same_image(
        &new,
        &new_after,
        "the first new image after the second move",
    );
}

/// A refused move: non-zero exit, a message, the guest finishes on its
/// old image as if nothing happened.
#[track_caller]
fn refused_move(vm: DiskVm, dest: &Path, extra: &[&str], expect_in_error: &str) -> TempDir {
    let (code, out, err) = move_disk(&vm.sock, dest, extra);
    assert_ne!(code, 0, "the move should be refused\n{out}\n{err}");
    assert!(
        err.contains(expect_in_error),
        "error should mention {expect_in_error:?}: {err}"
    );
    assert!(err.contains("keeps running"), "{err}");
    let (tmp, img, expected_img, serr) = vm.finish();
    assert!(serr.contains("failed"), "the VM must say so: {serr}");
    same_image(&img, &expected_img, "the old image (still in use)");
    tmp
}

#[test]
fn disk_move_to_the_same_image_is_refused() {
    let vm = disk_vm("dsame");
    let img = vm.img.clone();
    // Another name of the same file.
    let link = vm.tmp.file("link.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let tmp = refused_move(vm, &link, &["--force"], "current disk image");
    // And the path itself.
    let vm = disk_vm("dsame2");
    let img2 = vm.img.clone();
    refused_move(vm, &img2, &[], "current disk image");
    drop(tmp);
}

#[test]
fn disk_move_to_a_directory_is_refused() {
    let vm = disk_vm("ddir");
    let dir = vm.tmp.file("dir");
    std::fs::create_dir(&dir).unwrap();
    let tmp = refused_move(vm, &dir, &[], "is a directory");
    assert!(tmp.file("dir").is_dir());
}

#[test]
fn disk_move_onto_a_non_empty_file_needs_force() {
    let vm = disk_vm("dfull");
    let taken = vm.tmp.file("taken.img");
    std::fs::write(&taken, b"precious data").unwrap();
    let tmp = refused_move(vm, &taken, &[], "not empty");
    assert_eq!(
        std::fs::read(tmp.file("taken.img")).unwrap(),
        b"precious data"
    );

    // With --force it is overwritten.
    let vm = disk_vm("dforce");
    let taken = vm.tmp.file("taken.img");
    std::fs::write(&taken, vec![0xeeu8; 3 << 20]).unwrap();
    let (code, out, err) = move_disk(&vm.sock, &taken, &["--force"]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", vm.src.describe());
    let (_tmp, _, expected_img, _) = vm.finish();
    same_image(&taken, &expected_img, "the overwritten image");
}

/// A small tmpfs, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn new(dir: PathBuf, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(&dir).ok()?;
        let opt = format!("size={size}");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opt, "tmpfs"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_move_onto_a_full_filesystem_fails_cleanly() {
    let vm = disk_vm("dnospc");
    // 256 KiB for a disk with 720 KiB of data.
    let Some(fs) = SmallFs::new(vm.tmp.file("small"), "256k") else {
        drop(vm);
        panic!("cannot mount a tmpfs (the test needs root)");
    };
    let dest = fs.0.join("new.img");
    let tmp = refused_move(vm, &dest, &[], "No space left");
    assert!(!dest.exists(), "a failed move removes the image it created");
    drop(fs);
    drop(tmp);
}
