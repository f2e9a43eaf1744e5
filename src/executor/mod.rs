//! The chunk loop. A run joins the job (alongside any other live runs, on any host), fixes the
//! job's key range on its first run, and starts its workers. Each worker takes a key range (see
//! `store::ranges`: a free one, or half of the busiest) and walks it chunk by chunk; for each
//! chunk, in one transaction: lock the range and read its cursor → find the bounds by walking the
//! key's index → run the job's statement on them → advance the range's cursor → commit → report.
//! When no range is left, the run verifies and records the outcome.
//!
//! One chunk's transaction, and the exactly-once rule it enforces, is `chunk` (top to bottom,
//! every statement it sends, built once per run in a `ChunkPlan`).
//!
//! The workers of a run share one pace: the rate ceiling (divided evenly among live runs), the
//! adaptive chunk size, the health signals and the live controls.
//!
//! What a failure does depends on its class (`db::classify`, by SQLSTATE):
//! - contention (lock timeout, deadlock, serialization, a saved plan gone stale under an
//!   `ALTER TABLE`): normal on a live database, so the run outlasts it: it retries the chunk
//!   after a jittered backoff (capped at a few seconds) for up to the contention budget
//!   (minutes), held with the reason "lock contention on keys …";
//! - a statement timeout at a single key: retried at most `max_attempts` times in a row;
//! - connection lost or server restarting: wait for the database ("waiting for database") and go
//!   on, for up to `reconnect_for` — in the chunk loop and while the run starts alike;
//! - statement timeout or a data error in a chunk of several keys: halve the chunk and go on; the
//!   halves that succeed commit, so the failure narrows to the smallest failing range. Once past
//!   the range that failed, the chunk size returns to the configured one;
//! - a data error at a single key (a poison row; for the page walk, a single page):
//!   `on_error = "stop"` records it and stops; `"skip"` records it and moves the cursor past it,
//!   in one transaction;
//! - anything else (read-only server, permission denied, table dropped, disk full): stop with the
//!   reason; progress is kept. The run's other workers stop after their chunk in flight.
//!
//! A statement that wrote more rows of the job's table than its chunk holds (it ignores `:end`,
//! or reaches other rows by a join or a trigger) stops the run the same way, before the chunk
//! commits: left to go on, every chunk would rewrite other chunks' rows.

use crate::db::{self, ErrorClass, Target};

mod chunk;

use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::job::ThrottleSpec;
use crate::keyset::{show_key, KeyValue, Keyset};
use crate::signals::Shutdown;
use crate::store::{
    self, Acquired, Claim, LeaseState, Poison, RangeLease, Runner, Splitter, Store, Sweep,
};
use crate::telemetry::Progress;
use crate::throttle::{Hold, Throttle};
mod recovery;

use chunk::{cancellable, failed, stalled, ChunkDone, ChunkPlan, Failure, Step};
use recovery::{Action, Problem, Situation, Span, Stop, BACKOFF_BASE, RECONNECT_POLL_MAX};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::types::ToSql;

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
/// Short enough that a released lock is noticed within seconds, however long the contention.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// While a chunk keeps meeting contention, a log line at most this often (status shows it live).
const CONTENTION_LOG_EVERY: Duration = Duration::from_secs(30);
/// After a stop, how long recording the run's end may wait for the database to answer: a stop
/// must not wait out `reconnect_for`; a run whose end is not recorded is taken over anyway.
const STOP_CONNECT_WITHIN: Duration = Duration::from_secs(3);
const LAG_SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How often a running job reads its controls (pause, cancel, new settings).
const CONTROLS_EVERY: Duration = Duration::from_millis(200);
/// How often a worker with nothing to take looks again (for a range freed by a runner that died).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// A range is split only when at least this many chunks are left in it.
const SPLIT_MIN_CHUNKS: i64 = 2;
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// Every key up to the bound was processed and `verify` (if any) returned 0.
    Done { verify_remaining: Option<i64> },
    /// Nothing to do: the job was already done.
    AlreadyDone,
    /// Every key was processed (and swept) but `verify` still counts rows to do.
    Incomplete {
        verify_remaining: i64,
        why: String,
        not_swept: NotSwept,
    },
    /// Stopped by a signal; the next run resumes from the cursor.
    Stopped,
    /// Stopped by `backfill cancel`; the next run resumes from the cursor.
    Cancelled,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub job: String,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Keys processed by this run (all its workers).
    pub rows: i64,
    /// Rows the statement reported changing in this run.
    pub rows_affected: i64,
    pub chunks: i64,
    /// Poison keys this run skipped (`on_error = "skip"`).
    pub skipped: i64,
    pub workers: u32,
    pub elapsed_seconds: f64,
    /// Keys processed by all runs of the job.
    pub rows_done_total: i64,
    /// The last key committed, while the job has a single range.
    pub cursor: Option<KeyValue>,
    /// The job's key ranges (more than one once workers split the work).
    pub ranges: usize,
}

