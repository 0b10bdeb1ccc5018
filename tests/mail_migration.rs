//! The mail VM migrated between two hosts while a client keeps sending.
//!
//! Topology (all namespaces this test creates): a client network (netns
//! `C`, bridge `br0` with 10.0.2.2/24); two hosts A and B (the
//! `cluster::Netns` pair, whose veth link carries the migration), each
//! with a TAP `tn0` for the VM on a bridge of its own that a veth pair
//! joins to `br0`. The guest (10.0.2.15) runs `mail` on A; one smtplib
//! session from C sends message after message while the VM moves to B
//! (memory and disk: the receiver has its own `--disk`). The connection is
//! never reset, every accepted message is read back over POP3 from C byte
//! for byte, and the destination's RARP announcement of the guest's MAC
//! is seen on `br0`.
//!
//! Needs root, `ip netns` and `python3` (installed by .ci/run); a missing
//! one fails the test.

mod common;
#[path = "common/net.rs"]
mod net;

use common::cluster::{migrate, receiver, source, MailStream, Netns, Pki, Proc};
use common::{arg, TempDir};

const MAC: &str = "52:54:00:aa:bb:19";
/// Each message's size: a few KiB (guest code is emulated).
const SIZE: usize = 2000;
/// Messages before the migration and after it.
const BEFORE: usize = 10;
const AFTER: usize = 10;
/// The destination's announcement rounds (QEMU's default count).
const ROUNDS: usize = 5;

#[test]
fn mail_vm_migrates_under_one_smtp_session() {
    let hosts = Netns::new("mailmig", 227)
        .expect("two network namespaces joined by veth (needs root and ip)");
    let c = net::client_network("mail", &[&hosts.a, &hosts.b]);
    let pki = Pki::new(&["a", "b"], &["10.227.0.2"]);
    let dir = TempDir::new("mail-migration");
    let disk_a = dir.disk("a.img", 16 << 20);
    let disk_b = dir.file("b.img");
    let sock = dir.s("a.sock");
    let pa = ["ip", "netns", "exec", hosts.a.as_str()];
    let pb = ["ip", "netns", "exec", hosts.b.as_str()];

    let (mut dst, addr) = receiver(
        &pb,
        "10.227.0.2:0",
        &pki.creds("b"),
        &[
            "--serial",
            "null",
            "--net",
            "tap=tn0",
            "--disk",
            arg(&disk_b),
        ],
    );
    let mut src = source(
        &pa,
        &sock,
        "mail",
        &[
            "--net",
            &format!("tap=tn0,mac={MAC}"),
            "--disk",
            arg(&disk_a),
        ],
    );
    src.wait_for("mail ready", false);

    // The RARP watch on the client bridge, from before the migration:
    // every round the destination announces.
    let rarp = c.rarp_watch(dir.path(), MAC, ROUNDS);

    // One SMTP session from the client network, sending until told to stop.
    let script = dir.file("mail_client.py");
    std::fs::write(&script, net::MAIL_CLIENT).unwrap();
    let mut client =
        MailStream::start(c.command("python3"), &script, SIZE, &dir.file("stop"), 1000);
    let both = |src: &Proc, dst: &Proc| {
        format!(
            "--- source ---\n{}\n--- destination ---\n{}",
            src.describe(),
            dst.describe()
        )
    };
    client.wait_sent(BEFORE, &|| both(&src, &dst));

    let at_start = client.sent();
    let (code, out, err) = migrate(&sock, &addr, &pki.creds("a"), &[]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", dst.describe());
    dst.wait_for("running it", true);
    let at_end = client.sent();
    client.wait_sent(at_end + AFTER, &|| both(&src, &dst));
    let total = client.finish(&|| both(&src, &dst));
    eprintln!(
        "messages: {at_start} before the migration, {} during it, {} after; {total} in all",
        at_end - at_start,
        total - at_end
    );

    // Every accepted message, read back over POP3 from the client network.
    c.check_stream(dir.path(), total, SIZE, &dst.describe());

    // The receiver's own image is the one the guest uses now.
    assert_eq!(std::fs::metadata(&disk_b).unwrap().len(), 16 << 20);

    // The client network forwards the guest's frames to the new host: the
    // client bridge's entry for the guest's MAC is the port towards B.
    let port = c.fdb_port("br0", MAC);
    assert_eq!(
        port.as_deref(),
        Some("h1"),
        "br0's forwarding entry for {MAC} after the migration\n{}",
        dst.describe()
    );
    // The destination announced the guest's MAC on the client network.
    let (from_guest, lines) = rarp.finish();
    eprintln!("RARP rounds from {MAC} seen on br0: {from_guest} of {ROUNDS}");
    // At least one round reached the client bridge. The destination
    // writes all five to its TAP (tests/net_device.rs counts them there);
    // whether every one always crosses both bridges under load is still
    // open (docs/migration.md, protocol step 4), so one is required here.
    assert!(
        from_guest >= 1,
        "RARP frames from {MAC} on br0: {from_guest}\n{lines}\n--- destination ---\n{}",
        dst.describe()
    );

    let (scode, _, serr) = src.finish();
    assert_eq!(scode, 0, "{serr}");
    dst.signal(libc::SIGTERM);
    let (dcode, _, derr) = dst.finish();
    assert_eq!(dcode, 0, "{derr}");
}
