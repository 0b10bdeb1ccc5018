//! Network test topology: a network namespace per test holding a TAP
//! (host side 10.0.2.2/24) for the VM, and the guest (10.0.2.15) run by
//! Tandem (`tandem run --net tap=...`) — or, for development and the
//! benchmark, by QEMU (`-M microvm` with virtio-mmio devices and a TAP
//! netdev). Clients run inside the namespace (`ip netns exec`), so test
//! traffic never leaves it.

#![allow(dead_code)]

/// The drill's topology code (`tandem drill`), shared with the tests.
#[path = "../../src/commands/drill/topo.rs"]
mod topo;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The TAP device's name inside every test namespace.
pub const TAP: &str = "tm0";
/// The guest's address (its default `ip=`).
pub const GUEST_IP: &str = "10.0.2.15";

/// The Python client (smtplib, poplib, echo), written next to the test.
pub const MAIL_CLIENT: &str = include_str!("../mail_client.py");

/// Capture RARP frames (ethertype 0x8035) from MAC on IF until N were seen
/// or SECS passed; prints `listening`, then one line per frame.
pub const RARP_WAIT: &str = r#"
import socket, sys, time
ifname, mac, n, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035))
s.bind((ifname, 0))
s.settimeout(0.1)
print("listening", flush=True)
end = time.time() + secs
seen = 0
while seen < n and time.time() < end:
    try:
        f = s.recv(2048)
    except socket.timeout:
        continue
    src = f[6:12].hex(":")
    print("rarp", src, f[12:14].hex(), flush=True)
    if src == mac:
        seen += 1
"#;

/// Run `ip ARGS`, failing the test (with its stderr) unless it succeeds.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a persistent TAP `tm0` (10.0.2.2/24, up);
/// deleted (with the TAP) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "t{tag}{}-{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ip(&["-n", &ns.name, "tuntap", "add", "dev", TAP, "mode", "tap"]);
        ip(&["-n", &ns.name, "addr", "add", "10.0.2.2/24", "dev", TAP]);
        ip(&["-n", &ns.name, "link", "set", TAP, "up"]);
        ns
    }

    /// `ip netns exec NAME PROGRAM ...`
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Run the mail client (`tests/mail_client.py ARGS`) in the namespace.
    pub fn client(&self, dir: &Path, args: &[&str]) -> Output {
        let script = dir.join("mail_client.py");
        if !script.exists() {
            std::fs::write(&script, MAIL_CLIENT).expect("writing mail_client.py");
        }
        self.command("python3")
            .arg(&script)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running python3")
    }

    /// Like `client`, failing the test (with the guest's console) unless
    /// the client succeeds; returns its stdout.
    #[track_caller]
    pub fn client_ok(&self, dir: &Path, vm: &Vm, args: &[&str]) -> String {
        let out = self.client(dir, args);
        assert!(
            out.status.success(),
            "mail_client.py {args:?} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- guest console ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            vm.console()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl NetNs {
    /// POP3 from this namespace: the mailbox holds exactly the messages
    /// 1..=TOTAL of SIZE bytes a `stream` session sent, byte for byte.
    #[track_caller]
    pub fn check_stream(&self, dir: &Path, total: usize, size: usize, describe: &str) {
        let mut check = vec!["check".to_string()];
        check.extend((1..=total).map(|k| format!("{k}:{size}")));
        let check: Vec<&str> = check.iter().map(String::as_str).collect();
        let out = self.client(dir, &check);
        let got = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && got.contains(&format!("checked {total} messages")),
            "POP3 check failed\n{got}\n{}\n{describe}",
            String::from_utf8_lossy(&out.stderr),
        );
    }
}

/// A capture of the RARP announcements on the client bridge `br0`.
pub struct RarpWatch {
    child: Child,
    out: PathBuf,
    mac: String,
}

