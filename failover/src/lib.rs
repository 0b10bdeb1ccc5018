//! Tandem's failover machinery: cluster certificates and the authenticated
//! channel between hosts (heartbeats, failure detection, arbiter and roles
//! build on these).

pub mod certs;
pub mod channel;
pub mod lockstep;
pub mod migration;
