//! `tandem drill`: scenario files are validated (a mistake names the file,
//! the key or value and what is allowed), every shipped scenario parses, a
//! drill this build cannot do is refused with status 2 naming what is
//! missing, and `migrate-under-load` runs end to end: the mail VM migrates
//! between two namespace hosts under SMTP load, nothing acknowledged is
//! lost (POP3 from the client network), no connection is reset, one copy
//! is live afterwards.
//!
//! The run needs root, `ip netns` and python3 (installed by .ci/run); a
//! missing one fails the test.

mod common;

use common::{tandem, TempDir};

const SHIPPED: &[&str] = &[
    "mail-pull-plug",
    "mail-partition",
    "mail-partition-overlap",
    "migrate-under-load",
    "secondary-dies",
    "failover-then-reprotect",
    "long-distance",
    "protected-under-load",
    "migrate-long-distance",
    "console-pull-plug",
    "console-failover-then-reprotect",
    "console-partition",
    "console-long-distance",
];

fn scenario(name: &str) -> String {
    format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"))
}

const GOOD: &str = r#"
name = "t"
[[hosts]]
name = "a"
[[hosts]]
name = "b"
[[links]]
between = ["a", "b"]
[vm]
host = "a"
[client]
kind = "smtplib"
messages = 10
[[faults]]
kind = "migrate"
to = "b"
when = { at_message = 3 }
"#;

/// `tandem drill --check` of GOOD with `from` replaced by `to`.
fn check_variant(from: &str, to: &str) -> common::Output {
    assert!(GOOD.contains(from), "{from:?} not in the base scenario");
    let dir = TempDir::new("drill-check");
    let path = dir.write("bad.toml", GOOD.replacen(from, to, 1).as_bytes());
    tandem(&["drill", "--check", common::arg(&path)])
}

#[test]
fn every_shipped_scenario_parses() {
    for name in SHIPPED {
        let out = tandem(&["drill", "--check", &scenario(name)]);
        out.assert_status(0);
        assert!(out.stdout.contains("is valid"), "{}", out.describe());
    }
    for name in [
        "migrate-under-load",
        "protected-under-load",
        "secondary-dies",
        "console-pull-plug",
        "console-failover-then-reprotect",
        "console-partition",
        "console-long-distance",
        "mail-partition",
        "mail-partition-overlap",
        "long-distance",
    ] {
        let out = tandem(&["drill", "--check", &scenario(name)]);
        assert!(
            out.stdout.contains("this build can run it"),
            "{}",
            out.describe()
        );
    }
}

#[test]
fn the_base_of_the_mistakes_is_valid() {
    check_variant("name = \"t\"", "name = \"t\"").assert_status(0);
}

#[test]
fn an_unknown_key_is_named_with_the_keys_allowed() {
    let out = check_variant("messages = 10", "mesages = 10");
    out.assert_status(2);
    assert!(
        out.stderr.contains("bad.toml")
            && out.stderr.contains("unknown field `mesages`")
            && out.stderr.contains("`messages`")
            && out.stderr.contains("line "),
        "{}",
        out.describe()
    );
}

#[test]
fn a_bad_value_is_named_with_the_values_allowed() {
    let out = check_variant("kind = \"migrate\"", "kind = \"explode\"");
    out.assert_status(2);
    assert!(
        out.stderr.contains("bad.toml")
            && out.stderr.contains("explode")
            && out.stderr.contains("kill-primary")
            && out.stderr.contains("pull-plug"),
        "{}",
        out.describe()
    );
    let out = check_variant("kind = \"smtplib\"", "kind = \"telnet\"");
    out.assert_status(2);
    assert!(
        out.stderr.contains("telnet") && out.stderr.contains("swaks"),
        "{}",
        out.describe()
    );
}

