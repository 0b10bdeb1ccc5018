//! Network frames under the Output Rule: the mail VM protected from boot.
//!
//! Topology (all namespaces this test creates): host A runs the primary
//! (`tandem run --protect-to`), host B the secondary (`tandem secondary
//! --net`); the channel goes over their veth link (the `cluster::Netns`
//! pair). Each host's TAP `tn0` is bridged onto the client network (netns
//! `C`, bridge `br0`, 10.0.2.2/24). A client on `C` (smtplib, poplib)
//! sends and reads mail as without protection, and a capture on `br0`
//! records every frame from the guest's MAC with its arrival time.
//!
//! Checked from both sides' records, not assumed: each captured frame is a
//! frame the primary released (its `--output-log` line, same hash), whose
//! `Output` entry ends at the offset that line names in the primary's kept
//! log (which is byte for byte the log the secondary received), and the
//! secondary's `--ack-log` shows an acknowledgement covering that offset
//! sent before the frame's release. With the secondary SIGSTOPped the
//! guest keeps answering (its kept log grows by sent frames) but not one
//! frame reaches the client until SIGCONT. The secondary's TAP never
//! receives a frame from its VMM; its final digest is the primary's.
//!
//! Needs root, `ip netns` and `python3` (installed by .ci/run); a missing
//! one fails the test.

mod common;
#[path = "common/net.rs"]
mod net;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{
    collect, final_digest as digest, protected_mail, wait_exit, Netns, Pki, Proc,
};
use common::{TempDir, TIMEOUT};
use recordlog::{Entry, LogReader, OutputKind, OutputRecord};

const MAC: &str = "52:54:00:aa:bb:31";

/// Print `listening`, then `NS HEX` for every frame from MAC on IF until
/// the file STOP exists.
const CAPTURE: &str = r#"
import os, socket, sys, time
ifname, mac, stop = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((ifname, 0))
s.settimeout(0.05)
print("listening", flush=True)
while not os.path.exists(stop):
    try:
        f = s.recv(65536)
    except socket.timeout:
        continue
    t = time.time_ns()
    if f[6:12].hex(":") == mac:
        print(t, f.hex(), flush=True)
"#;

