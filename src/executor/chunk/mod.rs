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

mod flight;
mod plan;
mod skip;

use flight::Flight;

use super::failure::{cached, failed, failed_cached, failure_of, from_server, sent, Failure};
use super::recovery::Problem;
use crate::db::{self, ErrorClass};
use crate::error::{ChunkCause, WroteOutside};
use crate::keyset::{self, ChunkBounds, KeyValue, NextChunkError};
use crate::store::RangeLease;
pub(super) use plan::{chunk_timeouts, ChunkPlan};
use plan::{ApplyStatements, Chunk, NOTHING_MOVED};
pub(super) use skip::{skip_key, Skip};
use std::time::{Duration, Instant};
use tokio_postgres::types::ToSql;

/// What one chunk attempt came to.
pub(super) enum Step {
    Committed(Box<ChunkDone>),
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
/// while the range's row still says what it said then — the cursor they follow and the upper
/// bound they stop at (a split lowers it; a takeover moves the cursor) — and no key was inserted
/// between that cursor and their first key since: the chunk's claim checks all of it.
#[derive(Debug, Clone)]
pub(super) struct NextChunk {
    after: KeyValue,
    upper: KeyValue,
    bounds: ChunkBounds,
    /// The chunk size they were found for.
    asked: i64,
}

/// The range's row as read under its lock.
struct RangeRow {
    cursor: Option<KeyValue>,
    upper: KeyValue,
    done: bool,
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
/// 1. `BEGIN` with the timeouts; the claim (lock the range's row, checking the owner, the cursor
///    and upper bound `next` was found for, and that no key lies before its first); the undo
///    copy and the job's statement on `next`'s bounds; the blocked sessions and rows written;
/// 2. the bounds of the chunk after this one (inside a savepoint: a failure there only loses
///    them); advance the cursor; `COMMIT`.
///
/// Without bounds, or when the claim fails (the range's first chunk, after a failure, a split,
/// a smaller chunk size), the range's row is locked and read, the bounds are found under the
/// lock, then the statement runs: two more round trips, once.
///
/// Exactly once: the statement and its cursor advance commit in this one transaction, or neither
/// does. The statement runs only behind a lock of the range's row that checked the owner and the
/// bounds (a failed claim makes the statement behind it fail unrun); the advance moves the cursor
/// only from the value the bounds follow and only while this worker owns the range, and if it
/// moved nothing, it raises (`NOTHING_MOVED`), so the `COMMIT` behind it rolls back. A request a
/// round trip could not send stops every request behind it (`Flight`), so a `COMMIT` never goes
/// out without the statements before it. So no crash, kill, retry, split or takeover around a
/// chunk can make it apply twice, and after any failure the worker simply goes on from the
/// cursor as committed (a COMMIT whose answer was lost may still have happened).
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
    /// The chunk size its bounds were found for.
    asked: i64,
}

impl ChunkTx<'_, '_> {
    /// [`run`]'s transaction; on an error the caller rolls back.
    async fn attempt(&mut self, next: Option<NextChunk>) -> Result<Step, Failure> {
        let limit = self.limit;
        let mut ran = None;
        if let Some(next) = next.filter(|n| n.asked <= limit) {
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

    /// The steady state, one round trip: the claim, and behind it the statement on the bounds
    /// the previous chunk found. None (rolled back, nothing of the statement run) when the claim
    /// finds that they no longer hold.
    async fn on_carried_bounds(&mut self, next: NextChunk) -> Result<Option<Ran>, Failure> {
        let (conn, plan) = (self.conn, self.plan);
        let claim = cached(conn, &plan.claim)
            .await
            .map_err(failed("locking the key range", None))?;
        let chunk: Chunk = (
            next.bounds.first.clone(),
            next.bounds.last.clone(),
            next.bounds.keys,
        );
        let mut statements = plan.apply_statements(conn, &chunk).await?;
        // Prepared before this transaction began: a table changed since would show as a stale
        // plan, which these may have as much as statements from an earlier chunk.
        statements.prepared_earlier();
        let args = plan.statement_args(&chunk);
        let args = args.params();
        let mut claimed: Vec<&(dyn ToSql + Sync)> = self.owner.to_vec();
        claimed.extend([&next.after as &(dyn ToSql + Sync), &next.upper]);
        claimed.extend(
            plan.keyset
                .nothing_between_params(&next.after, &next.bounds.first),
        );
        let flight = Flight::default();
        self.round_trips += 1;
        let (begun, held, applied) = tokio::join!(
            biased;
            flight.send(conn.batch_execute(&plan.begin)),
            flight.send(conn.query_one(&claim.0, &claimed)),
            apply(conn, &flight, &statements, &chunk, &args),
        );
        sent(begun, "setting timeouts", None)?;
        match held {
            Some(Ok(_)) => {}
            Some(Err(e)) if db::sqlstate(&e) == Some(NOTHING_MOVED) => {
                // The bounds no longer hold (or the range is no longer this worker's): nothing of
                // the statement ran. Find them afresh under the lock.
                self.round_trips += 1;
                conn.batch_execute("ROLLBACK")
                    .await
                    .map_err(failed("starting the chunk again", None))?;
                return Ok(None);
            }
            other => {
                sent(other, "locking the key range", None)?;
            }
        }
        Ok(Some(Ran {
            row: RangeRow {
                cursor: Some(next.after),
                upper: next.upper,
                done: false,
            },
            chunk,
            applied: applied?,
            asked: next.asked,
        }))
    }

    /// The range locked and read, then its next bounds found under the lock, then the statement
    /// run on them: three round trips. None when no key is left: the range is marked done
    /// (committed).
    async fn on_fresh_bounds(&mut self) -> Result<Option<Ran>, Failure> {
        let (conn, plan) = (self.conn, self.plan);
        let lock = cached(conn, &plan.lock_range)
            .await
            .map_err(failed("locking the key range", None))?;
        let flight = Flight::default();
        self.round_trips += 1;
        let (begun, locked) = tokio::join!(
            biased;
            flight.send(conn.batch_execute(&plan.begin)),
            flight.send(conn.query_opt(&lock.0, &self.owner)),
        );
        sent(begun, "setting timeouts", None)?;
        let row = match sent(locked, "locking the key range", None)? {
            Some(row) => RangeRow {
                cursor: row.get(0),
                upper: row.get(1),
                done: row.get(2),
            },
            None => return Err(Failure::lost("locking the key range")),
        };
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
        let applied = apply(
            conn,
            &Flight::default(),
            &statements,
            &chunk,
            &args.params(),
        )
        .await?;
        Ok(Some(Ran {
            row,
            chunk,
            applied,
            asked: self.limit,
        }))
    }

    /// The second round trip: the next chunk's bounds (inside a savepoint, so that a failure
    /// there loses only them), the cursor advance, `COMMIT`. The chunk committed exactly when
    /// the advance and the COMMIT both answered without error.
    async fn finish(&mut self, ran: Ran) -> Result<Step, Failure> {
        let (conn, plan, limit) = (self.conn, self.plan, self.limit);
        let Ran {
            row,
            chunk,
            applied,
            asked,
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
        let keyset = plan.keyset;
        let flight = Flight::default();
        self.round_trips += 1;
        let (saved, found, restored, advanced, committed) = tokio::join!(
            biased;
            flight.send(conn.batch_execute("SAVEPOINT next_bounds")),
            flight.send(keyset.next_chunk(&**conn, &bounds.0, Some(&chunk.1), &row.upper, limit)),
            flight.send(conn.batch_execute("ROLLBACK TO SAVEPOINT next_bounds")),
            flight.send(conn.query_one(&advance.0, &params)),
            flight.send(conn.batch_execute("COMMIT")),
        );
        // Without an answer to the COMMIT (the connection is gone), whether the chunk committed
        // is unknown: that is what the operator is told, and the worker goes on from the cursor
        // as committed, whichever it was.
        let found = settle(saved, found, restored, advanced, committed, at)?;
        // A walk that would not move forward, or bounds that failed, are found again (and
        // reported) by the next chunk, under its lock.
        let next = found.map(|bounds| NextChunk {
            after: chunk.1.clone(),
            upper: row.upper,
            bounds,
            asked: limit,
        });
        Ok(Step::Committed(Box::new(ChunkDone {
            last: chunk.1,
            keys: chunk.2,
            affected: applied.affected,
            took: Duration::ZERO,
            work: applied.work,
            asked,
            blocked: applied.blocked,
            round_trips: 0,
            next,
        })))
    }
}

/// What the second round trip's answers say: the next chunk's bounds when the chunk committed
/// (None when they could not be found: the next chunk finds them afresh), or the failure that
/// decides.
fn settle(
    saved: Answer<()>,
    found: Option<Result<Option<ChunkBounds>, NextChunkError>>,
    restored: Answer<()>,
    advanced: Answer<tokio_postgres::Row>,
    committed: Answer<()>,
    at: Option<&Chunk>,
) -> Result<Option<ChunkBounds>, Failure> {
    // Which failure decides, in this order: an error from the server (the transaction is
    // certainly not committed: nothing behind it ran) — the bounds' own only when it took
    // the transaction down with it, past the savepoint; then the COMMIT's, whose outcome is
    // unknown when the connection went away before its answer (the worker goes on from the
    // cursor as committed, whichever it was); then a request that could not be sent.
    let bounds = "finding the next chunk's bounds";
    let (found, bounds_error) = match found {
        Some(Ok(found)) => (found, None),
        Some(Err(NextChunkError::Query(e))) => (None, Some(e)),
        Some(Err(NextChunkError::Stalled(_))) | None => (None, None),
    };
    if from_server(&saved) {
        return Err(failure_of(saved, bounds, at));
    }
    if !matches!(restored, Some(Ok(()))) {
        if let Some(e) = bounds_error.filter(|e| e.as_db_error().is_some() || restored.is_none()) {
            return Err(failed(bounds, at)(e));
        }
    }
    if from_server(&restored) {
        return Err(failure_of(restored, bounds, at));
    }
    if from_server(&advanced) {
        return Err(match advanced {
            Some(Err(e)) if db::sqlstate(&e) == Some(NOTHING_MOVED) => {
                Failure::lost("saving the checkpoint")
            }
            other => failure_of(other, "saving the checkpoint", at),
        });
    }
    if matches!(committed, Some(Err(_))) {
        return Err(failure_of(committed, "committing", at));
    }
    sent(saved, bounds, at)?;
    sent(restored, bounds, at)?;
    sent(advanced, "saving the checkpoint", at)?;
    sent(committed, "committing", at)?;
    Ok(found)
}

/// A request's answer from its flight (None: not sent).
type Answer<T> = Option<Result<T, tokio_postgres::Error>>;

/// Sends, in one round trip (on `flight`): the server's clock, the undo copy (jobs with `undo`),
/// the job's statement on the chunk's bounds, and what came after it (the clock again, blocked
/// sessions, rows written).
async fn apply(
    conn: &deadpool_postgres::ClientWrapper,
    flight: &Flight,
    s: &ApplyStatements,
    chunk: &Chunk,
    args: &[&(dyn ToSql + Sync)],
) -> Result<Applied, Failure> {
    let at = Some(chunk);
    let (stamped, copied, ran, after) = tokio::join!(
        biased;
        flight.send(conn.query_one(&s.stamp.0, &[])),
        async {
            match &s.undo_copy {
                Some(copy) => Some(flight.send(conn.execute(&copy.0, args)).await),
                None => None,
            }
        },
        flight.send(conn.execute(&s.statement.0, args)),
        flight.send(conn.query_one(&s.after.0, &[])),
    );
    let began: f64 = sent(stamped, "running the job's statement", at)?.get(0);
    if let (Some(copied), Some(copy)) = (copied, &s.undo_copy) {
        let stage = "copying the rows' old values to the undo table";
        copied
            .ok_or_else(|| Failure::not_sent(stage))?
            .map_err(failed_cached(stage, at, copy.1, conn))?;
    }
    let stage = "running the job's statement";
    let affected = ran
        .ok_or_else(|| Failure::not_sent(stage))?
        .map_err(failed_cached(stage, at, s.statement.1, conn))?;
    // Application sessions queued behind this chunk's row locks: the chunk commits now (which
    // releases them) and tells the caller, which yields by shrinking the next chunks. The same
    // round trip reads how many rows of the job's table the statement wrote (`affected` counts
    // the rows of whatever table the statement targets).
    let after = sent(after, "looking for blocked sessions", at)?;
    let ended: f64 = after.get(0);
    Ok(Applied {
        affected: affected as i64,
        blocked: after.get(1),
        written: after.get(2),
        work: Duration::from_secs_f64((ended - began).max(0.0)),
    })
}

/// Marks the range done and commits, in one round trip (the COMMIT rolls back if the mark
/// failed).
async fn close_range(
    conn: &deadpool_postgres::ClientWrapper,
    plan: &ChunkPlan<'_>,
    owner: &[&(dyn ToSql + Sync); 4],
) -> Result<(), Failure> {
    let stage = "closing the key range";
    let done = cached(conn, &plan.range_done)
        .await
        .map_err(failed(stage, None))?;
    let flight = Flight::default();
    let (closed, committed) = tokio::join!(
        biased;
        flight.send(conn.execute(&done.0, owner)),
        flight.send(conn.batch_execute("COMMIT")),
    );
    sent(closed, stage, None)?;
    sent(committed, stage, None)?;
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
