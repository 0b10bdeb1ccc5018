//! `tandem migrate`, `tandem status`, `tandem pause|resume` (clients of the
//! control socket), and running a VM with a control socket.

use std::path::Path;

use primary::migration::{
    controller, ControlledOutcome, DiskMoveReport, MigrationReport, Progress,
};
use primary::protect::run_protectable;
use vmm::inputs::LiveInputs;
use vmm::machine::Machine;

use super::progress::{CtrlC, Display};
use super::run::outcome_status;
use super::CmdError;
use crate::api::{self, Event, MigrateRequest, MoveDiskRequest, Request};
use crate::cli::{GuestElfArgs, MigrateArgs, StatusArgs};

/// Run `machine` with a control socket at `sock` until the guest ends
/// (its status) or the VM has been migrated away (0). `paused`: start
/// paused, until `tandem resume`.
pub fn run_with_api(
    mut machine: Machine,
    inputs: LiveInputs,
    sock: &Path,
    paused: bool,
) -> Result<i32, CmdError> {
    run_with_api_as(&mut machine, inputs, sock, paused, |_| {})
}

/// [`run_with_api`], with `setup` given the VM's controller before the
/// guest runs (a secondary that went live sets the VM's protection
/// history there: `tandem status` says so, `tandem protect` continues its
/// generations, `--spare` starts seeding).
pub fn run_with_api_as(
    machine: &mut Machine,
    inputs: LiveInputs,
    sock: &Path,
    paused: bool,
    setup: impl FnOnce(&primary::migration::VmController),
) -> Result<i32, CmdError> {
    let (ctl, side) = controller(machine);
    // SIGTERM/SIGINT end the run at the next exit as the guest's end: a
    // protected VM closes its log (final sync point, `End`) and prints its
    // final state digest, which its secondary verifies (`signals::block`
    // ran first in every command that gets here).
    let stopper = ctl.clone();
    crate::signals::on_stop_call(move || stopper.stop());
    setup(&ctl);
    let side = if paused { side.start_paused() } else { side };
    let side = side.with_api_socket(sock);
    let lineage = ctl.clone();
    let server = api::serve(sock, ctl)
        .map_err(|e| CmdError::Input(format!("--api-socket {}: {e}", sock.display())))?;
    // `tandem protect` and `tandem unprotect` start and end recording.
    let outcome = run_protectable(machine, inputs, side, outcome_status).map(|(o, end)| {
        if let (ControlledOutcome::Guest(_), Some(sig)) = (&o, crate::signals::received()) {
            eprintln!("tandem: stopped by {sig} at exit {}", machine.exit_seq);
        }
        match end {
            Some(end) => super::protect_running::report_end(&end),
            None => ended_unprotected(machine, &o, lineage.lineage().role),
        }
        o
    });
    // A migration in progress sees the guest's end and tells its client
    // before this process (and the client's connection) goes away.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while server.answering() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(server);
    match outcome? {
        ControlledOutcome::Guest(o) => Ok(outcome_status(o)),
        ControlledOutcome::Migrated(dest) => {
            eprintln!("tandem: the VM was migrated and runs on {dest} now; exiting");
            Ok(0)
        }
        // Handled by run_protectable.
        ControlledOutcome::Protection(_) => Ok(0),
    }
}

/// A guest that ends on a VM that was protected once and is no longer
/// (its secondary lost, `tandem unprotect`): say so, with the final digest
/// (a secondary that verified up to an unprotect can be compared with it
/// only at that end; a spare seeded since has its own end).
fn ended_unprotected(
    machine: &mut Machine,
    outcome: &ControlledOutcome,
    role: failover::lineage::Role,
) {
    use failover::lineage::Role;
    let ControlledOutcome::Guest(_) = outcome else {
        return;
    };
    if matches!(role, Role::Unprotected | Role::Secondary) {
        return;
    }
    eprintln!(
        "tandem: the run ended at exit {}, {}",
        machine.exit_seq,
        role.describe()
    );
    if let Ok(d) = machine.digest() {
        eprintln!("tandem: final state digest {}", d.to_hex());
    }
}

pub(super) fn absolute(p: &Path) -> Result<std::path::PathBuf, CmdError> {
    std::path::absolute(p).map_err(|e| CmdError::Input(format!("{}: {e}", p.display())))
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / (1024.0 * 1024.0))
}

/// A byte count in the unit that shows it moving (KiB below 1 MiB).
fn size(b: u64) -> String {
    if b < 1 << 20 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        mib(b as f64)
    }
}

pub(super) fn progress_line(p: &Progress) -> String {
    if p.phase.starts_with("disk-") {
        return disk_progress_line(p);
    }
    let mut s = format!(
        "{:>9} round {:>2}  sent {:>10}  pages {:>7}  dirty {:>6} pages ({:.0}/s)  est. downtime {:.1} ms",
        p.phase,
        p.round,
        size(p.bytes_sent),
        p.pages_sent,
        p.dirty_pages,
        p.dirty_rate,
        p.estimated_downtime_ms
    );
    if p.disk_bytes_sent > 0 {
        s.push_str(&format!("  disk {}", mib(p.disk_bytes_sent as f64)));
    }
    s.push_str(&throttle_note(p));
    s
}

