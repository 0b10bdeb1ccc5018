//! Live migration: Tandem against QEMU on this machine, side by side, over
//! loopback and over an emulated WAN.
//!
//! `cargo bench --bench migrate [-- FILTER...]`: with filters, only the
//! cases whose label contains one of them run (e.g. `-- loopback`,
//! `-- wan`, `-- "100mbit"`, `-- fill`); env `TANDEM_BENCH_CASES` (comma
//! separated) does the same. `TANDEM_BENCH_REPEAT=R` runs each case R
//! times and reports the median (default 3 over loopback, 1 over the WAN;
//! the whole bench takes a few minutes).
//!
//! Both VMMs run the same guest image (the built-in test guest, written out
//! by the hidden `tandem guest-elf` and booted by QEMU through PVH with
//! `-kernel`), with 64 MiB of RAM, running a workload during the migration:
//! `dirty PAGES` (one word of each of PAGES pages rewritten in a loop: the
//! pages compress to a few bytes) or `fill PAGES` (every byte of each page
//! rewritten with random data each round: incompressible, like a real
//! guest's memory); 256 pages = 1 MiB, 8192 = 32 MiB working set. The
//! migration starts once the guest has printed `round 3` (`round 1` for
//! `fill 8192`, whose rounds take seconds on this emulated host).
//!
//! Links:
//! * **loopback**: source and destination processes on this host, 30 ms
//!   downtime target, no bandwidth cap.
//! * **wan**: source in one network namespace, destination in another,
//!   joined by `tandem-wan` (tests/wan/README.md: MTU 9000, 64 MiB TCP
//!   buffers) at 150 ms RTT, 0% or 1% loss each way, a 1 Gbit/s or
//!   100 Mbit/s bottleneck; a 100 ms downtime target for both VMMs (75 ms
//!   of it is the one-way trip that no switchover can avoid); each link
//!   runs all four workloads (1 MiB and 32 MiB, `dirty` and `fill`).
//!
//! Both are timed the same way, by this bench: **total** from the
//! migration command to the destination running the guest, **downtime**
//! from the guest's stop on the source to its start on the destination.
//! What each VMM reports of itself is printed below its row.
//!
//! * **Tandem**: `tandem run --api-socket` → `tandem migrate --json` →
//!   `tandem receive` (QUIC + mutual TLS). Total: from spawning `tandem
//!   migrate` to the receiver's `VM received ... running it` line on its
//!   stderr (read as it comes). Downtime: its summary's (the guest's stop
//!   on the source to the destination's `Running` arriving back, minus half
//!   the smallest round trip QUIC saw). Bytes: UDP payload bytes the source
//!   sent (QUIC, TLS and the handshake included).
//! * **QEMU** (Debian's `qemu-system-x86`, installed with apt if missing):
//!   `-enable-kvm -cpu max,-arch-capabilities -nodefaults`, migration with
//!   QMP `migrate` to `-incoming tcp:` with the same `downtime-limit` and
//!   `max-bandwidth` unlimited. Total: from the QMP `migrate` command to
//!   the timestamp of the destination's `RESUME` event; downtime: from the
//!   source's `STOP` event to the destination's `RESUME` (QMP timestamps,
//!   the host's clock: both run on this host). QEMU's own `total-time` and
//!   `downtime` stop when its source has written the last byte to its
//!   socket, which with 64 MiB TCP buffers over a 150 ms link can be long
//!   before the bytes arrive. Bytes: `ram.transferred` (RAM payload only:
//!   no TCP/IP headers, no device state).