/// Runs (or resumes, or joins) a job to completion, a stop, or a failure.
pub async fn run(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    opts: &RunOptions,
    shutdown: &Shutdown,
    progress: &Progress,
) -> Result<Report> {
    let started = Instant::now();
    let workers = opts.workers.clamp(1, MAX_WORKERS);
    let report = |outcome, tally: &Tally, total: &Option<store::Checkpoint>| Report {
        job: job.name.clone(),
        outcome,
        rows: tally.rows,
        rows_affected: tally.affected,
        chunks: tally.chunks,
        skipped: tally.skipped,
        workers,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        rows_done_total: total.as_ref().map(|c| c.rows_done).unwrap_or(tally.rows),
        cursor: total.as_ref().and_then(|c| c.cursor.clone()),
        ranges: total.as_ref().map(|c| c.ranges.len()).unwrap_or(0),
    };
    let Started {
        lease,
        keyset,
        run_id,
        checkpoint,
        total,
    } = match start(target, store, job, opts, workers, shutdown, progress).await? {
        Start::Owned(s) => *s,
        Start::AlreadyDone(c) => {
            return Ok(report(Outcome::AlreadyDone, &Tally::default(), &Some(*c)));
        }
    };
    let lease_state = Arc::new(LeaseState::new());
    let heartbeat = tokio::spawn(store.clone().keep_lease(
        target.clone(),
        lease,
        job.name.clone(),
        run_id,
        opts.reconnect_for,
        lease_state.clone(),
    ));

    let chunk_rows = opts.chunk_rows.unwrap_or(job.chunk_rows);
    progress.start(
        checkpoint.rows_done.max(0) as u64,
        total.map(|t| t.max(0) as u64),
        chunk_rows as u64,
    );
    progress.set_workers(workers);
    if let Some(c) = &checkpoint.cursor {
        progress.log(&format!(
            "{}: resuming after key {} ({} rows already done)",
            job.name,
            show_key(c),
            checkpoint.rows_done
        ));
    } else if checkpoint.ranges.len() > 1 {
        progress.log(&format!(
            "{}: resuming ({} rows already done; {} of {} key ranges finished)",
            job.name,
            checkpoint.rows_done,
            checkpoint.ranges.iter().filter(|r| r.done).count(),
            checkpoint.ranges.len()
        ));
    }
    let lock_timeout = opts.lock_timeout.unwrap_or(job.lock_timeout);
    let statement_timeout = opts.statement_timeout.unwrap_or(job.statement_timeout);
    let shared = Shared {
        target,
        store,
        job,
        opts,
        run_id,
        shutdown,
        progress,
        lease: &lease_state,
        pool: target.pool(workers as usize + 1)?,
        keyset: &keyset,
        workers,
        chunk: ChunkPlan::new(
            store,
            job,
            &keyset,
            chunk::chunk_timeouts(lock_timeout, statement_timeout),
        ),
        pace: tokio::sync::Mutex::new(Pace {
            throttle: Throttle::new(
                ThrottleSpec {
                    rows_per_second: opts.rows_per_second.or(job.throttle.rows_per_second),
                    target_chunk_time: match opts.target_chunk_time {
                        Some(d) if d.is_zero() => None,
                        Some(d) => Some(d),
                        None => job.throttle.target_chunk_time,
                    },
                    pause: opts.pause.unwrap_or(job.throttle.pause),
                    ..job.throttle.clone()
                },
                chunk_rows,
                job.table.quoted(),
            ),
            controls_read: None,
            controls: store::Controls::default(),
            holding: None,
            contended: Default::default(),
            lag_sampled: None,
            rate_shown: false,
        }),
        aborted: AtomicBool::new(false),
        range_finished: tokio::sync::Notify::new(),
    };
    // The main pass, then — while `verify` still counts rows (written behind the cursor by code
    // that does not fill the new column yet) — sweep passes over every key, up to max_sweeps.
    let mut tally = Tally::default();
    let mut verified: Option<Result<(), (i64, String, NotSwept)>> = None;
    let result = loop {
        let pass = shared.walk_all(chunk_rows as i64, &mut tally).await;
        if !matches!(pass, Ok(LoopEnd::Finished)) || job.verify.is_none() {
            break pass;
        }
        match shared.verify_and_sweep().await {
            Ok(AfterPass::Sweep) => continue,
            Ok(AfterPass::Verified) => verified = Some(Ok(())),
            Ok(AfterPass::Incomplete {
                remaining,
                why,
                not_swept,
            }) => verified = Some(Err((remaining, why, not_swept))),
            Err(e) => break Err(e),
        }
        break pass;
    };
    drop(shared);

    // Record the end on a fresh session: the lease session belongs to the heartbeat (kept until
    // the outcome is saved), and the database may just be coming back.
    let finisher = match connect_patiently(target, opts.reconnect_for, progress, shutdown).await {
        Ok(c) => c,
        Err(e) => {
            heartbeat.abort();
            if let Ok(LoopEnd::Stopped | LoopEnd::Cancelled) = result {
                progress.finish("stopped");
                return Err(stopped_unrecorded(job, &e, &tally, &checkpoint, workers));
            }
            // A run that failed (e.g. gave up waiting for the database) says why and where the
            // next run resumes; that its end could not be recorded as well changes neither.
            if let Err(failed) = result {
                progress.finish("failed");
                return Err(failed);
            }
            return Err(e);
        }
    };
    let name = job.name.as_str();
    let end = |state: &'static str| progress.finish(state);
    let (state, error, remaining, outcome) = match result {
        Ok(LoopEnd::Cancelled) => ("cancelled", None, None, Ok(Outcome::Cancelled)),
        Ok(LoopEnd::Stopped) => ("stopped", None, None, Ok(Outcome::Stopped)),
        Ok(LoopEnd::Finished) => match verified {
            Some(Err((n, why, not_swept))) => (
                "incomplete",
                Some(format!(
                    "every key up to the bound was processed, but {why}"
                )),
                Some(n),
                Ok(Outcome::Incomplete {
                    verify_remaining: n,
                    why,
                    not_swept,
                }),
            ),
            Some(Ok(())) => (
                "done",
                None,
                Some(0),
                Ok(Outcome::Done {
                    verify_remaining: Some(0),
                }),
            ),
            None => (
                "done",
                None,
                None,
                Ok(Outcome::Done {
                    verify_remaining: None,
                }),
            ),
        },
        Err(e) => ("failed", Some(e.to_string()), None, Err(e)),
    };
    end(state);
    let saved = store
        .finish(&finisher, name, run_id, state, error.as_deref(), remaining)
        .await;
    // The lease is kept until the outcome is saved: a run verifying for minutes is alive.
    heartbeat.abort();
    let outcome = outcome?;
    saved?;
    // What this run did, as its chunks counted it when they committed: the tally kept here
    // misses a chunk whose COMMIT took effect but whose answer was lost with the connection.
    if let Ok((rows, affected, chunks)) = store.run_counts(&finisher, run_id).await {
        (tally.rows, tally.affected, tally.chunks) = (rows, affected, chunks);
    }
    let total = store.load(&finisher, name).await.ok().flatten();
    Ok(report(outcome, &tally, &total))
}

/// What a run's start-up established.
struct Started {
    /// The session the run's lease lives on (handed to the heartbeat).
    lease: tokio_postgres::Client,
    keyset: Keyset,
    run_id: i64,
    /// The job's checkpoint as it was when the run joined.
    checkpoint: store::Checkpoint,
    /// The job's row estimate.
    total: Option<i64>,
}

enum Start {
    Owned(Box<Started>),
    AlreadyDone(Box<store::Checkpoint>),
}

/// The start-up: the engine's schema, the key against the catalog, joining the job, its key
/// range. A lost connection or an unreachable server is waited out as in the chunk loop (for up
/// to `--reconnect-for`, "waiting for database"), then the start-up goes on from the top on a new
/// session; a run already joined is re-attached to it rather than joined twice.
async fn start(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    opts: &RunOptions,
    workers: u32,
    shutdown: &Shutdown,
    progress: &Progress,
) -> Result<Start> {
    let name = job.name.as_str();
    let mut joined = None;
    let mut outage: Option<Instant> = None;
    loop {
        let lost = match start_once(target, store, job, opts, workers, progress, &mut joined).await
        {
            Err(Error::Unavailable(why)) => why,
            done => {
                if outage.is_some() {
                    progress.set_held(None);
                    progress.log(&format!("{name}: database is back; starting"));
                }
                return done;
            }
        };
        let since = *outage.get_or_insert_with(|| {
            progress.log(&format!(
                "{name}: lost the database while starting the run ({lost}); waiting for it to come back (up to {}s)",
                opts.reconnect_for.as_secs()
            ));
            Instant::now()
        });
        if since.elapsed() >= opts.reconnect_for {
            return Err(Error::Runtime(format!(
                "job {name}: the database has been unreachable for {}s while the run was starting (last error: {lost}); gave up (--reconnect-for); nothing was processed by this run: run `backfill run {name}` again when it is back",
                since.elapsed().as_secs()
            )));
        }
        progress.set_held(Some("waiting for database"));
        // Poll quickly at first (a terminated session reconnects at once), then every 2 s.
        let pause = (since.elapsed() / 2).clamp(BACKOFF_BASE, RECONNECT_POLL_MAX);
        shutdown.sleep(pause).await;
        progress.held("database_unavailable", pause);
        if shutdown.stop_requested() {
            return Err(Error::Interrupted(format!(
                "job {name}: stopped while waiting for the database to start the run; nothing was processed by this run: `backfill run {name}` starts it again"
            )));
        }
    }
}

