//! Two writers on one disk image destroy it: every Tandem process that may
//! write an image holds an exclusive lock on it, readers a shared one
//! (docs/disks.md, "Image locking"). While a VM runs on an image:
//!
//! - (a) a second `tandem run` on it (read-write or `,ro`) is refused with
//!   status 2 and a message naming the image;
//! - (b) a `tandem secondary --disk` on it is refused at once (status 2);
//!   the other order too: a protected primary given the image a waiting
//!   secondary holds is refused;
//! - (c) `tandem receive --disk` onto it refuses the migration of another
//!   VM (the header's answer), and neither image is touched;
//!
//! each time the running VM ends with the result of an undisturbed run and
//! its image is byte-identical to that run's; once it ended, the image is
//! free again. A local disk move locks the new image (and refuses one
//! another process holds, unchanged) and frees the old one.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};

use common::cluster::{
    make_disk, migrate, protected_primary, receiver, reference, run_tandem, same_image, secondary,
    source, Pki, Proc,
};
use common::{read, result_line, TempDir};

/// 512 sectors written, flushed and read back: several seconds of guest
/// time, paused by the tests while they try the image.
const CMDLINE: &str = "disk 512";
const DISK_SIZE: usize = 1 << 20;

/// Does some process hold a lock on `path` that excludes a writer? (A
/// probe of our own: an open file description of the test process.)
fn locked(path: &Path) -> bool {
    File::open(path).unwrap().try_lock().is_err()
}

/// Start a VM with a control socket on `img` and pause it once its guest
/// has seen the disk: it holds the image's lock, mid-workload.
fn paused_vm(sock: &str, img: &Path) -> Proc {
    let img_s = img.to_string_lossy().into_owned();
    let mut vm = source(&[], sock, CMDLINE, &["--disk", &img_s]);
    vm.wait_for("disk capacity", false);
    let (code, _, err) = run_tandem(&["pause", "--api", sock]);
    assert_eq!(code, 0, "pause: {err}\n{}", vm.describe());
    vm
}

/// A temporary directory with a fresh image `ref.img` and its copy
/// `vm.img`, and what an undisturbed run on the image prints and leaves
/// in it.
struct Images {
    tmp: TempDir,
    ref_img: PathBuf,
    img: PathBuf,
    expected: String,
    expected_img: Vec<u8>,
}

impl Images {
    fn new(tag: &str) -> Images {
        let tmp = TempDir::new(tag);
        let (ref_img, img) = (tmp.file("ref.img"), tmp.file("vm.img"));
        make_disk(&ref_img, DISK_SIZE);
        std::fs::copy(&ref_img, &img).unwrap();
        let expected = reference(CMDLINE, Some(&ref_img));
        let expected_img = read(&ref_img);
        Images {
            tmp,
            ref_img,
            img,
            expected,
            expected_img,
        }
    }

    /// The VM on `vm.img`, paused mid-workload ([`paused_vm`]), and its
    /// control socket `a.sock`.
    fn paused_vm(&self) -> (Proc, String) {
        let sock = self.tmp.s("a.sock");
        (paused_vm(&sock, &self.img), sock)
    }

    /// Resume the VM and check it ends as an undisturbed run did, its
    /// image `img` as the undisturbed run left it.
    #[track_caller]
    fn resume_and_check(&self, vm: Proc, sock: &str, img: &Path) {
        let (code, _, err) = run_tandem(&["resume", "--api", sock]);
        assert_eq!(code, 0, "resume: {err}");
        let (code, out, err) = vm.finish();
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            result_line(&out),
            result_line(&self.expected),
            "{out}\n{err}"
        );
        assert_eq!(out, self.expected);
        same_image(img, &self.expected_img, "the running VM's image");
    }
}

#[track_caller]
fn assert_refused(code: i32, err: &str, img: &Path) {
    assert_eq!(code, 2, "refused with status 2: {err}");
    assert!(
        err.contains(&img.display().to_string()) && err.contains("in use by another process"),
        "the message names the image and says another process uses it: {err}"
    );
}

