//! The control socket of a running VM (`tandem run --api-socket PATH`).
//!
//! A unix stream socket; each request is one line of JSON, each answer one
//! or more lines of JSON:
//!
//! | request | answers |
//! |---|---|
//! | `{"cmd":"status"}` | `{"event":"status", "state":..., "exit_seq":..., "migration":...}` |
//! | `{"cmd":"pause"}` / `{"cmd":"resume"}` | `{"event":"ok"}` |
//! | `{"cmd":"migrate", "to":ADDR, "server_name":..., "ca":..., "cert":..., "key":..., "downtime_ms":..., "max_bandwidth":...}` | `{"event":"progress", ...}` lines, then `{"event":"done", ...}` (the VM runs at the destination; this process ends) |
//! | `{"cmd":"move_disk", "dest":PATH, "force":false, "downtime_ms":...}` | `{"event":"progress", ...}` lines, then `{"event":"disk_moved", ...}` (the VM runs on the image at PATH now) |
//! | `{"cmd":"cancel"}` | `{"event":"ok"}`: the migration or disk move in progress stops before its switchover (its own stream ends with an error) |
//! | `{"cmd":"protect", "to":ADDR, "server_name":..., "ca":..., "cert":..., "key":..., "downtime_ms":...}` | `{"event":"progress", ...}` lines, then `{"event":"protected", ...}` (the VM runs protected by the secondary at ADDR) |
//! | `{"cmd":"unprotect"}` | `{"event":"unprotected", ...}` (the secondary has stopped; the VM runs on unprotected) |
//! | `{"cmd":"switchover"}` | `{"event":"switched_over", ...}` (a protected VM runs on its secondary's host now; this process ends) |
//!
//! A secondary's socket (`tandem secondary --api-socket`) answers `status`
//! only (its `protection` says how far behind it is).
//!
//! Any request may instead be answered `{"event":"error","error":"..."}`.
//! Paths are taken as given: clients send absolute paths. A request line
//! longer than [`MAX_REQUEST_LINE`] bytes is answered with an error naming
//! the limit and the connection is closed (the rest is never buffered);
//! beyond [`MAX_CONNECTIONS`] open connections a new one is answered
//! `busy` and closed.

use std::io::{BufRead, BufReader, Write};
use std::net::ToSocketAddrs;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use primary::migration::{
    DiskMoveParams, DiskMoveReport, MigrationParams, MigrationReport, Progress, VmController,
    VmStatus,
};
use primary::protect::{ProtectReport, SwitchoverReport, UnprotectReport};
use serde::{Deserialize, Serialize};

/// A request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    Migrate(MigrateRequest),
    MoveDisk(MoveDiskRequest),
    /// Cancel the migration in progress (before its switchover).
    Cancel,
    /// Test failover: a protected primary stops as if its host died
    /// (`tandem failover`; served by `crate::commands::failover_api`).
    Failover,
    /// Protect the running VM (`tandem protect`).
    Protect(ProtectRequest),
    /// End its protection (`tandem unprotect`).
    Unprotect,
    /// Hand the protected VM over to its secondary (`tandem switchover`).
    Switchover,
}

/// The arguments of a local disk move.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveDiskRequest {
    /// The new image.
    pub dest: PathBuf,
    /// Overwrite an existing non-empty file.
    #[serde(default)]
    pub force: bool,
    /// Largest acceptable pause (default 30 ms).
    pub downtime_ms: Option<u64>,
    /// Cap on the copy rate in bytes/s.
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
}

/// The arguments of a migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// `HOST:PORT` of the `tandem receive`.
    pub to: String,
    /// Name the destination's certificate must carry (default: HOST).
    pub server_name: Option<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Largest acceptable pause (default 30 ms).
    pub downtime_ms: Option<u64>,
    /// Sending rate cap in bytes/s.
    pub max_bandwidth: Option<u64>,
}

/// The arguments of a protect: where the secondary is (as for a
/// migration) and the failover settings of the protection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProtectRequest {
    #[serde(flatten)]
    pub to: MigrateRequest,
    pub heartbeat_ms: u64,
    pub failover_timeout_ms: u64,
    /// `file:DIR`, if any.
    pub arbiter: Option<String>,
    /// Spare secondaries (`--spare`): seeded in turn when the secondary is
    /// lost and this primary won the arbiter (`crate::spare`).
    #[serde(default)]
    pub spares: Vec<String>,
    /// The lag bound, log queue bound and progress marks' interval
    /// (`--lag-bound-ms`, ...; checked before anything is done; absent:
    /// the defaults).
    #[serde(default)]
    pub lag: Option<crate::cli::LagArgs>,
}