/// One attempt at the start-up, on a new session. `joined` keeps the run (and the checkpoint it
/// saw) once the job is joined, for the next attempt.
async fn start_once(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    opts: &RunOptions,
    workers: u32,
    progress: &Progress,
    joined: &mut Option<(i64, store::Checkpoint)>,
) -> Result<Start> {
    let name = job.name.as_str();
    let mut lease = target.connect().await?;
    store.ensure(&mut lease).await?;
    let keyset = Keyset::resolve(&lease, job).await?;
    let attached = match joined.as_ref() {
        Some((run_id, _)) => store
            .reattach(&lease, *run_id)
            .await
            .map_err(|e| db::error(e, format!("job {name}: re-attaching run {run_id}")))?,
        None => false,
    };
    let (run_id, checkpoint) = match joined.take() {
        Some(run) if attached => run,
        earlier => {
            if let Some((run_id, _)) = earlier {
                // Declared gone meanwhile: its ranges may be someone else's now.
                progress.log(&format!(
                    "{name}: run {run_id} was declared gone while the database was away; joining the job again"
                ));
            }
            let runner = Runner::this_process();
            let claim = store
                .claim(
                    &mut lease,
                    job,
                    &runner,
                    workers,
                    opts.allow_changed_definition,
                )
                .await?;
            match claim {
                Claim::Owned { run_id, checkpoint } => (run_id, checkpoint),
                Claim::AlreadyDone(c) => return Ok(Start::AlreadyDone(Box::new(c))),
            }
        }
    };
    *joined = Some((run_id, checkpoint.clone()));
    match key_range(&mut lease, store, job, &keyset, progress).await {
        Ok(total) => Ok(Start::Owned(Box::new(Started {
            lease,
            keyset,
            run_id,
            checkpoint,
            total,
        }))),
        // Waited out by the caller, which comes back with the same run.
        Err(e @ Error::Unavailable(_)) => Err(e),
        Err(e) => {
            let _ = store
                .finish(&lease, name, run_id, "failed", Some(&e.to_string()), None)
                .await;
            Err(e)
        }
    }
}

/// Fixes the job's key range on its first run (under the job's row lock, so runs starting
/// together agree): the greatest key now in the table, and the number of rows to process.
/// Returns the row estimate.
async fn key_range(
    lease: &mut tokio_postgres::Client,
    store: &Store,
    job: &JobSpec,
    keyset: &Keyset,
    progress: &Progress,
) -> Result<Option<i64>> {
    let name = &job.name;
    let err = |e| {
        db::error(
            e,
            format!("job {name}: finding the last key of {}", job.table),
        )
    };
    let tx = lease.transaction().await.map_err(err)?;
    let (taken, _, total) = store.lock_bound(&tx, name).await?;
    crate::undo::ensure_table(&tx, store, job).await?;
    if taken {
        tx.commit().await.map_err(err)?;
        return Ok(total);
    }
    // Rows inserted after this moment, beyond the bound, are left to the application (which
    // writes new rows correctly once the expand step is deployed) and to `verify`.
    let upper: Option<KeyValue> = tx
        .query_opt(&keyset.last_key_sql(), &[])
        .await
        .map_err(err)?
        .map(|r| r.get(0));
    let (total, exact) = estimate_rows(&tx, job, EXACT_COUNT_WITHIN)
        .await
        .map_err(|e| {
            db::error(
                e,
                format!("job {name}: estimating the rows of {}", job.table),
            )
        })?;
    if total.is_none() {
        progress.log(&format!(
            "{name}: no row estimate for {} (never analyzed, and counting takes long): its key range cannot be split, so only one worker will work; run ANALYZE {} first to use several",
            job.table, job.table
        ));
    }
    store
        .set_bound(&tx, name, upper.as_ref(), total, exact)
        .await?;
    tx.commit().await.map_err(err)?;
    match &upper {
        Some(u) => progress.log(&format!(
            "{name}: processing keys up to {} (~{} rows)",
            show_key(u),
            total.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
        )),
        None => progress.log(&format!(
            "{name}: table {} was empty when the job started; nothing to do",
            job.table
        )),
    }
    Ok(total)
}

/// Connects, retrying for up to `patience` while the database is unreachable (not when it
/// refuses us: a wrong password does not get better by waiting). Once a stop is requested it
/// waits for nothing: one attempt of at most `STOP_CONNECT_WITHIN`, then the error (the caller
/// says what could not be recorded).
async fn connect_patiently(
    target: &Target,
    patience: Duration,
    progress: &Progress,
    shutdown: &Shutdown,
) -> Result<tokio_postgres::Client> {
    let since = Instant::now();
    loop {
        let stopping = shutdown.stop_requested();
        let attempt = if stopping {
            tokio::time::timeout(STOP_CONNECT_WITHIN, target.connect())
                .await
                .ok()
        } else {
            // A stop requested during a slow connect (an unreachable host) ends the wait.
            tokio::select! {
                r = target.connect() => Some(r),
                _ = shutdown.sleep(patience) => None,
            }
        };
        let gave_up = stopping || since.elapsed() >= patience;
        match attempt {
            Some(Ok(c)) => return Ok(c),
            Some(Err(e @ Error::Unavailable(_))) if gave_up => return Err(e),
            Some(Err(Error::Unavailable(_))) | None if !gave_up => {
                progress.set_held(Some("waiting for database"));
                let t = Instant::now();
                shutdown.sleep(RECONNECT_POLL_MAX).await;
                progress.held("database_unavailable", t.elapsed());
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(Error::Runtime(format!(
                    "{} did not answer within {}s",
                    target.describe(),
                    if stopping {
                        STOP_CONNECT_WITHIN
                    } else {
                        patience
                    }
                    .as_secs()
                )))
            }
        }
    }
}

/// The error of a run stopped (signal or `backfill cancel`) while the database was unreachable:
/// every chunk it committed is saved with its checkpoint, but its end could not be recorded, so
/// the next run finds it gone (history: `abandoned`) and takes over at once.
fn stopped_unrecorded(
    job: &JobSpec,
    why: &Error,
    tally: &Tally,
    at_start: &store::Checkpoint,
    workers: u32,
) -> Error {
    let name = &job.name;
    let resume = match (&tally.last, &at_start.cursor) {
        _ if workers > 1 || at_start.ranges.len() > 1 => {
            "resumes each key range after its last committed key".to_string()
        }
        (Some(k), _) | (None, Some(k)) => format!("resumes after key {}", show_key(k)),
        (None, None) => "starts at the first key".to_string(),
    };
    Error::Interrupted(format!(
        "{name}: stopped while the database is unreachable: {} rows in {} chunks this run, each committed with its checkpoint; the stop itself could not be recorded ({why}), so the run will show as abandoned; `backfill run {name}` {resume} once the database is back",
        tally.rows, tally.chunks
    ))
}

enum LoopEnd {
    Finished,
    Stopped,
    /// `backfill cancel`.
    Cancelled,
}

#[derive(Default)]
struct Tally {
    rows: i64,
    affected: i64,
    chunks: i64,
    skipped: i64,
    /// The last key committed (for a run of one worker on one range: its cursor).
    last: Option<KeyValue>,
}

impl Tally {
    fn add(&mut self, t: &Tally) {
        self.rows += t.rows;
        self.affected += t.affected;
        self.chunks += t.chunks;
        self.skipped += t.skipped;
        if t.last.is_some() {
            self.last = t.last.clone();
        }
    }
}

