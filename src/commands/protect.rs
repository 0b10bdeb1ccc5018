//! `tandem run --protect-to` without a control socket: a protected
//! primary, from the first exit. (With `--api-socket` the VM is seeded
//! before its first instruction instead, `super::run_spares`, so that
//! `tandem unprotect` and the rest of the control socket work as for a VM
//! protected with `tandem protect`.)
//!
//! The VM is booted here and recorded (as `tandem record` does) into a
//! queue that streams to the `tandem secondary` (`primary::lockstep`); its
//! console output is held until the secondary has acknowledged the log up
//! to the exit that produced it (the Output Rule). At the end the log's
//! `End` reaches the secondary and both sides print their final state
//! digest.

use std::net::ToSocketAddrs;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use failover::lockstep::{DiskHash, Header as LockstepHeader, LOCKSTEP_VERSION};
use primary::held_audit::ReleaseAudit;
use primary::lockstep::{Link, LinkParams};
use primary::record::RecordOptions;
use recordlog::{InitialState, QueueWriter};
use vmm::inputs::LiveInputs;
use vmm::outputs::LiveOutputs;
use vmm::throttle::Throttle;

use super::record::{log_file, record_run, start_log, Limits};
use super::run::{boot, vm_config};
use super::CmdError;
use crate::cli::{ProtectArgs, RunArgs};
use crate::{console, net};

/// How long the secondary may take to acknowledge the end of the log.
const END_TIMEOUT: Duration = Duration::from_secs(60);

fn link_params(p: &ProtectArgs) -> Result<LinkParams, CmdError> {
    let to_arg = p.protect_to.clone().unwrap_or_default();
    let (Some(ca), Some(cert), Some(key)) = (&p.ca, &p.cert, &p.key) else {
        return Err(CmdError::Input(
            "--protect-to needs the cluster credentials: --ca, --cert and --key".into(),
        ));
    };
    let to = to_arg
        .to_socket_addrs()
        .map_err(|e| CmdError::Input(format!("--protect-to {to_arg}: {e}")))?
        .next()
        .ok_or_else(|| CmdError::Input(format!("--protect-to {to_arg}: no address")))?;
    let host = to_arg
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(&to_arg);
    let creds = failover::certs::Credentials::load(ca, cert, key)
        .map_err(|e| CmdError::Input(format!("loading credentials: {e}")))?;
    let name = cert
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "primary".into());
    let failover = super::failover_params(&p.failover, &name)?;
    Ok(LinkParams {
        to,
        server_name: p.server_name.clone().unwrap_or_else(|| host.to_string()),
        creds,
        name,
        failover,
    })
}

