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
    /// Hand the VM over to the secondary here (`tandem switchover`).
    Handover(Sender<Result<SwitchoverReport, String>>),
}

/// What `tandem switchover` reports: the VM runs on its secondary's host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchoverReport {
    /// The secondary that runs the VM now (`NAME at ADDR`).
    pub to: String,
    /// The VM's identity and the protection generation it was handed over
    /// in (the new primary's claim).
    pub vm_id: String,
    /// See `vm_id`.
    pub generation: u64,
    /// The exit the VM changed hosts at.
    pub exit_seq: u64,
    /// The guest's pause (ms): `pause_here_ms` + `one_way_ms` +
    /// `go_live_ms`, from its last instruction here to its first there.
    pub downtime_ms: f64,
    /// From the vCPU's stop here to the handover leaving (ms: the final
    /// sync point, the log's end).
    pub pause_here_ms: f64,
    /// Half the last acknowledgement round trip (ms): the handover's way
    /// to the secondary.
    pub one_way_ms: f64,
    /// The secondary's own measure from the handover's arrival to the
    /// guest running there (ms: the last exits of the replay, the
    /// arbiter's claim, the NIC).
    pub go_live_ms: f64,
    /// From the request to the secondary's go-live arriving here (ms).
    pub total_ms: f64,
    /// Log bytes streamed in all.
    pub log_bytes: u64,
    /// Outputs that had not left here yet: the new primary produces them.
    pub handed_outputs: u64,
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
            arbiter: self.session.acks.heard().0.arbiter_id.clone(),
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

/// Hand the VM over to its secondary (`tandem switchover`): at the next
/// exit the log ends with its handover, the secondary replays to there,
/// wins the arbiter for the VM's generation (fencing this copy as a
/// failover would) and runs the VM at once; this process then ends. The
/// VM must be protected by a secondary that holds its seed, with an
/// arbiter. A switchover that does not complete leaves the VM running
/// here, unprotected, if this primary wins the arbiter; otherwise the
/// other copy is live and this process stops (status 3).
pub fn switchover(ctl: &VmController) -> Result<SwitchoverReport, ProtectError> {
    let Some(session) = ctl.protection_session() else {
        return Err(ProtectError::NotProtected);
    };
    if session.info().state == "seeding" {
        return Err(ProtectError::Stream(
            "the secondary is still being seeded: a switchover needs a secondary that holds the VM"
                .into(),
        ));
    }
    if session.acks.alone() {
        return Err(ProtectError::Stream(
            "the secondary was lost: the VM runs here unprotected, nobody to hand it over to"
                .into(),
        ));
    }
    if session.acks.heard().0.arbiter.is_none() {
        return Err(ProtectError::Stream(
            "the VM is protected without --arbiter: a switchover needs the arbiter that fences this copy (the secondary goes live only by winning it)".into(),
        ));
    }
    if ctl.paused() {
        return Err(ProtectError::Paused);
    }
    let (tx, rx) = bounded(1);
    ctl.protection(Step::Handover(tx))
        .map_err(|_| ProtectError::Ended)?;
    rx.recv_timeout(STEP_TIMEOUT * 2)
        .map_err(|_| ProtectError::Ended)?
        .map_err(ProtectError::Stream)
}

