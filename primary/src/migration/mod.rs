//! Planned live migration, source side.
//!
//! [`control`] lets other threads pause, resume, freeze and throttle a VM
//! whose vCPU thread runs [`control::run_controlled`]; [`migrate`] moves
//! that VM to a `tandem receive` over the authenticated channel: iterative
//! pre-copy of memory and disk while the guest runs, auto-converge if it
//! dirties faster than the link drains, stop-and-copy, and the end of the
//! source only once the destination confirms it runs the guest. Any failure
//! before that confirmation resumes the guest here as if nothing happened.
//! [`move_disk`] moves the VM's disk to another image on the same host
//! without moving the VM (the same pre-copy, into a file).
//! The protocol is described in `docs/migration.md`.

pub mod control;
mod diskmove;
mod pipeline;
mod precopy;
mod source;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use control::{controller, run_controlled, ControlledOutcome, VmController, VmStatus};
pub use diskmove::{move_disk, DiskMoveError, DiskMoveParams, DiskMoveReport};
pub use source::migrate;
pub(crate) use source::{seed, Seeding};

use failover::certs::Credentials;

/// What `tandem migrate` asked for.
#[derive(Debug, Clone)]
pub struct MigrationParams {
    /// The destination (`tandem receive --listen`).
    pub to: SocketAddr,
    /// The name the destination's certificate must carry.
    pub server_name: String,
    /// Our cluster credentials.
    pub creds: Credentials,
    /// Our name, announced in the channel's `Hello`.
    pub name: String,
    /// Largest acceptable pause of the guest.
    pub downtime: Duration,
    /// Cap on the sending rate, bytes per second.
    pub max_bandwidth: Option<u64>,
}

/// Progress of a migration (for `tandem status` and `tandem migrate`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// `connecting`, `precopy`, `switchover`, `done`; for a local disk
    /// move `disk-copy`, `disk-switch`, `disk-done`.
    pub phase: String,
    /// Pre-copy round (0 = the full first pass).
    pub round: u32,
    /// The last round the destination has acknowledged (applied). Rounds
    /// are streamed: the source does not wait for a round's
    /// acknowledgement before the next, so this may lag `round` by several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_round: Option<u32>,
    /// Bytes sent on the wire so far (UDP payload, QUIC and TLS included).
    pub bytes_sent: u64,
    /// Guest pages sent so far (zero pages of the first pass are skipped).
    pub pages_sent: u64,
    /// Disk bytes sent so far.
    pub disk_bytes_sent: u64,
    /// Pages the guest dirtied during the last round.
    pub dirty_pages: u64,
    /// Pages dirtied per second during the last round.
    pub dirty_rate: f64,
    /// Disk blocks (64 KiB) written by the guest during the last round
    /// (local disk moves).
    #[serde(default)]
    pub dirty_blocks: u64,
    /// Measured drain rate of the link (bytes/s).
    pub bandwidth: f64,
    /// Estimated pause if the switchover happened now (ms).
    pub estimated_downtime_ms: f64,
    /// Auto-converge: percentage of time the guest is held (0 = none).
    pub throttle_pct: u32,
    /// Time the guest was held by auto-converge so far (ms).
    #[serde(default)]
    pub throttled_ms: f64,
    /// Time since the migration started (ms).
    pub elapsed_ms: f64,
    /// Said once, up front: the downtime target cannot be met on this
    /// link, and what is aimed at instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The summary of a finished migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Where the VM runs now (`name at address`).
    pub destination: String,
    /// From the request to the destination's confirmation (ms).
    pub total_ms: f64,
    /// The guest's pause: from its stop here to its start there (ms); the
    /// confirmation's trip back (half the round trip) is not counted.
    pub downtime_ms: f64,
    /// From the guest's stop here to the destination's `Running` (ms).
    #[serde(default)]
    pub confirmed_ms: f64,
    /// The downtime aimed at (ms): the target asked for, or more when the
    /// link cannot meet it (see `note`).
    #[serde(default)]
    pub target_ms: f64,
    /// UDP bytes sent by the source (QUIC/TLS framing included).
    pub bytes_on_wire: u64,
    /// UDP bytes received by the source (acknowledgements).
    pub bytes_received: u64,
    /// Pre-copy rounds, the stop-and-copy not counted.
    pub rounds: u32,
    /// Guest pages sent in all (each send counted).
    pub pages_sent: u64,
    /// Pages sent during the stop-and-copy.
    pub final_pages: u64,
    /// Disk bytes sent.
    pub disk_bytes_sent: u64,
    /// The destination reached the source's own image (same file: one host
    /// under another address, or shared storage): only memory moved.
    #[serde(default)]
    pub disk_shared: bool,
    /// Highest auto-converge throttle used (%).
    pub max_throttle_pct: u32,
    /// Time the guest was held by auto-converge (ms), besides the downtime.
    #[serde(default)]
    pub throttled_ms: f64,
    /// Did pre-copy reach the downtime target (else: forced switchover)?
    pub converged: bool,
    /// The VM was paused (`tandem pause`) and arrived paused.
    #[serde(default)]
    pub paused: bool,
    /// The downtime target could not be met on this link (said up front).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Why a migration failed. The guest goes on on the source as it was
/// (running, or paused).
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cancelled by the operator")]
    /// The operator cancelled the migration.
    Cancelled,
    #[error("a migration is already in progress")]
    /// Another migration is in progress.
    Busy,
    #[error("the guest ended on the source before the switchover")]
    /// The guest ended before the switchover.
    VmEnded,
    /// This VM cannot be migrated (the reason).
    #[error("{0}")]
    NotMigratable(&'static str),
    /// The VM is protected: moving it elsewhere would leave its secondary
    /// to take the VM over beside the migrated copy.
    #[error("this VM is protected by the secondary {0}: migrated elsewhere, that secondary would find its primary gone and go live beside the migrated VM (two live copies); to move it to that secondary's host, `tandem switchover` (no copy); elsewhere: end the protection first (tandem unprotect), migrate, then protect it again from its new host")]
    Protected(String),
    #[error("cannot connect to the destination {addr}: {source}")]
    /// The destination could not be reached.
    Connect {
        /// The destination's address.
        addr: SocketAddr,
        /// Why.
        source: failover::channel::ChannelError,
    },
    #[error("the destination refused the VM: {0}")]
    /// The destination refused the VM (its reason).
    Refused(String),
    #[error("the destination aborted the migration: {0}")]
    /// The destination aborted (its reason).
    Aborted(String),
    #[error("lost the destination: {0}")]
    /// The channel to the destination failed.
    Channel(#[from] failover::channel::ChannelError),
    #[error("the destination did not confirm within {0:?}")]
    /// The destination did not confirm the switchover in time.
    NoConfirmation(Duration),
    #[error("reading the VM for migration: {0}")]
    /// The VM's state could not be read here.
    Source(String),
    #[error("protocol error: {0}")]
    /// The destination broke the protocol.
    Protocol(String),
    #[error("the switchover's outcome is unknown ({0}): the destination may be running the VM, so it is kept paused here to never run two copies; check the destination, and `tandem resume` here only if the VM does not run there")]
    /// The switchover's outcome is unknown: the VM stays paused here.
    InDoubt(String),
}
