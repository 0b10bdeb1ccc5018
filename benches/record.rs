//! Record/replay benchmark (issue 3), measured side by side in one run:
//!
//! * **recording overhead**: wall time of `tandem record` / `tandem run` on
//!   the same workload (console discarded);
//! * **log size**: bytes per second of guest run time (the record's wall
//!   time) and per exit; for the idle guest (`ticks N` at 250 Hz) the
//!   steady-state rate is measured as the difference between `ticks 500` and
//!   `ticks 250` (250 ticks = 1 s of guest time), which removes the initial
//!   digest and the closing sync point, and compared with VMware FT's
//!   published 0.68 Mbit/s for an idle guest;
//! * **replay speed**: wall time of `tandem replay --quiet` / `tandem record`;
//! * **codec throughput** on one core: the `recordlog` crate's
//!   `codec_bench` example (small entries and 1 MiB sync points, encode and
//!   decode), run from here.
//!
//! `cargo bench --bench record`; `TANDEM_BENCH_REPEAT=R` (default 3) runs
//! per measurement, the median is reported; `TANDEM_BENCH_CODEC_MS` (default
//! 300) is the time spent per codec case (best run reported).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");
/// VMware FT, idle guest (published figure), bit/s.
const VMWARE_FT_IDLE_BPS: f64 = 0.68e6;
const DISK_BYTES: usize = 1 << 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
        .unwrap_or(default)
}

struct Done {
    secs: f64,
    status: i32,
    stderr: String,
}

