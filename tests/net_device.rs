//! The virtio-net device and its TAP backend, end to end: `--net` errors,
//! TAPs created and removed, frames through the determinism boundary
//! (recorded as inputs and output hashes, replayed verified), a frame too
//! large for the guest counted and dropped, and the RARP announcement of a
//! migrated guest seen on the destination's network.
//!
//! Needs root, `ip netns` and `python3` (installed by .ci/run); a missing
//! one fails the test.

mod common;
#[path = "common/net.rs"]
mod net;

use std::process::Command;

use common::cluster::{migrate, receiver, source, Netns, Pki};
use common::{arg, tandem, TempDir};
use net::{NetNs, Vm, VmConfig, Vmm, GUEST_IP, TAP};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn link_exists(ns: &str, name: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", name])
        .output()
        .expect("running ip")
        .status
        .success()
}

/// Run `python3 -c SCRIPT ARGS` in `ns`; returns stdout (fails on error).
#[track_caller]
fn python(ns: &str, script: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", script])
        .args(args)
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "python3 failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// TCP echo round trips to the guest's `net-echo PORT`: N lines, each must
/// come back.
const ECHO: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=60)
for i in range(n):
    m = b"frame %d through the boundary\n" % i
    s.sendall(m)
    got = b""
    while len(got) < len(m):
        c = s.recv(4096)
        assert c, "connection closed"
        got += c
    assert got == m, (got, m)
print("echoed", n)
"#;

/// Send one raw Ethernet frame of LEN bytes (broadcast, ethertype 0x88b5)
/// out of interface IF.
const RAW_SEND: &str = r#"
import socket, sys
ifname, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(n - 14)
print(s.send(frame))
"#;

/// Capture RARP frames (ethertype 0x8035) on IF for SECS seconds, print one
/// line per frame: seconds since the first, source MAC.
const RARP_CAPTURE: &str = r#"
import socket, sys, time
ifname, secs = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035))
s.bind((ifname, 0))
s.settimeout(0.1)
print("listening", flush=True)
end = time.time() + secs
first = None
while time.time() < end:
    try:
        f = s.recv(2048)
    except socket.timeout:
        continue
    t = time.time()
    if first is None:
        first = t
    print("%.3f %s %d" % (t - first, f[6:12].hex(":"), len(f)), flush=True)
"#;

#[test]
fn bad_net_options_are_one_clear_error() {
    for (net, needle) in [
        ("tap=t0,mac=52:54:00:12:34", "not a MAC address"),
        ("tap=t0,mac=52:54:00:12:34:zz", "not a MAC address"),
        ("tap=t0,mac=01:00:5e:00:00:01", "multicast"),
        ("mac=52:54:00:12:34:56", "names no TAP"),
        ("tap=t0,speed=10", "not a network option"),
        ("tap=", "not a network option"),
        ("tap=averyveryverylongname", "not a valid interface name"),
        ("tap=a/b", "not a valid interface name"),
        ("tap=lo", "not a TAP device"),
    ] {
        for cmd in ["run", "record"] {
            let mut args = vec![cmd, "--cmdline", "hello", "--net", net];
            let dir = TempDir::new("badnet");
            let log = dir.file("x.tlog");
            if cmd == "record" {
                args.extend(["--log", arg(&log)]);
            }
            let out = tandem(&args);
            out.assert_status(2);
            assert!(out.stderr.contains(needle), "{net}: {}", out.describe());
            assert!(
                out.stderr.lines().filter(|l| !l.trim().is_empty()).count() <= 3,
                "{}",
                out.describe()
            );
            assert!(!out.stderr.contains("panicked"), "{}", out.describe());
        }
    }
    // A TUN device (layer 3) is not a TAP.
    let ns = NetNs::new("tun");
    ip(&[
        "-n", &ns.name, "tuntap", "add", "dev", "tun7", "mode", "tun",
    ]);
    let out = ns
        .command(common::TANDEM)
        .args(["run", "--cmdline", "hello", "--net", "tap=tun7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tun7") && err.contains("TUN"), "{err}");
}

