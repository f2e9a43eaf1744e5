//! The chunk loop. A run joins the job (alongside any other live runs, on any host), fixes the
//! job's key range on its first run, and starts its workers. Each worker takes a key range (see
//! `store::ranges`: a free one, or half of the busiest) and walks it chunk by chunk; for each
//! chunk, in one transaction: lock the range and read its cursor → find the bounds by walking the
//! key's index → run the job's statement on them → advance the range's cursor → commit → report.
//! When no range is left, the run verifies and records the outcome.
//!
//! Exactly-once comes from the single transaction: the statement and the cursor advance commit
//! together or not at all, and the range row is locked and its owner checked inside that
//! transaction, so a chunk can never be applied twice — whatever crashes, kills, retries, splits
//! or takeovers happen around it. After any failure a worker simply goes on from the cursor as
//! committed (a COMMIT whose answer was lost may still have happened).
//!
//! The workers of a run share one pace: the rate ceiling (divided evenly among live runs), the
//! adaptive chunk size, the health signals and the live controls.
//!
//! What a failure does depends on its class (`db::classify`, by SQLSTATE):
//! - contention (lock timeout, deadlock, serialization, a saved plan gone stale under an
//!   `ALTER TABLE`): retry the chunk after a jittered backoff, at most `max_attempts` times in a
//!   row;
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

