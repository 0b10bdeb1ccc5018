//! A host disk error pauses the VM instead of reaching the guest
//! (docs/disks.md): the disk image lives on a small tmpfs that fills up
//! while the guest's `disk` workload writes. The recorded VM pauses with a
//! message naming the image, the operation and the OS error; once space is
//! freed, `tandem resume` retries the request, the guest ends with the
//! RESULT of an unfailed run and the recording replays verified. Without a
//! control socket the VM ends with status 123; a replay whose own copy of
//! the disk fails stops with 123 too (a host problem, not a divergence).
//!
//! A secondary whose own copy of the disk fails cannot follow: it tells
//! its primary at once and stops (never goes live); the primary, which must
//! not wait on it, wins the arbiter and runs on unprotected to the end.
//!
//! Mounting a tmpfs needs root (CI runs as root): without it the test fails
//! and says so, it never passes without having run.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{loopback_secondary, protected_primary, run_tandem, status, Pki, Proc};
use common::{arg, result_line, TempDir, TIMEOUT};

/// Status of a VM stopped by a host disk error.
const DISK_ERROR: i32 = 123;
/// Size of the test file system.
const FS_SIZE: u64 = 4 << 20;
/// The guest's disk: sparse, so that the guest's writes need free space.
const DISK_SIZE: u64 = 1 << 20;
/// The workload: 256 KiB written, flushed, read back.
const CMDLINE: &str = "disk 512";

