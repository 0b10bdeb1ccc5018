//! `tandem migrate`, `tandem status`, `tandem pause|resume` (clients of the
//! control socket), and running a VM with a control socket.

use std::io::{IsTerminal, Write};
use std::path::Path;

use primary::migration::{
    controller, run_controlled, ControlledOutcome, MigrationReport, Progress,
};
use vmm::inputs::LiveInputs;
use vmm::machine::Machine;

use super::run::outcome_status;
use super::CmdError;
use crate::api::{self, Event, MigrateRequest, Request};
use crate::cli::{GuestElfArgs, MigrateArgs, StatusArgs};

/// Run `machine` with a control socket at `sock` until the guest ends
/// (its status) or the VM has been migrated away (0).
pub fn run_with_api(
    mut machine: Machine,
    inputs: &mut LiveInputs,
    sock: &Path,
) -> Result<i32, CmdError> {
    let (ctl, side) = controller(&machine);
    let server = api::serve(sock, ctl)
        .map_err(|e| CmdError::Input(format!("--api-socket {}: {e}", sock.display())))?;
    let outcome = run_controlled(&mut machine, inputs, side);
    drop(server);
    match outcome? {
        ControlledOutcome::Guest(o) => Ok(outcome_status(o)),
        ControlledOutcome::Migrated(dest) => {
            eprintln!("tandem: the VM was migrated and runs on {dest} now; exiting");
            Ok(0)
        }
    }
}

fn absolute(p: &Path) -> Result<std::path::PathBuf, CmdError> {
    std::path::absolute(p).map_err(|e| CmdError::Input(format!("{}: {e}", p.display())))
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / (1024.0 * 1024.0))
}

fn progress_line(p: &Progress) -> String {
    let mut s = format!(
        "{:>9} round {:>2}  sent {:>10}  pages {:>7}  dirty {:>6} pages ({:.0}/s)  est. downtime {:.1} ms",
        p.phase,
        p.round,
        mib(p.bytes_sent as f64),
        p.pages_sent,
        p.dirty_pages,
        p.dirty_rate,
        p.estimated_downtime_ms
    );
    if p.disk_bytes_sent > 0 {
        s.push_str(&format!("  disk {}", mib(p.disk_bytes_sent as f64)));
    }
    if p.throttle_pct > 0 {
        s.push_str(&format!(
            "  auto-converge: guest throttled {}%",
            p.throttle_pct
        ));
    }
    s
}

fn summary(r: &MigrationReport) -> String {
    format!(
        "migrated to {}\n  total time     {:.1} ms\n  downtime       {:.2} ms\n  bytes on wire  {} ({})\n  rounds         {} pre-copy + stop-and-copy ({} pages)\n  pages sent     {}{}{}",
        r.destination,
        r.total_ms,
        r.downtime_ms,
        r.bytes_on_wire,
        mib(r.bytes_on_wire as f64),
        r.rounds,
        r.final_pages,
        r.pages_sent,
        if r.disk_bytes_sent > 0 {
            format!("\n  disk sent      {}", mib(r.disk_bytes_sent as f64))
        } else {
            String::new()
        },
        if r.converged {
            String::new()
        } else {
            format!(
                "\n  note: pre-copy did not reach the downtime target (throttle up to {}%)",
                r.max_throttle_pct
            )
        }
    )
}

pub fn migrate(args: MigrateArgs) -> Result<i32, CmdError> {
    let req = Request::Migrate(MigrateRequest {
        to: args.to.clone(),
        server_name: args.server_name.clone(),
        ca: absolute(&args.creds.ca)?,
        cert: absolute(&args.creds.cert)?,
        key: absolute(&args.creds.key)?,
        downtime_ms: Some(args.downtime_ms),
        max_bandwidth: args.max_bandwidth,
        disk_dest: args.disk_dest.as_deref().map(absolute).transpose()?,
    });
    let tty = std::io::stdout().is_terminal() && !args.json;
    let mut out = std::io::stdout();
    let mut result: Option<Result<MigrationReport, String>> = None;
    api::call(&args.api, &req, |ev| {
        match ev {
            Event::Progress(p) => {
                if args.json {
                    let _ = writeln!(
                        out,
                        "{}",
                        serde_json::to_string(&Event::Progress(p)).unwrap_or_default()
                    );
                } else if tty {
                    let _ = write!(out, "\r\x1b[2K{}", progress_line(&p));
                    let _ = out.flush();
                } else {
                    let _ = writeln!(out, "{}", progress_line(&p));
                }
                return true;
            }
            Event::Done(r) => result = Some(Ok(r)),
            Event::Error { error } => result = Some(Err(error)),
            other => result = Some(Err(format!("unexpected answer {other:?}"))),
        }
        false
    })
    .map_err(CmdError::Input)?;
    if tty {
        println!();
    }
    match result {
        Some(Ok(r)) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&Event::Done(r)).unwrap_or_default()
                );
            } else {
                println!("{}", summary(&r));
            }
            Ok(0)
        }
        Some(Err(e)) => {
            eprintln!("tandem: migration failed: {e}; the VM keeps running on the source");
            Ok(1)
        }
        None => {
            eprintln!("tandem: the VM's control socket closed without a result");
            Ok(1)
        }
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
            None => println!("{} (exit {})", s.state, s.exit_seq),
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
    let mut res = Err("no answer".to_string());
    api::call(&args.api, &req, |ev| {
        res = match ev {
            Event::Ok => Ok(()),
            Event::Error { error } => Err(error),
            other => Err(format!("unexpected answer {other:?}")),
        };
        false
    })
    .map_err(CmdError::Input)?;
    res.map_err(CmdError::Internal)?;
    println!("{}", if pause { "paused" } else { "running" });
    Ok(0)
}

pub fn guest_elf(args: GuestElfArgs) -> Result<i32, CmdError> {
    std::fs::write(&args.out, crate::guest_image::GUEST_ELF)
        .map_err(|e| CmdError::Input(format!("--out {}: {e}", args.out.display())))?;
    Ok(0)
}
