//! One chunk: its transaction, top to bottom, in two round trips. Every statement a chunk sends
//! is built once per run in a [`ChunkPlan`] and sent by [`run`], pipelined (tokio-postgres sends
//! requests that are in flight together without waiting for each answer):
//!
//! 1. `BEGIN` and `SET LOCAL` the chunk's timeouts (`db::Timeouts`), noting the rows of the job's
//!    table this transaction has written so far; lock the range's row and read its cursor,
//!    checking the owner; the server's clock; copy the rows' old values to the undo table (jobs
//!    with `undo`); the job's statement, with `:start`/`:end` bound to the chunk's first and last
//!    key; the sessions blocked on the chunk's locks, the rows of the job's table it wrote, and
//!    the clock again (the chunk's work as the server timed it);
//! 2. find the *next* chunk's bounds by walking the key's index from this chunk's last key
//!    (`keyset`); advance the range's cursor; `COMMIT`.
//!
//! The chunk's bounds were found by the chunk before it, in its transaction; they are used only
//! when the range's row, read under its lock, still shows the cursor and upper bound they were
//! found for. Otherwise (a range's first chunk, after a failure, a split) they are found under
//! the lock first, and a range with no key left is marked done.
//!
//! It returns a typed outcome: committed with its counts, the range done, or a [`Failure`]
//! saying what failed where. Owns only the transaction; it must not decide what a failure means
//! (that is `recovery`'s), format operator text, sleep, or touch the run's pace.

mod plan;

use super::failure::{cached, failed, failed_cached, Cached, Failure};
use super::recovery::Problem;
use crate::db::{self, ErrorClass};
use crate::error::{ChunkCause, WroteOutside};
use crate::keyset::{self, ChunkBounds, KeyValue, NextChunkError};
use crate::store::{Poison, RangeLease, Store};
pub(super) use plan::{chunk_timeouts, ChunkPlan};
use plan::{ApplyStatements, Chunk, NOTHING_MOVED};
use std::time::{Duration, Instant};
use tokio_postgres::types::ToSql;

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
    /// From the start of the attempt to the COMMIT's answer, on the client (network included).
    pub took: Duration,
    /// The time the chunk's statement (and undo copy) took on the server: the chunk's own work,
    /// which grows with its size, without the network in front of it.
    pub work: Duration,
    /// Round trips the attempt waited for (two in the steady state).
    pub round_trips: u32,
    /// The next chunk's bounds, found in this chunk's transaction (None: to be found afresh).
    pub next: Option<NextChunk>,
    /// The chunk size asked for.
    pub asked: i64,
    /// Sessions that were waiting on this chunk's locks just before it committed.
    pub blocked: i64,
}

/// The next chunk's bounds, found in the transaction of the chunk before it, so that the next
/// chunk's statement goes out together with its range lock, in one round trip. They hold only
/// while the range's row still says what it said then: the cursor they follow and the upper
/// bound they stop at (a split lowers it; a takeover moves the cursor).
#[derive(Debug, Clone)]
pub(super) struct NextChunk {
    after: Option<KeyValue>,
    upper: KeyValue,
    bounds: ChunkBounds,
}

impl NextChunk {
    /// Keys in the chunk.
    pub fn keys(&self) -> i64 {
        self.bounds.keys
    }
}

/// The range's row as read under its lock.
struct RangeRow {
    cursor: Option<KeyValue>,
    upper: KeyValue,
    done: bool,
}

impl RangeRow {
    /// Whether bounds found earlier still follow this cursor and stop at this upper bound.
    fn still_holds(&self, next: &NextChunk) -> bool {
        !self.done && self.cursor == next.after && self.upper == next.upper
    }
}

/// What the statement did, read in the same round trip.
struct Applied {
    affected: i64,
    blocked: i64,
    written: i64,
    work: Duration,
}

