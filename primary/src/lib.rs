//! The side that runs the VM and sends: recording (the live half of the
//! determinism boundary), log streaming, the output rule and the migration
//! source.

// Every unsafe block says why it is sound (`// SAFETY:`).
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod failover;
pub mod held_audit;
pub mod lag;
pub mod lockstep;
pub mod migration;
pub mod protect;
pub mod record;
pub mod status;