use crate::db::{self, ErrorClass, Target};
use crate::error::{Error, Result};
use crate::job::ThrottleSpec;
use crate::job::{JobSpec, OnError};
use crate::keyset::{self, show_key, KeyValue, Keyset};
use crate::signals::Shutdown;
use crate::store::{
    self, Acquired, Claim, LeaseState, Poison, RangeLease, Runner, Splitter, Store, Sweep,
};
use crate::telemetry::Progress;
use crate::throttle::{Hold, Throttle};
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
    /// Attempts per chunk for contention errors before the run fails.
    pub max_attempts: u32,
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
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_RECONNECT_FOR: Duration = Duration::from_secs(300);
/// The most workers one run may start (each holds a connection).
pub const MAX_WORKERS: u32 = 64;
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const RECONNECT_POLL_MAX: Duration = Duration::from_secs(2);
const LAG_SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How often a running job reads its controls (pause, cancel, new settings).
const CONTROLS_EVERY: Duration = Duration::from_millis(200);
/// How often a worker with nothing to take looks again (for a range freed by a runner that died).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// A range is split only when at least this many chunks are left in it.
const SPLIT_MIN_CHUNKS: i64 = 2;
/// Application sessions waiting for a lock that this session holds (other workers of the
/// engine, e.g. waiting to extend the table, are not the application: yielding would not help).
const BLOCKED_SQL: &str = "SELECT count(*) FROM pg_stat_activity
     WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()
       AND application_name IS DISTINCT FROM current_setting('application_name')
       AND pg_backend_pid() = ANY (pg_blocking_pids(pid))";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// Every key up to the bound was processed and `verify` (if any) returned 0.
    Done { verify_remaining: Option<i64> },
    /// Nothing to do: the job was already done.
    AlreadyDone,
    /// Every key was processed (and swept) but `verify` still counts rows to do.
    Incomplete { verify_remaining: i64, why: String },
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
        sql: ChunkSql {
            first_bounds: keyset.next_chunk_sql(false),
            next_bounds: keyset.next_chunk_sql(true),
            undo_copy: crate::undo::copy_sql(store, job, &keyset),
            statement: job.sql.render(&keyset),
            // A process that hangs inside a chunk (stopped, swapping, stuck) must not keep its
            // range's row locked forever: the server ends the idle transaction once the lease
            // has expired anyway, and another run can take the range.
            set_local: format!(
                "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}; SET LOCAL idle_in_transaction_session_timeout = {}",
                db::millis(lock_timeout),
                db::millis(statement_timeout),
                store::LEASE_TIMEOUT.as_millis()
            ),
        },
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
            lag_sampled: None,
            rate_shown: false,
        }),
        aborted: AtomicBool::new(false),
        range_finished: tokio::sync::Notify::new(),
    };
    // The main pass, then — while `verify` still counts rows (written behind the cursor by code
    // that does not fill the new column yet) — sweep passes over every key, up to max_sweeps.
    let mut tally = Tally::default();
    let mut verified: Option<Result<(), (i64, String)>> = None;
    let result = loop {
        let pass = shared.walk_all(chunk_rows as i64, &mut tally).await;
        if !matches!(pass, Ok(LoopEnd::Finished)) || job.verify.is_none() {
            break pass;
        }
        match shared.verify_and_sweep().await {
            Ok(AfterPass::Sweep) => continue,
            Ok(AfterPass::Verified) => verified = Some(Ok(())),
            Ok(AfterPass::Incomplete { remaining, why }) => verified = Some(Err((remaining, why))),
            Err(e) => break Err(e),
        }
        break pass;
    };
    drop(shared);

    // Record the end on a fresh session: the lease session belongs to the heartbeat (kept until
    // the outcome is saved), and the database may just be coming back.
    let finisher = match connect_patiently(target, opts.reconnect_for, progress).await {
        Ok(c) => c,
        Err(e) => {
            heartbeat.abort();
            return Err(e);
        }
    };
    let name = job.name.as_str();
    let end = |state: &'static str| progress.finish(state);
    let (state, error, remaining, outcome) = match result {
        Ok(LoopEnd::Cancelled) => ("cancelled", None, None, Ok(Outcome::Cancelled)),
        Ok(LoopEnd::Stopped) => ("stopped", None, None, Ok(Outcome::Stopped)),
        Ok(LoopEnd::Finished) => match verified {
            Some(Err((n, why))) => (
                "incomplete",
                Some(format!(
                    "every key up to the bound was processed, but {why}"
                )),
                Some(n),
                Ok(Outcome::Incomplete {
                    verify_remaining: n,
                    why,
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
/// refuses us: a wrong password does not get better by waiting).
async fn connect_patiently(
    target: &Target,
    patience: Duration,
    progress: &Progress,
) -> Result<tokio_postgres::Client> {
    let since = Instant::now();
    loop {
        match target.connect().await {
            Err(Error::Unavailable(_)) if since.elapsed() < patience => {
                progress.set_held(Some("waiting for database"));
                tokio::time::sleep(RECONNECT_POLL_MAX).await;
                progress.held("database_unavailable", RECONNECT_POLL_MAX);
            }
            done => return done,
        }
    }
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
}

impl Tally {
    fn add(&mut self, t: &Tally) {
        self.rows += t.rows;
        self.affected += t.affected;
        self.chunks += t.chunks;
        self.skipped += t.skipped;
    }
}

/// What stays fixed for every chunk of a run.
struct ChunkSql {
    first_bounds: String,
    next_bounds: String,
    /// Copies the chunk's old values of the job's undo columns (same parameters as `statement`).
    undo_copy: Option<String>,
    statement: String,
    set_local: String,
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
    sql: ChunkSql,
    pace: tokio::sync::Mutex<Pace>,
    /// A worker failed: the others stop after their chunk in flight.
    aborted: AtomicBool,
    /// A range was finished: idle workers look again at once (the job may be done).
    range_finished: tokio::sync::Notify,
}

impl Shared<'_> {
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
        let mut client =
            connect_patiently(self.target, self.opts.reconnect_for, self.progress).await?;
        store.set_phase(&client, name, "verifying").await?;
        let seen = store.sweeps(&client, name).await?;
        let n = crate::migrator::verify(&client, job, self.opts.verify_timeout).await?;
        if n == 0 {
            return Ok(AfterPass::Verified);
        }
        let incomplete = |why: String| {
            self.progress.log(&format!("{name}: {why}"));
            Ok(AfterPass::Incomplete { remaining: n, why })
        };
        if job.max_sweeps == 0 {
            return incomplete(format!(
                "verify counts {n} rows still to do; not swept (max_sweeps = 0)"
            ));
        }
        if let Some(why) = self.unsafe_to_sweep().await? {
            return incomplete(format!(
                "verify counts {n} rows still to do; not swept: {why}"
            ));
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
            Sweep::Exhausted { passes } => incomplete(format!(
                "verify still counts {n} rows to do after {passes} sweeps (max_sweeps = {})",
                job.max_sweeps
            )),
        }
    }

    /// Why applying the statement again to keys already done would be wrong, if it would. A
    /// sweep is for statements with a guard: the plan's probe runs the statement twice on the
    /// table's first chunk (rolled back), and the second execution must affect no row at all —
    /// a statement without a guard would overwrite what the application wrote since.
    async fn unsafe_to_sweep(&self) -> Result<Option<String>> {
        let plan = crate::plan::probe_first_chunk(self.target, self.job).await?;
        if let Some(f) = plan
            .findings
            .iter()
            .find(|f| f.code == "not_idempotent" || f.code == "statement_fails")
        {
            return Ok(Some(format!(
                "a sweep applies the statement again to every key, and {} — {}",
                f.message, f.fix
            )));
        }
        Ok(match plan.estimates.rows_reapplied {
            Some(0) => None,
            Some(n) => Some(format!(
                "a sweep applies the statement again to every key, and applied again to the first chunk it wrote {n} rows once more: without a guard (e.g. `AND status IS NULL`) a sweep would overwrite what the application wrote since the pass; add a guard, or fix the rows by hand"
            )),
            None => Some(
                "whether the statement is safe to apply twice could not be checked (no first chunk to probe)".into(),
            ),
        })
    }
}

/// What verify said after a pass.
enum AfterPass {
    /// Verify returned 0.
    Verified,
    /// A sweep pass is ready to walk.
    Sweep,
    /// Rows remain and no (further) sweep will run.
    Incomplete { remaining: i64, why: String },
}

/// The run's pace, shared by its workers: throttle, controls, and what `status` was told.
struct Pace {
    throttle: Throttle,
    /// When the controls were last read.
    controls_read: Option<Instant>,
    controls: store::Controls,
    /// The hold reason last written to the run's row.
    holding: Option<String>,
    /// When replication lag was last sampled.
    lag_sampled: Option<Instant>,
    rate_shown: bool,
}

/// What one chunk attempt came to.
enum Step {
    Committed(ChunkDone),
    /// No keys left in the range: it is marked done and let go.
    RangeDone,
}

struct ChunkDone {
    last: KeyValue,
    keys: i64,
    affected: i64,
    took: Duration,
    /// The chunk size asked for.
    asked: i64,
    /// Sessions that were waiting on this chunk's locks just before it committed.
    blocked: i64,
}

/// A failed attempt at a chunk, with what is known of where it failed.
struct Failure {
    class: ErrorClass,
    sqlstate: Option<String>,
    text: String,
    stage: &'static str,
    range: Option<(KeyValue, KeyValue)>,
    keys: Option<i64>,
}

enum ChunkError {
    Failed(Failure),
    /// The range is no longer this worker's: the run was declared gone and its ranges taken.
    Lost,
}

/// Turns a database error at `stage` of a chunk into a [`ChunkError`] naming the key range.
fn failed(
    stage: &'static str,
    chunk: Option<&(KeyValue, KeyValue, i64)>,
) -> impl FnOnce(tokio_postgres::Error) -> ChunkError {
    let chunk = chunk.cloned();
    move |e| {
        ChunkError::Failed(Failure {
            class: db::classify(&e),
            sqlstate: db::sqlstate(&e).map(str::to_string),
            text: db::describe(&e),
            stage,
            keys: chunk.as_ref().map(|c| c.2),
            range: chunk.map(|(a, b, _)| (a, b)),
        })
    }
}

/// A statement from the connection's statement cache, and whether an earlier transaction
/// prepared it (its saved plan may then be stale, see [`failed_cached`]). One prepared in this
/// transaction cannot be: the locks it took keep the tables from changing until the end.
async fn cached(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
) -> Result<(tokio_postgres::Statement, bool), tokio_postgres::Error> {
    let before = tx.statement_cache.size();
    let stmt = tx.prepare_cached(sql).await?;
    Ok((stmt, tx.statement_cache.size() == before))
}

/// Like [`failed`], for executing a statement from the cache. SQLSTATE 0A000 from a statement an
/// earlier transaction prepared means its saved plan went stale — the table changed under it,
/// e.g. `ALTER TABLE … ADD COLUMN` under `RETURNING *` ("cached plan must not change result
/// type"). That is transient: the connection's cache is emptied, so the retry prepares every
/// statement again, and the chunk is retried like contention (nothing of it was committed). A
/// 0A000 from a statement prepared afresh is a real "feature not supported" and stays fatal.
fn failed_cached(
    stage: &'static str,
    chunk: Option<&(KeyValue, KeyValue, i64)>,
    reused: bool,
    tx: &deadpool_postgres::Transaction<'_>,
) -> impl FnOnce(tokio_postgres::Error) -> ChunkError {
    let cache = tx.statement_cache.clone();
    let fail = failed(stage, chunk);
    move |e| {
        let stale = reused && db::sqlstate(&e) == Some("0A000");
        let mut error = fail(e);
        if let (true, ChunkError::Failed(f)) = (stale, &mut error) {
            cache.clear();
            f.class = ErrorClass::Contention;
            f.text = format!(
                "the statement's saved plan is stale, the table changed ({}); prepared again",
                f.text
            );
        }
        error
    }
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
    tally: Tally,
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
            if self.read_controls().await {
                return Ok(LoopEnd::Cancelled);
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
                    Err(ChunkError::Lost) => return Err(store::lost(&name)),
                    Err(ChunkError::Failed(f)) => {
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
                    self.range = None;
                    self.shared.range_finished.notify_waiters();
                }
                Err(ChunkError::Lost) => return Err(store::lost(&name)),
                Err(ChunkError::Failed(f)) => {
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
    async fn connection(&mut self) -> Result<&mut deadpool_postgres::Object, ChunkError> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = None;
            let conn = self.shared.pool.get().await.map_err(|e| {
                ChunkError::Failed(Failure {
                    class: ErrorClass::Connection,
                    sqlstate: match &e {
                        deadpool_postgres::PoolError::Backend(e) => {
                            db::sqlstate(e).map(str::to_string)
                        }
                        _ => None,
                    },
                    text: match &e {
                        deadpool_postgres::PoolError::Backend(e) => db::describe(e),
                        other => other.to_string(),
                    },
                    stage: "connecting",
                    range: None,
                    keys: None,
                })
            })?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Looks for a range to work on: a free one, or half of the busiest.
    async fn acquire(&mut self) -> Result<Acquired, ChunkError> {
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
    async fn step(&mut self) -> Result<Step, ChunkError> {
        let shared = self.shared;
        let range = self.range.expect("a range is held");
        let limit = self.limit;
        let conn = self.connection().await?;
        let token = conn.cancel_token();
        let chunk = run_chunk(conn, shared, &range, limit);
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
    /// settings. True: cancel.
    async fn read_controls(&mut self) -> bool {
        let shared = self.shared;
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
            return pace.controls.cancel;
        }
        let Some(conn) = self.conn.as_ref().filter(|c| !c.is_closed()) else {
            return false;
        };
        pace.controls_read = Some(Instant::now());
        if let Ok(c) = shared.store.controls(&***conn, &shared.job.name).await {
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
        }
        pace.controls.cancel
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
            let detail = hold.as_ref().map(|h| h.detail.clone());
            if detail != pace.holding {
                if let Some(conn) = self.conn.as_ref().filter(|c| !c.is_closed()) {
                    let _ = shared
                        .store
                        .set_hold(&***conn, shared.run_id, detail.as_deref())
                        .await;
                }
                match &detail {
                    Some(d) => shared.progress.log(&format!("{name}: holding: {d}")),
                    None => shared
                        .progress
                        .log(&format!("{name}: no longer held; continuing")),
                }
                shared.progress.set_held(detail.as_deref());
                pace.holding = detail;
            }
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

    /// Books a committed chunk and adapts the pace; returns the rest to take before the next.
    async fn committed(&mut self, done: ChunkDone) -> Duration {
        let shared = self.shared;
        self.attempt = 0;
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

    /// Decides what a failed attempt means; Ok to try again, Err to stop the run.
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
        let keys = f.keys.unwrap_or(0);
        let single = f.range.as_ref().is_some_and(|(a, b)| a == b);
        if f.class != ErrorClass::Fatal {
            shared.progress.chunk_failed(f.class.label());
        }
        match f.class {
            ErrorClass::Connection => {
                let first = self.outage.is_none();
                let since = *self.outage.get_or_insert_with(Instant::now);
                if since.elapsed() >= shared.opts.reconnect_for {
                    return Err(Error::Runtime(format!(
                        "job {name}: the database has been unreachable for {}s (last error while {}: {}); gave up (--reconnect-for); nothing uncommitted was kept; run `backfill run {name}` again when it is back: it resumes {resume_at}",
                        since.elapsed().as_secs(),
                        f.stage,
                        f.text
                    )));
                }
                if first {
                    shared.progress.log(&format!("{name}: lost the database while {} ({}); waiting for it to come back (up to {}s)", f.stage, f.text, shared.opts.reconnect_for.as_secs()));
                }
                shared.progress.set_held(Some("waiting for database"));
                self.conn = None;
                // Poll quickly at first (a terminated session reconnects at once), then every 2 s.
                let pause = (since.elapsed() / 2).clamp(BACKOFF_BASE, RECONNECT_POLL_MAX);
                shared.shutdown.sleep(pause).await;
                shared.progress.held("database_unavailable", pause);
                Ok(())
            }
            ErrorClass::Timeout | ErrorClass::Data if f.range.is_some() && !single => {
                self.limit = (keys / 2).max(1);
                self.narrow_left = self.narrow_left.max(keys);
                shared.progress.set_chunk_size(self.limit as u64);
                shared.progress.log(&format!(
                    "{name}: {where_} failed while {} ({}); retrying in chunks of {} to narrow it down",
                    f.stage, f.text, self.limit
                ));
                Ok(())
            }
            ErrorClass::Data if single => {
                let (key, _) = f.range.clone().expect("a single-key chunk has a range");
                self.poison(&key, &f).await
            }
            ErrorClass::Contention | ErrorClass::Timeout => {
                self.attempt += 1;
                if self.attempt >= shared.opts.max_attempts {
                    return Err(Error::Runtime(format!(
                        "job {name}: {where_} failed while {} (gave up after {} attempts): {}; nothing of this chunk was committed; run `backfill run {name}` again (perhaps with a longer --lock-timeout or --statement-timeout): it resumes {resume_at}",
                        f.stage, self.attempt, f.text
                    )));
                }
                let delay = backoff(self.attempt);
                shared.progress.log(&format!(
                    "{name}: {where_} failed while {}: {}; retrying in {} ms (attempt {}/{})",
                    f.stage,
                    f.text,
                    delay.as_millis(),
                    self.attempt + 1,
                    shared.opts.max_attempts
                ));
                shared.progress.set_held(Some("retrying after contention"));
                shared.shutdown.sleep(delay).await;
                shared.progress.held("retry_backoff", delay);
                Ok(())
            }
            ErrorClass::Data | ErrorClass::Fatal => Err(Error::Runtime(format!(
                "job {name}: {where_} failed while {}: {}; {}; nothing of this chunk was committed: `backfill run {name}` resumes {resume_at}",
                f.stage,
                f.text,
                db::advice(f.sqlstate.as_deref())
            ))),
        }
    }

    /// A data error at one key: stop there, or record it and move past it.
    async fn poison(&mut self, key: &KeyValue, f: &Failure) -> Result<()> {
        let shared = self.shared;
        let name = self.name().to_string();
        match shared.job.on_error {
            // The key and the error go to the checkpoint's last_error and the run's history;
            // the failures table holds only skipped keys, which nothing else would revisit.
            OnError::Stop => Err(Error::Runtime(format!(
                "job {name}: key {} makes the statement fail: {}; every key before it is done (on_error = \"stop\"); fix the row or the statement and run again — it resumes at this key — or set on_error = \"skip\" to record such keys and go on",
                show_key(key),
                f.text
            ))),
            OnError::Skip => {
                let poison = Poison { key, sqlstate: f.sqlstate.as_deref(), message: &f.text };
                let range = self.range.expect("a range is held");
                let conn = match self.connection().await {
                    Ok(c) => c,
                    Err(_) => return Ok(()), // retried from the top once the database answers
                };
                let recorded = async {
                    let tx = conn.transaction().await?;
                    tx.batch_execute(&shared.sql.set_local).await?;
                    let Some((cursor, _, _)) = shared.store.lock_range(&*tx, &name, &range).await? else {
                        return Ok(false);
                    };
                    if shared.store.skip_key(&*tx, &name, &range, cursor.as_ref(), &poison).await? != 1 {
                        return Ok(false);
                    }
                    tx.commit().await?;
                    Ok(true)
                };
                match recorded.await {
                    Ok(true) => {}
                    Ok(false) => return Err(store::lost(&name)),
                    // Nothing was committed: the chunk is tried again from the cursor (and
                    // narrowed to this key again) once the lock or the database is back.
                    Err(e) if matches!(db::classify(&e), ErrorClass::Contention | ErrorClass::Connection) => {
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
    }
}

/// Runs one chunk of at most `limit` keys of `range` in one transaction.
async fn run_chunk(
    conn: &mut deadpool_postgres::Object,
    shared: &Shared<'_>,
    range: &RangeLease,
    limit: i64,
) -> Result<Step, ChunkError> {
    let (store, job, sql) = (shared.store, shared.job.name.as_str(), &shared.sql);
    let started = Instant::now();
    let tx = conn
        .transaction()
        .await
        .map_err(failed("starting the transaction", None))?;
    tx.batch_execute(&sql.set_local)
        .await
        .map_err(failed("setting timeouts", None))?;
    let Some((cursor, upper, done)) = store
        .lock_range(&*tx, job, range)
        .await
        .map_err(failed("locking the key range", None))?
    else {
        let _ = tx.rollback().await;
        return Err(ChunkError::Lost);
    };
    let bounds_sql = match cursor {
        Some(_) => &sql.next_bounds,
        None => &sql.first_bounds,
    };
    let row = if done {
        None
    } else {
        let params = keyset::next_chunk_params(cursor.as_ref(), &upper, &limit);
        let (stmt, reused) = cached(&tx, bounds_sql)
            .await
            .map_err(failed("finding the chunk bounds", None))?;
        let row = tx.query_one(&stmt, &params).await.map_err(failed_cached(
            "finding the chunk bounds",
            None,
            reused,
            &tx,
        ))?;
        let first: Option<KeyValue> = row.get(1);
        first.map(|first| (row.get::<_, i64>(0), first, row.get::<_, KeyValue>(2)))
    };
    let Some((keys, first, last)) = row else {
        store
            .range_done(&*tx, job, range)
            .await
            .map_err(failed("closing the key range", None))?;
        tx.commit()
            .await
            .map_err(failed("closing the key range", None))?;
        return Ok(Step::RangeDone);
    };
    let chunk: (KeyValue, KeyValue, i64) = (first, last, keys);
    let at = Some(&chunk);
    let (from, to) = shared.keyset.statement_bounds(&chunk.0, &chunk.1);
    let args: Vec<&(dyn ToSql + Sync)> = from
        .iter()
        .chain(to.iter())
        .map(|v| v as &(dyn ToSql + Sync))
        .collect();
    if let Some(copy) = &sql.undo_copy {
        let (stmt, reused) = cached(&tx, copy)
            .await
            .map_err(failed("preparing the undo copy", at))?;
        tx.execute(&stmt, &args).await.map_err(failed_cached(
            "copying the rows' old values to the undo table",
            at,
            reused,
            &tx,
        ))?;
    }
    let (stmt, reused) = cached(&tx, &sql.statement)
        .await
        .map_err(failed("preparing the job's statement", at))?;
    let affected = tx.execute(&stmt, &args).await.map_err(failed_cached(
        "running the job's statement",
        at,
        reused,
        &tx,
    ))? as i64;

    // Application sessions queued behind this chunk's row locks: commit now (which releases
    // them) and tell the caller, which yields by shrinking the next chunks.
    let blocked: i64 = tx
        .query_one(BLOCKED_SQL, &[])
        .await
        .map_err(failed("looking for blocked sessions", at))?
        .get(0);
    let step = store::Advance {
        previous: cursor.as_ref(),
        last: &chunk.1,
        keys,
        affected,
        chunk_rows: limit.min(i32::MAX as i64) as i32,
    };
    let advanced = store
        .advance(&*tx, job, range, step)
        .await
        .map_err(failed("saving the checkpoint", at))?;
    if advanced != 1 {
        let _ = tx.rollback().await;
        return Err(ChunkError::Lost);
    }
    tx.commit().await.map_err(failed("committing", at))?;
    Ok(Step::Committed(ChunkDone {
        last: chunk.1,
        keys,
        affected,
        took: started.elapsed(),
        asked: limit,
        blocked,
    }))
}

/// Awaits `fut`; if a cancel is requested meanwhile, asks the server to cancel the session's
/// statement and keeps awaiting, so the transaction ends cleanly (dropping the future would not
/// stop the server and could leave the transaction half-open).
async fn cancellable<T>(
    fut: impl std::future::Future<Output = T>,
    token: &tokio_postgres::CancelToken,
    target: &Target,
    shutdown: &Shutdown,
) -> T {
    tokio::pin!(fut);
    tokio::select! {
        r = &mut fut => return r,
        _ = shutdown.cancelled() => {}
    }
    target.cancel(token).await;
    fut.await
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
        tx.batch_execute(&format!(
            "SAVEPOINT bf_count; SET LOCAL statement_timeout = {}",
            db::millis(within)
        ))
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
    let statement = job.sql.render(&keyset);
    crate::undo::ensure_table(&client, store, job).await?;
    let undo_copy = crate::undo::copy_sql(store, job, &keyset);
    let set_local = format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
        db::millis(opts.lock_timeout.unwrap_or(job.lock_timeout)),
        db::millis(opts.statement_timeout.unwrap_or(job.statement_timeout))
    );
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
        for attempt in 1..20 {
            let d = backoff(attempt);
            let cap = BACKOFF_BASE
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(BACKOFF_MAX);
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} vs {cap:?}"
            );
        }
        assert!(backoff(30) <= BACKOFF_MAX);
    }
}
