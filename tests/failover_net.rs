//! Failover of the mail VM under one open SMTP connection (issue 10).
//!
//! Topology (all namespaces this test creates): host A runs the primary
//! (`tandem run --protect-to --net`), host B the secondary (`tandem
//! secondary --net`, its TAP held for going live); the channel goes over
//! their veth link (the `cluster::Netns` pair). Each host's TAP `tn0` is
//! bridged onto the client network (netns `C`, bridge `br0`). Both hosts
//! reach the file arbiter's directory (storage they share).
//!
//! A client on `C` (smtplib) keeps ONE SMTP session open, message after
//! message. The primary dies — `kill -9` of its process, or "both plugs
//! pulled": `kill -9` and the host's links (to B and to the client network)
//! removed at the same instant. The secondary wins the arbiter, goes live,
//! attaches the NIC to its TAP and announces the guest's MAC; the same SMTP
//! session goes on (never reset) and every message that got 250 is in the
//! mailbox afterwards, read back over POP3 from `C`. The RARP announcement
//! and the new primary's first frame are seen on `br0`; the client-visible
//! gap (kill to the next 250) is printed.
//!
//! Needs root, `ip netns` and `python3` (installed by .ci/run); a missing
//! one fails the test.

mod common;
#[path = "common/net.rs"]
mod net;

use std::time::Instant;

use common::cluster::{
    file_claims, protect, protected_mail, secondary, MailStream, Netns, Pki, Proc, ThirdHost,
};
use common::TempDir;

/// Each message's size (guest code is emulated).
const SIZE: usize = 1500;
/// Messages before the failover, and after it.
const BEFORE: usize = 3;
const AFTER: usize = 3;

#[derive(Clone, Copy, PartialEq)]
enum Death {
    Kill,
    PlugsPulled,
}

