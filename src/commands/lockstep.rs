//! `tandem secondary`: wait for a primary (`tandem run --protect-to`),
//! then replay its log in lockstep as it arrives (`secondary::lockstep`).
//!
//! The replayer reads the received stream one entry ahead and blocks
//! where it ends, so the copy never executes past what the log covers.
//! Its console goes only to `--serial`. When the primary's log ends, the
//! replay finishes, is verified like `tandem replay`'s and prints its final
//! state digest, which must equal the primary's. When the primary is lost
//! instead, the secondary may go live (`super::golive`).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use failover::heartbeat::Timing;
use secondary::watch::StreamEnd;

use recordlog::{InitialState, TailOptions, TailReader};
use secondary::lockstep::{accept, listen, SecondaryOptions, Tracked};
use secondary::repair::ChannelRepair;
use vmm::machine::{DiskConfig, LogConfig};

use super::golive::{
    go_live, GoLive, Keeper, LiveApi, ReplayConsole, ReplayFrames, Tapped, Unreleased,
};
use super::replay::{replay_on, ReplayMode};
use super::run::boot;
use super::CmdError;
use crate::cli::{SecondaryArgs, SerialTarget};
use crate::{console, net};

/// Debug exits (breakpoint hits and the steps past them) a live secondary
/// spends at most on reaching a kick's instruction before it adopts the
/// kick's sync point unverified: a kick in a tight loop would cost one per
/// pass and let the secondary fall behind (docs/determinism.md). The
/// replica is the primary's state either way; `tandem replay` of the kept
/// `--log` verifies every kick.
const LIVE_KICK_HITS: u32 = 64;

