//! Failover (issue 10), measured over loopback with the console workload:
//!
//! * **gap** (`cargo bench --bench failover -- gap`): `TANDEM_BENCH_KILLS`
//!   (default 20) kill -9s of a protected primary running `fill 4 400 3`,
//!   each at a random round. For each: the silence at which the secondary
//!   declared the primary lost (detection), the replay's catch-up after
//!   that (replay lag), the arbiter claim, the rest of go-live up to the
//!   first guest output of the new primary (the secondary's own
//!   `failover gap`, from the primary's last sign of life), and what a
//!   client of the console sees: from the kill to the first byte on the new
//!   primary's console (polled every millisecond). Then the new primary is
//!   protected again (`tandem protect --to` a third host): time to
//!   protected and the primary pause. Printed: every run, then p50/p99/max.
//! * **false** (`-- false`): the false-failover rate of the default
//!   `--heartbeat-ms`/`--failover-timeout-ms` under CPU load:
//!   `TANDEM_BENCH_FALSE_RUNS` (default 20) protected runs of `busy 200000`
//!   with `TANDEM_BENCH_STRESS` (default 2) busy-loop threads spinning
//!   throughout; a run failed over falsely if either side went on alone.
//!   Printed: runs, protected seconds, false failovers, longest silence
//!   seen by either side (p50/max).
//!
//! Without a filter both run. Default timing throughout (50 ms heartbeats,
//! 1000 ms timeout): the gap is dominated by the timeout.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{loopback_secondary, run_tandem, Pki, Proc};
use common::num_after;
use common::TempDir;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rand_below(n: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (t ^ (t >> 7)) % n
}

/// Nearest-rank percentile of `v` (sorted here).
fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

fn rounds(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches("round ")
        .count()
}

/// A fresh directory with an arbiter directory in it, and its `--arbiter`.
fn with_arbiter(tag: &str) -> (TempDir, String) {
    let dir = TempDir::new(tag);
    std::fs::create_dir(dir.file("arbiter")).unwrap();
    let arbiter = format!("file:{}", dir.s("arbiter"));
    (dir, arbiter)
}

/// `tandem secondary` on loopback with the certificate of `host`.
fn on_loopback(pki: &Pki, host: &str, extra: &[&str]) -> (Proc, String) {
    loopback_secondary(&pki.creds(host), extra)
}

#[derive(Default)]
struct Gap {
    detect: f64,
    replay: f64,
    arbiter: f64,
    golive: f64,
    gap: f64,
    client: f64,
    reprotect: f64,
    pause: f64,
}

