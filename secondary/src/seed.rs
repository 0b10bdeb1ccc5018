//! Seeding: a secondary that takes a VM which already runs on its primary
//! (`tandem protect`). The bootstrap is the migration's own transfer
//! (`crate::migration`: memory and disk pre-copy, the final pages and
//! blocks, the machine state), taken on the lockstep connection; at its
//! `SwitchoverReady` the VM is restored here but never run live: it is
//! confirmed with `Running` and then replayed from the primary's log,
//! which starts at the seed's exit. See `failover::lockstep`.

use std::path::PathBuf;

use failover::channel::{BlockingConnection, Message};
use failover::lockstep::kind;
use failover::migration::{Accepted, DiskPlan, Header};
use vmm::machine::Machine;

use crate::migration::disk::DestDisk;
use crate::migration::{
    abort, accept_header, prepare, transfer, ReceiveError, ReceiveOptions, TransferError,
};

/// The VM as the seed left it, ready to replay the log from its exit.
pub struct Seeded {
    /// The restored VM (at the exit where the primary started recording).
    pub machine: Machine,
    /// Pre-copy rounds the primary made.
    pub rounds: u32,
    /// Where its disk is here.
    pub disk: Option<PathBuf>,
}

/// Accept the seed announced by `header` on `conn` (the lockstep header was
/// checked): the disk goes to `disk` (staged, put in place only once the
/// seed is complete). On success the primary has our `Running`.
pub(crate) fn receive(
    conn: &mut BlockingConnection,
    header: &Header,
    disk: Option<PathBuf>,
) -> Result<Seeded, ReceiveError> {
    let opts = ReceiveOptions {
        disk,
        replica: true,
        ..Default::default()
    };
    let dest = match accept_header(header, &opts) {
        Ok(x) => x,
        Err(reason) => {
            abort(conn, &reason);
            return Err(ReceiveError::Refused(reason));
        }
    };
    let accepted = Accepted {
        disk: dest.as_ref().map_or(DiskPlan::None, DestDisk::plan),
    };
    let bytes = postcard::to_stdvec(&accepted).map_err(|e| ReceiveError::Local(e.to_string()))?;
    conn.send_frame(kind::ACCEPTED, &bytes)?;
    // Dropped on any failure below: the files go back to how they were.
    let mut dest = dest;
    // Created while the primary reads and encodes its first round.
    let incoming = match prepare(header) {
        Ok(incoming) => incoming,
        Err(reason) => {
            abort(conn, &reason);
            return Err(ReceiveError::Local(reason));
        }
    };
    match transfer(conn, incoming, &mut dest, &opts) {
        Ok((machine, _state, rounds, _paused)) => {
            conn.send_msg(&Message::Running)?;
            let disk = dest.as_ref().map(|d| d.place().to_path_buf());
            if let Some(d) = dest {
                d.keep();
            }
            Ok(Seeded {
                machine,
                rounds,
                disk,
            })
        }
        Err(TransferError::Local(reason)) => {
            abort(conn, &reason);
            Err(ReceiveError::Local(reason))
        }
        Err(TransferError::Remote(e)) => Err(e),
    }
}
