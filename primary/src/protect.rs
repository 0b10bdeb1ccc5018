//! Protecting a VM that already runs (`tandem protect`) and ending
//! protection in order (`tandem unprotect`).
//!
//! [`protect`] seeds the secondary with the migration's own pre-copy
//! (`migration::source`, through its [`Seeding`] hooks): memory and disk
//! rounds while the guest runs, then the freeze at one exit, the final
//! pages and blocks and the `MachineState`. Still frozen, the vCPU thread
//! ([`run_protectable`]) starts recording from that exit: the log's header
//! names the seed's digest, its outputs go through [`HeldOutputs`] (the
//! Output Rule), and the guest runs on. The pause, from the freeze to that
//! moment, is measured. Once the secondary confirms the seed (`Running`),
//! the log streams on the same connection exactly as for a VM protected
//! from boot (`crate::lockstep`).
//!
//! A protect that fails leaves the guest running unprotected: before the
//! freeze nothing changed; after it, recording is abandoned and every held
//! output released at once (no secondary holds the log they wait for).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use failover::lockstep::{kind, Header as LockstepHeader, ProtectionStatus, LOCKSTEP_VERSION};
use failover::migration::{Accepted, Header as MigrationHeader};
use recordlog::{Digest, Entry, Header, InitialState, LogQueue, QueueWriter};
use serde::{Deserialize, Serialize};
use vmm::inputs::{Inputs, LiveInputs};
use vmm::machine::{LogConfig, Machine};
use vmm::outputs::LiveOutputs;
use vmm::run::{RunError, RunOutcome};

use crate::failover::FailoverParams;
use crate::lag::{Governor, LagLimits};
use crate::lockstep::{Acks, HeldOutputs, Link, Release, Waiting};
use crate::migration::control::{ControlledOutcome, Frozen, VcpuSide, VmController};
use crate::migration::{MigrationError, MigrationParams, Progress};
use crate::record::{RecordOptions, Recorder};

/// How long the vCPU thread may take to start recording, and the
/// secondary to acknowledge the end of the log when protection ends.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The summary of a protect that succeeded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProtectReport {
    /// `NAME at ADDR` of the secondary.
    pub secondary: String,
    /// From the request to the secondary's confirmation of the seed (ms).
    pub total_ms: f64,
    /// The primary's pause: from the freeze to the guest running again,
    /// recorded (ms).
    pub pause_ms: f64,
    /// The exit recording started at.
    pub start_exit: u64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Pages sent in all.
    pub pages_sent: u64,
    /// Pages sent during the pause.
    pub final_pages: u64,
    /// Disk bytes sent.
    pub disk_bytes_sent: u64,
    /// UDP bytes sent (QUIC/TLS framing included).
    pub bytes_on_wire: u64,
    /// Did pre-copy reach its pause target?
    pub converged: bool,
}

/// What `tandem unprotect` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnprotectReport {
    /// The secondary that was let go.
    pub secondary: String,
    /// The exit where protection ended (the log's `End`).
    pub exit_seq: u64,
    /// Log bytes streamed in all.
    pub log_bytes: u64,
    /// Held outputs released (after their acknowledgement).
    pub released: u64,
    /// The secondary acknowledged the whole log (else: why not).
    pub acknowledged: Result<(), String>,
}

/// Why a protect failed; the guest runs on unprotected.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// Protected already (by this secondary).
    #[error("the VM is already protected by {0}")]
    Already(String),
    /// Paused by its operator.
    #[error("the VM is paused: resume it before protecting it")]
    Paused,
    /// `tandem unprotect` of a VM that is not protected.
    #[error("the VM is not protected")]
    NotProtected,
    /// The guest has ended.
    #[error("the VM has stopped")]
    Ended,
    /// The seeding (the migration's transfer) failed.
    #[error(transparent)]
    Seed(#[from] MigrationError),
    /// The log stream could not start or end in order.
    #[error("starting the log stream: {0}")]
    Stream(String),
}

