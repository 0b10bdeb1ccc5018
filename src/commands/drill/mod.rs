//! `tandem drill`: rehearse a disaster on this machine and report what a
//! skeptical operator would want to see.
//!
//! A drill is data (`scenarios/*.toml`, see [`scenario`] and
//! docs/drills.md): hosts as network namespaces ([`topo`]), the mail VM,
//! real clients (Python's smtplib, from the client network), a fault
//! schedule and expectations checked from the clients' side (POP3). Each
//! run builds everything afresh and tears it down, also on Ctrl-C
//! ([`run`]); the report gives each run and the total ([`report`]).
//!
//! A drill this build cannot do (a fault that needs failover) is refused
//! up front, naming what is missing, with status 2: never a fake pass.

mod procs;
mod report;
mod run;
pub mod scenario;
mod topo;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::CmdError;
use crate::cli::DrillArgs;
use report::DrillReport;
use scenario::Scenario;

/// The built-in drill: the plug of a protected VM's primary pulled. Its
/// mail version needs a secondary that goes live with the VM's network
/// ([`scenario::NETWORK_FAILOVER`]); until then the console workload.
const BUILTIN: &str = include_str!("../../../scenarios/console-pull-plug.toml");
const BUILTIN_NAME: &str = "scenarios/console-pull-plug.toml (built in)";
/// As root, once a mail VM fails over with its network.
const BUILTIN_MAIL: &str = include_str!("../../../scenarios/mail-pull-plug.toml");
const BUILTIN_MAIL_NAME: &str = "scenarios/mail-pull-plug.toml (built in)";
const BUILTIN_MAIL_NOTE: &str = "built-in drill: the plug of the mail VM's primary pulled (kill -9 and every link of its host cut) while clients send mail, hosts as network namespaces";
const BUILTIN_NOTE_ROOT: &str = "built-in drill: the plug of a protected VM's primary pulled (kill -9 and every link of its host cut) while it writes its console, hosts as network namespaces; the mail version needs a secondary that goes live with the VM's network (--net), which this build does not have";
const BUILTIN_NOTE_USER: &str = "built-in drill, not root (or --loopback): the hosts are processes over loopback on this machine (no namespaces, so the plug pulled is kill -9 of the primary's VMM, no links to cut), the workload a console one; as root it runs in network namespaces";

/// Exit status when Ctrl-C ended the drill (everything torn down).
const INTERRUPTED: i32 = 130;

