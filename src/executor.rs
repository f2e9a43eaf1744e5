//! The chunk loop: claim the job → fix its key range → for each chunk, in one transaction: find the
//! bounds by walking the key's index, run the job's statement on them, advance the checkpoint →
//! commit → report. Then verify and record the outcome.
//!
//! Exactly-once comes from the single transaction: the statement and the checkpoint advance commit
//! together or not at all, and the advance is guarded by the run id and the previous cursor, so a
//! chunk can never be applied twice, whatever crashes, kills or retries happen around it.
//! Errors are classified by SQLSTATE (`db::classify`): transient ones are retried from the committed
//! cursor with jittered exponential backoff; permanent ones stop the run with the key range named.

use crate::db::{self, ErrorClass, Target};
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::keyset::{show_key, KeyValue, Keyset};
use crate::signals::Shutdown;
use crate::store::{self, Claim, Runner, Store};
use crate::telemetry::Progress;
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
    /// Attempts per chunk for transient errors before the run fails.
    pub max_attempts: u32,
    pub verify_timeout: Duration,
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
        }
    }
}

pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

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
    pub elapsed_seconds: f64,
    /// Keys processed by all runs of the job.
    pub rows_done_total: i64,
    pub cursor: Option<KeyValue>,
}

/// What stays fixed for every chunk of a run.
struct ChunkPlan<'a> {
    job: &'a str,
    run_id: i64,
    store: &'a Store,
    first_bounds_sql: String,
    next_bounds_sql: String,
    statement_sql: String,
    set_local: String,
    upper: KeyValue,
    limit: i64,
}

struct ChunkDone {
    last: KeyValue,
    keys: i64,
    affected: i64,
}

enum ChunkError {
    Db {
        stage: &'static str,
        range: Option<(KeyValue, KeyValue)>,
        source: tokio_postgres::Error,
    },
    Lost,
}

enum LoopEnd {
    Finished,
    Stopped,
}

#[derive(Default)]
struct Tally {
    rows: i64,
    affected: i64,
    chunks: i64,
    cursor: Option<KeyValue>,
    rows_done_total: i64,
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
    let (run_id, checkpoint) = match store
        .claim(&mut lease, job, &runner, opts.allow_changed_definition)
        .await?
    {
        Claim::AlreadyDone(c) => {
            return Ok(Report {
                job: job.name.clone(),
                outcome: Outcome::AlreadyDone,
                rows: 0,
                rows_affected: 0,
                chunks: 0,
                elapsed_seconds: started.elapsed().as_secs_f64(),
                rows_done_total: c.rows_done,
                cursor: c.cursor,
            })
        }
        Claim::Owned { run_id, checkpoint } => (run_id, checkpoint),
    };
    let lease = Arc::new(lease);
    let lost = Arc::new(AtomicBool::new(false));
    let heartbeat = tokio::spawn(keep_lease(
        lease.clone(),
        store.clone(),
        job.name.clone(),
        run_id,
        lost.clone(),
    ));

    let mut tally = Tally {
        cursor: checkpoint.cursor.clone(),
        rows_done_total: checkpoint.rows_done,
        ..Tally::default()
    };
    let result = drive(
        target,
        store,
        job,
        opts,
        &keyset,
        run_id,
        &checkpoint,
        shutdown,
        progress,
        &lost,
        &mut tally,
    )
    .await;
    heartbeat.abort();
    progress.finish();

    // The lease session may be gone (server restart); record the end on a fresh one if so.
    let fresh;
    let finisher: &tokio_postgres::Client = if lease.is_closed() {
        fresh = target.connect().await?;
        &fresh
    } else {
        &lease
    };
    let report = |outcome| Report {
        job: job.name.clone(),
        outcome,
        rows: tally.rows,
        rows_affected: tally.affected,
        chunks: tally.chunks,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        rows_done_total: tally.rows_done_total,
        cursor: tally.cursor.clone(),
    };
    match result {
        Ok(LoopEnd::Stopped) => {
            store
                .finish(finisher, &job.name, run_id, "stopped", None, None)
                .await?;
            Ok(report(Outcome::Stopped))
        }
        Ok(LoopEnd::Finished) => {
            let remaining = match &job.verify {
                None => None,
                Some(_) => {
                    match crate::migrator::verify(finisher, job, opts.verify_timeout).await {
                        Ok(n) => Some(n),
                        Err(e) => {
                            let msg = e.to_string();
                            store
                                .finish(finisher, &job.name, run_id, "failed", Some(&msg), None)
                                .await?;
                            return Err(e);
                        }
                    }
                }
            };
            match remaining {
                Some(n) if n > 0 => {
                    let msg = format!("every key up to the bound was processed, but verify still counts {n} rows to do");
                    store
                        .finish(
                            finisher,
                            &job.name,
                            run_id,
                            "incomplete",
                            Some(&msg),
                            Some(n),
                        )
                        .await?;
                    Ok(report(Outcome::Incomplete {
                        verify_remaining: n,
                    }))
                }
                _ => {
                    store
                        .finish(finisher, &job.name, run_id, "done", None, remaining)
                        .await?;
                    Ok(report(Outcome::Done {
                        verify_remaining: remaining,
                    }))
                }
            }
        }
        Err(e) => {
            let msg = e.to_string();
            if let Err(save) = store
                .finish(finisher, &job.name, run_id, "failed", Some(&msg), None)
                .await
            {
                progress.log(&format!("warning: {save}"));
            }
            Err(e)
        }
    }
}