/// A step handed to the vCPU thread through the controller.
#[derive(Debug)]
pub enum Step {
    /// Start recording at this exit (the guest is frozen).
    Start(Box<Start>),
    /// End recording here.
    Stop(Stop),
}

/// Start recording: the session's queue gets the log.
#[derive(Debug)]
pub struct Start {
    session: Arc<Session>,
    rec: RecordOptions,
    reply: Sender<Result<Instant, String>>,
}

/// End recording: `abandon` when the secondary never held the seed (no
/// `End`, no wait; held outputs leave at once).
#[derive(Debug)]
pub struct Stop {
    abandon: bool,
    reply: Sender<Result<UnprotectReport, String>>,
}

/// One protection: shared by the protect request, the vCPU thread and
/// `tandem status`.
pub struct Session {
    queue: LogQueue,
    acks: Arc<Acks>,
    link: Mutex<Option<Link>>,
    /// The lag bound, while the log streams.
    governor: Mutex<Option<Governor>>,
    inner: Mutex<SessionInfo>,
}

#[derive(Default)]
struct SessionInfo {
    state: String,
    peer: String,
    start_exit: u64,
    /// Virtual time at the start exit and when that was (the primary's
    /// clock is host time from there on).
    start_ns: u64,
    started: Option<Instant>,
    waiting: Option<Arc<Waiting>>,
    /// The link ended (`finish` taken or never made).
    closed: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("protect::Session")
    }
}

impl Session {
    fn new(failover: FailoverParams, limits: &LagLimits) -> Arc<Session> {
        Arc::new(Session {
            queue: limits.queue(),
            acks: Arc::new(Acks::new(failover)),
            link: Mutex::new(None),
            governor: Mutex::new(None),
            inner: Mutex::new(SessionInfo {
                state: "seeding".into(),
                ..Default::default()
            }),
        })
    }

    fn info(&self) -> std::sync::MutexGuard<'_, SessionInfo> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn link(&self) -> std::sync::MutexGuard<'_, Option<Link>> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The link, once [`protect`] has made it (waits up to `timeout`; `None`
    /// if it never came).
    fn take_link(&self, timeout: Duration) -> Option<Link> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.link().take() {
                return Some(l);
            }
            if self.info().closed || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The status, with the primary at `exit_seq`.
    pub fn status(&self, exit_seq: u64) -> ProtectionStatus {
        let info = self.info();
        let bound = self
            .governor()
            .as_ref()
            .map(|g| g.status(&self.acks, &self.queue));
        crate::status::primary_status(
            &self.acks,
            &self.queue,
            crate::status::View {
                state: info.state.clone(),
                peer: info.peer.clone(),
                start_exit: info.start_exit,
                started: info.started,
                waiting: info.waiting.as_deref(),
                exit_seq,
                bound,
            },
        )
    }

    fn governor(&self) -> std::sync::MutexGuard<'_, Option<Governor>> {
        self.governor.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The hooks that turn the migration's transfer into a seeding.
struct Seeder<'a> {
    ctl: &'a VmController,
    session: Arc<Session>,
    rec: RecordOptions,
    started: bool,
}

impl crate::migration::Seeding for Seeder<'_> {
    fn header(&self, migration: &MigrationHeader) -> Result<(u8, Vec<u8>), String> {
        let h = LockstepHeader {
            version: LOCKSTEP_VERSION,
            disk: None,
            seed: Some(migration.clone()),
        };
        Ok((
            kind::HEADER,
            postcard::to_stdvec(&h).map_err(|e| e.to_string())?,
        ))
    }

    fn accepted(&self, k: u8, payload: &[u8]) -> Option<Result<Accepted, String>> {
        (k == kind::ACCEPTED).then(|| {
            postcard::from_bytes(payload).map_err(|e| format!("unreadable acceptance: {e}"))
        })
    }

