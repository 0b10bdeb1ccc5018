//! Partitions and a dead arbiter with etcd on a host of its own (issue 10).
//!
//! Topology (namespaces this test creates): host A runs the primary, host
//! B the secondary, their channel on the A–B veth (`cluster::Netns`); host
//! X runs a real etcd (`etcd::Etcd::start_in`) that A reaches on its link
//! A–X and B on B–X (`cluster::ThirdHost`). A partition is nftables
//! dropping every packet on a link (100% loss: neither side gets an
//! error, only silence). The guest is `fill` (a console line every round),
//! each side's console in a file, so which copy is live is checked from
//! the outside: whose console grows after the decision.
//!
//! The file arbiter's partition is `tests/drill.rs`
//! (`console_partition_end_to_end`, the `console-partition` scenario).
//!
//! Needs root, `ip netns`, `nft` and `etcd` (installed by .ci/run); a
//! missing one fails the test.

mod common;
#[path = "common/etcd.rs"]
mod etcd;

use std::time::{Duration, Instant};

use common::cluster::{
    cut, joined, protected_primary, random_round, reference, rounds, secondary, Netns, Pki, Proc,
    ThirdHost, TO_THIRD,
};
use common::{num_after, result_line, TempDir, TIMEOUT};

/// The defaults (the tests run beside others on a loaded host).
const TIMING: [&str; 4] = ["--heartbeat-ms", "50", "--failover-timeout-ms", "1000"];

/// Hosts A and B, etcd on host X, a protected `fill` pair.
struct Cluster {
    // (Dropped in this order: the processes first, then etcd, then the
    // namespaces.)
    etcd: etcd::Etcd,
    third: ThirdHost,
    hosts: Netns,
    pki: Pki,
    dir: TempDir,
    /// The arbiter as A names it, and as B does (the same member).
    arbiter_a: String,
    arbiter_b: String,
    /// B's end of the A–B link (`Netns`: 10.S.0.2).
    sec_ip: String,
}

impl Cluster {
    /// `query`: after each URL (`?ttl=S`).
    fn new(tag: &str, subnet: u8, query: &str) -> Cluster {
        let hosts = Netns::new(tag, subnet)
            .expect("two network namespaces joined by veth (needs root and ip)");
        let third = ThirdHost::new(&hosts, tag);
        let etcd = etcd::Etcd::start_in(tag, &third.ns, &[&third.ip_from_a, &third.ip_from_b]);
        let arbiter_a = format!("etcd:http://{}:2379{query}", third.ip_from_a);
        let arbiter_b = format!("etcd:http://{}:2379{query}", third.ip_from_b);
        let sec_ip = format!("10.{subnet}.0.2");
        Cluster {
            etcd,
            third,
            pki: Pki::new(&["a", "b"], &[&sec_ip]),
            dir: TempDir::new(tag),
            arbiter_a,
            arbiter_b,
            sec_ip,
            hosts,
        }
    }

    /// The secondary on B (live console `live.txt`), then the primary on A
    /// running `cmdline` (console `pri.txt`).
    fn pair(&self, cmdline: &str) -> (Proc, Proc) {
        let pb = ["ip", "netns", "exec", self.hosts.b.as_str()];
        let pa = ["ip", "netns", "exec", self.hosts.a.as_str()];
        let live = format!("file:{}", self.dir.s("live.txt"));
        let mut args = vec!["--arbiter", &self.arbiter_b, "--live-serial", &live];
        args.extend(TIMING);
        let listen = format!("{}:0", self.sec_ip);
        let (sec, addr) = secondary(&pb, &listen, &self.pki.creds("b"), &args);
        let serial = format!("file:{}", self.dir.s("pri.txt"));
        let mut args = vec!["--serial", &serial, "--arbiter", &self.arbiter_a];
        args.extend(TIMING);
        let pri = protected_primary(&pa, cmdline, &addr, &self.pki.creds("a"), &args);
        (pri, sec)
    }