/// What the workers of one run share.
struct Shared<'a> {
    target: &'a Target,
    store: &'a Store,
    job: &'a JobSpec,
    opts: &'a RunOptions,
    run_id: i64,
    shutdown: &'a Shutdown,
    progress: &'a Progress,
    lease: &'a LeaseState,
    pool: db::Pool,
    keyset: &'a Keyset,
    workers: u32,
    chunk: ChunkPlan<'a>,
    pace: tokio::sync::Mutex<Pace>,
    /// A worker failed: the others stop after their chunk in flight.
    aborted: AtomicBool,
    /// A range was finished: idle workers look again at once (the job may be done).
    range_finished: tokio::sync::Notify,
}

impl Shared<'_> {
    /// How long one chunk may keep meeting lock contention: the run's flag, else the job's.
    fn contention_budget(&self) -> Duration {
        self.opts
            .contention_budget
            .or(self.job.contention_budget)
            .unwrap_or(DEFAULT_CONTENTION_BUDGET)
    }

    /// Walks the job's ranges with this run's workers until none is left (or the run stops).
    async fn walk_all(&self, chunk_rows: i64, tally: &mut Tally) -> Result<LoopEnd> {
        let ends = futures_util::future::join_all(
            (0..self.workers as i32).map(|w| Worker::new(self, w, chunk_rows).drive()),
        )
        .await;
        let mut result: Result<LoopEnd> = Ok(LoopEnd::Finished);
        for (end, t) in ends {
            tally.add(&t);
            result = match (result, end) {
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                (Ok(LoopEnd::Cancelled), _) | (Ok(_), Ok(LoopEnd::Cancelled)) => {
                    Ok(LoopEnd::Cancelled)
                }
                (Ok(LoopEnd::Stopped), _) | (Ok(_), Ok(LoopEnd::Stopped)) => Ok(LoopEnd::Stopped),
                (Ok(LoopEnd::Finished), Ok(LoopEnd::Finished)) => Ok(LoopEnd::Finished),
            };
        }
        result
    }

    /// Runs `verify` after a pass; when it still counts rows, starts (or joins) a sweep pass —
    /// only when the statement is harmless to apply twice (a sweep revisits keys already done).
    async fn verify_and_sweep(&self) -> Result<AfterPass> {
        let (job, store) = (self.job, self.store);
        let name = job.name.as_str();
        let mut client = connect_patiently(
            self.target,
            self.opts.reconnect_for,
            self.progress,
            self.shutdown,
        )
        .await?;
        store.set_phase(&client, name, "verifying").await?;
        let seen = store.sweeps(&client, name).await?;
        let n = crate::migrator::verify(&client, job, self.opts.verify_timeout).await?;
        if n == 0 {
            return Ok(AfterPass::Verified);
        }
        let incomplete = |why: String, not_swept| {
            self.progress.log(&format!("{name}: {why}"));
            Ok(AfterPass::Incomplete {
                remaining: n,
                why,
                not_swept,
            })
        };
        if job.max_sweeps == 0 {
            return incomplete(
                format!("verify counts {n} rows still to do; not swept (max_sweeps = 0)"),
                NotSwept::Disabled,
            );
        }
        if let Some(why) = self.unsafe_to_sweep().await? {
            return incomplete(
                format!("verify counts {n} rows still to do; not swept: {why}"),
                NotSwept::Unsafe,
            );
        }
        let sweep = store
            .start_sweep(&mut client, job, seen, &self.keyset.last_key_sql())
            .await?;
        match sweep {
            Sweep::Ready { pass } => {
                self.progress.log(&format!(
                    "{name}: verify counts {n} rows still to do (written behind the cursor?); sweep {pass} of at most {}: walking every key again (the statement's guard skips rows already done)",
                    job.max_sweeps
                ));
                Ok(AfterPass::Sweep)
            }
            Sweep::Done => {
                self.progress.log(&format!(
                    "{name}: another run completed the job meanwhile (its verify returned 0)"
                ));
                Ok(AfterPass::Verified)
            }
            Sweep::Exhausted { passes } => incomplete(
                format!(
                    "verify still counts {n} rows to do after {passes} sweeps (max_sweeps = {})",
                    job.max_sweeps
                ),
                NotSwept::Exhausted,
            ),
        }
    }

    /// Why applying the statement again to keys already done would be wrong, if it would (see
    /// `plan::unsafe_to_sweep`).
    async fn unsafe_to_sweep(&self) -> Result<Option<String>> {
        let plan = crate::plan::probe_first_chunk(self.target, self.job).await?;
        Ok(crate::plan::unsafe_to_sweep(&plan))
    }
}

/// What verify said after a pass.
enum AfterPass {
    /// Verify returned 0.
    Verified,
    /// A sweep pass is ready to walk.
    Sweep,
    /// Rows remain and no (further) sweep will run.
    Incomplete {
        remaining: i64,
        why: String,
        not_swept: NotSwept,
    },
}

/// Why rows that verify still counts were not swept: what will help differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotSwept {
    /// `max_sweeps = 0`: raising it (not part of the job's fingerprint) lets a run sweep.
    Disabled,
    /// The statement is not safe to apply again to keys already done (no guard, not idempotent,
    /// fails, or could not be checked): every new run refuses to sweep too, until it is.
    Unsafe,
    /// `max_sweeps` passes ran and verify still counts rows: a new run sweeps again.
    Exhausted,
}

/// The run's pace, shared by its workers: throttle, controls, and what `status` was told.
struct Pace {
    throttle: Throttle,
    /// When the controls were last read.
    controls_read: Option<Instant>,
    controls: store::Controls,
    /// The hold reason last written to the run's row.
    holding: Option<String>,
    /// Workers whose chunk keeps meeting lock contention, with the hold reason each shows.
    contended: std::collections::BTreeMap<i32, Shown>,
    /// When replication lag was last sampled.
    lag_sampled: Option<Instant>,
    rate_shown: bool,
}

/// A hold as shown: the reason stored for `status` (which adds when it started), and when it
/// started for the progress display and the log, where that is part of the news.
#[derive(Debug, Clone, PartialEq)]
struct Shown {
    reason: String,
    since: Option<String>,
}

/// One worker's walk: the range it holds and its own connection and failure state.
struct Worker<'s, 'a> {
    shared: &'s Shared<'a>,
    id: i32,
    conn: Option<deadpool_postgres::Object>,
    range: Option<RangeLease>,
    /// The last key this worker committed in its range (for messages).
    cursor: Option<KeyValue>,
    /// Keys per chunk now.
    limit: i64,
    /// Keys still inside a range that failed at a larger size; the size is restored after them.
    narrow_left: i64,
    /// Consecutive failed attempts at the same chunk.
    attempt: u32,
    /// When the database became unreachable, while it is.
    outage: Option<Instant>,
    /// While the worker's chunk keeps meeting lock contention.
    contention: Option<Contention>,
    tally: Tally,
}

/// A chunk that keeps meeting lock contention (reset when a chunk commits).
struct Contention {
    since: Instant,
    /// The hold reason: "lock contention on keys A..=B".
    reason: String,
    /// When it started, as shown: "since T".
    since_utc: String,
    logged: Instant,
    /// From when the time held is not booked on the metrics yet.
    unbooked: Instant,
}

impl<'s, 'a> Worker<'s, 'a> {
    fn new(shared: &'s Shared<'a>, id: i32, limit: i64) -> Self {
        Worker {
            shared,
            id,
            conn: None,
            range: None,
            cursor: None,
            limit,
            narrow_left: 0,
            attempt: 0,
            outage: None,
            contention: None,
            tally: Tally::default(),
        }
    }

    fn name(&self) -> &str {
        &self.shared.job.name
    }

