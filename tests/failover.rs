//! Failover (issue 10), over loopback: heartbeats, the file arbiter,
//! go-live of the secondary, a primary that loses its secondary, and the
//! fences that keep two copies from being live. Every wait is bounded by a
//! guest event or a process's message; the only fixed time is the failover
//! timeout itself.

mod common;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/pair.rs"]
mod pair;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{
    final_digest, joined, loopback_secondary, make_disk, random_round, rounds, run_tandem, status,
    wait_status, Pki, Proc,
};
use common::{result_line, TempDir};
use pair::{took_over, Pair, TIMING};

/// kill -9 of the primary at `kill_at` (console bytes of the primary that
/// must be out first): the secondary goes live, the guest finishes with the
/// unfailed run's console (old primary's, then the new one's).
fn primary_killed(
    tag: &str,
    cmdline: &str,
    disk_len: Option<usize>,
    kill_at: &dyn Fn(&str) -> bool,
) {
    primary_fails(tag, cmdline, disk_len, kill_at, false)
}

/// As [`primary_killed`]; with `test_failover` the primary is stopped by
/// `tandem failover --api` instead of kill -9.
fn primary_fails(
    tag: &str,
    cmdline: &str,
    disk_len: Option<usize>,
    kill_at: &dyn Fn(&str) -> bool,
    test_failover: bool,
) {
    primary_fails_in(Pair::new(tag), cmdline, disk_len, kill_at, test_failover)
}

/// [`primary_fails`] with `pair`'s arbiter.
fn primary_fails_in(
    pair: Pair,
    cmdline: &str,
    disk_len: Option<usize>,
    kill_at: &dyn Fn(&str) -> bool,
    test_failover: bool,
) {
    let (pri_img, sec_img, ref_img) = (
        pair.dir.s("pri.img"),
        pair.dir.s("sec.img"),
        pair.dir.s("ref.img"),
    );
    if let Some(len) = disk_len {
        make_disk(Path::new(&ref_img), len);
        std::fs::copy(&ref_img, &pri_img).unwrap();
        std::fs::copy(&ref_img, &sec_img).unwrap();
    }
    let disk = |p: &str| disk_len.map(|_| p.to_string());
    // The unfailed run.
    let mut reference = vec!["run", "--cmdline", cmdline];
    if disk_len.is_some() {
        reference.extend(["--disk", &ref_img]);
    }
    let (st, want, err) = run_tandem(&reference);
    assert_eq!(st, 0, "{err}");
    let (mut sec, addr) = pair.secondary(disk(&sec_img).as_deref());
    let mut pri = pair.primary(cmdline, &addr, disk(&pri_img).as_deref());
    pri.wait_until("the kill point on the primary's console", || {
        kill_at(&pair.console("pri.txt"))
    });
    if test_failover {
        let sock = pair.dir.s("api.sock");
        let (st, out, err) = run_tandem(&["failover", "--api", &sock]);
        assert_eq!(st, 0, "{out}{err}");
        assert!(out.contains("stopped as if its host died"), "{out}");
    } else {
        pri.signal(libc::SIGKILL);
    }
    let st = pri.child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL),
        "{}",
        pri.describe()
    );
    let before = pair.console("pri.txt");
    sec.wait_for("going LIVE", true);
    let sec_pid = sec.child.id();
    let (status, _, err) = sec.finish();
    assert_eq!(status, 0, "{err}");
    assert!(err.contains("UNPROTECTED"), "{err}");
    assert!(err.contains("failover gap: "), "{err}");
    if pair.etcd.is_some() {
        assert!(err.contains("(fencing token "), "{err}");
    }
    for l in err
        .lines()
        .filter(|l| l.contains("won the arbiter") || l.contains("gap:"))
    {
        eprintln!("{l}");
    }
    let after = pair.console("live.txt");
    assert_eq!(result_line(&after), result_line(&want), "{err}");
    assert_eq!(
        joined(&before, &after),
        want,
        "old primary's console + new primary's != the unfailed run\n--- before ---\n{before}\n--- after ---\n{after}\n{err}"
    );
    assert_eq!(pair.holder(), format!("secondary sec (pid {sec_pid})"));
    if disk_len.is_some() {
        // The new primary's image is the unfailed run's.
        assert!(std::fs::read(&sec_img).unwrap() == std::fs::read(&ref_img).unwrap());
    }
}

