//! Failover on the secondary (issue 10, `docs/failover.md`): after the
//! primary is lost, win the arbiter, finish the log, then become the
//! primary at the last exit the log covers.
//!
//! - Inputs switch from the log to this host: the virtual clock continues
//!   from the last value the log gave the guest (never backwards).
//! - The console switches to `--live-serial`; the NIC attaches to the
//!   standby TAP of `--net` (frames in and out from now on), and the
//!   guest's MAC is announced there as after a migration
//!   (`secondary::migration::announce_guest_mac`). Outputs the replay
//!   produced after the old primary's last reported release
//!   ([`PrimaryWatch::released`]) may never have left the old primary:
//!   console bytes and frames are produced again first, in order
//!   (duplicates at the boundary, never a gap; TCP absorbs duplicate
//!   segments).
//! - It runs unprotected, says so, and prints the failover gap: from the
//!   primary's last sign of life to the first guest output here, and to
//!   the first frame that left for the network.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use failover::arbiter::{Arbiter, Verdict};
use recordlog::{Entry, ReadError};
use secondary::replay::EntrySource;
use secondary::watch::PrimaryWatch;
use vmm::inputs::{Divergence, LiveInputs};
use vmm::machine::Machine;
use vmm::outputs::{LiveOutputs, Output, OutputKind, Outputs};
use vmm::run::RunLimits;

use super::run::outcome_status;
use super::CmdError;

/// Exit status of a secondary that may not go live.
pub const NOT_LIVE: i32 = primary::failover::STOPPED;

/// An [`EntrySource`] that publishes its offset (the end of the frame the
/// last entry came from: for a protected primary's log, the offset the
/// primary tagged an output with).
pub struct Tapped<S> {
    inner: S,
    offset: Arc<AtomicU64>,
}

impl<S: EntrySource> Tapped<S> {
    pub fn new(inner: S, offset: Arc<AtomicU64>) -> Self {
        Tapped { inner, offset }
    }
}

impl<S: EntrySource> EntrySource for Tapped<S> {
    fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        let r = self.inner.next_entry();
        self.offset.store(self.inner.offset(), Ordering::SeqCst);
        r
    }
    fn offset(&self) -> u64 {
        self.inner.offset()
    }
}

/// Replayed outputs (console bytes and frames) the old primary may not
/// have released yet, by log offset.
#[derive(Default)]
pub struct Unreleased(Mutex<VecDeque<(u64, OutputKind, Vec<u8>)>>);

/// Keeps each replayed output in [`Unreleased`] until the primary reports
/// it released.
#[derive(Clone)]
pub struct Keeper {
    offset: Arc<AtomicU64>,
    watch: Arc<PrimaryWatch>,
    kept: Arc<Unreleased>,
}

impl Keeper {
    pub fn new(offset: Arc<AtomicU64>, watch: Arc<PrimaryWatch>, kept: Arc<Unreleased>) -> Self {
        Keeper {
            offset,
            watch,
            kept,
        }
    }

    fn keep(&self, kind: OutputKind, bytes: &[u8]) {
        let released = self.watch.released.load(Ordering::SeqCst);
        let mut k = self.kept.0.lock().unwrap_or_else(|e| e.into_inner());
        while k.front().is_some_and(|(o, _, _)| *o <= released) {
            k.pop_front();
        }
        k.push_back((self.offset.load(Ordering::SeqCst), kind, bytes.to_vec()));
    }
}

/// The replay's console: to `--serial` as before, and kept.
pub struct ReplayConsole {
    inner: Box<dyn Write + Send>,
    keeper: Keeper,
}

impl ReplayConsole {
    pub fn new(inner: Box<dyn Write + Send>, keeper: Keeper) -> Self {
        ReplayConsole { inner, keeper }
    }
}

impl Write for ReplayConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.keeper.keep(OutputKind::Console, buf);
        self.inner.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The replay's sent frames (checked by the replayer): kept, never sent
/// while this host is the secondary.
pub struct ReplayFrames(pub Keeper);

impl Outputs for ReplayFrames {
    fn emit(&mut self, output: Output) -> Result<(), Divergence> {
        self.0.keep(output.kind, &output.bytes);
        Ok(())
    }
}

/// The live outputs of the new primary, noting its first output.
pub(super) struct FirstOutput {
    inner: LiveOutputs,
    since: Instant,
    first: Option<f64>,
    first_frame: Option<f64>,
    /// "failover" or "switchover".
    event: &'static str,
}

