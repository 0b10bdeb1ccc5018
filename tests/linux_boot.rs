//! Boots a stock Debian Linux kernel (not ours) with the `tandem` binary,
//! through both boot protocols:
//!
//! * PVH: the ELF `vmlinux` extracted from Debian's bzImage; passes when the
//!   kernel prints its `Linux version` banner on the serial console.
//! * Linux 64-bit boot protocol: the bzImage itself; passes when the
//!   kernel's decompressor (arch/x86/boot/compressed) writes to the serial
//!   port. Decompressing ~40 MB under an emulating /dev/kvm takes far too
//!   long for a test, so the test stops there.
//!
//! Each boot runs in its own `tandem run` process with 256 MiB and the
//! serial console in a file, polled until the expected text appears.
//!
//! The kernel is fetched once by `scripts/fetch-linux.sh` (apt, cached in
//! `target/linux/` or `$TANDEM_LINUX_DIR`). If that fails the tests fail with
//! the script's message; set `TANDEM_SKIP_LINUX=1` to skip them instead.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a boot may take to show the expected output (override with
/// `TANDEM_LINUX_BOOT_TIMEOUT_SECS`). The dev machines' /dev/kvm emulates
/// unenlightened guest code (~1 µs per instruction): the PVH banner needs
/// about 25 s of CPU there, more on a loaded host.
fn boot_timeout() -> Duration {
    let secs = std::env::var("TANDEM_LINUX_BOOT_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8 * 60);
    Duration::from_secs(secs)
}

struct Kernels {
    bzimage: PathBuf,
    vmlinux: PathBuf,
}

fn skip() -> bool {
    if std::env::var_os("TANDEM_SKIP_LINUX").is_some_and(|v| v == "1") {
        eprintln!("TANDEM_SKIP_LINUX=1: skipping the Linux boot test");
        return true;
    }
    false
}

/// Runs scripts/fetch-linux.sh once per test process.
fn kernels() -> &'static Kernels {
    static KERNELS: OnceLock<Result<Kernels, String>> = OnceLock::new();
    let result = KERNELS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let script = root.join("scripts/fetch-linux.sh");
        let out = Command::new("bash")
            .arg(&script)
            .current_dir(root)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}); set TANDEM_SKIP_LINUX=1 to skip the Linux boot tests.\n{stderr}",
                script.display(),
                out.status
            ));
        }
        let mut lines = stdout.lines().filter(|l| !l.trim().is_empty());
        let (Some(bz), Some(vml)) = (lines.next(), lines.next()) else {
            return Err(format!(
                "{} printed no kernel paths:\n{stdout}\n{stderr}",
                script.display()
            ));
        };
        Ok(Kernels {
            bzimage: PathBuf::from(bz.trim()),
            vmlinux: PathBuf::from(vml.trim()),
        })
    });
    match result {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    }
}