#[test]
fn a_second_writer_is_refused_and_the_running_vm_is_unaffected() {
    let images = Images::new("lock");
    let Images {
        tmp, ref_img, img, ..
    } = &images;
    let img_s = img.to_string_lossy().into_owned();
    let (vm, sock) = images.paused_vm();
    assert!(locked(img), "the running VM holds its image");
    let during = read(img);

    // (a) Another VM on the image, writing or reading.
    for disk in [img_s.clone(), format!("{img_s},ro")] {
        let (code, out, err) = run_tandem(&["run", "--cmdline", CMDLINE, "--disk", &disk]);
        assert_refused(code, &err, img);
        assert!(!out.contains("cmdline:"), "no guest ran: {out}");
    }
    let (code, _, err) = run_tandem(&[
        "record",
        "--cmdline",
        CMDLINE,
        "--disk",
        &img_s,
        "--log",
        &tmp.s("r.log"),
    ]);
    assert_refused(code, &err, img);
    assert!(!tmp.file("r.log").exists(), "nothing was created");

    // (b) A secondary given the running VM's own image.
    let pki = Pki::new(&["a", "b"], &[]);
    let mut args = vec!["secondary", "--listen", "127.0.0.1:0", "--disk", &img_s];
    let creds = pki.creds("b");
    args.extend(creds.iter().map(String::as_str));
    let (code, _, err) = run_tandem(&args);
    assert_refused(code, &err, img);
    assert!(!err.contains("waiting for a primary"), "{err}");

    // (c) A receiver whose --disk is the running VM's image, and another
    // VM migrated to it.
    let other_img = tmp.file("other.img");
    std::fs::copy(ref_img, &other_img).unwrap();
    let (dst, addr) = receiver(&[], "127.0.0.1:0", &pki.creds("b"), &["--disk", &img_s]);
    let other_sock = tmp.s("b.sock");
    let other = paused_vm(&other_sock, &other_img);
    let other_during = read(&other_img);
    let names_before = names(tmp.path());
    let (code, out, err) = migrate(&other_sock, &addr, &pki.creds("a"), &[]);
    assert_ne!(code, 0, "the migration is refused: {out}");
    assert!(
        err.contains(&img.display().to_string()) && err.contains("in use by another process"),
        "the refusal names the destination image: {err}"
    );
    assert_eq!(names(tmp.path()), names_before, "no staging file was made");
    same_image(&other_img, &other_during, "the migrated VM's image");
    drop(dst);
    same_image(img, &during, "the running VM's image, while it is paused");

    // Both VMs run on as if nothing happened.
    images.resume_and_check(other, &other_sock, &other_img);
    images.resume_and_check(vm, &sock, img);

    // The lock ended with the VM: the image is free for the next one.
    assert!(!locked(img), "the lock is released when the VM ends");
    std::fs::copy(ref_img, img).unwrap();
    let (code, out, err) = run_tandem(&["run", "--cmdline", CMDLINE, "--disk", &img_s]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, images.expected);
}

#[test]
fn a_protected_primary_is_refused_the_image_its_secondary_holds() {
    let tmp = TempDir::new("lock-sec");
    let img = tmp.file("vm.img");
    make_disk(&img, DISK_SIZE);
    let before = read(&img);
    let img_s = img.to_string_lossy().into_owned();
    let pki = Pki::new(&["a", "b"], &[]);
    let (mut sec, addr) = secondary(&[], "127.0.0.1:0", &pki.creds("b"), &["--disk", &img_s]);
    assert!(locked(&img), "the waiting secondary holds its copy");
    let pri = protected_primary(&[], CMDLINE, &addr, &pki.creds("a"), &["--disk", &img_s]);
    let (code, out, err) = pri.finish();
    assert_refused(code, &err, &img);
    assert!(!out.contains("cmdline:"), "no guest ran: {out}");
    assert!(!sec.ended(), "the secondary waits on\n{}", sec.describe());
    assert!(!sec.err().contains("protecting"), "{}", sec.describe());
    same_image(&img, &before, "the secondary's image");
}

