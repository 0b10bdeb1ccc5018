//! `tandem protect` and `tandem unprotect` (clients of a running VM's
//! control socket; the work is `primary::protect`), and what `tandem
//! status` and the VM's own stderr say of a protected VM.

use failover::lockstep::ProtectionStatus;
use primary::protect::{ProtectReport, ProtectedEnd};

use super::migrate::{absolute, call_with_progress, vm_goes_on};
use super::CmdError;
use crate::api::{self, Event, MigrateRequest, ProtectRequest, Request};
use crate::cli::{ProtectCmdArgs, StatusArgs};

fn summary(r: &ProtectReport) -> String {
    format!(
        "protected by {} from exit {}\n  primary paused {:.1} ms\n  seeding        {:.1} ms, {} pre-copy rounds + the pause ({} pages)\n  pages sent     {}\n  disk sent      {:.1} MiB\n  bytes on wire  {}{}",
        r.secondary,
        r.start_exit,
        r.pause_ms,
        r.total_ms,
        r.rounds,
        r.final_pages,
        r.pages_sent,
        r.disk_bytes_sent as f64 / (1024.0 * 1024.0),
        r.bytes_on_wire,
        if r.converged {
            ""
        } else {
            "\n  note: pre-copy did not reach its pause target"
        }
    )
}

pub fn protect(args: ProtectCmdArgs) -> Result<i32, CmdError> {
    failover::lineage::parse_spares(&args.spare).map_err(CmdError::Input)?;
    let req = Request::Protect(ProtectRequest {
        to: MigrateRequest {
            to: args.to.clone(),
            server_name: args.server_name.clone(),
            ca: absolute(&args.ca)?,
            cert: absolute(&args.cert)?,
            key: absolute(&args.key)?,
            downtime_ms: Some(args.downtime_ms),
            max_bandwidth: None,
        },
        heartbeat_ms: args.failover.heartbeat_ms,
        failover_timeout_ms: args.failover.failover_timeout_ms,
        arbiter: args.failover.arbiter.clone(),
        spares: args.spare.clone(),
        lag: Some(args.lag.clone()),
    });
    let (result, cancelled) =
        call_with_progress(&args.api, &req, args.json, "protect", |ev| match ev {
            Event::Protected(r) => Some(r),
            _ => None,
        })?;
    match result {
        Some(Ok(r)) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&Event::Protected(r)).unwrap_or_default()
                );
            } else {
                println!("{}", summary(&r));
            }
            Ok(0)
        }
        Some(Err(e)) => {
            let how = vm_goes_on(&args.api);
            if cancelled {
                eprintln!("tandem: protect cancelled; the VM {how} unprotected");
            } else {
                eprintln!("tandem: protect failed: {e}; the VM {how} unprotected");
            }
            Ok(1)
        }
        None => {
            eprintln!("tandem: the VM's control socket closed without a result");
            Ok(1)
        }
    }
}

/// Send `req` and take its one answer: `pick` it, or the error it is.
fn one_answer<T>(
    sock: &std::path::Path,
    req: &Request,
    pick: impl Fn(Event) -> Option<T>,
) -> Result<T, CmdError> {
    let mut result = Err("no answer".to_string());
    api::call(sock, req, |ev| {
        result = match ev {
            Event::Error { error } => Err(error),
            other => {
                let text = format!("unexpected answer {other:?}");
                pick(other).ok_or(text)
            }
        };
        false
    })
    .map_err(CmdError::Input)?;
    result.map_err(CmdError::Input)
}

pub fn unprotect(args: StatusArgs) -> Result<i32, CmdError> {
    let r = one_answer(&args.api, &Request::Unprotect, |ev| match ev {
        Event::Unprotected(r) => Some(r),
        _ => None,
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&Event::Unprotected(r.clone())).unwrap_or_default()
        );
    }
    match &r.acknowledged {
        Ok(()) => {
            if !args.json {
                println!(
                    "unprotected at exit {}: the secondary {} acknowledged the whole log ({} bytes) and stopped; {} held outputs released",
                    r.exit_seq, r.secondary, r.log_bytes, r.released
                );
            }
            Ok(0)
        }
        Err(e) => {
            eprintln!(
                "tandem: unprotected at exit {}, but the secondary {} did not acknowledge the end of the log: {e}; the VM runs on unprotected",
                r.exit_seq, r.secondary
            );
            Ok(1)
        }
    }
}