#[test]
fn cross_references_are_checked() {
    for (from, to, says) in [
        (
            "host = \"a\"",
            "host = \"z\"",
            "vm.host = \"z\": no such host (hosts: a, b)",
        ),
        (
            "to = \"b\"",
            "to = \"q\"",
            "faults[0].to = \"q\": no such host",
        ),
        ("to = \"b\"", "to = \"a\"", "already on that host"),
        ("at_message = 3", "at_message = 30", "would never fire"),
        (
            "when = { at_message = 3 }",
            "when = { at_message = 3, at_ms = 5 }",
            "exactly one of",
        ),
        ("messages = 10", "messages = 0", "client.messages = 0: 1 to"),
        (
            "when = { at_message = 3 }",
            "when = { at_line = 3 }",
            "the mail workload counts messages",
        ),
        (
            "host = \"a\"",
            "host = \"a\"\nworkload = \"fill 4 10 0\"",
            "is a console workload: its output is the console, it takes no [client]",
        ),
        (
            "host = \"a\"",
            "host = \"a\"\nworkload = \"telnet\"",
            "or a console workload of the test guest (fill, dirty, ticks)",
        ),
        (
            "between = [\"a\", \"b\"]",
            "between = [\"a\", \"a\"]",
            "two different hosts",
        ),
        (
            "kind = \"migrate\"\nto = \"b\"",
            "kind = \"kill-primary\"",
            "needs a protected VM (vm.secondary)",
        ),
    ] {
        let out = check_variant(from, to);
        out.assert_status(2);
        assert!(
            out.stderr.contains("bad.toml") && out.stderr.contains(says),
            "{to}: expected {says:?}\n{}",
            out.describe()
        );
    }
}

/// A drill that cannot run the way it was asked (here: an etcd on a host
/// of its own, over loopback) is refused with status 2 saying why, never
/// run in some other way that would pass.
#[test]
fn a_drill_this_build_cannot_do_is_refused_not_faked() {
    let out = tandem(&["drill", &scenario("mail-partition"), "--loopback"]);
    out.assert_status(2);
    assert!(
        out.stderr
            .contains("drill mail-partition runs etcd on a host of its own")
            && out.stderr.contains("without --loopback"),
        "{}",
        out.describe()
    );
    assert!(!out.stderr.contains("run 1"), "it ran\n{}", out.describe());
}

/// A drill with an etcd arbiter on a machine without `etcd` is refused
/// before anything starts (status 2), naming the binary and its package:
/// never a pass without the arbiter.
#[test]
fn an_etcd_drill_without_etcd_is_refused() {
    let empty = TempDir::new("drill-no-etcd");
    let out = std::process::Command::new(common::TANDEM)
        .args(["drill", &scenario("mail-partition")])
        .env("PATH", empty.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("tandem drill");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no `etcd` on PATH") && stderr.contains("etcd-server"),
        "{stderr}"
    );
}

/// Where the etcd arbiter may run and what a partition may cut are
/// checked: a file arbiter has no link to cut, etcd needs a host of its
/// own linked to every VMM's host.
#[test]
fn arbiter_partitions_are_checked() {
    let base = std::fs::read_to_string(scenario("mail-partition")).unwrap();
    for (from, to, says) in [
        (
            "kind = \"etcd\"",
            "kind = \"file\"",
            "\"arbiter\" with a file arbiter: it is storage both hosts reach, nothing to cut",
        ),
        (
            "host = \"etcd\"",
            "host = \"b\"",
            "arbiter.host = \"b\": the VM runs on that host",
        ),
        (
            "[[links]]\nbetween = [\"a\", \"etcd\"]\n",
            "",
            "no [[links]] between a (a VMM runs there) and etcd",
        ),
    ] {
        assert!(base.contains(from), "{from:?} not in mail-partition.toml");
        let dir = TempDir::new("drill-arbiter");
        let path = dir.write("bad.toml", base.replacen(from, to, 1).as_bytes());
        let out = tandem(&["drill", "--check", common::arg(&path)]);
        out.assert_status(2);
        assert!(out.stderr.contains(says), "no {says:?}\n{}", out.describe());
    }
}