/// Progress of a local disk move.
fn disk_progress_line(p: &Progress) -> String {
    let mut s = format!(
        "{:>11} round {:>2}  copied {:>10}  dirty {:>5} blocks  est. pause {:.1} ms",
        p.phase,
        p.round,
        mib(p.disk_bytes_sent as f64),
        p.dirty_blocks,
        p.estimated_downtime_ms
    );
    s.push_str(&throttle_note(p));
    s
}

/// The auto-converge note ending a progress line (empty while the guest
/// is not throttled).
fn throttle_note(p: &Progress) -> String {
    if p.throttle_pct > 0 {
        format!(
            "  auto-converge: guest throttled {}% (held {:.0} ms so far)",
            p.throttle_pct, p.throttled_ms
        )
    } else {
        String::new()
    }
}

fn disk_summary(r: &DiskMoveReport) -> String {
    format!(
        "moved the disk from {} to {}\n  total time     {:.1} ms\n  pause          {:.2} ms\n  copied         {} bytes ({}) of a {} disk\n  rounds         {} + final copy ({} blocks){}",
        r.from.display(),
        r.to.display(),
        r.total_ms,
        r.pause_ms,
        r.bytes_copied,
        mib(r.bytes_copied as f64),
        mib(r.disk_bytes as f64),
        r.rounds,
        r.final_blocks,
        if r.converged {
            String::new()
        } else {
            format!(
                "\n  note: the copy rounds did not reach the pause target (throttle up to {}%)",
                r.max_throttle_pct
            )
        }
    )
}

fn summary(r: &MigrationReport) -> String {
    let mut s = format!(
        "migrated to {}\n  total time     {:.1} ms\n  downtime       {:.2} ms\n  bytes on wire  {} ({})\n  rounds         {} pre-copy + stop-and-copy ({} pages)\n  pages sent     {}{}{}",
        r.destination,
        r.total_ms,
        r.downtime_ms,
        r.bytes_on_wire,
        mib(r.bytes_on_wire as f64),
        r.rounds,
        r.final_pages,
        r.pages_sent,
        if r.disk_shared {
            "\n  disk           not copied: the destination uses the same image (shared storage)"
                .to_string()
        } else if r.disk_bytes_sent > 0 {
            format!("\n  disk sent      {}", mib(r.disk_bytes_sent as f64))
        } else {
            String::new()
        },
        if r.converged {
            String::new()
        } else {
            format!(
                "\n  note: pre-copy did not reach the downtime target of {:.1} ms (throttle up to {}%)",
                r.target_ms, r.max_throttle_pct
            )
        }
    );
    if r.max_throttle_pct > 0 {
        s.push_str(&format!(
            "\n  throttled      {:.1} ms (auto-converge, up to {}%)",
            r.throttled_ms, r.max_throttle_pct
        ));
    }
    if let Some(note) = &r.note {
        s.push_str(&format!("\n  note: {note}"));
    }
    if r.paused {
        s.push_str("\n  the VM was paused and arrived paused: `tandem resume` on the destination's control socket runs it");
    }
    s
}

/// What `tandem migrate` ended with.
enum Outcome {
    Migrated(MigrationReport),
    DiskMoved(DiskMoveReport),
}

pub fn migrate(args: MigrateArgs) -> Result<i32, CmdError> {
    let req = match &args.to {
        Some(to) => {
            let (Some(ca), Some(cert), Some(key)) = (&args.ca, &args.cert, &args.key) else {
                return Err(CmdError::Input(
                    "--to needs the cluster credentials: --ca, --cert and --key".into(),
                ));
            };
            Request::Migrate(MigrateRequest {
                to: to.clone(),
                server_name: args.server_name.clone(),
                ca: absolute(ca)?,
                cert: absolute(cert)?,
                key: absolute(key)?,
                downtime_ms: Some(args.downtime_ms),
                max_bandwidth: args.max_bandwidth,
            })
        }
        None => {
            let Some(dest) = &args.disk_dest else {
                return Err(CmdError::Input(
                    "give --to ADDR to move the VM, or --disk-dest PATH to move its disk".into(),
                ));
            };
            Request::MoveDisk(MoveDiskRequest {
                dest: absolute(dest)?,
                force: args.force,
                downtime_ms: Some(args.downtime_ms),
                max_bandwidth: args.max_bandwidth,
            })
        }
    };
    let disk_move = matches!(req, Request::MoveDisk(_));
    let what = if disk_move { "disk move" } else { "migration" };
    let (result, cancelled) =
        call_with_progress(&args.api, &req, args.json, what, |ev| match ev {
            Event::Done(r) => Some(Outcome::Migrated(r)),
            Event::DiskMoved(r) => Some(Outcome::DiskMoved(r)),
            _ => None,
        })?;
    match result {
        Some(Ok(outcome)) => {
            if cancelled {
                eprintln!("tandem: too late to cancel: the {what} had reached its switchover and completed");
            }
            let (ev, text) = match outcome {
                Outcome::Migrated(r) => {
                    let text = summary(&r);
                    (Event::Done(r), text)
                }
                Outcome::DiskMoved(r) => {
                    let text = disk_summary(&r);
                    (Event::DiskMoved(r), text)
                }
            };
            if args.json {
                println!("{}", serde_json::to_string(&ev).unwrap_or_default());
            } else {
                println!("{text}");
            }
            Ok(0)
        }
        Some(Err(e)) => {
            let how = vm_goes_on(&args.api);
            let whence = if disk_move {
                "on its current disk image (the move did not modify it)"
            } else {
                "on the source"
            };
            if cancelled {
                eprintln!("tandem: {what} cancelled; the VM {how} {whence}");
            } else {
                eprintln!("tandem: {what} failed: {e}; the VM {how} {whence}");
            }
            Ok(1)
        }
        None => {
            eprintln!("tandem: the VM's control socket closed without a result");
            Ok(1)
        }
    }
}

