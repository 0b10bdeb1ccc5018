//! A WAN between two network namespaces, for tests and benchmarks: the
//! topology of `tests/wan/README.md`.
//!
//! ```text
//!  namespace A (source host)      namespace M (the WAN)           namespace B (destination)
//!  wa<N>  10.S.0.1/24  ==veth==  wam<N> [tandem-wan] wbm<N>  ==veth==  wb<N>  10.S.0.2/24
//! ```
//!
//! A and B share one /24: the forwarder is a wire, not a router. Every
//! veth has MTU [`MTU`] and `gso_max_segs 1` (frames cross one wire packet
//! at a time, so loss and rate apply per packet; see
//! `tests/wan/packet.rs`). Include it with
//! `#[path = "common/wan.rs"] mod wan;` (or `../tests/common/wan.rs` from
//! a benchmark); it needs root and `ip` (iproute2).

#![allow(dead_code)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The forwarder cargo built beside `tandem`.
pub const WAN_BIN: &str = env!("CARGO_BIN_EXE_tandem-wan");

/// MTU of every veth: jumbo frames, 6x fewer packets per byte than 1500,
/// which is what lets a userspace forwarder carry 1 Gbit/s on a loaded
/// 2-core machine. Both VMMs under test see the same path.
pub const MTU: u32 = 9000;

/// The link's settings (each direction).
#[derive(Debug, Clone)]
pub struct WanLink {
    /// One-way delay; the RTT is twice this.
    pub delay_ms: f64,
    /// `tandem-wan --loss`, e.g. "0" or "1%".
    pub loss: String,
    /// `tandem-wan --rate`, e.g. "1gbit"; `None`: unlimited.
    pub rate: Option<String>,
    pub seed: u64,
}

impl WanLink {
    pub fn new(rtt_ms: f64, loss: &str, rate: Option<&str>) -> WanLink {
        WanLink {
            delay_ms: rtt_ms / 2.0,
            loss: loss.to_string(),
            rate: rate.map(str::to_string),
            seed: 1,
        }
    }
}

/// Three namespaces and the forwarder between them; all removed on drop.
pub struct Wan {
    /// Namespace of the source host, address [`Wan::ip_a`].
    pub ns_a: String,
    /// Namespace of the destination host, address [`Wan::ip_b`].
    pub ns_b: String,
    pub ns_m: String,
    pub ip_a: String,
    pub ip_b: String,
    fwd: Option<Child>,
    fwd_out: Arc<Mutex<Vec<u8>>>,
    fwd_err: Arc<Mutex<Vec<u8>>>,
}

