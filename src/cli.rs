//! Command-line types (clap) only: commands, their flags, and the connection options every
//! command shares. Behaviour lives in `app`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "backfill",
    version,
    about = "Safe, resumable, exactly-once data backfills on live PostgreSQL"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// PostgreSQL URL or key=value string; else DATABASE_URL (unless --fleet is given); else
    /// the libpq variables (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE,
    /// PGSSLROOTCERT).
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// A fleet file: the command runs on every shard (database) it lists, see the README's
    /// "Fleets"; else BACKFILL_FLEET (unless --database-url is given). Excludes --database-url.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        conflicts_with = "database_url"
    )]
    pub fleet: Option<PathBuf>,
    /// Directory holding the job files (<name>.toml).
    #[arg(long, global = true, default_value = "jobs", env = "BACKFILL_JOBS")]
    pub jobs: PathBuf,
    /// Schema holding the engine's own tables.
    #[arg(
        long,
        global = true,
        default_value = "backfill",
        env = "BACKFILL_SCHEMA"
    )]
    pub schema: String,
    /// Log lines (and the non-terminal progress line) as text or JSON objects.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn duration(s: &str) -> Result<Duration, String> {
    crate::job::parse_duration(s)
}

/// A duration that becomes a server timeout: at most PostgreSQL's limit (INT_MAX ms).
fn timeout(s: &str) -> Result<Duration, String> {
    crate::job::parse_server_timeout(s)
}

