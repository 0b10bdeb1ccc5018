//! The subcommands.

mod certs;
mod drill;
mod dump;
mod failover_api;
mod golive;
mod live_api;
mod lockstep;
mod migrate;
mod progress;
mod protect;
mod protect_running;
mod receive;
mod record;
mod replay;
mod run;
mod run_spares;

use vmm::run::RunError;

use crate::cli::{Cli, Command};

/// Why a command failed; each maps to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// Bad input named in the message (status 2).
    #[error("{0}")]
    Input(String),
    /// The guest crashed (status 126).
    #[error("{0}")]
    GuestCrash(RunError),
    /// Tandem itself failed (status 125).
    #[error("{0}")]
    Internal(String),
    /// A host I/O error on the disk image stopped the VM (status
    /// [`DISK_ERROR_STATUS`]); the message names the image, the operation
    /// and the OS error.
    #[error("{0}")]
    DiskIo(String),
}

/// Exit status of a VM stopped by a host disk error without a control
/// socket to pause it on (and of a replay stopped by one).
pub const DISK_ERROR_STATUS: i32 = 123;

impl CmdError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CmdError::Input(_) => 2,
            CmdError::GuestCrash(_) => 126,
            CmdError::Internal(_) => 125,
            CmdError::DiskIo(_) => DISK_ERROR_STATUS,
        }
    }
}

impl From<RunError> for CmdError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Emulation { .. }
            | RunError::TripleFault { .. }
            | RunError::FailEntry { .. }
            | RunError::Unexpected { .. } => CmdError::GuestCrash(e),
            RunError::DiskIo { exit_seq, source } => CmdError::DiskIo(format!(
                "{source}; the VM is stopped at exit {exit_seq}: the request was not completed and the guest saw no error, the image holds every write the guest was told had completed (as after a power cut at that exit). Run the VM with --api-socket to pause it on such errors and `tandem resume` once the cause is fixed"
            )),
            other => CmdError::Internal(other.to_string()),
        }
    }
}

/// Load `--ca --cert --key`; the name we announce is the certificate's
/// file stem (`default` if it has none).
pub fn load_creds(
    c: &crate::cli::CredsArgs,
    default: &str,
) -> Result<(failover::certs::Credentials, String), CmdError> {
    let creds = failover::certs::Credentials::load(&c.ca, &c.cert, &c.key)
        .map_err(|e| CmdError::Input(format!("loading credentials: {e}")))?;
    let name = c
        .cert
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| default.into());
    Ok((creds, name))
}

/// Run the chosen subcommand; returns the process exit status.
pub fn dispatch(cli: Cli) -> Result<i32, CmdError> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Restore(args) => run::restore(args),
        Command::Record(args) => record::record(args),
        Command::Replay(args) => replay::replay(args),
        Command::DumpLog(args) => dump::dump_log(args),
        Command::Certs(c) => certs::certs(c),
        Command::Receive(args) => receive::receive(args),
        Command::Migrate(args) => migrate::migrate(args),
        Command::Status(args) => migrate::status(args),
        Command::Failover(args) => failover_api::failover(args),
        Command::Pause(args) => migrate::pause(args, true),
        Command::Resume(args) => migrate::pause(args, false),
        Command::GuestElf(args) => migrate::guest_elf(args),
        Command::Secondary(args) => lockstep::secondary(args),
        Command::Drill(args) => drill::drill(args),
        Command::Protect(args) => protect_running::protect(args),
        Command::Unprotect(args) => protect_running::unprotect(args),
        Command::Switchover(args) => protect_running::switchover(args),
    }
}

/// `--heartbeat-ms`, `--failover-timeout-ms` and `--arbiter` of a protected
/// primary (`name`: its certificate's name, for the arbiter's claim).
pub fn failover_params(
    a: &crate::cli::FailoverArgs,
    name: &str,
) -> Result<primary::failover::FailoverParams, CmdError> {
    let timing = failover::heartbeat::Timing::from_ms(a.heartbeat_ms, a.failover_timeout_ms)
        .map_err(|e| CmdError::Input(e.to_string()))?;
    let arbiter = a
        .arbiter
        .as_deref()
        .map(failover::arbiter::open)
        .transpose()
        .map_err(|e| CmdError::Input(e.to_string()))?;
    Ok(primary::failover::FailoverParams {
        timing,
        protection: failover::heartbeat::Protection {
            vm_id: failover::heartbeat::new_vm_id(name.as_bytes()),
            generation: 1,
            heartbeat_ms: a.heartbeat_ms,
        },
        arbiter_id: arbiter.as_ref().map(|o| o.identity.clone()),
        arbiter: arbiter.map(|o| std::sync::Arc::from(o.arbiter)),
        holder: format!("primary {name} (pid {})", std::process::id()),
        on_alone: None,
    })
}