/// `counted_from = "start"` (overlapping cuts) only on a partition right
/// after a partition, with a time to wait, once each.
#[test]
fn overlapping_partitions_are_checked() {
    let base = std::fs::read_to_string(scenario("mail-partition-overlap")).unwrap();
    let second = "between = [\"a\", \"arbiter\"]\nduration_ms = 3000\ncounted_from = \"start\"\nwhen = { between_ms = [0, 2500] }";
    let first = "between = [\"a\", \"b\"]\nduration_ms = 3000\n";
    for (from, to, says) in [
        (
            first,
            "between = [\"a\", \"b\"]\nduration_ms = 3000\ncounted_from = \"start\"\n",
            "faults[0].counted_from = \"start\": only a partition right after a partition",
        ),
        (
            second,
            "between = [\"a\", \"arbiter\"]\nduration_ms = 3000\ncounted_from = \"start\"\nwhen = { at_message = 3 }",
            "faults[1].when: counted from the start of the cut before, the wait is a time",
        ),
        (
            second,
            "between = [\"a\", \"arbiter\"]\nduration_ms = 3000\ncounted_from = \"start\"\nrepeat = 2\nwhen = { at_ms = 5 }",
            "faults[1].counted_from = \"start\": overlapping partitions fire once each",
        ),
        (
            "duration_ms = 3000\ncounted_from = \"start\"",
            "duration_ms = 3000\ncounted_from = \"middle\"",
            "unknown variant `middle`, expected `end` or `start`",
        ),
    ] {
        assert!(base.contains(from), "{from:?} not in mail-partition-overlap.toml");
        let dir = TempDir::new("drill-overlap");
        let path = dir.write("bad.toml", base.replacen(from, to, 1).as_bytes());
        let out = tandem(&["drill", "--check", common::arg(&path)]);
        out.assert_status(2);
        assert!(out.stderr.contains(says), "no {says:?}\n{}", out.describe());
    }
}

/// The JSON report of a drill that passed (status 0, its first run passed).
fn passed_report(out: &common::Output) -> serde_json::Value {
    out.assert_status(0);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("the report is not JSON ({e})\n{}", out.describe()));
    assert_eq!(v["runs"][0]["passed"], true, "{}", out.describe());
    v
}

