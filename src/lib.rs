//! `backfill`: safe, resumable, exactly-once data backfills on live PostgreSQL.
//!
//! A job (`jobs/<name>.toml`) names a table, its key and a statement over one key range
//! (`:start`..`:end`). The engine walks the key's index in chunks; each chunk is one short
//! transaction that runs the statement and advances the job's checkpoint, so a committed chunk is
//! never re-applied and an interrupted run resumes exactly where it stopped.
//!
//! One chunk's path, top to bottom: [`job`] (file → spec) → [`keyset`] (key checked against the
//! catalog; bounds SQL) → [`executor`] (claim, chunk loop, verify) → [`store`] (checkpoint,
//! history, lease). [`db`] owns connections and error classification; [`signals`] the clean stop;
//! [`telemetry`] what the operator sees; [`throttle`] how fast a run may go; [`migrator`] the gate;
//! [`finish`] the schema steps run after a backfill (`finish_sql`); [`plan`] the review before a
//! run; [`pgtemp`] throwaway servers for the demo, the tests and the benchmarks; [`out`] writes
//! stdout and stderr (a closed pipe is a normal end, never a panic).

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
