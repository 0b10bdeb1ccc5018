//! Control of a running VM from other threads: pause/resume, status, the
//! freeze/thaw of a migration's stop-and-copy, the hold and disk switch of
//! a local disk move, and auto-converge throttling (a duty cycle the vCPU
//! thread honours itself, see [`vmm::throttle`]).
//!
//! The vCPU thread runs [`run_controlled`]: `Machine::run` with a pause flag.
//! Another thread queues a [`Request`], raises the flag and kicks the vCPU;
//! the vCPU thread stops at the next exit (or kick), handles every queued
//! request and goes on running unless the VM is paused or frozen. Requests
//! are queued *before* the flag is raised, and the vCPU thread clears the
//! flag *before* draining the queue, so no request is ever left waiting.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};
use vmm::devices::virtio::block::{BlockConfig, DirtyBlocks};
use vmm::dirty::DirtyTracker;
use vmm::image::ImageLock;
use vmm::inputs::Inputs;
use vmm::machine::{Machine, MachineState, VmConfig};
use vmm::run::{RunError, RunLimits, RunOutcome};
use vmm::throttle::Throttle;
use vmm::vstate::vcpu::Kicker;
use vmm::vstate::vm::Vm;

use super::Progress;

/// What the VM is doing, as `tandem status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmStatus {
    /// `running`, `paused`, `migrating` or `stopped`.
    pub state: String,
    /// Guest exits so far (the logical clock), read from the vCPU thread
    /// when asked (the last known value once the VM has stopped).
    pub exit_seq: u64,
    /// The migration in progress, if any.
    pub migration: Option<Progress>,
    /// Why the VM is paused when Tandem paused it (a host disk error,
    /// see [`vmm::devices::virtio::block`]); `tandem resume` retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The VM's protection, if it is protected (`tandem protect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<Box<failover::lockstep::ProtectionStatus>>,
    /// The VM's protection history: generation, failovers, spares
    /// (`failover::lineage`); absent for a VM never protected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<failover::lineage::Lineage>,
}

/// A request to the vCPU thread.
enum Request {
    /// The current exit counter.
    ExitSeq(Sender<u64>),
    Pause(Sender<()>),
    Resume(Sender<()>),
    /// Stop the guest for stop-and-copy and hand back its state.
    Freeze(Sender<Frozen>),
    /// A failed migration: continue as if nothing happened.
    Thaw,
    ThawPaused,
    /// The VM runs elsewhere now: end the run.
    Finish(String),
    /// Stop the guest (without capturing its state) until `ReplaceDisk`
    /// or `Thaw`; answers when the vCPU stopped.
    Hold(Sender<Instant>),
    /// A local disk move: switch the disk to another image, then let the
    /// guest go on (also when the switch fails). Answers the moment the
    /// guest may run again.
    ReplaceDisk {
        config: BlockConfig,
        reply: Sender<Result<Instant, ReplaceDiskError>>,
    },
    /// Start or end protection (`crate::protect`): handled by
    /// `protect::run_protectable` around [`run_controlled`].
    Protection(crate::protect::Step),
    /// End the run here (SIGTERM/SIGINT), as if the guest had ended.
    Stop,
}

/// The guest stopped for the switchover.
pub struct Frozen {
    /// vCPU, devices, exit counter, virtual time.
    pub state: MachineState,
    /// When the vCPU stopped.
    pub at: Instant,
    /// The VM was paused by its operator (and must stay paused).
    pub paused: bool,
}

/// The disk of a controlled VM, as storage migration sees it.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    /// The image (the migration thread opens it for reading).
    pub path: PathBuf,
    /// Guest-visible size in bytes.
    pub len: u64,
    /// Blocks written by the guest.
    pub dirty: DirtyBlocks,
    /// The device's lock on the image (`vmm::image`): the migration thread
    /// opens the image through it (sharing it) and, for a destination on
    /// shared storage, lets it go at the switchover.
    pub lock: ImageLock,
}