    /// Walks ranges until none is left, a stop, or a failure; then lets its range go.
    async fn drive(mut self) -> (Result<LoopEnd>, Tally) {
        let end = self.walk().await;
        if end.is_err() {
            self.shared.aborted.store(true, Ordering::SeqCst);
        }
        if let (Some(range), Some(conn)) = (self.range.take(), self.conn.as_ref()) {
            if !conn.is_closed() {
                let _ = self
                    .shared
                    .store
                    .release(&***conn, self.name(), &range)
                    .await;
            }
        }
        (end, self.tally)
    }

    async fn walk(&mut self) -> Result<LoopEnd> {
        let name = self.name().to_string();
        loop {
            if self.shared.shutdown.stop_requested() || self.shared.aborted.load(Ordering::SeqCst) {
                return Ok(LoopEnd::Stopped);
            }
            if self.shared.lease.is_lost() {
                return Err(store::lost(&name));
            }
            match self.read_controls().await {
                Ok(true) => return Ok(LoopEnd::Cancelled),
                Ok(false) => {}
                Err(f) => {
                    self.recover(f).await?;
                    continue;
                }
            }
            if self.range.is_none() {
                match self.acquire().await {
                    Ok(Acquired::Range(r)) => {
                        self.range = Some(r);
                        self.cursor = None;
                    }
                    Ok(Acquired::Wait) => {
                        tokio::select! {
                            _ = self.shared.shutdown.sleep(IDLE_POLL) => {}
                            _ = self.shared.range_finished.notified() => {}
                        }
                        continue;
                    }
                    Ok(Acquired::AllDone) => return Ok(LoopEnd::Finished),
                    Err(f) => {
                        self.recover(f).await?;
                        continue;
                    }
                }
            }
            if self.hold_while_unhealthy().await? {
                continue;
            }
            self.sample_replication_lag().await;
            let bucket = {
                let pace = self.shared.pace.lock().await;
                if self.narrow_left == 0 {
                    self.limit = pace.throttle.chunk_rows();
                }
                pace.throttle.bucket()
            };
            if let Some(bucket) = bucket {
                let waited = bucket.admit(self.limit).await;
                self.shared.progress.held("rate_limit", waited);
            }
            match self.step().await {
                Ok(Step::Committed(done)) => {
                    let rest = self.committed(done).await;
                    if !rest.is_zero() {
                        self.shared.shutdown.sleep(rest).await;
                        self.shared.progress.held("pause", rest);
                    }
                }
                Ok(Step::RangeDone) => {
                    self.contention_over().await;
                    self.range = None;
                    self.shared.range_finished.notify_waiters();
                }
                Err(f) => {
                    if self.shared.shutdown.cancel_requested()
                        && f.sqlstate.as_deref() == Some("57014")
                    {
                        return Ok(LoopEnd::Stopped);
                    }
                    self.recover(f).await?;
                }
            }
        }
    }

    /// A connection from the run's pool (a new one after a failure closed the old).
    async fn connection(&mut self) -> Result<&mut deadpool_postgres::Object, Failure> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = None;
            let conn = self.shared.pool.get().await.map_err(|e| Failure {
                problem: Problem::Db(ErrorClass::Connection),
                sqlstate: match &e {
                    deadpool_postgres::PoolError::Backend(e) => db::sqlstate(e).map(str::to_string),
                    _ => None,
                },
                text: match &e {
                    deadpool_postgres::PoolError::Backend(e) => db::describe(e),
                    other => other.to_string(),
                },
                stage: "connecting",
                range: None,
                keys: None,
            })?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Looks for a range to work on: a free one, or half of the busiest.
    async fn acquire(&mut self) -> Result<Acquired, Failure> {
        let shared = self.shared;
        let min_keys = SPLIT_MIN_CHUNKS * shared.pace.lock().await.throttle.chunk_rows();
        let (run_id, worker) = (shared.run_id, self.id);
        let conn = self.connection().await?;
        let splitter = Splitter {
            keyset: shared.keyset,
            min_keys,
        };
        let got = shared
            .store
            .acquire(conn, &shared.job.name, run_id, worker, &splitter)
            .await
            .map_err(failed("claiming a key range", None))?;
        if let Acquired::Range(r) = &got {
            if r.id > 0 || shared.opts.workers > 1 {
                shared.progress.log(&format!(
                    "{}: worker {worker} took range {}",
                    shared.job.name, r.id
                ));
            }
        }
        Ok(got)
    }

    /// One attempt at the next chunk of the worker's range.
    async fn step(&mut self) -> Result<Step, Failure> {
        let shared = self.shared;
        let range = self.range.expect("a range is held");
        let limit = self.limit;
        let conn = self.connection().await?;
        let token = conn.cancel_token();
        let chunk = chunk::run(conn, &shared.chunk, &range, limit);
        cancellable(chunk, &token, shared.target, shared.shutdown).await
    }

    /// Every few seconds, the largest replay lag of the streaming standbys, for the metrics.
    /// (Unreadable without pg_monitor's rights on other roles' senders; then not reported.)
    async fn sample_replication_lag(&mut self) {
        let mut pace = self.shared.pace.lock().await;
        if pace
            .lag_sampled
            .is_some_and(|t| t.elapsed() < LAG_SAMPLE_EVERY)
        {
            return;
        }
        let Some(conn) = self.conn.as_ref().filter(|c| !c.is_closed()) else {
            return;
        };
        pace.lag_sampled = Some(Instant::now());
        let sql = "SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8 FROM pg_stat_replication";
        if let Ok(row) = conn.query_one(sql, &[]).await {
            self.shared.progress.replication_lag(row.get(0));
        }
    }

    /// Reads the job's controls (at most every 0.2 s for the whole run) and applies new
    /// settings. True: cancel. The first read happens before the worker's first chunk, on a
    /// connection of its own if it has none yet: a job paused or cancelled before the run started
    /// must not write a chunk first. Until one read has succeeded, a failed read is a failed
    /// attempt (waited out like any other); after that, the last controls read stay in force.
    async fn read_controls(&mut self) -> Result<bool, Failure> {
        let shared = self.shared;
        {
            let mut pace = shared.pace.lock().await;
            if !pace.rate_shown {
                pace.rate_shown = true;
                shared
                    .progress
                    .set_rate_limit(pace.throttle.spec().rows_per_second);
            }
            if pace
                .controls_read
                .is_some_and(|t| t.elapsed() < CONTROLS_EVERY)
            {
                return Ok(pace.controls.cancel);
            }
        }
        // Connect without holding the run's pace: the other workers go on meanwhile.
        let conn = self.connection().await?;
        let mut pace = shared.pace.lock().await;
        if pace
            .controls_read
            .is_some_and(|t| t.elapsed() < CONTROLS_EVERY)
        {
            return Ok(pace.controls.cancel);
        }
        let c = match shared.store.controls(&***conn, &shared.job.name).await {
            Ok(c) => c,
            Err(e) if pace.controls_read.is_none() => {
                return Err(failed("reading the job's controls", None)(e))
            }
            Err(_) => return Ok(pace.controls.cancel),
        };
        pace.controls_read = Some(Instant::now());
        if c != pace.controls {
            pace.throttle.apply(&c);
            shared
                .progress
                .set_chunk_size(pace.throttle.chunk_rows() as u64);
            shared
                .progress
                .set_rate_limit(pace.throttle.spec().rows_per_second);
            if c.rows_per_second != pace.controls.rows_per_second
                || c.target_chunk_time != pace.controls.target_chunk_time
                || c.pause != pace.controls.pause
            {
                shared.progress.log(&format!(
                    "{}: new settings from `backfill set`: {}",
                    shared.job.name,
                    describe_controls(&c)
                ));
            }
            pace.controls = c;
        }
        Ok(pace.controls.cancel)
    }