/// Send `req` (a long request: migrate, move a disk, protect) and show its
/// progress until its result: `done` turns the final event into the
/// outcome (`None`: an unexpected answer). Ctrl-C asks the VM to cancel
/// (`what` names the work). Returns the result (`None`: the socket closed
/// without one) and whether a cancel was asked for.
pub(super) fn call_with_progress<T>(
    sock: &Path,
    req: &Request,
    json: bool,
    what: &'static str,
    mut done: impl FnMut(Event) -> Option<T>,
) -> Result<(Option<Result<T, String>>, bool), CmdError> {
    let cancel = CtrlC::install(sock, what)
        .map_err(|e| CmdError::Internal(format!("installing the Ctrl-C handler: {e}")))?;
    let mut display = Display::new(json);
    let mut result: Option<Result<T, String>> = None;
    let called = api::call(sock, req, |ev| {
        match ev {
            Event::Progress(p) => {
                display.progress(&p, &progress_line(&p));
                return true;
            }
            Event::Error { error } => result = Some(Err(error)),
            other => {
                let shown = format!("unexpected answer {other:?}");
                result = Some(done(other).ok_or(shown));
            }
        }
        false
    });
    display.finish();
    let cancelled = cancel.finish();
    called.map_err(CmdError::Input)?;
    Ok((result, cancelled))
}

/// After a failed migration: "keeps running" or "stays paused", as the
/// VM's status says.
pub(super) fn vm_goes_on(sock: &Path) -> &'static str {
    let mut paused = None;
    let _ = api::call(sock, &Request::Status, |ev| {
        if let Event::Status(s) = ev {
            paused = Some(s.state == "paused");
        }
        false
    });
    match paused {
        Some(true) => "stays paused",
        Some(false) => "keeps running",
        None => "has ended",
    }
}

pub fn status(args: StatusArgs) -> Result<i32, CmdError> {
    let mut status = None;
    let mut err = None;
    api::call(&args.api, &Request::Status, |ev| {
        match ev {
            Event::Status(s) => status = Some(s),
            Event::Error { error } => err = Some(error),
            _ => {}
        }
        false
    })
    .map_err(CmdError::Input)?;
    if let Some(e) = err {
        return Err(CmdError::Internal(e));
    }
    let Some(s) = status else {
        return Err(CmdError::Internal("no status from the VM".into()));
    };
    if args.json {
        println!("{}", serde_json::to_string(&s).unwrap_or_default());
    } else {
        match &s.migration {
            Some(p) => println!("migrating: {}", progress_line(p).trim_start()),
            None => match &s.reason {
                Some(why) => println!("{} (exit {}): {why}", s.state, s.exit_seq),
                None => println!("{} (exit {})", s.state, s.exit_seq),
            },
        }
        match (&s.protection, &s.lineage) {
            (Some(p), _) => println!("{}", super::protect_running::status_text(p)),
            (None, Some(_)) => {}
            (None, None) if s.state != "stopped" => println!("unprotected"),
            (None, None) => {}
        }
        if let Some(l) = &s.lineage {
            println!("{}", super::protect_running::lineage_text(l));
        }
    }
    Ok(0)
}

pub fn pause(args: StatusArgs, pause: bool) -> Result<i32, CmdError> {
    let req = if pause {
        Request::Pause
    } else {
        Request::Resume
    };
    api::call_ok(&args.api, &req).map_err(super::failover_api::answer_error)?;
    println!("{}", if pause { "paused" } else { "running" });
    Ok(0)
}

pub fn guest_elf(args: GuestElfArgs) -> Result<i32, CmdError> {
    std::fs::write(&args.out, crate::guest_image::GUEST_ELF)
        .map_err(|e| CmdError::Input(format!("--out {}: {e}", args.out.display())))?;
    Ok(0)
}