/// The mail VM migrates under load: nothing lost, nothing reset.
#[test]
fn migrate_under_load_end_to_end() {
    let out = tandem(&[
        "drill",
        &scenario("migrate-under-load"),
        "--seed",
        "11",
        "--json",
    ]);
    let v = passed_report(&out);
    let run = &v["runs"][0];
    assert_eq!(run["seed"], 11);
    let m = &run["messages"];
    assert_eq!(m["acknowledged"], 16, "{}", out.describe());
    assert_eq!(m["found"], 16, "{}", out.describe());
    assert_eq!(m["lost"], 0);
    assert_eq!(run["connections_reset"], 0);
    assert_eq!(run["live_copies"], 1);
    let f = &run["faults"][0];
    assert_eq!(f["kind"], "migrate");
    assert!(f["error"].is_null(), "{}", out.describe());
    assert!(f["downtime_ms"].as_f64().is_some(), "{}", out.describe());
    // The fault fired inside its window (4..=8 acknowledged messages).
    let at = f["at_messages"].as_u64().unwrap();
    assert!((4..=8).contains(&at), "fired after {at} messages");
    assert!(
        run["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["passed"] == true),
        "{}",
        out.describe()
    );
    assert_eq!(v["total"]["passed"], 1);
    assert_eq!(v["scenario"], "migrate-under-load");
    assert_no_namespaces_left();
}

/// One run of a console drill's JSON report: it passed, the console the
/// reader saw is the unfailed run's, one fault failed the VM over and
/// both gaps were measured; the run itself.
fn console_failover_passed(out: &common::Output, kind: &str) -> serde_json::Value {
    let v = passed_report(out);
    let run = v["runs"][0].clone();
    let c = &run["console"];
    assert!(c["lines"].as_u64().unwrap_or(0) > 100, "{}", out.describe());
    assert_eq!(c["lines"], c["expected_lines"], "{}", out.describe());
    assert!(c["result"]
        .as_str()
        .unwrap_or("")
        .starts_with("RESULT fill "));
    assert_eq!(c["result"], c["expected_result"]);
    assert_eq!(run["live_copies"], 1);
    let f = &run["faults"][0];
    assert_eq!(f["kind"], kind);
    assert_eq!(f["fails_over"], true);
    assert!(f["error"].is_null(), "{}", out.describe());
    assert!(f["client_gap_ms"].as_f64().is_some(), "{}", out.describe());
    assert!(f["vmm_gap_ms"].as_f64().is_some(), "{}", out.describe());
    assert!(v["total"]["failover_gap_ms"]["p50"].as_f64().is_some());
    run
}

/// The plug of a protected console VM's primary pulled in namespaces:
/// kill -9 and every link of the primary's host cut; the secondary goes
/// live and the console continues exactly.
#[test]
fn console_pull_plug_in_namespaces() {
    let out = tandem(&[
        "drill",
        &scenario("console-pull-plug"),
        "--seed",
        "11",
        "--json",
    ]);
    let run = console_failover_passed(&out, "pull-plug");
    let f = &run["faults"][0];
    assert!(
        f["detail"]
            .as_str()
            .unwrap_or("")
            .contains("every link of host a cut"),
        "{}",
        out.describe()
    );
    let at = f["at_messages"].as_u64().unwrap();
    assert!((20..=100).contains(&at), "fired after {at} lines");
    assert_no_namespaces_left();
}

/// `tandem drill` without a file (as root): the mail VM's primary host
/// loses its plug while clients send mail; the secondary goes live with
/// the VM's network: every acknowledged message is in the mailbox (POP3),
/// no session reset, one live copy.
#[test]
fn the_builtin_drill_pulls_the_plug_of_the_mail_vm() {
    let out = tandem(&["drill", "--seed", "11", "--json"]);
    let v = passed_report(&out);
    let run = &v["runs"][0];
    assert_eq!(v["scenario"], "mail-pull-plug");
    assert!(
        v["note"]
            .as_str()
            .unwrap_or("")
            .contains("network namespaces"),
        "{}",
        out.describe()
    );
    let m = &run["messages"];
    assert_eq!(m["acknowledged"], 60, "{}", out.describe());
    assert_eq!(m["lost"], 0);
    assert_eq!(run["connections_reset"], 0);
    assert_eq!(run["live_copies"], 1);
    let f = &run["faults"][0];
    assert_eq!(f["kind"], "pull-plug");
    assert!(f["error"].is_null(), "{}", out.describe());
    assert!(f["client_gap_ms"].as_f64().is_some(), "{}", out.describe());
    assert!(f["vmm_gap_ms"].as_f64().is_some(), "{}", out.describe());
    assert_no_namespaces_left();
}

/// Over loopback (what `tandem drill` does without root): the same drill
/// with processes as hosts, and says so; and the operator's test failover
/// (`tandem failover --api`) as the fault.
#[test]
fn console_drills_over_loopback() {
    let out = tandem(&["drill", "--loopback", "--seed", "4", "--json"]);
    let run = console_failover_passed(&out, "pull-plug");
    assert!(
        run["faults"][0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("no links to cut"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains("processes over loopback"),
        "{}",
        out.describe()
    );
    let dir = TempDir::new("drill-failover");
    let text = std::fs::read_to_string(scenario("console-pull-plug"))
        .unwrap()
        .replace("kind = \"pull-plug\"", "kind = \"failover\"");
    let path = dir.write("failover.toml", text.as_bytes());
    let out = tandem(&[
        "drill",
        common::arg(&path),
        "--loopback",
        "--seed",
        "8",
        "--json",
    ]);
    console_failover_passed(&out, "failover");
}

/// The mail VM protected from boot under load: nothing lost, the
/// secondary's final state is the primary's, and the cost is reported.
#[test]
fn protected_under_load_end_to_end() {
    let out = tandem(&[
        "drill",
        &scenario("protected-under-load"),
        "--seed",
        "5",
        "--json",
    ]);
    let v = passed_report(&out);
    let run = &v["runs"][0];
    assert_eq!(run["messages"]["acknowledged"], 16, "{}", out.describe());
    assert_eq!(run["messages"]["found"], 16);
    let p = &run["protection"];
    assert!(
        p["log_bytes"].as_u64().unwrap_or(0) > 0,
        "{}",
        out.describe()
    );
    assert!(p["outputs_released"].as_u64().unwrap_or(0) > 0);
    // The secondary's lag and bandwidth, from its status while it ran.
    let sec = &run["secondary"];
    assert!(
        sec["samples"].as_u64().unwrap_or(0) > 0,
        "{}",
        out.describe()
    );
    assert!(
        sec["log_bytes"].as_u64().unwrap_or(0) > 0,
        "{}",
        out.describe()
    );
    assert!(sec["lag_exits"]["max"].as_f64().is_some());
    assert!(p["primary_digest"].is_string(), "{}", out.describe());
    assert_eq!(p["primary_digest"], p["secondary_digest"]);
}

/// A failed expectation fails the drill (status 1) and the report names
/// the run, its seed, what was seen and how to repeat it; the run's
/// outputs are kept.
#[test]
fn a_failed_expectation_names_the_run_and_its_seed() {
    let dir = TempDir::new("drill-fail");
    let text = std::fs::read_to_string(scenario("migrate-under-load"))
        .unwrap()
        .replace("same_result_as_unfailed = true", "max_gap_ms = 1");
    let path = dir.write("strict.toml", text.as_bytes());
    let out = tandem(&["drill", common::arg(&path), "--seed", "9"]);
    out.assert_status(1);
    for want in [
        "run 1 of 1 (seed 9): FAIL",
        "[FAILED] client-seen gap under 1 ms: longest gap",
        "[ok] no acknowledged message lost",
        "--seed 9 --runs 1",
        "failed seeds   9",
    ] {
        assert!(out.stdout.contains(want), "no {want:?}\n{}", out.describe());
    }
    let kept = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("outputs kept in "))
        .unwrap_or_else(|| panic!("no kept directory\n{}", out.describe()));
    assert!(
        std::path::Path::new(kept).join("proc0.txt").exists(),
        "{kept}"
    );
    std::fs::remove_dir_all(kept).unwrap();
}

/// The secondary killed (SIGKILL) under load: the primary wins the file
/// arbiter and runs on; nothing acknowledged is lost, no session reset,
/// the pause the clients saw is reported.
#[test]
fn secondary_dies_end_to_end() {
    let out = tandem(&[
        "drill",
        &scenario("secondary-dies"),
        "--seed",
        "3",
        "--json",
    ]);
    let v = passed_report(&out);
    let run = &v["runs"][0];
    assert_eq!(run["messages"]["acknowledged"], 20, "{}", out.describe());
    assert_eq!(run["messages"]["lost"], 0);
    assert_eq!(run["connections_reset"], 0);
    let f = &run["faults"][0];
    assert_eq!(f["kind"], "kill-secondary");
    assert!(f["error"].is_null(), "{}", out.describe());
    assert!(f["client_gap_ms"].as_f64().is_some(), "{}", out.describe());
}

/// The namespaces of drills whose process is gone (none may be left).
fn assert_no_namespaces_left() {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let text = String::from_utf8_lossy(&out.stdout);
    let left: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("tandem-drill-"))
        .filter(|rest| {
            let pid = rest.split('-').next().unwrap_or("");
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
        })
        .collect();
    assert!(left.is_empty(), "drill namespaces left behind: {left:?}");
}

/// Ctrl-C in the middle of a run tears everything down: status 130, no
/// namespace and no VMM of the drill left.
#[test]
fn an_interrupted_drill_tears_everything_down() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(common::TANDEM)
        .arg("drill")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tandem drill");
    let pid = child.id();
    let mut seen = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("booting the ") {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("drill interrupted"), "{seen}");
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let mine = format!("tandem-drill-{pid}-");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(&mine), "left behind: {text}");
    let ps = std::process::Command::new("pgrep")
        .args(["-f", &format!("tandem-drill-{pid}-")])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&ps.stdout).trim().is_empty(),
        "processes of the drill left running: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