#[test]
fn a_disk_move_locks_the_new_image_and_frees_the_old_one() {
    let images = Images::new("lock-move");
    let Images { tmp, img, .. } = &images;
    let (vm, sock) = images.paused_vm();

    // A destination another process holds is refused as it is.
    let busy = tmp.write("busy.img", b"someone else's data");
    let theirs = File::open(&busy).unwrap();
    theirs.try_lock_shared().unwrap();
    let (code, out, err) = run_tandem(&[
        "migrate",
        "--api",
        &sock,
        "--disk-dest",
        &tmp.s("busy.img"),
        "--force",
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains(&busy.display().to_string()) && err.contains("in use by another process"),
        "{err}"
    );
    assert_eq!(read(&busy), b"someone else's data");
    drop(theirs);

    // Moved: the new image is the VM's, locked; the old one is free.
    let new = tmp.file("new.img");
    let (code, out, err) =
        run_tandem(&["migrate", "--api", &sock, "--disk-dest", &tmp.s("new.img")]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(locked(&new), "the new image is locked");
    assert!(!locked(img), "the old image is free");
    let (code, _, err) = run_tandem(&["run", "--cmdline", CMDLINE, "--disk", &tmp.s("new.img")]);
    assert_refused(code, &err, &new);
    images.resume_and_check(vm, &sock, &new);
    assert!(!locked(&new));
}

/// A receiver on "shared storage" with the VM of `images`: its `--disk`
/// is a hard link to the VM's image (the same file, on loopback). Returns
/// it and its address.
fn shared_storage_receiver(images: &Images, pki: &Pki) -> (Proc, String) {
    let link = images.tmp.file("link.img");
    std::fs::hard_link(&images.img, &link).unwrap();
    receiver(
        &[],
        "127.0.0.1:0",
        &pki.creds("b"),
        &["--disk", &link.to_string_lossy()],
    )
}

/// Shared storage (here: a hard link, on loopback): the source lets go of
/// the image at the switchover for the destination to take. When the
/// switchover fails (a paused VM, a receiver without --api-socket: refused
/// after `SwitchoverReady`), the source takes the lock back before its VM
/// goes on: another VM is refused the image again, and the VM ends as an
/// undisturbed run.
#[test]
fn a_failed_switchover_onto_shared_storage_takes_the_lock_back() {
    let images = Images::new("lock-shared");
    let Images { tmp, img, .. } = &images;
    let pki = Pki::new(&["a", "b"], &[]);
    let (dst, addr) = shared_storage_receiver(&images, &pki);
    let (vm, sock) = images.paused_vm();
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("no --api-socket"),
        "refused at the switchover: {err}"
    );
    drop(dst);
    assert!(locked(img), "the source holds its image again");
    let (code, _, err) = run_tandem(&["run", "--cmdline", CMDLINE, "--disk", &tmp.s("vm.img")]);
    assert_refused(code, &err, img);
    images.resume_and_check(vm, &sock, img);
}

/// The same failed switchover, but another process takes the image in the
/// moment the source let go of it (a probe that grabs the lock as soon as
/// it is free and keeps it): the source cannot take it back, so its guest
/// must not run on (it would write an image someone else holds). The VM
/// stays paused, `tandem migrate` says why naming the image, `tandem
/// resume` is refused while the other holds it; once that one lets go,
/// resume takes the lock back and the VM ends as an undisturbed run.
#[test]
fn a_failed_switchover_whose_image_was_taken_meanwhile_stays_paused() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let images = Images::new("lock-taken");
    let Images { img, .. } = &images;
    let pki = Pki::new(&["a", "b"], &[]);
    let (dst, addr) = shared_storage_receiver(&images, &pki);
    let (vm, sock) = images.paused_vm();
    // The grabber: waits on the lock (a blocking flock at real-time
    // priority, woken and running the instant the source lets go, before an
    // answer from the destination could make the source take it back),
    // keeps it until told to let go.
    let (got, release) = (
        std::sync::Arc::new(AtomicBool::new(false)),
        std::sync::Arc::new(AtomicBool::new(false)),
    );
    let grabber = {
        let f = File::open(img).unwrap();
        let (got, release) = (got.clone(), release.clone());
        std::thread::spawn(move || {
            // Real-time priority: woken by the unlock, it runs at once,
            // ahead of the source's own retake, however loaded the host.
            let param = libc::sched_param { sched_priority: 10 };
            // SAFETY: sets this thread's own scheduling policy; `param`
            // is a valid sched_param for the call's duration.
            let rt = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
            assert_eq!(rt, 0, "SCHED_FIFO: {}", std::io::Error::last_os_error());
            f.lock().unwrap();
            got.store(true, Ordering::SeqCst);
            while !release.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            drop(f);
        })
    };
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    drop(dst);
    assert!(
        got.load(Ordering::SeqCst),
        "the grabber got the image when the source let go: {err}"
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("no --api-socket")
            && err.contains(&img.display().to_string())
            && err.contains("in use by another process"),
        "the failure names the refusal and the image the source could not take back: {err}"
    );
    let (code, _, rerr) = run_tandem(&["resume", "--api", &sock]);
    assert_ne!(
        code, 0,
        "resume while another process holds the image: {rerr}"
    );
    assert!(
        rerr.contains("in use by another process"),
        "resume says why: {rerr}"
    );
    release.store(true, Ordering::SeqCst);
    grabber.join().unwrap();
    images.resume_and_check(vm, &sock, img);
}

