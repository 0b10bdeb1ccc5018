//! The side that receives: replay (the logged half of the determinism
//! boundary), acknowledgements, the migration destination and go-live.

pub mod migration;
pub mod replay;
pub mod lockstep;