fn lines(buf: &Arc<Mutex<Vec<u8>>>) -> Vec<String> {
    String::from_utf8_lossy(&buf.lock().unwrap())
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Captured frames: (arrival ns, bytes).
fn captured(buf: &Arc<Mutex<Vec<u8>>>) -> Vec<(u64, Vec<u8>)> {
    lines(buf)
        .iter()
        .filter_map(|l| {
            let (t, hex) = l.split_once(' ')?;
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            Some((t.parse().ok()?, bytes))
        })
        .collect()
}

/// Sent frames in the (possibly growing) log at PATH: (record, offset just
/// past its entry), as far as the log can be read.
fn logged_frames(path: &str) -> Vec<(OutputRecord, u64)> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let Ok((mut r, _)) = LogReader::open(std::io::BufReader::new(f)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Ok(Some(e)) = r.next_entry() {
        if let Entry::Output { output, .. } = e {
            if output.kind == OutputKind::NetFrame {
                out.push((output, r.offset()));
            }
        }
    }
    out
}

fn json_lines(path: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{path}: {e}: {l}")))
        .collect()
}

fn tap_counter(ns: &str, what: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/sys/class/net/tn0/statistics/{what}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[track_caller]
fn wait_until(what: &str, procs: &mut [&mut Proc], mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        for p in procs.iter_mut() {
            assert!(
                !p.ended(),
                "ended while waiting for {what}\n{}",
                p.describe()
            );
        }
        assert!(start.elapsed() < TIMEOUT, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn protected_mail_frames_wait_for_the_secondary() {
    let hosts = Netns::new("locknet", 231)
        .expect("two network namespaces joined by veth (needs root and ip)");
    let c = net::client_network("locknet", &[&hosts.a, &hosts.b]);
    let pki = Pki::new(&["a", "b"], &["10.231.0.2"]);
    let dir = TempDir::new("lockstep-net");
    let disk_a = dir.disk("a.img", 16 << 20);
    let disk_b = dir.disk("b.img", 16 << 20);
    let (pri_log, sec_log) = (dir.s("pri.log"), dir.s("sec.log"));
    let (out_log, ack_log) = (dir.s("outputs.jsonl"), dir.s("acks.jsonl"));
    let stop_capture = dir.s("stop-capture");

    let mut capture = c
        .command("python3")
        .args(["-c", CAPTURE, "br0", MAC, &stop_capture])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let cap_out = collect(capture.stdout.take().unwrap());
    let start = Instant::now();
    while !lines(&cap_out).iter().any(|l| l == "listening") {
        assert!(start.elapsed() < TIMEOUT, "the capture never started");
        std::thread::sleep(Duration::from_millis(10));
    }

    let sec_serial = format!("file:{}", dir.s("sec.txt"));
    let (mut pri, sec) = protected_mail(
        &hosts,
        "10.231.0.2:0",
        &pki,
        (&disk_a, &disk_b),
        MAC,
        (
            &[
                "--keep-log",
                &pri_log,
                "--output-log",
                &out_log,
                // The secondary is stopped on purpose below: not a failover.
                "--failover-timeout-ms",
                "600000",
            ],
            &[
                "--log",
                &sec_log,
                "--ack-log",
                &ack_log,
                "--serial",
                &sec_serial,
            ],
        ),
    );

    // Mail as without protection.
    let first = ["1:300", "2:5000", "3:40"];
    let mut send = vec!["send"];
    send.extend(first);
    let out = c.client(dir.path(), &send);
    assert!(
        out.status.success(),
        "SMTP failed\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        pri.describe(),
        sec.describe()
    );

    // The secondary stopped: the guest answers (its sent frames enter the
    // log) but none reaches the client.
    sec.signal(libc::SIGSTOP);
    let frames_before = captured(&cap_out).len();
    let logged_before = logged_frames(&pri_log).len();
    let script = dir.file("mail_client.py");
    let mut late = c
        .command("python3")
        .arg(&script)
        .args(["send", "4:700"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let late_err = collect(late.stderr.take().unwrap());
    wait_until(
        "the guest sending while the secondary is stopped",
        &mut [&mut pri],
        || logged_frames(&pri_log).len() > logged_before,
    );
    // Frames leave at once when not held: give a leak time to show.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        captured(&cap_out).len(),
        frames_before,
        "frames reached the client while the secondary was stopped"
    );
    assert!(late.try_wait().unwrap().is_none(), "the client finished");
    sec.signal(libc::SIGCONT);
    let st = wait_exit(&mut late, "the late client never ended");
    assert!(
        st.success(),
        "the late SMTP session failed\n{}",
        String::from_utf8_lossy(&late_err.lock().unwrap())
    );

    let mut check = vec!["check"];
    check.extend(first);
    check.push("4:700");
    let out = c.client(dir.path(), &check);
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && got.contains("checked 4 messages"),
        "POP3 check failed\n{got}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    pri.signal(libc::SIGTERM);
    let (pcode, _, perr) = pri.finish();
    let (scode, _, serr) = sec.finish();
    let both = format!("--- primary ---\n{perr}\n--- secondary ---\n{serr}");
    assert_eq!(pcode, 0, "{both}");
    assert_eq!(scode, 0, "{both}");
    assert!(serr.contains("replay verified"), "{both}");
    assert_eq!(digest(&perr), digest(&serr), "{both}");
    if let Some(l) = perr.lines().find(|l| l.contains("protected run ended")) {
        eprintln!("{l}");
    }
    std::fs::write(&stop_capture, b"").unwrap();
    let _ = capture.wait();
    std::thread::sleep(Duration::from_millis(50));

    // The secondary's VMM never wrote to its TAP (frames a VMM writes are
    // the TAP's rx); the primary's did.
    assert_eq!(
        tap_counter(&hosts.b, "rx_packets"),
        0,
        "the secondary emitted"
    );
    assert!(tap_counter(&hosts.a, "rx_packets") > 0);

    // The records.
    assert!(
        std::fs::read(&pri_log).unwrap() == std::fs::read(&sec_log).unwrap(),
        "the secondary received another log than the primary kept"
    );
    let logged = logged_frames(&pri_log);
    let releases: Vec<_> = json_lines(&out_log)
        .into_iter()
        .filter(|v| v["kind"] == "net")
        .collect();
    let acks = json_lines(&ack_log);
    assert_eq!(
        releases.len(),
        logged.len(),
        "every sent frame was released"
    );
    let entry_ends: HashMap<u64, OutputRecord> = logged.iter().map(|(r, o)| (*o, *r)).collect();
    // The released frames of each hash, in release order.
    let mut by_hash: HashMap<String, Vec<&serde_json::Value>> = HashMap::new();
    for r in &releases {
        let end = r["entry_end"].as_u64().unwrap();
        let rec = entry_ends
            .get(&end)
            .unwrap_or_else(|| panic!("no Output entry ends at {end}: {r}"));
        assert_eq!(format!("{:016x}", rec.hash), r["hash"].as_str().unwrap());
        let released = r["released_ns"].as_u64().unwrap();
        let ack = acks
            .iter()
            .find(|a| a["offset"].as_u64().unwrap() >= end)
            .unwrap_or_else(|| panic!("the secondary never acknowledged {end}"));
        assert!(
            ack["sent_ns"].as_u64().unwrap() <= released,
            "released before the secondary acknowledged it: {r} {ack}"
        );
        by_hash
            .entry(r["hash"].as_str().unwrap().to_string())
            .or_default()
            .push(r);
    }
    let frames = captured(&cap_out);
    assert!(frames.len() > 20, "{} frames captured", frames.len());
    let mut taken: HashMap<String, usize> = HashMap::new();
    for (t, bytes) in &frames {
        let h = format!(
            "{:016x}",
            OutputRecord::of(OutputKind::NetFrame, bytes).hash
        );
        let k = taken.entry(h.clone()).or_default();
        let r = by_hash
            .get(&h)
            .and_then(|v| v.get(*k))
            .unwrap_or_else(|| panic!("a frame reached the client that was never released: {h}"));
        *k += 1;
        assert!(r["released_ns"].as_u64().unwrap() <= *t, "{r} seen at {t}");
    }
    let lat: Vec<u64> = releases
        .iter()
        .map(|r| r["released_ns"].as_u64().unwrap() - r["emitted_ns"].as_u64().unwrap())
        .collect();
    eprintln!(
        "{} frames captured, {} released, {} acknowledgements; added latency max {:.2} ms",
        frames.len(),
        releases.len(),
        acks.len(),
        *lat.iter().max().unwrap() as f64 / 1e6
    );
}
