//! Lockstep protection (issue 8), measured side by side over loopback:
//! `cargo bench --bench lockstep`.
//!
//! For each workload — a console guest (`fill 4 60 2`: 60 console lines,
//! two timer ticks apart), a busy one (`busy 150000`: compute, timer ticks
//! taken by kicks) and a dirtying one (`dirty 256 30`: 1 MiB rewritten 30
//! times) — `TANDEM_BENCH_RUNS` (default 3) rounds of: the VM unprotected
//! (`tandem run`), protected from boot (`tandem run --protect-to` a
//! `tandem secondary` on loopback), and protected without progress marks
//! (`--progress-ms 0`). Printed per workload (medians of the runs):
//! completion time and the protected/unprotected throughput ratio, log
//! bytes and bandwidth, the secondary's lag at its acknowledgements
//! (p50/p99, with and without marks), and the added latency of the
//! outputs held by the Output Rule (p50/p99). Then the seeding of a running
//! VM (`tandem protect` of `dirty 64 100000`): time, bytes, primary pause.
//!
//! Each workload also runs ten times longer (unprotected and protected),
//! and the difference of the two lengths gives the steady-state throughput
//! ratio, without the fixed costs of a protected run (handshake, closing).
//!
//! Timing on a loaded 2-core host is noisy: read the ratios, not the
//! digits.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::cluster::{loopback_secondary, run_tandem, source, Pki, Proc};
use common::num_after;
use common::TempDir;

/// The number just before `before` in `text`.
fn num_before(text: &str, before: &str) -> Option<f64> {
    let head = &text[..text.find(before)?];
    let start = head
        .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or(0, |i| i + 1);
    head[start..].parse().ok()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// One protected run's numbers.
#[derive(Default)]
struct Protected {
    secs: Vec<f64>,
    log_bytes: Vec<f64>,
    bps: Vec<f64>,
    lag_p50_ms: Vec<f64>,
    lag_p99_ms: Vec<f64>,
    out_p50_ms: Vec<f64>,
    out_p99_ms: Vec<f64>,
}

impl Protected {
    fn add(&mut self, secs: f64, err: &str) {
        let n = |after: &str| num_after(err, after).unwrap_or(f64::NAN);
        self.secs.push(secs);
        self.log_bytes
            .push(num_before(err, " log bytes streamed").unwrap_or(f64::NAN));
        self.bps.push(n("log bytes streamed ("));
        let line = |has: &str| err.lines().find(|l| l.contains(has)).unwrap_or("");
        let lag = line("lag at acknowledgements");
        self.lag_p50_ms
            .push(num_after(lag, "acknowledgements p50 ").unwrap_or(f64::NAN));
        self.lag_p99_ms
            .push(num_after(lag, "ms, p99 ").unwrap_or(f64::NAN));
        self.out_p50_ms.push(n("added latency p50 "));
        self.out_p99_ms
            .push(num_after(line("added latency"), "ms, p99 ").unwrap_or(f64::NAN));
    }
}

fn run_protected(pki: &Pki, cmdline: &str, extra: &[&str]) -> (f64, String) {
    let (sec, addr) = loopback_secondary(&pki.creds("sec"), &[]);
    let mut args = vec![
        "run",
        "--cmdline",
        cmdline,
        "--serial",
        "null",
        "--protect-to",
        &addr,
    ];
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let t = Instant::now();
    let (code, _, err) = run_tandem(&args);
    let secs = t.elapsed().as_secs_f64();
    let (scode, _, serr) = sec.finish();
    assert_eq!((code, scode), (0, 0), "{err}\n{serr}");
    (secs, err)
}

/// The throughput ratio with the fixed costs taken out: the process
/// start, the secondary's handshake (mutual TLS on an emulated CPU) and
/// the closing acknowledgement cost a protected run the same few tens of
/// milliseconds however long the guest runs, which dominates a run of a
/// few hundred. Timed as the difference between the workload ten times
/// longer (`long`) and as given: what protection costs per unit of guest
/// work (VMware FT's throughput ratios are of long benchmarks).
fn steady_state(pki: &Pki, long: &str, runs: usize, short: (f64, f64)) {
    let (mut plain, mut prot) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let (code, _, err) = run_tandem(&["run", "--cmdline", long, "--serial", "null"]);
        assert_eq!(code, 0, "{err}");
        plain.push(t.elapsed().as_secs_f64());
        prot.push(run_protected(pki, long, &[]).0);
    }
    let (p, m) = (median(&mut plain), median(&mut prot));
    println!(
        "  steady state ({long}: unprotected {p:.3} s, protected {m:.3} s; minus the run above): throughput ratio {:.3}",
        (p - short.0) / (m - short.1)
    );
}

