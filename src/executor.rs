//! The chunk loop: claim the job → fix its key range → for each chunk, in one transaction: find the
//! bounds by walking the key's index, run the job's statement on them, advance the checkpoint →
//! commit → report. Then verify and record the outcome.
//!
//! Exactly-once comes from the single transaction: the statement and the checkpoint advance commit
//! together or not at all, and the advance is guarded by the run id and the previous cursor, so a
//! chunk can never be applied twice, whatever crashes, kills or retries happen around it. After any
//! failure the loop continues from the cursor *as committed* (a COMMIT whose answer was lost may
//! still have happened).
//!
//! What a failure does depends on its class (`db::classify`, by SQLSTATE):
//! - contention (lock timeout, deadlock, serialization): retry the chunk after a jittered backoff,
//!   at most `max_attempts` times in a row;
//! - connection lost or server restarting: wait for the database ("waiting for database") and go
//!   on, for up to `reconnect_for`;
//! - statement timeout or a data error in a chunk of several keys: halve the chunk and go on; the
//!   halves that succeed commit, so the failure narrows to the smallest failing range. Once past
//!   the range that failed, the chunk size returns to the configured one;
//! - a data error at a single key (a poison row): `on_error = "stop"` records it and stops;
//!   `"skip"` records it and moves the cursor past it, in one transaction;
//! - anything else (read-only server, permission denied, table dropped, disk full): stop with the
//!   reason; progress is kept.

use crate::db::{self, ErrorClass, Target};
use crate::error::{Error, Result};
use crate::job::ThrottleSpec;
use crate::job::{JobSpec, OnError};
use crate::keyset::{self, show_key, KeyValue, Keyset};
use crate::signals::Shutdown;
use crate::store::{self, Claim, LeaseState, Poison, Runner, Store};
use crate::telemetry::Progress;
use crate::throttle::{Hold, Throttle};
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
        }
    }
}

pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_RECONNECT_FOR: Duration = Duration::from_secs(300);
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const RECONNECT_POLL_MAX: Duration = Duration::from_secs(2);
const LAG_SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How often a running job reads its controls (pause, cancel, new settings).
const CONTROLS_EVERY: Duration = Duration::from_millis(200);
/// Sessions waiting for a lock that this session holds.
const BLOCKED_SQL: &str = "SELECT count(*) FROM pg_stat_activity
     WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()
       AND pg_backend_pid() = ANY (pg_blocking_pids(pid))";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// Every key up to the bound was processed and `verify` (if any) returned 0.
    Done { verify_remaining: Option<i64> },
    /// Nothing to do: the job was already done.
    AlreadyDone,
    /// Every key was processed but `verify` still counts rows to do.
    Incomplete { verify_remaining: i64 },
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
    /// Keys processed by this run.
    pub rows: i64,
    /// Rows the statement reported changing in this run.
    pub rows_affected: i64,
    pub chunks: i64,
    /// Poison keys this run skipped (`on_error = "skip"`).
    pub skipped: i64,
    pub elapsed_seconds: f64,
    /// Keys processed by all runs of the job.
    pub rows_done_total: i64,
    pub cursor: Option<KeyValue>,
}

