//! Every workload of the built-in test guest through the `tandem` binary:
//! exit status 0, a `RESULT` line, the same checksum on a second run for
//! the deterministic ones; the disk really written (and not written when
//! read-only); `--serial file:`; the guest's exit status passed through.

mod common;

use common::{arg, tandem, tandem_with_stdin, Output, TempDir};

/// Run the built-in guest with `cmdline` (plus `extra` args); expect
/// status 0 and a `RESULT <name> ...` line; return the output.
#[track_caller]
fn run_ok(cmdline: &str, extra: &[&str]) -> Output {
    let mut args = vec!["run", "--cmdline", cmdline];
    args.extend_from_slice(extra);
    let out = tandem(&args);
    out.assert_status(0);
    check_result(&out, cmdline);
    out
}

/// The RESULT line names the workload and carries a 16-hex-digit checksum.
#[track_caller]
fn check_result(out: &Output, cmdline: &str) {
    let name = cmdline.split_whitespace().next().unwrap_or("demo");
    let line = out.expect_result();
    let parts: Vec<&str> = line.split(' ').collect();
    assert_eq!(parts.len(), 3, "malformed result line {line:?}");
    assert_eq!(parts[1], name, "result of the wrong workload: {line:?}");
    assert!(
        parts[2].len() == 16 && parts[2].chars().all(|c| c.is_ascii_hexdigit()),
        "checksum is not 16 hex digits: {line:?}"
    );
    assert!(
        out.stdout.starts_with("Tandem test guest\n"),
        "banner missing\n{}",
        out.describe()
    );
    assert!(
        out.stdout.contains(&format!("cmdline: {cmdline}\n")),
        "command line not echoed\n{}",
        out.describe()
    );
    assert!(!out.stdout.contains("ERROR"), "{}", out.describe());
}

/// Two runs of a deterministic workload: same RESULT line and the same
/// console output.
#[track_caller]
fn deterministic(cmdline: &str) -> Output {
    let a = run_ok(cmdline, &[]);
    let b = run_ok(cmdline, &[]);
    assert_eq!(
        a.result_line(),
        b.result_line(),
        "checksum differs between runs"
    );
    assert_eq!(a.stdout, b.stdout, "console output differs between runs");
    a
}

#[test]
fn default_demo() {
    let out = tandem(&["run"]);
    out.assert_status(0);
    check_result(&out, "");
    for line in [
        "demo: timer ok",
        "demo: no disk, skipping disk check",
        "demo: done",
    ] {
        assert!(
            out.stdout.contains(line),
            "missing {line:?}\n{}",
            out.describe()
        );
    }
}

#[test]
fn demo_with_disk_checks_the_disk() {
    let dir = TempDir::new("demo-disk");
    let img = dir.disk("disk.img", 1 << 20);
    let out = tandem(&["run", "--disk", arg(&img)]);
    out.assert_status(0);
    check_result(&out, "");
    assert!(out.stdout.contains("demo: disk ok"), "{}", out.describe());
    // 16 sectors written: the first 8 KiB are no longer zero, the rest is.
    let data = common::read(&img);
    assert!(data[..512].iter().any(|&b| b != 0), "sector 0 not written");
    assert!(
        data[15 * 512..16 * 512].iter().any(|&b| b != 0),
        "sector 15 not written"
    );
    assert!(
        data[16 * 512..].iter().all(|&b| b == 0),
        "wrote past sector 15"
    );
}

#[test]
fn hello() {
    let out = deterministic("hello");
    assert!(out.stdout.contains("hello from the Tandem test guest\n"));
}

#[test]
fn ticks() {
    let out = deterministic("ticks 20");
    assert!(out.stdout.contains("ticks done 20\n"), "{}", out.describe());
    // The checksum depends on N.
    let other = run_ok("ticks 21", &[]);
    assert_ne!(out.result_line(), other.result_line());
}