pub fn run_protected(args: RunArgs) -> Result<i32, CmdError> {
    // What this first slice cannot protect yet, said up front.
    let unsupported = [
        (args.snapshot_at.is_some(), "--snapshot-at"),
        (
            args.vm.kernel.is_some() || args.vm.initrd.is_some(),
            "--kernel/--initrd (the secondary boots the built-in guest only)",
        ),
    ];
    if let Some((_, what)) = unsupported.iter().find(|(on, _)| *on) {
        return Err(CmdError::Input(format!(
            "--protect-to cannot be combined with {what} yet"
        )));
    }
    // A control socket makes it the seeded protection (`super::run_spares`).
    debug_assert!(args.api_socket.is_none());
    let started = Instant::now();
    let lag = args
        .protect
        .lag
        .limits()
        .map_err(|e| CmdError::Input(e.to_string()))?;
    // `run` blocked SIGTERM/SIGINT before any thread.
    let params = link_params(&args.protect)?;
    let host_net = net::open(args.vm.net.net.as_ref())?;
    let config = vm_config(&args.vm, host_net.as_ref())?;
    let console = console::open(&args.vm.serial)?;
    let disk = match &config.disk {
        Some(d) => Some(
            DiskHash::of(&d.path)
                .map_err(|e| CmdError::Input(format!("--disk {}: {e}", d.path.display())))?,
        ),
        None => None,
    };
    let mut machine = boot(&config)?;
    let rec = RecordOptions {
        progress: lag.progress,
        ..RecordOptions::default()
    };
    let header = start_log(&mut machine, &rec, InitialState::Boot)?;
    let queue = lag.queue();
    let writer = QueueWriter::new(queue.clone(), &header)
        .map_err(|e| CmdError::Internal(format!("the log stream: {e}")))?;
    let keep = match &args.protect.keep_log {
        Some(p) => Some(log_file(p, &header, "--keep-log")?),
        None => None,
    };
    let mut link = Link::connect(
        &params,
        &LockstepHeader {
            version: LOCKSTEP_VERSION,
            disk,
            seed: None,
            arbiter: params.failover.arbiter_id.clone(),
        },
        queue.clone(),
    )
    .map_err(CmdError::Internal)?;
    eprintln!(
        "tandem: protected by the secondary {} (VM {} generation {}; heartbeat {} ms, failover timeout {} ms, arbiter {})",
        link.peer,
        params.failover.protection.vm_id,
        params.failover.protection.generation,
        params.failover.timing.interval.as_millis(),
        params.failover.timing.timeout.as_millis(),
        params
            .failover
            .arbiter
            .as_ref()
            .map(|a| a.describe())
            .unwrap_or_else(|| "none: no failover".into())
    );
    let audit = match &args.protect.output_log {
        Some(p) => Some(
            std::fs::File::create(p)
                .map_err(|e| CmdError::Input(format!("--output-log {}: {e}", p.display())))?,
        ),
        None => None,
    };
    // Console bytes and sent frames alike wait for the acknowledgement.
    let tap = host_net.as_ref().map(|n| n.tx.clone());
    let (held, release) = link
        .held_outputs(
            Box::new(LiveOutputs::new(console.out, tap)),
            ReleaseAudit::new(audit),
        )
        .map_err(CmdError::Internal)?;
    let throttle = Arc::new(Throttle::new());
    link.govern(throttle.clone(), lag.bound);
    let exit = Arc::new(AtomicU64::new(0));
    let lag_status = link.status_source(&held, exit.clone());
    let mut live = LiveInputs::new(0, console.input)
        .with_outputs(Box::new(held))
        .with_net(host_net.as_ref().map(|n| n.rx.clone()));
    live.set_sync_requests(Some(link.sync_requests()));
    let limits = Limits {
        stop_at: None,
        kick_grace: None,
        rec,
        throttle: Some(throttle),
        exit_gauge: Some(exit),
    };
    let (status, recorder) = record_run(&mut machine, live, (writer, keep), &limits, true)?;
    let stats = recorder.stats;
    // Dropping the recorder drops the held outputs' sender: the release
    // thread ends once the last output is acknowledged.
    drop(recorder);
    let end = link.finish(END_TIMEOUT);
    let link_alone = matches!(end, Ok(true));
    let held = release.wait();
    let digest = machine
        .digest()
        .map_err(|e| CmdError::Internal(e.to_string()))?;
    let sent = queue.stats().pushed_bytes;
    let elapsed = started.elapsed().as_secs_f64();
    if link_alone {
        eprintln!(
            "tandem: the run ended at exit {} UNPROTECTED (the secondary was lost and this primary won the arbiter)",
            machine.exit_seq
        );
        eprintln!("tandem: final state digest {}", digest.to_hex());
        return Ok(status);
    }
    if let Err(e) = end {
        return Err(CmdError::Internal(format!(
            "protection lost at exit {}: {e}; {} outputs were never released",
            machine.exit_seq, held.withheld
        )));
    }
    eprintln!(
        "tandem: protected run ended at exit {}: {sent} log bytes streamed ({:.0} bit/s), {} outputs released after acknowledgement (added latency p50 {:.2} ms, p99 {:.2} ms), {} sync points",
        machine.exit_seq,
        sent as f64 * 8.0 / elapsed.max(1e-9),
        held.released,
        held.latency.p50.as_secs_f64() * 1e3,
        held.latency.p99.as_secs_f64() * 1e3,
        stats.sync_points,
    );
    if let Some(b) = lag_status.status().bound {
        eprintln!(
            "tandem: secondary lag at acknowledgements p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} acks); lag bound {} ms: slowed {} times, vCPU held {:.0} ms; log queue at most {} bytes (bound {}), full {} times",
            b.lag_p50_us / 1e3,
            b.lag_p99_us / 1e3,
            b.lag_max_us / 1e3,
            b.lag_samples,
            b.lag_bound_ms,
            b.slow_downs,
            b.held_ms,
            b.queue_high_water_bytes,
            b.queue_bound_bytes,
            b.queue_full_waits,
        );
    }
    eprintln!("tandem: final state digest {}", digest.to_hex());
    Ok(status)
}