fn failover_under_smtp(tag: &str, subnet: u8, mac: &str, death: Death) {
    let hosts =
        Netns::new(tag, subnet).expect("two network namespaces joined by veth (needs root and ip)");
    let c = net::client_network(tag, &[&hosts.a, &hosts.b]);
    let sec_ip = format!("10.{subnet}.0.2");
    let pki = Pki::new(&["a", "b"], &[&sec_ip]);
    let dir = TempDir::new(tag);
    let disk_a = dir.disk("a.img", 16 << 20);
    let disk_b = dir.disk("b.img", 16 << 20);
    let arbiter_dir = dir.file("arbiter");
    std::fs::create_dir(&arbiter_dir).unwrap();
    let arbiter = format!("file:{}", arbiter_dir.display());

    let sec_serial = format!("file:{}", dir.s("sec.txt"));
    let live_serial = format!("file:{}", dir.s("live.txt"));
    let (mut pri, mut sec) = protected_mail(
        &hosts,
        &format!("{sec_ip}:0"),
        &pki,
        (&disk_a, &disk_b),
        mac,
        (
            &["--arbiter", &arbiter],
            &[
                "--arbiter",
                &arbiter,
                "--serial",
                &sec_serial,
                "--live-serial",
                &live_serial,
            ],
        ),
    );

    // The announcement's watch on the client bridge.
    let rarp = c.rarp_watch(dir.path(), mac, 1);
    let script = dir.file("mail_client.py");
    std::fs::write(&script, net::MAIL_CLIENT).unwrap();
    let mut client =
        MailStream::start(c.command("python3"), &script, SIZE, &dir.file("stop"), 1000);
    let describe = |pri: &Proc, sec: &Proc| {
        format!(
            "--- primary ---\n{}\n--- secondary ---\n{}",
            pri.describe(),
            sec.describe()
        )
    };
    client.wait_sent(BEFORE, &|| describe(&pri, &sec));

    // The primary's host dies.
    let at_kill = client.sent();
    let killed = Instant::now();
    pri.signal(libc::SIGKILL);
    if death == Death::PlugsPulled {
        // Its port on the client network and its link to B, deleted
        // (deleting one end of a veth removes both).
        net::ip(&["-n", &hosts.a, "link", "del", "cl"]);
        let link = String::from_utf8_lossy(
            &std::process::Command::new("ip")
                .args(["-n", &hosts.a, "-o", "link", "show", "type", "veth"])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned();
        for l in link.lines() {
            let name = l.split(':').nth(1).unwrap().trim();
            let name = name.split('@').next().unwrap();
            net::ip(&["-n", &hosts.a, "link", "del", name]);
        }
    }
    let st = pri.child.wait().unwrap();
    assert_eq!(st.code(), None, "{}", pri.describe());

    // The same session goes on with the new primary.
    client.wait_sent(at_kill + 1, &|| sec.describe());
    let gap = killed.elapsed();
    client.wait_sent(at_kill + AFTER, &|| sec.describe());
    // (Its stderr is read by a thread: wait for the lines, don't race it.)
    sec.wait_for("going LIVE", true);
    sec.wait_for("the NIC is attached to TAP tn0", true);
    let err = sec.err();
    let total = client.finish(&|| sec.describe());
    eprintln!(
        "{tag}: {at_kill} messages before the failover, {} after; the next 250 came {:.0} ms after the kill",
        total - at_kill,
        gap.as_secs_f64() * 1e3
    );
    for l in err
        .lines()
        .filter(|l| l.contains("failover gap") || l.contains("produced again"))
    {
        eprintln!("{tag}: {l}");
    }

    // Every message that got 250, read back from the client network.
    c.check_stream(dir.path(), total, SIZE, &sec.describe());

    // The new primary announced the guest's MAC on the client network.
    let (seen, lines) = rarp.finish();
    assert!(
        seen >= 1,
        "no RARP from {mac} on br0\n{lines}\n{}",
        sec.describe()
    );

    // The claim names the secondary.
    let claims = file_claims(&arbiter_dir);
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert!(claims[0].1.starts_with("secondary "), "{claims:?}");

    sec.signal(libc::SIGTERM);
    let (scode, _, serr) = sec.finish();
    assert_eq!(scode, 0, "{serr}");
}

#[test]
fn primary_killed_under_one_smtp_session() {
    failover_under_smtp("fonetk", 233, "52:54:00:aa:bb:41", Death::Kill);
}

#[test]
fn both_plugs_pulled_under_one_smtp_session() {
    failover_under_smtp("fonetp", 234, "52:54:00:aa:bb:42", Death::PlugsPulled);
}

/// Failover, re-protection onto a third host, a second failover, all under
/// ONE SMTP session: host A's primary killed (-9), B goes live; `tandem
/// protect --to` seeds host C (its own TAP on the client network) while the
/// session goes on; B killed (-9), C goes live. The session is never reset
/// and every message that got 250, before, between and after the two
/// failovers, is in the mailbox at the end (POP3 from the client network);
/// the claims are `V.g1` by B and `V.g2` by C.
#[test]
fn failover_reprotect_failover_under_one_smtp_session() {
    let (tag, subnet, mac) = ("fonet3", 239, "52:54:00:aa:bb:43");
    let hosts =
        Netns::new(tag, subnet).expect("two network namespaces joined by veth (needs root and ip)");
    // Host C, linked to A and B; the channel B -> C takes the B–C link.
    let third = ThirdHost::new(&hosts, tag);
    let c = net::client_network(tag, &[&hosts.a, &hosts.b, &third.ns]);
    let sec_ip = format!("10.{subnet}.0.2");
    let pki = Pki::new(&["a", "b", "c"], &[&sec_ip, &third.ip_from_b]);
    let dir = TempDir::new(tag);
    let disks = [
        dir.disk("a.img", 16 << 20),
        dir.disk("b.img", 16 << 20),
        dir.disk("c.img", 16 << 20),
    ];
    let arbiter_dir = dir.file("arbiter");
    std::fs::create_dir(&arbiter_dir).unwrap();
    let arbiter = format!("file:{}", arbiter_dir.display());
    let b_sock = dir.s("b.sock");
    let serial = |n: &str| format!("file:{}", dir.s(n));
    let (b_serial, b_live) = (serial("b.txt"), serial("b-live.txt"));
    let (mut a, mut b) = protected_mail(
        &hosts,
        &format!("{sec_ip}:0"),
        &pki,
        (&disks[0], &disks[1]),
        mac,
        (
            &["--arbiter", &arbiter],
            &[
                "--arbiter",
                &arbiter,
                "--serial",
                &b_serial,
                "--live-serial",
                &b_live,
                "--api-socket",
                &b_sock,
            ],
        ),
    );
    let script = dir.file("mail_client.py");
    std::fs::write(&script, net::MAIL_CLIENT).unwrap();
    let mut client =
        MailStream::start(c.command("python3"), &script, SIZE, &dir.file("stop"), 1000);
    let describe = |p: &[&Proc]| {
        p.iter()
            .map(|p| p.describe())
            .collect::<Vec<_>>()
            .join("\n------\n")
    };
    client.wait_sent(BEFORE, &|| describe(&[&a, &b]));

    // First failover: A dies, B goes live.
    let rarp = c.rarp_watch(dir.path(), mac, 1);
    let at_kill = client.sent();
    a.signal(libc::SIGKILL);
    let _ = a.child.wait();
    b.wait_for("going LIVE", true);
    b.wait_for("serves the live VM now", true);
    client.wait_sent(at_kill + 1, &|| b.describe());
    assert!(rarp.finish().0 >= 1, "no RARP from B\n{}", b.describe());

    // Re-protection onto C while the session goes on.
    let px = ["ip", "netns", "exec", third.ns.as_str()];
    let (c_serial, c_live) = (serial("c.txt"), serial("c-live.txt"));
    let listen = format!("{}:0", third.ip_from_b);
    let (mut cc, c_addr) = secondary(
        &px,
        &listen,
        &pki.creds("c"),
        &[
            "--disk",
            common::arg(&disks[2]),
            "--net",
            "tap=tn0",
            "--arbiter",
            &arbiter,
            "--serial",
            &c_serial,
            "--live-serial",
            &c_live,
        ],
    );
    let (code, out, err) = protect(&b_sock, &c_addr, &pki.creds("b"), &["--arbiter", &arbiter]);
    assert_eq!(code, 0, "{out}{err}\n{}", describe(&[&b, &cc]));
    assert!(out.contains("protected by c"), "{out}");
    let reprotected = client.sent();
    client.wait_sent(reprotected + 2, &|| describe(&[&b, &cc]));

    // Second failover: B dies, C goes live.
    let rarp = c.rarp_watch(dir.path(), mac, 1);
    let at_kill2 = client.sent();
    b.signal(libc::SIGKILL);
    let _ = b.child.wait();
    cc.wait_for("going LIVE", true);
    cc.wait_for("the NIC is attached to TAP tn0", true);
    client.wait_sent(at_kill2 + AFTER, &|| cc.describe());
    let total = client.finish(&|| cc.describe());
    assert!(rarp.finish().0 >= 1, "no RARP from C\n{}", cc.describe());
    eprintln!(
        "{tag}: {at_kill} messages before the first failover, {} between, {} after the second",
        at_kill2 - at_kill,
        total - at_kill2
    );

    // Every message that got 250, read back from the client network.
    c.check_stream(dir.path(), total, SIZE, &cc.describe());

    // Generation 1 went to B, generation 2 to C.
    let claims = file_claims(&arbiter_dir);
    assert_eq!(claims.len(), 2, "{claims:?}");
    assert!(claims[0].0.ends_with(".g1.claim"), "{claims:?}");
    assert!(claims[0].1.starts_with("secondary b "), "{claims:?}");
    assert!(claims[1].0.ends_with(".g2.claim"), "{claims:?}");
    assert_eq!(
        claims[1].1,
        format!("secondary c (pid {})", cc.pid()),
        "{claims:?}"
    );
    cc.signal(libc::SIGTERM);
    let (code, _, err) = cc.finish();
    assert_eq!(code, 0, "{err}");
}