pub fn secondary(args: SecondaryArgs) -> Result<i32, CmdError> {
    crate::signals::block();
    if matches!(args.serial, SerialTarget::Stdio) {
        return Err(CmdError::Input(
            "--serial stdio: a secondary's console must not reach the outside world; use null or file:PATH".into(),
        ));
    }
    // This host's copy of the disk is held from now on (`vmm::image`): an
    // image another process uses (the primary's own, on this host) is
    // refused before anything is created, and none can take it while the
    // secondary waits. The replay's device shares the lock.
    let mut held = None;
    if let Some(d) = &args.disk {
        // A path that does not exist yet is where a seeded VM's disk goes.
        if d.exists() && !d.is_file() {
            return Err(CmdError::Input(format!(
                "--disk {}: not a regular file",
                d.display()
            )));
        }
        if d.exists() {
            // Write access if we have it (a boot-start replay writes it; a
            // seed only replaces it).
            let writable = std::fs::OpenOptions::new().write(true).open(d).is_ok();
            held = Some(super::run::hold_disk(d, !writable)?);
        }
    }
    let timing = Timing::from_ms(
        args.failover.heartbeat_ms,
        args.failover.failover_timeout_ms,
    )
    .map_err(|e| CmdError::Input(e.to_string()))?;
    let opened = args
        .failover
        .arbiter
        .as_deref()
        .map(failover::arbiter::open)
        .transpose()
        .map_err(|e| CmdError::Input(e.to_string()))?;
    let arbiter_id = opened.as_ref().map(|o| o.identity.clone());
    let arbiter = opened.map(|o| o.arbiter);
    let (creds, name) = super::load_creds(&args.creds, "secondary")?;
    let mut spare = crate::spare::at_go_live(&args)?;
    let log = match &args.log {
        Some(p) => Some(
            std::fs::File::create(p)
                .map_err(|e| CmdError::Input(format!("--log {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let ack_log = match &args.ack_log {
        Some(p) => Some(
            std::fs::File::create(p)
                .map_err(|e| CmdError::Input(format!("--ack-log {}: {e}", p.display())))?,
        ),
        None => None,
    };
    // Opened now (a bad --net fails before any primary is taken), written
    // to only when this host goes live.
    let standby = net::StandbyTap::open(args.net.as_ref())?;
    let out = console::open(&args.serial)?.out;
    if let crate::cli::SerialTarget::File(p) = &args.live_serial {
        // Checked now, not at failover time.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| CmdError::Input(format!("--live-serial {}: {e}", p.display())))?;
    }
    let listener = listen(args.listen, &creds, &name)
        .map_err(|e| CmdError::Input(format!("--listen {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CmdError::Internal(e.to_string()))?;
    eprintln!("tandem: secondary waiting for a primary on {addr}");
    let opts = SecondaryOptions {
        disk: args.disk.clone(),
        log,
        ack_log,
        timing,
        arbiter: arbiter_id,
    };
    let mut protected = accept(&listener, opts).map_err(|e| CmdError::Internal(e.to_string()))?;
    let follow = protected.follow.clone();
    let mut server = match &args.api_socket {
        Some(sock) => Some(serve_status(
            sock,
            follow.clone(),
            protected.watch.clone(),
            timing,
            spare.as_ref().map(|s| s.spares.clone()).unwrap_or_default(),
        )?),
        None => None,
    };
    let mut seeded = protected.seeded.take();
    match &seeded {
        Some(s) => eprintln!(
            "tandem: protecting the running VM of {}: seeded at exit {} after {} pre-copy rounds{}",
            protected.from,
            s.machine.exit_seq,
            s.rounds,
            s.disk
                .as_ref()
                .map(|d| format!(", its disk copied to {}", d.display()))
                .unwrap_or_default()
        ),
        None => eprintln!("tandem: protecting the VM of {}", protected.from),
    }
    if let (Some(s), Some(log)) = (seeded.as_mut(), &args.log) {
        keep_seed(&mut s.machine, log)?;
    }
    let from = protected.from.clone();
    // A log this secondary cannot use is refused to the primary at once
    // (it stops taking and acknowledging its bytes; nothing goes live).
    let refuse_to = protected.to_primary.clone();
    let peer = from.clone();
    let bad_log = move |e: String| {
        secondary::repair::refuse(&refuse_to, &e);
        CmdError::Input(format!("the log stream from {peer}: {e}"))
    };
    let closed = protected.closed.clone();
    let watch = protected.watch.clone();
    let offset = Arc::new(AtomicU64::new(0));
    let kept = Arc::new(Unreleased::default());
    let keeper = Keeper::new(offset.clone(), watch.clone(), kept.clone());
    let out = Box::new(ReplayConsole::new(out, keeper.clone()));
    let mut tail = TailReader::new(
        protected.reader,
        TailOptions {
            poll_interval: Duration::from_millis(1),
            idle_timeout: None,
        },
    )
    .stop_when(move || closed.load(std::sync::atomic::Ordering::SeqCst));
    let start_exit = seeded.as_ref().map_or(0, |s| s.machine.exit_seq);
    let prepared = (|| {
        let header = tail.wait_header().map_err(|e| bad_log(e.to_string()))?;
        let config = LogConfig::decode(&header.vm_config).map_err(|e| bad_log(e.to_string()))?;
        let machine = match (seeded, &header.initial_state) {
            // The log's initial digest is checked against the seed by the replay.
            (Some(s), InitialState::Snapshot { .. }) => {
                standby.check(s.machine.config.net.as_ref());
                s.machine
            }
            (Some(_), InitialState::Boot) => {
                return Err(bad_log(
                    "the primary seeded this secondary but its log starts at boot".into(),
                ))
            }
            (None, InitialState::Snapshot { .. }) => {
                return Err(bad_log(
                    "the log starts from a snapshot the primary did not send (no seed)".into(),
                ))
            }
            // Booting from the log needs the guest's image here. The peer
            // never chooses a local path: only the built-in guest, and this
            // host's own disk. A seeded VM (any kernel) needs no image.
            (None, InitialState::Boot)
                if config.vm.kernel.is_some() || config.vm.initrd.is_some() =>
            {
                return Err(bad_log(
                    "the VM boots a kernel file of the primary's host and was not seeded: a secondary boots only the built-in guest from a log (protect a VM that boots a kernel with tandem run --protect-to --api-socket, or tandem protect)".into(),
                ));
            }
            (None, InitialState::Boot) => boot_for_log(&config, &args, &standby, &bad_log)?,
        };
        Ok((config, machine))
    })();
    let (config, mut machine) = match prepared {
        Ok(x) => x,
        Err(e) => {
            // Refused before replaying anything: the primary hears why
            // (the receiving thread sends it, then stops).
            secondary::repair::refuse(&protected.to_primary, &e.to_string());
            let _ = protected.thread.join();
            return Err(e);
        }
    };
    // The VM's device (or the seed's image) holds the disk now.
    drop(held);
    let replayed = replay_on(
        &mut machine,
        Box::new(Tracked::new(
            Tapped::new(tail, offset),
            follow.clone(),
            start_exit,
        )),
        config.fingerprint_interval,
        ReplayMode {
            repair: true,
            hooks: Some(Box::new(ChannelRepair::new(
                protected.to_primary.clone(),
                follow.clone(),
            ))),
            digest_at: args.digest_at.clone(),
            // Keep up with the primary: a kick in a tight loop would cost a
            // breakpoint exit per pass (docs/determinism.md).
            kick_hits: Some(LIVE_KICK_HITS),
        },
        out,
        Some(Box::new(ReplayFrames(keeper))),
        &bad_log,
    );
    if let Ok(super::replay::Replayed {
        handover_ns: Some(virtual_ns),
        ..
    }) = &replayed
    {
        // A switchover: the log ended with the primary's handover, verified
        // at this exit. Go live at once (no failure timeout); the receiving
        // thread carries on until the old primary closes, sending our
        // go-live to it.
        let arrived = follow.handed_over_within(timing.timeout);
        if arrived.is_none() {
            eprintln!(
                "tandem: the log from {from} ends with a handover but its release offset did not follow within {} ms: outputs after its last heartbeat are produced again (duplicates possible at the boundary)",
                timing.timeout.as_millis()
            );
        }
        follow.set_ended();
        // The listener stays open: closing it would close the old
        // primary's connection before our go-live reaches it.
        return go_live(
            &mut machine,
            GoLive {
                watch: &watch,
                why: format!("{from} handed the VM over (tandem switchover)"),
                arbiter: arbiter.as_deref(),
                holder: format!("secondary {name} (pid {})", std::process::id()),
                kept: &kept,
                console: console::open(&args.live_serial)?,
                standby: &standby,
                virtual_ns: *virtual_ns,
                api: args.api_socket.clone().map(|sock| LiveApi {
                    sock,
                    server: server.take(),
                    from: from.clone(),
                    spare: spare.take(),
                }),
                handover: Some(super::golive::HandedOver {
                    arrived: arrived.unwrap_or_else(std::time::Instant::now),
                    to_primary: protected.to_primary.clone(),
                }),
            },
        );
    }
    // A copy that can go no further (a host problem with its disk, a
    // divergence it could not repair, a replay error) tells the primary at
    // once: the primary must not wait on it (its lag bound would slow the
    // VM to a halt), and it runs on unprotected once it holds the arbiter.
    // This copy never goes live.
    let gave_up = match &replayed {
        Err(e) => Some(e.to_string()),
        Ok(r) if r.diverged => Some("its replay diverged and could not be repaired".to_string()),
        Ok(_) => None,
    };
    if let Some(why) = &gave_up {
        eprintln!(
            "tandem: this secondary stops at exit {}: {why}; the primary {from} is told (it runs on unprotected once it holds the arbiter); this copy does not go live",
            machine.exit_seq
        );
        secondary::repair::refuse(
            &protected.to_primary,
            &format!(
                "its copy stopped at exit {} and does not go live: {why}",
                machine.exit_seq
            ),
        );
    }
    // A stream refused for a protocol error: this secondary stops (never
    // goes live on it).
    let mut stream_error = None;
    let lost = match protected.thread.join() {
        Ok(Ok((bytes, end))) => {
            eprintln!("tandem: received {bytes} log bytes from {from}");
            match end {
                // Closed before the log's end (no end entry, no unprotect):
                // the primary may be live (it won the arbiter while this
                // side was frozen) or gone; only the arbiter may say which.
                StreamEnd::Closed if !follow.unprotected() => {
                    Some("it closed the log stream before the log's end".to_string())
                }
                StreamEnd::Closed => None,
                StreamEnd::Lost(why) => Some(why),
            }
        }
        Ok(Err(e)) => {
            eprintln!("tandem: the log stream from {from} ended: {e}");
            stream_error = Some(e);
            None
        }
        Err(_) => {
            eprintln!("tandem: the log receiver failed");
            None
        }
    };
    follow.set_ended();
    if follow.unprotected() {
        eprintln!(
            "tandem: the primary {from} ended protection (tandem unprotect) at exit {}: this secondary stops; the VM runs on there, unprotected",
            machine.exit_seq
        );
    }
    listener.close();
    eprintln!(
        "tandem: heartbeats: longest silence from the primary {:.1} ms (failover timeout {} ms)",
        watch.life.longest_silence().as_secs_f64() * 1e3,
        timing.timeout.as_millis()
    );
    let replayed = replayed?;
    if let Some(e) = stream_error {
        return Err(CmdError::Input(format!(
            "the log stream from {from}: {e}; this secondary stopped at exit {} and does not go live",
            machine.exit_seq
        )));
    }
    match (replayed.truncated_at_ns, lost) {
        (Some(virtual_ns), Some(why)) => go_live(
            &mut machine,
            GoLive {
                watch: &watch,
                why: format!("{from}: {why}"),
                arbiter: arbiter.as_deref(),
                holder: format!("secondary {name} (pid {})", std::process::id()),
                kept: &kept,
                console: console::open(&args.live_serial)?,
                standby: &standby,
                virtual_ns,
                api: args.api_socket.clone().map(|sock| LiveApi {
                    sock,
                    server: server.take(),
                    from: from.clone(),
                    spare: spare.take(),
                }),
                handover: None,
            },
        ),
        _ => Ok(replayed.status),
    }
}

/// The kept log of a seeded secondary starts at the seed: keep the seed
/// next to it as a snapshot, so that `tandem replay --log LOG` replays it,
/// and its disk as it is at the seed (`LOG.seed.disk`, before the replay
/// writes to the image), which that replay takes a copy of.
fn keep_seed(machine: &mut vmm::machine::Machine, log: &std::path::Path) -> Result<(), CmdError> {
    let path = super::replay::seed_snapshot_path(log);
    // Replay takes its virtual time from the log.
    let state = machine
        .save(0)
        .map_err(|e| CmdError::Internal(format!("saving the seed: {e}")))?;
    vmm::snapshot::write(&path, &state, &machine.vm.memory).map_err(|e| {
        CmdError::Input(format!(
            "--log: writing the seed to {}: {e}",
            path.display()
        ))
    })?;
    let disk = match &machine.config.disk {
        Some(d) => {
            let kept = super::replay::seed_disk_path(log);
            std::fs::copy(&d.path, &kept).map_err(|e| {
                CmdError::Input(format!(
                    "--log: keeping the seed's disk {} as {}: {e}",
                    d.path.display(),
                    kept.display()
                ))
            })?;
            format!(" and its disk in {}", kept.display())
        }
        None => String::new(),
    };
    eprintln!(
        "tandem: the seed (exit {}) is kept in {}{disk} for tandem replay --log {}",
        machine.exit_seq,
        path.display(),
        log.display()
    );
    Ok(())
}

/// The VM of a log protected from boot, on this host's own disk.
fn boot_for_log(
    config: &LogConfig,
    args: &SecondaryArgs,
    standby: &net::StandbyTap,
    bad_log: &dyn Fn(String) -> CmdError,
) -> Result<vmm::machine::Machine, CmdError> {
    let mut vm = config.vm.clone();
    // The replayed NIC takes its frames from the log and its sent frames go
    // nowhere (the replayer checks them against the log).
    standby.check(vm.net.as_ref());
    vm.disk = match (vm.disk.take(), &args.disk) {
        (Some(d), Some(path)) => Some(DiskConfig {
            path: path.clone(),
            read_only: d.read_only,
        }),
        // The lockstep header was checked against --disk already.
        (None, _) => None,
        (Some(_), None) => return Err(bad_log("the VM has a disk: give --disk".into())),
    };
    boot(&vm)
}

/// The secondary's control socket: `tandem status` only.
fn serve_status(
    sock: &std::path::Path,
    follow: Arc<secondary::lockstep::Follow>,
    watch: Arc<secondary::watch::PrimaryWatch>,
    timing: Timing,
    spares: Vec<String>,
) -> Result<crate::api::Server, CmdError> {
    let status = Arc::new(move || {
        let mut p = follow.status();
        p.heartbeat_ms = timing.interval.as_millis() as u64;
        p.failover_timeout_ms = timing.timeout.as_millis() as u64;
        p.last_heard_ms = watch.life.silent_for().as_secs_f64() * 1e3;
        if let Some(id) = watch
            .protection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            p.vm_id = id.vm_id.clone();
            p.generation = id.generation;
        }
        primary::migration::VmStatus {
            state: "secondary".into(),
            exit_seq: p.replayed_exit,
            migration: None,
            reason: None,
            lineage: Some(failover::lineage::Lineage {
                vm_id: (!p.vm_id.is_empty()).then(|| p.vm_id.clone()),
                generation: p.generation,
                role: failover::lineage::Role::Secondary,
                spares: spares.clone(),
                ..Default::default()
            }),
            protection: Some(Box::new(p)),
        }
    });
    crate::api::serve_target(sock, crate::api::Target::Secondary(status))
        .map_err(|e| CmdError::Input(format!("--api-socket {}: {e}", sock.display())))
}