/// The workload ten times longer (its count multiplied by 10).
fn ten_times(cmdline: &str) -> String {
    let mut words: Vec<String> = cmdline.split(' ').map(str::to_string).collect();
    // `fill PAGES LINES TICKS` / `dirty PAGES ROUNDS`: the second number;
    // `busy N`: the first.
    let i = if words[0] == "busy" { 1 } else { 2 };
    let n: u64 = words[i].parse().expect("a count");
    words[i] = (n * 10).to_string();
    words.join(" ")
}

fn workload(pki: &Pki, cmdline: &str, runs: usize) {
    let mut plain = Vec::new();
    let (mut marks, mut nomarks) = (Protected::default(), Protected::default());
    for _ in 0..runs {
        let t = Instant::now();
        let (code, _, err) = run_tandem(&["run", "--cmdline", cmdline, "--serial", "null"]);
        assert_eq!(code, 0, "{err}");
        plain.push(t.elapsed().as_secs_f64());
        let (s, err) = run_protected(pki, cmdline, &[]);
        marks.add(s, &err);
        let (s, err) = run_protected(pki, cmdline, &["--progress-ms", "0"]);
        nomarks.add(s, &err);
    }
    let p = median(&mut plain);
    let m = median(&mut marks.secs);
    println!("{cmdline}:");
    println!(
        "  completion: unprotected {p:.3} s, protected {m:.3} s: throughput ratio {:.3} (without marks {:.3})",
        p / m,
        p / median(&mut nomarks.secs)
    );
    steady_state(pki, &ten_times(cmdline), runs, (p, m));
    println!(
        "  log: {:.0} bytes, {:.2} Mbit/s",
        median(&mut marks.log_bytes),
        median(&mut marks.bps) / 1e6
    );
    println!(
        "  secondary lag at acks: p50 {:.2} ms, p99 {:.2} ms (without progress marks: p50 {:.2} ms, p99 {:.2} ms)",
        median(&mut marks.lag_p50_ms),
        median(&mut marks.lag_p99_ms),
        median(&mut nomarks.lag_p50_ms),
        median(&mut nomarks.lag_p99_ms),
    );
    println!(
        "  added output latency (Output Rule): p50 {:.2} ms, p99 {:.2} ms",
        median(&mut marks.out_p50_ms),
        median(&mut marks.out_p99_ms)
    );
}

fn seeding(pki: &Pki, runs: usize) {
    let (mut total, mut pause, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let dir = TempDir::new("bench-seed");
        let sock = dir.s(&format!("vm{i}.sock"));
        let (sec, addr) = loopback_secondary(&pki.creds("sec"), &[]);
        let vm: Proc = source(&[], &sock, "dirty 64 100000", &["--serial", "null"]);
        let mut args = vec!["protect", "--api", &sock, "--to", &addr, "--json"];
        let creds = pki.creds("pri");
        args.extend(creds.iter().map(String::as_str));
        let (code, out, err) = run_tandem(&args);
        assert_eq!(code, 0, "{out}\n{err}");
        let v: serde_json::Value = out
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .unwrap_or_else(|| panic!("no JSON in {out}"));
        total.push(v["total_ms"].as_f64().unwrap_or(f64::NAN));
        pause.push(v["pause_ms"].as_f64().unwrap_or(f64::NAN));
        bytes.push(v["bytes_on_wire"].as_f64().unwrap_or(f64::NAN));
        vm.signal(libc::SIGKILL);
        sec.signal(libc::SIGKILL);
    }
    println!(
        "seeding a running VM (dirty 64 100000): {:.1} ms, {:.0} bytes on the wire, primary paused {:.1} ms",
        median(&mut total),
        median(&mut bytes),
        median(&mut pause)
    );
}

fn main() {
    let runs: usize = std::env::var("TANDEM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let pki = Pki::new(&["pri", "sec"], &[]);
    println!("lockstep benchmark, {runs} runs each, loopback (medians)");
    for cmdline in ["fill 4 60 2", "busy 150000", "dirty 256 30"] {
        if filter.as_deref().is_none_or(|f| cmdline.contains(f)) {
            workload(&pki, cmdline, runs);
        }
    }
    if filter.as_deref().is_none_or(|f| "seeding".contains(f)) {
        seeding(&pki, runs);
    }
}