struct Shared {
    pause: Arc<AtomicBool>,
    kicker: Kicker,
    tx: Sender<Request>,
    status: Mutex<VmStatus>,
    migrating: AtomicBool,
    /// The operator asked to cancel the migration in progress.
    cancel: AtomicBool,
    /// Paused by the operator (`tandem pause`), also while migrating.
    user_paused: AtomicBool,
    ended: AtomicBool,
    /// [`VmController::stop`] was called: the run ends once not frozen.
    stop: AtomicBool,
    throttle: Arc<Throttle>,
    vm: Arc<Vm>,
    dirty: DirtyTracker,
    /// The VM's configuration; its disk path follows local disk moves.
    config: Mutex<VmConfig>,
    disk: Mutex<Option<DiskInfo>>,
    /// Why migrations and disk moves are refused, if they are.
    no_migration: std::sync::OnceLock<&'static str>,
    /// The protection in progress (`crate::protect`).
    protection: Mutex<Option<Arc<crate::protect::Session>>>,
    /// Generations, failovers and spares of this VM.
    lineage: Mutex<failover::lineage::Lineage>,
}

/// A cloneable handle on a VM run by [`run_controlled`].
#[derive(Clone)]
pub struct VmController {
    shared: Arc<Shared>,
}

/// The receiving end, owned by the vCPU thread.
pub struct VcpuSide {
    shared: Arc<Shared>,
    rx: Receiver<Request>,
    start_paused: bool,
    /// The control socket, for the resume hint of a disk error.
    api: Option<PathBuf>,
}

impl VcpuSide {
    /// The controller this side answers.
    pub(crate) fn controller(&self) -> VmController {
        VmController {
            shared: self.shared.clone(),
        }
    }

    /// Start the run paused, as if `tandem pause` had been given (a VM
    /// that arrived paused from a migration).
    pub fn start_paused(mut self) -> Self {
        self.start_paused = true;
        self
    }

    /// The control socket clients reach this VM on (named in messages).
    pub fn with_api_socket(mut self, path: &std::path::Path) -> Self {
        self.api = Some(path.to_path_buf());
        self
    }
}

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM has stopped")]
    /// The vCPU thread has ended.
    Ended,
    #[error("a migration is already in progress")]
    /// A migration or disk move is already in progress.
    Busy,
    #[error("no migration is in progress")]
    /// No migration is in progress to cancel.
    NotMigrating,
    /// This VM cannot be migrated (said why).
    #[error("{0}")]
    Refused(&'static str),
    /// The VM's disk image was let go for a migration's destination and
    /// another process holds it now: the guest must not run here.
    #[error("not resumed: {0}; the migration's destination may be running the VM")]
    DiskLocked(String),
}

/// Why a disk move's switch to the new image failed (the guest goes on
/// with the old one).
#[derive(Debug, thiserror::Error)]
pub enum ReplaceDiskError {
    /// The VM has no disk to switch.
    #[error("the VM has no disk")]
    NoDisk,
    /// The device refused the new image.
    #[error(transparent)]
    Backing(#[from] vmm::devices::virtio::block::BlockError),
}

/// How a controlled run ended.
#[derive(Debug)]
pub enum ControlledOutcome {
    /// The guest ended (or the run reached a limit) here.
    Guest(RunOutcome),
    /// The VM was migrated; it runs at the given place now.
    Migrated(String),
    /// Start or end recording (never returned by
    /// `protect::run_protectable`, which handles it).
    Protection(crate::protect::Step),
}

/// Build the controller for `machine`, before its vCPU thread starts.
pub fn controller(machine: &Machine) -> (VmController, VcpuSide) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let disk = machine.devices.block.as_ref().map(|b| DiskInfo {
        path: b.config().path.clone(),
        len: b.capacity_sectors() * vmm::devices::virtio::block::SECTOR_SIZE,
        dirty: b.dirty_blocks(),
        lock: b.image_lock().clone(),
    });
    let shared = Arc::new(Shared {
        pause: Arc::new(AtomicBool::new(false)),
        kicker: machine.vcpu.kicker().clone(),
        tx,
        status: Mutex::new(VmStatus {
            state: "running".into(),
            exit_seq: machine.exit_seq,
            migration: None,
            reason: None,
            protection: None,
            lineage: None,
        }),
        migrating: AtomicBool::new(false),
        cancel: AtomicBool::new(false),
        user_paused: AtomicBool::new(false),
        ended: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        throttle: Arc::new(Throttle::new()),
        vm: machine.vm.clone(),
        dirty: machine.dirty.clone(),
        config: Mutex::new(machine.config.clone()),
        disk: Mutex::new(disk),
        no_migration: std::sync::OnceLock::new(),
        protection: Mutex::new(None),
        lineage: Mutex::new(failover::lineage::Lineage::default()),
    });
    (
        VmController {
            shared: shared.clone(),
        },
        VcpuSide {
            shared,
            rx,
            start_paused: false,
            api: None,
        },
    )
}