#[test]
fn dirty() {
    let out = deterministic("dirty 64 3");
    for r in 1..=3 {
        assert!(
            out.stdout.contains(&format!("round {r}\n")),
            "{}",
            out.describe()
        );
    }
    assert!(!out.stdout.contains("round 4"));
    let other = run_ok("dirty 64 2", &[]);
    assert_ne!(out.result_line(), other.result_line());
}

#[test]
fn fill() {
    let out = deterministic("fill 64 3");
    assert!(out.stdout.contains("round 3\n"), "{}", out.describe());
    assert!(!out.stdout.contains("round 4"));
    // The checksum covers the data: other rounds, other pages, other result.
    for other in ["fill 64 2", "fill 65 3"] {
        assert_ne!(
            out.result_line(),
            run_ok(other, &[]).result_line(),
            "{other}"
        );
    }
    // Idle ticks between rounds change the timing, not the data.
    assert_eq!(out.result_line(), run_ok("fill 64 3 2", &[]).result_line());
    let short = tandem(&["run", "--mem-mib", "16", "--cmdline", "fill 64 1"]);
    short.assert_status(3);
    assert!(
        short.stdout.contains("ERROR fill: not enough RAM"),
        "{}",
        short.describe()
    );
}

#[test]
fn busy() {
    let out = deterministic("busy 20000");
    let other = run_ok("busy 20001", &[]);
    assert_ne!(out.result_line(), other.result_line());
}

#[test]
fn disk_writes_the_image() {
    let dir = TempDir::new("disk");
    let a = dir.disk("a.img", 1 << 20);
    let b = dir.disk("b.img", 1 << 20);
    let out_a = run_ok("disk 64", &["--disk", arg(&a)]);
    let out_b = run_ok("disk 64", &["--disk", arg(&b)]);
    assert!(
        out_a.stdout.contains("disk capacity 2048 sectors\n"),
        "{}",
        out_a.describe()
    );
    assert!(
        out_a.stdout.contains("disk verified 64 sectors\n"),
        "{}",
        out_a.describe()
    );
    assert_eq!(
        out_a.result_line(),
        out_b.result_line(),
        "checksum differs between runs"
    );
    let da = common::read(&a);
    let db = common::read(&b);
    assert_eq!(da.len(), 1 << 20, "the image changed size");
    assert!(da[..512].iter().any(|&x| x != 0), "first sector still zero");
    assert!(
        da[63 * 512..64 * 512].iter().any(|&x| x != 0),
        "sector 63 still zero"
    );
    assert!(
        da[64 * 512..].iter().all(|&x| x == 0),
        "wrote past sector 63"
    );
    assert!(da == db, "two runs left different disk contents");
}

#[test]
fn disk_without_a_disk_fails_cleanly() {
    let out = tandem(&["run", "--cmdline", "disk 8"]);
    out.assert_status(3);
    assert!(
        out.stdout.contains("ERROR no virtio-blk device"),
        "{}",
        out.describe()
    );
    assert!(out.result_line().is_none());
}

#[test]
fn disk_read_only_is_not_written() {
    let dir = TempDir::new("disk-ro");
    // Non-zero contents, so that any write would show.
    let original = common::noise(1 << 20, 7);
    let img = dir.write("ro.img", &original);
    let ro = format!("{},ro", arg(&img));
    let out = tandem(&["run", "--cmdline", "disk 64", "--disk", &ro]);
    assert_ne!(
        out.status,
        0,
        "a write to a read-only disk succeeded\n{}",
        out.describe()
    );
    assert!(out.stdout.contains("ERROR"), "{}", out.describe());
    assert!(out.result_line().is_none(), "{}", out.describe());
    assert!(
        common::read(&img) == original,
        "the read-only image was modified"
    );
}