/// Fail over, protect the VM that went live again to a third host, fail
/// over again: the console across both failovers is the unfailed run's.
#[test]
fn console_failover_then_reprotect_end_to_end() {
    let out = tandem(&[
        "drill",
        &scenario("console-failover-then-reprotect"),
        "--seed",
        "2",
        "--json",
    ]);
    let run = console_failover_passed(&out, "kill-primary");
    let f = run["faults"].as_array().unwrap();
    assert_eq!(f.len(), 3, "{}", out.describe());
    assert_eq!(f[1]["kind"], "reprotect");
    assert_eq!(f[2]["kind"], "kill-primary");
    assert!(
        f[2]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("on host b -> host c"),
        "{}",
        out.describe()
    );
    assert!(f[2]["vmm_gap_ms"].as_f64().is_some(), "{}", out.describe());
}

/// The host-to-host link cut past the failover timeout: one side wins the
/// file arbiter, the other stops; one copy ran the guest to its end, the
/// console is the unfailed run's.
#[test]
fn console_partition_end_to_end() {
    let out = tandem(&[
        "drill",
        &scenario("console-partition"),
        "--seed",
        "3",
        "--json",
    ]);
    let v = passed_report(&out);
    let run = &v["runs"][0];
    assert_eq!(run["live_copies"], 1);
    assert_eq!(run["console"]["lines"], run["console"]["expected_lines"]);
    let detail = run["faults"][0]["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("won the arbiter") && detail.contains("stopped (exit status: 3)"),
        "{}",
        out.describe()
    );
    assert_no_namespaces_left();
}

