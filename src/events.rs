//! What a run tells the outside world, as typed events on one stream: the engine emits them
//! (`Listener::on`), and telemetry — the progress display, the log lines and the metrics —
//! listens. Owns only the vocabulary; it must not format operator text (telemetry does) nor
//! depend on the engine (the engine depends on it).

use crate::hold::{HoldReason, Shown};
use crate::state::JobState;
use crate::store::Controls;
use std::time::Duration;

/// One thing that happened in a run. Borrowed fields live as long as the emitting call.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// The database went away while the run was starting; it waits for up to `patience`.
    LostWhileStarting { error: &'a str, patience: Duration },
    /// The database answers again, and the run starts.
    BackWhileStarting,
    /// The run's earlier self was declared gone while the database was away.
    Rejoining { run_id: i64 },
    /// The table has no row estimate, so its key range cannot be split.
    NoEstimate { table: &'a str },
    /// The job's key range was fixed: keys up to `upper` (None: the table was empty).
    KeyRange {
        table: &'a str,
        upper: Option<&'a str>,
        rows: Option<i64>,
    },
    /// The run starts walking: rows already done, rows in all, the chunk size, its workers, the
    /// failing keys already recorded.
    RunStarted {
        done: u64,
        /// The sweep pass the run resumes or joins (None: the first pass), and the keys done in
        /// that pass (of `done`, which counts every pass).
        sweep: Option<i32>,
        pass_done: u64,
        total: Option<u64>,
        chunk_size: u64,
        workers: u32,
        /// The job's failing keys not yet resolved, as the store counted them at the start.
        failing_keys: u64,
    },
    /// A job with a single range resumes after this key.
    ResumingAfter { key: &'a str, rows_done: i64 },
    /// A job split into key ranges resumes.
    ResumingRanges {
        rows_done: i64,
        finished: usize,
        ranges: usize,
    },
    /// `verify` still counts rows and no (further) sweep will run: why.
    Incomplete { why: &'a str },
    /// `verify` counts `remaining` rows: sweep `pass` of at most `max` starts.
    Sweeping { remaining: i64, pass: i32, max: u32 },
    /// Another run completed the job meanwhile (its verify returned 0).
    CompletedElsewhere,
    /// The run ended in this state (as recorded in its history).
    RunEnded(JobState),
    /// `retry-failures`: the key now succeeds and is resolved.
    FailureResolved { key: &'a str },
    /// `retry-failures`: the key still fails.
    FailureRemains { key: &'a str, error: &'a str },
    /// A worker took a key range (a free one, or the upper half of a busy one).
    RangeTaken { worker: i32, range: i32 },
    /// A chunk committed with its checkpoint.
    ChunkCommitted {
        /// The chunk size it was run with (what its checkpoint records and `status` shows).
        size: u64,
        keys: u64,
        changed: u64,
        took: Duration,
        /// Round trips to the database the chunk waited for.
        round_trips: u32,
    },
    /// Rows done by every run of the job, as its checkpoint now says.
    JobRowsDone(u64),
    /// Application sessions waited on a chunk's locks: the chunks shrink to `size` keys.
    Yielded { blocked: i64, size: i64 },
    /// The chunk size now in use.
    ChunkSize(u64),
    /// The rate ceiling now in force (None: none).
    RateLimit(Option<u32>),
    /// `backfill set` changed the run's settings to these.
    SettingsChanged(&'a Controls),
    /// The largest replication lag of the standbys, in seconds.
    ReplicationLag(f64),
    /// Time the run spent held, booked under a metric `reason`.
    Held { reason: HoldReason, time: Duration },
    /// Why the run is held now (None: it is not held any more).
    HoldChanged(Option<&'a Shown>),
    /// The run waits for the database without a hold of the run's own (`status` is not told).
    WaitingForDatabase,
    /// An attempt at a chunk failed with this class (the metric's label).
    AttemptFailed { class: &'static str },
    /// The database went away while the run stops: nothing uncommitted was kept.
    LostWhileStopping { stage: &'a str, error: &'a str },
    /// The database went away; the run waits for it for up to `patience`.
    DatabaseLost {
        stage: &'a str,
        error: &'a str,
        patience: Duration,
    },
    /// The database answers again.
    DatabaseBack,
    /// A chunk failed; it is retried in chunks of `size` keys to narrow the failure down.
    Narrowed {
        chunk: &'a str,
        stage: &'a str,
        error: &'a str,
        size: i64,
    },
    /// A chunk at a single key exceeded the statement timeout; retried after `delay`.
    Retrying {
        chunk: &'a str,
        stage: &'a str,
        error: &'a str,
        delay: Duration,
        attempt: u32,
        max_attempts: u32,
    },
    /// A chunk met lock contention; retried after `delay`, for up to `budget` in all.
    Contended {
        chunk: &'a str,
        stage: &'a str,
        error: &'a str,
        so_far: Duration,
        delay: Duration,
        budget: Duration,
    },
    /// A worker's lock contention is over after `lasted`.
    ContentionOver { lasted: Duration },
    /// Recording a poison key as skipped was interrupted; it is tried again.
    SkipInterrupted { key: &'a str, error: &'a str },
    /// A poison key was recorded in the failures table and passed.
    Skipped {
        key: &'a str,
        error: &'a str,
        /// Not already recorded as failing: the job has one failing key more.
        newly_failing: bool,
    },
    /// Something happened to the job's finishing steps.
    Finishing(Finishing<'a>),
}

/// Which finishing step: step `n` (1-based) of the job's `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOf {
    pub n: i32,
    pub total: usize,
}

/// What the record of a finishing step said before this call ran it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepBefore {
    /// Nothing worth telling (not recorded yet, or pending).
    Nothing,
    /// Recorded with a statement that has changed since.
    StatementChanged,
    /// An earlier run was interrupted in it (still `running`).
    Interrupted,
    /// It failed in an earlier run.
    Failed,
}

/// What happened to a job's finishing steps (`finish::run_steps`).
#[derive(Debug, Clone, Copy)]
pub enum Finishing<'a> {
    /// Another runner holds the job's finishing lock; this one waits for it.
    WaitingForOtherFinisher { job: &'a str },
    /// The step is recorded as done with the same statement: not run again.
    AlreadyDone { job: &'a str, step: StepOf },
    /// The step starts; `statement` is its SQL on one line, shortened as errors show it.
    Started {
        job: &'a str,
        step: StepOf,
        before: StepBefore,
        statement: &'a str,
    },
    /// An attempt met contention (`sqlstate`); attempt `next` of `max_attempts` follows `wait`.
    /// `in_drop`: it was the drop of the invalid index left behind, not the step, that met it.
    Retrying {
        job: &'a str,
        step: StepOf,
        wait: Duration,
        in_drop: bool,
        sqlstate: Option<&'a str>,
        next: u32,
        max_attempts: u32,
    },
    /// An invalid index left by a concurrent build was dropped before building it again.
    DroppedInvalidIndex {
        job: &'a str,
        step: StepOf,
        index: &'a str,
    },
    /// The step is done after `attempts` attempts of this call, which took `took`.
    Done {
        job: &'a str,
        step: StepOf,
        attempts: u32,
        took: Duration,
    },
}

/// Whoever listens to a run's events.
pub trait Listener: Sync {
    fn on(&self, event: Event<'_>);
}
