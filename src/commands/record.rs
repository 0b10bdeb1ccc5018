//! `tandem record`: run a VM and write its record log.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::time::{Duration, Instant};

use primary::record::{EntrySink, RecordOptions, Recorder};
use recordlog::{Entry, Header, InitialState, LogWriter};
use vmm::inputs::{Inputs, LiveInputs};
use vmm::machine::{LogConfig, Machine};
use vmm::run::{RunError, RunLimits, RunOutcome};

use super::run::{boot, disk_config, outcome_status, restore_machine, vm_config};
use super::CmdError;
use crate::cli::RecordArgs;
use crate::{console, net};

pub fn record(args: RecordArgs) -> Result<i32, CmdError> {
    let started = Instant::now();
    if args.api_socket.is_none() {
        crate::signals::block();
    }
    let host_net = net::open(args.vm.net.net.as_ref())?;
    let console = console::open(&args.vm.serial)?;
    let (mut machine, initial, base_ns) = match &args.from_snapshot {
        None => {
            let config = vm_config(&args.vm, host_net.as_ref())?;
            (boot(&config)?, InitialState::Boot, 0)
        }
        Some(path) => {
            let disk = disk_config(args.vm.disk.as_ref())?;
            let (mut m, snap) = restore_machine(path, disk)?;
            if let Some(name) = args
                .vm
                .cpu_model
                .as_deref()
                .filter(|n| *n != m.config.cpu.name)
            {
                return Err(CmdError::Input(format!(
                    "--cpu-model {name}: the VM in {} has CPU model {} (a running VM keeps its CPU)",
                    path.display(),
                    m.config.cpu.name
                )));
            }
            net::check_restored(&m, host_net.as_ref());
            let digest = m.digest().map_err(|e| CmdError::Internal(e.to_string()))?;
            let initial = InitialState::Snapshot {
                digest,
                path_hint: path.display().to_string(),
            };
            (m, initial, snap.state.virtual_ns)
        }
    };
    let rec = RecordOptions {
        fingerprint_interval: args.fingerprint_interval,
        sync_interval: args.sync_interval,
        ..RecordOptions::default()
    };
    let header = start_log(&mut machine, &rec, initial)?;
    let writer = log_file(&args.log, &header, "--log")?;
    let limits = Limits {
        stop_at: args.stop_at,
        kick_grace: Some(Duration::from_micros(args.kick_grace_us)),
        rec,
        throttle: None,
        exit_gauge: None,
    };
    let live = net::live_inputs(base_ns, console, host_net.as_ref());
    let start = machine.exit_seq;
    let (status, recorder) = record_run_with(
        &mut machine,
        live,
        writer,
        &limits,
        false,
        args.api_socket.as_deref(),
    )?;
    let seq = machine.exit_seq;
    let stats = recorder.stats;
    let elapsed = started.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&args.log).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "tandem: recorded {} exits in {elapsed:.2} s to {}: {} bytes ({:.0} bit/s, {:.2} bytes/exit), {} inputs ({} network frames), {} outputs, {} interrupts, {} fingerprints, {} sync points ({} pages), {} kicks",
        seq - start,
        args.log.display(),
        bytes,
        bytes as f64 * 8.0 / elapsed.max(1e-9),
        bytes as f64 / (seq - start).max(1) as f64,
        stats.inputs,
        stats.net_frames,
        stats.outputs,
        stats.interrupts,
        stats.fingerprints,
        stats.sync_points,
        stats.sync_pages,
        machine.stats.kicks,
    );
    Ok(status)
}

/// Make `machine` ready to be recorded with `rec` from `initial` (sync
/// points on) and return its log's header (`tandem record` and `tandem
/// run --protect-to` alike).
pub fn start_log(
    machine: &mut Machine,
    rec: &RecordOptions,
    initial: InitialState,
) -> Result<Header, CmdError> {
    machine
        .enable_sync_points(false)
        .map_err(|e| CmdError::Internal(e.to_string()))?;
    let config = LogConfig {
        vm: machine.config.clone(),
        fingerprint_interval: rec.fingerprint_interval,
        sync_interval: rec.sync_interval,
    };
    Ok(Header::new(
        config
            .encode()
            .map_err(|e| CmdError::Internal(e.to_string()))?,
        initial,
    ))
}

/// A log file at `path` (named `flag` in errors) starting with `header`.
pub fn log_file(
    path: &Path,
    header: &Header,
    flag: &str,
) -> Result<LogWriter<BufWriter<File>>, CmdError> {
    let file = File::create(path)
        .map_err(|e| CmdError::Input(format!("{flag} {}: {e}", path.display())))?;
    LogWriter::new(BufWriter::new(file), header)
        .map_err(|e| CmdError::Internal(format!("{flag} {}: {e}", path.display())))
}

