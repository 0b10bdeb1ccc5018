//! Spare secondaries (`--spare ADDR[,ADDR...]`, issue 10; `docs/failover.md`):
//! a primary that lost its secondary and won the arbiter seeds a new
//! secondary by itself, from the first spare that takes the VM (each spare
//! is used once; one that refuses or cannot be reached is skipped). The new
//! protection is the VM's next generation (`failover::lineage`), with the
//! credentials, heartbeat, timeout and arbiter of the protection it
//! replaces, and spares of its own (the rest of the list). `tandem status`
//! shows the spares left and what the last attempt did.

use std::sync::Arc;

use primary::migration::{MigrationParams, VmController};
use primary::protect::ProtectReport;

use crate::api::{self, ProtectRequest};

/// The primary's failover settings for `m`, with the spare logic of the
/// VM's lineage hooked to the loss of its secondary.
pub fn params(
    ctl: &VmController,
    m: &ProtectRequest,
) -> Result<(MigrationParams, primary::failover::FailoverParams), String> {
    let p = api::params(&m.to)?;
    let failover = crate::cli::FailoverArgs {
        heartbeat_ms: m.heartbeat_ms,
        failover_timeout_ms: m.failover_timeout_ms,
        arbiter: m.arbiter.clone(),
    };
    let mut f = crate::commands::failover_params(&failover, &p.name).map_err(|e| e.to_string())?;
    let (ctl, m) = (ctl.clone(), m.clone());
    f.on_alone = Some(Arc::new(move || {
        if ctl.lineage().spares.is_empty() {
            return;
        }
        let (ctl, m) = (ctl.clone(), m.clone());
        let spawned = std::thread::Builder::new()
            .name("spare".into())
            .spawn(move || seed_spare(&ctl, &m));
        if let Err(e) = spawned {
            eprintln!("tandem: cannot start seeding a spare: {e}");
        }
    }));
    Ok((p, f))
}

/// Protect the VM of `ctl` as `m` asks (its spares, if any, replace the
/// VM's list). `paused_ok`: a paused VM is protected too (and stays
/// paused). Progress as for a migration.
pub fn protect(
    ctl: &VmController,
    m: &ProtectRequest,
    paused_ok: bool,
    on_progress: &mut dyn FnMut(&primary::migration::Progress),
) -> Result<ProtectReport, String> {
    let spares = failover::lineage::parse_spares(&m.spares)?;
    // Checked before anything is done: a bad value leaves the VM as it is.
    let limits = match &m.lag {
        Some(l) => l.limits().map_err(|e| e.to_string())?,
        None => primary::lag::LagLimits::default(),
    };
    let (params, failover) = params(ctl, m)?;
    if !spares.is_empty() {
        ctl.lineage().spares = spares;
    }
    let rec = primary::record::RecordOptions {
        progress: limits.progress,
        ..primary::record::RecordOptions::default()
    };
    let how = if paused_ok {
        primary::protect::protect_paused
    } else {
        primary::protect::protect
    };
    how(ctl, &params, failover, rec, limits, on_progress).map_err(|e| e.to_string())
}

/// Seed the first spare that takes the VM (see the module docs).
pub fn seed_spare(ctl: &VmController, template: &ProtectRequest) {
    loop {
        let Some(addr) = ctl.lineage().take_spare() else {
            note(ctl, "no spare left: the VM runs unprotected".into());
            return;
        };
        let mut m = template.clone();
        m.to.to = addr.clone();
        note(ctl, format!("seeding the spare {addr}"));
        // The VM's list (without this one) stays as it is.
        m.spares.clear();
        let result = protect(ctl, &m, true, &mut |_| {});
        match result {
            Ok(r) => {
                let generation = ctl.lineage().generation;
                note(
                    ctl,
                    format!(
                        "protected by the spare {} (generation {generation}) from exit {}, primary paused {:.1} ms",
                        r.secondary, r.start_exit, r.pause_ms
                    ),
                );
                return;
            }
            Err(e) => note(ctl, format!("the spare {addr} failed: {e}")),
        }
    }
}

fn note(ctl: &VmController, what: String) {
    eprintln!("tandem: spare: {what}");
    ctl.lineage().spare_note = Some(what);
}

/// `tandem secondary --spare`: what the host seeds once it went live (its
/// own credentials, timing and arbiter), checked before any primary comes.
pub fn at_go_live(
    args: &crate::cli::SecondaryArgs,
) -> Result<Option<ProtectRequest>, crate::commands::CmdError> {
    use crate::commands::CmdError;
    let spares = failover::lineage::parse_spares(&args.spare).map_err(CmdError::Input)?;
    if spares.is_empty() {
        return Ok(None);
    }
    let abs = |p: &std::path::Path| {
        std::path::absolute(p).map_err(|e| CmdError::Input(format!("{}: {e}", p.display())))
    };
    Ok(Some(ProtectRequest {
        to: api::MigrateRequest {
            to: String::new(),
            server_name: None,
            ca: abs(&args.creds.ca)?,
            cert: abs(&args.creds.cert)?,
            key: abs(&args.creds.key)?,
            downtime_ms: Some(api::DEFAULT_DOWNTIME_MS),
            max_bandwidth: None,
        },
        heartbeat_ms: args.failover.heartbeat_ms,
        failover_timeout_ms: args.failover.failover_timeout_ms,
        arbiter: args.failover.arbiter.clone(),
        spares,
        lag: None,
    }))
}