/// Runs one chunk of at most `limit` keys of `range` in one transaction, in two round trips when
/// `next` (the bounds the previous chunk found) still holds:
///
/// 1. `BEGIN` with the timeouts; lock the range's row, checking the owner; the undo copy and the
///    job's statement on `next`'s bounds; the blocked sessions and the rows written;
/// 2. the bounds of the chunk after this one; advance the cursor; `COMMIT`.
///
/// Without bounds that hold (the range's first chunk, after a failure, a split or a smaller
/// chunk size), the bounds are found under the lock first, then the statement runs: four round
/// trips, once.
///
/// Exactly once: the statement and its cursor advance commit in this one transaction, or neither
/// does. The statement runs only after the range's row is locked with its owner checked, and the
/// second round trip — the only one with a `COMMIT` — is sent only once the first showed that
/// the chunk's bounds follow the cursor read under that lock and stay under its upper bound.
/// The advance moves the cursor only from that value and only while this worker owns the range;
/// if it moved nothing, it raises (`NOTHING_MOVED`), so the `COMMIT` behind it rolls back. A
/// failed statement makes everything after it in the transaction fail, `COMMIT` included. So no
/// crash, kill, retry, split or takeover around a chunk can make it apply twice, and after any
/// failure the worker simply goes on from the cursor as committed (a COMMIT whose answer was lost
/// may still have happened).
pub(super) async fn run(
    conn: &mut deadpool_postgres::Object,
    plan: &ChunkPlan<'_>,
    range: &RangeLease,
    limit: i64,
    next: Option<NextChunk>,
) -> Result<Step, Failure> {
    let started = Instant::now();
    let job = plan.job.name.as_str();
    let mut tx = ChunkTx {
        conn,
        plan,
        owner: range.owner_params(&job),
        limit,
        round_trips: 0,
    };
    let result = tx.attempt(next).await;
    let round_trips = tx.round_trips;
    if result.is_err() && !conn.is_closed() {
        // Nothing of a failed attempt stays (after a COMMIT that rolled back, this is a no-op).
        let _ = conn.batch_execute("ROLLBACK").await;
    }
    let mut step = result?;
    if let Step::Committed(done) = &mut step {
        done.took = started.elapsed();
        done.round_trips = round_trips;
    }
    Ok(step)
}

/// One attempt's transaction: the connection, the run's statements, the range's owner (`$1`..`$4`
/// of the statements on its row), the chunk size, and the round trips waited for so far.
struct ChunkTx<'a, 'p> {
    conn: &'a deadpool_postgres::ClientWrapper,
    plan: &'a ChunkPlan<'p>,
    owner: [&'a (dyn ToSql + Sync); 4],
    limit: i64,
    round_trips: u32,
}

/// A chunk whose statement ran, not yet committed.
struct Ran {
    row: RangeRow,
    chunk: Chunk,
    applied: Applied,
}

impl ChunkTx<'_, '_> {
    /// [`run`]'s transaction; on an error the caller rolls back.
    async fn attempt(&mut self, next: Option<NextChunk>) -> Result<Step, Failure> {
        let limit = self.limit;
        let mut ran = None;
        if let Some(next) = next.filter(|n| n.keys() <= limit) {
            ran = self.on_carried_bounds(next).await?;
        }
        let ran = match ran {
            Some(ran) => ran,
            None => match self.on_fresh_bounds().await? {
                Some(ran) => ran,
                None => return Ok(Step::RangeDone),
            },
        };
        self.finish(ran).await
    }

    /// The steady state, one round trip: the range locked and the statement run on the bounds
    /// the previous chunk found. None (rolled back) when the range's row no longer matches them.
    async fn on_carried_bounds(&mut self, next: NextChunk) -> Result<Option<Ran>, Failure> {
        let (conn, plan) = (self.conn, self.plan);
        let lock = self.lock_statement().await?;
        let chunk: Chunk = (
            next.bounds.first.clone(),
            next.bounds.last.clone(),
            next.keys(),
        );
        let statements = plan.apply_statements(conn, &chunk).await?;
        let args = plan.statement_args(&chunk);
        let args = args.params();
        self.round_trips += 1;
        let (begun, locked, applied) = tokio::join!(
            biased;
            conn.batch_execute(&plan.begin),
            conn.query_opt(&lock.0, &self.owner),
            apply(conn, &statements, &chunk, &args),
        );
        begun.map_err(failed("setting timeouts", None))?;
        let row = read_range(locked)?;
        if row.still_holds(&next) {
            let applied = applied?;
            return Ok(Some(Ran {
                row,
                chunk,
                applied,
            }));
        }
        // The range's row changed since the bounds were found: the statement ran on bounds that
        // may no longer be this worker's. Undo it and find them afresh under the lock.
        self.round_trips += 1;
        conn.batch_execute("ROLLBACK")
            .await
            .map_err(failed("starting the chunk again", None))?;
        Ok(None)
    }

