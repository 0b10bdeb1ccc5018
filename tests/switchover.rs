//! Planned switchover of a protected VM (`tandem switchover`), over
//! loopback: the primary hands the VM over at an exit, its secondary goes
//! live at once (no failure timeout), the old primary exits 0, and the
//! console (the old primary's, then the new one's) is byte for byte the
//! unfailed run's. Every wait is bounded by a guest event or a process's
//! message.

mod common;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/pair.rs"]
mod pair;

use common::cluster::{final_digest, rounds, run_tandem, status, Proc};
use common::result_line;
use pair::{took_over, Pair};

/// The control sockets of the three hosts (A the first primary, B its
/// secondary, C the third) in `pair`'s directory.
fn sockets(pair: &Pair) -> [String; 3] {
    ["a.sock", "b.sock", "c.sock"].map(|n| pair.dir.s(n))
}

/// The VM `cmdline` run unprotected on host A (control socket `a_sock`,
/// console `pri.txt`), once its guest is in round 2.
fn running(pair: &Pair, a_sock: &str, cmdline: &str) -> Proc {
    let mut pri = pair.unprotected(a_sock, cmdline);
    pri.wait_until("round 2", || rounds(&pair.console("pri.txt")) >= 2);
    pri
}

/// A secondary with the certificate `cert`, its live console to the file
/// `live`, its control socket `sock`.
fn secondary(pair: &Pair, cert: &str, live: &str, sock: &str) -> (Proc, String) {
    pair.secondary_as(cert, live, None, &["--api-socket", sock])
}

