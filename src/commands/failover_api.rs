//! Test failover (issue 10, `docs/failover.md`): `tandem failover --api
//! SOCK` asks the protected primary on SOCK (`tandem run --protect-to
//! --api-socket SOCK`, or a VM protected with `tandem protect`) to stop as
//! if its host died. The control socket (`crate::api`) answers `ok`, then
//! the process SIGKILLs itself, so nothing is said to the secondary, no
//! held output leaves and nothing is cleaned up. The secondary sees what it
//! sees after a real failure: silence, then its failover timeout.

use super::CmdError;
use crate::api::{self, Request};
use crate::cli::FailoverCmdArgs;

/// `tandem failover --api SOCK`.
pub fn failover(args: FailoverCmdArgs) -> Result<i32, CmdError> {
    api::call_ok(&args.api, &Request::Failover).map_err(answer_error)?;
    println!("the primary stopped as if its host died; its secondary goes live after its failover timeout");
    Ok(0)
}

/// A control request that was not answered `ok`, as a command error.
pub fn answer_error(e: api::CmdAnswer) -> CmdError {
    match e {
        api::CmdAnswer::Socket(m) => CmdError::Input(m),
        api::CmdAnswer::Refused(m) => CmdError::Internal(m),
    }
}
