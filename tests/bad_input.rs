//! Bad input is refused with status 2 and one clear message naming it,
//! before any guest runs.

mod common;

use common::{arg, tandem, Output, TempDir};

/// Status 2, every needle in stderr, no guest output.
#[track_caller]
fn refused(args: &[&str], needles: &[&str]) -> Output {
    let out = tandem(args);
    out.assert_status(2);
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "message lacks {n:?}\n{}",
            out.describe()
        );
    }
    assert!(
        !out.stdout.contains("Tandem test guest"),
        "a guest ran\n{}",
        out.describe()
    );
    out
}

#[test]
fn missing_kernel() {
    let dir = TempDir::new("nokernel");
    let k = dir.file("vmlinux-missing");
    refused(&["run", "--kernel", arg(&k)], &[arg(&k), "no such file"]);
}

#[test]
fn not_a_kernel() {
    let dir = TempDir::new("notkernel");
    let k = dir.write("random.bin", &common::noise(64 << 10, 11));
    refused(
        &["run", "--kernel", arg(&k)],
        &[arg(&k), "not a kernel image"],
    );
    // An empty file is no kernel either.
    let e = dir.write("empty.bin", b"");
    refused(&["run", "--kernel", arg(&e)], &[arg(&e)]);
}

#[test]
fn elf_without_pvh_note() {
    // Any host ELF executable: x86-64, but no XEN_ELFNOTE_PHYS32_ENTRY.
    let elf = ["/bin/true", "/usr/bin/true", "/bin/sh"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("no host ELF executable to use");
    refused(&["run", "--kernel", elf], &[elf, "no PVH entry note"]);
}

#[test]
fn missing_disk() {
    let dir = TempDir::new("nodisk");
    let d = dir.file("disk-missing.img");
    refused(
        &["run", "--cmdline", "hello", "--disk", arg(&d)],
        &[arg(&d)],
    );
    // Read-only flag on a missing file: still the path.
    let ro = format!("{},ro", arg(&d));
    refused(&["run", "--cmdline", "hello", "--disk", &ro], &[arg(&d)]);
}

#[test]
fn disk_is_a_directory() {
    let dir = TempDir::new("diskdir");
    refused(
        &["run", "--cmdline", "hello", "--disk", arg(dir.path())],
        &[arg(dir.path()), "not a regular file"],
    );
}

#[test]
fn bad_disk_option() {
    refused(
        &["run", "--cmdline", "hello", "--disk", "x.img,rx"],
        &["x.img,rx", "the only disk options are ,ro and ,rw"],
    );
}

#[test]
fn too_little_memory() {
    refused(
        &["run", "--cmdline", "hello", "--mem-mib", "1"],
        &["--mem-mib 1", "too little memory"],
    );
}

/// MemTotal of this host in MiB, from /proc/meminfo.
fn host_mem_mib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("no MemTotal in /proc/meminfo");
    kb / 1024
}

/// More memory than the host has is refused up front, naming the value
/// and the host's limit (1 TiB used to be accepted on a 23 GiB host).
#[test]
fn more_memory_than_the_host_has() {
    let host = host_mem_mib();
    for mib in [host + 1, 1 << 20] {
        let v = mib.to_string();
        refused(
            &["run", "--cmdline", "hello", "--mem-mib", &v],
            &[
                &format!("--mem-mib {mib}"),
                "this host's memory (MemTotal)",
                &format!("at most {host} MiB"),
            ],
        );
    }
    // Beyond what Tandem's guest layout can address at all.
    refused(
        &["run", "--cmdline", "hello", "--mem-mib", "2000000"],
        &["--mem-mib 2000000", "address space", "at most 1048576 MiB"],
    );
}

/// A guest that does not fit in this process's address-space limit
/// (`ulimit -v`) is refused too, not killed half-way.
#[test]
fn more_memory_than_the_address_space_limit() {
    let out = std::process::Command::new("sh")
        .args(["-c", "ulimit -v 1048576 && exec \"$0\" \"$@\""])
        .arg(common::TANDEM)
        .args(["run", "--cmdline", "hello", "--mem-mib", "1000"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--mem-mib 1000") && stderr.contains("ulimit -v"),
        "{stderr}"
    );
    assert!(stderr.contains("at most 768 MiB"), "{stderr}");
    // The same limit leaves room for the default 64 MiB guest.
    let out = std::process::Command::new("sh")
        .args(["-c", "ulimit -v 1048576 && exec \"$0\" \"$@\""])
        .arg(common::TANDEM)
        .args(["run", "--cmdline", "hello"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_serial() {
    refused(
        &["run", "--cmdline", "hello", "--serial", "tcp:1234"],
        &["tcp:1234", "serial"],
    );
    refused(
        &["run", "--cmdline", "hello", "--serial", "file:"],
        &["file:"],
    );
    let dir = TempDir::new("serialdir");
    // A serial file in a directory that does not exist.
    let p = dir.file("no/such/dir/console.log");
    let target = format!("file:{}", arg(&p));
    refused(
        &["run", "--cmdline", "hello", "--serial", &target],
        &[arg(&p)],
    );
}

#[test]
fn snapshot_at_requires_snapshot() {
    let out = refused(
        &["run", "--cmdline", "hello", "--snapshot-at", "10"],
        &["--snapshot"],
    );
    assert!(
        out.stderr.contains("Usage"),
        "not a usage error\n{}",
        out.describe()
    );
    refused(
        &["run", "--cmdline", "hello", "--snapshot", "x.snap"],
        &["--snapshot-at"],
    );
    assert!(!std::path::Path::new("x.snap").exists());
}

#[test]
fn restore_requires_snapshot() {
    refused(&["restore"], &["--snapshot"]);
}

/// A user without access to /dev/kvm gets one line saying so (run as the
/// `nobody` user through util-linux's setpriv). It needs root and setpriv
/// (CI has both); without them it fails rather than pass having done
/// nothing.
#[test]
fn no_permission_on_dev_kvm() {
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    assert!(
        root && setpriv.exists(),
        "this test needs root and /usr/bin/setpriv (util-linux, installed by .ci/run)"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/dev/kvm")
        .map(|m| m.permissions().mode())
        .unwrap_or(0);
    assert!(
        mode & 0o006 == 0,
        "/dev/kvm is open to everyone here (mode {mode:o}): the permission test cannot run"
    );
    let out = std::process::Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", "--cmdline", "hello"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stderr.contains("Permission denied") && !stderr.contains("/dev/kvm") {
        eprintln!("nobody cannot execute the test binary here: {stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no permission to open /dev/kvm"),
        "{stderr}"
    );
    assert!(!stdout.contains("Tandem test guest"), "{stdout}");
}
