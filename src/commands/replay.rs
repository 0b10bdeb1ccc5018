//! `tandem replay`: re-execute a recorded run and verify it.

use std::fs::File;
use std::io::BufReader;
use std::time::{Duration, Instant};

use recordlog::{InitialState, LogReader, TailOptions, TailReader};
use secondary::repair::RepairHooks;
use secondary::replay::{EntrySource, LogEnd, Replayer};
use vmm::machine::{DiskConfig, LogConfig, Machine};
use vmm::run::{RunError, RunLimits, RunOutcome};
use vmm::sync::SyncPointCheck;

use super::run::{boot, disk_config, outcome_status, restore_machine};
use super::CmdError;
use crate::cli::{ReplayArgs, SerialTarget};
use crate::console;

/// Status of a replay that diverged.
const DIVERGED: i32 = 1;

pub fn replay(args: ReplayArgs) -> Result<i32, CmdError> {
    let bad_log = |e: String| CmdError::Input(format!("--log {}: {e}", args.log.display()));
    let file = File::open(&args.log).map_err(|e| bad_log(e.to_string()))?;
    let reader = BufReader::with_capacity(1 << 20, file);
    let (source, header): (Box<dyn EntrySource>, _) = if args.follow {
        let (r, h) = TailReader::open(
            reader,
            TailOptions {
                poll_interval: Duration::from_millis(5),
                idle_timeout: Some(Duration::from_secs(5)),
            },
        )
        .map_err(|e| bad_log(e.to_string()))?;
        (Box::new(r), h)
    } else {
        let (r, h) = LogReader::open(reader).map_err(|e| bad_log(e.to_string()))?;
        (Box::new(r), h)
    };
    let config = LogConfig::decode(&header.vm_config).map_err(|e| bad_log(e.to_string()))?;
    let target = if args.quiet {
        SerialTarget::Null
    } else {
        args.serial.clone()
    };
    let out = console::open(&target)?.out;
    let disk = disk_config(args.disk.as_ref())?;
    let machine = match &header.initial_state {
        InitialState::Boot => {
            let mut vm = config.vm.clone();
            if disk.is_some() {
                vm.disk = disk;
            }
            boot(&vm)?
        }
        InitialState::Snapshot { digest, path_hint } => {
            // A seeded secondary's --log has its seed next to it.
            let seed = seed_snapshot_path(&args.log);
            let from_seed = args.snapshot.is_none() && seed.is_file();
            let path = args
                .snapshot
                .clone()
                .or_else(|| from_seed.then_some(seed))
                .unwrap_or_else(|| path_hint.into());
            // ... and the seed's disk: replayed on a copy, so that the kept
            // image stays as it was at the seed.
            let disk = match (disk, &config.vm.disk) {
                (None, Some(d)) if from_seed => Some(seed_disk_copy(&args.log, d.read_only)?),
                (disk, _) => disk,
            };
            let (mut m, _) = restore_machine(&path, disk)?;
            let own = m.digest().map_err(|e| CmdError::Internal(e.to_string()))?;
            if own != *digest {
                return Err(CmdError::Input(format!(
                    "snapshot {} is not the one this log was recorded from (digest {}, log expects {})",
                    path.display(),
                    own.to_hex(),
                    digest.to_hex()
                )));
            }
            m
        }
    };
    replay_machine(
        machine,
        source,
        config.fingerprint_interval,
        ReplayMode {
            repair: args.repair,
            hooks: None,
            digest_at: args.digest_at.clone(),
            kick_hits: None,
        },
        out,
        &bad_log,
    )
}