impl FirstOutput {
    /// A frame left for the network (`what`: produced again, or new).
    fn frame_left(&mut self, what: &str) {
        if self.first_frame.is_none() {
            let ms = self.since.elapsed().as_secs_f64() * 1e3;
            self.first_frame = Some(ms);
            eprintln!(
                "tandem: {} gap (network): {ms:.1} ms from the primary's last sign of life to the first frame of the new primary ({what})",
                self.event
            );
        }
    }
}

impl Outputs for FirstOutput {
    fn emit(&mut self, output: Output) -> Result<(), Divergence> {
        if output.kind == OutputKind::NetFrame {
            self.frame_left(&format!("new, exit {}", output.exit_seq));
        }
        if self.first.is_none() {
            let ms = self.since.elapsed().as_secs_f64() * 1e3;
            self.first = Some(ms);
            eprintln!(
                "tandem: {} gap: {ms:.1} ms from the primary's last sign of life to the first guest output of the new primary (exit {})",
                self.event, output.exit_seq
            );
        }
        self.inner.emit(output)
    }
}

/// What the secondary needs to go live.
pub struct GoLive<'a> {
    pub watch: &'a PrimaryWatch,
    pub why: String,
    pub arbiter: Option<&'a dyn Arbiter>,
    pub holder: String,
    pub kept: &'a Unreleased,
    pub console: crate::console::Console,
    /// `--net`: the NIC attaches to it at go-live.
    pub standby: &'a crate::net::StandbyTap,
    pub virtual_ns: u64,
    /// `--api-socket`: the new primary serves the VM's control socket there
    /// (`tandem status`, `tandem protect` to re-protect it).
    pub api: Option<LiveApi>,
    /// A switchover (`tandem switchover`), not a failure: the primary
    /// handed the VM over at the exit the replay stands at.
    pub handover: Option<HandedOver>,
}

/// What a switchover's go-live needs besides a failover's.
pub struct HandedOver {
    /// When the primary's handover arrived.
    pub arrived: Instant,
    /// Frames to the old primary (our `Live`).
    pub to_primary: std::sync::mpsc::Sender<secondary::repair::Outgoing>,
}

/// The control socket of the new primary.
pub struct LiveApi {
    /// Its path (the secondary's status socket until now).
    pub sock: std::path::PathBuf,
    /// The secondary's status server on it, replaced at go-live.
    pub server: Option<crate::api::Server>,
    /// The old primary (`NAME at ADDR`).
    pub from: String,
    /// `--spare`: seed the first spare that takes the VM at once (its
    /// spares, credentials, timing and arbiter; `crate::spare`).
    pub spare: Option<crate::api::ProtectRequest>,
}

