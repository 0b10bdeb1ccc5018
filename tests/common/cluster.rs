//! What the migration tests share: a running `tandem` whose output is
//! collected while it runs, a cluster CA with host certificates, the
//! `receive` / `run --api-socket` / `migrate` commands, disk images and two
//! network namespaces joined by a veth pair.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{arg, TempDir, TANDEM, TIMEOUT};

/// A running `tandem` whose output is collected by threads.
pub struct Proc {
    pub child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The threads reading stdout and stderr: finished at the pipes' end.
    readers: [JoinHandle<()>; 2],
    what: String,
}

pub fn collect<R: Read + Send + 'static>(r: R) -> Arc<Mutex<Vec<u8>>> {
    collect_to_end(r).0
}

/// [`collect`], with the reading thread (it ends at the end of `r`).
fn collect_to_end<R: Read + Send + 'static>(mut r: R) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (buf, reader)
}

impl Proc {
    pub fn spawn(prefix: &[&str], args: &[&str]) -> Proc {
        let mut cmd = if prefix.is_empty() {
            Command::new(TANDEM)
        } else {
            let mut c = Command::new(prefix[0]);
            c.args(&prefix[1..]).arg(TANDEM);
            c
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tandem");
        let (stdout, out_reader) = collect_to_end(child.stdout.take().unwrap());
        let (stderr, err_reader) = collect_to_end(child.stderr.take().unwrap());
        Proc {
            child,
            stdout,
            stderr,
            readers: [out_reader, err_reader],
            what: format!("{prefix:?} tandem {args:?}"),
        }
    }

    /// Once it ended: wait until everything it wrote has been read (its
    /// pipes reached their end; bounded, in case a process it started
    /// still holds them open).
    pub fn drain(&self) {
        let start = Instant::now();
        while !self.readers.iter().all(JoinHandle::is_finished)
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
    pub fn describe(&self) -> String {
        format!(
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            self.out(),
            self.err()
        )
    }

    /// Wait until `needle` shows up on stdout (`err`: stderr).
    #[track_caller]
    pub fn wait_for(&mut self, needle: &str, err: bool) -> String {
        let start = Instant::now();
        loop {
            let text = if err { self.err() } else { self.out() };
            if let Some(i) = text.find(needle) {
                return text[i + needle.len()..].to_string();
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                self.drain();
                let text = if err { self.err() } else { self.out() };
                if let Some(i) = text.find(needle) {
                    return text[i + needle.len()..].to_string();
                }
                panic!(
                    "ended ({st}) before printing {needle:?}\n{}",
                    self.describe()
                );
            }
            if start.elapsed() > TIMEOUT {
                panic!("timed out waiting for {needle:?}\n{}", self.describe());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Wait for the end; returns (status, stdout, stderr).
    #[track_caller]
    pub fn finish(mut self) -> (i32, String, String) {
        let start = Instant::now();
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > TIMEOUT {
                panic!("timed out\n{}", self.describe());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.drain();
        let code = st
            .code()
            .unwrap_or_else(|| panic!("killed: {st}\n{}", self.describe()));
        (code, self.out(), self.err())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A guest point to fail at (a `fill` guest's console): round 5..=(5+span) chosen from the clock.
pub fn random_round(span: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    5 + n % span
}

/// How many `round` lines a console holds.
pub fn rounds(text: &str) -> usize {
    text.matches("round ").count()
}

/// `before` (the old primary's console) followed by `after` (the new
/// primary's), with the lines produced again at the boundary counted once.
pub fn joined(before: &str, after: &str) -> String {
    let b: Vec<&str> = before.lines().collect();
    let a: Vec<&str> = after.lines().collect();
    let overlap = (0..=b.len().min(a.len()))
        .rev()
        .find(|&k| b[b.len() - k..] == a[..k])
        .unwrap_or(0);
    let mut all: Vec<&str> = b.clone();
    all.extend_from_slice(&a[overlap..]);
    all.iter().map(|l| format!("{l}\n")).collect()
}

/// A cluster CA with host certificates.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    pub fn new(hosts: &[&str], sans: &[&str]) -> Pki {
        let dir = TempDir::new("pki");
        let d = arg(dir.path()).to_string();
        run_ok(&["certs", "init", "--dir", &d]);
        for h in hosts {
            let mut args = vec!["certs", "issue", "--dir", &d, "--name", h];
            for s in sans {
                args.push("--san");
                args.push(s);
            }
            run_ok(&args);
        }
        Pki { dir }
    }
    /// A channel connection to `addr` as `host` in `role` (a hand-made
    /// peer, to send what a real one never would).
    pub fn connect(
        &self,
        addr: &str,
        host: &str,
        role: failover::channel::Role,
    ) -> failover::channel::BlockingConnection {
        let dir = self.dir.path();
        let creds = failover::certs::Credentials::load(
            &dir.join("ca.pem"),
            &dir.join(format!("{host}.pem")),
            &dir.join(format!("{host}.key")),
        )
        .unwrap();
        let cfg = failover::channel::ChannelConfig::new(role, host);
        failover::channel::BlockingConnection::connect(
            addr.parse().unwrap(),
            "127.0.0.1",
            &creds,
            &cfg,
        )
        .unwrap()
    }

    /// `--ca --cert --key` of `host`.
    pub fn creds(&self, host: &str) -> Vec<String> {
        vec![
            "--ca".into(),
            self.dir.s("ca.pem"),
            "--cert".into(),
            self.dir.s(&format!("{host}.pem")),
            "--key".into(),
            self.dir.s(&format!("{host}.key")),
        ]
    }
}

#[track_caller]
pub fn run_ok(args: &[&str]) -> String {
    let out = Command::new(TANDEM)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tandem {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Console output of an unmigrated run.
pub fn reference(cmdline: &str, disk: Option<&Path>) -> String {
    let mut args = vec!["run", "--cmdline", cmdline];
    let d;
    if let Some(p) = disk {
        d = p.to_string_lossy().into_owned();
        args.push("--disk");
        args.push(&d);
    }
    run_ok(&args)
}

/// Start `tandem receive` (with `prefix`, e.g. `ip netns exec NS`) and
/// return it with the address it listens on.
pub fn receiver(prefix: &[&str], listen: &str, creds: &[String], extra: &[&str]) -> (Proc, String) {
    let mut args: Vec<&str> = vec!["receive", "--listen", listen];
    args.extend(creds.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(prefix, &args);
    let mut rest = p.wait_for("waiting for a VM on ", true);
    while !rest.contains('\n') {
        std::thread::sleep(Duration::from_millis(2));
        rest = p.wait_for("waiting for a VM on ", true);
    }
    let addr = rest.lines().next().unwrap().trim().to_string();
    (p, addr)
}

/// Start `tandem run --api-socket` and wait until the socket accepts
/// connections (its file exists a moment before it listens).
pub fn source(prefix: &[&str], sock: &str, cmdline: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["run", "--cmdline", cmdline, "--api-socket", sock];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(prefix, &args);
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Ok(Some(_)) = p.child.try_wait() {
            panic!("source ended early\n{}", p.describe());
        }
        assert!(start.elapsed() < TIMEOUT, "no API socket\n{}", p.describe());
        std::thread::sleep(Duration::from_millis(2));
    }
    p
}

/// `tandem migrate`; returns (status, stdout, stderr).
pub fn migrate(sock: &str, to: &str, creds: &[String], extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["migrate", "--api", sock, "--to", to];
    args.extend(creds.iter().map(String::as_str));
    args.extend_from_slice(extra);
    run_tandem(&args)
}

/// `tandem protect --api SOCK --to ADDR CREDS EXTRA`; returns (status,
/// stdout, stderr).
pub fn protect(sock: &str, to: &str, creds: &[String], extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["protect", "--api", sock, "--to", to];
    args.extend(creds.iter().map(String::as_str));
    args.extend_from_slice(extra);
    run_tandem(&args)
}

/// Run `tandem ARGS` to completion; returns (status, stdout, stderr).
pub fn run_tandem(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(TANDEM)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A disk image with data in some blocks and zeros in others.
pub fn make_disk(path: &Path, len: usize) {
    let mut data = vec![0u8; len];
    for (i, chunk) in data.chunks_mut(65536).enumerate() {
        if i % 3 != 0 {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i * 31 + j / 512) as u8 | 1;
            }
        }
    }
    std::fs::write(path, data).unwrap();
}
/// Two network namespaces joined by a veth pair (`va` in `a`, `vb` in
/// `b`).
pub struct Netns {
    pub a: String,
    pub b: String,
    pub va: String,
    pub vb: String,
    subnet: u8,
}

impl Netns {
    pub fn new(tag: &str, subnet: u8) -> Option<Netns> {
        let ok = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(&["netns", "list"]) {
            return None;
        }
        let id = std::process::id() % 100_000;
        let (va, vb) = (format!("tva{subnet}.{id}"), format!("tvb{subnet}.{id}"));
        let n = Netns {
            a: format!("tandem-a-{tag}-{id}"),
            b: format!("tandem-b-{tag}-{id}"),
            va: va.clone(),
            vb: vb.clone(),
            subnet,
        };
        let (ipa, ipb) = (format!("10.{subnet}.0.1/24"), format!("10.{subnet}.0.2/24"));
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &n.a],
            vec!["netns", "add", &n.b],
            vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
            vec!["link", "set", &va, "netns", &n.a],
            vec!["link", "set", &vb, "netns", &n.b],
            vec!["-n", &n.a, "addr", "add", &ipa, "dev", &va],
            vec!["-n", &n.b, "addr", "add", &ipb, "dev", &vb],
            vec!["-n", &n.a, "link", "set", &va, "up"],
            vec!["-n", &n.b, "link", "set", &vb, "up"],
            vec!["-n", &n.a, "link", "set", "lo", "up"],
            vec!["-n", &n.b, "link", "set", "lo", "up"],
        ];
        for s in steps {
            if !ok(&s) {
                eprintln!("netns setup failed at ip {s:?}");
                return None;
            }
        }
        Some(n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A third host `ns` joined by veth to both hosts of a [`Netns`] pair:
/// device `xl` on A (10.S.1.1) to `xa` on it (10.S.1.2), `xl` on B
/// (10.S.2.1) to `xb` on it (10.S.2.2). Removed on drop.
pub struct ThirdHost {
    pub ns: String,
    /// Its address seen from A, and from B.
    pub ip_from_a: String,
    pub ip_from_b: String,
}

/// The device of A and of B towards the [`ThirdHost`].
pub const TO_THIRD: &str = "xl";

impl ThirdHost {
    #[track_caller]
    pub fn new(pair: &Netns, tag: &str) -> ThirdHost {
        let s = pair.subnet;
        let t = ThirdHost {
            ns: format!("tandem-x-{tag}-{}", std::process::id() % 100_000),
            ip_from_a: format!("10.{s}.1.2"),
            ip_from_b: format!("10.{s}.2.2"),
        };
        let x = t.ns.as_str();
        ip_ok(&["netns", "add", x]);
        ip_ok(&["-n", x, "link", "set", "lo", "up"]);
        for (host, dev, net) in [(&pair.a, "xa", 1), (&pair.b, "xb", 2)] {
            ip_ok(&[
                "-n", host, "link", "add", TO_THIRD, "type", "veth", "peer", "name", dev, "netns",
                x,
            ]);
            ip_ok(&[
                "-n",
                host,
                "addr",
                "add",
                &format!("10.{s}.{net}.1/24"),
                "dev",
                TO_THIRD,
            ]);
            ip_ok(&[
                "-n",
                x,
                "addr",
                "add",
                &format!("10.{s}.{net}.2/24"),
                "dev",
                dev,
            ]);
            ip_ok(&["-n", host, "link", "set", TO_THIRD, "up"]);
            ip_ok(&["-n", x, "link", "set", dev, "up"]);
        }
        t
    }
}

impl Drop for ThirdHost {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[track_caller]
fn ip_ok(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A partition by nftables in namespace `ns`: every packet in or out of
/// `dev` dropped (100% loss, no error to either side), until [`heal`].
#[track_caller]
pub fn cut(ns: &str, dev: &str) {
    let table = nft_table(dev);
    let rules = format!(
        "table inet {table} {{\n\
         chain i {{ type filter hook input priority -10; policy accept; iifname \"{dev}\" drop; }}\n\
         chain o {{ type filter hook output priority -10; policy accept; oifname \"{dev}\" drop; }}\n\
         }}\n"
    );
    nft(ns, &["-f", "-"], &rules);
}

/// Undo [`cut`].
#[track_caller]
pub fn heal(ns: &str, dev: &str) {
    nft(ns, &["delete", "table", "inet", &nft_table(dev)], "");
}

fn nft_table(dev: &str) -> String {
    let d: String = dev
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("tandem_cut_{d}")
}

#[track_caller]
fn nft(ns: &str, args: &[&str], stdin: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft (Debian's nftables, installed by .ci/run)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft {args:?} in {ns}: {}\n{stdin}",
        String::from_utf8_lossy(&out.stderr)
    );
}
#[track_caller]
pub fn same_image(path: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(path).unwrap();
    assert_eq!(got.len(), want.len(), "{what}: size");
    let first_diff = want.iter().zip(&got).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "{what}: first differing byte");
}

/// The guest's own progress: the `dirty` workload's `round K` lines.
impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Has it ended?
    pub fn ended(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The last `round K` the guest printed (0 before the first).
    pub fn rounds(&self) -> u64 {
        let out = self.out();
        out.rsplit("round ")
            .find_map(|rest| rest.split_once('\n')?.0.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Wait until the guest printed `round n`.
    #[track_caller]
    pub fn wait_round(&mut self, n: u64) {
        let start = Instant::now();
        while self.rounds() < n {
            assert!(
                !self.ended() && start.elapsed() < TIMEOUT,
                "never reached round {n}\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// How long the guest takes for its next `n` rounds.
    #[track_caller]
    pub fn time_rounds(&mut self, n: u64) -> Duration {
        let r0 = self.rounds();
        let t0 = Instant::now();
        self.wait_round(r0 + n);
        t0.elapsed()
    }

    /// Wait (bounded by TIMEOUT) until `cond` holds; fails if the process
    /// ends first (unless `cond` holds once its last output is read).
    #[track_caller]
    pub fn wait_until(&mut self, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.drain();
                if cond() {
                    return;
                }
                panic!("ended ({st}) while waiting for {what}\n{}", self.describe());
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "timed out: {what}\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Send `sig` to it.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill({}, {sig})", self.pid());
    }
}

/// `tandem migrate --api SOCK --to ADDR CREDS EXTRA` in the background.
pub fn start_migrate(sock: &str, to: &str, creds: &[String], extra: &[&str]) -> Proc {
    let mut args = vec!["migrate", "--api", sock, "--to", to];
    args.extend(creds.iter().map(String::as_str));
    args.extend_from_slice(extra);
    Proc::spawn(&[], &args)
}

/// `tandem status --json` of the VM at `sock`, parsed.
#[track_caller]
pub fn status(sock: &str) -> serde_json::Value {
    let (code, out, err) = run_tandem(&["status", "--api", sock, "--json"]);
    assert_eq!(code, 0, "tandem status: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
}

/// Poll the status of `sock` until `cond` holds on it; returns that status.
#[track_caller]
pub fn wait_status(
    sock: &str,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = status(sock);
        if cond(&s) {
            return s;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "never saw {what}; last status {s}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Start `tandem secondary --listen LISTEN` (with `prefix`, e.g. `ip netns
/// exec NS`) and return it with the address it listens on.
pub fn secondary(
    prefix: &[&str],
    listen: &str,
    creds: &[String],
    extra: &[&str],
) -> (Proc, String) {
    let mut args: Vec<&str> = vec!["secondary", "--listen", listen];
    args.extend(creds.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(prefix, &args);
    let needle = "waiting for a primary on ";
    let mut rest = p.wait_for(needle, true);
    while !rest.contains('\n') {
        std::thread::sleep(Duration::from_millis(2));
        rest = p.wait_for(needle, true);
    }
    let addr = rest.lines().next().unwrap().trim().to_string();
    (p, addr)
}

/// Start `tandem run --cmdline CMDLINE --protect-to ADDR CREDS EXTRA` (with
/// `prefix`): a VM protected from boot by the secondary at `addr`.
pub fn protected_primary(
    prefix: &[&str],
    cmdline: &str,
    addr: &str,
    creds: &[String],
    extra: &[&str],
) -> Proc {
    let mut args: Vec<&str> = vec!["run", "--cmdline", cmdline, "--protect-to", addr];
    args.extend(creds.iter().map(String::as_str));
    args.extend_from_slice(extra);
    Proc::spawn(prefix, &args)
}

/// The mail VM protected from boot across `hosts`: the secondary on host
/// B (listening on `listen`, its disk `disks.1`, its `--net` the TAP
/// `tn0`), the primary on host A (disk `disks.0`, NIC on `tn0` with
/// `mac`), each with its extra arguments; returns (primary, secondary) once
/// the guest's mail server is ready.
pub fn protected_mail(
    hosts: &Netns,
    listen: &str,
    pki: &Pki,
    disks: (&Path, &Path),
    mac: &str,
    (pri_extra, sec_extra): (&[&str], &[&str]),
) -> (Proc, Proc) {
    let pa = ["ip", "netns", "exec", hosts.a.as_str()];
    let pb = ["ip", "netns", "exec", hosts.b.as_str()];
    let mut args = vec!["--disk", arg(disks.1), "--net", "tap=tn0"];
    args.extend_from_slice(sec_extra);
    let (sec, addr) = secondary(&pb, listen, &pki.creds("b"), &args);
    let net_arg = format!("tap=tn0,mac={mac}");
    let mut args = vec!["--net", &net_arg, "--disk", arg(disks.0)];
    args.extend_from_slice(pri_extra);
    let mut pri = protected_primary(&pa, "mail", &addr, &pki.creds("a"), &args);
    pri.wait_for("mail ready", false);
    (pri, sec)
}

/// [`secondary`] listening on loopback (any port).
pub fn loopback_secondary(creds: &[String], extra: &[&str]) -> (Proc, String) {
    secondary(&[], "127.0.0.1:0", creds, extra)
}

/// The `final state digest` a process printed.
#[track_caller]
pub fn final_digest(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("tandem: final state digest "))
        .unwrap_or_else(|| panic!("no final digest in\n{stderr}"))
        .to_string()
}

/// Wait for CHILD to end (and its output readers to drain).
#[track_caller]
pub fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < TIMEOUT, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(50));
    status
}

/// One SMTP session of `mail_client.py stream`: message after message over
/// one connection, `sent K` after each 250, until its stop file exists.
pub struct MailStream {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    stop: std::path::PathBuf,
    /// When each `sent K` line arrived (the client's 250s, in order).
    times: Arc<Mutex<Vec<Instant>>>,
}

impl MailStream {
    /// Start it with `python3` (`cmd`, e.g. `ip netns exec C python3`) and
    /// the client script `script`; messages of `size` bytes, at most
    /// `limit`; it stops once `stop` exists.
    pub fn start(mut cmd: Command, script: &Path, size: usize, stop: &Path, limit: usize) -> Self {
        let mut child = cmd
            .arg(script)
            .args(["stream", &size.to_string(), arg(stop), &limit.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        let out = Arc::new(Mutex::new(Vec::new()));
        let times = Arc::new(Mutex::new(Vec::new()));
        let (o, t) = (out.clone(), times.clone());
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.starts_with("sent ") {
                    t.lock().unwrap().push(Instant::now());
                }
                let mut o = o.lock().unwrap();
                o.extend_from_slice(line.as_bytes());
                o.push(b'\n');
            }
        });
        let err = collect(child.stderr.take().unwrap());
        MailStream {
            child,
            out,
            err,
            stop: stop.to_path_buf(),
            times,
        }
    }

    /// When each 250 so far arrived (`sent K` is element K-1).
    pub fn times(&self) -> Vec<Instant> {
        self.times.lock().unwrap().clone()
    }

    /// The number K of the last `sent K` line: messages that got 250.
    pub fn sent(&self) -> usize {
        let text = String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned();
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix("sent ")?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Wait until N messages got 250 (failing, with `describe()`, if the
    /// client ends first or the time runs out).
    #[track_caller]
    pub fn wait_sent(&mut self, n: usize, describe: &dyn Fn() -> String) {
        let start = Instant::now();
        while self.sent() < n {
            let ended = self.child.try_wait().unwrap();
            assert!(
                ended.is_none() && start.elapsed() < TIMEOUT,
                "client at {} of {n} messages ({ended:?})\n{}\n{}",
                self.sent(),
                String::from_utf8_lossy(&self.err.lock().unwrap()),
                describe()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop it; it must end the session cleanly (QUIT/221, never reset).
    /// Returns how many messages it sent.
    #[track_caller]
    pub fn finish(mut self, describe: &dyn Fn() -> String) -> usize {
        std::fs::write(&self.stop, b"").unwrap();
        let status = wait_exit(&mut self.child, "the mail client never quit");
        let text = String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned();
        assert!(
            status.success(),
            "the SMTP session failed ({status})\n{text}\n{}\n{}",
            String::from_utf8_lossy(&self.err.lock().unwrap()),
            describe()
        );
        text.lines()
            .find_map(|l| l.strip_prefix("streamed ")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `streamed` line: {text}"))
    }
}

impl Drop for MailStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every claim of a `file:` arbiter directory: (file name, holder), by
/// name.
pub fn file_claims(dir: &Path) -> Vec<(String, String)> {
    let mut claims: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        // The arbiter's id file aside.
        .filter(|p| p.extension().is_some_and(|x| x == "claim"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let holder = text
                .lines()
                .find_map(|l| l.strip_prefix("holder "))
                .unwrap_or_else(|| panic!("no holder in {text}"))
                .to_string();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, holder)
        })
        .collect();
    claims.sort();
    claims
}

/// `tandem unprotect --api SOCK` of the primary `pri`; its secondary `sec`
/// must then end (status 0) having verified the replay to the end of the
/// log. Returns the secondary's stderr.
#[track_caller]
pub fn unprotect_verified(sock: &str, pri: &Proc, sec: Proc) -> String {
    let (code, out, err) = run_tandem(&["unprotect", "--api", sock]);
    assert_eq!(code, 0, "unprotect\n{out}\n{err}\n{}", pri.describe());
    let (scode, _, serr) = sec.finish();
    assert_eq!(scode, 0, "secondary\n{serr}");
    assert!(
        serr.contains("ended protection") && serr.contains("replay verified"),
        "{serr}"
    );
    serr
}