#[test]
fn primary_killed_during_fill() {
    let at = random_round(40);
    primary_killed("fo-fill", "fill 4 60 3", None, &|c| rounds(c) as u64 >= at);
}

#[test]
fn primary_killed_during_dirty() {
    let at = random_round(1500);
    primary_killed("fo-dirty", "dirty 64 2000", None, &|c| {
        rounds(c) as u64 >= at
    });
}

#[test]
fn primary_killed_during_disk() {
    // `disk` prints only at its start and end: kill it after the first line.
    primary_killed("fo-disk", "disk 400", Some(1 << 20), &|c| {
        c.contains("disk capacity")
    });
}

/// kill -9 of the secondary: the primary wins the arbiter, runs on
/// unprotected and releases its held outputs: its console is the unfailed
/// run's.
#[test]
fn secondary_killed_primary_runs_on() {
    let pair = Pair::new("fo-sec-killed");
    let cmdline = "fill 4 60 3";
    let (st, want, err) = run_tandem(&["run", "--cmdline", cmdline]);
    assert_eq!(st, 0, "{err}");
    let (sec, addr) = pair.secondary(None);
    let mut pri = pair.primary(cmdline, &addr, None);
    let at = random_round(30) as usize;
    pri.wait_until("the kill point", || rounds(&pair.console("pri.txt")) >= at);
    sec.signal(libc::SIGKILL);
    let pri_pid = pri.child.id();
    let (status, _, err) = pri.finish();
    assert_eq!(status, 0, "{err}");
    assert!(
        err.contains("won the arbiter and runs on UNPROTECTED"),
        "{err}"
    );
    assert!(
        err.contains("ended at exit") && err.contains("UNPROTECTED"),
        "{err}"
    );
    assert_eq!(pair.console("pri.txt"), want);
    assert_eq!(pair.holder(), format!("primary pri (pid {pri_pid})"));
}

/// A primary frozen (SIGSTOP) past the timeout: the secondary goes live;
/// continued, the old primary finds the arbiter taken, says by whom, stops,
/// and not one console byte leaves it after the secondary went live. (If
/// the guest had ended on the primary before the freeze, the secondary had
/// the whole log: the VM is over, neither side goes on with it.)
#[test]
fn frozen_primary_stops_when_it_wakes() {
    frozen_primary_stops_in(Pair::new("fo-frozen-pri"));
}

/// The same with `--arbiter etcd:...` on both sides: the secondary holds
/// the key; the woken primary's claim loses to it.
#[test]
fn etcd_frozen_primary_stops_when_it_wakes() {
    frozen_primary_stops_in(Pair::with_arbiter("fo-etcd-frozen", None, ""));
}

/// [`frozen_primary_stops_when_it_wakes`] with `pair`'s arbiter.
fn frozen_primary_stops_in(pair: Pair) {
    let cmdline = "fill 4 60 3";
    let (sec, addr) = pair.secondary(None);
    let mut sec = sec;
    let mut pri = pair.primary(cmdline, &addr, None);
    let at = random_round(30) as usize;
    pri.wait_until("the freeze point", || {
        rounds(&pair.console("pri.txt")) >= at
    });
    pri.signal(libc::SIGSTOP);
    if !prints_or_ends(&mut sec, "going LIVE") {
        // The guest ended on the primary (recording runs ahead of the held
        // outputs) and its whole log, end included, reached the secondary
        // before the freeze: the secondary replayed it to the end and
        // stopped without going live; woken, the primary finishes the run.
        pri.signal(libc::SIGCONT);
        let (pstatus, _, perr) = pri.finish();
        let (status, _, serr) = sec.finish();
        assert_eq!(status, 0, "{serr}");
        assert!(serr.contains("replay verified"), "{serr}");
        assert_eq!(pair.console("live.txt"), "", "{serr}");
        assert_eq!(pstatus, 0, "{perr}\n{serr}");
        assert!(result_line(&pair.console("pri.txt")).is_some(), "{perr}");
        assert_eq!(final_digest(&perr), final_digest(&serr), "{perr}\n{serr}");
        return;
    }
    let frozen = pair.console("pri.txt");
    pri.signal(libc::SIGCONT);
    let (status, _, err) = pri.finish();
    assert_eq!(status, 3, "{err}");
    assert!(
        err.contains("gave VM")
            && err.contains("to secondary sec")
            && err.contains("this one stops"),
        "{err}"
    );
    assert_eq!(
        pair.console("pri.txt"),
        frozen,
        "the old primary emitted output after the secondary went live\n{err}"
    );
    let (status, _, serr) = sec.finish();
    assert_eq!(status, 0, "{serr}");
    assert!(result_line(&pair.console("live.txt")).is_some(), "{serr}");
}

