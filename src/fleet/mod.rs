//! Fleets: one job over many databases (shards), each with the engine's schema, checkpoint and
//! gate of its own; no state outside the shards. Owns the fleet file and running a command on
//! every shard; never a shard's checkpoint (each shard's engine owns its own).

pub mod file;

pub use file::{load, Fleet, Shard, ShardSettings, DEFAULT_MAX_PARALLEL};