impl NetNs {
    /// Watch `br0` for RARP frames from MAC (until N were seen, at most
    /// 120 s); returns once the capture listens.
    pub fn rarp_watch(&self, dir: &Path, mac: &str, n: usize) -> RarpWatch {
        static K: AtomicU64 = AtomicU64::new(0);
        let out = dir.join(format!("rarp-{}.txt", K.fetch_add(1, Ordering::Relaxed)));
        let child = self
            .command("python3")
            .args(["-c", RARP_WAIT, "br0", mac, &n.to_string(), "120"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("creating the capture's file"))
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let start = Instant::now();
        while !std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("listening")
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the RARP capture never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        RarpWatch {
            child,
            out,
            mac: mac.to_string(),
        }
    }
}

impl NetNs {
    /// The port of `bridge` (in this namespace) whose forwarding entry
    /// holds `mac`, if it has one (`bridge fdb show`).
    pub fn fdb_port(&self, bridge: &str, mac: &str) -> Option<String> {
        let out = self
            .command("bridge")
            .args(["fdb", "show", "br", bridge])
            .output()
            .expect("running bridge (iproute2)");
        assert!(out.status.success(), "bridge fdb show failed");
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(mac) && w.next() == Some("dev"))
                .then(|| w.next().unwrap_or_default().to_string())
        })
    }
}

impl RarpWatch {
    /// Wait for the capture's end: (frames from the MAC seen, what it
    /// printed).
    #[track_caller]
    pub fn finish(mut self) -> (usize, String) {
        let st = self.child.wait().expect("waiting for the RARP capture");
        let lines = std::fs::read_to_string(&self.out).unwrap_or_default();
        assert!(st.success(), "the RARP capture failed ({st})\n{lines}");
        let want = format!("rarp {} 8035", self.mac);
        (lines.lines().filter(|l| *l == want).count(), lines)
    }
}

impl Drop for RarpWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Vmm {
    Tandem,
    Qemu,
    /// QEMU with TCG and `-icount shift=0` (one virtual ns per guest
    /// instruction) and the guest's `tsc-stats`: its busy TSC cycles are
    /// instruction counts.
    QemuIcount,
}

/// Which VMM runs the tests' guests: Tandem, unless
/// `TANDEM_NET_TEST_VMM=qemu` (a development aid).
pub fn test_vmm() -> Vmm {
    match std::env::var("TANDEM_NET_TEST_VMM").as_deref() {
        Ok("qemu") => Vmm::Qemu,
        _ => Vmm::Tandem,
    }
}

/// QEMU microvm (ioapic2=off: 8 virtio-mmio transports at 0xfeb00000 +
/// n * 0x200 on IRQ 5 + n, filled from the top: the first device on the
/// command line, virtio-net, lands in slot 7, virtio-blk in slot 6).
pub const QEMU_GUEST_ARGS: &str = "extint virtio=0xfeb00c00,11 virtio-net=0xfeb00e00,12";

/// A running guest; killed on drop.
pub struct Vm {
    child: Option<Child>,
    pub console: PathBuf,
    pub vmm: Vmm,
}

pub struct VmConfig<'a> {
    pub vmm: Vmm,
    pub cmdline: &'a str,
    pub disk: Option<&'a Path>,
    pub dir: &'a Path,
    /// Extra arguments for `tandem run` (e.g. a record log).
    pub tandem_cmd: &'a [&'a str],
}