/// Runs (or resumes) a job to completion, a stop, or a failure.
pub async fn run(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    opts: &RunOptions,
    shutdown: &Shutdown,
    progress: &Progress,
) -> Result<Report> {
    let started = Instant::now();
    let mut lease = target.connect().await?;
    store.ensure(&mut lease).await?;
    let keyset = Keyset::resolve(&lease, job).await?;
    let runner = Runner::this_process();
    let claim = store
        .claim(&mut lease, job, &runner, opts.allow_changed_definition)
        .await?;
    let (run_id, checkpoint) = match claim {
        Claim::Owned { run_id, checkpoint } => (run_id, checkpoint),
        Claim::AlreadyDone(c) => {
            return Ok(Report {
                job: job.name.clone(),
                outcome: Outcome::AlreadyDone,
                rows: 0,
                rows_affected: 0,
                chunks: 0,
                skipped: 0,
                elapsed_seconds: started.elapsed().as_secs_f64(),
                rows_done_total: c.rows_done,
                cursor: c.cursor,
            })
        }
    };
    let lease_state = Arc::new(LeaseState::default());
    let heartbeat = tokio::spawn(store.clone().keep_lease(
        target.clone(),
        lease,
        job.name.clone(),
        run_id,
        opts.reconnect_for,
        lease_state.clone(),
    ));

    let pool = target.pool(2)?;
    let mut walk = Walk {
        target,
        store,
        job,
        opts,
        run_id,
        shutdown,
        progress,
        lease: &lease_state,
        pool,
        conn: None,
        cursor: checkpoint.cursor.clone(),
        resync: false,
        limit: opts.chunk_rows.unwrap_or(job.chunk_rows) as i64,
        narrow_left: 0,
        attempt: 0,
        outage: None,
        lag_sampled: None,
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
            opts.chunk_rows.unwrap_or(job.chunk_rows),
            job.table.quoted(),
        ),
        controls_read: None,
        controls: store::Controls::default(),
        holding: None,
        tally: Tally {
            rows_done_total: checkpoint.rows_done,
            ..Tally::default()
        },
    };
    let result = walk.drive(&keyset, &checkpoint).await;
    heartbeat.abort();
    let tally = walk.tally;
    let cursor = walk.cursor;
    let conn = walk.conn.take();
    drop(conn);

    let report = |outcome| Report {
        job: job.name.clone(),
        outcome,
        rows: tally.rows,
        rows_affected: tally.affected,
        chunks: tally.chunks,
        skipped: tally.skipped,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        rows_done_total: tally.rows_done_total,
        cursor: cursor.clone(),
    };
    // Record the end on a fresh session: the lease session belongs to the (aborted) heartbeat,
    // and the database may just be coming back.
    let finisher = connect_patiently(target, opts.reconnect_for, progress).await?;
    let name = job.name.as_str();
    match result {
        Ok(LoopEnd::Cancelled) => {
            progress.finish("cancelled");
            store
                .finish(&finisher, name, run_id, "cancelled", None, None)
                .await?;
            Ok(report(Outcome::Cancelled))
        }
        Ok(LoopEnd::Stopped) => {
            progress.finish("stopped");
            store
                .finish(&finisher, name, run_id, "stopped", None, None)
                .await?;
            Ok(report(Outcome::Stopped))
        }
        Ok(LoopEnd::Finished) => {
            let remaining = match &job.verify {
                None => None,
                Some(_) => match crate::migrator::verify(&finisher, job, opts.verify_timeout).await
                {
                    Ok(n) => Some(n),
                    Err(e) => {
                        progress.finish("failed");
                        store
                            .finish(
                                &finisher,
                                name,
                                run_id,
                                "failed",
                                Some(&e.to_string()),
                                None,
                            )
                            .await?;
                        return Err(e);
                    }
                },
            };
            match remaining {
                Some(n) if n > 0 => {
                    let msg = format!(
                        "every key up to the bound was processed, but verify still counts {n} rows to do"
                    );
                    progress.finish("incomplete");
                    store
                        .finish(&finisher, name, run_id, "incomplete", Some(&msg), Some(n))
                        .await?;
                    Ok(report(Outcome::Incomplete {
                        verify_remaining: n,
                    }))
                }
                _ => {
                    progress.finish("done");
                    store
                        .finish(&finisher, name, run_id, "done", None, remaining)
                        .await?;
                    Ok(report(Outcome::Done {
                        verify_remaining: remaining,
                    }))
                }
            }
        }
        Err(e) => {
            progress.finish("failed");
            if let Err(save) = store
                .finish(
                    &finisher,
                    name,
                    run_id,
                    "failed",
                    Some(&e.to_string()),
                    None,
                )
                .await
            {
                progress.log(&format!("warning: {save}"));
            }
            Err(e)
        }
    }
}

