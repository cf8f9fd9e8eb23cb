//! The checkpoint protocol driven through its ports by in-memory stand-ins: crashes at every
//! record and every store write, cut-off owners, random histories against a model, and the
//! counts of records a checkpoint sends and a restore reads.

mod cost;
mod crash_points;
mod damage;
mod model;
mod support;
mod zombie;