fn duration_or_zero(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. \"0s\", \"15s\""))
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a job, or resume it where it stopped.
    Run(RunArgs),
    /// Show progress: state, rows and chunks done, cursor, rate, timestamps, last error.
    Status {
        /// One job (default: every job with a checkpoint or a file).
        name: Option<String>,
        /// Machine-readable output: JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the jobs under --jobs with their state.
    List {
        /// Machine-readable output: JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Validate job files without touching a database.
    Check {
        /// One job (default: all).
        name: Option<String>,
    },
    /// Exit 0 only when the job is done and its verify query returns 0 now; else exit 3.
    Gate {
        name: String,
        /// Machine-readable output: JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Longest the verify query may run.
        #[arg(long, value_parser = timeout, default_value = "5m")]
        verify_timeout: Duration,
    },
    /// Review a job before it runs: the first chunk's SQL, estimates, and findings (EXPLAIN,
    /// idempotency, indexes, triggers, long transactions). Rolls back everything; exit 2 on errors.
    Plan {
        name: String,
        /// Machine-readable output: JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Longest the verify query may run for the estimate of rows to do.
        #[arg(long, value_parser = timeout, default_value = "5s")]
        verify_timeout: Duration,
        /// Report transactions open longer than this.
        #[arg(long, value_parser = duration, default_value = "5m")]
        long_transaction: Duration,
    },
    /// Hold a running job before its next chunk (from any host); `resume` lets it go on.
    Pause { name: String },
    /// Let a paused job go on.
    Resume { name: String },
    /// Stop a running job after its current chunk; state `cancelled`, progress kept.
    Cancel { name: String },
    /// Change a job's throttle while it runs (kept for its later runs until dropped or until the
    /// job completes); prints each setting's value in effect and where it comes from.
    Set(SetArgs),
    /// List a job's runs (start and end, host, pid, rows, chunks, outcome, and the run's error),
    /// then who paused, resumed, cancelled or set the job, from where, when, and what.
    History {
        name: String,
        /// Machine-readable output: JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the keys a job skipped as failing (on_error = "skip"), with their errors. A run that
    /// stops at a failing key (on_error = "stop") records none here: its error, also shown by
    /// `backfill history NAME`, names the key.
    Failures {
        name: String,
        /// Include resolved failures.
        #[arg(long)]
        all: bool,
        /// Machine-readable output: JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Re-run the job's statement for its failing keys only; exit 0 when all now succeed.
    RetryFailures { name: String },
    /// Undo a job: run its `down_sql`, or put back the values kept by `undo`, chunk by chunk
    /// (checkpointed and throttled like a run; Ctrl-C and run again to resume).
    Revert(RunArgs),
    /// Drop a job's undo data (after the change is kept for good, or after a revert).
    DropUndo {
        name: String,
        /// Required: confirms that the values kept for a revert are to be deleted.
        #[arg(long)]
        yes: bool,
    },
    /// Forget a job's progress so the next run starts over (history is kept).
    Reset {
        name: String,
        /// Required: confirms that progress is to be forgotten.
        #[arg(long)]
        yes: bool,
    },
    /// Create or upgrade the engine's schema, so runs need only ordinary privileges.
    Init {
        /// Also grant ROLE what a run needs on the engine's schema.
        #[arg(long, value_name = "ROLE")]
        grant_to: Vec<String>,
        /// Also let ROLE (a migration's) call the SQL gate `assert_done`, and read nothing else.
        #[arg(long, value_name = "ROLE")]
        grant_gate_to: Vec<String>,
    },
    /// Run the sample job on a throwaway local PostgreSQL (or the given database).
    Demo {
        /// Rows in the demo's orders table.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
    },
}

/// Where a command runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// One database: this URL, else the libpq variables.
    Database(Option<String>),
    /// Every shard of this fleet file.
    Fleet(PathBuf),
}

impl Global {
    /// The command line first, then the environment: a `--fleet` or `--database-url` given
    /// wins over the other's variable (`DATABASE_URL` exported for other tools does not stand
    /// in the way of `--fleet`); both variables set and neither flag is ambiguous.
    pub fn place(&self) -> Result<Place, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        match (&self.fleet, &self.database_url) {
            (Some(fleet), _) => Ok(Place::Fleet(fleet.clone())),
            (None, Some(url)) => Ok(Place::Database(Some(url.clone()))),
            (None, None) => match (var("BACKFILL_FLEET"), var("DATABASE_URL")) {
                (Some(_), Some(_)) => Err("both BACKFILL_FLEET and DATABASE_URL are set: pass --fleet FILE or --database-url URL to say which".into()),
                (Some(fleet), None) => Ok(Place::Fleet(PathBuf::from(fleet))),
                (None, url) => Ok(Place::Database(url)),
            },
        }
    }
}

impl Command {
    /// The job a command is about, if it is about one (named in its final log line).
    pub fn job_name(&self) -> Option<&str> {
        match self {
            Command::Run(a) | Command::Revert(a) => Some(&a.name),
            Command::Set(a) => Some(&a.name),
            Command::Status { name, .. } | Command::Check { name } => name.as_deref(),
            Command::Gate { name, .. }
            | Command::Plan { name, .. }
            | Command::Pause { name }
            | Command::Resume { name }
            | Command::Cancel { name }
            | Command::History { name, .. }
            | Command::Failures { name, .. }
            | Command::RetryFailures { name }
            | Command::DropUndo { name, .. }
            | Command::Reset { name, .. } => Some(name),
            Command::List { .. } | Command::Init { .. } => None,
            Command::Demo { .. } => Some("demo"),
        }
    }
}

impl Command {
    /// The subcommand as typed, for messages.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Run(_) => "run",
            Command::Status { .. } => "status",
            Command::List { .. } => "list",
            Command::Check { .. } => "check",
            Command::Gate { .. } => "gate",
            Command::Plan { .. } => "plan",
            Command::Pause { .. } => "pause",
            Command::Resume { .. } => "resume",
            Command::Cancel { .. } => "cancel",
            Command::Set(_) => "set",
            Command::History { .. } => "history",
            Command::Failures { .. } => "failures",
            Command::RetryFailures { .. } => "retry-failures",
            Command::Revert(_) => "revert",
            Command::DropUndo { .. } => "drop-undo",
            Command::Reset { .. } => "reset",
            Command::Init { .. } => "init",
            Command::Demo { .. } => "demo",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Job name: the file stem of jobs/<name>.toml.
    pub name: String,
    /// Resume even though the job's table, key or sql changed since progress was saved.
    #[arg(long)]
    pub allow_changed_definition: bool,
    /// Override the job's lock_timeout (e.g. 500ms).
    #[arg(long, value_parser = timeout)]
    pub lock_timeout: Option<Duration>,
    /// Override the job's statement_timeout (e.g. 30s).
    #[arg(long, value_parser = timeout)]
    pub statement_timeout: Option<Duration>,
    /// Override the job's chunk_rows.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub chunk_rows: Option<u32>,
    /// Workers in this process, each with its own connection and key range (other processes,
    /// on any host, may run the same job at once).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=crate::executor::MAX_WORKERS as i64))]
    pub workers: u32,
    /// A canary run: stop (resumable, exit 0) once this run has committed about ROWS keys —
    /// whole chunks, counted over all of its workers.
    #[arg(long, value_name = "ROWS", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// Run even while another job's live run is walking the same table (refused by default,
    /// exit 3).
    #[arg(long)]
    pub allow_shared_table: bool,
    /// Attempts per chunk when a single key exceeds statement_timeout.
    #[arg(long, default_value_t = crate::executor::DEFAULT_MAX_ATTEMPTS, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
    /// How long one chunk may keep meeting lock contention (lock timeouts, deadlocks,
    /// serialization failures), retried all along, before the run fails (default: the job's
    /// contention_budget, else 10m).
    #[arg(long, value_parser = duration)]
    pub contention_budget: Option<Duration>,
    /// Longest the final verify query may run.
    #[arg(long, value_parser = timeout, default_value = "5m")]
    pub verify_timeout: Duration,
    /// Rate ceiling in keys per second (overrides the job's throttle.rows_per_second).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rows_per_second: Option<u32>,
    /// Chunk time the chunk size adapts toward (e.g. 10ms); 0s keeps chunk_rows fixed.
    #[arg(long, value_parser = duration_or_zero)]
    pub target_chunk_time: Option<Duration>,
    /// Fixed pause between chunks (overrides throttle.pause).
    #[arg(long, value_parser = duration_or_zero)]
    pub pause: Option<Duration>,
    /// Serve Prometheus metrics on this address (a bare port binds 127.0.0.1); off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Keep the metrics endpoint up this long after the run ends, for a last scrape.
    #[arg(long, value_parser = duration_or_zero, default_value = "0s", requires = "metrics_addr")]
    pub metrics_linger: Duration,
    /// How often the progress line is printed when stderr is not a terminal.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub progress_interval: Duration,
    /// How long to keep waiting for a database that went away (restart, failover, network).
    #[arg(long, value_parser = duration, default_value = "5m")]
    pub reconnect_for: Duration,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// When the job's expand migration (or requires_sql) is not there yet, wait for it instead of
    /// exiting 3 — forever, or up to the given time (e.g. 30m) — so a deploy can start the runner
    /// first.
    #[arg(long, value_name = "TIMEOUT", num_args = 0..=1, default_missing_value = "0s", value_parser = duration_or_zero)]
    pub wait_for_expand: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    pub name: String,
    /// Rate ceiling in keys per second; `none` drops this override.
    #[arg(long, value_name = "N|none", value_parser = rate_setting)]
    pub rows_per_second: Option<Setting<u32>>,
    /// Chunk time the chunk size adapts toward (e.g. 10ms); 0s keeps the chunk size fixed;
    /// `none` drops this override.
    #[arg(long, value_name = "D|none", value_parser = duration_setting)]
    pub target_chunk_time: Option<Setting<Duration>>,
    /// Fixed pause between chunks (0s: no pause); `none` drops this override.
    #[arg(long, value_name = "D|none", value_parser = duration_setting)]
    pub pause: Option<Setting<Duration>>,
    /// Drop every override: the job file and run flags apply again.
    #[arg(long, conflicts_with_all = ["rows_per_second", "target_chunk_time", "pause"])]
    pub clear: bool,
}

/// What `backfill set` does to one setting: override it with a value, or drop its override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting<T> {
    To(T),
    /// `none`: the job file (or a run flag) applies again.
    Clear,
}

