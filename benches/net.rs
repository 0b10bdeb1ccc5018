//! Networking: the test guest's `net-echo` and `mail` through Tandem, next
//! to QEMU running the same guest, on this machine.
//!
//! `cargo bench --bench net` (root: it builds network namespaces; env
//! `TANDEM_BENCH_ECHO=N` round trips, default 200; `TANDEM_BENCH_MSGS=N`
//! messages, default 20, of `TANDEM_BENCH_SIZE` bytes, default 4096).
//!
//! Every VM gets a TAP in its own network namespace (host side
//! 10.0.2.2/24, guest 10.0.2.15) and 64 MiB; clients are Python's socket
//! and smtplib (`tests/mail_client.py`) in that namespace.
//!
//! * **echo round trip**: one TCP connection to `net-echo 7`, TCP_NODELAY,
//!   a 7-byte line out and back, N times: p50 and p99.
//! * **mail throughput**: one SMTP session sending N messages (each
//!   stored and flushed to the virtio-blk disk before its `250`): msgs/s.
//! * **log bytes per received frame**: the same mail run under
//!   `tandem record`, read back with `tandem dump-log`: the bytes of the
//!   `Input NetFrame` entries per frame (and their framing overhead), and
//!   the whole log per received frame (which also holds timer ticks,
//!   interrupts, output hashes, fingerprints and sync points).
//! * **instructions per message**: the guest under QEMU TCG with
//!   `-icount shift=0`, where its busy TSC cycles (`tsc-stats`, `XSTATS`)
//!   count instructions: what one message costs the guest, independent of
//!   the host's load; with frames and queue notifies (exits) per message.
//!
//! QEMU is Debian's `qemu-system-x86` (installed with apt if missing),
//! `-M microvm` with virtio-mmio devices (`-global
//! virtio-mmio.force-legacy=false`) and a TAP netdev, KVM. A VMM that
//! cannot run the guest is reported as such, not measured.

#[path = "../tests/common/net.rs"]
mod net;

use std::path::{Path, PathBuf};
use std::process::Command;

use net::{NetNs, Vm, VmConfig, Vmm};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The numbers after `key` in the client's output line starting with
/// `prefix`.
fn field(out: &str, key: &str) -> Option<f64> {
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next()?.parse().ok();
        }
    }
    None
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn disk(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("creating a disk image");
    f.set_len(256 << 20).expect("sizing a disk image");
    p
}

/// Run `f`, turning a panic (a VMM that cannot run the guest) into Err
/// with its message.
fn attempt<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        msg.lines().take(6).collect::<Vec<_>>().join(" | ")
    })
}

#[derive(Default, Clone, Copy)]
struct Numbers {
    p50_ms: f64,
    p99_ms: f64,
    msgs_s: f64,
}

fn measure(vmm: Vmm, dir: &Path, echo_n: usize, msgs: usize, size: usize) -> Numbers {
    let ns = NetNs::new("bn");
    let vm = Vm::start(
        &ns,
        &VmConfig {
            vmm,
            cmdline: "net-echo 7",
            disk: None,
            dir,
            tandem_cmd: &[],
        },
        "net-echo listening",
    );
    let out = ns.client_ok(dir, &vm, &["echo", "7", &echo_n.to_string()]);
    drop(vm);
    let img = disk(dir, "bench-mail.img");
    let vm = Vm::start(
        &ns,
        &VmConfig {
            vmm,
            cmdline: "mail",
            disk: Some(&img),
            dir,
            tandem_cmd: &[],
        },
        "mail ready",
    );
    let rate = ns.client_ok(dir, &vm, &["rate", &msgs.to_string(), &size.to_string()]);
    drop(vm);
    Numbers {
        p50_ms: field(&out, "p50").unwrap_or(f64::NAN),
        p99_ms: field(&out, "p99").unwrap_or(f64::NAN),
        msgs_s: field(&rate, "rate").unwrap_or(f64::NAN),
    }
}

/// What a recorded mail run's log holds.
struct LogUse {
    total: u64,
    frames: u64,
    frame_entry_bytes: u64,
    frame_payload_bytes: u64,
}

/// `tandem record` of a mail run, its log read back with `tandem
/// dump-log` (one `@OFFSET entry` line each: an entry's size is the
/// distance to the next one).
fn record_log_use(dir: &Path, msgs: usize, size: usize) -> LogUse {
    let ns = NetNs::new("br");
    let img = disk(dir, "bench-rec.img");
    let log = dir.join("mail.log");
    let log_s = log.to_string_lossy().into_owned();
    let vm = Vm::start(
        &ns,
        &VmConfig {
            vmm: Vmm::Tandem,
            cmdline: "mail",
            disk: Some(&img),
            dir,
            tandem_cmd: &["record", "--log", &log_s],
        },
        "mail ready",
    );
    ns.client_ok(dir, &vm, &["rate", &msgs.to_string(), &size.to_string()]);
    vm.stop();
    let total = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let dump = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["dump-log", "--log", &log_s])
        .output()
        .expect("tandem dump-log");
    let text = String::from_utf8_lossy(&dump.stdout);
    let entries: Vec<(u64, &str)> = text
        .lines()
        .filter_map(|l| {
            let (off, rest) = l.strip_prefix('@')?.split_once(' ')?;
            Some((off.parse().ok()?, rest))
        })
        .collect();
    let mut u = LogUse {
        total,
        frames: 0,
        frame_entry_bytes: 0,
        frame_payload_bytes: 0,
    };
    for (i, (off, line)) in entries.iter().enumerate() {
        let Some(payload) = line
            .strip_prefix("Input {")
            .and_then(|r| r.split_once("NetFrame(["))
            .map(|(_, p)| p)
        else {
            continue;
        };
        let end = entries.get(i + 1).map(|e| e.0).unwrap_or(total);
        u.frames += 1;
        u.frame_entry_bytes += end - off;
        u.frame_payload_bytes += payload.split(',').count() as u64;
    }
    u
}

