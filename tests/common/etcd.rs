//! A real etcd (Debian's `etcd-server`, installed by `.ci/run`) for the
//! etcd arbiter's tests: one member on loopback, on free ports, with a
//! temporary data directory; killed when dropped (also when a test fails).
//! A missing `etcd` fails the test: it never passes without one.
//! [`Etcd::start_in`] runs it on a host of its own (a network namespace).

#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::cluster::collect;
use crate::common::TempDir;

/// What etcd prints once it answers clients (`--logger zap`).
const READY: &str = "serving client traffic";
/// Bound of the start (about 0.4 s here; a loaded host is slower).
const START: Duration = Duration::from_secs(30);

/// A running single-member etcd cluster.
pub struct Etcd {
    child: Child,
    log: Arc<Mutex<Vec<u8>>>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    _dir: TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Etcd {
    /// Start one and wait until it serves clients.
    pub fn start(tag: &str) -> Etcd {
        // A port taken between our probe and etcd's bind: try again.
        for _ in 0..3 {
            if let Some(e) = Etcd::try_start(tag) {
                return e;
            }
        }
        panic!("etcd did not start three times (see above)");
    }

    fn try_start(tag: &str) -> Option<Etcd> {
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        Etcd::spawn(tag, Command::new("etcd"), &url, url.clone(), &peer_url)
    }

    /// Start one in network namespace `ns` (its own host), serving clients
    /// on port 2379 of each of `ips`; `url` is the first of them.
    pub fn start_in(tag: &str, ns: &str, ips: &[&str]) -> Etcd {
        let urls: Vec<String> = ips.iter().map(|ip| format!("http://{ip}:2379")).collect();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "etcd"]);
        Etcd::spawn(
            tag,
            cmd,
            &urls.join(","),
            urls[0].clone(),
            "http://127.0.0.1:2380",
        )
        .unwrap_or_else(|| panic!("etcd did not start in {ns} (see above)"))
    }

    fn spawn(
        tag: &str,
        mut cmd: Command,
        clients: &str,
        url: String,
        peer_url: &str,
    ) -> Option<Etcd> {
        let dir = TempDir::new(tag);
        let mut child = cmd
            .args([
                "--name",
                "t",
                "--data-dir",
                &dir.s("data"),
                "--logger",
                "zap",
            ])
            .args([
                "--listen-client-urls",
                clients,
                "--advertise-client-urls",
                clients,
            ])
            .args(["--listen-peer-urls", peer_url])
            .args(["--initial-advertise-peer-urls", peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run etcd ({e}): install Debian's etcd-server (.ci/run does)")
            });
        let log = collect(child.stderr.take().unwrap());
        let etcd = Etcd {
            child,
            log,
            url,
            _dir: dir,
        };
        let start = Instant::now();
        let mut etcd = etcd;
        loop {
            if etcd.log().contains(READY) {
                return Some(etcd);
            }
            if let Ok(Some(st)) = etcd.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                eprintln!("etcd ended ({st}) before serving:\n{}", etcd.log());
                return None;
            }
            assert!(
                start.elapsed() < START,
                "etcd did not serve within {START:?}:\n{}",
                etcd.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What etcd printed.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// kill -9 it now (and reap it).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every claim (key, holder) in the etcd at `url`, asked from network
/// namespace `ns` (the test's own namespace cannot reach a host's).
pub fn claims_in(ns: &str, url: &str) -> Vec<(String, String)> {
    let path = format!("/var/run/netns/{ns}");
    let url = url.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns(2) on a namespace file we opened; it moves only this
        // thread (and the threads it starts: the arbiter's own) into it.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        failover::arbiter::EtcdArbiter::new(vec![url.clone()], Default::default())
            .claims()
            .unwrap_or_else(|e| panic!("reading the claims from {url}: {e}"))
    })
    .join()
    .unwrap()
}

/// A loopback URL nobody listens on (a port just freed).
pub fn dead_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}