/// A TAP that does not exist is created for the VM and gone when it ends;
/// one that exists is used and left in place.
#[test]
fn created_tap_is_removed_existing_one_is_kept() {
    let ns = NetNs::new("tc");
    let dir = TempDir::new("tapcreate");
    let out = ns
        .command(common::TANDEM)
        .args(["run", "--cmdline", "hello", "--net", "tap=tnew0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("created TAP tnew0"), "{err}");
    assert!(!link_exists(&ns.name, "tnew0"), "tnew0 left behind");

    // While a VM runs on a created TAP, it is there (and up).
    let mut vm = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, common::TANDEM])
        .args(["run", "--cmdline", "net-echo 7", "--net", "tap=tnew1"])
        .arg("--serial")
        .arg(format!("file:{}", dir.s("c.txt")))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(dir.file("c.txt"))
        .unwrap_or_default()
        .contains("net-echo listening")
    {
        assert!(start.elapsed() < common::TIMEOUT, "guest never listened");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(link_exists(&ns.name, "tnew1"));
    let show = Command::new("ip")
        .args(["-n", &ns.name, "link", "show", "tnew1"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&show.stdout).contains(",UP"));
    Command::new("kill")
        .args(["-TERM", &vm.id().to_string()])
        .status()
        .unwrap();
    let st = vm.wait().unwrap();
    assert_eq!(st.code(), Some(0), "SIGTERM ends the VM with status 0");
    assert!(!link_exists(&ns.name, "tnew1"), "tnew1 left behind");

    // The namespace's own TAP stays.
    let out = ns
        .command(common::TANDEM)
        .args(["run", "--cmdline", "hello", "--net", &format!("tap={TAP}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("created"));
    assert!(link_exists(&ns.name, TAP));
}

/// A networked run is recorded and replays verified: the received frames
/// are in the log as inputs, every sent frame and console line as an output
/// hash, and the replay reaches the same state and console.
#[test]
fn networked_run_records_and_replays_verified() {
    let dir = TempDir::new("netrr");
    let log = dir.file("net.tlog");
    let ns = NetNs::new("rr");
    let vm = Vm::start(
        &ns,
        &VmConfig {
            vmm: Vmm::Tandem,
            cmdline: "net-echo 7",
            disk: None,
            dir: dir.path(),
            tandem_cmd: &["record", "--log", arg(&log)],
        },
        "net-echo listening",
    );
    let out = python(&ns.name, ECHO, &[GUEST_IP, "7", "25"]);
    assert!(out.contains("echoed 25"), "{out}");
    let recorded_console = vm.console();
    let (status, err) = vm.stop();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    assert!(err.contains("network frames"), "{err}");

    let dump = tandem(&["dump-log", "--log", arg(&log)]);
    dump.assert_status(0);
    let rx = dump.stdout.matches("NetFrame(").count();
    let tx = dump.stdout.matches("kind: NetFrame").count();
    let console = dump.stdout.matches("kind: Console").count();
    // 25 round trips: at least a data segment each way per trip.
    assert!(rx >= 25 && tx >= 25, "rx {rx} tx {tx}\n{}", dump.stdout);
    assert!(console >= 2, "console outputs {console}");

    let replay_console = dir.file("replay.txt");
    let rep = tandem(&[
        "replay",
        "--log",
        arg(&log),
        "--serial",
        &format!("file:{}", replay_console.display()),
    ]);
    rep.assert_status(0);
    assert!(rep.stderr.contains("replay verified"), "{}", rep.describe());
    let replayed = std::fs::read_to_string(&replay_console).unwrap();
    assert!(
        recorded_console.starts_with(&replayed) || replayed.starts_with(&recorded_console),
        "recorded:\n{recorded_console}\nreplayed:\n{replayed}"
    );
    assert!(replayed.contains("net-echo listening"), "{replayed}");

    // A log whose frame output was tampered with diverges, by name.
    let mut bytes = std::fs::read(&log).unwrap();
    let pos = bytes.len() / 2;
    bytes[pos] ^= 0x40;
    let bad = dir.write("bad.tlog", &bytes);
    let rep = tandem(&["replay", "--log", arg(&bad), "--quiet"]);
    assert_ne!(rep.status, 0, "{}", rep.describe());
}

/// A frame larger than any the guest's buffers take is dropped and
/// counted; the guest keeps working.
#[test]
fn oversized_frame_is_a_counted_drop() {
    let dir = TempDir::new("netbig");
    let ns = NetNs::new("big");
    // Let the host side send a jumbo frame into the TAP.
    ip(&["-n", &ns.name, "link", "set", TAP, "mtu", "9000"]);
    let vm = Vm::start(
        &ns,
        &VmConfig {
            vmm: Vmm::Tandem,
            cmdline: "net-echo 7",
            disk: None,
            dir: dir.path(),
            tandem_cmd: &[],
        },
        "net-echo listening",
    );
    let out = python(&ns.name, ECHO, &[GUEST_IP, "7", "2"]);
    assert!(out.contains("echoed 2"), "{out}");
    let sent = python(&ns.name, RAW_SEND, &[TAP, "4000"]);
    assert_eq!(sent.trim(), "4000");
    let out = python(&ns.name, ECHO, &[GUEST_IP, "7", "3"]);
    assert!(out.contains("echoed 3"), "{out}");
    let (status, err) = vm.stop();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(
        err.contains("dropped 1 too large for the guest's buffers"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Migrate a networked guest between two namespace hosts: the destination
/// announces the guest's MAC with RARP broadcasts (several, with growing
/// gaps) on its TAP, and the guest keeps serving there.
#[test]
fn migrated_guest_is_announced_with_rarp() {
    let ns =
        Netns::new("rarp", 214).expect("two network namespaces joined by veth (needs root and ip)");
    for n in [&ns.a, &ns.b] {
        ip(&["-n", n, "tuntap", "add", "dev", "tn0", "mode", "tap"]);
        ip(&["-n", n, "addr", "add", "10.0.2.2/24", "dev", "tn0"]);
        ip(&["-n", n, "link", "set", "tn0", "up"]);
    }
    let pki = Pki::new(&["a", "b"], &["10.214.0.2"]);
    let dir = TempDir::new("rarp");
    let sock = dir.s("a.sock");
    let pa = ["ip", "netns", "exec", ns.a.as_str()];
    let pb = ["ip", "netns", "exec", ns.b.as_str()];
    let mac = "52:54:00:aa:bb:07";
    let (mut dst, addr) = receiver(
        &pb,
        "10.214.0.2:0",
        &pki.creds("b"),
        &["--serial", "null", "--net", "tap=tn0"],
    );
    let mut src = source(
        &pa,
        &sock,
        "net-echo 7",
        &["--net", &format!("tap=tn0,mac={mac}")],
    );
    src.wait_for("net-echo listening", false);
    let out = python(&ns.a, ECHO, &[GUEST_IP, "7", "3"]);
    assert!(out.contains("echoed 3"), "{out}");

    // Capture on the destination's client side while migrating.
    let capture = std::thread::spawn({
        let b = ns.b.clone();
        move || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &b,
                    "python3",
                    "-c",
                    RARP_CAPTURE,
                    "tn0",
                    "8",
                ])
                .output()
                .expect("python3")
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", dst.describe());
    dst.wait_for("running it", true);
    let cap = capture.join().unwrap();
    let lines = String::from_utf8_lossy(&cap.stdout).into_owned();
    let frames: Vec<(f64, String)> = lines
        .lines()
        .filter(|l| *l != "listening")
        .map(|l| {
            let mut it = l.split_whitespace();
            (
                it.next().unwrap().parse().unwrap(),
                it.next().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        frames.len() >= 5,
        "RARP frames: {lines}\n{}",
        String::from_utf8_lossy(&cap.stderr)
    );
    assert!(frames.iter().all(|(_, m)| m == mac), "{lines}");
    // Gaps grow: ~50 ms, ~150 ms, ~250 ms, ...
    let gaps: Vec<f64> = frames.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(gaps[0] >= 0.04, "{gaps:?}");
    assert!(gaps.windows(2).all(|g| g[1] > g[0]), "{gaps:?}");

    // The guest serves on at the destination, with its own MAC.
    let out = python(&ns.b, ECHO, &[GUEST_IP, "7", "3"]);
    assert!(out.contains("echoed 3"), "{out}");
    let neigh = Command::new("ip")
        .args(["-n", &ns.b, "neigh", "show", GUEST_IP])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&neigh.stdout).contains(mac),
        "{}",
        String::from_utf8_lossy(&neigh.stdout)
    );
    let (scode, _, _) = src.finish();
    assert_eq!(scode, 0);
    dst.signal(libc::SIGTERM);
    let (dcode, _, derr) = dst.finish();
    assert_eq!(dcode, 0, "{derr}");
}

/// A kernel of the operator's (`--kernel`) is told where the NIC is: the
/// recorded configuration's command line names the NIC's window and IRQ
/// (and the disk's, when there is one), the MAC is the one asked for.
#[test]
fn kernel_command_line_names_the_nic() {
    let dir = TempDir::new("netcmdline");
    let elf = dir.file("guest.elf");
    tandem(&["guest-elf", "--out", arg(&elf)]).assert_status(0);
    let disk = dir.disk("d.img", 1 << 20);
    let log = dir.file("l.tlog");
    let ns = NetNs::new("cl");
    let out = ns
        .command(common::TANDEM)
        .args(["record", "--log", arg(&log), "--kernel", arg(&elf)])
        .args([
            "--cmdline",
            "hello",
            "--disk",
            arg(&disk),
            "--serial",
            "null",
        ])
        .args(["--net", &format!("tap={TAP},mac=52:54:00:00:00:2a")])
        .args(["--stop-at", "20"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = tandem(&["dump-log", "--log", arg(&log)]);
    dump.assert_status(0);
    let config = dump
        .stdout
        .lines()
        .find(|l| l.starts_with("config"))
        .unwrap_or_default()
        .to_string();
    assert!(
        config.contains("virtio_mmio.device=4K@0xd0000000:5")
            && config.contains("virtio_mmio.device=4K@0xd0001000:6"),
        "{config}"
    );
    assert!(config.contains("tap: \"tm0\""), "{config}");
    assert!(config.contains("[82, 84, 0, 0, 0, 42]"), "{config}");
}