/// [`switchover`] on the vCPU thread, stopped at an exit.
fn hand_over(
    machine: &mut Machine,
    r: Recording,
    ctl: &VmController,
) -> Result<SwitchoverReport, Box<(LiveInputs, String)>> {
    let paused = Instant::now();
    let Recording {
        mut recorder,
        release,
        session,
    } = r;
    // From here nothing more leaves this host: the exact boundary is told
    // to the secondary, which produces the rest.
    let released = session.acks.freeze_releases();
    let seq = machine.exit_seq;
    match machine.capture_sync_point(true) {
        Ok(sp) => {
            let _ = recorder.sync_point(seq, sp);
        }
        Err(e) => tracing::error!("the final sync point: {e}"),
    }
    recorder.log(Entry::Handover { exit_seq: seq });
    recorder.log(Entry::End {
        exit_seq: seq,
        status: 0,
    });
    let _ = recorder.flush();
    let (mut live, writer) = recorder.into_parts();
    drop(writer);
    live.set_sync_requests(None);
    // Dropping the held outputs ends the release thread once it has
    // decided each (released after a failed switchover, else handed over).
    drop(live.replace_outputs(Box::new(LiveOutputs::discard())));
    let link = session.take_link(STEP_TIMEOUT);
    if let Some(g) = session.governor().take() {
        g.stop();
    }
    session.queue.close();
    let (failover, _) = session.acks.heard();
    let failover = failover.clone();
    let p = &failover.protection;
    let Some(link) = link else {
        session.acks.thaw_releases();
        session.acks.unprotect();
        let (_, outputs) = release.wait_outputs();
        live.replace_outputs(outputs.unwrap_or_else(|| Box::new(LiveOutputs::discard())));
        return Err(Box::new((
            live,
            "the secondary was never connected; the VM runs on here unprotected".into(),
        )));
    };
    let to = link.peer.clone();
    // The secondary may have to catch up (up to the lag bound) before it
    // claims the VM: its go-live is awaited as long as it is alive (a
    // silent one is lost after the failover timeout).
    let end = link.finish_handover(released, STEP_TIMEOUT, STEP_TIMEOUT);
    let log_bytes = session.queue.stats().pushed_bytes;
    // Who runs the VM now? The secondary said so, or the arbiter does.
    let verdict = match (&end.acked, &end.live) {
        (Ok(false), Some(_)) => Ok(()),
        (Ok(true), _) => Err(
            "the secondary was lost before it took the VM (this primary won the arbiter)"
                .to_string(),
        ),
        (Ok(false), None) | (Err(_), _) => {
            let why = match &end.acked {
                Err(e) => e.clone(),
                Ok(_) => match session.acks.lock().lost.clone() {
                    Some(lost) => format!("the secondary {to} acknowledged the handover, then was lost ({lost})"),
                    None => format!("the secondary {to} acknowledged the handover but did not say it runs the VM within {} s", STEP_TIMEOUT.as_secs()),
                },
            };
            let arbiter = failover.arbiter.as_ref().expect("checked by switchover");
            let say = |m: &str| eprintln!("tandem: switchover: {m}");
            match failover::arbiter::claim_patiently(
                arbiter.as_ref(),
                &p.vm_id,
                p.generation,
                &failover.holder,
                failover::arbiter::CLAIM_PATIENCE,
                say,
            ) {
                Ok(failover::arbiter::Verdict::Won) => Err(format!(
                    "{why}; this primary won the arbiter for VM {} generation {}",
                    p.vm_id, p.generation
                )),
                Ok(failover::arbiter::Verdict::Lost { holder }) => {
                    eprintln!(
                        "tandem: switchover: {why}; the arbiter {} gave VM {} generation {} to {holder}: that copy runs the VM",
                        arbiter.describe(),
                        p.vm_id,
                        p.generation
                    );
                    Ok(())
                }
                Err(e) => {
                    eprintln!(
                        "tandem: switchover: {why}; {e}: the VM may run there; this copy stops, its held outputs never released"
                    );
                    std::process::exit(crate::failover::STOPPED);
                }
            }
        }
    };
    session.info().closed = true;
    match verdict {
        Ok(()) => {
            session.acks.handed_over();
            let (stats, _) = release.wait_outputs();
            let pause_here_ms = end.sent.map_or(0.0, |t| (t - paused).as_secs_f64() * 1e3);
            let one_way_ms = end.rtt.map_or(0.0, |r| r.as_secs_f64() * 1e3 / 2.0);
            let (go_live_ms, exit_seq) = end
                .live
                .as_ref()
                .map_or((0.0, seq), |(l, _)| (l.took_ms, l.exit_seq));
            Ok(SwitchoverReport {
                to,
                vm_id: p.vm_id.clone(),
                generation: p.generation,
                exit_seq,
                downtime_ms: pause_here_ms + one_way_ms + go_live_ms,
                pause_here_ms,
                one_way_ms,
                go_live_ms,
                total_ms: end
                    .live
                    .as_ref()
                    .map_or(paused.elapsed(), |(_, at)| *at - paused)
                    .as_secs_f64()
                    * 1e3,
                log_bytes,
                handed_outputs: stats.withheld,
            })
        }
        Err(e) => {
            // This primary runs the VM: what it held leaves now.
            session.acks.unprotect();
            session.acks.thaw_releases();
            let (_, outputs) = release.wait_outputs();
            live.replace_outputs(outputs.unwrap_or_else(|| Box::new(LiveOutputs::discard())));
            ctl.set_protection_session(None);
            ctl.lineage().secondary_lost();
            Err(Box::new((
                live,
                format!("the switchover did not complete: {e}; the VM runs on here UNPROTECTED"),
            )))
        }
    }
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
            (ControlledOutcome::Protection(Step::Handover(reply)), Mode::Recording(r)) => {
                match hand_over(machine, *r, &ctl) {
                    Ok(report) => {
                        let to = report.to.clone();
                        let _ = reply.send(Ok(report));
                        ctl.set_protection_session(None);
                        return Ok((ControlledOutcome::Migrated(to), None));
                    }
                    Err(failed) => {
                        let (live, e) = *failed;
                        let _ = reply.send(Err(e));
                        mode = Some(Mode::Plain(live));
                    }
                }
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
                    Step::Handover(reply) => {
                        let _ = reply.send(Err("the VM is not protected".into()));
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