fn ensure_qemu() -> bool {
    let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
    if ok(Command::new("qemu-system-x86_64").arg("--version")) {
        return true;
    }
    eprintln!("installing qemu-system-x86 with apt ...");
    ok(Command::new("sh").args([
        "-c",
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86",
    ])) && ok(Command::new("qemu-system-x86_64").arg("--version"))
}

fn main() {
    let echo_n = env_num("TANDEM_BENCH_ECHO", 200);
    let msgs = env_num("TANDEM_BENCH_MSGS", 20);
    let size = env_num("TANDEM_BENCH_SIZE", 4096);
    let dir =
        TempDir(std::env::temp_dir().join(format!("tandem-bench-net-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("bench temp dir");
    // A panic inside `attempt` is reported in the table; keep its default
    // message off the terminal.
    std::panic::set_hook(Box::new(|_| {}));

    println!("net bench: {echo_n} echo round trips; {msgs} messages of {size} bytes per mail run");
    let tandem = attempt(|| measure(Vmm::Tandem, &dir.0, echo_n, msgs, size));
    let qemu = if ensure_qemu() {
        attempt(|| measure(Vmm::Qemu, &dir.0, echo_n, msgs, size))
    } else {
        Err("qemu-system-x86_64 not available".into())
    };
    println!(
        "{:<8} {:>12} {:>12} {:>12}",
        "vmm", "echo p50", "echo p99", "mail msgs/s"
    );
    for (name, r) in [("tandem", &tandem), ("qemu", &qemu)] {
        match r {
            Ok(n) => println!(
                "{name:<8} {:>9.3} ms {:>9.3} ms {:>12.2}",
                n.p50_ms, n.p99_ms, n.msgs_s
            ),
            Err(e) => println!("{name:<8} not measured: {e}"),
        }
    }
    if let (Ok(t), Ok(q)) = (&tandem, &qemu) {
        println!(
            "ratios tandem/qemu: echo p50 {:.2}x, echo p99 {:.2}x, mail throughput {:.2}x",
            t.p50_ms / q.p50_ms,
            t.p99_ms / q.p99_ms,
            t.msgs_s / q.msgs_s
        );
    }

    match attempt(|| record_log_use(&dir.0, msgs, size)) {
        Ok(u) if u.frames > 0 => println!(
            "tandem record: {} received frames ({:.0} bytes each on average) take {:.1} log bytes per frame ({:.1} bytes of framing over the frame); the whole log is {} bytes, {:.0} per received frame (ticks, interrupts, outputs, fingerprints, sync points included)",
            u.frames,
            u.frame_payload_bytes as f64 / u.frames as f64,
            u.frame_entry_bytes as f64 / u.frames as f64,
            (u.frame_entry_bytes - u.frame_payload_bytes) as f64 / u.frames as f64,
            u.total,
            u.total as f64 / u.frames as f64
        ),
        Ok(u) => println!(
            "tandem record: no received frames in the log ({} bytes)",
            u.total
        ),
        Err(e) => println!("tandem record: not measured: {e}"),
    }

    if ensure_qemu() {
        let r = attempt(|| {
            let ns = NetNs::new("bi");
            let img = disk(&dir.0, "bench-icount.img");
            let vm = Vm::start(
                &ns,
                &VmConfig {
                    vmm: Vmm::QemuIcount,
                    cmdline: "mail",
                    disk: Some(&img),
                    dir: &dir.0,
                    tandem_cmd: &[],
                },
                "mail ready",
            );
            let mut lines = Vec::new();
            for sz in [100usize, size, 1 << 20] {
                let n = if sz >= 1 << 20 { 3 } else { msgs };
                let out = ns.client_ok(&dir.0, &vm, &["cost", &n.to_string(), &sz.to_string()]);
                lines.push((sz, out));
            }
            lines
        });
        match r {
            Ok(lines) => {
                println!(
                    "guest cost per message (QEMU TCG -icount: instructions, frames, notifies):"
                );
                for (sz, out) in lines {
                    let ins = field(&out, "busy_tsc").unwrap_or(f64::NAN);
                    println!(
                        "  {sz:>8} bytes: {ins:>10.0} instructions ({:.2} per byte), rx {:.1} frames, tx {:.1} frames, {:.1} notifies",
                        ins / sz as f64,
                        field(&out, "rx").unwrap_or(f64::NAN),
                        field(&out, "tx").unwrap_or(f64::NAN),
                        field(&out, "notifies").unwrap_or(f64::NAN),
                    );
                }
            }
            Err(e) => println!("instructions per message: not measured: {e}"),
        }
    }
}