fn one_kill(pki: &Pki) -> Result<Gap, String> {
    let (dir, arbiter) = with_arbiter("bench-failover");
    let live = dir.file("live.txt");
    let live_arg = format!("file:{}", dir.s("live.txt"));
    let b_sock = dir.s("b.sock");
    let (mut b, b_addr) = on_loopback(
        pki,
        "sec",
        &[
            "--arbiter",
            &arbiter,
            "--live-serial",
            &live_arg,
            "--api-socket",
            &b_sock,
        ],
    );
    let serial = format!("file:{}", dir.s("pri.txt"));
    let mut args = vec![
        "run",
        "--cmdline",
        "fill 4 400 3",
        "--serial",
        &serial,
        "--protect-to",
        &b_addr,
        "--arbiter",
        &arbiter,
    ];
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    let mut a = Proc::spawn(&[], &args);
    let at = 5 + rand_below(25) as usize;
    a.wait_until("the kill point", || rounds(&dir.file("pri.txt")) >= at);
    let killed = Instant::now();
    a.signal(libc::SIGKILL);
    let _ = a.child.wait();
    let start = Instant::now();
    while std::fs::metadata(&live).map(|m| m.len()).unwrap_or(0) == 0 {
        if start.elapsed() > Duration::from_secs(30) || b.ended() {
            return Err(format!("no live output\n{}", b.describe()));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let client = killed.elapsed().as_secs_f64() * 1e3;
    b.wait_for("serves the live VM now", true);
    b.wait_for(" ms from the primary's last sign of life", true);
    let err = b.err();
    let detect = num_after(&err, "nothing heard from the primary for ").ok_or("no detection")?;
    let detected = num_after(&err, "detected ").ok_or("no 'detected'")?;
    let arbiter_ms = num_after(&err, "generation 1 in ").ok_or("no claim time")?;
    let gap = num_after(&err, "failover gap: ").ok_or_else(|| format!("no gap in\n{err}"))?;
    // Protect the new primary again, onto a third host.
    let (_c, c_addr) = on_loopback(pki, "third", &["--arbiter", &arbiter]);
    let mut args = vec![
        "protect",
        "--api",
        &b_sock,
        "--to",
        &c_addr,
        "--arbiter",
        &arbiter,
        "--json",
    ];
    let creds = pki.creds("sec");
    args.extend(creds.iter().map(String::as_str));
    let (code, out, perr) = run_tandem(&args);
    if code != 0 {
        return Err(format!("re-protect failed: {out}{perr}"));
    }
    let r: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).map_err(|e| e.to_string())?;
    Ok(Gap {
        detect,
        replay: (detected - detect).max(0.0),
        arbiter: arbiter_ms,
        golive: (gap - detected - arbiter_ms).max(0.0),
        gap,
        client,
        reprotect: r["total_ms"].as_f64().unwrap_or(f64::NAN),
        pause: r["pause_ms"].as_f64().unwrap_or(f64::NAN),
    })
}

fn gap_bench() {
    let kills = env_num("TANDEM_BENCH_KILLS", 20);
    let pki = Pki::new(&["pri", "sec", "third"], &[]);
    println!("failover gap: {kills} kill -9s of the primary (fill 4 400 3, console over loopback, heartbeat 50 ms, timeout 1000 ms)");
    println!(
        "{:>3} {:>9} {:>9} {:>8} {:>8} {:>9} {:>10} {:>10} {:>8}",
        "run", "detect", "replay", "arbiter", "go-live", "gap", "client", "reprotect", "pause"
    );
    let mut all: Vec<Gap> = Vec::new();
    for i in 0..kills {
        match one_kill(&pki) {
            Ok(g) => {
                println!(
                    "{:>3} {:>7.0}ms {:>7.1}ms {:>6.1}ms {:>6.1}ms {:>7.1}ms {:>8.1}ms {:>8.1}ms {:>6.1}ms",
                    i + 1, g.detect, g.replay, g.arbiter, g.golive, g.gap, g.client, g.reprotect, g.pause
                );
                all.push(g);
            }
            Err(e) => println!("{:>3} failed: {e}", i + 1),
        }
    }
    let col = |f: fn(&Gap) -> f64| all.iter().map(f).collect::<Vec<f64>>();
    println!("summary over {} kills (ms): p50 / p99 / max", all.len());
    for (name, mut v) in [
        ("detection (silence when declared lost)", col(|g| g.detect)),
        ("replay lag after detection", col(|g| g.replay)),
        ("arbiter claim", col(|g| g.arbiter)),
        ("go-live to first output", col(|g| g.golive)),
        ("gap: last sign of life -> first output", col(|g| g.gap)),
        ("client: kill -> first console byte", col(|g| g.client)),
        ("re-protection: time to protected", col(|g| g.reprotect)),
        ("re-protection: primary pause", col(|g| g.pause)),
    ] {
        let (p50, p99) = (pct(&mut v, 50.0), pct(&mut v, 99.0));
        let max = v.iter().cloned().fold(f64::NAN, f64::max);
        println!("  {name:<40} {p50:>8.1} {p99:>8.1} {max:>8.1}");
    }
}

fn false_bench() {
    let runs = env_num("TANDEM_BENCH_FALSE_RUNS", 20);
    let stress = env_num("TANDEM_BENCH_STRESS", 2);
    let pki = Pki::new(&["pri", "sec"], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..stress)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    println!("false failovers: {runs} protected runs of busy 200000 under {stress} busy-loop threads (default timing: heartbeat 50 ms, timeout 1000 ms)");
    let started = Instant::now();
    let mut false_failovers = 0;
    let mut silences = Vec::new();
    let mut protected_s = 0.0;
    for i in 0..runs {
        let (_dir, arbiter) = with_arbiter("bench-false");
        let (b, b_addr) = on_loopback(&pki, "sec", &["--arbiter", &arbiter]);
        let mut args = vec![
            "run",
            "--cmdline",
            "busy 200000",
            "--protect-to",
            &b_addr,
            "--arbiter",
            &arbiter,
        ];
        let creds = pki.creds("pri");
        args.extend(creds.iter().map(String::as_str));
        let t0 = Instant::now();
        let (_, _, perr) = run_tandem(&args);
        let (_, _, serr) = b.finish();
        protected_s += t0.elapsed().as_secs_f64();
        let failed_over = serr.contains("going LIVE")
            || serr.contains("the primary is lost")
            || perr.contains("the secondary is lost");
        if failed_over {
            false_failovers += 1;
        }
        let s1 = num_after(&perr, "longest silence from the secondary ").unwrap_or(f64::NAN);
        let s2 = num_after(&serr, "longest silence from the primary ").unwrap_or(f64::NAN);
        silences.push(s1.max(s2));
        println!(
            "{:>3} {:>6.2} s  longest silence {s1:>6.1} ms (primary side) {s2:>6.1} ms (secondary side){}",
            i + 1,
            t0.elapsed().as_secs_f64(),
            if failed_over { "  FALSE FAILOVER" } else { "" }
        );
    }
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    let max = silences.iter().cloned().fold(f64::NAN, f64::max);
    println!(
        "summary: {false_failovers} false failovers in {runs} runs ({protected_s:.0} s protected, {:.0} s in all); longest silence p50 {:.1} ms, max {max:.1} ms (timeout 1000 ms)",
        started.elapsed().as_secs_f64(),
        pct(&mut silences, 50.0)
    );
}

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    if want("gap") {
        gap_bench();
    }
    if want("false") {
        false_bench();
    }
}
