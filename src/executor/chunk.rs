//! One chunk: its transaction, top to bottom. Every statement a chunk sends is built once per
//! run in a [`ChunkPlan`] and sent by [`run`], in this order:
//!
//! 1. `SET LOCAL` the chunk's timeouts (`db::Timeouts`), noting the rows of the job's table this
//!    transaction has written so far;
//! 2. lock the range's row and read its cursor, checking the owner;
//! 3. find the chunk's bounds by walking the key's index from the cursor (`keyset`);
//! 4. copy the rows' old values to the undo table (jobs with `undo`);
//! 5. the job's statement, with `:start`/`:end` bound to the chunk's first and last key;
//! 6. sessions blocked on the chunk's locks, and the rows of the job's table it wrote;
//! 7. advance the range's cursor (or mark the range done when no key is left);
//! 8. `COMMIT`.
//!
//! It returns a typed outcome: committed with its counts, the range done, or a [`Failure`]
//! saying what failed where. Owns only the transaction; it must not decide what a failure means
//! (that is `recovery`'s), format operator text, sleep, or touch the run's pace.

use super::recovery::Problem;
use crate::db::{self, ErrorClass, Target, Timeouts};
use crate::error::{ChunkCause, WroteOutside};
use crate::job::JobSpec;
use crate::keyset::{self, ChunkBounds, KeyValue, Keyset, NextChunkError};
use crate::signals::Shutdown;
use crate::store::{self, Poison, RangeLease, Store};
use std::time::{Duration, Instant};
use tokio_postgres::types::ToSql;

/// Where a chunk's transaction keeps the count of rows of the job's table it had written before
/// the statement ran (a transaction-local setting).
const WRITTEN_BEFORE: &str = "backfill.written_before";
/// Application sessions waiting for a lock that this session holds (other workers of the
/// engine, e.g. waiting to extend the table, are not the application: yielding would not help).
const BLOCKED_SQL: &str = "SELECT count(*) FROM pg_stat_activity
     WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()
       AND application_name IS DISTINCT FROM current_setting('application_name')
       AND pg_backend_pid() = ANY (pg_blocking_pids(pid))";

/// The timeouts of every transaction that applies the job's statement (a chunk, a skipped key,
/// a retried failure). A process that hangs inside one (stopped, swapping, stuck) must not keep
/// its range's row locked forever: the server ends the idle transaction once the lease has
/// expired anyway, and another run can take the range.
pub(super) fn chunk_timeouts(lock: Duration, statement: Duration) -> Timeouts {
    Timeouts::chunk(lock, statement, store::LEASE_TIMEOUT)
}

/// Every statement of a chunk's transaction, built once per run (in the order they are sent).
pub(super) struct ChunkPlan<'a> {
    job: &'a JobSpec,
    keyset: &'a Keyset,
    timeouts: Timeouts,
    /// The timeouts, and the rows of the job's table written so far (nothing yet), in one round
    /// trip: `after_statement` subtracts it.
    begin: String,
    lock_range: String,
    first_bounds: String,
    next_bounds: String,
    /// Copies the chunk's old values of the job's undo columns (same parameters as `statement`).
    undo_copy: Option<String>,
    statement: String,
    /// After the statement: sessions blocked on the chunk's locks, and the rows of the job's
    /// table the statement wrote.
    after_statement: String,
    /// The rows in the chunk's bounds now (parameters as `statement`'s).
    count_chunk: String,
    advance: String,
    range_done: String,
}

impl<'a> ChunkPlan<'a> {
    pub(super) fn new(
        store: &Store,
        job: &'a JobSpec,
        keyset: &'a Keyset,
        timeouts: Timeouts,
    ) -> Self {
        ChunkPlan {
            job,
            keyset,
            timeouts,
            begin: format!(
                "{}; SELECT set_config('{WRITTEN_BEFORE}', {}::text, true)",
                timeouts.set_local(),
                keyset.written_sql()
            ),
            lock_range: lock_range_sql(store.quoted_schema()),
            first_bounds: keyset.next_chunk_sql(false),
            next_bounds: keyset.next_chunk_sql(true),
            undo_copy: crate::undo::copy_sql(store, job, keyset),
            statement: keyset.render(&job.sql),
            after_statement: format!(
                "SELECT ({BLOCKED_SQL}), {} - current_setting('{WRITTEN_BEFORE}')::bigint",
                keyset.written_sql()
            ),
            count_chunk: keyset.count_between_sql(),
            advance: advance_sql(store.quoted_schema()),
            range_done: range_done_sql(store.quoted_schema()),
        }
    }
}

// The statements on the range's row, `$1`..`$4` being job, range, owner run and owner worker
// (`RangeLease::owner_params`): with the transaction in [`run`], they are the exactly-once rule.