pub fn drill(args: DrillArgs) -> Result<i32, CmdError> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (scn, file, note) = match &args.file {
        Some(f) => (
            Scenario::load(f).map_err(|e| CmdError::Input(e.to_string()))?,
            f.display().to_string(),
            None,
        ),
        None => {
            let namespaces = root && !args.loopback;
            let (name, text, note) = if namespaces && scenario::NETWORK_FAILOVER {
                (BUILTIN_MAIL_NAME, BUILTIN_MAIL, BUILTIN_MAIL_NOTE)
            } else if namespaces {
                (BUILTIN_NAME, BUILTIN, BUILTIN_NOTE_ROOT)
            } else {
                (BUILTIN_NAME, BUILTIN, BUILTIN_NOTE_USER)
            };
            (
                Scenario::parse(name, text).map_err(|e| CmdError::Input(e.to_string()))?,
                name.to_string(),
                Some(note.to_string()),
            )
        }
    };
    let console = scn.workload() == scenario::WorkloadKind::Console;
    let missing = scn.missing();
    if args.check {
        if missing.is_empty() {
            println!(
                "{file}: drill {} is valid and this build can run it",
                scn.name
            );
        } else {
            println!(
                "{file}: drill {} is valid; this build cannot run it: {}",
                scn.name,
                missing.join("; ")
            );
        }
        return Ok(0);
    }
    if !missing.is_empty() {
        return Err(CmdError::Input(format!(
            "{file}: cannot run drill {}: {}",
            scn.name,
            missing.join("; ")
        )));
    }
    if let Some(a) = scn
        .arbiter
        .as_ref()
        .filter(|a| a.kind == scenario::ArbiterKind::Etcd)
    {
        let host = a.host.as_deref().unwrap_or_default();
        let found = std::process::Command::new("etcd")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(CmdError::Input(format!(
                "{file}: drill {} runs a real etcd as its arbiter on host {host}, and there is no `etcd` on PATH: install Debian's etcd-server",
                scn.name
            )));
        }
        if !root || args.loopback {
            return Err(CmdError::Input(format!(
                "{file}: drill {} runs etcd on a host of its own (host {host}, a network namespace): run it as root, without --loopback",
                scn.name
            )));
        }
    }
    if args.runs == 0 {
        return Err(CmdError::Input("--runs 0: give at least one run".into()));
    }
    let loopback = !root || args.loopback;
    if loopback && !console {
        return Err(CmdError::Input(
            "tandem drill builds the mail VM's hosts as network namespaces with TAP devices: run it as root, without --loopback (over loopback only console workloads run)"
                .into(),
        ));
    }
    if loopback
        && scn
            .links
            .iter()
            .any(|l| l.rtt_ms > 0.0 || l.loss_percent > 0.0 || l.rate.is_some())
    {
        return Err(CmdError::Input(
            "a link with rtt_ms, loss_percent or rate is built from network namespaces: run the drill as root".into(),
        ));
    }
    if !console
        && !std::process::Command::new("python3")
            .args(["-c", "import smtplib, poplib"])
            .status()
            .is_ok_and(|s| s.success())
    {
        return Err(CmdError::Input(
            "tandem drill's clients are Python's smtplib and poplib: install python3".into(),
        ));
    }
    if scn.client.as_ref().map(|c| c.kind) == Some(scenario::ClientKind::Swaks)
        && !std::process::Command::new("swaks")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    {
        return Err(CmdError::Input(
            "client.kind = \"swaks\": install swaks (Debian package swaks)".into(),
        ));
    }
    let tandem = std::env::current_exe()
        .map_err(|e| CmdError::Internal(format!("finding the tandem binary: {e}")))?;
    let wan = tandem
        .parent()
        .map(|d| d.join("tandem-wan"))
        .filter(|p| p.exists());

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| CmdError::Internal(format!("installing the Ctrl-C handler: {e}")))?;
    }
    if !loopback {
        topo::remove_stale();
    }
    let reference = if console {
        Some(unfailed_console(&tandem, &scn)?)
    } else {
        None
    };

    let base = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_007)
            .unwrap_or(1)
    });
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let bar =
            ProgressBar::with_draw_target(Some(args.runs as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} {elapsed:>4} [{bar:20}] {pos}/{len} done  {wide_msg}",
        ) {
            bar.set_style(style);
        }
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    });
    let mut runs = Vec::new();
    let head = DrillReport::new(&scn.name, &file, note.clone(), Vec::new());
    for i in 1..=args.runs {
        let seed = base.wrapping_add(i as u64 - 1);
        let say = |what: &str| match &bar {
            Some(b) => b.set_message(format!("run {i} (seed {seed}): {what}")),
            None => eprintln!("drill {}: run {i} (seed {seed}): {what}", scn.name),
        };
        let ctx = run::Ctx {
            scn: &scn,
            tandem: tandem.clone(),
            wan: wan.clone(),
            stop: &stop,
            keep: args.keep,
            progress: &say,
            loopback,
            reference: reference.clone(),
        };
        let Ok(mut r) = run::run_once(&ctx, i, seed) else {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            eprintln!(
                "tandem: drill interrupted in run {i} (seed {seed}); its hosts and processes are torn down"
            );
            return Ok(INTERRUPTED);
        };
        r.run = i;
        if !args.json {
            let text = head.run_text(&r, args.runs);
            match &bar {
                Some(b) => b.println(text.trim_end()),
                None => print!("{text}"),
            }
        }
        if let Some(b) = &bar {
            b.inc(1);
        }
        runs.push(r);
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    let interrupted = stop.load(Ordering::Relaxed);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = DrillReport::new(&scn.name, &file, note, runs);
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report)
                .map_err(|e| CmdError::Internal(format!("writing the report: {e}")))?
        );
    } else {
        print!("{}", report.total_text());
    }
    if interrupted {
        eprintln!(
            "tandem: drill interrupted after {} of {} runs; everything is torn down",
            report.runs.len(),
            args.runs
        );
        return Ok(INTERRUPTED);
    }
    Ok(if report.passed() { 0 } else { 1 })
}

/// The console of an unfailed, unprotected run of a console workload:
/// what every run's console must be.
fn unfailed_console(tandem: &std::path::Path, scn: &Scenario) -> Result<Vec<u8>, CmdError> {
    let out = std::process::Command::new(tandem)
        .args(["run", "--cmdline", &scn.vm.workload])
        .args(["--mem-mib", &scn.vm.mem_mib.to_string()])
        .env_remove("TANDEM_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| CmdError::Internal(format!("running the unfailed reference run: {e}")))?;
    if !out.status.success() {
        return Err(CmdError::Input(format!(
            "vm.workload = {:?}: its unfailed run ended with {}: {}",
            scn.vm.workload,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}
