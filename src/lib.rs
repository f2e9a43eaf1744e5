//! `backfill`: safe, resumable, exactly-once data backfills on live PostgreSQL.
//!
//! A job (`jobs/<name>.toml`) names a table, its key and a statement over one key range
//! (`:start`..`:end`). The engine walks the key's index in chunks; each chunk is one short
//! transaction that runs the statement and advances the job's checkpoint, so a committed chunk is
//! never re-applied and an interrupted run resumes exactly where it stopped.
//!
//! One chunk's path, top to bottom: `job::spec` (`jobs/NAME.toml` → a validated `JobSpec`,
//! offline) → [`keyset`] (`catalog`: the key checked against the catalog → a `Keyset`; `walk`:
//! the bounds query) → `executor::chunk` (a `ChunkPlan` of every statement of a chunk's
//! transaction, built once per run, and the transaction itself, where the exactly-once rule is
//! stated and enforced) → `executor::recovery` (what a failed attempt leads to: a pure function)
//! → `executor::pace` and [`throttle`] (the next chunk's size and when it may start).
//!
//! Dependency order, each layer using only those before it (no import circles):
//! `sql`, `error`, `state`, `backoff`, `hold`, `out`, `pgtemp` → `job` → `db` → `keyset` →
//! `store` → `events` → `undo`, `migrator`, `finish` → `resolve`, `plan`, `throttle`, `signals` →
//! `telemetry`, `executor` → `fleet`, `demo`, `cli` → `app`.
//!
//! - [`sql`]: identifier quoting, table names, the one SQL tokenizer, the `:start`/`:end` template.
//! - [`error`]: the error type (kind → exit code; a database error keeps its class, SQLSTATE,
//!   driver error and context; a run's stop at a chunk or at start-up is a value with fields, its
//!   database error kept). [`state`]: job states, phases, run outcomes and step states as
//!   enums, their SQL text, and every decision on them. [`backoff`]: the one retry backoff.
//! - [`job`]: job files, parsed and validated offline. [`db`]: connections, TLS, SQLSTATE
//!   classes, the one place timeouts are set. [`keyset`]: keys, the catalog checks, the one
//!   bounds query (runs and plans).
//! - [`store`]: every statement on the engine's schema but a chunk's own (checkpoints, joining,
//!   runs, ranges, leases, phases, controls, failures, schema migrations). [`undo`]: undo data and
//!   reverts. [`migrator`]: preconditions, the gate, each migrator's history. [`finish`]: the
//!   schema steps after a backfill. [`resolve`]: a job checked against its project (steps,
//!   revisions). [`plan`]: the review before a run.
//! - [`events`]: what a run and its finishing steps report, as typed events; [`telemetry`]
//!   listens (progress, log lines, metrics) and writes the sentences. [`hold`]: why a run is held,
//!   typed, with the one sentence `status` and the log show for it. [`throttle`]: rate, chunk
//!   size, health signals. [`signals`]: the clean stop.
//! - [`executor`]: a run (join → key range → workers → verify/sweep → record), its workers, the
//!   chunk and the recovery policy. [`fleet`]: one job over many databases (the fleet file, a
//!   command on every shard). [`app`] and [`cli`]: the commands. [`demo`], [`pgtemp`]:
//!   throwaway servers. [`out`]: stdout and stderr (a closed pipe is a normal end, never a panic).

// The library's `println!` and friends: a closed stdout (`backfill status | head -1`) ends the
// output quietly instead of panicking (see `out`). Defined before the modules so that their
// textual scope covers all of them. Unit tests keep the standard macros, whose output the test
// harness captures.
#[cfg(not(test))]
macro_rules! println {
    () => { $crate::out::stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::stdout(format_args!("{}\n", format_args!($($arg)*))) };
}
#[cfg(not(test))]
#[allow(unused_macros)]
macro_rules! print {
    ($($arg:tt)*) => { $crate::out::stdout(format_args!($($arg)*)) };
}
#[cfg(not(test))]
macro_rules! eprintln {
    () => { $crate::out::stderr(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::stderr(format_args!("{}\n", format_args!($($arg)*))) };
}
#[cfg(not(test))]
#[allow(unused_macros)]
macro_rules! eprint {
    ($($arg:tt)*) => { $crate::out::stderr(format_args!($($arg)*)) };
}

pub mod app;
pub mod backoff;
pub mod cli;
pub mod db;
pub mod demo;
pub mod error;
pub mod events;
pub mod executor;
pub mod finish;
pub mod fleet;
pub mod hold;
pub mod job;
pub mod keyset;
pub mod migrator;
pub mod out;
pub mod pgtemp;
pub mod plan;
pub mod resolve;
pub mod signals;
pub mod sql;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod throttle;
pub mod undo;

pub use error::{Error, Result};