    /// The range locked, then its next bounds found under the lock, then the statement run on
    /// them: three round trips. None when no key is left: the range is marked done (committed).
    async fn on_fresh_bounds(&mut self) -> Result<Option<Ran>, Failure> {
        let (conn, plan) = (self.conn, self.plan);
        let lock = self.lock_statement().await?;
        self.round_trips += 1;
        let (begun, locked) = tokio::join!(
            biased;
            conn.batch_execute(&plan.begin),
            conn.query_opt(&lock.0, &self.owner),
        );
        begun.map_err(failed("setting timeouts", None))?;
        let row = read_range(locked)?;
        let found = if row.done {
            None
        } else {
            self.round_trips += 1;
            match next_bounds(conn, plan, row.cursor.as_ref(), &row.upper, self.limit).await? {
                Ok(found) => found,
                Err(stall) => return Err(Failure::stalled(&stall)),
            }
        };
        let Some(ChunkBounds { keys, first, last }) = found else {
            self.round_trips += 1;
            close_range(conn, plan, &self.owner).await?;
            return Ok(None);
        };
        let chunk: Chunk = (first, last, keys);
        let statements = plan.apply_statements(conn, &chunk).await?;
        let args = plan.statement_args(&chunk);
        self.round_trips += 1;
        let applied = apply(conn, &statements, &chunk, &args.params()).await?;
        Ok(Some(Ran {
            row,
            chunk,
            applied,
        }))
    }