/// Locks the range's row and reads (cursor, upper bound, done); no row when the worker no longer
/// owns the range.
fn lock_range_sql(s: &str) -> String {
    format!(
        "SELECT cursor, upper_bound, done FROM {s}.ranges
          WHERE job = $1 AND id = $2 AND owner_run = $3 AND owner_worker = $4 FOR UPDATE"
    )
}

/// Moves an owned range's cursor from `$5` (the value read under the lock) to `$6` and books
/// `$7` keys, `$8` rows affected and a chunk size of `$9` on the range and on the run's worker,
/// in one statement, so the run's history holds exactly what its committed chunks did even when
/// a COMMIT's answer was lost. A row only when the range is still owned and its cursor still `$5`.
fn advance_sql(s: &str) -> String {
    format!(
        "WITH moved AS (
           UPDATE {s}.ranges SET cursor = $6, rows_done = rows_done + $7,
                  rows_affected = rows_affected + $8, chunks_done = chunks_done + 1,
                  chunk_rows_now = $9, updated_at = now()
            WHERE job = $1 AND id = $2 AND owner_run = $3 AND owner_worker = $4
              AND cursor IS NOT DISTINCT FROM $5
           RETURNING 1),
         counted AS (
           INSERT INTO {s}.run_workers AS w (run_id, worker, rows_done, rows_affected, chunks_done)
           SELECT $3, $4, $7, $8, 1 FROM moved
           ON CONFLICT (run_id, worker) DO UPDATE
              SET rows_done = w.rows_done + EXCLUDED.rows_done,
                  rows_affected = w.rows_affected + EXCLUDED.rows_affected,
                  chunks_done = w.chunks_done + 1)
         SELECT 1 FROM moved"
    )
}

/// Marks an owned range finished (no key left in it) and lets it go.
fn range_done_sql(s: &str) -> String {
    format!(
        "UPDATE {s}.ranges SET done = true, owner_run = NULL, owner_worker = NULL, updated_at = now()
          WHERE job = $1 AND id = $2 AND owner_run = $3 AND owner_worker = $4"
    )
}

/// What one chunk attempt came to.
pub(super) enum Step {
    Committed(ChunkDone),
    /// No keys left in the range: it is marked done and let go.
    RangeDone,
}

pub(super) struct ChunkDone {
    pub last: KeyValue,
    pub keys: i64,
    pub affected: i64,
    pub took: Duration,
    /// The chunk size asked for.
    pub asked: i64,
    /// Sessions that were waiting on this chunk's locks just before it committed.
    pub blocked: i64,
}

/// A failed attempt at a chunk, with what is known of where it failed.
pub(super) struct Failure {
    pub problem: Problem,
    /// What failed: the database error itself (its SQLSTATE and class read from it), or the
    /// engine's own reason.
    pub cause: ChunkCause,
    pub stage: &'static str,
    pub range: Option<(KeyValue, KeyValue)>,
    pub keys: Option<i64>,
}

impl Failure {
    /// The range is no longer this worker's: the run was declared gone and its ranges taken.
    fn lost(stage: &'static str) -> Self {
        Failure {
            problem: Problem::Lost,
            cause: ChunkCause::RangeLost,
            stage,
            range: None,
            keys: None,
        }
    }

    /// The walk would not move forward (see [`keyset::Stall`]): fatal, never retried.
    fn stalled(stall: &keyset::Stall) -> Self {
        Failure {
            problem: Problem::Stalled,
            cause: ChunkCause::Stalled(stall.to_string()),
            stage: "finding the chunk bounds",
            range: None,
            keys: None,
        }
    }

    /// The database class of the failure, if it is a database error.
    pub fn class(&self) -> Option<ErrorClass> {
        match self.problem {
            Problem::Db(class) => Some(class),
            Problem::Stalled | Problem::Lost => None,
        }
    }

    /// The SQLSTATE, when the server sent one.
    pub fn sqlstate(&self) -> Option<&str> {
        self.cause.sqlstate()
    }

    /// The failure as the operator reads it.
    pub fn text(&self) -> String {
        self.cause.to_string()
    }
}