    /// Holds while paused or while a health signal says so. True when it held (the caller
    /// re-checks stop, cancel and ownership before going on).
    async fn hold_while_unhealthy(&mut self) -> Result<bool> {
        let shared = self.shared;
        let name = shared.job.name.as_str();
        let (hold, nap) = {
            let mut pace = shared.pace.lock().await;
            let hold = if pace.controls.paused {
                Some(Hold {
                    reason: "paused",
                    detail: format!(
                        "paused by `backfill pause` (resume with `backfill resume {name}`)"
                    ),
                })
            } else {
                match self.conn.as_ref().filter(|c| !c.is_closed()) {
                    Some(conn) => pace.throttle.check(conn).await,
                    None => None,
                }
            };
            // A worker's lock contention shows while nothing else holds the run.
            let shown = hold
                .as_ref()
                .map(|h| Shown {
                    reason: h.detail.clone(),
                    since: None,
                })
                .or_else(|| pace.contended.values().next().cloned());
            self.show_hold(&mut pace, shown).await;
            let nap = pace
                .throttle
                .spec()
                .check_interval
                .min(Duration::from_millis(500));
            (hold, nap)
        };
        let Some(hold) = hold else { return Ok(false) };
        shared.shutdown.sleep(nap).await;
        shared.progress.held(hold.reason, nap);
        Ok(true)
    }

    /// Writes why the run is held (None: it is not) for `status`, the progress display and the
    /// log, when that changed.
    async fn show_hold(&self, pace: &mut Pace, shown: Option<Shown>) {
        let shared = self.shared;
        let detail = shown.as_ref().map(|h| h.reason.clone());
        if detail == pace.holding {
            return;
        }
        let name = shared.job.name.as_str();
        if let Some(conn) = self.conn.as_ref().filter(|c| !c.is_closed()) {
            let _ = shared
                .store
                .set_hold(&***conn, shared.run_id, detail.as_deref())
                .await;
        }
        let text = shown.map(|h| match h.since {
            Some(t) => format!("{} since {t}", h.reason),
            None => h.reason,
        });
        match &text {
            Some(d) => shared.progress.log(&format!("{name}: holding: {d}")),
            None => shared
                .progress
                .log(&format!("{name}: no longer held; continuing")),
        }
        shared.progress.set_held(text.as_deref());
        pace.holding = detail;
    }

    /// The worker's chunk went through: its lock contention (if any) is over.
    async fn contention_over(&mut self) {
        let Some(c) = self.contention.take() else {
            return;
        };
        let shared = self.shared;
        shared.progress.log(&format!(
            "{}: the lock contention is over after {}s; continuing",
            shared.job.name,
            c.since.elapsed().as_secs()
        ));
        let mut pace = shared.pace.lock().await;
        pace.contended.remove(&self.id);
        // Nothing else held the run, or this worker would not have run its chunk.
        let shown = pace.contended.values().next().cloned();
        self.show_hold(&mut pace, shown).await;
    }

    /// Books a committed chunk and adapts the pace; returns the rest to take before the next.
    async fn committed(&mut self, done: ChunkDone) -> Duration {
        let shared = self.shared;
        self.attempt = 0;
        self.contention_over().await;
        if self.outage.take().is_some() {
            shared
                .progress
                .log(&format!("{}: database is back; continuing", self.name()));
        }
        self.tally.rows += done.keys;
        self.tally.affected += done.affected;
        self.tally.chunks += 1;
        let mut pace = shared.pace.lock().await;
        if done.blocked > 0 {
            let size = pace.throttle.shrink();
            shared.progress.log(&format!(
                "{}: {} application session(s) waited on this chunk's locks; chunks shrink to {size} keys",
                shared.job.name,
                done.blocked
            ));
        } else if self.narrow_left == 0 {
            pace.throttle.adapt(done.keys, done.asked, done.took);
        }
        let rest = pace.throttle.rest(done.took);
        drop(pace);
        self.tally.last = Some(done.last.clone());
        self.cursor = Some(done.last);
        self.passed(done.keys).await;
        shared
            .progress
            .chunk_committed(done.keys as u64, done.affected.max(0) as u64, done.took);
        if let Some(n) = shared.lease.job_rows_done() {
            shared.progress.sync_job_rows(n.max(0) as u64);
        }
        rest
    }

    /// Counts keys passed inside a narrowed range; past it, the configured size returns.
    async fn passed(&mut self, keys: i64) {
        if self.narrow_left > 0 {
            self.narrow_left -= keys;
            if self.narrow_left <= 0 {
                self.narrow_left = 0;
                self.limit = self.shared.pace.lock().await.throttle.chunk_rows();
                self.shared.progress.set_chunk_size(self.limit as u64);
            }
        }
    }

    /// What the recovery policy sees of a failed attempt now.
    fn situation(&self, f: &Failure) -> Situation {
        let shared = self.shared;
        Situation {
            problem: f.problem,
            span: match (&f.range, f.keys) {
                (Some((a, b)), _) if a == b => Span::Single,
                (Some(_), keys) => Span::Several {
                    keys: keys.unwrap_or(0),
                },
                (None, _) => Span::Unknown,
            },
            stopping: shared.shutdown.stop_requested(),
            attempts: self.attempt,
            max_attempts: shared.opts.max_attempts,
            outage: self.outage.map(|since| since.elapsed()),
            reconnect_for: shared.opts.reconnect_for,
            contention: self.contention.as_ref().map(|c| c.since.elapsed()),
            contention_budget: shared.contention_budget(),
            on_error: shared.job.on_error,
        }
    }