/// Kills the child on drop, so that a failing assertion leaves no VM behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots `kernel` with `cmdline` and 256 MiB, serial to a file, until the
/// serial output contains one of `wanted`. Returns the serial output.
fn boot_until(name: &str, kernel: &Path, cmdline: &str, wanted: &[&str]) -> String {
    let dir = std::env::temp_dir().join(format!("tandem-linux-boot-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let serial = dir.join("serial.log");
    let stderr_path = dir.join("stderr.log");
    let _ = std::fs::remove_file(&serial);
    let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", "--kernel"])
        .arg(kernel)
        .args(["--cmdline", cmdline, "--mem-mib", "256", "--serial"])
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("spawn tandem");
    let mut guard = Guard(child);
    let start = Instant::now();
    let read = |p: &Path| {
        let mut s = Vec::new();
        if let Ok(mut f) = std::fs::File::open(p) {
            let _ = f.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    };
    loop {
        let out = read(&serial);
        if let Some(w) = wanted.iter().find(|w| out.contains(*w)) {
            eprintln!(
                "{name}: saw {w:?} after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            let _ = std::fs::remove_dir_all(&dir);
            return out;
        }
        if let Some(status) = guard.0.try_wait().unwrap() {
            panic!(
                "{name}: tandem exited ({status}) before the guest printed any of {wanted:?}\n\
                 --- serial ---\n{out}\n--- stderr ---\n{}",
                read(&stderr_path)
            );
        }
        if start.elapsed() > boot_timeout() {
            panic!(
                "{name}: no {wanted:?} on the serial console within {:?}\n\
                 --- serial ---\n{out}\n--- stderr ---\n{}",
                boot_timeout(),
                read(&stderr_path)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn linux_pvh_boot_prints_banner() {
    if skip() {
        return;
    }
    let k = kernels();
    let out = boot_until(
        "pvh",
        &k.vmlinux,
        "earlyprintk=serial console=ttyS0 noapic nolapic",
        &["Linux version"],
    );
    assert!(out.contains("Linux version"));
}

#[test]
fn linux_bzimage_boot_runs_decompressor() {
    if skip() {
        return;
    }
    let k = kernels();
    // Debian builds without CONFIG_X86_VERBOSE_BOOTUP, so its decompressor
    // (arch/x86/boot/compressed) is silent on success: "nokaslr" makes it
    // warn "KASLR disabled: 'nokaslr' on cmdline." on the serial port once
    // it has parsed earlyprintk and programmed the UART, before it starts
    // decompressing. Verbose kernels print "Decompressing Linux" too.
    boot_until(
        "bzimage",
        &k.bzimage,
        "earlyprintk=serial,ttyS0 console=ttyS0 noapic nolapic nokaslr",
        &["KASLR disabled", "Decompressing Linux", "Linux version"],
    );
}

/// A kernel nobody here wrote is recordable and replayable: record Debian's
/// vmlinux booting (bounded by an exit count, past its `Linux version`
/// banner), replay the log, and require `replay verified` and the same
/// console bytes.
#[test]
fn linux_pvh_boot_records_and_replays() {
    if skip() {
        return;
    }
    let k = kernels();
    let dir = std::env::temp_dir().join(format!("tandem-linux-rr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("linux.tlog");
    let rec_out = dir.join("record.out");
    let rep_out = dir.join("replay.out");
    let tandem = env!("CARGO_BIN_EXE_tandem");
    let rec = Command::new(tandem)
        .args(["record", "--log"])
        .arg(&log)
        .arg("--kernel")
        .arg(&k.vmlinux)
        .args([
            "--cmdline",
            "earlyprintk=serial console=ttyS0 noapic nolapic",
            "--mem-mib",
            "256",
            // Console output leaves the VM a line at a time (the Outputs
            // interface): the banner's line (~220 bytes, two exits a byte
            // with the LSR poll) is complete by exit ~500.
            "--stop-at",
            "1000",
            "--fingerprint-interval",
            "50",
        ])
        .arg("--serial")
        .arg(format!("file:{}", rec_out.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let rec_err = String::from_utf8_lossy(&rec.stderr);
    assert!(rec.status.success(), "record failed: {rec_err}");
    let recorded = std::fs::read(&rec_out).unwrap();
    assert!(
        String::from_utf8_lossy(&recorded).contains("Linux version"),
        "no banner within 1000 exits: {rec_err}"
    );
    let rep = Command::new(tandem)
        .args(["replay", "--log"])
        .arg(&log)
        .arg("--serial")
        .arg(format!("file:{}", rep_out.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let rep_err = String::from_utf8_lossy(&rep.stderr);
    assert!(rep.status.success(), "replay failed: {rep_err}");
    assert!(rep_err.contains("replay verified"), "{rep_err}");
    assert_eq!(
        std::fs::read(&rep_out).unwrap(),
        recorded,
        "console differs"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian's kernel booted protected (`tandem run --kernel --protect-to
/// --api-socket`: seeded before its first instruction, the secondary needs
/// no copy of the kernel file), until the secondary's replayed console
/// shows the banner. The secondary gets `sec_extra`, both sides
/// `extra` (the primary's console is `pri.txt`, the secondary's replayed
/// one `sec.txt` in `dir`).
fn linux_protected(
    dir: &common::TempDir,
    pki: &common::cluster::Pki,
    sec_extra: &[&str],
    extra: &[&str],
) -> (common::cluster::Proc, common::cluster::Proc, String) {
    use common::cluster::{loopback_secondary, Proc};
    let k = kernels();
    let sec_serial = format!("file:{}", dir.s("sec.txt"));
    // Detection is not what these test: two emulated Linux boots on a
    // loaded host can starve a heartbeat thread for longer than 1 s.
    let mut sec_args = vec!["--serial", &sec_serial, "--failover-timeout-ms", "3000"];
    sec_args.extend_from_slice(sec_extra);
    sec_args.extend_from_slice(extra);
    let (sec, addr) = loopback_secondary(&pki.creds("sec"), &sec_args);
    let sock = dir.s("pri.sock");
    let pri_serial = format!("file:{}", dir.s("pri.txt"));
    let kernel = k.vmlinux.display().to_string();
    let mut args = vec![
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "earlyprintk=serial console=ttyS0 noapic nolapic",
        "--mem-mib",
        "256",
        "--serial",
        &pri_serial,
        "--protect-to",
        &addr,
        "--api-socket",
        &sock,
        "--failover-timeout-ms",
        "3000",
    ];
    args.extend_from_slice(extra);
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    let mut pri = Proc::spawn(&[], &args);
    pri.wait_for("protected by the secondary", true);
    let start = Instant::now();
    while !console(dir, "sec.txt").contains("Linux version") {
        if let Ok(Some(st)) = pri.child.try_wait() {
            panic!(
                "the primary ended ({st}) before the banner\n{}",
                pri.describe()
            );
        }
        assert!(
            start.elapsed() < boot_timeout(),
            "no banner on the secondary's console within {:?}\n{}\n{}",
            boot_timeout(),
            pri.describe(),
            sec.describe()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "the secondary's console shows the banner after {:.1} s",
        start.elapsed().as_secs_f64()
    );
    (pri, sec, sock)
}

/// A console file of `dir` ("" while it does not exist).
fn console(dir: &common::TempDir, name: &str) -> String {
    String::from_utf8_lossy(&std::fs::read(dir.file(name)).unwrap_or_default()).into_owned()
}

/// Other people's kernel, protected: Debian's kernel replayed in lockstep
/// up to its banner; `tandem unprotect` then ends the log, the secondary
/// verifies its state digest against the primary's at that exit, and its
/// console is the primary's up to there, byte for byte.
#[test]
fn linux_pvh_boot_protected_secondary_follows() {
    if skip() {
        return;
    }
    let dir = common::TempDir::new("linux-protect");
    let pki = common::cluster::Pki::new(&["pri", "sec"], &[]);
    let (pri, sec, sock) = linux_protected(&dir, &pki, &[], &[]);
    common::cluster::unprotect_verified(&sock, &pri, sec);
    let (secondary, primary) = (console(&dir, "sec.txt"), console(&dir, "pri.txt"));
    assert!(
        primary.starts_with(&secondary),
        "the secondary's console is not the primary's\n--- secondary ---\n{secondary}\n--- primary ---\n{primary}"
    );
    drop(pri);
}

/// Other people's kernel, failed over: kill -9 of the primary after the
/// banner; the secondary wins the arbiter and goes live, and the kernel
/// boots on there: its live console goes on to lines the primary never
/// reached, and the banner the primary printed is not printed again.
#[test]
fn linux_pvh_boot_protected_fails_over() {
    if skip() {
        return;
    }
    let dir = common::TempDir::new("linux-failover");
    std::fs::create_dir(dir.file("arbiter")).unwrap();
    let pki = common::cluster::Pki::new(&["pri", "sec"], &[]);
    let arbiter = format!("file:{}", dir.s("arbiter"));
    let live = format!("file:{}", dir.s("live.txt"));
    let (pri, mut sec, _) = linux_protected(
        &dir,
        &pki,
        &["--live-serial", &live],
        &["--arbiter", &arbiter],
    );
    pri.signal(libc::SIGKILL);
    sec.wait_for("going LIVE at exit", true);
    let start = Instant::now();
    // "Zone ranges:" follows the e820 map in every boot of this kernel;
    // the primary's console, cut at the banner, never has it.
    while !console(&dir, "live.txt").contains("Zone ranges:") {
        assert!(
            start.elapsed() < boot_timeout(),
            "the kernel did not go on on the new primary\n{}",
            sec.describe()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let (primary, after) = (console(&dir, "pri.txt"), console(&dir, "live.txt"));
    assert!(!primary.contains("Zone ranges:"), "{primary}");
    let lines: Vec<&str> = primary.lines().chain(after.lines()).collect();
    let banners = lines.iter().filter(|l| l.contains("Linux version")).count();
    assert_eq!(
        banners, 1,
        "the banner printed {banners} times\n{primary}\n---\n{after}"
    );
    drop(pri);
}