/// Turns a database error at `stage` of a chunk into a [`Failure`] naming the key range.
pub(super) fn failed(
    stage: &'static str,
    chunk: Option<&(KeyValue, KeyValue, i64)>,
) -> impl FnOnce(tokio_postgres::Error) -> Failure {
    let chunk = chunk.cloned();
    move |e| {
        let class = db::classify(&e);
        Failure {
            problem: Problem::Db(class),
            cause: ChunkCause::driver(e, class),
            stage,
            keys: chunk.as_ref().map(|c| c.2),
            range: chunk.map(|(a, b, _)| (a, b)),
        }
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
) -> impl FnOnce(tokio_postgres::Error) -> Failure {
    let cache = tx.statement_cache.clone();
    let fail = failed(stage, chunk);
    move |e| {
        let stale = reused && db::sqlstate(&e) == Some("0A000");
        let mut error = fail(e);
        if stale {
            cache.clear();
            error.problem = Problem::Db(ErrorClass::Contention);
            if let ChunkCause::Database { error, stale_plan } = &mut error.cause {
                error.class = ErrorClass::Contention;
                *stale_plan = true;
            }
        }
        error
    }
}

/// Runs one chunk of at most `limit` keys of `range` in one transaction.
///
/// Exactly once: the chunk's statement and its cursor advance commit in this one transaction, or
/// neither does. The range's row is locked with its owner checked (`lock_range`) before anything
/// else, and the advance moves the cursor only from the value read under that lock (`cursor IS
/// NOT DISTINCT FROM`) and only while this worker still owns the range; either check failing
/// rolls everything back as a lost range. So no crash, kill, retry, split or takeover
/// around a chunk can make it apply twice, and after any failure the worker simply goes on from
/// the cursor as committed (a COMMIT whose answer was lost may still have happened).
pub(super) async fn run(
    conn: &mut deadpool_postgres::Object,
    plan: &ChunkPlan<'_>,
    range: &RangeLease,
    limit: i64,
) -> Result<Step, Failure> {
    let job = plan.job.name.as_str();
    let owner = range.owner_params(&job);
    let started = Instant::now();
    let tx = conn
        .transaction()
        .await
        .map_err(failed("starting the transaction", None))?;
    tx.batch_execute(&plan.begin)
        .await
        .map_err(failed("setting timeouts", None))?;
    let Some(locked) = tx
        .query_opt(&plan.lock_range, &owner)
        .await
        .map_err(failed("locking the key range", None))?
    else {
        let _ = tx.rollback().await;
        return Err(Failure::lost("locking the key range"));
    };
    let (cursor, upper, done): (Option<KeyValue>, KeyValue, bool) =
        (locked.get(0), locked.get(1), locked.get(2));
    let row = if done {
        None
    } else {
        match next_bounds(&tx, plan, cursor.as_ref(), &upper, limit).await? {
            Ok(found) => found,
            Err(stall) => {
                let _ = tx.rollback().await;
                return Err(Failure::stalled(&stall));
            }
        }
    };
    let Some(ChunkBounds { keys, first, last }) = row else {
        tx.execute(&plan.range_done, &owner)
            .await
            .map_err(failed("closing the key range", None))?;
        tx.commit()
            .await
            .map_err(failed("closing the key range", None))?;
        return Ok(Step::RangeDone);
    };
    let chunk: (KeyValue, KeyValue, i64) = (first, last, keys);
    let at = Some(&chunk);
    let (from, to) = plan.keyset.statement_bounds(&chunk.0, &chunk.1);
    let args: Vec<&(dyn ToSql + Sync)> = from.iter().chain(&to).map(|v| v as _).collect();
    let affected = apply(&tx, plan, &chunk, &args).await?;

    // Application sessions queued behind this chunk's row locks: commit now (which releases
    // them) and tell the caller, which yields by shrinking the next chunks. The same round trip
    // reads how many rows of the job's table the statement wrote (`affected` counts the rows of
    // whatever table the statement targets).
    let after = tx
        .prepare_cached(&plan.after_statement)
        .await
        .map_err(failed("looking for blocked sessions", at))?;
    let row = tx
        .query_one(&after, &[])
        .await
        .map_err(failed("looking for blocked sessions", at))?;
    let (blocked, written): (i64, i64) = (row.get(0), row.get(1));
    if written > keys {
        outside_the_chunk(&tx, plan, &chunk, &args, written).await?;
    }
    let chunk_rows = limit.min(i32::MAX as i64) as i32;
    let moved: [&(dyn ToSql + Sync); 5] = [&cursor, &chunk.1, &keys, &affected, &chunk_rows];
    let advance: Vec<_> = owner.into_iter().chain(moved).collect();
    let advanced = tx
        .execute(&plan.advance, &advance)
        .await
        .map_err(failed("saving the checkpoint", at))?;
    if advanced != 1 {
        let _ = tx.rollback().await;
        return Err(Failure::lost("saving the checkpoint"));
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

/// The chunk's bounds: the next `limit` keys after `cursor`, up to `upper`, found by walking the
/// key's index (None: no key left in the range); Err when the walk would not move forward.
async fn next_bounds(
    tx: &deadpool_postgres::Transaction<'_>,
    plan: &ChunkPlan<'_>,
    cursor: Option<&KeyValue>,
    upper: &KeyValue,
    limit: i64,
) -> Result<Result<Option<ChunkBounds>, keyset::Stall>, Failure> {
    let bounds_sql = match cursor {
        Some(_) => &plan.next_bounds,
        None => &plan.first_bounds,
    };
    let (stmt, reused) = cached(tx, bounds_sql)
        .await
        .map_err(failed("finding the chunk bounds", None))?;
    match plan
        .keyset
        .next_chunk(&**tx, &stmt, cursor, upper, limit)
        .await
    {
        Ok(found) => Ok(Ok(found)),
        Err(NextChunkError::Stalled(stall)) => Ok(Err(stall)),
        Err(NextChunkError::Query(e)) => {
            Err(failed_cached("finding the chunk bounds", None, reused, tx)(
                e,
            ))
        }
    }
}

/// The undo copy (jobs with `undo`), then the job's statement, on the chunk's bounds; returns
/// the rows the statement reported changing.
async fn apply(
    tx: &deadpool_postgres::Transaction<'_>,
    plan: &ChunkPlan<'_>,
    chunk: &(KeyValue, KeyValue, i64),
    args: &[&(dyn ToSql + Sync)],
) -> Result<i64, Failure> {
    let at = Some(chunk);
    if let Some(copy) = &plan.undo_copy {
        let (stmt, reused) = cached(tx, copy)
            .await
            .map_err(failed("preparing the undo copy", at))?;
        tx.execute(&stmt, args).await.map_err(failed_cached(
            "copying the rows' old values to the undo table",
            at,
            reused,
            tx,
        ))?;
    }
    let (stmt, reused) = cached(tx, &plan.statement)
        .await
        .map_err(failed("preparing the job's statement", at))?;
    let affected = tx.execute(&stmt, args).await.map_err(failed_cached(
        "running the job's statement",
        at,
        reused,
        tx,
    ))?;
    Ok(affected as i64)
}

/// Records a poison key as skipped and moves the range's cursor past it, in one transaction
/// under the chunk's timeouts and range lock (so the key is skipped exactly once). False: the
/// range is no longer this worker's.
pub(super) async fn skip_key(
    conn: &mut deadpool_postgres::Object,
    plan: &ChunkPlan<'_>,
    store: &Store,
    range: &RangeLease,
    poison: &Poison<'_>,
) -> Result<bool, tokio_postgres::Error> {
    let job = plan.job.name.as_str();
    let tx = conn.transaction().await?;
    tx.batch_execute(&plan.timeouts.set_local()).await?;
    let Some(locked) = tx
        .query_opt(&plan.lock_range, &range.owner_params(&job))
        .await?
    else {
        return Ok(false);
    };
    let cursor: Option<KeyValue> = locked.get(0);
    store
        .record_failure(&*tx, job, Some(range.run_id), poison)
        .await?;
    let skipped: [&(dyn ToSql + Sync); 5] = [&cursor, poison.key, &1i64, &0i64, &1i32];
    let advance: Vec<_> = range
        .owner_params(&job)
        .into_iter()
        .chain(skipped)
        .collect();
    if tx.execute(&plan.advance, &advance).await? != 1 {
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// A statement that wrote more rows of the job's table than the chunk holds writes outside the
/// chunk's bounds (`id >= :start` without `:end`, a join that reaches other rows): left to go on,
/// every chunk would rewrite rows of others, and the pass would stall on ever-larger writes. Rows
/// inserted into the range after its keys were counted (same transaction, next statement) are
/// legitimate, so the chunk is counted again, only in this rare case, before the run is stopped
/// with nothing of the chunk committed.
async fn outside_the_chunk(
    tx: &deadpool_postgres::Transaction<'_>,
    plan: &ChunkPlan<'_>,
    chunk: &(KeyValue, KeyValue, i64),
    args: &[&(dyn ToSql + Sync)],
    written: i64,
) -> Result<(), Failure> {
    let at = Some(chunk);
    let now: i64 = tx
        .query_one(&plan.count_chunk, args)
        .await
        .map_err(failed("counting the chunk's rows", at))?
        .get(0);
    let keys = chunk.2;
    if written <= now {
        return Ok(());
    }
    let key = match plan.job.key.as_slice() {
        [one] => one.clone(),
        many => format!("({})", many.join(", ")),
    };
    Err(Failure {
        problem: Problem::Db(ErrorClass::Fatal),
        cause: ChunkCause::WroteOutside(Box::new(WroteOutside {
            job: plan.job.name.clone(),
            table: plan.job.table.to_string(),
            key,
            written,
            keys,
            pages: plan.keyset.is_ctid(),
            now,
        })),
        stage: "checking which rows the statement wrote",
        range: Some((chunk.0.clone(), chunk.1.clone())),
        keys: Some(keys),
    })
}

/// Awaits `fut`; if a cancel is requested meanwhile, asks the server to cancel the session's
/// statement and keeps awaiting, so the transaction ends cleanly (dropping the future would not
/// stop the server and could leave the transaction half-open).
pub(super) async fn cancellable<T>(
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