    /// Carries out what the recovery policy (`recovery::decide`) says about a failed attempt;
    /// Ok to try again, Err to stop the run.
    async fn recover(&mut self, f: Failure) -> Result<()> {
        let shared = self.shared;
        let name = self.name().to_string();
        let resume_at = match (&self.range, &self.cursor) {
            (_, Some(c)) => format!("after key {}", show_key(c)),
            (Some(r), None) => format!("at the saved cursor of key range {}", r.id),
            (None, None) => "where it stopped".into(),
        };
        let where_ = match &f.range {
            Some((a, b)) if a == b => format!("key {}", show_key(a)),
            Some((a, b)) => format!("keys {}..={}", show_key(a), show_key(b)),
            None => format!("the chunk {resume_at}"),
        };
        if let Some(class) = f.class().filter(|c| *c != ErrorClass::Fatal) {
            shared.progress.chunk_failed(class.label());
        }
        match recovery::decide(&self.situation(&f)) {
            // Stopping: nothing is in flight any more (the chunk failed), so there is nothing to
            // wait for; the caller's loop ends the walk.
            Action::LetGo => {
                shared.progress.log(&format!(
                    "{name}: lost the database while {} ({}) while stopping; nothing uncommitted was kept",
                    f.stage, f.text
                ));
                self.conn = None;
                Ok(())
            }
            Action::Reconnect { pause } => {
                if self.outage.is_none() {
                    self.outage = Some(Instant::now());
                    shared.progress.log(&format!("{name}: lost the database while {} ({}); waiting for it to come back (up to {}s)", f.stage, f.text, shared.opts.reconnect_for.as_secs()));
                }
                shared.progress.set_held(Some("waiting for database"));
                self.conn = None;
                shared.shutdown.sleep(pause).await;
                shared.progress.held("database_unavailable", pause);
                Ok(())
            }
            Action::Narrow { to, keys } => {
                self.limit = to;
                self.narrow_left = self.narrow_left.max(keys);
                shared.progress.set_chunk_size(self.limit as u64);
                shared.progress.log(&format!(
                    "{name}: {where_} failed while {} ({}); retrying in chunks of {} to narrow it down",
                    f.stage, f.text, self.limit
                ));
                Ok(())
            }
            Action::Skip => {
                let (key, _) = f.range.clone().expect("a single-key chunk has a range");
                self.skip(&key, &f).await
            }
            Action::OutlastContention { attempt, at_most } => {
                self.attempt = attempt;
                self.outlast_contention(&f, &where_, backoff(attempt).min(at_most))
                    .await;
                Ok(())
            }
            Action::RetryAfterBackoff { attempt } => {
                self.attempt = attempt;
                let delay = backoff(attempt);
                shared.progress.log(&format!(
                    "{name}: {where_} failed while {}: {}; retrying in {} ms (attempt {}/{})",
                    f.stage,
                    f.text,
                    delay.as_millis(),
                    attempt + 1,
                    shared.opts.max_attempts
                ));
                shared
                    .progress
                    .set_held(Some("retrying after a statement timeout"));
                shared.shutdown.sleep(delay).await;
                shared.progress.held("retry_backoff", delay);
                Ok(())
            }
            Action::Stop(stop) => {
                if let (Stop::ContentionBudget, Some(c)) = (stop, &self.contention) {
                    // The failed attempt waited for the lock: that is time held too.
                    shared
                        .progress
                        .held("lock_contention", c.unbooked.elapsed());
                }
                Err(self.stop_error(stop, &f, &where_, &resume_at))
            }
        }
    }

    /// The error a run ends with, saying where the next run resumes.
    fn stop_error(&self, stop: Stop, f: &Failure, where_: &str, resume_at: &str) -> Error {
        let name = self.name();
        match stop {
            Stop::Lost => store::lost(name),
            Stop::Stalled => stalled(name, &f.text),
            Stop::Unreachable => Error::Runtime(format!(
                "job {name}: the database has been unreachable for {}s (last error while {}: {}); gave up (--reconnect-for); nothing uncommitted was kept; run `backfill run {name}` again when it is back: it resumes {resume_at}",
                self.outage.map(|since| since.elapsed()).unwrap_or_default().as_secs(),
                f.stage,
                f.text
            )),
            Stop::ContentionBudget => {
                let budget = self.shared.contention_budget();
                Error::Runtime(format!(
                    "job {name}: {where_} kept meeting lock contention for {}s, the whole contention budget ({}; --contention-budget or the job's contention_budget), last while {}: {}; nothing of this chunk was committed; find the session holding the lock (pg_locks, pg_blocking_pids) or give a longer budget, then run `backfill run {name}` again: it resumes {resume_at}",
                    self.contention.as_ref().map(|c| c.since.elapsed()).unwrap_or_default().as_secs(),
                    humantime::format_duration(budget),
                    f.stage,
                    f.text
                ))
            }
            Stop::Attempts(attempts) => Error::Runtime(format!(
                "job {name}: {where_} failed while {} (gave up after {attempts} attempts, --max-attempts): {}; nothing of this chunk was committed; run `backfill run {name}` again (perhaps with a longer --statement-timeout): it resumes {resume_at}",
                f.stage, f.text
            )),
            // The key and the error go to the checkpoint's last_error and the run's history;
            // the failures table holds only skipped keys, which nothing else would revisit.
            Stop::PoisonKey => Error::Runtime(format!(
                "job {name}: key {} makes the statement fail: {}; every key before it is done (on_error = \"stop\"); fix the row or the statement and run again — it resumes at this key — or set on_error = \"skip\" to record such keys and go on",
                show_key(&f.range.as_ref().expect("a single-key chunk has a range").0),
                f.text
            )),
            Stop::Fatal => Error::Runtime(format!(
                "job {name}: {where_} failed while {}: {}; {}; nothing of this chunk was committed: `backfill run {name}` resumes {resume_at}",
                f.stage,
                f.text,
                db::advice(f.sqlstate.as_deref())
            )),
        }
    }

    /// Waits `delay` before the chunk that met lock contention is tried again, showing the run
    /// as held (a log line at most every `CONTENTION_LOG_EVERY`) and booking the time held.
    async fn outlast_contention(&mut self, f: &Failure, where_: &str, delay: Duration) {
        let shared = self.shared;
        let name = self.name().to_string();
        let budget = shared.contention_budget();
        let now = Instant::now();
        let first = self.contention.is_none();
        let c = self.contention.get_or_insert_with(|| Contention {
            since: now,
            reason: format!("lock contention on {where_}"),
            since_utc: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            logged: now,
            unbooked: now,
        });
        // The failed attempt waited for the lock: that is time held too.
        shared
            .progress
            .held("lock_contention", now.duration_since(c.unbooked));
        c.unbooked = now;
        let spent = c.since.elapsed();
        if first || c.logged.elapsed() >= CONTENTION_LOG_EVERY {
            c.logged = now;
            shared.progress.log(&format!(
                "{name}: {where_} failed while {}: {}; lock contention for {}s so far: retrying in {} ms, for up to {} in all",
                f.stage,
                f.text,
                spent.as_secs(),
                delay.as_millis(),
                humantime::format_duration(budget)
            ));
        }
        let shown = Shown {
            reason: c.reason.clone(),
            since: Some(c.since_utc.clone()),
        };
        {
            let mut pace = shared.pace.lock().await;
            pace.contended.insert(self.id, shown);
            // Not over another reason (a pause, a health signal): that one shows first.
            let other = pace
                .holding
                .as_ref()
                .is_some_and(|h| !pace.contended.values().any(|c| &c.reason == h));
            if !other {
                let shown = pace.contended.values().next().cloned();
                self.show_hold(&mut pace, shown).await;
            }
        }
        shared.shutdown.sleep(delay).await;
        let c = self.contention.as_mut().expect("set above");
        shared
            .progress
            .held("lock_contention", c.unbooked.elapsed());
        c.unbooked = Instant::now();
    }

    /// A data error at one key with `on_error = "skip"`: record it and move past it.
    async fn skip(&mut self, key: &KeyValue, f: &Failure) -> Result<()> {
        let shared = self.shared;
        let name = self.name().to_string();
        let poison = Poison {
            key,
            sqlstate: f.sqlstate.as_deref(),
            message: &f.text,
        };
        let range = self.range.expect("a range is held");
        let conn = match self.connection().await {
            Ok(c) => c,
            Err(_) => return Ok(()), // retried from the top once the database answers
        };
        match chunk::skip_key(conn, &shared.chunk, shared.store, &range, &poison).await {
            Ok(true) => {}
            Ok(false) => return Err(store::lost(&name)),
            // Nothing was committed: the chunk is tried again from the cursor (and
            // narrowed to this key again) once the lock or the database is back.
            Err(e)
                if matches!(
                    db::classify(&e),
                    ErrorClass::Contention | ErrorClass::Connection
                ) =>
            {
                shared.progress.log(&format!(
                    "{name}: recording the failure at key {} was interrupted ({}); trying again",
                    show_key(key),
                    db::describe(&e)
                ));
                return Ok(());
            }
            Err(e) => {
                return Err(db::error(
                    e,
                    format!("job {name}: recording the failure at key {}", show_key(key)),
                ))
            }
        }
        shared.progress.log(&format!(
            "{name}: skipped key {} ({}); recorded in the failures table — `backfill failures {name}` lists it, `backfill retry-failures {name}` retries it",
            show_key(key),
            f.text
        ));
        self.cursor = Some(key.clone());
        self.tally.skipped += 1;
        self.passed(1).await;
        shared.progress.key_skipped();
        Ok(())
    }
}

