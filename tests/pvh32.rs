//! 32-bit PVH kernels (ELFCLASS32, EM_386: the usual form of small kernels,
//! which QEMU's `-kernel` also boots by PVH): the loader reads their program
//! headers and PVH note like the 64-bit path. The guest
//! (`tests/data/pvh32/guest.c`) is built here with the system compiler
//! (`gcc -m32`, which `.ci/run` installs); it prints, dirties memory and
//! reads the TSC, and must run, record and replay like the 64-bit guest.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{arg, tandem, TempDir};

/// Build the 32-bit guest into `dir`. A missing 32-bit toolchain fails the
/// test (it is installed by `.ci/run`), it does not skip it.
fn build_guest(dir: &TempDir) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pvh32/guest.c");
    let out = dir.file("pvh32.elf");
    let res = Command::new("gcc")
        .args([
            "-m32",
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-fno-pic",
            "-mgeneral-regs-only",
            "-O2",
            "-Wall",
            "-Werror",
            "-Wl,-Ttext-segment=0x100000",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .output()
        .expect("running gcc (install gcc and gcc-multilib: .ci/run does)");
    assert!(
        res.status.success(),
        "gcc -m32 failed (install gcc-multilib: .ci/run does)\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let elf = std::fs::read(&out).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 1, "not ELFCLASS32");
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 3, "not EM_386");
    out
}

const EXPECTED: &str = "hello from a 32-bit PVH guest\n....\ntsc ok\nRESULT pvh32 ";

#[test]
fn pvh32_guest_runs_records_and_replays_verified() {
    let dir = TempDir::new("pvh32");
    let kernel = build_guest(&dir);
    let run = tandem(&["run", "--kernel", arg(&kernel), "--mem-mib", "16"]);
    run.assert_status(0);
    assert!(run.stdout.starts_with(EXPECTED), "{}", run.describe());
    let result = run.expect_result().to_string();

    let log = dir.file("pvh32.tlog");
    let rec = tandem(&[
        "record",
        "--log",
        arg(&log),
        "--kernel",
        arg(&kernel),
        "--mem-mib",
        "16",
    ]);
    rec.assert_status(0);
    assert_eq!(rec.expect_result(), result, "{}", rec.describe());
    let rep = tandem(&["replay", "--log", arg(&log)]);
    rep.assert_status(0);
    assert!(rep.stderr.contains("replay verified"), "{}", rep.describe());
    assert_eq!(rep.stdout, rec.stdout, "{}", rep.describe());
}

/// A 32-bit ELF for another machine is refused by name, not misloaded.
#[test]
fn pvh32_for_another_machine_is_refused() {
    let dir = TempDir::new("pvh32-arm");
    let kernel = build_guest(&dir);
    let mut elf = std::fs::read(&kernel).unwrap();
    elf[18..20].copy_from_slice(&40u16.to_le_bytes()); // EM_ARM
    let bad = dir.write("arm.elf", &elf);
    let out = tandem(&["run", "--kernel", arg(&bad), "--mem-mib", "16"]);
    out.assert_status(2);
    assert!(
        out.stderr.contains("EM_386") && out.stdout.is_empty(),
        "{}",
        out.describe()
    );
}