    async fn lock_statement(&self) -> Result<Cached, Failure> {
        cached(self.conn, &self.plan.lock_range)
            .await
            .map_err(failed("locking the key range", None))
    }
}

/// The range's row from the lock query; the range lost when there is none (the worker no longer
/// owns it).
fn read_range(
    locked: Result<Option<tokio_postgres::Row>, tokio_postgres::Error>,
) -> Result<RangeRow, Failure> {
    match locked.map_err(failed("locking the key range", None))? {
        Some(row) => Ok(RangeRow {
            cursor: row.get(0),
            upper: row.get(1),
            done: row.get(2),
        }),
        None => Err(Failure::lost("locking the key range")),
    }
}

/// Sends, in one round trip: the server's clock, the undo copy (jobs with `undo`), the job's
/// statement on the chunk's bounds, and what came after it (blocked sessions, rows written, the
/// clock again).
async fn apply(
    conn: &deadpool_postgres::ClientWrapper,
    s: &ApplyStatements,
    chunk: &Chunk,
    args: &[&(dyn ToSql + Sync)],
) -> Result<Applied, Failure> {
    let at = Some(chunk);
    let (stamped, copied, ran, after) = tokio::join!(
        biased;
        conn.query_one(&s.stamp.0, &[]),
        async {
            match &s.undo_copy {
                Some(copy) => Some(conn.execute(&copy.0, args).await),
                None => None,
            }
        },
        conn.execute(&s.statement.0, args),
        conn.query_one(&s.after.0, &[]),
    );
    let began: f64 = stamped
        .map_err(failed("running the job's statement", at))?
        .get(0);
    if let (Some(copied), Some(copy)) = (copied, &s.undo_copy) {
        copied.map_err(failed_cached(
            "copying the rows' old values to the undo table",
            at,
            copy.1,
            conn,
        ))?;
    }
    let affected = ran.map_err(failed_cached(
        "running the job's statement",
        at,
        s.statement.1,
        conn,
    ))?;
    // Application sessions queued behind this chunk's row locks: the chunk commits now (which
    // releases them) and tells the caller, which yields by shrinking the next chunks. The same
    // round trip reads how many rows of the job's table the statement wrote (`affected` counts
    // the rows of whatever table the statement targets).
    let after = after.map_err(failed("looking for blocked sessions", at))?;
    let ended: f64 = after.get(2);
    Ok(Applied {
        affected: affected as i64,
        blocked: after.get(0),
        written: after.get(1),
        work: Duration::from_secs_f64((ended - began).max(0.0)),
    })
}

/// The second round trip: the next chunk's bounds, the cursor advance, `COMMIT`. The bounds go
/// first: if they fail on the server, the advance fails behind them and the COMMIT rolls back,
/// so the chunk committed exactly when the advance and the COMMIT both answered without error.
impl ChunkTx<'_, '_> {
    async fn finish(&mut self, ran: Ran) -> Result<Step, Failure> {
        let (conn, plan, limit) = (self.conn, self.plan, self.limit);
        let Ran {
            row,
            chunk,
            applied,
        } = ran;
        let at = Some(&chunk);
        if applied.written > chunk.2 {
            self.round_trips += 1;
            outside_the_chunk(conn, plan, &chunk, applied.written).await?;
        }
        let advance = cached(conn, &plan.advance)
            .await
            .map_err(failed("saving the checkpoint", at))?;
        let bounds = cached(conn, &plan.next_bounds)
            .await
            .map_err(failed("finding the next chunk's bounds", at))?;
        let chunk_rows = limit.min(i32::MAX as i64) as i32;
        let moved: [&(dyn ToSql + Sync); 5] = [
            &row.cursor,
            &chunk.1,
            &chunk.2,
            &applied.affected,
            &chunk_rows,
        ];
        let params: Vec<_> = self.owner.iter().copied().chain(moved).collect();
        self.round_trips += 1;
        let (found, advanced, committed) = tokio::join!(
            biased;
            plan.keyset.next_chunk(&**conn, &bounds.0, Some(&chunk.1), &row.upper, limit),
            conn.query_one(&advance.0, &params),
            conn.batch_execute("COMMIT"),
        );
        // Without an answer to the COMMIT (the connection is gone), whether the chunk committed is
        // unknown: that is what the operator is told, and the worker goes on from the cursor as
        // committed, whichever it was.
        if let Err(e) = committed.as_ref() {
            if e.as_db_error().is_none() {
                return Err(failed("committing", at)(committed.unwrap_err()));
            }
        }
        if let Err(e) = advanced {
            if let Err(NextChunkError::Query(first)) = found {
                return Err(failed_cached(
                    "finding the next chunk's bounds",
                    None,
                    bounds.1,
                    conn,
                )(first));
            }
            return Err(match db::sqlstate(&e) {
                Some(NOTHING_MOVED) => Failure::lost("saving the checkpoint"),
                _ => failed("saving the checkpoint", at)(e),
            });
        }
        committed.map_err(failed("committing", at))?;
        // A walk that would not move forward is found again, and stopped, by the next chunk.
        let next = found.ok().flatten().map(|bounds| NextChunk {
            after: Some(chunk.1.clone()),
            upper: row.upper.clone(),
            bounds,
        });
        Ok(Step::Committed(ChunkDone {
            last: chunk.1,
            keys: chunk.2,
            affected: applied.affected,
            took: Duration::ZERO,
            work: applied.work,
            asked: limit,
            blocked: applied.blocked,
            round_trips: 0,
            next,
        }))
    }
}

/// Marks the range done and commits, in one round trip (the COMMIT rolls back if the mark
/// failed).
async fn close_range(
    conn: &deadpool_postgres::ClientWrapper,
    plan: &ChunkPlan<'_>,
    owner: &[&(dyn ToSql + Sync); 4],
) -> Result<(), Failure> {
    let done = cached(conn, &plan.range_done)
        .await
        .map_err(failed("closing the key range", None))?;
    let (closed, committed) = tokio::join!(
        biased;
        conn.execute(&done.0, owner),
        conn.batch_execute("COMMIT"),
    );
    closed.map_err(failed("closing the key range", None))?;
    committed.map_err(failed("closing the key range", None))?;
    Ok(())
}

/// The chunk's bounds: the next `limit` keys after `cursor`, up to `upper`, found by walking the
/// key's index (None: no key left in the range); Err when the walk would not move forward.
async fn next_bounds(
    conn: &deadpool_postgres::ClientWrapper,
    plan: &ChunkPlan<'_>,
    cursor: Option<&KeyValue>,
    upper: &KeyValue,
    limit: i64,
) -> Result<Result<Option<ChunkBounds>, keyset::Stall>, Failure> {
    let bounds_sql = match cursor {
        Some(_) => &plan.next_bounds,
        None => &plan.first_bounds,
    };
    let (stmt, reused) = cached(conn, bounds_sql)
        .await
        .map_err(failed("finding the chunk bounds", None))?;
    match plan
        .keyset
        .next_chunk(&**conn, &stmt, cursor, upper, limit)
        .await
    {
        Ok(found) => Ok(Ok(found)),
        Err(NextChunkError::Stalled(stall)) => Ok(Err(stall)),
        Err(NextChunkError::Query(e)) => Err(failed_cached(
            "finding the chunk bounds",
            None,
            reused,
            conn,
        )(e)),
    }
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
    match tx.execute(&plan.advance, &advance).await {
        Ok(_) => {}
        Err(e) if db::sqlstate(&e) == Some(NOTHING_MOVED) => return Ok(false),
        Err(e) => return Err(e),
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
    conn: &deadpool_postgres::ClientWrapper,
    plan: &ChunkPlan<'_>,
    chunk: &Chunk,
    written: i64,
) -> Result<(), Failure> {
    let at = Some(chunk);
    let args = plan.statement_args(chunk);
    let count = cached(conn, &plan.count_chunk)
        .await
        .map_err(failed("counting the chunk's rows", at))?;
    let now: i64 = conn
        .query_one(&count.0, &args.params())
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