/// An answer line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Status(VmStatus),
    Ok,
    Error { error: String },
    Progress(Progress),
    Done(MigrationReport),
    DiskMoved(DiskMoveReport),
    Protected(ProtectReport),
    Unprotected(UnprotectReport),
    SwitchedOver(SwitchoverReport),
}

/// What a control socket serves: a VM, or a secondary (status only).
#[derive(Clone)]
pub enum Target {
    Vm(VmController),
    Secondary(Arc<dyn Fn() -> VmStatus + Send + Sync>),
}

/// Default pause target of a migration.
pub const DEFAULT_DOWNTIME_MS: u64 = 30;

/// Most control connections served at once; one more is answered
/// `busy` and closed.
pub const MAX_CONNECTIONS: usize = 32;

/// Longest request line accepted (bytes, without the newline); real
/// requests are a few hundred bytes.
pub const MAX_REQUEST_LINE: usize = 64 << 10;

/// One request line read from a client.
pub(crate) enum Line {
    Request(String),
    /// Longer than [`MAX_REQUEST_LINE`].
    TooLong,
    /// Not UTF-8.
    NotText,
    /// The client closed the connection (or reading failed).
    End,
}

/// Read the next line, never holding more than `max` bytes of it.
pub(crate) fn read_line(r: &mut impl BufRead, max: usize) -> Line {
    let mut line = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok([]) | Err(_) => return Line::End,
            Ok(b) => b,
        };
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1),
            None => (buf, buf.len()),
        };
        if line.len() + chunk.len() > max {
            return Line::TooLong;
        }
        line.extend_from_slice(chunk);
        let newline = done > chunk.len();
        r.consume(done);
        if newline {
            return match String::from_utf8(line) {
                Ok(s) => Line::Request(s),
                Err(_) => Line::NotText,
            };
        }
    }
}

/// The server; removes its socket file when dropped.
pub struct Server {
    path: PathBuf,
}

/// Migrations and disk moves whose client has not had its last answer yet
/// (one server per process).
static ANSWERING: AtomicUsize = AtomicUsize::new(0);

impl Server {
    /// Is a migration or disk move still to tell its client how it ended?
    /// The process waits for that before it exits.
    pub fn answering(&self) -> bool {
        ANSWERING.load(Ordering::SeqCst) > 0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bind `path` and serve `ctl` on a background thread.
pub fn serve(path: &Path, ctl: VmController) -> std::io::Result<Server> {
    serve_target(path, Target::Vm(ctl))
}

/// Bind `path` and serve `target` on a background thread.
pub fn serve_target(path: &Path, ctl: Target) -> std::io::Result<Server> {
    if path.exists() {
        // A socket nobody answers on is left over from a dead VM.
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running VM", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for mut stream in listener.incoming().flatten() {
                if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::SeqCst);
                    send(
                        &mut stream,
                        &Event::Error {
                            error: format!(
                                "busy: {MAX_CONNECTIONS} control connections are open (the limit); try again when one closes"
                            ),
                        },
                    );
                    continue;
                }
                let ctl = ctl.clone();
                let done = open.clone();
                let spawned = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || {
                        serve_conn(stream, &ctl);
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    // No thread: the connection is dropped, its slot freed.
                    open.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })?;
    Ok(Server {
        path: path.to_path_buf(),
    })
}

fn send(w: &mut UnixStream, ev: &Event) -> bool {
    let mut line = serde_json::to_string(ev).unwrap_or_else(|_| "{}".into());
    line.push('\n');
    w.write_all(line.as_bytes())
        .and_then(|()| w.flush())
        .is_ok()
}

