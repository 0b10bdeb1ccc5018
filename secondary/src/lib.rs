//! The side that receives: replay (the logged half of the determinism
//! boundary), acknowledgements, the migration destination and go-live.

// Every unsafe block says why it is sound (`// SAFETY:`).
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod lockstep;
pub mod migration;
pub mod repair;
pub mod replay;
pub mod seed;
pub mod watch;