impl Vm {
    /// Start the guest in `ns` and wait until its console shows `ready`.
    pub fn start(ns: &NetNs, cfg: &VmConfig, ready: &str) -> Vm {
        static N: AtomicU64 = AtomicU64::new(0);
        let console = cfg
            .dir
            .join(format!("console-{}.txt", N.fetch_add(1, Ordering::Relaxed)));
        let child = match cfg.vmm {
            Vmm::Tandem => {
                let tandem = env!("CARGO_BIN_EXE_tandem");
                let mut c = ns.command(tandem);
                if cfg.tandem_cmd.is_empty() {
                    c.arg("run");
                } else {
                    c.args(cfg.tandem_cmd);
                }
                c.args(["--net", &format!("tap={TAP}")]);
                c.args(["--mem-mib", "64", "--cmdline", cfg.cmdline]);
                c.arg("--serial").arg(format!("file:{}", console.display()));
                if let Some(d) = cfg.disk {
                    c.arg("--disk").arg(d);
                }
                c.env_remove("TANDEM_LOG")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("starting tandem")
            }
            Vmm::Qemu | Vmm::QemuIcount => {
                let elf = cfg.dir.join("guest.elf");
                if !elf.exists() {
                    let st = Command::new(env!("CARGO_BIN_EXE_tandem"))
                        .args(["guest-elf", "--out"])
                        .arg(&elf)
                        .status()
                        .expect("tandem guest-elf");
                    assert!(st.success(), "tandem guest-elf failed");
                }
                let mut c = ns.command("qemu-system-x86_64");
                if cfg.vmm == Vmm::QemuIcount {
                    c.args(["-accel", "tcg", "-icount", "shift=0"]);
                } else {
                    c.arg("-enable-kvm");
                }
                c.args([
                    "-M",
                    "microvm,x-option-roms=off,pit=on,pic=on,rtc=off,isa-serial=on,ioapic2=off",
                    "-cpu",
                    "max",
                    "-m",
                    "64",
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-no-reboot",
                    "-global",
                    "virtio-mmio.force-legacy=false",
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=4",
                    "-netdev",
                    &format!("tap,id=n0,ifname={TAP},script=no,downscript=no"),
                    "-device",
                    "virtio-net-device,netdev=n0",
                ]);
                if let Some(d) = cfg.disk {
                    c.arg("-drive")
                        .arg(format!("if=none,id=d0,format=raw,file={}", d.display()));
                    c.args(["-device", "virtio-blk-device,drive=d0"]);
                }
                c.arg("-serial").arg(format!("file:{}", console.display()));
                c.arg("-kernel").arg(&elf);
                let extra = if cfg.vmm == Vmm::QemuIcount {
                    " tsc-stats"
                } else {
                    ""
                };
                c.arg("-append")
                    .arg(format!("{} {QEMU_GUEST_ARGS}{extra}", cfg.cmdline));
                c.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("starting qemu-system-x86_64")
            }
        };
        let mut vm = Vm {
            child: Some(child),
            console,
            vmm: cfg.vmm,
        };
        vm.wait_console(ready, Duration::from_secs(120));
        vm
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Wait until the console contains `needle`; fails if the VMM exits
    /// first or the time runs out (a hang).
    #[track_caller]
    pub fn wait_console(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.console().contains(needle) {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    let err = child
                        .stderr
                        .take()
                        .map(|mut e| {
                            let mut s = String::new();
                            let _ = std::io::Read::read_to_string(&mut e, &mut s);
                            s
                        })
                        .unwrap_or_default();
                    panic!(
                        "{:?} exited ({st}) before printing {needle:?}\n--- console ---\n{}\n--- stderr ---\n{err}",
                        self.vmm,
                        self.console()
                    );
                }
            }
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} on the console within {timeout:?}\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait for the VMM to end; returns its exit status and
    /// stderr.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("vm already stopped");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let start = Instant::now();
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("{:?} did not end within 30 s of SIGTERM", self.vmm);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status, err)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The client network: netns `C` with bridge `br0` (10.0.2.2/24), and the
/// bridges of the host namespaces `hosts` (TAP `tn0` on each) joined to it
/// by veth — built by the same code as `tandem drill`'s hosts.
pub fn client_network(tag: &str, hosts: &[&str]) -> NetNs {
    let id = std::process::id() % 100_000;
    let c = NetNs {
        name: format!("tandem-c-{tag}-{id}"),
    };
    ip(&["netns", "add", &c.name]);
    ip(&["-n", &c.name, "link", "set", "lo", "up"]);
    if let Err(e) = topo::client_network(&c.name, hosts) {
        panic!("building the client network: {e}");
    }
    c
}