    fn console(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.file(name)).unwrap_or_default()
    }

    /// Every (key, holder) in etcd, read from host X itself.
    fn claims(&self) -> Vec<(String, String)> {
        etcd::claims_in(&self.third.ns, &self.etcd.url)
    }

    fn describe(&self, pri: &Proc, sec: &Proc) -> String {
        format!(
            "--- primary ---\n{}\n--- secondary ---\n{}\n--- etcd ---\n{}",
            pri.describe(),
            sec.describe(),
            self.etcd
                .log()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

/// Wait until the primary's console shows round `n`.
#[track_caller]
fn wait_rounds(c: &Cluster, pri: &mut Proc, n: usize) {
    pri.wait_until(&format!("round {n} on the primary's console"), || {
        rounds(&c.console("pri.txt")) >= n
    });
}

/// Wait (bounded) until `sec` went live or `pri` runs on alone; returns
/// whether the secondary won, and the loser's console at that moment.
#[track_caller]
fn wait_decision(c: &Cluster, pri: &mut Proc, sec: &mut Proc) -> (bool, String) {
    let start = Instant::now();
    loop {
        // The loser's console first: it can only grow before the decision.
        let (p, l) = (c.console("pri.txt"), c.console("live.txt"));
        if sec.err().contains("going LIVE") {
            return (true, p);
        }
        if pri.err().contains("runs on UNPROTECTED") {
            return (false, l);
        }
        assert!(
            start.elapsed() < TIMEOUT && !(pri.ended() && sec.ended()),
            "neither side went on\n{}",
            c.describe(pri, sec)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The partition between the hosts that decided for one side: exactly that
/// side ran on (its console the unfailed run's when joined), the other
/// stopped (status 3) and emitted nothing after the decision; etcd's one
/// key names the winner. Returns whether the secondary won, and the
/// loser's stderr.
#[track_caller]
fn one_side_stayed_live(c: &Cluster, pri: Proc, sec: Proc, want: &str) -> (bool, String) {
    let (mut pri, mut sec) = (pri, sec);
    let (sec_won, loser_console) = wait_decision(c, &mut pri, &mut sec);
    let (pri_pid, sec_pid) = (pri.pid(), sec.pid());
    let what = c.describe(&pri, &sec);
    let (ps, _, perr) = pri.finish();
    let (ss, _, serr) = sec.finish();
    let holder = if sec_won {
        assert_eq!((ps, ss), (3, 0), "{what}\n{perr}\n{serr}");
        assert_eq!(
            c.console("pri.txt"),
            loser_console,
            "the old primary emitted output after the secondary went live\n{perr}"
        );
        let all = joined(&c.console("pri.txt"), &c.console("live.txt"));
        assert_eq!(all, want, "the consoles joined != the unfailed run\n{serr}");
        assert!(serr.contains("(fencing token "), "{serr}");
        format!("secondary b (pid {sec_pid})")
    } else {
        assert_eq!((ps, ss), (0, 3), "{what}\n{perr}\n{serr}");
        assert!(
            serr.contains("does not go live") && serr.contains("to primary a"),
            "{serr}"
        );
        assert_eq!(loser_console, "", "{serr}");
        assert_eq!(
            c.console("live.txt"),
            "",
            "the secondary emitted output\n{serr}"
        );
        assert_eq!(c.console("pri.txt"), want, "{perr}");
        assert!(perr.contains("(fencing token "), "{perr}");
        format!("primary a (pid {pri_pid})")
    };
    let claims = c.claims();
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert_eq!(claims[0].1, holder, "{claims:?}");
    (sec_won, if sec_won { perr } else { serr })
}

/// Partition (100% loss) between primary and secondary, etcd reachable
/// from both: each side claims the VM after the timeout; exactly one wins
/// and runs the guest to its end, the other stops with status 3.
#[test]
fn etcd_partition_between_the_hosts_one_side_stays_live() {
    let cmdline = "fill 4 300 3";
    let c = Cluster::new("fopab", 236, "");
    let want = reference(cmdline, None);
    let (mut pri, sec) = c.pair(cmdline);
    wait_rounds(&c, &mut pri, random_round(30) as usize);
    cut(&c.hosts.a, &c.hosts.va);
    let (sec_won, loser) = one_side_stayed_live(&c, pri, sec, &want);
    let who = if sec_won {
        "to secondary b"
    } else {
        "to primary a"
    };
    assert!(loser.contains("gave VM") && loser.contains(who), "{loser}");
    eprintln!(
        "partition A-B: the {} won etcd and stayed live",
        if sec_won { "secondary" } else { "primary" }
    );
}

/// etcd killed while the copy that went live (the secondary, after kill -9
/// of the primary) holds its lease (`?ttl=2`): it stops with status 3,
/// saying its lease could not be renewed, before the lease could end (by
/// its own clock: the lease ends no earlier than TTL after the last renewal
/// it sent), its guest unfinished. No other copy exists: never two live.
#[test]
fn etcd_killed_the_live_secondary_stops_at_its_lease_end() {
    let mut c = Cluster::new("foetk", 237, "?ttl=2");
    let (mut pri, mut sec) = c.pair("fill 4 3000 3");
    wait_rounds(&c, &mut pri, random_round(30) as usize);
    pri.signal(libc::SIGKILL);
    let _ = pri.child.wait();
    sec.wait_for("going LIVE", true);
    sec.wait_until("the live console growing", || {
        rounds(&c.console("live.txt")) > 0
    });
    let claims = c.claims();
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert_eq!(claims[0].1, format!("secondary b (pid {})", sec.pid()));
    c.etcd.kill();
    let killed = Instant::now();
    let (status, _, err) = sec.finish();
    let after = killed.elapsed();
    assert_eq!(status, 3, "{err}");
    assert!(err.contains("could not be renewed"), "{err}");
    let left = num_after(&err, "etcd may end it in ")
        .unwrap_or_else(|| panic!("no `etcd may end it in` in\n{err}"));
    assert!(
        left > 0.0,
        "stopped after its lease could have ended\n{err}"
    );
    assert!(result_line(&c.console("live.txt")).is_none(), "{err}");
    eprintln!(
        "etcd killed: the live secondary stopped {:.0} ms later, {left:.1} s before the lease could end (TTL 2 s)",
        after.as_secs_f64() * 1e3
    );
}

/// A's link to etcd cut while the VM runs protected: nothing changes (a
/// protected primary needs no arbiter while it keeps its secondary), the
/// guest runs on for a hundred rounds; then the A–B link cut too: the
/// secondary, which still reaches etcd, wins and goes live; the primary
/// cannot claim, stops (status 3, naming etcd's URL) and emits nothing
/// after the secondary went live.
#[test]
fn etcd_cut_from_the_primary_while_protected() {
    let cmdline = "fill 4 600 3";
    let c = Cluster::new("foetc", 238, "");
    let want = reference(cmdline, None);
    let (mut pri, mut sec) = c.pair(cmdline);
    wait_rounds(&c, &mut pri, random_round(20) as usize);
    cut(&c.hosts.a, TO_THIRD);
    let r0 = rounds(&c.console("pri.txt"));
    wait_rounds(&c, &mut pri, r0 + 100);
    assert!(
        !sec.ended() && !sec.err().contains("lost"),
        "{}",
        sec.describe()
    );
    assert!(!pri.err().contains("UNPROTECTED"), "{}", pri.describe());
    cut(&c.hosts.a, &c.hosts.va);
    let (sec_won, loser) = one_side_stayed_live(&c, pri, sec, &want);
    assert!(sec_won, "the primary cut from etcd won it");
    let url = format!("http://{}:2379", c.third.ip_from_a);
    assert!(
        loser.contains("cannot be reached") && loser.contains(&url),
        "{loser}"
    );
}
