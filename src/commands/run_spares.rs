//! `tandem run --protect-to ADDR --api-socket SOCK [--spare ADDR[,ADDR...]]`
//! (issues 8 and 10, `docs/lockstep.md`, `docs/failover.md`): a VM
//! protected from before its first instruction and served on its control
//! socket. This is how every `run --protect-to` with a control socket is
//! protected (`--kernel` and `--spare` need one), so that such a VM has
//! exactly the protection `tandem protect` gives a running VM: `tandem
//! unprotect`, `status`, `switchover`, `failover`, re-protection and
//! spares work the one way they work there. With `--kernel` the secondary
//! gets the booted kernel's memory in the seed, so it needs no copy of
//! the file.
//!
//! A VM protected from boot without a control socket (`super::protect`)
//! records into a stream that nothing can end early or hand to another
//! secondary. This one is booted paused under the control socket instead,
//! seeded to `--protect-to` exactly as `tandem protect` seeds a running VM
//! (memory and disk copied; nothing has run yet, so nothing leaves
//! unprotected), then resumed: from then on it is a protected VM like any
//! other, and the loss of its secondary seeds the next spare
//! (`crate::spare`).

use super::run::{boot, vm_config};
use super::CmdError;
use crate::api::{MigrateRequest, ProtectRequest, DEFAULT_DOWNTIME_MS};
use crate::cli::RunArgs;
use crate::{console, net};

pub fn run(args: RunArgs) -> Result<i32, CmdError> {
    let p = &args.protect;
    let what = if !p.spare.is_empty() {
        "--spare"
    } else if args.api_socket.is_some() {
        "--protect-to with --api-socket (seeded before the first instruction)"
    } else {
        "--protect-to with --kernel/--initrd (seeded before the first instruction)"
    };
    let unsupported = [
        (p.keep_log.is_some(), "--keep-log"),
        (p.output_log.is_some(), "--output-log"),
        (args.snapshot_at.is_some(), "--snapshot-at"),
    ];
    if let Some((_, with)) = unsupported.iter().find(|(on, _)| *on) {
        return Err(CmdError::Input(format!(
            "{what} cannot be combined with {with} yet"
        )));
    }
    let spares = failover::lineage::parse_spares(&p.spare).map_err(CmdError::Input)?;
    let (Some(to), Some(ca), Some(cert), Some(key), Some(sock)) =
        (&p.protect_to, &p.ca, &p.cert, &p.key, &args.api_socket)
    else {
        return Err(CmdError::Input(format!(
            "{what} needs --protect-to, --ca, --cert, --key and --api-socket"
        )));
    };
    let abs = super::migrate::absolute;
    let req = ProtectRequest {
        to: MigrateRequest {
            to: to.clone(),
            server_name: p.server_name.clone(),
            ca: abs(ca)?,
            cert: abs(cert)?,
            key: abs(key)?,
            downtime_ms: Some(DEFAULT_DOWNTIME_MS),
            max_bandwidth: None,
        },
        heartbeat_ms: p.failover.heartbeat_ms,
        failover_timeout_ms: p.failover.failover_timeout_ms,
        arbiter: p.failover.arbiter.clone(),
        spares,
        lag: Some(p.lag.clone()),
    };
    let host_net = net::open(args.vm.net.net.as_ref())?;
    let config = vm_config(&args.vm, host_net.as_ref())?;
    let console = console::open(&args.vm.serial)?;
    let mut machine = boot(&config)?;
    let inputs = net::live_inputs(0, console, host_net.as_ref());
    super::migrate::run_with_api_as(&mut machine, inputs, sock, true, |ctl| {
        let ctl = ctl.clone();
        let spawned = std::thread::Builder::new()
            .name("protect".into())
            .spawn(move || protect_at_start(&ctl, &req));
        if let Err(e) = spawned {
            eprintln!("tandem: cannot start protecting the VM: {e}");
            std::process::exit(125);
        }
    })
}

/// Seed the paused VM, then let it run; a VM that cannot be protected
/// never runs (the process ends with status 1).
fn protect_at_start(ctl: &primary::migration::VmController, req: &ProtectRequest) {
    match crate::spare::protect(ctl, req, true, &mut |_| {}) {
        Ok(r) => {
            let spares = if req.spares.is_empty() {
                "none".to_string()
            } else {
                req.spares.join(", ")
            };
            eprintln!(
                "tandem: protected by the secondary {} from exit {} (seeded in {:.1} ms before the first instruction); spares {spares}",
                r.secondary, r.start_exit, r.total_ms,
            );
            if let Err(e) = ctl.resume() {
                eprintln!("tandem: starting the protected VM: {e}");
                std::process::exit(125);
            }
        }
        Err(e) => {
            eprintln!(
                "tandem: protecting the VM at {} failed: {e}; it never ran",
                req.to.to
            );
            std::process::exit(1);
        }
    }
}