/// One line per field of a protection's status.
pub fn status_text(p: &ProtectionStatus) -> String {
    format!(
        "{} ({}), peer {}\n  exit {} replayed {} (lag {} exits, {:.0} us of guest time)\n  log {} bytes ({:.0} bit/s), {} acknowledged\n  outputs held {} (oldest {:.1} ms), ack round trip {:.2} ms\n  divergences repaired {} ({} sync points asked for)",
        p.role,
        p.state,
        p.peer,
        p.exit_seq,
        p.replayed_exit,
        p.lag_exits,
        p.lag_us,
        p.log_bytes,
        p.log_bandwidth_bps,
        p.acked_bytes,
        p.outputs_held,
        p.oldest_held_ms,
        p.ack_rtt_ms,
        p.repaired,
        p.sync_requests
    ) + &format!(
        "\n  heartbeat {} ms, failover timeout {} ms, last sign of life {:.0} ms ago\n  VM {} generation {}",
        p.heartbeat_ms,
        p.failover_timeout_ms,
        p.last_heard_ms,
        if p.vm_id.is_empty() { "(not named yet)" } else { &p.vm_id },
        p.generation
    ) + &p.bound.as_ref().map(bound_text).unwrap_or_default()
}

/// The lag bound and log queue of a primary, in words.
fn bound_text(b: &failover::lockstep::LagBoundStatus) -> String {
    let slowed = if b.slowed {
        format!("vCPU SLOWED, held {} %", b.throttle_pct)
    } else {
        "vCPU at full speed".into()
    };
    format!(
        "
  lag now {:.1} ms, bound {} ms: {slowed} ({} slow-downs, held {:.0} ms in all)
  lag at acks p50 {:.2} ms p99 {:.2} ms max {:.2} ms ({} acks)
  log queue {} bytes (most {} of {} bound), vCPU waited for room {} times ({:.1} ms)",
        b.lag_now_ms,
        b.lag_bound_ms,
        b.slow_downs,
        b.held_ms,
        b.lag_p50_us / 1e3,
        b.lag_p99_us / 1e3,
        b.lag_max_us / 1e3,
        b.lag_samples,
        b.queue_bytes,
        b.queue_high_water_bytes,
        b.queue_bound_bytes,
        b.queue_full_waits,
        b.queue_full_wait_ms,
    )
}

/// The VM's protection history (`failover::lineage`) in words.
pub fn lineage_text(l: &failover::lineage::Lineage) -> String {
    let mut s = format!(
        "{}: VM {} generation {}",
        l.role.describe(),
        l.vm_id.as_deref().unwrap_or("(not named yet)"),
        l.generation
    );
    if let Some(from) = &l.took_over_from {
        s.push_str(&format!(", took over from {from}"));
    }
    if !l.spares.is_empty() {
        s.push_str(&format!("\n  spares {}", l.spares.join(", ")));
    }
    if let Some(n) = &l.spare_note {
        s.push_str(&format!("\n  spare: {n}"));
    }
    s
}

/// What the VM's stderr says when the guest ends protected.
pub fn report_end(end: &ProtectedEnd) {
    match &end.acknowledged {
        Ok(()) => eprintln!(
            "tandem: protected run ended at exit {}: {} log bytes streamed to {}, {} outputs released after acknowledgement",
            end.exit_seq, end.log_bytes, end.secondary, end.released
        ),
        Err(e) => eprintln!(
            "tandem: protection lost at exit {}: {e}; {} outputs were released only once the VM was unprotected, {} never",
            end.exit_seq, end.released, end.withheld
        ),
    }
    eprintln!("tandem: final state digest {}", end.digest.to_hex());
}

/// `tandem switchover --api SOCK`: hand a protected VM over to its
/// secondary (`primary::protect::switchover`).
pub fn switchover(args: StatusArgs) -> Result<i32, CmdError> {
    let r = one_answer(&args.api, &Request::Switchover, |ev| match ev {
        Event::SwitchedOver(r) => Some(r),
        _ => None,
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&Event::SwitchedOver(r.clone())).unwrap_or_default()
        );
    } else {
        println!(
            "switched over at exit {}: the VM runs on {} now (VM {} generation {}, unprotected until `tandem protect --api` of its socket)",
            r.exit_seq, r.to, r.vm_id, r.generation
        );
        println!(
            "  downtime       {:.1} ms (here {:.1} ms to the handover, one way {:.1} ms, go-live there {:.1} ms)",
            r.downtime_ms, r.pause_here_ms, r.one_way_ms, r.go_live_ms
        );
        println!(
            "  total          {:.1} ms; {} log bytes; {} held outputs released by the new primary",
            r.total_ms, r.log_bytes, r.handed_outputs
        );
    }
    Ok(0)
}