impl VmController {
    fn status_mut(&self) -> std::sync::MutexGuard<'_, VmStatus> {
        self.shared.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current status, with the exit counter as of now: the vCPU
    /// thread answers at its next exit (or kick), running, paused or
    /// frozen alike.
    pub fn status(&self) -> VmStatus {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if let Ok(seq) = self.request(Request::ExitSeq(tx), &rx) {
            let mut s = self.status_mut();
            s.exit_seq = s.exit_seq.max(seq);
        }
        let mut status = self.status_mut().clone();
        status.protection = self
            .protection_session()
            .map(|p| Box::new(p.status(status.exit_seq)));
        let lineage = self.lineage().clone();
        status.lineage = (lineage != failover::lineage::Lineage::default()).then_some(lineage);
        status
    }

    /// The VM's protection history (generations, failovers, spares).
    pub fn lineage(&self) -> std::sync::MutexGuard<'_, failover::lineage::Lineage> {
        self.shared
            .lineage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The protection in progress.
    pub(crate) fn protection_session(&self) -> Option<Arc<crate::protect::Session>> {
        self.shared
            .protection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_protection_session(&self, s: Option<Arc<crate::protect::Session>>) {
        *self
            .shared
            .protection
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = s;
    }

    pub(crate) fn set_progress(&self, p: Option<Progress>) {
        let mut s = self.status_mut();
        if p.is_some() {
            s.state = "migrating".into();
        } else if s.state == "migrating" {
            let paused = self.paused() || s.reason.is_some();
            s.state = if paused { "paused" } else { "running" }.into();
        }
        s.migration = p;
    }

    /// Queue `req`, raise the pause flag and kick until `reply` answers.
    fn request<T>(&self, req: Request, reply: &Receiver<T>) -> Result<T, ControlError> {
        if self.shared.ended.load(Ordering::SeqCst) {
            return Err(ControlError::Ended);
        }
        self.shared.tx.send(req).map_err(|_| ControlError::Ended)?;
        self.shared.pause.store(true, Ordering::SeqCst);
        self.shared.throttle.wake();
        loop {
            self.shared.kicker.kick_now();
            match reply.recv_timeout(Duration::from_millis(2)) {
                Ok(v) => return Ok(v),
                Err(RecvTimeoutError::Disconnected) => return Err(ControlError::Ended),
                Err(RecvTimeoutError::Timeout) => {
                    if self.shared.ended.load(Ordering::SeqCst) {
                        return Err(ControlError::Ended);
                    }
                }
            }
        }
    }

    /// Pause the guest (returns once it is stopped).
    pub fn pause(&self) -> Result<(), ControlError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.request(Request::Pause(tx), &rx)
    }

    /// Resume a paused guest. After a switchover in doubt onto shared
    /// storage the image's lock is taken back first: refused if another
    /// process (the destination) holds the image.
    pub fn resume(&self) -> Result<(), ControlError> {
        if let Some(d) = self.disk() {
            d.lock
                .retake()
                .map_err(|e| ControlError::DiskLocked(e.to_string()))?;
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.request(Request::Resume(tx), &rx)
    }

    pub(crate) fn freeze(&self) -> Result<Frozen, ControlError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.request(Request::Freeze(tx), &rx)
    }

    fn post(&self, req: Request) {
        if self.shared.tx.send(req).is_ok() {
            self.shared.pause.store(true, Ordering::SeqCst);
            self.shared.throttle.wake();
            self.shared.kicker.kick_now();
        }
    }

