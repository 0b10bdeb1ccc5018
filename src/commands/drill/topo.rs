//! A drill's hosts on one machine: a network namespace per host and one
//! for the clients, all removed when the topology is dropped.
//!
//! ```text
//!   client network (ns PREFIX-c)          host X (ns PREFIX-X), one per host
//!   br0 10.0.2.2/24 ── hI ══veth══ cl ── brh ── tn0 (TAP of the VM, 10.0.2.15)
//!
//!   link J between hosts X and Y, subnet 10.(200+J).0.0/24:
//!   direct:  X: lJ .1  ══veth══  Y: lJ .2
//!   WAN:     X: lJ .1 ══ wa [tandem-wan in ns PREFIX-mJ] wb ══ Y: lJ .2
//! ```
//!
//! Every host's TAP is bridged to the client network, so the guest keeps
//! its address (10.0.2.15) wherever it runs and a migrated VM's RARP
//! announcement reaches the clients' bridge. Host-to-host traffic
//! (migration, lockstep) takes the links; a link with delay, loss or a
//! rate goes through `tandem-wan` (this kernel has no netem), with jumbo
//! frames and `gso_max_segs 1` as `tests/wan/README.md` describes.
//!
//! Namespaces are named `tandem-drill-PID-RUN-...`; the ones a killed drill
//! left behind (its PID gone) are removed by [`remove_stale`].

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The namespace name prefix of every drill.
pub const NS_PREFIX: &str = "tandem-drill-";
/// The TAP device of the VM on every host.
pub const TAP: &str = "tn0";
/// MTU of WAN links (see `tests/wan/README.md`).
const WAN_MTU: &str = "9000";

