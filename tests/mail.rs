//! The test guest's network services through real clients: Python's
//! smtplib and poplib (and swaks) from a network namespace joined to the
//! VM's TAP talk to the guest's `mail` (SMTP + POP3 over its virtio-blk
//! mailbox) and `net-echo`.
//!
//! The guests run under Tandem (`tandem run --net tap=tm0`). For
//! development, `TANDEM_NET_TEST_VMM=qemu` runs the same guests under QEMU
//! microvm instead.

mod common;
#[path = "common/net.rs"]
mod net;

use common::{tandem, TempDir};
use net::{test_vmm, NetNs, Vm, VmConfig};

fn mail_vm(ns: &NetNs, dir: &TempDir, disk: &std::path::Path) -> Vm {
    Vm::start(
        ns,
        &VmConfig {
            vmm: test_vmm(),
            cmdline: "mail",
            disk: Some(disk),
            dir: dir.path(),
            tandem_cmd: &[],
        },
        "mail ready",
    )
}

/// Tiny, 100 KiB and 1 MiB messages and bodies of dot lines, sent over
/// one SMTP session, come back byte for byte over POP3.
#[test]
fn smtplib_messages_come_back_through_poplib() {
    let dir = TempDir::new("mail-roundtrip");
    let disk = dir.disk("mail.img", 64 << 20);
    let ns = NetNs::new("mr");
    let vm = mail_vm(&ns, &dir, &disk);
    let msgs = ["1:40", "2:102400", "3:1048576", "4:300", "5:5000"];
    let mut send = vec!["send"];
    send.extend(msgs);
    ns.client_ok(dir.path(), &vm, &send);
    let mut check = vec!["check"];
    check.extend(msgs);
    let out = ns.client_ok(dir.path(), &vm, &check);
    assert!(out.contains("checked 5 messages"), "{out}");
    // SIGTERM ends the VMM by itself (an exit status, not death by signal).
    let (status, err) = vm.stop();
    assert!(status.code().is_some(), "{status}: {err}");
}

/// Protocol errors get the RFC reply codes (503 bad sequence, 554 no
/// recipients, 500 unknown, 552 too big, 501 syntax; POP3 -ERR before
/// login and for a missing message).
#[test]
fn smtp_and_pop3_reply_codes() {
    let dir = TempDir::new("mail-codes");
    let disk = dir.disk("mail.img", 16 << 20);
    let ns = NetNs::new("mc");
    let vm = mail_vm(&ns, &dir, &disk);
    let out = ns.client_ok(dir.path(), &vm, &["codes"]);
    assert!(out.contains("codes ok"), "{out}");
}

/// Three SMTP clients at once, each sending three messages: all nine are
/// stored, none mixed up.
#[test]
fn several_smtp_clients_at_once() {
    let dir = TempDir::new("mail-parallel");
    let disk = dir.disk("mail.img", 64 << 20);
    let ns = NetNs::new("mp");
    let vm = mail_vm(&ns, &dir, &disk);
    ns.client_ok(
        dir.path(),
        &vm,
        &["parallel", "3", "1:2000", "2:30000", "3:500"],
    );
    let want: Vec<String> = (0..3)
        .flat_map(|j| {
            [(1, 2000), (2, 30000), (3, 500)].map(|(s, n)| format!("{}:{n}", s + 1000 * j))
        })
        .collect();
    let mut check = vec!["check".to_string()];
    check.extend(want);
    let check: Vec<&str> = check.iter().map(String::as_str).collect();
    let out = ns.client_ok(dir.path(), &vm, &check);
    assert!(out.contains("checked 9 messages"), "{out}");
}