/// Jittered exponential backoff: random in [d/2, d] for d = base·2^(n-1), capped.
fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    let half = exp / 2;
    half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
}

/// How long the exact count of a job's rows may take before an estimate is used instead.
pub const EXACT_COUNT_WITHIN: Duration = Duration::from_secs(3);

/// The rows of the job's table, and whether the number is exact: counted when that takes less
/// than `exact_within`, else the planner's estimate, else (a table never analyzed) a count of a
/// 1 % page sample. Workers split ranges by these numbers, so "unknown" would leave one range.
/// A lost connection is an error, not "no estimate": the caller waits for the database and
/// tries again (taking it for a table never analyzed would misreport it and go on with a dead
/// session).
pub async fn estimate_rows(
    tx: &tokio_postgres::Transaction<'_>,
    job: &JobSpec,
    exact_within: Duration,
) -> Result<(Option<i64>, bool), tokio_postgres::Error> {
    let table = job.table.quoted();
    let lost = |e: &tokio_postgres::Error| db::classify(e) == ErrorClass::Connection;
    // In a savepoint: the timeout and a cancelled count end with it, the caller's work stays.
    let count = |sql: String, within: Duration| async move {
        let timeout = db::Timeouts {
            statement: Some(db::Limit::Within(within)),
            ..Default::default()
        };
        tx.batch_execute(&format!("SAVEPOINT bf_count; {}", timeout.set_local()))
            .await?;
        let r = tx.query_one(&sql, &[]).await;
        tx.batch_execute("ROLLBACK TO SAVEPOINT bf_count").await?;
        r.map(|row| row.get::<_, i64>(0))
    };
    match count(format!("SELECT count(*) FROM {table}"), exact_within).await {
        Ok(n) => return Ok((Some(n), true)),
        Err(e) if lost(&e) => return Err(e),
        Err(_) => {} // too slow: estimate instead
    }
    let planner = tx
        .query_one(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)",
            &[&table],
        )
        .await;
    match planner.map(|r| r.get::<_, i64>(0)) {
        Ok(n) if n >= 0 => return Ok((Some(n), false)),
        Err(e) if lost(&e) => return Err(e),
        _ => {} // never analyzed
    }
    // A hundredth of the pages: quick where the full count was not.
    let sql = format!("SELECT (count(*) * 100)::bigint FROM {table} TABLESAMPLE SYSTEM (1)");
    match count(sql, EXACT_COUNT_WITHIN).await {
        Ok(n) => Ok((Some(n), false)),
        Err(e) if lost(&e) => Err(e),
        Err(_) => Ok((None, false)),
    }
}

/// Re-runs only the keys a job recorded as failing; each success is marked resolved in the same
/// transaction as the statement, so a key is retried to success exactly once.
pub async fn retry_failures(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    opts: &RunOptions,
    progress: &Progress,
) -> Result<(usize, usize)> {
    let name = &job.name;
    let mut client = target.connect().await?;
    store.ensure(&mut client).await?;
    let keyset = Keyset::resolve(&client, job).await?;
    let statement = keyset.render(&job.sql);
    crate::undo::ensure_table(&client, store, job).await?;
    let undo_copy = crate::undo::copy_sql(store, job, &keyset);
    // The same timeouts as a chunk: the retried key is applied under the same limits.
    let set_local = chunk::chunk_timeouts(
        opts.lock_timeout.unwrap_or(job.lock_timeout),
        opts.statement_timeout.unwrap_or(job.statement_timeout),
    )
    .set_local();
    let failures = store.failures(&client, name, false).await?;
    let (mut fixed, mut still) = (0, 0);
    for f in &failures {
        let err = |e| db::error(e, format!("job {name}: retrying key {}", show_key(&f.key)));
        let tx = client.transaction().await.map_err(err)?;
        if !store.lock_failure(&tx, f.id).await.map_err(err)? {
            continue; // resolved meanwhile, or another retrier has it
        }
        tx.batch_execute(&set_local).await.map_err(err)?;
        tx.batch_execute("SAVEPOINT retry").await.map_err(err)?;
        let (from, to) = keyset.statement_bounds(&f.key, &f.key);
        let args: Vec<&(dyn ToSql + Sync)> = from
            .iter()
            .chain(to.iter())
            .map(|v| v as &(dyn ToSql + Sync))
            .collect();
        let applied = async {
            if let Some(copy) = &undo_copy {
                tx.execute(copy, &args).await?;
            }
            tx.execute(&statement, &args).await
        };
        match applied.await {
            Ok(_) => {
                store.resolve_failure(&tx, f.id).await.map_err(err)?;
                tx.commit().await.map_err(err)?;
                fixed += 1;
                progress.log(&format!(
                    "{name}: key {} now succeeds; resolved",
                    show_key(&f.key)
                ));
            }
            Err(e) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT retry")
                    .await
                    .map_err(err)?;
                let text = db::describe(&e);
                let poison = Poison {
                    key: &f.key,
                    sqlstate: db::sqlstate(&e),
                    message: &text,
                };
                store
                    .record_failure(&tx, name, None, &poison)
                    .await
                    .map_err(err)?;
                tx.commit().await.map_err(err)?;
                still += 1;
                progress.log(&format!(
                    "{name}: key {} still fails: {text}",
                    show_key(&f.key)
                ));
            }
        }
    }
    Ok((fixed, still))
}

fn describe_controls(c: &store::Controls) -> String {
    format!(
        "rows_per_second {}, target_chunk_time {}, pause {}",
        c.rows_per_second
            .map(|r| r.to_string())
            .unwrap_or_else(|| "(job's)".into()),
        c.target_chunk_time
            .map(|d| humantime::format_duration(d).to_string())
            .unwrap_or_else(|| "(job's)".into()),
        c.pause
            .map(|d| humantime::format_duration(d).to_string())
            .unwrap_or_else(|| "(job's)".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        // The README's numbers, written out: 200 ms doubling per attempt, at most 5 s, each
        // delay jittered between half of that and all of it.
        let ceilings_ms: [u64; 8] = [200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for (i, &ms) in ceilings_ms.iter().enumerate() {
            let attempt = i as u32 + 1;
            let seen: std::collections::BTreeSet<Duration> =
                (0..200).map(|_| backoff(attempt)).collect();
            for d in &seen {
                assert!(
                    *d >= Duration::from_millis(ms / 2) && *d <= Duration::from_millis(ms),
                    "attempt {attempt}: {d:?} outside {}..={ms} ms",
                    ms / 2
                );
            }
            assert!(seen.len() > 10, "attempt {attempt}: no jitter: {seen:?}");
        }
        for attempt in [20, 31, 32, 1000, u32::MAX] {
            let d = backoff(attempt);
            assert!(
                d >= Duration::from_millis(2500) && d <= Duration::from_secs(5),
                "attempt {attempt}: {d:?}"
            );
        }
    }
}
