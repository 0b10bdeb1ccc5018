//! A protected pair over loopback with one arbiter: a `file:` directory
//! in the test's temporary directory, or a real etcd started for the test.
//! The fixture of the failover and switchover tests. Include it with
//! `#[path = "common/etcd.rs"] mod etcd;` and
//! `#[path = "common/pair.rs"] mod pair;` (it names the etcd module).

#![allow(dead_code)]

use crate::common::cluster::{file_claims, loopback_secondary, protect, wait_status, Pki, Proc};
use crate::common::TempDir;
use crate::etcd;

/// Heartbeat and timeout of these tests: the defaults (the tests run
/// beside each other on a loaded host; a shorter timeout failed over
/// falsely there once).
pub const TIMING: [&str; 4] = ["--heartbeat-ms", "50", "--failover-timeout-ms", "1000"];

/// A temporary directory, certificates for `pri`, `sec` and `third`, and
/// the arbiter every side is given.
pub struct Pair {
    pub dir: TempDir,
    pub pki: Pki,
    pub arbiter: String,
    /// The arbiter's etcd, for `--arbiter etcd:...`.
    pub etcd: Option<etcd::Etcd>,
}

impl Pair {
    pub fn new(tag: &str) -> Pair {
        let dir = TempDir::new(tag);
        std::fs::create_dir(dir.file("arbiter")).unwrap();
        let arbiter = format!("file:{}", dir.s("arbiter"));
        Pair {
            dir,
            pki: Pki::new(&["pri", "sec", "third"], &[]),
            arbiter,
            etcd: None,
        }
    }

    /// With `--arbiter SPEC` (`None`: `etcd:` on a real etcd started for
    /// the test, with `query` after its URL).
    pub fn with_arbiter(tag: &str, spec: Option<&str>, query: &str) -> Pair {
        let mut pair = Pair::new(tag);
        match spec {
            Some(s) => pair.arbiter = s.to_string(),
            None => {
                let e = etcd::Etcd::start(tag);
                pair.arbiter = format!("etcd:{}{query}", e.url);
                pair.etcd = Some(e);
            }
        }
        pair
    }

    /// The secondary (live console to `live.txt`).
    pub fn secondary(&self, disk: Option<&str>) -> (Proc, String) {
        self.secondary_as("sec", "live.txt", disk, &[])
    }

    /// A secondary with the certificate `cert`, its live console to `live`
    /// (a file in the test's directory), and `extra` options.
    pub fn secondary_as(
        &self,
        cert: &str,
        live: &str,
        disk: Option<&str>,
        extra: &[&str],
    ) -> (Proc, String) {
        let live = format!("file:{}", self.dir.s(live));
        let mut args = vec!["--arbiter", &self.arbiter, "--live-serial", &live];
        args.extend(TIMING);
        if let Some(d) = disk {
            args.extend(["--disk", d]);
        }
        args.extend_from_slice(extra);
        loopback_secondary(&self.pki.creds(cert), &args)
    }

    /// The primary, its console in `pri.txt` (its control socket is
    /// `api.sock`).
    pub fn primary(&self, cmdline: &str, addr: &str, disk: Option<&str>) -> Proc {
        self.primary_with(cmdline, addr, disk, &[])
    }

    /// [`primary`](Self::primary) with `extra` options.
    pub fn primary_with(
        &self,
        cmdline: &str,
        addr: &str,
        disk: Option<&str>,
        extra: &[&str],
    ) -> Proc {
        let serial = format!("file:{}", self.dir.s("pri.txt"));
        let sock = self.dir.s("api.sock");
        let mut args = vec![
            "run",
            "--api-socket",
            &sock,
            "--cmdline",
            cmdline,
            "--serial",
            &serial,
            "--protect-to",
            addr,
            "--arbiter",
            &self.arbiter,
        ];
        args.extend(TIMING);
        let creds = self.pki.creds("pri");
        args.extend(creds.iter().map(String::as_str));
        if let Some(d) = disk {
            args.extend(["--disk", d]);
        }
        args.extend_from_slice(extra);
        Proc::spawn(&[], &args)
    }

    /// The VM run unprotected (for `tandem protect` later), its control
    /// socket `sock`, its console in `pri.txt`.
    pub fn unprotected(&self, sock: &str, cmdline: &str) -> Proc {
        let serial = format!("file:{}", self.dir.s("pri.txt"));
        Proc::spawn(
            &[],
            &[
                "run",
                "--api-socket",
                sock,
                "--cmdline",
                cmdline,
                "--serial",
                &serial,
            ],
        )
    }

    /// `tandem protect --api SOCK --to ADDR` with the credentials of
    /// `cert`, the pair's arbiter and timing, and `extra` options.
    pub fn protect(
        &self,
        sock: &str,
        addr: &str,
        cert: &str,
        extra: &[&str],
    ) -> (i32, String, String) {
        let mut args = vec!["--arbiter", &self.arbiter];
        args.extend(TIMING);
        args.extend_from_slice(extra);
        protect(sock, addr, &self.pki.creds(cert), &args)
    }

    /// A console file of the test's directory (empty until written).
    pub fn console(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.file(name)).unwrap_or_default()
    }

    /// The holder written in the one claim of the arbiter.
    pub fn holder(&self) -> String {
        let claims = self.claims();
        assert_eq!(claims.len(), 1, "{claims:?}");
        claims[0].1.clone()
    }

    /// Every claim of the arbiter directory: (file name, holder), by name
    /// (etcd: (key, holder)).
    pub fn claims(&self) -> Vec<(String, String)> {
        if let Some(e) = &self.etcd {
            let a = failover::arbiter::EtcdArbiter::new(vec![e.url.clone()], Default::default());
            return a.claims().unwrap();
        }
        file_claims(&self.dir.file("arbiter"))
    }
}

/// The status at `sock` (`what`: whose) once its role is `role`, checked:
/// generation `generation` of a VM taken over from the primary `pri`.
#[track_caller]
pub fn took_over(sock: &str, what: &str, role: &str, generation: u64) -> serde_json::Value {
    let s = wait_status(sock, what, |s| s["lineage"]["role"] == role);
    assert_eq!(s["lineage"]["generation"], generation, "{s}");
    assert!(
        s["lineage"]["took_over_from"]
            .as_str()
            .is_some_and(|f| f.starts_with("pri at ")),
        "{s}"
    );
    s
}