/// How [`record_run`] records.
pub struct Limits {
    pub stop_at: Option<u64>,
    pub kick_grace: Option<Duration>,
    pub rec: RecordOptions,
    /// The vCPU's duty-cycle throttle (a protected primary's lag bound).
    pub throttle: Option<std::sync::Arc<vmm::throttle::Throttle>>,
    /// Where the recorder publishes the exit it reached.
    pub exit_gauge: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

/// Record `machine` into `sink` until the guest ends (or --stop-at, or a
/// signal), then close the log: the initial digest first, the final sync
/// point (with its digest) and the `End` last. `flush_on_output`: flush the
/// sink at every output (a protected primary). Returns the run's status
/// and the recorder.
pub fn record_run<S: EntrySink>(
    machine: &mut Machine,
    live: LiveInputs,
    writer: S,
    limits: &Limits,
    flush_on_output: bool,
) -> Result<(i32, Recorder<LiveInputs, S>), CmdError> {
    record_run_with(machine, live, writer, limits, flush_on_output, None)
}

/// [`record_run`], with a control socket at `api` if given (status,
/// pause/resume; a host disk error pauses the VM until `tandem resume`).
pub fn record_run_with<S: EntrySink>(
    machine: &mut Machine,
    live: LiveInputs,
    mut writer: S,
    limits: &Limits,
    flush_on_output: bool,
    api: Option<&Path>,
) -> Result<(i32, Recorder<LiveInputs, S>), CmdError> {
    // The identity of the initial state, checked first by the replayer.
    let start = machine.exit_seq;
    let digest = machine
        .digest()
        .map_err(|e| CmdError::Internal(e.to_string()))?;
    writer
        .append(&Entry::Digest {
            exit_seq: start,
            digest,
        })
        .map_err(|e| CmdError::Internal(e.to_string()))?;
    let stop = crate::signals::on_stop(machine.vcpu.kicker().clone());
    let mut live = live.with_wakeup(stop.wakeup);
    if let Some(g) = limits.kick_grace {
        live = live.with_kick_grace(g);
    }
    let mut recorder = Recorder::new(live, writer, limits.rec, start);
    if let Some(g) = &limits.exit_gauge {
        recorder = recorder.with_exit_gauge(g.clone());
    }
    if flush_on_output {
        recorder = recorder.flush_on_output();
    }
    let run_limits = RunLimits {
        stop_at_exit: limits.stop_at,
        pause: Some(stop.flag),
        throttle: limits.throttle.clone(),
    };
    let result = match api {
        None => machine.run(&mut recorder, run_limits),
        Some(sock) => run_with_control(machine, &mut recorder, sock)?,
    };
    net::report(machine, recorder.live_mut().net_frames_dropped());
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            let _ = recorder.flush();
            return Err(e.into());
        }
    };
    // Stopped by a signal: the log is closed as for --stop-at (the last
    // partial console line stays in the final sync point's device state).
    super::run::stopped_by_signal(machine, &mut recorder, false);
    let status = outcome_status(outcome);
    // Close the log: the final state (with digest) and the end.
    let seq = machine.exit_seq;
    let sp = machine
        .capture_sync_point(true)
        .map_err(|e| CmdError::Internal(e.to_string()))?;
    let _ = recorder.sync_point(seq, sp);
    recorder.log(Entry::End {
        exit_seq: seq,
        status,
    });
    recorder
        .flush()
        .map_err(|e| CmdError::Internal(e.to_string()))?;
    Ok((status, recorder))
}

/// Run the recorded `machine` under a control socket at `sock` until the
/// guest ends.
fn run_with_control(
    machine: &mut Machine,
    inputs: &mut dyn Inputs,
    sock: &Path,
) -> Result<Result<RunOutcome, RunError>, CmdError> {
    use primary::migration::{controller, run_controlled, ControlledOutcome};
    let (ctl, side) = controller(machine);
    ctl.refuse_migration(
        "a VM being recorded cannot be migrated or have its disk moved (its log would not follow it)",
    );
    let server = crate::api::serve(sock, ctl)
        .map_err(|e| CmdError::Input(format!("--api-socket {}: {e}", sock.display())))?;
    let mut side = side.with_api_socket(sock);
    let result = run_controlled(machine, inputs, &mut side);
    drop(server);
    Ok(result.map(|o| match o {
        ControlledOutcome::Guest(o) => o,
        // Refused above (a protect is a migration too): never happens.
        ControlledOutcome::Migrated(_) | ControlledOutcome::Protection(_) => RunOutcome::Stopped,
    }))
}