/// A tmpfs of [`FS_SIZE`] mounted at a directory of its own; unmounted on
/// drop (before its parent directory is removed).
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(dir: PathBuf) -> SmallFs {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={FS_SIZE}"),
                "tandem-test",
            ])
            .arg(&dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "this test mounts a {FS_SIZE}-byte tmpfs at {} and needs root for it (CI runs as root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Fill the file system with `filler`, then give back `free` bytes.
    fn fill(&self, free: u64) -> PathBuf {
        let filler = self.path("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0x55u8; 64 << 10];
        let mut len = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => len += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        f.set_len(len.saturating_sub(free)).unwrap();
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A sparse (all-zero) disk image of [`DISK_SIZE`] at `path`.
fn sparse_disk(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(DISK_SIZE)
        .unwrap();
}

/// The workload run on an ordinary file system: its image and RESULT line.
fn unfailed_run(dir: &TempDir) -> (PathBuf, String) {
    let ref_disk = dir.file("ref.img");
    sparse_disk(&ref_disk);
    let (code, out, err) = run_tandem(&["run", "--cmdline", CMDLINE, "--disk", arg(&ref_disk)]);
    assert_eq!(code, 0, "reference run: {err}");
    let want = result_line(&out).expect("RESULT line").to_string();
    (ref_disk, want)
}

#[test]
fn disk_full_pauses_the_vm_resume_finishes_it_and_the_recording_replays() {
    let dir = TempDir::new("diskfull");
    let fs = SmallFs::mount(dir.file("fs"));

    // The unfailed run, on an ordinary file system.
    let (ref_disk, want) = unfailed_run(&dir);

    // The recorded run on the small file system, 64 KiB left: a quarter
    // of the guest's writes fit.
    let image = fs.path("vm.img");
    sparse_disk(&image);
    let replay_disk = dir.file("replay.img");
    sparse_disk(&replay_disk);
    let filler = fs.fill(64 << 10);
    let log = dir.s("run.log");
    let sock = dir.s("api.sock");
    let console = dir.file("console.txt");
    let serial = format!("file:{}", arg(&console));
    let mut vm = Proc::spawn(
        &[],
        &[
            "record",
            "--log",
            &log,
            "--cmdline",
            CMDLINE,
            "--disk",
            arg(&image),
            "--serial",
            &serial,
            "--api-socket",
            &sock,
        ],
    );
    vm.wait_for("the VM is paused", true);
    let message = vm.err();
    let prefix = format!("disk {}: write of 4096 bytes at offset ", image.display());
    assert!(message.contains(&prefix), "{}", vm.describe());
    assert!(
        message.contains("No space left on device"),
        "{}",
        vm.describe()
    );
    // The line ends with what to do.
    let start = Instant::now();
    while !vm.err().contains(&format!("tandem resume --api {sock}")) {
        assert!(start.elapsed() < TIMEOUT, "{}", vm.describe());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(vm.err().contains("free space"), "{}", vm.describe());
    let s = status(&sock);
    assert_eq!(s["state"], "paused", "{s}");
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("No space left on device"), "{s}");
    let (code, text, _) = run_tandem(&["status", "--api", &sock]);
    assert_eq!(code, 0);
    assert!(
        text.starts_with("paused (exit ") && text.contains("No space left on device"),
        "{text}"
    );
    // The guest is stopped: nothing moves while paused.
    let at = s["exit_seq"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(status(&sock)["exit_seq"].as_u64().unwrap(), at);
    assert!(result_line(&std::fs::read_to_string(&console).unwrap()).is_none());

    // Resuming without space pauses again at the same exit.
    let (code, _, err) = run_tandem(&["resume", "--api", &sock]);
    assert_eq!(code, 0, "{err}");
    let start = Instant::now();
    while vm.err().matches("the VM is paused").count() < 2 {
        assert!(start.elapsed() < TIMEOUT, "{}", vm.describe());
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = status(&sock);
    assert_eq!(s["state"], "paused", "{s}");
    assert_eq!(s["exit_seq"].as_u64().unwrap(), at);

    // The operator frees space and resumes: the guest finishes as if
    // nothing had happened.
    std::fs::remove_file(&filler).unwrap();
    let (code, text, err) = run_tandem(&["resume", "--api", &sock]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(text.trim(), "running");
    let (code, _, err) = vm.finish();
    assert_eq!(code, 0, "{err}");
    let got = std::fs::read_to_string(&console).unwrap();
    assert_eq!(result_line(&got), Some(want.as_str()), "{got}");
    assert_eq!(
        std::fs::read(&image).unwrap(),
        std::fs::read(&ref_disk).unwrap(),
        "the image is the unfailed run's"
    );

    // The recording holds only the retried success: it replays verified
    // on a copy of the disk as it was.
    let (code, out, err) = run_tandem(&["replay", "--log", &log, "--disk", arg(&replay_disk)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("replay verified"), "{err}");
    assert_eq!(result_line(&out), Some(want.as_str()));

    // A replay whose own copy fails the same writes stops with a host
    // error, not a divergence.
    let copy = fs.path("replay.img");
    sparse_disk(&copy);
    let filler = fs.fill(64 << 10);
    let (code, _, err) = run_tandem(&["replay", "--log", &log, "--disk", arg(&copy)]);
    assert_eq!(code, DISK_ERROR, "{err}");
    assert!(err.contains("replay stopped at exit"), "{err}");
    assert!(err.contains("not a divergence"), "{err}");
    assert!(!err.contains("diverged"), "{err}");

    // Without a control socket the VM ends with its own status.
    let (code, _, err) = run_tandem(&["run", "--cmdline", CMDLINE, "--disk", arg(&copy)]);
    assert_eq!(code, DISK_ERROR, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("--api-socket"), "{err}");
    drop(filler);
}

/// The secondary's image fills up while it replays a VM protected from
/// boot: it stops at once with the host error and tells the primary, which
/// wins the arbiter and finishes the guest unprotected with the unfailed
/// run's RESULT. Before, the secondary went on taking (and acknowledging)
/// the log with its replay stopped, and the primary's lag bound slowed the
/// VM to a standstill for as long as the primary ran.
#[test]
fn a_secondary_whose_disk_fails_stops_and_the_primary_runs_on_unprotected() {
    let dir = TempDir::new("secdiskfull");
    let fs = SmallFs::mount(dir.file("fs"));
    let (ref_disk, want) = unfailed_run(&dir);

    let pki = Pki::new(&["pri", "sec"], &[]);
    let arbiter = dir.file("arbiter");
    std::fs::create_dir(&arbiter).unwrap();
    let arbiter = format!("file:{}", arg(&arbiter));
    let pri_disk = dir.file("pri.img");
    sparse_disk(&pri_disk);
    let sec_disk = fs.path("sec.img");
    sparse_disk(&sec_disk);
    let filler = fs.fill(64 << 10);
    let (sec, addr) = loopback_secondary(
        &pki.creds("sec"),
        &["--disk", arg(&sec_disk), "--arbiter", &arbiter],
    );
    let pri = protected_primary(
        &[],
        CMDLINE,
        &addr,
        &pki.creds("pri"),
        &["--disk", arg(&pri_disk), "--arbiter", &arbiter],
    );
    let (scode, _, serr) = sec.finish();
    let (pcode, pout, perr) = pri.finish();
    let both = format!("--- primary ---\n{perr}\n--- secondary ---\n{serr}");
    assert_eq!(scode, DISK_ERROR, "{both}");
    assert!(serr.contains("No space left on device"), "{both}");
    assert!(serr.contains("does not go live"), "{both}");
    assert!(!serr.contains("going LIVE"), "{both}");
    assert_eq!(pcode, 0, "{both}");
    assert_eq!(result_line(&pout), Some(want.as_str()), "{both}");
    assert!(
        perr.contains("runs on UNPROTECTED") && perr.contains("No space left on device"),
        "the primary says why it runs on alone\n{both}"
    );
    assert_eq!(
        std::fs::read(&pri_disk).unwrap(),
        std::fs::read(&ref_disk).unwrap(),
        "the primary's image is the unfailed run's"
    );
    drop(filler);
}