/// Run `ip ARGS`; the error names the command and its stderr.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "running ip {}: {e} (is iproute2 installed?)",
                args.join(" ")
            )
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Remove the namespaces of drills whose process is gone.
pub fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Make namespace `client` the client network (bridge `br0`,
/// 10.0.2.2/24) and join to it each namespace of `hosts`: a bridge `brh`
/// there holding the VM's TAP `tn0` and a veth (`cl`) whose other end
/// (`hI`) is on `br0`. All namespaces exist already (their `lo` up). The
/// mail tests (`tests/common/net.rs`) build their client network with this
/// too.
pub fn client_network(client: &str, hosts: &[&str]) -> Result<(), String> {
    let c = client;
    ip(&["-n", c, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", c, "addr", "add", "10.0.2.2/24", "dev", "br0"])?;
    ip(&["-n", c, "link", "set", "br0", "up"])?;
    for (i, h) in hosts.iter().enumerate() {
        ip(&["-n", h, "link", "add", "brh", "type", "bridge"])?;
        ip(&["-n", h, "link", "set", "brh", "up"])?;
        ip(&["-n", h, "tuntap", "add", "dev", TAP, "mode", "tap"])?;
        ip(&["-n", h, "link", "set", TAP, "master", "brh"])?;
        ip(&["-n", h, "link", "set", TAP, "up"])?;
        let hi = format!("h{i}");
        ip(&[
            "-n", c, "link", "add", &hi, "type", "veth", "peer", "name", "cl", "netns", h,
        ])?;
        ip(&["-n", c, "link", "set", &hi, "master", "br0"])?;
        ip(&["-n", c, "link", "set", &hi, "up"])?;
        ip(&["-n", h, "link", "set", "cl", "master", "brh"])?;
        ip(&["-n", h, "link", "set", "cl", "up"])?;
    }
    Ok(())
}

/// A link to build between hosts `a` and `b` (indices into the hosts).
#[derive(Debug, Clone)]
pub struct LinkSpec {
    pub a: usize,
    pub b: usize,
    pub rtt_ms: f64,
    pub loss_percent: f64,
    pub rate: Option<String>,
}

/// One built link.
#[derive(Debug)]
pub struct LinkNs {
    pub a: usize,
    pub b: usize,
    /// The device on both ends (`lJ`).
    pub dev: String,
    pub ip_a: String,
    pub ip_b: String,
    wan: Option<Child>,
}

/// The namespaces of one run; removed on drop.
#[derive(Debug)]
pub struct Topology {
    /// The clients' namespace.
    pub client_ns: String,
    /// Each host's namespace, in the scenario's order.
    pub hosts: Vec<String>,
    pub links: Vec<LinkNs>,
    /// Every namespace created (removed on drop).
    created: Vec<String>,
}

impl Topology {
    /// No namespaces: every host is this machine, its address 127.0.0.1
    /// (a drill run without root: no links to cut, no TAP).
    pub fn loopback(hosts: usize) -> Topology {
        Topology {
            client_ns: String::new(),
            hosts: vec![String::new(); hosts],
            links: Vec::new(),
            created: Vec::new(),
        }
    }

    /// Built by [`Topology::loopback`]?
    pub fn is_loopback(&self) -> bool {
        self.client_ns.is_empty()
    }

    /// Build the client network, `hosts` host namespaces bridged to it and
    /// the links. `wan_bin`: the `tandem-wan` forwarder (needed only by
    /// links with delay, loss or a rate); `seed` seeds its loss.
    pub fn build(
        run: &str,
        hosts: usize,
        links: &[LinkSpec],
        wan_bin: Option<&std::path::Path>,
        seed: u64,
    ) -> Result<Topology, String> {
        let prefix = format!("{NS_PREFIX}{}-{run}", std::process::id());
        let mut t = Topology {
            client_ns: format!("{prefix}-c"),
            hosts: (0..hosts).map(|i| format!("{prefix}-h{i}")).collect(),
            links: Vec::new(),
            created: Vec::new(),
        };
        let c = t.client_ns.clone();
        t.add_ns(&c)?;
        for h in t.hosts.clone() {
            t.add_ns(&h)?;
        }
        let hosts: Vec<&str> = t.hosts.iter().map(String::as_str).collect();
        client_network(&c, &hosts)?;
        for (j, l) in links.iter().enumerate() {
            let link = t.add_link(&prefix, j, l, wan_bin, seed)?;
            t.links.push(link);
        }
        Ok(t)
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        ip(&["netns", "add", name])?;
        self.created.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn add_link(
        &mut self,
        prefix: &str,
        j: usize,
        l: &LinkSpec,
        wan_bin: Option<&std::path::Path>,
        seed: u64,
    ) -> Result<LinkNs, String> {
        let (na, nb) = (self.hosts[l.a].clone(), self.hosts[l.b].clone());
        let dev = format!("l{j}");
        let net = 200 + j;
        let (ip_a, ip_b) = (format!("10.{net}.0.1"), format!("10.{net}.0.2"));
        let shaped = l.rtt_ms > 0.0 || l.loss_percent > 0.0 || l.rate.is_some();
        let mut wan = None;
        if !shaped {
            ip(&[
                "-n", &na, "link", "add", &dev, "type", "veth", "peer", "name", &dev, "netns", &nb,
            ])?;
        } else {
            let bin = wan_bin.ok_or_else(|| {
                "a link with rtt_ms, loss_percent or rate needs tandem-wan beside tandem (cargo build --release --bins)".to_string()
            })?;
            let m = format!("{prefix}-m{j}");
            self.add_ns(&m)?;
            for (mid, ns) in [("wa", &na), ("wb", &nb)] {
                ip(&[
                    "-n", &m, "link", "add", mid, "type", "veth", "peer", "name", &dev, "netns", ns,
                ])?;
                for (n, d) in [(&m, mid), (ns, dev.as_str())] {
                    ip(&[
                        "-n",
                        n,
                        "link",
                        "set",
                        "dev",
                        d,
                        "mtu",
                        WAN_MTU,
                        "gso_max_segs",
                        "1",
                    ])?;
                }
                ip(&["-n", &m, "link", "set", mid, "up"])?;
            }
            wan = Some(start_wan(&m, bin, l, seed)?);
        }
        for (ns, addr) in [(&na, &ip_a), (&nb, &ip_b)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", &dev])?;
            ip(&["-n", ns, "link", "set", &dev, "up"])?;
        }
        Ok(LinkNs {
            a: l.a,
            b: l.b,
            dev,
            ip_a,
            ip_b,
            wan,
        })
    }

    /// The address of host `h` on the link to host `peer`.
    pub fn addr_towards(&self, h: usize, peer: usize) -> Option<&str> {
        if self.is_loopback() {
            return Some("127.0.0.1");
        }
        self.links.iter().find_map(|l| {
            if l.a == h && l.b == peer {
                Some(l.ip_a.as_str())
            } else if l.b == h && l.a == peer {
                Some(l.ip_b.as_str())
            } else {
                None
            }
        })
    }

    /// Every address of host `h` (for its certificate).
    pub fn addrs_of(&self, h: usize) -> Vec<String> {
        if self.is_loopback() {
            return vec!["127.0.0.1".into()];
        }
        let mut v = Vec::new();
        for l in &self.links {
            if l.a == h {
                v.push(l.ip_a.clone());
            }
            if l.b == h {
                v.push(l.ip_b.clone());
            }
        }
        v
    }

    /// Take every interface of host `h` down (`up`: back up): its links
    /// and its port on the client network — the plug pulled.
    pub fn set_host_links(&self, h: usize, up: bool) -> Result<(), String> {
        let state = if up { "up" } else { "down" };
        let ns = &self.hosts[h];
        ip(&["-n", ns, "link", "set", "cl", state])?;
        for l in self.links.iter().filter(|l| l.a == h || l.b == h) {
            ip(&["-n", ns, "link", "set", &l.dev, state])?;
        }
        Ok(())
    }

    #[allow(dead_code, reason = "the partition fault, which needs failover")]
    /// Cut (or heal) the link between hosts `a` and `b`.
    pub fn set_link(&self, a: usize, b: usize, up: bool) -> Result<(), String> {
        let state = if up { "up" } else { "down" };
        let l = self
            .links
            .iter()
            .find(|l| (l.a == a && l.b == b) || (l.a == b && l.b == a))
            .ok_or_else(|| format!("no link between hosts {a} and {b}"))?;
        ip(&["-n", &self.hosts[l.a], "link", "set", &l.dev, state])?;
        ip(&["-n", &self.hosts[l.b], "link", "set", &l.dev, state])
    }

    /// `ip netns exec NS PROGRAM` (ip execs the program: its PID is the
    /// program's); `ns` empty (loopback): the program itself.
    pub fn command(ns: &str, program: &std::path::Path) -> Command {
        if ns.is_empty() {
            return Command::new(program);
        }
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }
}

fn start_wan(ns: &str, bin: &std::path::Path, l: &LinkSpec, seed: u64) -> Result<Child, String> {
    let mut c = Topology::command(ns, bin);
    c.args(["--a", "wa", "--b", "wb"])
        .args(["--delay-ms", &(l.rtt_ms / 2.0).to_string()])
        .args(["--loss", &format!("{}%", l.loss_percent)])
        .args(["--seed", &seed.to_string()]);
    if let Some(r) = &l.rate {
        c.args(["--rate", r]);
    }
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let err = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut said = String::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains("forwarding between") => return Ok(child),
            Ok(line) => said.push_str(&line),
            Err(_) => {}
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("tandem-wan ended ({st}): {said}"));
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            return Err("tandem-wan did not start within 20 s".into());
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for l in &mut self.links {
            if let Some(mut w) = l.wan.take() {
                let _ = w.kill();
                let _ = w.wait();
            }
        }
        for ns in self.created.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