/// Wait until `p` prints `needle` on stderr (`true`) or ends without
/// printing it (`false`).
#[track_caller]
fn prints_or_ends(p: &mut Proc, needle: &str) -> bool {
    let start = Instant::now();
    while !p.err().contains(needle) {
        if p.ended() {
            p.drain();
            return p.err().contains(needle);
        }
        assert!(
            start.elapsed() < common::TIMEOUT,
            "timed out waiting for {needle:?}\n{}",
            p.describe()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// A secondary frozen past the timeout: the primary wins and runs on; the
/// continued secondary finds the arbiter taken, says by whom and does not
/// go live.
#[test]
fn frozen_secondary_does_not_go_live() {
    frozen_secondary_in("fo-frozen-sec", false);
}

/// The same, the secondary continued only after the primary's run ended:
/// its log stream was closed before the log's end, it still asks the
/// arbiter (no silent exit), says who holds the VM and does not go live.
#[test]
fn frozen_secondary_woken_after_the_primary_ended() {
    frozen_secondary_in("fo-frozen-sec-end", true);
}

/// [`frozen_secondary_does_not_go_live`]; with `after_end` the secondary
/// is continued once the primary has ended.
fn frozen_secondary_in(tag: &str, after_end: bool) {
    let pair = Pair::new(tag);
    let cmdline = "fill 4 60 3";
    let (sec, addr) = pair.secondary(None);
    let mut pri = Some(pair.primary(cmdline, &addr, None));
    let p = pri.as_mut().unwrap();
    p.wait_until("round 5", || rounds(&pair.console("pri.txt")) >= 5);
    sec.signal(libc::SIGSTOP);
    p.wait_for("runs on UNPROTECTED", true);
    let ended = after_end.then(|| pri.take().unwrap().finish());
    sec.signal(libc::SIGCONT);
    let (status, _, err) = sec.finish();
    assert!(!err.contains("going LIVE"), "{err}");
    assert_eq!(pair.console("live.txt"), "", "{err}");
    let (pstatus, _, perr) = ended.unwrap_or_else(|| pri.unwrap().finish());
    assert_eq!(pstatus, 0, "{perr}");
    assert!(result_line(&pair.console("pri.txt")).is_some(), "{perr}");
    if err.contains("does not go live") {
        assert_eq!(status, 3, "{err}");
        assert!(err.contains("to primary pri"), "{err}");
    } else {
        // The guest ended on the primary (recording runs ahead of the held
        // outputs) before the frozen secondary missed a beat: the whole
        // log, its end included, waited for it; the VM is over and the
        // replay must match.
        assert_eq!(status, 0, "{err}");
        assert_eq!(final_digest(&perr), final_digest(&err), "{perr}\n{err}");
    }
}

/// Without an arbiter neither side may go on alone: a primary that loses
/// its secondary stops with its outputs held.
#[test]
fn without_an_arbiter_the_primary_stops() {
    let dir = TempDir::new("fo-no-arbiter");
    let pki = Pki::new(&["pri", "sec"], &[]);
    let mut extra = vec![];
    extra.extend(TIMING);
    let (sec, addr) = loopback_secondary(&pki.creds("sec"), &extra);
    let serial = format!("file:{}", dir.s("pri.txt"));
    let mut args = vec![
        "run",
        "--cmdline",
        "fill 4 60 3",
        "--serial",
        &serial,
        "--protect-to",
        &addr,
    ];
    args.extend(TIMING);
    let creds = pki.creds("pri");
    args.extend(creds.iter().map(String::as_str));
    let mut pri = Proc::spawn(&[], &args);
    let console = || std::fs::read_to_string(dir.file("pri.txt")).unwrap_or_default();
    pri.wait_until("round 5", || rounds(&console()) >= 5);
    sec.signal(libc::SIGKILL);
    let (status, _, err) = pri.finish();
    assert_eq!(status, 3, "{err}");
    assert!(err.contains("no --arbiter"), "{err}");
    assert!(result_line(&console()).is_none(), "{err}");
}

/// `tandem failover --api`: the primary stops as if its host died and the
/// secondary takes over as after kill -9.
#[test]
fn test_failover_command() {
    let at = random_round(40);
    primary_fails(
        "fo-test",
        "fill 4 60 3",
        None,
        &|c| rounds(c) as u64 >= at,
        true,
    );
}

/// Re-protection (issue 10): kill -9 of the primary; the secondary goes
/// live with its control socket, says `unprotected after failover` with
/// the generation and whom it took over from; `tandem protect --to` seeds a
/// third host with generation 2 while the VM runs; kill -9 of that new
/// primary: the third host claims generation 2, goes live, and the guest
/// ends with the unfailed run's console.
#[test]
fn failover_then_reprotect_then_failover_again() {
    let pair = Pair::new("fo-reprotect");
    let cmdline = "fill 4 300 3";
    let (st, want, err) = run_tandem(&["run", "--cmdline", cmdline]);
    assert_eq!(st, 0, "{err}");
    let b_sock = pair.dir.s("b.sock");
    let c_sock = pair.dir.s("c.sock");
    let (mut b, b_addr) = pair.secondary_as("sec", "live.txt", None, &["--api-socket", &b_sock]);
    let mut a = pair.primary(cmdline, &b_addr, None);
    let at = random_round(20) as usize;
    a.wait_until("the first kill point", || {
        rounds(&pair.console("pri.txt")) >= at
    });
    a.signal(libc::SIGKILL);
    let _ = a.child.wait();
    b.wait_for("going LIVE", true);
    b.wait_for("serves the live VM now", true);
    took_over(
        &b_sock,
        "the live VM's status",
        "unprotected_after_failover",
        1,
    );
    let (code, text, err) = run_tandem(&["status", "--api", &b_sock]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("unprotected after failover") && text.contains("took over from pri at"),
        "{text}"
    );
    // Protect it again, onto a third host, while it runs.
    let (mut c, c_addr) = pair.secondary_as("third", "live2.txt", None, &["--api-socket", &c_sock]);
    let (code, out, err) = pair.protect(&b_sock, &c_addr, "sec", &[]);
    assert_eq!(code, 0, "{out}{err}\n{}", b.describe());
    assert!(out.contains("protected by third"), "{out}");
    let s = status(&b_sock);
    assert_eq!(s["protection"]["generation"], 2, "{s}");
    assert_eq!(s["lineage"]["role"], "protected", "{s}");
    let vm = s["protection"]["vm_id"].as_str().unwrap().to_string();
    let sc = wait_status(&c_sock, "the VM named on the third host", |s| {
        s["protection"]["generation"] == 2
    });
    assert_eq!(sc["protection"]["vm_id"], vm.as_str(), "{sc}");
    assert_eq!(sc["protection"]["failover_timeout_ms"], 1000, "{sc}");
    assert_eq!(sc["lineage"]["role"], "secondary", "{sc}");
    let (_, text, _) = run_tandem(&["status", "--api", &c_sock]);
    assert!(
        text.contains("heartbeat 50 ms, failover timeout 1000 ms, last sign of life")
            && text.contains(&format!("secondary (the copy): VM {vm} generation 2")),
        "{text}"
    );
    // The second failover, a few rounds later.
    let r0 = rounds(&pair.console("live.txt"));
    b.wait_until("a few rounds protected", || {
        rounds(&pair.console("live.txt")) >= r0 + 3
    });
    // A test failover of the re-protected VM (its full control socket).
    let (code, out, err) = run_tandem(&["failover", "--api", &b_sock]);
    assert_eq!(code, 0, "{out}{err}");
    let _ = b.child.wait();
    c.wait_for("going LIVE", true);
    let c_pid = c.child.id();
    let (status_c, _, cerr) = c.finish();
    assert_eq!(status_c, 0, "{cerr}");
    let all = joined(
        &joined(&pair.console("pri.txt"), &pair.console("live.txt")),
        &pair.console("live2.txt"),
    );
    assert_eq!(result_line(&all), result_line(&want), "{cerr}");
    assert_eq!(
        all, want,
        "the three consoles joined != the unfailed run\n{cerr}"
    );
    let claims = pair.claims();
    assert_eq!(claims.len(), 2, "{claims:?}");
    assert_eq!(claims[0].0, format!("{vm}.g1.claim"));
    assert!(claims[0].1.starts_with("secondary sec (pid "), "{claims:?}");
    assert_eq!(claims[1].0, format!("{vm}.g2.claim"));
    assert_eq!(claims[1].1, format!("secondary third (pid {c_pid})"));
}

/// `--spare` (issue 10): a VM protected with `tandem protect --spare`
/// loses its secondary (kill -9); it wins the arbiter and seeds the spare
/// by itself, generation 2; status says so; the spare follows to the end
/// with the primary's final digest and the console is the unfailed run's.
#[test]
fn secondary_killed_the_spare_is_seeded() {
    let pair = Pair::new("fo-spare");
    let cmdline = "fill 4 200 3";
    let (st, want, err) = run_tandem(&["run", "--cmdline", cmdline]);
    assert_eq!(st, 0, "{err}");
    let sock = pair.dir.s("api.sock");
    let mut pri = pair.unprotected(&sock, cmdline);
    pri.wait_until("round 3", || rounds(&pair.console("pri.txt")) >= 3);
    let (sec, addr) = pair.secondary(None);
    let (spare, spare_addr) = pair.secondary_as("third", "live2.txt", None, &[]);
    let (code, out, err) = pair.protect(&sock, &addr, "pri", &["--spare", &spare_addr]);
    assert_eq!(code, 0, "{out}{err}\n{}", pri.describe());
    let s = status(&sock);
    assert_eq!(s["lineage"]["spares"][0], spare_addr.as_str(), "{s}");
    assert_eq!(s["protection"]["generation"], 1, "{s}");
    let (_, text, _) = run_tandem(&["status", "--api", &sock]);
    assert!(text.contains(&format!("spares {spare_addr}")), "{text}");
    assert!(
        text.contains("heartbeat 50 ms, failover timeout 1000 ms"),
        "{text}"
    );
    sec.signal(libc::SIGKILL);
    let s = wait_status(&sock, "protected by the spare", |s| {
        s["lineage"]["role"] == "protected" && s["lineage"]["generation"] == 2
    });
    assert!(
        s["lineage"]["spare_note"]
            .as_str()
            .is_some_and(|n| n.contains("protected by the spare third")),
        "{s}"
    );
    assert_eq!(
        s["lineage"]["spares"].as_array().map(Vec::len),
        Some(0),
        "{s}"
    );
    assert_eq!(s["protection"]["generation"], 2, "{s}");
    let pri_pid = pri.child.id();
    let (status_p, _, perr) = pri.finish();
    assert_eq!(status_p, 0, "{perr}");
    assert!(
        perr.contains("won the arbiter and runs on UNPROTECTED"),
        "{perr}"
    );
    spare_followed_to_the_end(spare, &perr);
    assert_eq!(pair.console("pri.txt"), want);
    assert_eq!(pair.holder(), format!("primary pri (pid {pri_pid})"));
}

/// The seeded spare replays to the end, verified, with the final digest of
/// the primary it protected (`primary_err`: that primary's stderr).
#[track_caller]
fn spare_followed_to_the_end(mut spare: Proc, primary_err: &str) {
    spare.wait_for("final state digest", true);
    let (code, _, serr) = spare.finish();
    assert_eq!(code, 0, "{serr}");
    assert!(serr.contains("replay verified"), "{serr}");
    assert_eq!(
        final_digest(primary_err),
        final_digest(&serr),
        "{primary_err}\n{serr}"
    );
}

/// `tandem secondary --spare`: the secondary goes live after kill -9 of the
/// primary and at once seeds the spare by itself (generation 2); the spare
/// follows to the end with the new primary's final digest.
#[test]
fn secondary_gone_live_seeds_its_spare() {
    let pair = Pair::new("fo-sec-spare");
    let cmdline = "fill 4 200 3";
    let (st, want, err) = run_tandem(&["run", "--cmdline", cmdline]);
    assert_eq!(st, 0, "{err}");
    let b_sock = pair.dir.s("b.sock");
    let (spare, spare_addr) = pair.secondary_as("third", "live2.txt", None, &[]);
    let (mut b, b_addr) = pair.secondary_as(
        "sec",
        "live.txt",
        None,
        &["--api-socket", &b_sock, "--spare", &spare_addr],
    );
    let mut a = pair.primary(cmdline, &b_addr, None);
    // Its control socket serves once it took the primary (seeded before
    // the first instruction: the primary has a control socket).
    b.wait_for("protecting the running VM of", true);
    let s = wait_status(&b_sock, "the VM named on the secondary", |s| {
        s["protection"]["generation"] == 1
    });
    assert_eq!(s["lineage"]["spares"][0], spare_addr.as_str(), "{s}");
    let at = random_round(20) as usize;
    a.wait_until("the kill point", || rounds(&pair.console("pri.txt")) >= at);
    a.signal(libc::SIGKILL);
    let _ = a.child.wait();
    b.wait_for("going LIVE", true);
    took_over(&b_sock, "protected by the spare", "protected", 2);
    let (code, _, berr) = b.finish();
    assert_eq!(code, 0, "{berr}");
    assert!(
        berr.contains("spare: protected by the spare third"),
        "{berr}"
    );
    spare_followed_to_the_end(spare, &berr);
    assert_eq!(
        joined(&pair.console("pri.txt"), &pair.console("live.txt")),
        want,
        "{berr}"
    );
}

/// `--arbiter etcd:...` on both sides (a real etcd on loopback): kill -9 of
/// the primary; the secondary wins the key, goes live and finishes as the
/// unfailed run; the one claim in etcd names it.
#[test]
fn etcd_primary_killed_the_secondary_goes_live() {
    let at = random_round(40);
    let pair = Pair::with_arbiter("fo-etcd-pri", None, "");
    primary_fails_in(
        pair,
        "fill 4 60 3",
        None,
        &|c| rounds(c) as u64 >= at,
        false,
    );
}

/// etcd killed while the primary runs alone (its secondary killed, the
/// lease won): it stops, status 3, before the lease's TTL (2 s) from the
/// kill, saying why; its guest never finishes.
#[test]
fn etcd_killed_the_live_primary_stops_before_the_ttl() {
    let mut pair = Pair::with_arbiter("fo-etcd-killed", None, "?ttl=2");
    let (sec, addr) = pair.secondary(None);
    let mut pri = pair.primary("fill 4 2000 3", &addr, None);
    pri.wait_until("round 5", || rounds(&pair.console("pri.txt")) >= 5);
    sec.signal(libc::SIGKILL);
    pri.wait_for("runs on UNPROTECTED", true);
    assert!(pri.err().contains("(fencing token "), "{}", pri.describe());
    pair.etcd.as_mut().unwrap().kill();
    let killed = Instant::now();
    let (status, _, err) = pri.finish();
    let after = killed.elapsed();
    assert_eq!(status, 3, "{err}");
    assert!(err.contains("could not be renewed"), "{err}");
    assert!(
        after < Duration::from_secs(2),
        "stopped {after:?} after etcd was killed: not before the 2 s TTL\n{err}"
    );
    assert!(result_line(&pair.console("pri.txt")).is_none(), "{err}");
    eprintln!("the live primary stopped {after:?} after etcd was killed (TTL 2 s)");
}

/// An arbiter nobody can reach when protection starts (an etcd nobody
/// answers at, a file arbiter's directory that is not there): both sides
/// refuse to start (status 2, naming it) rather than protect for show, and
/// no directory is created.
#[test]
fn an_arbiter_unreachable_at_the_start_is_refused() {
    let pair = Pair::new("fo-arb-refused");
    let missing = format!("file:{}", pair.dir.s("no-such-dir"));
    let dead = format!("etcd:{}", etcd::dead_url());
    for spec in [missing.as_str(), dead.as_str()] {
        let creds = pair.pki.creds("sec");
        let mut args = vec!["secondary", "--listen", "127.0.0.1:0", "--arbiter", spec];
        args.extend(creds.iter().map(String::as_str));
        let (status, _, err) = run_tandem(&args);
        assert_eq!(status, 2, "secondary with {spec}: {err}");
        assert!(
            err.contains(spec) && err.contains("could never fail over"),
            "{err}"
        );
        let serial = format!("file:{}", pair.dir.s("pri.txt"));
        let creds = pair.pki.creds("pri");
        let mut args = vec![
            "run",
            "--cmdline",
            "hello",
            "--serial",
            &serial,
            "--protect-to",
            "127.0.0.1:9",
            "--arbiter",
            spec,
        ];
        args.extend(creds.iter().map(String::as_str));
        let (status, _, err) = run_tandem(&args);
        assert_eq!(status, 2, "primary with {spec}: {err}");
        assert!(err.contains(spec), "{err}");
        assert_eq!(pair.console("pri.txt"), "", "the guest ran: {err}");
    }
    assert!(!pair.dir.file("no-such-dir").exists());
}

/// etcd lost after protection started: the secondary that then loses its
/// primary does not go live, the primary that loses its secondary stops
/// with its outputs held; both say which URL failed.
#[test]
fn etcd_lost_neither_side_goes_live() {
    let mut pair = Pair::with_arbiter("fo-etcd-lost-sec", None, "");
    let url = pair.etcd.as_ref().unwrap().url.clone();
    let (mut sec, addr) = pair.secondary(None);
    let mut pri = pair.primary("fill 4 60 3", &addr, None);
    pri.wait_until("round 5", || rounds(&pair.console("pri.txt")) >= 5);
    pair.etcd.as_mut().unwrap().kill();
    pri.signal(libc::SIGKILL);
    sec.wait_for("does not go live", true);
    let (status, _, err) = sec.finish();
    assert_eq!(status, 3, "{err}");
    assert!(
        err.contains("cannot be reached") && err.contains(&url),
        "{err}"
    );
    assert_eq!(pair.console("live.txt"), "", "{err}");

    let mut pair = Pair::with_arbiter("fo-etcd-lost-pri", None, "");
    let url = pair.etcd.as_ref().unwrap().url.clone();
    let (sec, addr) = pair.secondary(None);
    let mut pri = pair.primary("fill 4 60 3", &addr, None);
    pri.wait_until("round 5", || rounds(&pair.console("pri.txt")) >= 5);
    pair.etcd.as_mut().unwrap().kill();
    sec.signal(libc::SIGKILL);
    let (status, _, err) = pri.finish();
    assert_eq!(status, 3, "{err}");
    assert!(
        err.contains("cannot be reached") && err.contains(&url),
        "{err}"
    );
    assert!(result_line(&pair.console("pri.txt")).is_none(), "{err}");
}

/// `tandem run --protect-to --spare --api-socket`: seeded before its first
/// instruction, so no output leaves unprotected; kill -9 of the secondary:
/// the primary wins, seeds the spare (generation 2); the spare follows to
/// the end with the primary's final digest; the console is the unfailed
/// run's.
#[test]
fn protected_from_the_start_with_a_spare() {
    let pair = Pair::new("fo-run-spare");
    let cmdline = "fill 4 200 3";
    let (st, want, err) = run_tandem(&["run", "--cmdline", cmdline]);
    assert_eq!(st, 0, "{err}");
    let (mut sec, addr) = pair.secondary(None);
    let (spare, spare_addr) = pair.secondary_as("third", "live2.txt", None, &[]);
    let mut pri = pair.primary_with(cmdline, &addr, None, &["--spare", &spare_addr]);
    let seeded = pri.wait_for("protected by the secondary sec at ", true);
    assert!(seeded.contains(" from exit 0 "), "{seeded}");
    sec.wait_for("seeded at exit 0", true);
    pri.wait_until("round 5", || rounds(&pair.console("pri.txt")) >= 5);
    sec.signal(libc::SIGKILL);
    let pri_pid = pri.child.id();
    let (status_p, _, perr) = pri.finish();
    assert_eq!(status_p, 0, "{perr}");
    assert!(
        perr.contains("spare: protected by the spare third"),
        "{perr}"
    );
    spare_followed_to_the_end(spare, &perr);
    assert_eq!(pair.console("pri.txt"), want);
    assert_eq!(pair.holder(), format!("primary pri (pid {pri_pid})"));
}