const NONE: &str = "none";

fn rate_setting(s: &str) -> Result<Setting<u32>, String> {
    if s.trim() == NONE {
        return Ok(Setting::Clear);
    }
    match s.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(Setting::To(n)),
        _ => Err(format!(
            "`{s}` is not a rate: write keys per second (1 or more), or `none` to drop the override"
        )),
    }
}

/// A duration `backfill set` stores in milliseconds (at most PostgreSQL's limit), 0s included.
fn duration_setting(s: &str) -> Result<Setting<Duration>, String> {
    if s.trim() == NONE {
        return Ok(Setting::Clear);
    }
    duration_or_zero(s)
        .and_then(|d| crate::job::check_stored_duration(s, d))
        .map(Setting::To)
        .map_err(|e| format!("{e}; or `none` to drop the override"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_takes_a_value_or_none_for_each_setting() {
        assert_eq!(rate_setting("500"), Ok(Setting::To(500)));
        assert_eq!(rate_setting("none"), Ok(Setting::Clear));
        assert!(rate_setting("0").unwrap_err().contains("`none`"));
        assert_eq!(duration_setting("0s"), Ok(Setting::To(Duration::ZERO)));
        assert_eq!(
            duration_setting("15ms"),
            Ok(Setting::To(Duration::from_millis(15)))
        );
        assert_eq!(duration_setting("none"), Ok(Setting::Clear));
        assert!(duration_setting("30days")
            .unwrap_err()
            .contains("2147483647ms"));
    }
}