/// Claim the VM and run it here, unprotected (see the module docs).
/// Returns the guest's status, or [`NOT_LIVE`] when this side may not go
/// live (the message says why).
pub fn go_live(machine: &mut Machine, g: GoLive<'_>) -> Result<i32, CmdError> {
    let last = match &g.handover {
        Some(h) => h.arrived,
        None => g.watch.life.last(),
    };
    let detected = last.elapsed();
    let event = if g.handover.is_some() {
        eprintln!(
            "tandem: {} at exit {}: taking the VM over now",
            g.why, machine.exit_seq
        );
        "switchover"
    } else {
        eprintln!(
            "tandem: the primary is lost ({}) at exit {}; detected {} ms after its last sign of life",
            g.why,
            machine.exit_seq,
            detected.as_millis()
        );
        "failover"
    };
    let Some(arbiter) = g.arbiter else {
        eprintln!("tandem: no --arbiter: this secondary does not go live; the copy of the VM stays at exit {}", machine.exit_seq);
        return Ok(NOT_LIVE);
    };
    let protection = g
        .watch
        .protection
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Some(p) = protection else {
        eprintln!("tandem: the primary never named the VM for the arbiter: this secondary does not go live");
        return Ok(NOT_LIVE);
    };
    let asked = Instant::now();
    let say = |m: &str| eprintln!("tandem: {m}");
    match failover::arbiter::claim_patiently(
        arbiter,
        &p.vm_id,
        p.generation,
        &g.holder,
        failover::arbiter::CLAIM_PATIENCE,
        say,
    ) {
        Ok(Verdict::Won) => {}
        Ok(Verdict::Lost { holder }) => {
            eprintln!(
                "tandem: the arbiter {} gave VM {} generation {} to {holder}: that copy is live, this secondary does not go live",
                arbiter.describe(),
                p.vm_id,
                p.generation
            );
            return Ok(NOT_LIVE);
        }
        Err(e) => {
            eprintln!("tandem: {e}: this secondary does not go live");
            return Ok(NOT_LIVE);
        }
    }
    eprintln!(
        "tandem: won the arbiter {} for VM {} generation {}{} in {:.1} ms; going LIVE at exit {}: this host now runs the VM UNPROTECTED",
        arbiter.describe(),
        p.vm_id,
        p.generation,
        failover::arbiter::token_note(arbiter, &p.vm_id, p.generation),
        asked.elapsed().as_secs_f64() * 1e3,
        machine.exit_seq
    );
    let mut out = g.console.out;
    // The NIC attaches to the standby TAP; the guest's MAC is announced
    // from it as after a migration (its rounds run on a thread of their own).
    let net = g.standby.attach()?;
    if machine.devices.net.is_some() {
        let tx = net.as_ref().map(|(_, tx)| tx);
        if secondary::migration::announce_guest_mac(machine, tx).is_some() {
            eprintln!(
                "tandem: the NIC is attached to TAP {}; announcing the guest's MAC there",
                tx.map_or("", |t| t.name())
            );
        }
    }
    let mut outputs = FirstOutput {
        inner: LiveOutputs::new(Box::new(std::io::sink()), None),
        since: last,
        first: None,
        first_frame: None,
        event,
    };
    // What the old primary may not have released: produced again, console
    // bytes and frames in the order the guest produced them.
    let again: Vec<(u64, OutputKind, Vec<u8>)> = {
        let released = g.watch.released.load(Ordering::SeqCst);
        let k = g.kept.0.lock().unwrap_or_else(|e| e.into_inner());
        k.iter()
            .filter(|(o, _, _)| *o > released)
            .cloned()
            .collect()
    };
    let (mut lines, mut bytes, mut frames) = (0, 0, 0);
    for (_, kind, b) in &again {
        match kind {
            OutputKind::Console => {
                lines += 1;
                bytes += b.len();
                let _ = out.write_all(b);
            }
            OutputKind::NetFrame => {
                frames += 1;
                if let Some((_, tx)) = &net {
                    if tx.send(b).is_ok() {
                        outputs.frame_left("produced again");
                    }
                }
            }
        }
    }
    let _ = out.flush();
    if !again.is_empty() {
        eprintln!(
            "tandem: {lines} console outputs ({bytes} bytes) and {frames} frames the old primary may not have released were produced again, {:.1} ms after its last sign of life",
            last.elapsed().as_secs_f64() * 1e3
        );
    }
    let (rx, tx) = net.unzip();
    outputs.inner = LiveOutputs::new(out, tx);
    if let Some(h) = &g.handover {
        // The old primary waits for this to end (and measures the downtime).
        let took_ms = h.arrived.elapsed().as_secs_f64() * 1e3;
        let live = failover::lockstep::Live {
            took_ms,
            exit_seq: machine.exit_seq,
        };
        let _ = h
            .to_primary
            .send((failover::lockstep::kind::LIVE, live.encode()));
        eprintln!("tandem: switchover: running the VM {took_ms:.1} ms after the handover arrived");
    }
    if let Some(api) = g.api {
        return super::live_api::run(
            machine,
            api,
            (&p, event),
            (g.virtual_ns, g.console.input, rx),
            outputs,
        );
    }
    let stop = crate::signals::on_stop(machine.vcpu.kicker().clone());
    let mut inputs = LiveInputs::new(g.virtual_ns, g.console.input)
        .with_outputs(Box::new(outputs))
        .with_net(rx)
        .with_wakeup(stop.wakeup);
    let limits = RunLimits {
        pause: Some(stop.flag),
        ..Default::default()
    };
    let outcome = machine.run(&mut inputs, limits)?;
    super::run::stopped_by_signal(machine, &mut inputs, true);
    let status = outcome_status(outcome);
    eprintln!(
        "tandem: the VM ended at exit {} with status {status}, running unprotected on this host since the {event}",
        machine.exit_seq
    );
    Ok(status)
}