/// Renews the lease until aborted; flags `lost` if the job was taken over or the session died.
async fn keep_lease(
    lease: Arc<tokio_postgres::Client>,
    store: Store,
    job: String,
    run_id: i64,
    lost: Arc<AtomicBool>,
) {
    loop {
        tokio::time::sleep(store::HEARTBEAT_EVERY).await;
        match store.heartbeat(&*lease, &job, run_id).await {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                lost.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    opts: &RunOptions,
    keyset: &Keyset,
    run_id: i64,
    checkpoint: &store::Checkpoint,
    shutdown: &Shutdown,
    progress: &Progress,
    lost: &AtomicBool,
    tally: &mut Tally,
) -> Result<LoopEnd> {
    let name = job.name.as_str();
    // The lease session is shared with the heartbeat task: all other work uses the pool.
    let pool = target.pool(2)?;
    let mut conn = target.get(&pool).await?;
    let (upper, total) = if checkpoint.bound_taken {
        (checkpoint.upper_bound.clone(), checkpoint.total_estimate)
    } else {
        // Rows inserted after this moment, beyond the bound, are left to the application (which
        // writes new rows correctly once the expand step is deployed) and to `verify`.
        let upper: Option<KeyValue> = conn
            .query_opt(&keyset.last_key_sql(), &[])
            .await
            .map_err(|e| {
                db::error(
                    e,
                    format!("job {name}: finding the last key of {}", job.table),
                )
            })?
            .map(|r| r.get(0));
        let total = estimate_rows(&conn, job).await;
        store
            .set_bound(&**conn, name, run_id, upper.as_ref(), total)
            .await?;
        if let Some(u) = &upper {
            progress.log(&format!(
                "{name}: processing keys up to {} (~{} rows)",
                show_key(u),
                total.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
            ));
        }
        (upper, total)
    };
    let Some(upper) = upper else {
        progress.log(&format!(
            "{name}: table {} was empty when the job started; nothing to do",
            job.table
        ));
        return Ok(LoopEnd::Finished);
    };
    progress.start(
        checkpoint.rows_done.max(0) as u64,
        total.map(|t| t.max(0) as u64),
    );
    if let Some(c) = &checkpoint.cursor {
        progress.log(&format!(
            "{name}: resuming after key {} ({} rows already done)",
            show_key(c),
            checkpoint.rows_done
        ));
    }

    let lock_timeout = opts.lock_timeout.unwrap_or(job.lock_timeout);
    let statement_timeout = opts.statement_timeout.unwrap_or(job.statement_timeout);
    let plan = ChunkPlan {
        job: name,
        run_id,
        store,
        first_bounds_sql: keyset.next_chunk_sql(false),
        next_bounds_sql: keyset.next_chunk_sql(true),
        statement_sql: job.sql.render(keyset),
        set_local: format!(
            "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
            db::millis(lock_timeout),
            db::millis(statement_timeout)
        ),
        upper,
        limit: opts.chunk_rows.unwrap_or(job.chunk_rows) as i64,
    };

    let mut attempt = 0u32;
    loop {
        if shutdown.stop_requested() {
            return Ok(LoopEnd::Stopped);
        }
        if lost.load(Ordering::SeqCst) {
            return Err(store::lost(name));
        }
        let token = conn.cancel_token();
        let result = cancellable(
            run_chunk(&mut conn, &plan, tally.cursor.as_ref()),
            &token,
            target,
            shutdown,
        )
        .await;
        let failure = match result {
            Ok(Some(done)) => {
                attempt = 0;
                tally.rows += done.keys;
                tally.affected += done.affected;
                tally.chunks += 1;
                tally.rows_done_total += done.keys;
                tally.cursor = Some(done.last);
                progress.advance(done.keys as u64);
                progress.message("");
                continue;
            }
            Ok(None) => return Ok(LoopEnd::Finished),
            Err(ChunkError::Lost) => return Err(store::lost(name)),
            Err(ChunkError::Db {
                stage,
                range,
                source,
            }) => (stage, range, source),
        };
        let (stage, range, source) = failure;
        if shutdown.cancel_requested() && db::sqlstate(&source) == Some("57014") {
            return Ok(LoopEnd::Stopped);
        }
        let resume_at = tally
            .cursor
            .as_deref()
            .map(|c| format!("after key {}", show_key(c)))
            .unwrap_or_else(|| "at the first key".into());
        let range_text = range
            .as_ref()
            .map(|(a, b)| format!("keys {}..={}", show_key(a), show_key(b)))
            .unwrap_or_else(|| format!("the chunk {resume_at}"));
        attempt += 1;
        if db::classify(&source) == ErrorClass::Permanent || attempt >= opts.max_attempts {
            let why =
                if attempt >= opts.max_attempts && db::classify(&source) == ErrorClass::Transient {
                    format!(" (gave up after {attempt} attempts)")
                } else {
                    String::new()
                };
            return Err(Error::Runtime(format!(
                "job {name}: chunk {range_text} failed while {stage}{why}: {}; nothing of this chunk was committed; fix the cause and run `backfill run {name}` again: it resumes {resume_at}",
                db::describe(&source)
            )));
        }
        let delay = backoff(attempt);
        progress.log(&format!(
            "{name}: chunk {range_text} failed while {stage}: {}; retrying in {} ms (attempt {}/{})",
            db::describe(&source),
            delay.as_millis(),
            attempt + 1,
            opts.max_attempts
        ));
        progress.message("retrying");
        shutdown.sleep(delay).await;
        if conn.is_closed() {
            drop(conn);
            conn = target.get(&pool).await?;
        }
        // The failure may have hit after COMMIT reached the server: continue from what was committed.
        match store.committed_cursor(&**conn, name, run_id).await {
            Ok((cursor, true)) => tally.cursor = cursor,
            Ok((_, false)) => return Err(store::lost(name)),
            Err(e) => {
                return Err(db::error(
                    e,
                    format!("job {name}: re-reading the checkpoint"),
                ))
            }
        }
    }
}

/// Runs one chunk in one transaction. `Ok(None)`: no keys left up to the bound.
async fn run_chunk(
    conn: &mut deadpool_postgres::Object,
    plan: &ChunkPlan<'_>,
    cursor: Option<&KeyValue>,
) -> Result<Option<ChunkDone>, ChunkError> {
    let tx = conn
        .transaction()
        .await
        .map_err(db("starting the transaction", None))?;
    tx.batch_execute(&plan.set_local)
        .await
        .map_err(db("setting timeouts", None))?;

    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
    let bounds_sql = match cursor {
        Some(c) => {
            params.extend(c.iter().map(|v| v as &(dyn ToSql + Sync)));
            &plan.next_bounds_sql
        }
        None => &plan.first_bounds_sql,
    };
    params.extend(plan.upper.iter().map(|v| v as &(dyn ToSql + Sync)));
    params.push(&plan.limit);
    let stmt = tx
        .prepare_cached(bounds_sql)
        .await
        .map_err(db("finding the chunk bounds", None))?;
    let row = tx
        .query_one(&stmt, &params)
        .await
        .map_err(db("finding the chunk bounds", None))?;
    let keys: i64 = row.get(0);
    if keys == 0 {
        tx.rollback()
            .await
            .map_err(db("ending the transaction", None))?;
        return Ok(None);
    }
    let first: KeyValue = row.get(1);
    let last: KeyValue = row.get(2);
    let bounds = (first, last);
    let range = Some(&bounds);
    let (first, last) = &bounds;

    let args: Vec<&(dyn ToSql + Sync)> = first
        .iter()
        .chain(last.iter())
        .map(|v| v as &(dyn ToSql + Sync))
        .collect();
    let stmt = tx
        .prepare_cached(&plan.statement_sql)
        .await
        .map_err(db("preparing the job's statement", range))?;
    let affected = tx
        .execute(&stmt, &args)
        .await
        .map_err(db("running the job's statement", range))?;

    let advanced = plan
        .store
        .advance(
            &*tx,
            plan.job,
            plan.run_id,
            store::Advance {
                previous: cursor,
                last,
                keys,
                affected: affected as i64,
            },
        )
        .await
        .map_err(db("saving the checkpoint", range))?;
    if advanced != 1 {
        let _ = tx.rollback().await;
        return Err(ChunkError::Lost);
    }
    tx.commit().await.map_err(db("committing", range))?;
    Ok(Some(ChunkDone {
        last: bounds.1,
        keys,
        affected: affected as i64,
    }))
}

/// Turns a database error at `stage` of a chunk into a [`ChunkError`] naming the key range.
fn db(
    stage: &'static str,
    range: Option<&(KeyValue, KeyValue)>,
) -> impl FnOnce(tokio_postgres::Error) -> ChunkError {
    let range = range.cloned();
    move |source| ChunkError::Db {
        stage,
        range,
        source,
    }
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

/// Full-jitter exponential backoff: random in [base·2^(n-1) / 2, base·2^(n-1)], capped.
fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    let half = exp / 2;
    half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
}

/// The number of rows to process, for progress: exact when counting is quick, else the planner's.
async fn estimate_rows(client: &tokio_postgres::Client, job: &JobSpec) -> Option<i64> {
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
        return Some(n);
    }
    client
        .query_one(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)",
            &[&table],
        )
        .await
        .ok()
        .map(|r| r.get::<_, i64>(0))
        .filter(|n| *n >= 0)
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