    /// Hand a protection step to the vCPU thread (it stops at its next
    /// exit, also when frozen).
    pub(crate) fn protection(&self, step: crate::protect::Step) -> Result<(), ControlError> {
        if self.shared.ended.load(Ordering::SeqCst) {
            return Err(ControlError::Ended);
        }
        self.post(Request::Protection(step));
        Ok(())
    }

    pub(crate) fn thaw(&self) {
        self.post(Request::Thaw);
    }

    /// End the freeze but keep the guest stopped as if the operator had
    /// paused it (`tandem resume` lets it run).
    pub(crate) fn thaw_paused(&self) {
        // Seen by status and messages at once, before the vCPU thread acts.
        self.shared.user_paused.store(true, Ordering::SeqCst);
        self.post(Request::ThawPaused);
    }

    /// After a successful [`super::migrate`]: end the local run (the VM runs
    /// at `whereto` now).
    pub fn finish_migrated(&self, whereto: String) {
        self.post(Request::Finish(whereto));
    }

    /// End the run at the guest's next exit, as if the guest had ended
    /// there (SIGTERM/SIGINT of the VMM): [`run_controlled`] returns
    /// [`ControlledOutcome::Guest`] with [`RunOutcome::Paused`], paused or
    /// not, so that a protected VM closes its log with the final sync
    /// point and its `End` (`protect::run_protectable`) and the secondary
    /// verifies it. In a migration's freeze the stop waits for its end:
    /// a completed migration ends the run anyway, a failed one thaws.
    /// Returns at once.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.post(Request::Stop);
    }

    /// Auto-converge: hold the guest `pct` % of the time (0 = no
    /// throttling; at most [`vmm::throttle::MAX_PCT`]). Takes effect at
    /// once, also when lifting a throttle from a sleeping vCPU.
    pub(crate) fn set_throttle(&self, pct: u32) {
        self.shared.throttle.set(pct);
    }

    /// Time the guest has been held by auto-converge, over the VM's life.
    /// The VM's throttle (the lag bound of a protection uses it too:
    /// `crate::lag`).
    pub(crate) fn throttle(&self) -> Arc<Throttle> {
        self.shared.throttle.clone()
    }

    pub(crate) fn throttled(&self) -> Duration {
        self.shared.throttle.throttled()
    }

    /// Claim the right to migrate (one migration at a time).
    pub(crate) fn begin_migration(&self) -> Result<(), ControlError> {
        if self.shared.ended.load(Ordering::SeqCst) {
            return Err(ControlError::Ended);
        }
        if let Some(why) = self.shared.no_migration.get() {
            return Err(ControlError::Refused(why));
        }
        if self.shared.migrating.swap(true, Ordering::SeqCst) {
            return Err(ControlError::Busy);
        }
        self.shared.cancel.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Refuse every migration and disk move of this VM from now on, with
    /// `why` as the error (e.g. a VM being recorded).
    pub fn refuse_migration(&self, why: &'static str) {
        let _ = self.shared.no_migration.set(why);
    }

    /// Ask the migration in progress to stop (it does before its
    /// switchover; after that the switch completes). The guest goes on
    /// here as it was.
    pub fn cancel_migration(&self) -> Result<(), ControlError> {
        if !self.shared.migrating.load(Ordering::SeqCst) {
            return Err(ControlError::NotMigrating);
        }
        self.shared.cancel.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub(crate) fn cancel_requested(&self) -> bool {
        self.shared.cancel.load(Ordering::SeqCst)
    }

    pub(crate) fn end_migration(&self) {
        self.set_throttle(0);
        self.set_progress(None);
        self.shared.migrating.store(false, Ordering::SeqCst);
    }

    pub(crate) fn vm(&self) -> &Arc<Vm> {
        &self.shared.vm
    }

    pub(crate) fn dirty(&self) -> &DirtyTracker {
        &self.shared.dirty
    }

    /// Stop the guest for the final copy of a local disk move; returns
    /// when it stopped. Follow with [`Self::replace_disk`] or
    /// [`Self::thaw`].
    pub(crate) fn hold(&self) -> Result<Instant, ControlError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.request(Request::Hold(tx), &rx)
    }

    /// Switch the held guest's disk to `config` and let it run again
    /// (also on failure). Returns when the guest may run again.
    pub(crate) fn replace_disk(
        &self,
        config: BlockConfig,
    ) -> Result<Result<Instant, ReplaceDiskError>, ControlError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.request(Request::ReplaceDisk { config, reply: tx }, &rx)
    }

    pub(crate) fn config(&self) -> VmConfig {
        self.shared
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn disk(&self) -> Option<DiskInfo> {
        self.shared
            .disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Is the VM paused by its operator (also while it is being migrated)?
    pub fn paused(&self) -> bool {
        self.shared.user_paused.load(Ordering::SeqCst)
    }

    /// Has the vCPU thread ended (guest finished, or migrated away)?
    pub fn ended(&self) -> bool {
        self.shared.ended.load(Ordering::SeqCst)
    }
}

impl Drop for VcpuSide {
    fn drop(&mut self) {
        self.shared.ended.store(true, Ordering::SeqCst);
        self.shared
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state = "stopped".into();
    }
}

fn set_state(shared: &Shared, state: &str, seq: u64) {
    let mut s = shared.status.lock().unwrap_or_else(|e| e.into_inner());
    if s.state != "migrating" || state == "stopped" {
        s.state = state.into();
    }
    s.exit_seq = seq;
}

#[derive(Default)]
struct Flags {
    user_paused: bool,
    frozen: bool,
    /// Stopped by a host disk error until `Resume` (which retries).
    disk_error: bool,
}

/// Handle one request on the vCPU thread (the guest is stopped).
fn handle(
    req: Request,
    machine: &mut Machine,
    inputs: &mut dyn Inputs,
    flags: &mut Flags,
    shared: &Shared,
) -> Option<ControlledOutcome> {
    match req {
        Request::ExitSeq(reply) => {
            let _ = reply.send(machine.exit_seq);
        }
        Request::Pause(reply) => {
            flags.user_paused = true;
            shared.user_paused.store(true, Ordering::SeqCst);
            set_state(shared, "paused", machine.exit_seq);
            let _ = reply.send(());
        }
        Request::Resume(reply) => {
            flags.user_paused = false;
            flags.disk_error = false;
            shared.user_paused.store(false, Ordering::SeqCst);
            set_state(shared, "running", machine.exit_seq);
            shared
                .status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reason = None;
            let _ = reply.send(());
        }
        Request::Freeze(reply) => {
            let at = Instant::now();
            let virtual_ns = inputs.clock_ns(machine.exit_seq);
            match machine.save(virtual_ns) {
                Ok(state) => {
                    flags.frozen = true;
                    let _ = reply.send(Frozen {
                        state,
                        at,
                        paused: flags.user_paused,
                    });
                }
                // Dropping `reply` fails the migration; the guest goes on.
                Err(e) => tracing::error!("capturing the VM state for migration: {e}"),
            }
        }
        Request::Thaw => flags.frozen = false,
        Request::ThawPaused => {
            flags.frozen = false;
            flags.user_paused = true;
            shared.user_paused.store(true, Ordering::SeqCst);
            set_state(shared, "paused", machine.exit_seq);
        }
        Request::Hold(reply) => {
            flags.frozen = true;
            let _ = reply.send(Instant::now());
        }
        Request::ReplaceDisk { config, reply } => {
            let result = replace_disk(machine, shared, config);
            flags.frozen = false;
            let _ = reply.send(result.map(|()| Instant::now()));
        }
        Request::Protection(step) => return Some(ControlledOutcome::Protection(step)),
        // Seen in `shared.stop` (it outlives a protection step's return).
        Request::Stop => {}
        Request::Finish(whereto) => {
            set_state(shared, "stopped", machine.exit_seq);
            return Some(ControlledOutcome::Migrated(whereto));
        }
    }
    None
}

/// Switch the disk of `machine` to `config` (same data, same size) and
/// make every later snapshot or migration name the new image.
fn replace_disk(
    machine: &mut Machine,
    shared: &Shared,
    config: BlockConfig,
) -> Result<(), ReplaceDiskError> {
    let block = machine
        .devices
        .block
        .as_mut()
        .ok_or(ReplaceDiskError::NoDisk)?;
    block.replace_backing(config.clone())?;
    let lock = block.image_lock().clone();
    if let Some(d) = machine.config.disk.as_mut() {
        d.path = config.path.clone();
    }
    let vm_config = machine.config.clone();
    *shared.config.lock().unwrap_or_else(|e| e.into_inner()) = vm_config;
    if let Some(d) = shared
        .disk
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
    {
        d.path = config.path;
        // The old image's lock goes with the last handle on it.
        d.lock = lock;
    }
    Ok(())
}

/// A host disk error stopped the vCPU at `exit_seq` (the request is not
/// completed): say so, with what to do, and show it in the status.
fn disk_paused(
    shared: &Shared,
    api: Option<&std::path::Path>,
    exit_seq: u64,
    err: &vmm::devices::virtio::block::HostIoError,
) {
    let resume = match api {
        Some(p) => format!("tandem resume --api {}", p.display()),
        None => "tandem resume".into(),
    };
    let what = if err.out_of_space() {
        "free space"
    } else {
        "fix the cause"
    };
    eprintln!(
        "tandem: {err}; the VM is paused at exit {exit_seq} (the guest saw no error): {what} and run `{resume}` to retry the request"
    );
    set_state(shared, "paused", exit_seq);
    shared
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .reason = Some(err.to_string());
}

/// Run `machine` on this (the vCPU) thread under the control of the
/// [`VmController`] paired with `side`. A run that returns a
/// [`ControlledOutcome::Protection`] step may be continued by calling
/// again (a freeze ends there; an operator's pause goes on).
pub fn run_controlled(
    machine: &mut Machine,
    inputs: &mut dyn Inputs,
    side: &mut VcpuSide,
) -> Result<ControlledOutcome, RunError> {
    let shared = side.shared.clone();
    let mut flags = Flags {
        user_paused: std::mem::take(&mut side.start_paused)
            || shared.user_paused.load(Ordering::SeqCst),
        ..Flags::default()
    };
    if flags.user_paused {
        shared.user_paused.store(true, Ordering::SeqCst);
        set_state(&shared, "paused", machine.exit_seq);
        shared.pause.store(true, Ordering::SeqCst);
    }
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            // Asked before this call (with a protection step handled since).
            set_state(&shared, "stopped", machine.exit_seq);
            return Ok(ControlledOutcome::Guest(RunOutcome::Paused));
        }
        let limits = RunLimits {
            pause: Some(shared.pause.clone()),
            throttle: Some(shared.throttle.clone()),
            ..Default::default()
        };
        let outcome = match machine.run(inputs, limits) {
            Ok(o) => o,
            Err(RunError::DiskIo { exit_seq, source }) => {
                flags.disk_error = true;
                disk_paused(&shared, side.api.as_deref(), exit_seq, &source);
                RunOutcome::Paused
            }
            Err(e) => return Err(e),
        };
        if outcome != RunOutcome::Paused {
            return Ok(ControlledOutcome::Guest(outcome));
        }
        loop {
            shared.kicker.disarm();
            shared.pause.store(false, Ordering::SeqCst);
            while let Ok(req) = side.rx.try_recv() {
                if let Some(end) = handle(req, machine, inputs, &mut flags, &shared) {
                    return Ok(end);
                }
            }
            if shared.stop.load(Ordering::SeqCst) && !flags.frozen {
                set_state(&shared, "stopped", machine.exit_seq);
                return Ok(ControlledOutcome::Guest(RunOutcome::Paused));
            }
            if !(flags.user_paused || flags.frozen || flags.disk_error) {
                break;
            }
            // Paused or frozen: wait for the next request.
            let Ok(req) = side.rx.recv() else {
                return Ok(ControlledOutcome::Guest(RunOutcome::Paused));
            };
            if let Some(end) = handle(req, machine, inputs, &mut flags, &shared) {
                return Ok(end);
            }
        }
    }
}