/// A VM protected while it runs (`tandem protect`) is switched over in the
/// middle of its work: the secondary takes it at the handover's exit and
/// goes live at once; the old primary exits 0 saying where the VM went;
/// the consoles joined are byte for byte the unfailed run's (the new
/// primary released what the old one still held, nothing twice); the new
/// primary's status says unprotected after switchover, generation 1; then
/// it is protected again (generation 2) onto a third secondary, which
/// follows it to the end with its final digest.
#[test]
fn switchover_mid_run_then_reprotect() {
    let pair = Pair::new("switchover");
    let cmdline = "fill 4 300 3";
    let (st, want, err) = run_tandem(&["run", "--cmdline", cmdline]);
    assert_eq!(st, 0, "{err}");
    let [a_sock, b_sock, c_sock] = sockets(&pair);
    let mut pri = running(&pair, &a_sock, cmdline);
    // An unprotected VM has no secondary to take it: refused, it runs on.
    let (code, out, err) = run_tandem(&["switchover", "--api", &a_sock]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("the VM is not protected"), "{err}");
    let (mut sec, addr) = secondary(&pair, "sec", "live.txt", &b_sock);
    let (code, out, err) = pair.protect(&a_sock, &addr, "pri", &[]);
    assert_eq!(code, 0, "{out}{err}\n{}", pri.describe());
    let r0 = rounds(&pair.console("pri.txt"));
    pri.wait_until("a few rounds protected", || {
        rounds(&pair.console("pri.txt")) >= r0 + 3
    });
    let vm = status(&a_sock)["protection"]["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, out, err) = run_tandem(&["switchover", "--api", &a_sock]);
    assert_eq!(
        code,
        0,
        "{out}{err}\n{}\n{}",
        pri.describe(),
        sec.describe()
    );
    assert!(
        out.contains("switched over at exit") && out.contains("runs on sec at "),
        "{out}"
    );
    assert!(out.contains("downtime"), "{out}");
    // The measured downtime over loopback (a figure, not an assertion).
    eprintln!("{out}");
    let (code_p, _, perr) = pri.finish();
    assert_eq!(code_p, 0, "the old primary exits cleanly\n{perr}");
    assert!(perr.contains("runs on sec at "), "{perr}");
    sec.wait_for("going LIVE", true);
    sec.wait_for("serves the live VM now", true);
    let s = took_over(
        &b_sock,
        "the new primary's status",
        "unprotected_after_switchover",
        1,
    );
    assert_eq!(s["lineage"]["vm_id"], vm.as_str(), "{s}");
    let (code, text, err) = run_tandem(&["status", "--api", &b_sock]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("unprotected after switchover"), "{text}");
    // Re-protection, as the drill runner does after a switchover.
    let (third, third_addr) = secondary(&pair, "third", "live2.txt", &c_sock);
    let (code, out, err) = pair.protect(&b_sock, &third_addr, "sec", &[]);
    assert_eq!(code, 0, "{out}{err}\n{}", sec.describe());
    let s = status(&b_sock);
    assert_eq!(s["protection"]["generation"], 2, "{s}");
    let (code_s, _, serr) = sec.finish();
    assert_eq!(code_s, 0, "{serr}");
    let (code_t, _, terr) = third.finish();
    assert_eq!(code_t, 0, "{terr}");
    // The new primary printed its replay's digest at the handover first,
    // then the protected run's at the guest's end.
    let last = serr
        .rsplit_once("tandem: final state digest ")
        .map(|(_, d)| d.lines().next().unwrap_or(""));
    assert_eq!(
        Some(final_digest(&terr).as_str()),
        last,
        "{serr}
{terr}"
    );
    let all = pair.console("pri.txt") + &pair.console("live.txt");
    assert_eq!(result_line(&all), result_line(&want), "{serr}");
    assert_eq!(
        all, want,
        "old primary's console + new primary's != the unfailed run\n{serr}"
    );
    let claims = pair.claims();
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert_eq!(claims[0].0, format!("{vm}.g1.claim"));
    assert!(claims[0].1.starts_with("secondary sec (pid "), "{claims:?}");
}

/// The drill's shutdown of a switched-over, re-protected VM: SIGTERM of
/// the new primary (a secondary that went live and serves the VM's control
/// socket) ends its run as the guest's end, protected: it closes the log
/// with its `End`, exits 0 saying so and prints its final state digest,
/// and its secondary verifies the log to that end with the same digest
/// (it printed none: the signal ended the process at once).
#[test]
fn a_reprotected_vm_stopped_by_sigterm_ends_its_log_verified() {
    let pair = Pair::new("switchover-term");
    // Long enough for any load: the signal, not the guest, ends it.
    let cmdline = "fill 4 100000 3";
    let [a_sock, b_sock, c_sock] = sockets(&pair);
    let pri = running(&pair, &a_sock, cmdline);
    let (mut sec, addr) = secondary(&pair, "sec", "live.txt", &b_sock);
    let (code, out, err) = pair.protect(&a_sock, &addr, "pri", &[]);
    assert_eq!(code, 0, "{out}{err}\n{}", pri.describe());
    let (code, out, err) = run_tandem(&["switchover", "--api", &a_sock]);
    assert_eq!(code, 0, "{out}{err}\n{}", sec.describe());
    let (code_p, _, perr) = pri.finish();
    assert_eq!(code_p, 0, "{perr}");
    sec.wait_for("serves the live VM now", true);
    let (third, third_addr) = secondary(&pair, "third", "live2.txt", &c_sock);
    let (code, out, err) = pair.protect(&b_sock, &third_addr, "sec", &[]);
    assert_eq!(code, 0, "{out}{err}\n{}", sec.describe());
    // Some rounds protected (the third replays them to the log's end).
    let r0 = rounds(&pair.console("live.txt"));
    sec.wait_until("rounds protected", || {
        rounds(&pair.console("live.txt")) >= r0 + 3
    });
    sec.signal(libc::SIGTERM);
    let (code_s, _, serr) = sec.finish();
    let (code_t, _, terr) = third.finish();
    let both = format!("--- new primary ---\n{serr}\n--- its secondary ---\n{terr}");
    assert_eq!(code_s, 0, "{both}");
    assert_eq!(code_t, 0, "{both}");
    assert!(serr.contains("stopped by SIGTERM at exit"), "{both}");
    assert!(serr.contains("protected run ended at exit"), "{both}");
    assert!(terr.contains("replay verified"), "{both}");
    assert!(!terr.contains("going LIVE"), "{both}");
    let last = serr
        .rsplit_once("tandem: final state digest ")
        .map(|(_, d)| d.lines().next().unwrap_or(""));
    assert_eq!(Some(final_digest(&terr).as_str()), last, "{both}");
}
