//! The subcommands.

mod certs;
mod dump;
mod lockstep;
mod migrate;
mod progress;
mod protect;
mod receive;
mod record;
mod replay;
mod run;

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
}

impl CmdError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CmdError::Input(_) => 2,
            CmdError::GuestCrash(_) => 126,
            CmdError::Internal(_) => 125,
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
            other => CmdError::Internal(other.to_string()),
        }
    }
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
        Command::Pause(args) => migrate::pause(args, true),
        Command::Resume(args) => migrate::pause(args, false),
        Command::GuestElf(args) => migrate::guest_elf(args),
        Command::Secondary(args) => lockstep::secondary(args),
    }
}
