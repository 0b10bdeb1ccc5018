//! Test failover (issue 10, `docs/failover.md`): `tandem run --protect-to
//! --api-socket SOCK` serves `{"cmd":"failover"}` on its control socket,
//! and `tandem failover --api SOCK` sends it. The primary answers `ok`,
//! then stops as if its host died: SIGKILL to itself, so nothing is said
//! to the secondary, no held output leaves and nothing is cleaned up. The
//! secondary sees what it sees after a real failure: silence, then its
//! failover timeout.
//!
//! This is the control socket of a VM protected from boot: it also
//! answers `{"cmd":"status"}` (`tandem status`: the protection's lag, lag
//! bound, log queue, held outputs, ...); the other requests (pause,
//! migrate, unprotect) are answered with an error naming what is served.

use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::CmdError;
use crate::api::{self, read_line, Event, Line, Request, MAX_REQUEST_LINE};
use crate::cli::FailoverCmdArgs;

fn send(w: &mut UnixStream, ev: &Event) -> bool {
    let mut line = serde_json::to_string(ev).unwrap_or_default();
    line.push('\n');
    w.write_all(line.as_bytes())
        .and_then(|()| w.flush())
        .is_ok()
}

/// The protection's status, once the log streams.
pub type StatusCell = std::sync::Arc<std::sync::OnceLock<primary::status::StatusSource>>;

/// Serve the control socket of a protected primary on a background thread;
/// `status` answers `tandem status` once it is set.
pub fn serve(path: &Path, status: StatusCell) -> Result<(), CmdError> {
    let bad = |e: std::io::Error| CmdError::Input(format!("--api-socket {}: {e}", path.display()));
    if path.exists() {
        // A socket nobody answers on is left over from a dead VM.
        if UnixStream::connect(path).is_ok() {
            return Err(CmdError::Input(format!(
                "--api-socket {}: in use by a running VM",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(bad)?;
    }
    let listener = UnixListener::bind(path).map_err(bad)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let status = status.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || serve_conn(stream, &status));
            }
        })
        .map_err(|e| CmdError::Internal(format!("starting the control socket: {e}")))?;
    Ok(())
}

/// `tandem status` of the protected primary.
fn status_of(cell: &StatusCell) -> primary::migration::VmStatus {
    let protection = cell.get().map(|s| s.status());
    primary::migration::VmStatus {
        state: "running".into(),
        exit_seq: protection.as_ref().map_or(0, |p| p.exit_seq),
        migration: None,
        reason: None,
        protection: protection.map(Box::new),
        lineage: None,
    }
}

fn serve_conn(stream: UnixStream, status: &StatusCell) {
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(stream);
    loop {
        let line = match read_line(&mut r, MAX_REQUEST_LINE) {
            Line::Request(l) => l,
            Line::TooLong => {
                send(
                    &mut w,
                    &Event::Error {
                        error: format!("request longer than {MAX_REQUEST_LINE} bytes"),
                    },
                );
                return;
            }
            Line::NotText => {
                send(
                    &mut w,
                    &Event::Error {
                        error: "request is not UTF-8".into(),
                    },
                );
                continue;
            }
            Line::End => return,
        };
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Failover) => {
                send(&mut w, &Event::Ok);
                eprintln!("tandem: test failover: this primary stops now as if its host died");
                // SAFETY: kill(2) on our own process; nothing after it runs.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                return;
            }
            Ok(Request::Status) => Event::Status(status_of(status)),
            Ok(Request::Switchover) => Event::Error {
                error: "a VM protected from boot (tandem run --protect-to) cannot switch over yet: run it with --api-socket and protect it with tandem protect --api (or give --spare)".into(),
            },
            Ok(_) => Event::Error {
                error: "a VM protected from boot serves only {\"cmd\":\"status\"} and {\"cmd\":\"failover\"} on its control socket yet".into(),
            },
            Err(e) => Event::Error {
                error: format!("bad request: {e}"),
            },
        };
        if !send(&mut w, &answer) {
            return;
        }
    }
}

/// `tandem failover --api SOCK`.
pub fn failover(args: FailoverCmdArgs) -> Result<i32, CmdError> {
    api::call_ok(&args.api, &Request::Failover).map_err(answer_error)?;
    println!("the primary stopped as if its host died; its secondary goes live after its failover timeout");
    Ok(0)
}

/// A control request that was not answered `ok`, as a command error.
pub fn answer_error(e: api::CmdAnswer) -> CmdError {
    match e {
        api::CmdAnswer::Socket(m) => CmdError::Input(m),
        api::CmdAnswer::Refused(m) => CmdError::Internal(m),
    }
}