#[path = "../tests/common/wan.rs"]
mod wan;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wan::{Wan, WanLink};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");
/// Subnet of the WAN namespaces (10.S.0.1 source, 10.S.0.2 destination).
const WAN_SUBNET: u8 = 230;
const WAN_DST: &str = "10.230.0.2";

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    /// From the migration command to the destination running the guest.
    total_ms: f64,
    /// The guest's pause: stopped on the source to running on the
    /// destination.
    downtime_ms: f64,
    bytes: f64,
    /// What the VMM itself reports (QEMU's `total-time` and `downtime`
    /// end when its source has written the last byte to its socket).
    own_total_ms: f64,
    own_downtime_ms: f64,
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_file_contains(path: &Path, needle: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

fn wait_path(path: &Path, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

fn free_port() -> u16 {
    let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

/// What one case runs: the guest's workload, when to start, over which link.
struct Case {
    label: String,
    cmdline: String,
    marker: &'static str,
    downtime_ms: u32,
    /// `None`: loopback.
    link: Option<WanLink>,
}

/// Where the two hosts are: loopback, or the namespaces of a WAN.
#[derive(Clone, Copy)]
enum Net<'a> {
    Loopback,
    Wan(&'a Wan),
}

impl Net<'_> {
    /// (source prefix, destination prefix, destination IP)
    fn hosts(&self) -> (Vec<String>, Vec<String>, String) {
        match self {
            Net::Loopback => (vec![], vec![], "127.0.0.1".into()),
            Net::Wan(w) => (
                w.in_a().iter().map(|s| s.to_string()).collect(),
                w.in_b().iter().map(|s| s.to_string()).collect(),
                w.ip_b.clone(),
            ),
        }
    }
}

/// `prog` run through `prefix` (e.g. `ip netns exec NS`).
fn command(prefix: &[String], prog: &str) -> Command {
    match prefix.split_first() {
        None => Command::new(prog),
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(prog);
            c
        }
    }
}

fn tandem_once(dir: &Path, net: Net, case: &Case) -> Sample {
    let pki = dir.join("pki");
    if !pki.join("b.pem").exists() {
        let d = pki.to_str().unwrap();
        for args in [
            vec!["certs", "init", "--dir", d],
            vec!["certs", "issue", "--dir", d, "--name", "a"],
            vec![
                "certs", "issue", "--dir", d, "--name", "b", "--san", WAN_DST,
            ],
        ] {
            assert!(Command::new(TANDEM)
                .args(&args)
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success());
        }
    }
    let creds = |h: &str| {
        vec![
            "--ca".to_string(),
            pki.join("ca.pem").to_string_lossy().into_owned(),
            "--cert".into(),
            pki.join(format!("{h}.pem")).to_string_lossy().into_owned(),
            "--key".into(),
            pki.join(format!("{h}.key")).to_string_lossy().into_owned(),
        ]
    };
    let (in_src, in_dst, dst_ip) = net.hosts();
    let listen = format!("{dst_ip}:{}", free_port());
    let mut dst = Kill(
        command(&in_dst, TANDEM)
            .args(["receive", "--listen", &listen, "--serial", "null"])
            .args(creds("b"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // When the destination runs the VM: its "VM received ... running it"
    // line, timed as it arrives.
    let (running_tx, running_rx) = std::sync::mpsc::channel::<Instant>();
    let dst_err = dst.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(dst_err).lines().map_while(Result::ok) {
            if line.contains("VM received from") {
                let _ = running_tx.send(Instant::now());
            }
        }
    });
    let sock = dir.join("t.sock");
    let out = dir.join("t.out");
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&sock);
    let _src = Kill(
        command(&in_src, TANDEM)
            .args(["run", "--cmdline", &case.cmdline])
            .arg("--api-socket")
            .arg(&sock)
            .arg("--serial")
            .arg(format!("file:{}", out.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_path(&sock, Duration::from_secs(30)), "no API socket");
    assert!(
        wait_file_contains(&out, case.marker, Duration::from_secs(120)),
        "guest did not start"
    );
    std::thread::sleep(Duration::from_millis(50)); // the receiver is listening by now
    let requested = Instant::now();
    let o = Command::new(TANDEM)
        .args(["migrate", "--json", "--api"])
        .arg(&sock)
        .args(["--to", &listen])
        .args(["--downtime-ms", &case.downtime_ms.to_string()])
        .args(creds("a"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let Some(done) = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "done")
    else {
        let err = String::from_utf8_lossy(&o.stderr);
        println!("{:<28} tandem migrate failed: {}", "", err.trim());
        return Sample {
            total_ms: f64::NAN,
            downtime_ms: f64::NAN,
            bytes: f64::NAN,
            own_total_ms: f64::NAN,
            own_downtime_ms: f64::NAN,
        };
    };
    let running = running_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the destination never said it runs the VM");
    Sample {
        total_ms: ms(running.saturating_duration_since(requested)),
        downtime_ms: done["downtime_ms"].as_f64().unwrap(),
        bytes: done["bytes_on_wire"].as_f64().unwrap(),
        own_total_ms: done["total_ms"].as_f64().unwrap(),
        own_downtime_ms: done["downtime_ms"].as_f64().unwrap(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Seconds since the epoch of a QMP event's `timestamp`.
fn event_time(v: &serde_json::Value) -> f64 {
    let t = &v["timestamp"];
    t["seconds"].as_f64().unwrap_or(f64::NAN)
        + t["microseconds"].as_f64().unwrap_or(f64::NAN) * 1e-6
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// Events received so far (`STOP`, `RESUME`, ... with their timestamps).
    events: Vec<serde_json::Value>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        assert!(wait_path(path, Duration::from_secs(30)), "no QMP socket");
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(30) => panic!("QMP: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            events: Vec::new(),
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting).unwrap();
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn cmd(&mut self, c: &str) -> serde_json::Value {
        self.w.write_all(c.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap() == 0 {
                panic!("QMP closed");
            }
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("return").is_some() {
                return v["return"].clone();
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {c}: {e}");
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// The time (seconds since the epoch) of the last event `name` seen.
    fn event(&self, name: &str) -> Option<f64> {
        self.events
            .iter()
            .rev()
            .find(|e| e["event"] == name)
            .map(event_time)
    }
}

fn qemu_args(elf: &Path, cmdline: &str) -> Vec<String> {
    [
        "-enable-kvm",
        "-cpu",
        "max,-arch-capabilities",
        "-m",
        "64",
        "-nodefaults",
        "-display",
        "none",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
        "-no-reboot",
        "-kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        elf.to_string_lossy().into_owned(),
        "-append".into(),
        cmdline.to_string(),
    ])
    .collect()
}

/// One QEMU migration; `Err` says why QEMU gave no figures (it failed, or
/// never converged: its row then says so and the bench goes on).
fn qemu_once(dir: &Path, elf: &Path, net: Net, case: &Case) -> Result<Sample, String> {
    let (in_src, in_dst, dst_ip) = net.hosts();
    let incoming = format!("tcp:{dst_ip}:{}", free_port());
    let (src_qmp, dst_qmp) = (dir.join("qs.qmp"), dir.join("qd.qmp"));
    let out = dir.join("q.out");
    for p in [&src_qmp, &dst_qmp, &out] {
        let _ = std::fs::remove_file(p);
    }
    let _dst = Kill(
        command(&in_dst, "qemu-system-x86_64")
            .args(qemu_args(elf, &case.cmdline))
            .args(["-serial", "null", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", dst_qmp.display()))
            .arg("-incoming")
            .arg(&incoming)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _src = Kill(
        command(&in_src, "qemu-system-x86_64")
            .args(qemu_args(elf, &case.cmdline))
            .arg("-serial")
            .arg(format!("file:{}", out.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", src_qmp.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut dq = Qmp::connect(&dst_qmp);
    let mut q = Qmp::connect(&src_qmp);
    q.cmd(&format!(
        r#"{{"execute":"migrate-set-parameters","arguments":{{"downtime-limit":{},"max-bandwidth":100000000000}}}}"#,
        case.downtime_ms
    ));
    assert!(
        // The guest runs about ten times slower under QEMU here: `fill
        // 8192`'s first round takes minutes on a loaded host.
        wait_file_contains(&out, case.marker, Duration::from_secs(600)),
        "QEMU guest did not print {:?} within 600 s",
        case.marker
    );
    let requested = now_epoch();
    q.cmd(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"{incoming}"}}}}"#
    ));
    let start = Instant::now();
    loop {
        let v = q.cmd(r#"{"execute":"query-migrate"}"#);
        match v["status"].as_str() {
            Some("completed") => {
                // QEMU's own figures end at its source; the guest runs
                // when the destination says RESUME (same host clock).
                let resumed = loop {
                    let st = dq.cmd(r#"{"execute":"query-status"}"#);
                    if st["status"] == "running" {
                        if let Some(t) = dq.event("RESUME") {
                            break t;
                        }
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(180),
                        "QEMU's destination never ran: {st}"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                };
                let stopped = q.event("STOP").expect("QEMU's source sent no STOP event");
                return Ok(Sample {
                    total_ms: (resumed - requested) * 1e3,
                    downtime_ms: (resumed - stopped) * 1e3,
                    bytes: v["ram"]["transferred"].as_f64().unwrap_or(0.0),
                    own_total_ms: v["total-time"].as_f64().unwrap_or(0.0),
                    own_downtime_ms: v["downtime"].as_f64().unwrap_or(0.0),
                });
            }
            Some("failed") | Some("cancelled") => {
                return Err(format!("QEMU's migration failed: {v}"))
            }
            _ => {}
        }
        if start.elapsed() > Duration::from_secs(180) {
            q.cmd(r#"{"execute":"migrate_cancel"}"#);
            return Err(format!(
                "QEMU's migration did not converge within 180 s ({} of RAM sent, status {})",
                v["ram"]["transferred"], v["status"]
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn median(mut v: Vec<Sample>) -> Sample {
    let pick = |f: fn(&Sample) -> f64, v: &mut Vec<Sample>| {
        v.sort_by(|a, b| f(a).total_cmp(&f(b)));
        f(&v[v.len() / 2])
    };
    Sample {
        total_ms: pick(|s| s.total_ms, &mut v),
        downtime_ms: pick(|s| s.downtime_ms, &mut v),
        bytes: pick(|s| s.bytes, &mut v),
        own_total_ms: pick(|s| s.own_total_ms, &mut v),
        own_downtime_ms: pick(|s| s.own_downtime_ms, &mut v),
    }
}

fn ensure_qemu() -> bool {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    eprintln!("installing qemu-system-x86 with apt ...");
    let ok = Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86",
        ])
        .status()
        .is_ok_and(|s| s.success());
    ok && Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok()
}

/// Every case, in order: loopback first, then the WAN.
fn cases() -> Vec<Case> {
    let workloads = |kinds: &[&str]| {
        let mut v = Vec::new();
        for kind in kinds {
            for (pages, size) in [(256u32, "1 MiB"), (8192, "32 MiB")] {
                let marker = if *kind == "fill" && pages > 256 {
                    "round 1\n"
                } else {
                    "round 3\n"
                };
                v.push((
                    format!("{size} {kind}"),
                    format!("{kind} {pages} 1000000"),
                    marker,
                ));
            }
        }
        v
    };
    let mut cases = Vec::new();
    for (what, cmdline, marker) in workloads(&["dirty", "fill"]) {
        cases.push(Case {
            label: format!("loopback {what}"),
            cmdline,
            marker,
            downtime_ms: 30,
            link: None,
        });
    }
    for rate in ["1gbit", "100mbit"] {
        for loss in ["0%", "1%"] {
            for (what, cmdline, marker) in workloads(&["dirty", "fill"]) {
                cases.push(Case {
                    label: format!("wan {rate} {loss} {what}"),
                    cmdline,
                    marker,
                    downtime_ms: 100,
                    link: Some(WanLink {
                        seed: 8,
                        ..WanLink::new(150.0, loss, Some(rate))
                    }),
                });
            }
        }
    }
    cases
}

fn main() {
    // `cargo bench` passes --bench; other words are filters.
    let mut filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if let Ok(f) = std::env::var("TANDEM_BENCH_CASES") {
        filters.extend(
            f.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        );
    }
    let repeat_env: Option<usize> = std::env::var("TANDEM_BENCH_REPEAT")
        .ok()
        .and_then(|s| s.parse().ok());
    let dir = std::env::temp_dir().join(format!("tandem-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let elf: PathBuf = dir.join("guest.elf");
    assert!(Command::new(TANDEM)
        .args(["guest-elf", "--out"])
        .arg(&elf)
        .status()
        .unwrap()
        .success());
    let qemu = ensure_qemu();
    if !qemu {
        eprintln!("QEMU is not available: only Tandem's numbers are shown");
    }
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.label.contains(f.as_str())))
        .collect();
    println!(
        "live migration, 64 MiB guest, working set being rewritten; loopback: 30 ms target; \
         wan: 150 ms RTT via tandem-wan, 100 ms target"
    );
    println!(
        "{:<28} {:>12} {:>12} {:>14} | {:>12} {:>12} {:>14}",
        "case (median of N)",
        "tandem total",
        "downtime",
        "bytes",
        "qemu total",
        "downtime",
        "bytes"
    );
    let mut notes = Vec::new();
    let mut wan: Option<(String, Wan)> = None;
    for case in &cases {
        let net = match &case.link {
            None => Net::Loopback,
            Some(link) => {
                let key = format!("{link:?}");
                if wan.as_ref().is_none_or(|(k, _)| *k != key) {
                    // Tear the previous one down before the next takes its subnet.
                    drop(wan.take());
                    let w = Wan::new(WAN_SUBNET, link)
                        .unwrap_or_else(|e| panic!("setting up the WAN: {e}"));
                    wan = Some((key, w));
                }
                Net::Wan(&wan.as_ref().unwrap().1)
            }
        };
        let repeat = repeat_env.unwrap_or(if case.link.is_some() { 1 } else { 3 });
        // What the WAN dropped during one VMM's runs.
        let drops = |run: &mut dyn FnMut() -> Result<Sample, String>| {
            let before = wan.as_ref().map(|(_, w)| w.counters());
            let s = (0..repeat)
                .map(|_| run())
                .collect::<Result<Vec<_>, _>>()
                .map(median);
            let after = wan.as_ref().map(|(_, w)| w.counters());
            let d = match (before, after) {
                (Some(b), Some(a)) => format!(
                    " (WAN dropped {} lost + {} queue full)",
                    wan::counter(&a, "lost") - wan::counter(&b, "lost"),
                    wan::counter(&a, "queue_full") - wan::counter(&b, "queue_full")
                ),
                _ => String::new(),
            };
            (s, d)
        };
        let (t, t_drops) = drops(&mut || Ok(tandem_once(&dir, net, case)));
        let t = t.expect("tandem_once has no Err");
        let q = qemu.then(|| drops(&mut || qemu_once(&dir, &elf, net, case)));
        let (q, q_drops) = match q {
            Some((Ok(s), d)) => (Some(s), d),
            Some((Err(e), d)) => {
                notes.push(format!("{}: no QEMU figures: {e}", case.label));
                (None, d)
            }
            None => (None, String::new()),
        };
        if case.link.is_some() {
            println!("{:<28} tandem{t_drops}, qemu{q_drops}", "");
        }
        let qs = |f: fn(&Sample) -> String| q.as_ref().map(f).unwrap_or_else(|| "-".into());
        println!(
            "{:<28} {:>9.1} ms {:>9.2} ms {:>14} | {:>9} ms {:>9} ms {:>14}",
            format!("{} ({repeat})", case.label),
            t.total_ms,
            t.downtime_ms,
            format!("{:.0}", t.bytes),
            qs(|s| format!("{:.1}", s.total_ms)),
            qs(|s| format!("{:.2}", s.downtime_ms)),
            qs(|s| format!("{:.0}", s.bytes)),
        );
        let label = &case.label;
        if let Some(q) = q {
            println!(
                "{:<28} ratios qemu/tandem: total {:.2}x, downtime {:.2}x, bytes {:.2}x",
                "",
                q.total_ms / t.total_ms,
                q.downtime_ms / t.downtime_ms.max(1e-3),
                q.bytes / t.bytes
            );
            println!(
                "{:<28} as each reports itself: tandem total {:.1} ms, downtime {:.2} ms; qemu total-time {:.1} ms, downtime {:.2} ms",
                "", t.own_total_ms, t.own_downtime_ms, q.own_total_ms, q.own_downtime_ms
            );
            if t.total_ms > q.total_ms {
                notes.push(format!(
                    "{label}: Tandem's total time is longer than QEMU's. Both run from the \
                     migration command to the destination running the guest; Tandem's includes \
                     establishing the QUIC connection with mutual TLS, QEMU's a plain TCP \
                     connect without authentication or encryption."
                ));
            }
            if t.downtime_ms > q.downtime_ms {
                notes.push(format!(
                    "{label}: Tandem's downtime is longer than QEMU's. QEMU's is from the STOP \
                     event of its source to the RESUME event of its destination; Tandem's from \
                     the guest's stop on the source to the destination's Running arriving back, \
                     minus half the smallest round trip."
                ));
            }
            if t.bytes > q.bytes {
                notes.push(format!(
                    "{label}: Tandem sent more bytes: its count includes QUIC/TLS framing, \
                     retransmissions and the handshake (certificates), QEMU's counts RAM \
                     payload only."
                ));
            }
        }
    }
    drop(wan);
    for n in notes {
        println!("note: {n}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
