//! The run's settings: what `backfill run` may override of the job (`RunOptions`), and their
//! defaults. Owns no behaviour; the run resolves each setting against the job where it uses it.

use std::time::Duration;

/// Per-run settings; `None` means "use the job's value".
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub allow_changed_definition: bool,
    pub lock_timeout: Option<Duration>,
    pub statement_timeout: Option<Duration>,
    pub chunk_rows: Option<u32>,
    /// Attempts per chunk when a single key exceeds the statement timeout, before the run fails.
    pub max_attempts: u32,
    /// How long one chunk may keep meeting lock contention (lock timeouts, deadlocks,
    /// serialization failures) before the run fails; `None`: the job's, else the default.
    pub contention_budget: Option<Duration>,
    pub verify_timeout: Duration,
    /// How long to keep waiting for a database that went away.
    pub reconnect_for: Duration,
    /// Overrides of the job's `[throttle]` settings.
    pub rows_per_second: Option<u32>,
    /// Zero turns adaptation off.
    pub target_chunk_time: Option<Duration>,
    pub pause: Option<Duration>,
    /// Workers of this run, each with its own connection and key range.
    pub workers: u32,
    /// A canary run: stop starting chunks once this run's committed keys reach this many.
    pub limit: Option<u64>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            allow_changed_definition: false,
            lock_timeout: None,
            statement_timeout: None,
            chunk_rows: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            contention_budget: None,
            verify_timeout: DEFAULT_VERIFY_TIMEOUT,
            reconnect_for: DEFAULT_RECONNECT_FOR,
            rows_per_second: None,
            target_chunk_time: None,
            pause: None,
            workers: 1,
            limit: None,
        }
    }
}

pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// An application transaction may hold a row for minutes (a batch job, a slow request): the
/// run outlasts that rather than needing an operator.
pub const DEFAULT_CONTENTION_BUDGET: Duration = Duration::from_secs(600);
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_RECONNECT_FOR: Duration = Duration::from_secs(300);
/// The most workers one run may start (each holds a connection).
pub const MAX_WORKERS: u32 = 64;