fn serve_conn(stream: UnixStream, target: &Target) {
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let line = match read_line(&mut reader, MAX_REQUEST_LINE) {
            Line::Request(l) => l,
            Line::End => return,
            Line::TooLong => {
                send(
                    &mut w,
                    &Event::Error {
                        error: format!(
                            "request line longer than {MAX_REQUEST_LINE} bytes (the limit); closing the connection"
                        ),
                    },
                );
                return;
            }
            Line::NotText => {
                send(
                    &mut w,
                    &Event::Error {
                        error: "bad request: not UTF-8".into(),
                    },
                );
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                send(
                    &mut w,
                    &Event::Error {
                        error: format!("bad request: {e}"),
                    },
                );
                continue;
            }
        };
        let ctl = match (target, req) {
            (Target::Vm(ctl), r) => (ctl, r),
            (Target::Secondary(status), Request::Status) => {
                if !send(&mut w, &Event::Status(status())) {
                    return;
                }
                continue;
            }
            (Target::Secondary(_), _) => {
                let error = "this is a secondary: it answers status only (protection is controlled on the primary)".to_string();
                if !send(&mut w, &Event::Error { error }) {
                    return;
                }
                continue;
            }
        };
        let (ctl, req) = ctl;
        let answer = match req {
            Request::Status => Event::Status(ctl.status()),
            Request::Unprotect => match primary::protect::unprotect(ctl) {
                Ok(r) => Event::Unprotected(r),
                Err(e) => Event::Error {
                    error: e.to_string(),
                },
            },
            Request::Protect(m) => {
                ANSWERING.fetch_add(1, Ordering::SeqCst);
                protect(&mut w, ctl, &m);
                ANSWERING.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            Request::Pause => result(ctl.pause()),
            Request::Resume => result(ctl.resume()),
            Request::Cancel => result(ctl.cancel_migration()),
            Request::Failover => {
                if ctl.status().protection.is_none() {
                    Event::Error {
                        error: "this VM is not protected: no secondary would take over (a test failover needs a protected VM)".into(),
                    }
                } else {
                    send(&mut w, &Event::Ok);
                    eprintln!("tandem: test failover: this primary stops now as if its host died");
                    // SAFETY: kill(2) on our own process; nothing after it runs.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                    return;
                }
            }
            Request::Switchover => {
                ANSWERING.fetch_add(1, Ordering::SeqCst);
                switchover(&mut w, ctl);
                ANSWERING.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            Request::Migrate(m) => {
                ANSWERING.fetch_add(1, Ordering::SeqCst);
                migrate(&mut w, ctl, &m);
                ANSWERING.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            Request::MoveDisk(m) => {
                ANSWERING.fetch_add(1, Ordering::SeqCst);
                move_disk(&mut w, ctl, &m);
                ANSWERING.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        };
        if !send(&mut w, &answer) {
            return;
        }
    }
}

fn result<E: std::fmt::Display>(r: Result<(), E>) -> Event {
    match r {
        Ok(()) => Event::Ok,
        Err(e) => Event::Error {
            error: e.to_string(),
        },
    }
}

pub(crate) fn params(m: &MigrateRequest) -> Result<MigrationParams, String> {
    let to =
        m.to.to_socket_addrs()
            .map_err(|e| format!("--to {}: {e}", m.to))?
            .next()
            .ok_or_else(|| format!("--to {}: no address", m.to))?;
    let host =
        m.to.rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(&m.to);
    let creds = failover::certs::Credentials::load(&m.ca, &m.cert, &m.key)
        .map_err(|e| format!("loading credentials: {e}"))?;
    let name = m
        .cert
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "source".into());
    Ok(MigrationParams {
        to,
        server_name: m.server_name.clone().unwrap_or_else(|| host.to_string()),
        creds,
        name,
        downtime: Duration::from_millis(m.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS)),
        max_bandwidth: m.max_bandwidth,
    })
}

fn migrate(w: &mut UnixStream, ctl: &VmController, m: &MigrateRequest) {
    let params = match params(m) {
        Ok(p) => p,
        Err(error) => {
            send(w, &Event::Error { error });
            return;
        }
    };
    eprintln!("tandem: migrating the VM to {}", params.to);
    let mut client = true;
    let result = primary::migration::migrate(ctl, &params, &mut |p| {
        if client {
            client = send(w, &Event::Progress(p.clone()));
        }
    });
    match result {
        Ok(report) => {
            let dest = report.destination.clone();
            send(w, &Event::Done(report));
            let _ = w.shutdown(std::net::Shutdown::Write);
            ctl.finish_migrated(dest);
        }
        Err(e) => {
            eprintln!(
                "tandem: migration to {} failed: {e}; the VM {} here",
                params.to,
                goes_on(ctl)
            );
            send(
                w,
                &Event::Error {
                    error: e.to_string(),
                },
            );
        }
    }
}

fn protect(w: &mut UnixStream, ctl: &VmController, m: &ProtectRequest) {
    eprintln!(
        "tandem: protecting the VM: seeding the secondary at {}",
        m.to.to
    );
    let mut client = true;
    let result = crate::spare::protect(ctl, m, false, &mut |p| {
        if client {
            client = send(w, &Event::Progress(p.clone()));
        }
    });
    match result {
        Ok(report) => {
            eprintln!(
                "tandem: protected by the secondary {} from exit {} (primary paused {:.1} ms)",
                report.secondary, report.start_exit, report.pause_ms
            );
            send(w, &Event::Protected(report));
        }
        Err(error) => {
            eprintln!(
                "tandem: protecting the VM failed: {error}; the VM {} unprotected",
                goes_on(ctl)
            );
            send(w, &Event::Error { error });
        }
    }
}

fn switchover(w: &mut UnixStream, ctl: &VmController) {
    eprintln!("tandem: switchover: handing the VM over to its secondary");
    match primary::protect::switchover(ctl) {
        Ok(r) => {
            eprintln!(
                "tandem: switchover: the VM runs on {} now (VM {} generation {}, from exit {}); downtime {:.1} ms (here {:.1} ms, one way {:.1} ms, go-live there {:.1} ms); this process ends",
                r.to, r.vm_id, r.generation, r.exit_seq, r.downtime_ms, r.pause_here_ms, r.one_way_ms, r.go_live_ms
            );
            send(w, &Event::SwitchedOver(r));
            let _ = w.shutdown(std::net::Shutdown::Write);
        }
        Err(e) => {
            eprintln!("tandem: switchover failed: {e}");
            send(
                w,
                &Event::Error {
                    error: e.to_string(),
                },
            );
        }
    }
}

/// What the VM does after a failed migration: "keeps running" or "stays
/// paused".
pub fn goes_on(ctl: &VmController) -> &'static str {
    if ctl.paused() {
        "stays paused"
    } else {
        "keeps running"
    }
}

