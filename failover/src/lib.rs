//! Tandem's failover machinery: cluster certificates and the authenticated
//! channel between hosts (heartbeats, failure detection, arbiter and roles
//! build on these).

// Every unsafe block says why it is sound (`// SAFETY:`).
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod arbiter;
pub mod certs;
pub mod channel;
pub mod heartbeat;
pub mod lineage;
pub mod lockstep;
pub mod migration;
