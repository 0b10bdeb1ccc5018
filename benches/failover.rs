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
//! * **net** (`-- net`, as root): what a network client sees. The mail VM
//!   on two namespace hosts, ONE SMTP session from the client network
//!   sending message after message all along, `TANDEM_BENCH_KILLS` kill -9s
//!   of whichever host runs the VM, each survivor protected again onto a
//!   fresh secondary on the dead host; the gap is the longest silence
//!   between two 250s from the last one before the kill on (for the new
//!   primary's first 250 after it); at the end every message that got 250
//!   is checked over POP3. Once per `--failover-timeout-ms` of
//!   `TANDEM_BENCH_TIMEOUTS` (default `1000,300,200`).
//! * **false** (`-- false`): the false-failover rate under CPU load, for
//!   each timeout of `TANDEM_BENCH_TIMEOUTS` (heartbeat 50 ms):
//!   `TANDEM_BENCH_FALSE_RUNS` (default 20) protected runs of `busy 200000`
//!   with `TANDEM_BENCH_STRESS` (default 2) busy-loop threads spinning
//!   throughout; a run failed over falsely if either side went on alone.
//!   Printed: runs, protected seconds, false failovers, longest silence
//!   seen by either side (p50/max).
//!
//! Without a filter all run. `gap` uses the default timing (50 ms
//! heartbeats, 1000 ms timeout): the gap is dominated by the timeout.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/net.rs"]
mod net;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{
    loopback_secondary, protect, protected_mail, run_tandem, secondary, MailStream, Netns, Pki,
    Proc,
};
use common::num_after;
use common::TempDir;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `--failover-timeout-ms` values to compare (`TANDEM_BENCH_TIMEOUTS`,
/// default `1000,300,200`).
fn timeouts() -> Vec<u64> {
    std::env::var("TANDEM_BENCH_TIMEOUTS")
        .unwrap_or_else(|_| "1000,300,200".into())
        .split(',')
        .filter_map(|t| t.trim().parse().ok())
        .collect()
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
    let (code, out, perr) = protect(
        &b_sock,
        &c_addr,
        &pki.creds("sec"),
        &["--arbiter", &arbiter, "--json"],
    );
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
    for t in timeouts() {
        false_bench_at(t);
    }
}

fn false_bench_at(timeout_ms: u64) {
    let runs = env_num("TANDEM_BENCH_FALSE_RUNS", 20);
    let stress = env_num("TANDEM_BENCH_STRESS", 2);
    let pki = Pki::new(&["pri", "sec"], &[]);
    let t = timeout_ms.to_string();
    let timing = ["--heartbeat-ms", "50", "--failover-timeout-ms", t.as_str()];
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
    println!("false failovers: {runs} protected runs of busy 200000 under {stress} busy-loop threads (heartbeat 50 ms, timeout {timeout_ms} ms)");
    let started = Instant::now();
    let mut false_failovers = 0;
    let mut silences = Vec::new();
    let mut protected_s = 0.0;
    for i in 0..runs {
        let (_dir, arbiter) = with_arbiter("bench-false");
        let mut extra = vec!["--arbiter", &arbiter];
        extra.extend(timing);
        let (b, b_addr) = on_loopback(&pki, "sec", &extra);
        let mut args = vec![
            "run",
            "--cmdline",
            "busy 200000",
            "--protect-to",
            &b_addr,
            "--arbiter",
            &arbiter,
        ];
        args.extend(timing);
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
        "summary: {false_failovers} false failovers in {runs} runs ({protected_s:.0} s protected, {:.0} s in all); longest silence p50 {:.1} ms, max {max:.1} ms (timeout {timeout_ms} ms)",
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
    if want("net") {
        for t in timeouts() {
            net_bench(t);
        }
    }
    if want("false") {
        false_bench();
    }
}

/// One host's side of the network bench: its namespace, its address on
/// the A–B link and its certificate.
struct Host<'a> {
    ns: &'a str,
    ip: String,
    cert: &'static str,
}

/// The failover gap a network client sees (`-- net`): the mail VM on two
/// namespace hosts (`tests/failover_net.rs`' topology), ONE SMTP session
/// from the client network sending message after message all along, and
/// `TANDEM_BENCH_KILLS` kill -9s of whichever host runs the VM: after each,
/// the survivor goes live and is protected again onto a fresh secondary on
/// the dead host (`tandem protect --to`), and the next kill comes a few
/// messages later. The gap: the longest silence between two 250s from the
/// last one before the kill on (a 250 released by the old primary just
/// before its death may reach the client just after the kill; the silence
/// ends at the new primary's first). At the end every message that got
/// 250 is checked over POP3.
fn net_bench(timeout_ms: u64) {
    let kills = env_num("TANDEM_BENCH_KILLS", 20);
    const SIZE: usize = 200;
    let tag = format!("bnet{timeout_ms}");
    let subnet = 240;
    let mac = "52:54:00:aa:bb:50";
    let Some(hosts) = Netns::new(&tag, subnet) else {
        println!("net: no network namespaces (needs root and ip): skipped");
        return;
    };
    let c = net::client_network(&tag, &[&hosts.a, &hosts.b]);
    let side = [
        Host {
            ns: &hosts.a,
            ip: format!("10.{subnet}.0.1"),
            cert: "a",
        },
        Host {
            ns: &hosts.b,
            ip: format!("10.{subnet}.0.2"),
            cert: "b",
        },
    ];
    let pki = Pki::new(&["a", "b"], &[&side[0].ip, &side[1].ip]);
    let (dir, arbiter) = with_arbiter(&tag);
    let t = timeout_ms.to_string();
    let timing = ["--heartbeat-ms", "50", "--failover-timeout-ms", t.as_str()];
    let sock = |i: usize| dir.s(&format!("api{i}.sock"));
    let disk = |i: usize| dir.disk(&format!("d{i}.img"), 16 << 20);
    let (d0, d1) = (disk(0), disk(1));
    let s1 = sock(1);
    let mut sec_extra = vec!["--arbiter", &arbiter, "--api-socket", &s1];
    sec_extra.extend(timing);
    let mut pri_extra = vec!["--arbiter", arbiter.as_str()];
    pri_extra.extend(timing);
    let (mut live, mut standby) = protected_mail(
        &hosts,
        &format!("{}:0", side[1].ip),
        &pki,
        (&d0, &d1),
        mac,
        (&pri_extra, &sec_extra),
    );
    let script = dir.file("mail_client.py");
    std::fs::write(&script, net::MAIL_CLIENT).unwrap();
    let mut client = MailStream::start(
        c.command("python3"),
        &script,
        SIZE,
        &dir.file("stop"),
        100_000,
    );
    println!(
        "failover gap (network): {kills} kill -9s, mail VM, one SMTP session of {SIZE}-byte messages, heartbeat 50 ms, timeout {timeout_ms} ms"
    );
    println!(
        "{:>3} {:>10} {:>10} {:>12} {:>10}",
        "run", "detect", "gap", "kill->250", "reprotect"
    );
    let (mut gaps, mut after_kill, mut detects) = (Vec::new(), Vec::new(), Vec::new());
    let mut on = 0usize; // the host `live` runs on
    for i in 0..kills {
        let n = client.sent();
        client.wait_sent(n + 3, &|| standby.describe());
        let at_kill = client.sent();
        let killed = Instant::now();
        live.signal(libc::SIGKILL);
        let _ = live.child.wait();
        standby.wait_for("going LIVE", true);
        standby.wait_for("serves the live VM now", true);
        client.wait_sent(at_kill + 2, &|| standby.describe());
        // The longest silence between two 250s from the last one before the
        // kill on (a 250 the old primary released just before its death can
        // reach the client just after the kill).
        let times = client.times();
        let Some(from) = times.iter().rposition(|t| *t <= killed) else {
            println!("{:>3} no 250 before the kill", i + 1);
            return;
        };
        let (before, after) = times[from..]
            .windows(2)
            .map(|w| (w[0], w[1]))
            .max_by_key(|(a, b)| *b - *a)
            .expect("two 250s after the kill");
        let gap = (after - before).as_secs_f64() * 1e3;
        let k = (after - killed).as_secs_f64() * 1e3;
        let detect =
            num_after(&standby.err(), "nothing heard from the primary for ").unwrap_or(f64::NAN);
        // Protect the new primary again, onto the host that died.
        let dead = &side[on];
        let next_sock = sock(i + 2);
        let next_disk = disk(i + 2);
        let live_serial = format!("file:{}", dir.s(&format!("live{i}.txt")));
        let mut extra = vec![
            "--disk",
            common::arg(&next_disk),
            "--net",
            "tap=tn0",
            "--arbiter",
            &arbiter,
            "--api-socket",
            &next_sock,
            "--live-serial",
            &live_serial,
        ];
        extra.extend(timing);
        let (new_sec, addr) = secondary(
            &["ip", "netns", "exec", dead.ns],
            &format!("{}:0", dead.ip),
            &pki.creds(dead.cert),
            &extra,
        );
        let cur_sock = sock(i + 1);
        let mut extra = vec!["--arbiter", &arbiter, "--json"];
        extra.extend(timing);
        let (code, out, perr) = protect(&cur_sock, &addr, &pki.creds(side[1 - on].cert), &extra);
        if code != 0 {
            println!("{:>3} re-protect failed: {out}{perr}", i + 1);
            return;
        }
        let r: serde_json::Value =
            serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_default();
        println!(
            "{:>3} {detect:>8.0}ms {gap:>8.0}ms {k:>10.0}ms {:>8.1}ms",
            i + 1,
            r["total_ms"].as_f64().unwrap_or(f64::NAN)
        );
        gaps.push(gap);
        after_kill.push(k);
        detects.push(detect);
        live = std::mem::replace(&mut standby, new_sec);
        on = 1 - on;
    }
    let total = client.finish(&|| live.describe());
    c.check_stream(dir.path(), total, SIZE, &live.describe());
    println!(
        "summary over {} kills, timeout {timeout_ms} ms (ms): p50 / p99 / max; all {total} messages that got 250 are in the mailbox",
        gaps.len()
    );
    for (name, mut v) in [
        ("detection (silence when declared lost)", detects),
        ("gap: 250 before -> the new primary's first", gaps),
        ("kill -> the new primary's first 250", after_kill),
    ] {
        let (p50, p99) = (pct(&mut v, 50.0), pct(&mut v, 99.0));
        let max = v.iter().cloned().fold(f64::NAN, f64::max);
        println!("  {name:<40} {p50:>8.1} {p99:>8.1} {max:>8.1}");
    }
}