    fn start(&mut self, frozen: Frozen) -> Result<Instant, String> {
        {
            let mut info = self.session.info();
            info.start_exit = frozen.state.exit_seq;
            info.start_ns = frozen.state.virtual_ns;
        }
        let (tx, rx) = bounded(1);
        self.ctl
            .protection(Step::Start(Box::new(Start {
                session: self.session.clone(),
                rec: self.rec,
                reply: tx,
            })))
            .map_err(|e| e.to_string())?;
        let at = rx
            .recv_timeout(STEP_TIMEOUT)
            .map_err(|_| "the vCPU did not start recording".to_string())??;
        self.started = true;
        Ok(at)
    }
}

/// Protect the running VM of `ctl`: seed the secondary at `params.to`
/// (`params.downtime` is the pause target of the pre-copy), then stream
/// its log. `on_progress` as for a migration. Returns once the secondary
/// holds the seed; the VM then runs protected.
pub fn protect(
    ctl: &VmController,
    params: &MigrationParams,
    failover: FailoverParams,
    rec: RecordOptions,
    limits: LagLimits,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<ProtectReport, ProtectError> {
    if ctl.paused() {
        return Err(ProtectError::Paused);
    }
    protect_vm(ctl, params, failover, rec, limits, on_progress)
}

/// [`protect`] a VM that may be paused (it stays paused, recorded from the
/// exit it is paused at): a VM protected before its first instruction.
pub fn protect_paused(
    ctl: &VmController,
    params: &MigrationParams,
    failover: FailoverParams,
    rec: RecordOptions,
    limits: LagLimits,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<ProtectReport, ProtectError> {
    protect_vm(ctl, params, failover, rec, limits, on_progress)
}

fn protect_vm(
    ctl: &VmController,
    params: &MigrationParams,
    failover: FailoverParams,
    rec: RecordOptions,
    limits: LagLimits,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<ProtectReport, ProtectError> {
    if let Some(s) = ctl.protection_session() {
        if !s.acks.alone() {
            return Err(ProtectError::Already(s.info().peer.clone()));
        }
        // Its secondary was lost and it won the arbiter: that recording
        // goes nowhere; end it before seeding the new secondary.
        abandon(ctl);
    }
    if ctl.ended() {
        return Err(ProtectError::Ended);
    }
    // The next generation of this VM's protection (`failover::lineage`).
    let mut failover = failover;
    let before = {
        let mut lineage = ctl.lineage();
        let before = lineage.role;
        let (id, generation) = lineage.next_protection(&failover.protection.vm_id);
        failover.protection.vm_id = id;
        failover.protection.generation = generation;
        before
    };
    let then = failover.on_alone.take();
    let noted = ctl.clone();
    failover.on_alone = Some(Arc::new(move || {
        noted.lineage().secondary_lost();
        let (ctl, then) = (noted.clone(), then.clone());
        // Called on the ack thread: the vCPU thread's answer is awaited on
        // a thread of its own.
        let spawned = std::thread::Builder::new()
            .name("secondary-lost".into())
            .spawn(move || {
                // The recording goes nowhere now: end it, the guest runs on
                // (a protect or a spare may have replaced it meanwhile).
                if ctl.protection_session().is_some_and(|s| s.acks.alone()) {
                    abandon(&ctl);
                }
                if let Some(f) = &then {
                    f();
                }
            });
        if let Err(e) = spawned {
            tracing::error!("ending the lost protection: {e}");
        }
    }));
    let session = Session::new(failover, &limits);
    ctl.set_protection_session(Some(session.clone()));
    let mut seeder = Seeder {
        ctl,
        session: session.clone(),
        rec,
        started: false,
    };
    let seeded = crate::migration::seed(ctl, params, on_progress, &mut seeder);
    let result = seeded
        .map_err(ProtectError::from)
        .and_then(|(report, conn)| {
            let link = Link::start(conn, session.queue.clone(), session.acks.clone())
                .map_err(ProtectError::Stream)?;
            let peer = link.peer.clone();
            {
                let mut info = session.info();
                info.peer = peer.clone();
                info.state = "protected".into();
            }
            ctl.lineage().protected(&peer);
            *session.link() = Some(link);
            *session.governor() = Some(Governor::start(
                session.acks.clone(),
                ctl.throttle(),
                limits.bound,
            ));
            Ok(ProtectReport {
                secondary: peer,
                total_ms: report.total_ms,
                pause_ms: report.downtime_ms,
                start_exit: session.info().start_exit,
                rounds: report.rounds,
                pages_sent: report.pages_sent,
                final_pages: report.final_pages,
                disk_bytes_sent: report.disk_bytes_sent,
                bytes_on_wire: report.bytes_on_wire,
                converged: report.converged,
            })
        });
    if result.is_err() {
        session.info().closed = true;
        if seeder.started {
            // Recording began: abandon it, the guest runs on unprotected.
            abandon(ctl);
        }
        session.acks.unprotect();
        ctl.set_protection_session(None);
        ctl.lineage().protect_failed(before);
    }
    result
}

/// End the recording of a protection whose secondary was lost (this
/// primary won the arbiter and runs alone): nothing is sent or waited for.
fn abandon(ctl: &VmController) {
    let (tx, rx) = bounded(1);
    if ctl
        .protection(Step::Stop(Stop {
            abandon: true,
            reply: tx,
        }))
        .is_ok()
    {
        let _ = rx.recv_timeout(STEP_TIMEOUT);
    }
    ctl.set_protection_session(None);
}

/// End protection in order: the log's `End` at the next exit, the
/// secondary's acknowledgement of all of it, the held outputs released;
/// the guest runs on unprotected.
pub fn unprotect(ctl: &VmController) -> Result<UnprotectReport, ProtectError> {
    let Some(session) = ctl.protection_session() else {
        return Err(ProtectError::NotProtected);
    };
    if session.info().state == "seeding" {
        return Err(ProtectError::Stream(
            "the secondary is still being seeded; cancel the protect instead".into(),
        ));
    }
    let (tx, rx) = bounded(1);
    ctl.protection(Step::Stop(Stop {
        abandon: false,
        reply: tx,
    }))
    .map_err(|_| ProtectError::Ended)?;
    let r = rx
        .recv_timeout(STEP_TIMEOUT * 2)
        .map_err(|_| ProtectError::Ended)?
        .map_err(ProtectError::Stream);
    ctl.set_protection_session(None);
    ctl.lineage().unprotected();
    r
}

/// How a protected run ended (the guest's end, protected).
#[derive(Debug)]
pub struct ProtectedEnd {
    /// The secondary.
    pub secondary: String,
    /// The guest's last exit.
    pub exit_seq: u64,
    /// Log bytes streamed.
    pub log_bytes: u64,
    /// Outputs released after acknowledgement, and never released.
    pub released: u64,
    /// Outputs never released (the secondary was lost).
    pub withheld: u64,
    /// The secondary acknowledged the whole log (else: why not).
    pub acknowledged: Result<(), String>,
    /// The final state digest.
    pub digest: Digest,
}

/// A recording in progress on the vCPU thread.
struct Recording {
    recorder: Recorder<LiveInputs, QueueWriter>,
    release: Release,
    session: Arc<Session>,
}

enum Mode {
    Plain(LiveInputs),
    Recording(Box<Recording>),
}

/// Run `machine` under the controller of `side` as
/// [`crate::migration::run_controlled`] does, starting and ending recording
/// when [`protect`] and [`unprotect`] ask. `status_of` maps the guest's end
/// to its exit status (the log's `End`).
pub fn run_protectable(
    machine: &mut Machine,
    live: LiveInputs,
    mut side: VcpuSide,
    status_of: fn(RunOutcome) -> i32,
) -> Result<(ControlledOutcome, Option<ProtectedEnd>), RunError> {
    let ctl = side.controller();
    let mut mode = Some(Mode::Plain(live));
    loop {
        let outcome = match mode.as_mut().expect("mode") {
            Mode::Plain(live) => crate::migration::run_controlled(machine, live, &mut side),
            Mode::Recording(r) => {
                crate::migration::run_controlled(machine, &mut r.recorder, &mut side)
            }
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                if let Some(Mode::Recording(r)) = mode.take() {
                    r.session.acks.unprotect();
                    ctl.set_protection_session(None);
                }
                return Err(e);
            }
        };
        match (outcome, mode.take().expect("mode")) {
            (ControlledOutcome::Protection(Step::Start(start)), Mode::Plain(live)) => {
                mode = Some(match begin(machine, live, &start) {
                    Ok(r) => {
                        let _ = start.reply.send(Ok(Instant::now()));
                        Mode::Recording(Box::new(r))
                    }
                    Err(failed) => {
                        let (live, e) = *failed;
                        let _ = start.reply.send(Err(e));
                        Mode::Plain(live)
                    }
                });
            }
            (ControlledOutcome::Protection(Step::Stop(stop)), Mode::Recording(r)) => {
                let how = if stop.abandon {
                    Ending::Abandon
                } else {
                    Ending::Unprotect
                };
                let (live, report) = end(machine, *r, how);
                let _ = stop.reply.send(Ok(UnprotectReport {
                    secondary: report.secondary,
                    exit_seq: report.exit_seq,
                    log_bytes: report.log_bytes,
                    released: report.released,
                    acknowledged: report.acknowledged,
                }));
                mode = Some(Mode::Plain(live));
            }
            (ControlledOutcome::Protection(step), m) => {
                // Nothing to start or stop in this mode.
                match step {
                    Step::Start(s) => {
                        let _ = s.reply.send(Err("the VM is already recording".into()));
                    }
                    Step::Stop(s) => {
                        let _ = s.reply.send(Err("the VM is not protected".into()));
                    }
                }
                mode = Some(m);
            }
            (ControlledOutcome::Guest(o), Mode::Recording(r)) => {
                let (_, report) = end(machine, *r, Ending::Guest(status_of(o)));
                ctl.set_protection_session(None);
                return Ok((ControlledOutcome::Guest(o), Some(report)));
            }
            (other, _) => return Ok((other, None)),
        }
    }
}

/// Start recording at the current exit into the session's queue.
fn begin(
    machine: &mut Machine,
    mut live: LiveInputs,
    start: &Start,
) -> Result<Recording, Box<(LiveInputs, String)>> {
    let made = (|| {
        if machine.sync.is_none() {
            machine
                .enable_sync_points(false)
                .map_err(|e| e.to_string())?;
        } else {
            // Sync points carry the pages dirtied since the last one: start
            // clean at the seed.
            machine
                .capture_sync_point(false)
                .map_err(|e| e.to_string())?;
        }
        let seq = machine.exit_seq;
        let digest = machine.digest().map_err(|e| e.to_string())?;
        let config = LogConfig {
            vm: machine.config.clone(),
            fingerprint_interval: start.rec.fingerprint_interval,
            sync_interval: start.rec.sync_interval,
        };
        let header = Header::new(
            config.encode().map_err(|e| e.to_string())?,
            InitialState::Snapshot {
                digest,
                path_hint: format!("the seed of a running VM at exit {seq}"),
            },
        );
        let mut writer = QueueWriter::new(start.session.queue.clone(), &header)
            .map_err(|e| format!("the log stream: {e}"))?;
        writer
            .append(&Entry::Digest {
                exit_seq: seq,
                digest,
            })
            .map_err(|e| format!("the log stream: {e}"))?;
        Ok(writer)
    })();
    let writer = match made {
        Ok(w) => w,
        Err(e) => return Err(Box::new((live, e))),
    };
    let plain = live.replace_outputs(Box::new(LiveOutputs::discard()));
    let (held, release) = match HeldOutputs::new(
        start.session.queue.clone(),
        start.session.acks.clone(),
        plain,
        crate::held_audit::ReleaseAudit::new(None),
    ) {
        Ok(x) => x,
        Err(e) => return Err(Box::new((live, e))),
    };
    {
        let mut info = start.session.info();
        info.waiting = Some(held.waiting());
        info.started = Some(Instant::now());
    }
    live.replace_outputs(Box::new(held));
    live.set_sync_requests(Some(start.session.acks.sync_wanted.clone()));
    let seq = machine.exit_seq;
    let recorder = Recorder::new(live, writer, start.rec, seq).flush_on_output();
    Ok(Recording {
        recorder,
        release,
        session: start.session.clone(),
    })
}

/// How recording ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The guest ended with this status.
    Guest(i32),
    /// The operator ended protection; the guest runs on.
    Unprotect,
    /// The secondary never held the seed: no `End`, no wait.
    Abandon,
}

/// End recording at the current exit: unless abandoned, close the log with
/// the final sync point and its `End` and wait for the secondary's
/// acknowledgement of all of it. Then the held outputs leave and the live
/// inputs come back.
fn end(machine: &mut Machine, r: Recording, how: Ending) -> (LiveInputs, ProtectedEnd) {
    let Recording {
        mut recorder,
        release,
        session,
    } = r;
    let seq = machine.exit_seq;
    if how != Ending::Abandon {
        match machine.capture_sync_point(true) {
            Ok(sp) => {
                let _ = recorder.sync_point(seq, sp);
            }
            Err(e) => tracing::error!("the final sync point: {e}"),
        }
        let status = match how {
            Ending::Guest(s) => s,
            _ => 0,
        };
        recorder.log(Entry::End {
            exit_seq: seq,
            status,
        });
        let _ = recorder.flush();
    }
    let (mut live, writer) = recorder.into_parts();
    drop(writer);
    live.set_sync_requests(None);
    // Dropping the held outputs ends the release thread once it has
    // released what it holds.
    drop(live.replace_outputs(Box::new(LiveOutputs::discard())));
    let link = match how {
        Ending::Abandon => session.link().take(),
        _ => session.take_link(STEP_TIMEOUT),
    };
    if let Some(g) = session.governor().take() {
        g.stop();
    }
    session.queue.close();
    let secondary = link.as_ref().map(|l| l.peer.clone()).unwrap_or_default();
    let acknowledged = match (link, how) {
        (Some(link), Ending::Abandon) => {
            let _ = link.finish(Duration::ZERO);
            Err("protection was abandoned".to_string())
        }
        (Some(link), _) => {
            if how == Ending::Unprotect {
                link.ending_protection();
            }
            link.finish(STEP_TIMEOUT).map(|_| ())
        }
        (None, Ending::Abandon) => Err("protection was abandoned".to_string()),
        (None, _) => Err("the secondary was never connected".to_string()),
    };
    // The VM is unprotected from here on: whatever is still held leaves.
    session.acks.unprotect();
    session.info().closed = true;
    let (stats, outputs) = release.wait_outputs();
    live.replace_outputs(outputs.unwrap_or_else(|| Box::new(LiveOutputs::discard())));
    let digest = match how {
        Ending::Guest(_) => machine.digest().unwrap_or(Digest::ZERO),
        _ => Digest::ZERO,
    };
    let end = ProtectedEnd {
        secondary,
        exit_seq: seq,
        log_bytes: session.queue.stats().pushed_bytes,
        released: stats.released,
        withheld: stats.withheld,
        acknowledged,
        digest,
    };
    (live, end)
}
