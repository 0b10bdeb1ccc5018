//! The side that receives: replay (the logged half of the determinism
//! boundary), acknowledgements, the migration destination and go-live.

pub mod lockstep;
pub mod migration;
pub mod replay;