/// Replay `source` on `machine` (built from the log's header) to the end of
/// the log and verify it; `bad_log` names the log in errors. Status 0:
/// verified (or repaired, or the log stopped early: said on stderr), 1:
/// diverged. A verified replay prints its final state digest.
pub fn replay_machine(
    mut machine: Machine,
    source: Box<dyn EntrySource>,
    fingerprint_interval: u64,
    mode: ReplayMode,
    out: Box<dyn std::io::Write + Send>,
    bad_log: &dyn Fn(String) -> CmdError,
) -> Result<i32, CmdError> {
    replay_on(
        &mut machine,
        source,
        fingerprint_interval,
        mode,
        out,
        None,
        bad_log,
    )
    .map(|r| r.status)
    .map_err(|e| match e {
        CmdError::DiskIo(m) => CmdError::DiskIo(format!("{m}; fix it and replay again")),
        other => other,
    })
}

/// Where a seeded secondary keeps the seed of the log it keeps at `log`
/// (`LOG.seed`, a snapshot file); `tandem replay --log LOG` takes it from
/// there.
pub fn seed_snapshot_path(log: &std::path::Path) -> std::path::PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".seed");
    p.into()
}

/// Where a seeded secondary keeps the disk of the VM it was seeded with,
/// as it was at the seed (`LOG.seed.disk`).
pub fn seed_disk_path(log: &std::path::Path) -> std::path::PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".seed.disk");
    p.into()
}

/// A fresh copy of the seed's disk of `log` to replay on (`LOG.replay.disk`,
/// left for inspection: the replay's final image).
fn seed_disk_copy(log: &std::path::Path, read_only: bool) -> Result<DiskConfig, CmdError> {
    let kept = seed_disk_path(log);
    let mut copy = log.as_os_str().to_owned();
    copy.push(".replay.disk");
    let copy = std::path::PathBuf::from(copy);
    std::fs::copy(&kept, &copy).map_err(|e| {
        CmdError::Input(format!(
            "the VM of {} has a disk: copying its seed's disk {} to {} failed: {e} (or give --disk)",
            log.display(),
            kept.display(),
            copy.display()
        ))
    })?;
    eprintln!(
        "tandem: replaying on {}, a copy of the seed's disk {}",
        copy.display(),
        kept.display()
    );
    Ok(DiskConfig {
        path: copy,
        read_only,
    })
}

/// How a replay checks and reports.
#[derive(Default)]
pub struct ReplayMode {
    /// Repair divergences by adopting the next sync point.
    pub repair: bool,
    /// Told of each divergence and repair (a secondary asks its primary).
    pub hooks: Option<Box<dyn RepairHooks>>,
    /// Print the state digest at these exits.
    pub digest_at: Vec<u64>,
    /// Breakpoint hits a kick's instruction may take to reach before its
    /// sync point is adopted unverified (`vmm::kick`); `None`: no limit,
    /// every kick is verified (`tandem replay`).
    pub kick_hits: Option<u32>,
}

/// Run the replay to its end, stopping at each exit of `digest_at` (in
/// order; one the replay jumps over, adopting a sync point, is skipped) to
/// print the state digest there.
fn run_with_digests(
    machine: &mut Machine,
    replayer: &mut Replayer<Box<dyn EntrySource>>,
    mut digest_at: Vec<u64>,
) -> Result<RunOutcome, RunError> {
    digest_at.sort_unstable();
    digest_at.dedup();
    let mut stops = digest_at.into_iter().peekable();
    loop {
        while stops.next_if(|&e| e < machine.exit_seq).is_some() {}
        let limits = RunLimits {
            stop_at_exit: stops.peek().copied(),
            ..Default::default()
        };
        match machine.run(replayer, limits)? {
            RunOutcome::Stopped if stops.peek() == Some(&machine.exit_seq) => {
                stops.next();
                let digest = machine.digest().map_err(|source| RunError::Sync {
                    exit_seq: machine.exit_seq,
                    source,
                })?;
                eprintln!(
                    "tandem: state digest at exit {}: {}",
                    machine.exit_seq,
                    digest.to_hex()
                );
            }
            other => return Ok(other),
        }
    }
}