/// Everything `r` yields, collected by a thread (a child's stdout/stderr).
pub fn collect<R: Read + Send + 'static>(mut r: R) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running ip {args:?}: {e} (is iproute2 installed?)"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?} failed ({}): {} (the WAN tests need root)",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl Wan {
    /// Build the topology on subnet `10.SUBNET.0.0/24` and start
    /// `tandem-wan` in the middle namespace with `link`.
    pub fn new(subnet: u8, link: &WanLink) -> Result<Wan, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        // `ip netns add` run concurrently races on mounting /run/netns.
        static SETUP: Mutex<()> = Mutex::new(());
        let _one_at_a_time = SETUP.lock().unwrap_or_else(|e| e.into_inner());
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut w = Wan {
            ns_a: format!("tandem-wan-{id}-a"),
            ns_b: format!("tandem-wan-{id}-b"),
            ns_m: format!("tandem-wan-{id}-m"),
            ip_a: format!("10.{subnet}.0.1"),
            ip_b: format!("10.{subnet}.0.2"),
            fwd: None,
            fwd_out: Default::default(),
            fwd_err: Default::default(),
        };
        let (wa, wam, wbm, wb) = (
            format!("wa{id}"),
            format!("wam{id}"),
            format!("wbm{id}"),
            format!("wb{id}"),
        );
        let mtu = MTU.to_string();
        for ns in [&w.ns_a, &w.ns_b, &w.ns_m] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // TCP windows as large as the QUIC channel's, so that a TCP
        // migration (QEMU) is not window-limited at a long RTT.
        for ns in [&w.ns_a, &w.ns_b] {
            for (key, v) in [
                ("tcp_rmem", "4096 131072 67108864"),
                ("tcp_wmem", "4096 16384 67108864"),
            ] {
                ip(&[
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.{key}={v}"),
                ])?;
            }
        }
        let (cidr_a, cidr_b) = (format!("{}/24", w.ip_a), format!("{}/24", w.ip_b));
        for (end, mid, ns, cidr) in [(&wa, &wam, &w.ns_a, &cidr_a), (&wb, &wbm, &w.ns_b, &cidr_b)] {
            ip(&[
                "-n", &w.ns_m, "link", "add", mid, "type", "veth", "peer", "name", end, "netns", ns,
            ])?;
            for (n, dev) in [(&w.ns_m, mid), (ns, end)] {
                ip(&[
                    "-n",
                    n,
                    "link",
                    "set",
                    "dev",
                    dev,
                    "mtu",
                    &mtu,
                    "gso_max_segs",
                    "1",
                ])?;
                ip(&["-n", n, "link", "set", "dev", dev, "up"])?;
            }
            ip(&["-n", ns, "addr", "add", cidr, "dev", end])?;
        }
        let mut args = vec![
            "netns".to_string(),
            "exec".into(),
            w.ns_m.clone(),
            WAN_BIN.into(),
            "--a".into(),
            wam,
            "--b".into(),
            wbm,
            "--delay-ms".into(),
            link.delay_ms.to_string(),
            "--loss".into(),
            link.loss.clone(),
            "--seed".into(),
            link.seed.to_string(),
        ];
        if let Some(r) = &link.rate {
            args.push("--rate".into());
            args.push(r.clone());
        }
        let mut child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {WAN_BIN}: {e}"))?;
        w.fwd_out = collect(child.stdout.take().unwrap());
        w.fwd_err = collect(child.stderr.take().unwrap());
        w.fwd = Some(child);
        let start = Instant::now();
        while !String::from_utf8_lossy(&w.fwd_err.lock().unwrap()).contains("forwarding between") {
            if let Some(st) = w.fwd.as_mut().unwrap().try_wait().ok().flatten() {
                return Err(format!(
                    "tandem-wan ended ({st}): {}",
                    String::from_utf8_lossy(&w.fwd_err.lock().unwrap())
                ));
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err("tandem-wan did not start within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(w)
    }

    /// `ip netns exec NS_A`: prefix of a command run on the source host.
    pub fn in_a(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.ns_a]
    }

    /// `ip netns exec NS_B`: prefix of a command run on the destination host.
    pub fn in_b(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.ns_b]
    }

    /// Stop the forwarder; returns its per-direction counters (one line
    /// each, `tandem-wan A->B: forwarded=.. bytes=.. lost=.. queue_full=..`).
    pub fn stop(&mut self) -> String {
        let Some(mut child) = self.fwd.take() else {
            return String::new();
        };
        // SAFETY: signalling our own child process by its id.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(20));
        let out = String::from_utf8_lossy(&self.fwd_out.lock().unwrap()).into_owned();
        out
    }

    /// The forwarder's counters so far (it keeps running): the last two
    /// lines it printed after SIGUSR1.
    pub fn counters(&self) -> String {
        let Some(child) = self.fwd.as_ref() else {
            return String::new();
        };
        let before = self.fwd_out.lock().unwrap().len();
        // SAFETY: signalling our own child process by its id.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGUSR1) };
        let start = Instant::now();
        loop {
            let out = String::from_utf8_lossy(&self.fwd_out.lock().unwrap()[before..]).into_owned();
            if out.lines().count() >= 2 || start.elapsed() > Duration::from_secs(2) {
                return out;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// What the forwarder printed on stderr so far (start line, errors).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.fwd_err.lock().unwrap()).into_owned()
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.stop();
        for ns in [&self.ns_a, &self.ns_b, &self.ns_m] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Sum of `key=N` over the forwarder's counter lines.
pub fn counter(stats: &str, key: &str) -> u64 {
    stats
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}
