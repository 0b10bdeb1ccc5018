//! What `--help` and the guest's own messages tell a user.

mod common;

use common::tandem;

fn help(cmd: &str) -> String {
    let out = tandem(&[cmd, "--help"]);
    out.assert_status(0);
    out.stdout
}

#[test]
fn run_help_lists_every_workload_and_the_guest_statuses() {
    let h = help("run");
    for w in [
        "hello",
        "ticks N",
        "dirty PAGES ROUNDS",
        "busy N",
        "disk SECTORS",
        "512-byte sectors",
        "echo",
        "tsc N",
        "exits N",
    ] {
        assert!(h.contains(w), "run --help lacks {w:?}:\n{h}");
    }
    assert!(!h.contains("BLOCKS"), "run --help still says BLOCKS:\n{h}");
    for code in [
        "1 when its workload failed",
        "2 for a bad command line",
        "3 when",
    ] {
        assert!(h.contains(code), "run --help lacks {code:?}:\n{h}");
    }
}

#[test]
fn pause_help_says_pause_only() {
    let h = help("pause");
    assert!(!h.contains("Pause or resume"), "{h}");
    assert!(h.contains("Pause a VM"), "{h}");
    assert!(help("resume").contains("Resume a VM"));
}

/// The guest names Tandem's flag, not QEMU's `-m`.
#[test]
fn guest_asks_for_mem_mib() {
    // 8192 pages at 16 MiB need 48 MiB of RAM; give 24.
    let out = tandem(&[
        "run",
        "--cmdline",
        "dirty 8192 1",
        "--mem-mib",
        "24",
        "--serial",
        "stdio",
    ]);
    out.assert_status(3);
    assert!(
        out.stdout.contains("ERROR dirty: not enough RAM") && out.stdout.contains("--mem-mib"),
        "{}",
        out.describe()
    );
    assert!(!out.stdout.contains("-m)"), "{}", out.describe());
}