/// How [`replay_on`] ended.
pub struct Replayed {
    /// As [`replay_machine`]'s.
    pub status: i32,
    /// The log stopped without its end (the recorder is gone): the machine
    /// stands at the last exit the log covers, and this was the guest's
    /// last virtual time read there (a go-live continues from it).
    pub truncated_at_ns: Option<u64>,
    /// The log ends with a handover (`tandem switchover`) at the exit the
    /// machine stands at, verified: the guest's last virtual time there
    /// (the new primary continues from it).
    pub handover_ns: Option<u64>,
    /// The replay diverged and was not repaired (`status` is then 1).
    pub diverged: bool,
}

/// [`replay_machine`] on a machine the caller keeps (a secondary may go
/// live on it).
pub fn replay_on(
    machine: &mut Machine,
    source: Box<dyn EntrySource>,
    fingerprint_interval: u64,
    mode: ReplayMode,
    out: Box<dyn std::io::Write + Send>,
    frames: Option<Box<dyn vmm::outputs::Outputs>>,
    bad_log: &dyn Fn(String) -> CmdError,
) -> Result<Replayed, CmdError> {
    let ReplayMode {
        repair,
        hooks,
        digest_at,
        kick_hits,
    } = mode;
    machine.kick_seek_hits = kick_hits;
    let done = |status| Replayed {
        status,
        truncated_at_ns: None,
        handover_ns: None,
        diverged: false,
    };
    let diverged = || Replayed {
        diverged: true,
        ..done(DIVERGED)
    };
    machine
        .enable_sync_points(true)
        .map_err(|e| CmdError::Internal(e.to_string()))?;
    let check = SyncPointCheck::new(&machine.vm.memory);
    let mut replayer = Replayer::new(source, fingerprint_interval, repair, check).with_console(out);
    if let Some(f) = frames {
        replayer = replayer.with_frames(f);
    }
    if let Some(h) = hooks {
        replayer = replayer.with_repair_hooks(h);
    }
    check_initial_digest(machine, &mut replayer)?;
    let started = Instant::now();
    let start = machine.exit_seq;
    let result = run_with_digests(machine, &mut replayer, digest_at);
    let elapsed = started.elapsed().as_secs_f64();
    let summary = |m: &Machine| {
        format!(
            "{} exits in {elapsed:.2} s, {} sync points applied, {} divergences repaired, {} kicks reached and verified{}",
            m.exit_seq - start,
            m.stats.sync_points,
            m.stats.repaired,
            m.stats.kicks_verified,
            match m.stats.kicks_unverified {
                0 => String::new(),
                n => format!(
                    ", {n} adopted unverified (more than {} debug exits away)",
                    m.kick_seek_hits.unwrap_or_default()
                ),
            }
        )
    };
    let outcome = match result {
        Ok(o) => o,
        Err(RunError::Divergence(d)) => {
            eprintln!("tandem: replay diverged: {d}");
            eprintln!("tandem: replayed {}", summary(machine));
            return Ok(diverged());
        }
        Err(RunError::Inputs(e)) => {
            eprintln!("tandem: replayed {}", summary(machine));
            return Err(bad_log(e.to_string()));
        }
        Err(RunError::DiskIo { exit_seq, source }) => {
            eprintln!("tandem: replayed {}", summary(machine));
            return Err(CmdError::DiskIo(format!(
                "replay stopped at exit {exit_seq}: {source}: a host problem with this copy of the disk, not a divergence (the recorded run completed this request)"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    if outcome == RunOutcome::LogEnded && *replayer.log_end() == LogEnd::Truncated {
        eprintln!(
            "tandem: the log ends at exit {} without an end entry (the recorder stopped); replay stopped there with the VM intact: {}",
            machine.exit_seq,
            summary(machine)
        );
        return Ok(Replayed {
            status: 0,
            truncated_at_ns: Some(replayer.last_clock_ns()),
            handover_ns: None,
            diverged: false,
        });
    }
    // The recorder closed the log with a digest-carrying sync point and the
    // end entry at the exit where the guest ended.
    let seq = machine.exit_seq;
    if let Some(sp) = replayer.final_sync_point(seq) {
        match machine.replay_sync_point(&mut replayer, seq, &sp) {
            Ok(()) => {}
            Err(RunError::Divergence(d)) => {
                eprintln!("tandem: replay diverged: {d}");
                eprintln!("tandem: replayed {}", summary(machine));
                return Ok(diverged());
            }
            // The sync point comes from the log: one that cannot be
            // applied is damage in the log.
            Err(e @ RunError::Sync { .. }) => return Err(bad_log(e.to_string())),
            Err(e) => return Err(e.into()),
        }
    }
    let status = match (outcome, replayer.log_end()) {
        // A repaired replay adopted the recorder's final sync point and
        // stands where the recorded run ended.
        (RunOutcome::LogEnded, LogEnd::End { exit_seq, status }) if *exit_seq == seq => *status,
        _ => outcome_status(outcome),
    };
    if let Some(extra) = replayer.finish() {
        eprintln!(
            "tandem: replay diverged: the guest ended at exit {seq} but the log continues with {:?}",
            extra.kind()
        );
        return Ok(diverged());
    }
    match replayer.log_end().clone() {
        LogEnd::End {
            exit_seq,
            status: logged,
        } if exit_seq == seq && logged == status => {}
        LogEnd::End {
            exit_seq,
            status: logged,
        } => {
            eprintln!(
                "tandem: replay diverged: the recorded run ended at exit {exit_seq} with status {logged}, the replay at exit {seq} with status {status}"
            );
            return Ok(diverged());
        }
        LogEnd::Corrupt(e) => return Err(bad_log(e.to_string())),
        LogEnd::Truncated | LogEnd::Open => {
            eprintln!(
                "tandem: the guest ended at exit {seq} but the log ends without an end entry (truncated): the recorded outcome cannot be checked; {}",
                summary(machine)
            );
            return Ok(done(0));
        }
    }
    match machine.stats.last_repair_exit {
        // Repaired is not verified: the replica ran differently in between.
        Some(at) => eprintln!(
            "tandem: replay repaired: {} divergences repaired; the replica is exact again from the sync point at exit {at} on: {}",
            machine.stats.repaired,
            summary(machine)
        ),
        None => eprintln!("tandem: replay verified: {}", summary(machine)),
    }
    let digest = machine
        .digest()
        .map_err(|e| CmdError::Internal(e.to_string()))?;
    eprintln!("tandem: final state digest {}", digest.to_hex());
    if replayer.handover() == Some(seq) {
        eprintln!(
            "tandem: the log ends with a handover at exit {seq} (tandem switchover): the VM went on from there on the replaying side"
        );
        return Ok(Replayed {
            status: 0,
            truncated_at_ns: None,
            handover_ns: Some(replayer.last_clock_ns()),
            diverged: false,
        });
    }
    Ok(done(0))
}

/// The recorder's first entry is the digest of the initial state: a
/// different kernel, command line or snapshot shows up here.
fn check_initial_digest(
    machine: &mut Machine,
    replayer: &mut Replayer<Box<dyn EntrySource>>,
) -> Result<(), CmdError> {
    let seq = machine.exit_seq;
    match replayer.take_digest(seq) {
        Some(expected) => {
            let own = machine
                .digest()
                .map_err(|e| CmdError::Internal(e.to_string()))?;
            if own != expected {
                return Err(CmdError::Input(format!(
                    "the VM built from the log's configuration differs from the recorded one at exit {seq} (state digest {}, log has {}): a different kernel, command line or disk?",
                    own.to_hex(),
                    expected.to_hex()
                )));
            }
            Ok(())
        }
        None => Ok(()),
    }
}