/// Connects, retrying for up to `patience` while the database is unreachable.
async fn connect_patiently(
    target: &Target,
    patience: Duration,
    progress: &Progress,
) -> Result<tokio_postgres::Client> {
    let since = Instant::now();
    loop {
        match target.connect().await {
            Ok(c) => return Ok(c),
            Err(e) if since.elapsed() >= patience => return Err(e),
            Err(_) => {
                progress.set_held(Some("waiting for database"));
                tokio::time::sleep(RECONNECT_POLL_MAX).await;
                progress.held("database_unavailable", RECONNECT_POLL_MAX);
            }
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
    rows_done_total: i64,
}

/// What stays fixed for every chunk of a run.
struct ChunkSql {
    first_bounds: String,
    next_bounds: String,
    statement: String,
    set_local: String,
    upper: KeyValue,
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
    /// The checkpoint advance matched no row: another runner owns the job now.
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

/// The state of one run's walk over the key range.
struct Walk<'a> {
    target: &'a Target,
    store: &'a Store,
    job: &'a JobSpec,
    opts: &'a RunOptions,
    run_id: i64,
    shutdown: &'a Shutdown,
    progress: &'a Progress,
    lease: &'a LeaseState,
    pool: db::Pool,
    conn: Option<deadpool_postgres::Object>,
    /// The last key committed (None: before the first key).
    cursor: Option<KeyValue>,
    /// After a failure: re-read the cursor from the checkpoint before the next chunk.
    resync: bool,
    /// Keys per chunk now.
    limit: i64,
    /// Keys still inside a range that failed at a larger size; the size is restored after them.
    narrow_left: i64,
    /// Consecutive failed attempts at the same chunk.
    attempt: u32,
    /// When the database became unreachable, while it is.
    outage: Option<Instant>,
    /// When replication lag was last sampled.
    lag_sampled: Option<Instant>,
    throttle: Throttle,
    /// When the controls were last read.
    controls_read: Option<Instant>,
    controls: store::Controls,
    /// The hold reason last written to the checkpoint.
    holding: Option<String>,
    tally: Tally,
}

impl Walk<'_> {
    fn name(&self) -> &str {
        &self.job.name
    }

    fn configured_limit(&self) -> i64 {
        self.throttle.chunk_rows()
    }

    async fn drive(&mut self, keyset: &Keyset, checkpoint: &store::Checkpoint) -> Result<LoopEnd> {
        let Some((upper, total)) = self.key_range(keyset, checkpoint).await? else {
            return Ok(LoopEnd::Finished);
        };
        let name = self.name().to_string();
        self.progress.start(
            checkpoint.rows_done.max(0) as u64,
            total.map(|t| t.max(0) as u64),
            self.limit as u64,
        );
        if let Some(c) = &checkpoint.cursor {
            self.progress.log(&format!(
                "{name}: resuming after key {} ({} rows already done)",
                show_key(c),
                checkpoint.rows_done
            ));
        }
        let lock_timeout = self.opts.lock_timeout.unwrap_or(self.job.lock_timeout);
        let statement_timeout = self
            .opts
            .statement_timeout
            .unwrap_or(self.job.statement_timeout);
        let sql = ChunkSql {
            first_bounds: keyset.next_chunk_sql(false),
            next_bounds: keyset.next_chunk_sql(true),
            statement: self.job.sql.render(keyset),
            set_local: format!(
                "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
                db::millis(lock_timeout),
                db::millis(statement_timeout)
            ),
            upper,
        };
        loop {
            if self.shutdown.stop_requested() {
                return Ok(LoopEnd::Stopped);
            }
            if self.lease.is_lost() {
                return Err(store::lost(&name));
            }
            if self.read_controls().await {
                return Ok(LoopEnd::Cancelled);
            }
            if self.tally.chunks == 0 {
                self.progress
                    .set_rate_limit(self.throttle.spec().rows_per_second);
            }
            if self.hold_while_unhealthy().await? {
                continue;
            }
            self.sample_replication_lag().await;
            if self.narrow_left == 0 {
                self.limit = self.configured_limit();
            }
            let waited = self.throttle.admit(self.limit).await;
            self.progress.held("rate_limit", waited);
            match self.step(&sql).await {
                Ok(Some(done)) => {
                    let took = done.took;
                    self.committed(done);
                    let rest = self.throttle.rest(took);
                    if !rest.is_zero() {
                        self.shutdown.sleep(rest).await;
                        self.progress.held("pause", rest);
                    }
                }
                Ok(None) => return Ok(LoopEnd::Finished),
                Err(ChunkError::Lost) => return Err(store::lost(&name)),
                Err(ChunkError::Failed(f)) => {
                    if self.shutdown.cancel_requested() && f.sqlstate.as_deref() == Some("57014") {
                        return Ok(LoopEnd::Stopped);
                    }
                    self.recover(f, &sql).await?;
                }
            }
        }
    }

    /// The upper bound and the row estimate, taken on the first run and kept in the checkpoint.
    /// None when the table was empty at the start.
    async fn key_range(
        &mut self,
        keyset: &Keyset,
        checkpoint: &store::Checkpoint,
    ) -> Result<Option<(KeyValue, Option<i64>)>> {
        let name = self.name().to_string();
        if checkpoint.bound_taken {
            return Ok(checkpoint
                .upper_bound
                .clone()
                .map(|u| (u, checkpoint.total_estimate)));
        }
        let conn = self.target.get(&self.pool).await?;
        // Rows inserted after this moment, beyond the bound, are left to the application (which
        // writes new rows correctly once the expand step is deployed) and to `verify`.
        let upper: Option<KeyValue> = conn
            .query_opt(&keyset.last_key_sql(), &[])
            .await
            .map_err(|e| {
                db::error(
                    e,
                    format!("job {name}: finding the last key of {}", self.job.table),
                )
            })?
            .map(|r| r.get(0));
        let (total, exact) = estimate_rows(&conn, self.job).await;
        self.store
            .set_bound(&**conn, &name, self.run_id, upper.as_ref(), total, exact)
            .await?;
        match &upper {
            Some(u) => self.progress.log(&format!(
                "{name}: processing keys up to {} (~{} rows)",
                show_key(u),
                total.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
            )),
            None => self.progress.log(&format!(
                "{name}: table {} was empty when the job started; nothing to do",
                self.job.table
            )),
        }
        self.conn = Some(conn);
        Ok(upper.map(|u| (u, total)))
    }

    /// One attempt: a connection, the committed cursor if in doubt, then one chunk.
    async fn step(&mut self, sql: &ChunkSql) -> Result<Option<ChunkDone>, ChunkError> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = None;
            let conn = self.pool.get().await.map_err(|e| {
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
        let conn = self.conn.as_mut().expect("connected above");
        if self.resync {
            // The failure may have hit after COMMIT reached the server: go on from what was committed.
            let (cursor, owned) = self
                .store
                .committed_cursor(&***conn, &self.job.name, self.run_id)
                .await
                .map_err(failed("re-reading the checkpoint", None))?;
            if !owned {
                return Err(ChunkError::Lost);
            }
            self.cursor = cursor;
            self.resync = false;
        }
        let token = conn.cancel_token();
        let chunk = run_chunk(
            conn,
            self.store,
            &self.job.name,
            self.run_id,
            sql,
            self.cursor.as_ref(),
            self.limit,
        );
        cancellable(chunk, &token, self.target, self.shutdown).await
    }

    /// Every few seconds, the largest replay lag of the streaming standbys, for the metrics.
    /// (Unreadable without pg_monitor's rights on other roles' senders; then not reported.)
    async fn sample_replication_lag(&mut self) {
        if self
            .lag_sampled
            .is_some_and(|t| t.elapsed() < LAG_SAMPLE_EVERY)
        {
            return;
        }
        self.lag_sampled = Some(Instant::now());
        let Some(conn) = self.conn.as_ref().filter(|c| !c.is_closed()) else {
            return;
        };
        let sql = "SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8 FROM pg_stat_replication";
        if let Ok(row) = conn.query_one(sql, &[]).await {
            self.progress.replication_lag(row.get(0));
        }
    }

    /// Reads the job's controls (at most every 0.2 s) and applies new settings. True: cancel.
    async fn read_controls(&mut self) -> bool {
        if self
            .controls_read
            .is_some_and(|t| t.elapsed() < CONTROLS_EVERY)
        {
            return self.controls.cancel;
        }
        let Some(conn) = self.conn.as_ref().filter(|c| !c.is_closed()) else {
            return false;
        };
        self.controls_read = Some(Instant::now());
        if let Ok(c) = self.store.controls(&***conn, &self.job.name).await {
            if c != self.controls {
                self.throttle.apply(&c);
                self.progress
                    .set_chunk_size(self.throttle.chunk_rows() as u64);
                self.progress
                    .set_rate_limit(self.throttle.spec().rows_per_second);
                if c.rows_per_second != self.controls.rows_per_second
                    || c.target_chunk_time != self.controls.target_chunk_time
                    || c.pause != self.controls.pause
                {
                    self.progress.log(&format!(
                        "{}: new settings from `backfill set`: {}",
                        self.name(),
                        describe_controls(&c)
                    ));
                }
                self.controls = c;
            }
        }
        self.controls.cancel
    }

    /// Holds while paused or while a health signal says so. True when it held (the caller
    /// re-checks stop, cancel and ownership before going on).
    async fn hold_while_unhealthy(&mut self) -> Result<bool> {
        let hold = if self.controls.paused {
            Some(Hold {
                reason: "paused",
                detail: format!(
                    "paused by `backfill pause` (resume with `backfill resume {}`)",
                    self.name()
                ),
            })
        } else {
            match self.conn.as_ref().filter(|c| !c.is_closed()) {
                Some(conn) => self.throttle.check(conn).await,
                None => None,
            }
        };
        let detail = hold.as_ref().map(|h| h.detail.clone());
        if detail != self.holding {
            if let Some(conn) = self.conn.as_ref().filter(|c| !c.is_closed()) {
                let _ = self
                    .store
                    .set_hold(&***conn, &self.job.name, self.run_id, detail.as_deref())
                    .await;
            }
            match &detail {
                Some(d) => self.progress.log(&format!("{}: holding: {d}", self.name())),
                None => self
                    .progress
                    .log(&format!("{}: no longer held; continuing", self.name())),
            }
            self.progress.set_held(detail.as_deref());
            self.holding = detail;
        }
        let Some(hold) = hold else { return Ok(false) };
        let nap = self
            .throttle
            .spec()
            .check_interval
            .min(Duration::from_millis(500));
        self.shutdown.sleep(nap).await;
        self.progress.held(hold.reason, nap);
        Ok(true)
    }

    fn committed(&mut self, done: ChunkDone) {
        self.attempt = 0;
        if self.outage.take().is_some() {
            self.progress
                .log(&format!("{}: database is back; continuing", self.name()));
        }
        self.tally.rows += done.keys;
        self.tally.affected += done.affected;
        self.tally.chunks += 1;
        self.tally.rows_done_total += done.keys;
        self.cursor = Some(done.last);
        if done.blocked > 0 {
            let size = self.throttle.shrink();
            self.progress.log(&format!(
                "{}: {} application session(s) waited on this chunk's locks; chunks shrink to {size} keys",
                self.name(),
                done.blocked
            ));
        } else if self.narrow_left == 0 {
            self.throttle.adapt(done.keys, done.asked, done.took);
        }
        self.passed(done.keys);
        self.progress
            .chunk_committed(done.keys as u64, done.affected.max(0) as u64, done.took);
    }

    /// Counts keys passed inside a narrowed range; past it, the configured size returns.
    fn passed(&mut self, keys: i64) {
        if self.narrow_left > 0 {
            self.narrow_left -= keys;
            if self.narrow_left <= 0 {
                self.narrow_left = 0;
                self.limit = self.configured_limit();
                self.progress.set_chunk_size(self.limit as u64);
            }
        }
    }

    /// Decides what a failed attempt means; Ok to try again, Err to stop the run.
    async fn recover(&mut self, f: Failure, sql: &ChunkSql) -> Result<()> {
        let name = self.name().to_string();
        self.resync = true;
        let resume_at = self
            .cursor
            .as_deref()
            .map(|c| format!("after key {}", show_key(c)))
            .unwrap_or_else(|| "at the first key".into());
        let where_ = match &f.range {
            Some((a, b)) if a == b => format!("key {}", show_key(a)),
            Some((a, b)) => format!("keys {}..={}", show_key(a), show_key(b)),
            None => format!("the chunk {resume_at}"),
        };
        let keys = f.keys.unwrap_or(0);
        if f.class != ErrorClass::Fatal {
            self.progress.chunk_failed(f.class.label());
        }
        match f.class {
            ErrorClass::Connection => {
                let first = self.outage.is_none();
                let since = *self.outage.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.opts.reconnect_for {
                    return Err(Error::Runtime(format!(
                        "job {name}: the database has been unreachable for {}s (last error while {}: {}); gave up (--reconnect-for); nothing uncommitted was kept; run `backfill run {name}` again when it is back: it resumes {resume_at}",
                        since.elapsed().as_secs(),
                        f.stage,
                        f.text
                    )));
                }
                if first {
                    self.progress.log(&format!("{name}: lost the database while {} ({}); waiting for it to come back (up to {}s)", f.stage, f.text, self.opts.reconnect_for.as_secs()));
                }
                self.progress.set_held(Some("waiting for database"));
                self.conn = None;
                // Poll quickly at first (a terminated session reconnects at once), then every 2 s.
                let pause = (since.elapsed() / 2).clamp(BACKOFF_BASE, RECONNECT_POLL_MAX);
                self.shutdown.sleep(pause).await;
                self.progress.held("database_unavailable", pause);
                Ok(())
            }
            ErrorClass::Timeout | ErrorClass::Data if keys > 1 => {
                self.limit = (keys / 2).max(1);
                self.narrow_left = self.narrow_left.max(keys);
                self.progress.set_chunk_size(self.limit as u64);
                self.progress.log(&format!(
                    "{name}: {where_} failed while {} ({}); retrying in chunks of {} to narrow it down",
                    f.stage, f.text, self.limit
                ));
                Ok(())
            }
            ErrorClass::Data if keys == 1 => {
                let (key, _) = f.range.clone().expect("a chunk of one key has a range");
                self.poison(&key, &f, sql).await
            }
            ErrorClass::Contention | ErrorClass::Timeout => {
                self.attempt += 1;
                if self.attempt >= self.opts.max_attempts {
                    return Err(Error::Runtime(format!(
                        "job {name}: {where_} failed while {} (gave up after {} attempts): {}; nothing of this chunk was committed; run `backfill run {name}` again (perhaps with a longer --lock-timeout or --statement-timeout): it resumes {resume_at}",
                        f.stage, self.attempt, f.text
                    )));
                }
                let delay = backoff(self.attempt);
                self.progress.log(&format!(
                    "{name}: {where_} failed while {}: {}; retrying in {} ms (attempt {}/{})",
                    f.stage,
                    f.text,
                    delay.as_millis(),
                    self.attempt + 1,
                    self.opts.max_attempts
                ));
                self.progress.set_held(Some("retrying after contention"));
                self.shutdown.sleep(delay).await;
                self.progress.held("retry_backoff", delay);
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
    async fn poison(&mut self, key: &KeyValue, f: &Failure, sql: &ChunkSql) -> Result<()> {
        let name = self.name().to_string();
        match self.job.on_error {
            // The key and the error go to the checkpoint's last_error and the run's history;
            // the failures table holds only skipped keys, which nothing else would revisit.
            OnError::Stop => Err(Error::Runtime(format!(
                "job {name}: key {} makes the statement fail: {}; every key before it is done (on_error = \"stop\"); fix the row or the statement and run again — it resumes at this key — or set on_error = \"skip\" to record such keys and go on",
                show_key(key),
                f.text
            ))),
            OnError::Skip => {
                let save = |e| db::error(e, format!("job {name}: recording the failure at key {}", show_key(key)));
                let poison = Poison { key, sqlstate: f.sqlstate.as_deref(), message: &f.text };
                if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
                    self.conn = Some(self.target.get(&self.pool).await?);
                }
                let conn = self.conn.as_mut().expect("connected above");
                let tx = conn.transaction().await.map_err(save)?;
                tx.batch_execute(&sql.set_local).await.map_err(save)?;
                let (cursor, owned) = self
                    .store
                    .committed_cursor(&*tx, &name, self.run_id)
                    .await
                    .map_err(save)?;
                if !owned {
                    return Err(store::lost(&name));
                }
                if self
                    .store
                    .skip_key(&*tx, &name, self.run_id, cursor.as_ref(), &poison)
                    .await
                    .map_err(save)?
                    != 1
                {
                    return Err(store::lost(&name));
                }
                tx.commit().await.map_err(save)?;
                self.progress.log(&format!(
                    "{name}: skipped key {} ({}); recorded in the failures table — `backfill failures {name}` lists it, `backfill retry-failures {name}` retries it",
                    show_key(key),
                    f.text
                ));
                self.cursor = Some(key.clone());
                self.resync = false;
                self.tally.skipped += 1;
                self.tally.rows_done_total += 1;
                self.passed(1);
                self.progress.key_skipped();
                Ok(())
            }
        }
    }
}

/// Runs one chunk of at most `limit` keys in one transaction. `Ok(None)`: no keys left.
async fn run_chunk(
    conn: &mut deadpool_postgres::Object,
    store: &Store,
    job: &str,
    run_id: i64,
    sql: &ChunkSql,
    cursor: Option<&KeyValue>,
    limit: i64,
) -> Result<Option<ChunkDone>, ChunkError> {
    let started = Instant::now();
    let tx = conn
        .transaction()
        .await
        .map_err(failed("starting the transaction", None))?;
    tx.batch_execute(&sql.set_local)
        .await
        .map_err(failed("setting timeouts", None))?;

    let bounds_sql = match cursor {
        Some(_) => &sql.next_bounds,
        None => &sql.first_bounds,
    };
    let params = keyset::next_chunk_params(cursor, &sql.upper, &limit);
    let stmt = tx
        .prepare_cached(bounds_sql)
        .await
        .map_err(failed("finding the chunk bounds", None))?;
    let row = tx
        .query_one(&stmt, &params)
        .await
        .map_err(failed("finding the chunk bounds", None))?;
    let keys: i64 = row.get(0);
    if keys == 0 {
        tx.rollback()
            .await
            .map_err(failed("ending the transaction", None))?;
        return Ok(None);
    }
    let chunk: (KeyValue, KeyValue, i64) = (row.get(1), row.get(2), keys);
    let at = Some(&chunk);
    let (first, last, _) = &chunk;

    let args: Vec<&(dyn ToSql + Sync)> = first
        .iter()
        .chain(last.iter())
        .map(|v| v as &(dyn ToSql + Sync))
        .collect();
    let stmt = tx
        .prepare_cached(&sql.statement)
        .await
        .map_err(failed("preparing the job's statement", at))?;
    let affected = tx
        .execute(&stmt, &args)
        .await
        .map_err(failed("running the job's statement", at))? as i64;

    // Application sessions queued behind this chunk's row locks: commit now (which releases
    // them) and tell the caller, which yields by shrinking the next chunks.
    let blocked: i64 = tx
        .query_one(BLOCKED_SQL, &[])
        .await
        .map_err(failed("looking for blocked sessions", at))?
        .get(0);
    let step = store::Advance {
        previous: cursor,
        last,
        keys,
        affected,
        chunk_rows: limit.min(i32::MAX as i64) as i32,
    };
    let advanced = store
        .advance(&*tx, job, run_id, step)
        .await
        .map_err(failed("saving the checkpoint", at))?;
    if advanced != 1 {
        let _ = tx.rollback().await;
        return Err(ChunkError::Lost);
    }
    tx.commit().await.map_err(failed("committing", at))?;
    Ok(Some(ChunkDone {
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

/// The number of rows to process, for progress, and whether it is exact: a count when counting
/// is quick (3 s at most), else the planner's estimate.
async fn estimate_rows(client: &tokio_postgres::Client, job: &JobSpec) -> (Option<i64>, bool) {
    let table = job.table.quoted();
    let exact = async {
        client
            .batch_execute("BEGIN; SET LOCAL statement_timeout = 3000")
            .await?;
        let r = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await;
        client.batch_execute("ROLLBACK").await?;
        r.map(|row| row.get::<_, i64>(0))
    };
    if let Ok(n) = exact.await {
        return (Some(n), true);
    }
    let planner = client
        .query_one(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)",
            &[&table],
        )
        .await
        .ok()
        .map(|r| r.get::<_, i64>(0))
        .filter(|n| *n >= 0);
    (planner, false)
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
        let args: Vec<&(dyn ToSql + Sync)> = f
            .key
            .iter()
            .chain(f.key.iter())
            .map(|v| v as &(dyn ToSql + Sync))
            .collect();
        match tx.execute(&statement, &args).await {
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