/// Files in `dir` (names), sorted, but the control sockets.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".sock"))
        .collect();
    v.sort();
    v
}

/// A probe that tries to take `path`'s lock in a loop until `stop`, noting
/// each change (`true`: it got the lock, and let go at once). It holds the
/// lock only for an instant every 50 µs, so that it rarely stands in the
/// way of the VM's own first check.
fn probe(
    path: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<bool>> {
    let f = File::open(path).unwrap();
    std::thread::spawn(move || {
        let mut seen: Vec<bool> = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let got = f.try_lock().is_ok();
            if got {
                f.unlock().unwrap();
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            if seen.last() != Some(&got) {
                seen.push(got);
            }
        }
        seen
    })
}

/// From the moment `tandem run` (plain, and protected from boot, which
/// hashes its image for the secondary first) checks its image to the end
/// of its run, nobody else can take the image. Before, the early check let
/// go of the lock and the VM's device took it again later, with the
/// primary's BLAKE3 check in between: a probe trying in a loop got the
/// image in the middle of the start, and the VM was refused by its own
/// device (another writer could have had the image).
#[test]
fn the_image_is_held_without_a_gap_from_the_first_check_on() {
    let tmp = TempDir::new("lock-gap");
    let img = tmp.file("vm.img");
    // Big enough that hashing it takes a while.
    make_disk(&img, 64 << 20);
    let img_s = img.to_string_lossy().into_owned();
    let pki = Pki::new(&["a", "b"], &[]);
    let mut checked = 0;
    let mut tries = 0;
    while checked < 6 {
        tries += 1;
        assert!(tries < 30, "the probe stood in the way of 24 first checks");
        let protected = checked >= 3;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = probe(&img, stop.clone());
        let mut sec = None;
        let mut args = vec!["run", "--cmdline", CMDLINE, "--disk", &img_s];
        let (creds, addr);
        if protected {
            let sec_img = tmp.file(&format!("sec-{tries}.img"));
            std::fs::copy(&img, &sec_img).unwrap();
            let sec_s = sec_img.to_string_lossy().into_owned();
            let s;
            (s, addr) = secondary(&[], "127.0.0.1:0", &pki.creds("b"), &["--disk", &sec_s]);
            sec = Some(s);
            creds = pki.creds("a");
            args.extend(["--protect-to", addr.as_str()]);
            args.extend(creds.iter().map(String::as_str));
        }
        let mut vm = Proc::spawn(&[], &args);
        let t0 = std::time::Instant::now();
        let started = loop {
            if vm.out().contains("disk capacity") {
                break true;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(180),
                "no disk in 180 s\n{}",
                vm.describe()
            );
            if let Ok(Some(_)) = vm.child.try_wait() {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = seen.join().unwrap();
        vm.signal(libc::SIGKILL);
        let _ = vm.child.wait();
        vm.drain();
        let err = vm.err();
        if let Some(s) = sec {
            s.signal(libc::SIGKILL);
        }
        if !started {
            // Refused at its very first check, while the probe held the
            // image for an instant: no VM started, nothing to judge.
            let first = err.contains("in use by another process") && !err.contains("virtio-blk");
            assert!(first, "the VM did not start:\n{}", vm.describe());
            continue;
        }
        let first_held = seen
            .iter()
            .position(|g| !*g)
            .expect("the VM took the image");
        assert!(
            seen[first_held..].iter().all(|g| !*g),
            "protected {protected}: the image was free again after the VM first held it ({seen:?})\n{err}"
        );
        checked += 1;
    }
}