/// Stop the VM and boot a new one on the same disk image: every accepted
/// message is still served; a POP3 deletion (committed at QUIT) survives
/// the next restart too.
#[test]
fn restarted_guest_serves_every_message() {
    let dir = TempDir::new("mail-restart");
    let disk = dir.disk("mail.img", 64 << 20);
    let ns = NetNs::new("ms");
    let vm = mail_vm(&ns, &dir, &disk);
    ns.client_ok(dir.path(), &vm, &["send", "1:100", "2:70000", "3:900"]);
    vm.stop();

    let vm = mail_vm(&ns, &dir, &disk);
    assert!(
        vm.console().contains("mailbox has 3 messages"),
        "{}",
        vm.console()
    );
    ns.client_ok(dir.path(), &vm, &["check", "1:100", "2:70000", "3:900"]);
    ns.client_ok(dir.path(), &vm, &["send", "4:20"]);
    ns.client_ok(dir.path(), &vm, &["dele", "2"]);
    vm.stop();

    let vm = mail_vm(&ns, &dir, &disk);
    ns.client_ok(dir.path(), &vm, &["check", "1:100", "3:900", "4:20"]);
}

/// swaks (a second real SMTP client) delivers one message.
#[test]
fn swaks_delivers_a_message() {
    let dir = TempDir::new("mail-swaks");
    let disk = dir.disk("mail.img", 16 << 20);
    let ns = NetNs::new("mw");
    let vm = mail_vm(&ns, &dir, &disk);
    let out = ns
        .command("swaks")
        .args([
            "--server",
            net::GUEST_IP,
            "--from",
            "a@test",
            "--to",
            "b@test",
            "--header",
            "Subject: from swaks",
            "--body",
            "swaks body line\n.a line with a leading dot\n",
        ])
        .output()
        .expect("running swaks (apt-get install swaks)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("<-  250 2.0.0 OK"),
        "swaks failed ({})\n{text}\n{}\n--- console ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        vm.console()
    );
    ns.client_ok(dir.path(), &vm, &["contains", ".a line with a leading dot"]);
}

/// `net-echo`: several connections at once each get their bytes back.
#[test]
fn net_echo_serves_several_connections() {
    let dir = TempDir::new("net-echo");
    let ns = NetNs::new("ne");
    let vm = Vm::start(
        &ns,
        &VmConfig {
            vmm: test_vmm(),
            cmdline: "net-echo 7",
            disk: None,
            dir: dir.path(),
            tandem_cmd: &[],
        },
        "net-echo listening",
    );
    let dir2 = dir.path().to_path_buf();
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let d = dir2.clone();
            let name = ns.name.clone();
            std::thread::spawn(move || {
                let script = d.join("mail_client.py");
                let _ = std::fs::write(&script, net::MAIL_CLIENT);
                std::process::Command::new("ip")
                    .args(["netns", "exec", &name, "python3"])
                    .arg(&script)
                    .args(["echo", "7", "20"])
                    .output()
                    .expect("python3")
            })
        })
        .collect();
    for c in clients {
        let out = c.join().expect("client thread");
        assert!(
            out.status.success(),
            "echo client failed\n{}\n{}\n--- console ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            vm.console()
        );
    }
}

/// A workload without the device it needs says so and fails (status 3):
/// `mail` without a disk (before touching the network), `net-echo`
/// without a network device.
#[test]
fn missing_devices_fail_cleanly() {
    for (cmdline, msg) in [
        ("mail", "ERROR mail needs a disk"),
        ("net-echo 7", "ERROR no virtio-net device"),
    ] {
        let out = tandem(&["run", "--cmdline", cmdline]);
        out.assert_status(3);
        assert!(out.stdout.contains(msg), "{cmdline}: {}", out.describe());
    }
}

/// Bad network options on the guest command line are rejected (status 2).
#[test]
fn bad_ip_options_are_rejected() {
    for (cmdline, msg) in [
        ("net-echo 7 ip=10.0.2.300/24", "bad ip="),
        ("net-echo 7 ip=10.0.2.15/33", "bad ip="),
        ("net-echo 7 gw=10.0.2", "bad gw="),
        ("net-echo 7 virtio-net=0xd0000100", "bad virtio-net="),
        ("net-echo 0", "PORT must be"),
    ] {
        let out = tandem(&["run", "--cmdline", cmdline]);
        out.assert_status(2);
        assert!(out.stdout.contains(msg), "{cmdline}: {}", out.describe());
    }
}