/// Protected across a 150 ms RTT, 1% loss link (tandem-wan), then the plug
/// of the primary's host pulled: the far secondary goes live, the console
/// is the unfailed run's.
#[test]
fn console_long_distance_end_to_end() {
    let out = tandem(&[
        "drill",
        &scenario("console-long-distance"),
        "--seed",
        "6",
        "--json",
    ]);
    console_failover_passed(&out, "pull-plug");
    assert_no_namespaces_left();
}

/// The mail VM fails over, is protected again to a third host and fails
/// over again: every acknowledged message is in the mailbox, no reset.
#[test]
fn failover_then_reprotect_end_to_end() {
    let out = tandem(&[
        "drill",
        &scenario("failover-then-reprotect"),
        "--seed",
        "2",
        "--json",
    ]);
    let v = passed_report(&out);
    let run = &v["runs"][0];
    assert_eq!(run["messages"]["lost"], 0, "{}", out.describe());
    assert_eq!(run["messages"]["acknowledged"], 60, "{}", out.describe());
    assert_eq!(run["connections_reset"], 0);
    let kinds: Vec<&str> = run["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["kill-primary", "reprotect", "kill-primary"]);
}

/// The checks every mail partition drill's run passes: nothing
/// acknowledged lost, more than 10 acknowledged, one live copy, three cuts,
/// the first decided for one side while the other stopped with status 3.
/// Returns the cuts' reports.
#[track_caller]
fn partition_run_checked(v: &serde_json::Value, out: &common::Output) -> Vec<serde_json::Value> {
    let run = &v["runs"][0];
    assert_eq!(run["messages"]["lost"], 0, "{}", out.describe());
    assert!(
        run["messages"]["acknowledged"].as_u64().unwrap_or(0) > 10,
        "{}",
        out.describe()
    );
    assert_eq!(run["live_copies"], 1, "{}", out.describe());
    let f = run["faults"].as_array().unwrap().clone();
    assert_eq!(f.len(), 3, "{}", out.describe());
    let winner = f[0]["winner"].as_str().unwrap_or("");
    assert!(
        ["primary", "secondary"].contains(&winner)
            && f[0]["detail"]
                .as_str()
                .unwrap_or("")
                .contains("stopped (exit status: 3)"),
        "{}",
        out.describe()
    );
    f
}

/// `mail-partition` in a short form (shorter cuts and fewer messages than
/// the shipped campaign's): a real etcd on its own host is the arbiter;
/// the hosts cut apart, one side wins, the other stops with status 3;
/// then each host cut from etcd's host: the live side rides it out on its
/// lease. Nothing acknowledged lost (POP3), exactly one live copy.
#[test]
fn mail_partition_end_to_end() {
    let text = std::fs::read_to_string(scenario("mail-partition"))
        .unwrap()
        .replace("messages = 40", "messages = 14")
        .replace(
            "duration_ms = 3000\nwhen = { between_ms = [1000, 3000] }",
            "duration_ms = 1500\nwhen = { between_ms = [300, 600] }",
        )
        .replace(
            "duration_ms = 3000\nwhen = { between_ms = [300, 1500] }",
            "duration_ms = 800\nwhen = { between_ms = [100, 300] }",
        );
    assert_eq!(text.matches("duration_ms = 800").count(), 2, "{text}");
    let dir = TempDir::new("drill-mail-partition");
    let path = dir.write("mail-partition-short.toml", text.as_bytes());
    let out = tandem(&["drill", common::arg(&path), "--seed", "4", "--json"]);
    let v = passed_report(&out);
    let f = partition_run_checked(&v, &out);
    for cut in &f[1..] {
        let d = cut["detail"].as_str().unwrap_or("");
        assert!(
            d.contains("(the arbiter's host) cut") && cut["error"].is_null(),
            "{}",
            out.describe()
        );
    }
    let t = &v["total"];
    assert_eq!(
        t["partitions_won_by_secondary"].as_u64().unwrap()
            + t["partitions_won_by_primary"].as_u64().unwrap(),
        1
    );
    assert_no_namespaces_left();
}

/// `mail-partition-overlap` in a short form whose draws always overlap:
/// the hosts cut apart for 1.5 s, each host cut from etcd 0-0.3 s after
/// the cut before for 2.5 s, so both cuts from etcd fall on the claims
/// both sides make after the 1 s failover timeout: neither reaches the
/// arbiter at first, both keep asking, and the first to reach it when its
/// cut heals wins, the other stops (status 3). Before claims were asked
/// again, both stopped and no copy was live. Nothing acknowledged lost.
#[test]
fn mail_partition_overlap_end_to_end() {
    let text = std::fs::read_to_string(scenario("mail-partition-overlap"))
        .unwrap()
        .replace("messages = 50", "messages = 16")
        .replace(
            "duration_ms = 3000\nwhen = { between_ms = [1000, 3000] }",
            "duration_ms = 1500\nwhen = { between_ms = [300, 600] }",
        )
        .replace(
            "duration_ms = 3000\ncounted_from = \"start\"\nwhen = { between_ms = [0, 2500] }",
            "duration_ms = 2500\ncounted_from = \"start\"\nwhen = { between_ms = [0, 300] }",
        );
    assert_eq!(text.matches("duration_ms = 1500").count(), 1, "{text}");
    assert_eq!(text.matches("duration_ms = 2500").count(), 2, "{text}");
    let dir = TempDir::new("drill-mail-overlap");
    let path = dir.write("mail-partition-overlap-short.toml", text.as_bytes());
    let out = tandem(&["drill", common::arg(&path), "--seed", "7", "--json"]);
    let v = passed_report(&out);
    let f = partition_run_checked(&v, &out);
    for cut in &f[1..] {
        let d = cut["detail"].as_str().unwrap_or("");
        assert!(
            d.contains("(the arbiter's host) cut")
                && d.contains("overlapping the cut of a - b")
                && cut["error"].is_null(),
            "{}",
            out.describe()
        );
    }
    // The claims fell on the cuts from etcd: the sides asked again, which
    // is what left one copy live.
    assert!(
        f[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("could not be reached at first; asked again"),
        "{}",
        out.describe()
    );
    assert_no_namespaces_left();
}

/// `long-distance` once, as shipped (about 50 s on a quiet machine): 150
/// ms RTT and 1% loss between the hosts (tandem-wan); the mail VM
/// protected across that link switches over there and back (`tandem
/// switchover`, each followed by its re-protection onto the host it
/// left), then its primary is killed and the far secondary goes live.
/// Every fault fires while mail flows; nothing acknowledged is lost, no
/// session reset, one live copy.
#[test]
fn long_distance_end_to_end() {
    let out = tandem(&["drill", &scenario("long-distance"), "--seed", "1", "--json"]);
    let v = passed_report(&out);
    let run = &v["runs"][0];
    assert_eq!(run["messages"]["acknowledged"], 40, "{}", out.describe());
    assert_eq!(run["messages"]["found"], 40, "{}", out.describe());
    assert_eq!(run["messages"]["lost"], 0);
    assert_eq!(run["connections_reset"], 0);
    assert_eq!(run["live_copies"], 1);
    let f = run["faults"].as_array().unwrap();
    let kinds: Vec<&str> = f.iter().map(|f| f["kind"].as_str().unwrap_or("")).collect();
    assert_eq!(
        kinds,
        ["migrate", "migrate", "kill-primary"],
        "{}",
        out.describe()
    );
    for (m, way) in f[..2].iter().zip(["host a -> host b", "host b -> host a"]) {
        let d = m["detail"].as_str().unwrap_or("");
        assert!(
            d.starts_with(way)
                && d.contains("tandem switchover")
                && d.contains("protected again onto host"),
            "{}",
            out.describe()
        );
        assert!(m["downtime_ms"].as_f64().is_some(), "{}", out.describe());
        assert!(m["client_gap_ms"].as_f64().is_some(), "{}", out.describe());
    }
    let k = &f[2];
    assert_eq!(k["fails_over"], true);
    assert!(
        k["detail"]
            .as_str()
            .unwrap_or("")
            .contains("on host a -> host b"),
        "{}",
        out.describe()
    );
    assert!(k["vmm_gap_ms"].as_f64().is_some(), "{}", out.describe());
    // The session was still sending after the failover (its gap measured).
    assert!(k["client_gap_ms"].as_f64().is_some(), "{}", out.describe());
    assert!(
        k["at_messages"].as_u64().unwrap() < 40,
        "{}",
        out.describe()
    );
    assert_no_namespaces_left();
}