fn move_disk(w: &mut UnixStream, ctl: &VmController, m: &MoveDiskRequest) {
    let params = DiskMoveParams {
        dest: m.dest.clone(),
        force: m.force,
        downtime: Duration::from_millis(m.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS)),
        max_bandwidth: m.max_bandwidth,
    };
    eprintln!("tandem: moving the disk to {}", params.dest.display());
    let mut client = true;
    let result = primary::migration::move_disk(ctl, &params, &mut |p| {
        if client {
            client = send(w, &Event::Progress(p.clone()));
        }
    });
    match result {
        Ok(report) => {
            eprintln!(
                "tandem: the disk moved from {} to {} (guest paused {:.2} ms)",
                report.from.display(),
                report.to.display(),
                report.pause_ms
            );
            send(w, &Event::DiskMoved(report));
        }
        Err(e) => {
            eprintln!(
                "tandem: moving the disk to {} failed: {e}; the VM {} on its current image",
                params.dest.display(),
                goes_on(ctl)
            );
            send(
                w,
                &Event::Error {
                    error: e.to_string(),
                },
            );
        }
    }
}

/// Client side: send `req` and take its one answer, which must be `ok`
/// (`Err`: the socket failed, or the answer, e.g. the VM's error).
pub fn call_ok(path: &Path, req: &Request) -> Result<(), CmdAnswer> {
    let mut res = Err(CmdAnswer::Refused("no answer".to_string()));
    call(path, req, |ev| {
        res = match ev {
            Event::Ok => Ok(()),
            Event::Error { error } => Err(CmdAnswer::Refused(error)),
            other => Err(CmdAnswer::Refused(format!("unexpected answer {other:?}"))),
        };
        false
    })
    .map_err(CmdAnswer::Socket)?;
    res
}

/// Why [`call_ok`] did not get `ok`.
pub enum CmdAnswer {
    /// The socket could not be used (named in the message).
    Socket(String),
    /// The VM answered something else.
    Refused(String),
}

/// Client side: send one request, call `on_event` for each answer line
/// until the server closes or `on_event` returns `false`.
pub fn call(
    path: &Path,
    req: &Request,
    mut on_event: impl FnMut(Event) -> bool,
) -> Result<(), String> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        format!(
            "--api {}: {e} (is the VM running with --api-socket?)",
            path.display()
        )
    })?;
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("--api {}: {e}", path.display()))?;
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(|e| format!("--api {}: {e}", path.display()))?;
        let ev: Event = serde_json::from_str(&line)
            .map_err(|e| format!("--api {}: bad answer {line:?}: {e}", path.display()))?;
        if !on_event(ev) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{read_line, Line};
    use std::io::{BufReader, Cursor};

    fn lines(input: &[u8], max: usize) -> Vec<String> {
        // A small buffer, so that lines span several fills.
        let mut r = BufReader::with_capacity(4, Cursor::new(input.to_vec()));
        let mut out = Vec::new();
        loop {
            match read_line(&mut r, max) {
                Line::Request(l) => out.push(l),
                Line::TooLong => {
                    // The server closes the connection here.
                    out.push("<too long>".into());
                    return out;
                }
                Line::NotText => out.push("<not text>".into()),
                Line::End => return out,
            }
        }
    }

    #[test]
    fn request_lines_are_bounded() {
        assert_eq!(lines(b"ab\ncdefgh\n\n", 6), ["ab", "cdefgh", ""]);
        assert_eq!(lines(b"ab\ncdefghi\nxy\n", 6), ["ab", "<too long>"]);
        assert_eq!(lines(b"abcdefghijklmnop", 6), ["<too long>"]);
        assert_eq!(lines(b"\xff\nok\n", 6), ["<not text>", "ok"]);
        // An unterminated last line is no request.
        assert_eq!(lines(b"ab\ncd", 6), ["ab"]);
    }
}