/// A disk path may contain commas (only a final `,ro`/`,rw` is an
/// option): the guest writes that very file.
#[test]
fn disk_path_with_a_comma() {
    let dir = TempDir::new("disk-comma");
    let img = dir.disk("a,b.img", 1 << 20);
    let out = run_ok("disk 8", &["--disk", arg(&img)]);
    assert!(
        out.stdout.contains("disk verified 8 sectors\n"),
        "{}",
        out.describe()
    );
    assert!(
        common::read(&img).iter().any(|&b| b != 0),
        "the image with a comma in its name was not written"
    );
    // The same path read-only: a write fails, the file stays zero.
    let zeros = dir.disk("c,d.img", 1 << 20);
    let ro = format!("{},ro", arg(&zeros));
    let out = tandem(&["run", "--cmdline", "disk 8", "--disk", &ro]);
    assert_ne!(out.status, 0, "{}", out.describe());
    assert!(common::read(&zeros).iter().all(|&b| b == 0));
}

#[test]
fn echo_answers_lines() {
    let input = b"a\nbb\nquit\n";
    let a = tandem_with_stdin(&["run", "--cmdline", "echo"], Some(input));
    a.assert_status(0);
    check_result(&a, "echo");
    let ready = a.stdout.find("echo ready\n").expect("no 'echo ready'");
    let first = a
        .stdout
        .find("echo: a\n")
        .unwrap_or_else(|| panic!("{}", a.describe()));
    let second = a
        .stdout
        .find("echo: bb\n")
        .unwrap_or_else(|| panic!("{}", a.describe()));
    assert!(ready < first && first < second, "{}", a.describe());
    let b = tandem_with_stdin(&["run", "--cmdline", "echo"], Some(input));
    b.assert_status(0);
    assert_eq!(
        a.result_line(),
        b.result_line(),
        "same input, different checksum"
    );
    let c = tandem_with_stdin(&["run", "--cmdline", "echo"], Some(b"a\nbc\nquit\n"));
    c.assert_status(0);
    assert_ne!(
        a.result_line(),
        c.result_line(),
        "checksum ignores the input"
    );
}

#[test]
fn tsc() {
    let out = run_ok("tsc 50", &[]);
    assert!(out.stdout.contains(" of 50\n"), "{}", out.describe());
}

#[test]
fn exits() {
    let out = deterministic("exits 300");
    assert!(out.stdout.contains("exits 300\n"), "{}", out.describe());
    let other = run_ok("exits 301", &[]);
    assert_ne!(out.result_line(), other.result_line());
}

#[test]
fn serial_to_file() {
    let dir = TempDir::new("serial");
    let log = dir.file("console.log");
    let target = format!("file:{}", arg(&log));
    let out = tandem(&["run", "--cmdline", "hello", "--serial", &target]);
    out.assert_status(0);
    assert!(
        !out.stdout.contains("Tandem test guest"),
        "console went to stdout too"
    );
    let text = String::from_utf8(common::read(&log)).expect("console log is UTF-8");
    assert!(text.starts_with("Tandem test guest\n"), "{text:?}");
    assert!(
        text.contains("hello from the Tandem test guest\n"),
        "{text:?}"
    );
    let reference = run_ok("hello", &[]);
    assert_eq!(common::result_line(&text), reference.result_line());
}

#[test]
fn guest_exception_status_passes_through() {
    let out = tandem(&["run", "--cmdline", "fault"]);
    out.assert_status(0xe6);
    assert!(
        out.stdout.contains("ERROR exception vector=0x6"),
        "{}",
        out.describe()
    );
    assert!(out.result_line().is_none());
}

#[test]
fn unknown_workload_status_passes_through() {
    let out = tandem(&["run", "--cmdline", "no-such-workload"]);
    out.assert_status(2);
    assert!(
        out.stdout
            .contains("ERROR unknown workload no-such-workload"),
        "{}",
        out.describe()
    );
}

#[test]
fn bad_number_status_passes_through() {
    let out = tandem(&["run", "--cmdline", "ticks x1"]);
    out.assert_status(2);
    assert!(
        out.stdout.contains("ERROR bad number x1"),
        "{}",
        out.describe()
    );
}