fn tandem(args: &[&str]) -> Done {
    let t = Instant::now();
    let out = Command::new(TANDEM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("TANDEM_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot start {TANDEM}: {e}"));
    Done {
        secs: t.elapsed().as_secs_f64(),
        status: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The number after `prefix` in the record summary ("recorded N exits").
fn number_after(s: &str, prefix: &str) -> Option<u64> {
    let i = s.find(prefix)? + prefix.len();
    s[i..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The number right before `what` ("12 kicks").
fn number_before(s: &str, what: &str) -> Option<u64> {
    let i = s.find(what)?;
    s[..i]
        .trim_end()
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

struct Measured {
    run: f64,
    record: f64,
    replay: f64,
    exits: u64,
    bytes: u64,
    kicks: u64,
    replay_ok: String,
}

struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("tandem-bench-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Run, record and replay `cmdline` `repeat` times each; medians.
fn measure(scratch: &Scratch, cmdline: &str, disk: bool, repeat: usize) -> Measured {
    let log = scratch.path("bench.tlog");
    let img = scratch.path("disk.img");
    let original = vec![0u8; DISK_BYTES];
    // Each run gets the original disk at the same path (the replay must
    // find the image it was recorded with).
    let reset = || {
        if disk {
            std::fs::write(&img, &original).expect("disk image");
        }
    };
    let with_disk = |mut a: Vec<&'static str>| -> Vec<String> {
        let mut v: Vec<String> = a.drain(..).map(String::from).collect();
        if disk {
            v.push("--disk".into());
            v.push(s(&img).into());
        }
        v
    };
    let (mut run, mut record, mut replay) = (vec![], vec![], vec![]);
    let (mut exits, mut bytes, mut kicks) = (vec![], vec![], vec![]);
    let mut failures = 0;
    for _ in 0..repeat {
        reset();
        let mut a = with_disk(vec!["run", "--serial", "null"]);
        a.extend(["--cmdline".into(), cmdline.into()]);
        let r = tandem(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(r.status, 0, "run {cmdline}: {}", r.stderr);
        run.push(r.secs);

        reset();
        let mut a = with_disk(vec!["record", "--serial", "null"]);
        a.extend([
            "--cmdline".into(),
            cmdline.into(),
            "--log".into(),
            s(&log).into(),
        ]);
        let r = tandem(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(r.status, 0, "record {cmdline}: {}", r.stderr);
        record.push(r.secs);
        exits.push(number_after(&r.stderr, "recorded ").expect("exits") as f64);
        bytes.push(std::fs::metadata(&log).expect("log").len() as f64);
        kicks.push(number_before(&r.stderr, " kicks").unwrap_or(0) as f64);

        reset();
        let r = tandem(&["replay", "--quiet", "--log", s(&log)]);
        if r.status != 0 || !r.stderr.contains("replay verified") {
            failures += 1;
            eprintln!(
                "  note: replay of {cmdline:?} did not verify (status {}): {}",
                r.status,
                r.stderr.lines().next().unwrap_or("")
            );
        }
        replay.push(r.secs);
    }
    Measured {
        run: median(run),
        record: median(record),
        replay: median(replay),
        exits: median(exits) as u64,
        bytes: median(bytes) as u64,
        kicks: median(kicks) as u64,
        replay_ok: if failures == 0 {
            "verified".into()
        } else {
            format!("{failures}/{repeat} FAILED")
        },
    }
}

// ---- codec ----

/// Codec throughput: the recordlog crate's own benchmark (one core,
/// entries/s and MB/s, small entries and 1 MiB sync points), run from here
/// so that one `cargo bench` prints everything.
fn codec(min: Duration) {
    println!();
    println!("codec throughput (one core, recordlog API, {min:?} per case):");
    let out = Command::new(env!("CARGO"))
        .args([
            "run",
            "--release",
            "-q",
            "-p",
            "recordlog",
            "--example",
            "codec_bench",
        ])
        .env("BENCH_MS", min.as_millis().to_string())
        .output();
    match out {
        Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Ok(o) => println!("codec_bench failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => println!("cannot run codec_bench: {e}"),
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let repeat = env_u64("TANDEM_BENCH_REPEAT", 3).max(1) as usize;
    let codec_ms = env_u64("TANDEM_BENCH_CODEC_MS", 300);
    let scratch = Scratch::new();

    println!("record/replay benchmark: {TANDEM}");
    println!("median of {repeat} runs per cell; console discarded; wall times include process start and boot");
    println!();
    println!(
        "{:<14} {:>7} {:>7} {:>7} {:>9} {:>9} {:>6} {:>9} {:>11} {:>9} {:>7} {:>9}",
        "workload",
        "run s",
        "rec s",
        "rep s",
        "rec/run",
        "rep/rec",
        "exits",
        "log B",
        "B/s",
        "B/exit",
        "kicks",
        "replay"
    );
    let workloads: [(&str, bool); 5] = [
        ("ticks 250", false),
        ("ticks 500", false),
        ("dirty 256 8", false),
        ("busy 50000", false),
        ("disk 64", true),
    ];
    let mut results = Vec::new();
    for (w, disk) in workloads {
        let m = measure(&scratch, w, disk, repeat);
        println!(
            "{:<14} {:>7.3} {:>7.3} {:>7.3} {:>9.2} {:>9.2} {:>6} {:>9} {:>11.0} {:>9.1} {:>7} {:>9}",
            w,
            m.run,
            m.record,
            m.replay,
            m.record / m.run,
            m.replay / m.record,
            m.exits,
            m.bytes,
            m.bytes as f64 / m.record,
            m.bytes as f64 / m.exits.max(1) as f64,
            m.kicks,
            m.replay_ok
        );
        results.push((w, m));
    }

    // Idle steady state: ticks 500 - ticks 250 = 250 ticks = 1 s of guest
    // time at 250 Hz.
    let t250 = &results[0].1;
    let t500 = &results[1].1;
    let dbytes = t500.bytes.saturating_sub(t250.bytes) as f64;
    let dexits = t500.exits.saturating_sub(t250.exits) as f64;
    let dwall = (t500.record - t250.record).max(1e-6);
    let bps_guest = dbytes * 8.0 / 1.0;
    let bps_wall = dbytes * 8.0 / dwall;
    println!();
    println!("idle guest, steady state (ticks 500 - ticks 250 = 250 ticks = 1 s of guest time at 250 Hz):");
    println!(
        "  {dbytes:.0} bytes for {dexits:.0} exits ({:.2} B/exit); {:.0} bit/s per guest second, {:.0} bit/s per wall second ({dwall:.3} s)",
        dbytes / dexits.max(1.0),
        bps_guest,
        bps_wall
    );
    println!(
        "  VMware FT idle: {:.0} bit/s -> Tandem is {:.1}x smaller (target: 20x)",
        VMWARE_FT_IDLE_BPS,
        VMWARE_FT_IDLE_BPS / bps_guest.max(1.0)
    );
    println!(
        "  whole log of ticks 250 (with initial digest + closing sync point): {} bytes = {:.0} bit/s over its {:.2} s record",
        t250.bytes,
        t250.bytes as f64 * 8.0 / t250.record,
        t250.record
    );

    codec(Duration::from_millis(codec_ms));
}
