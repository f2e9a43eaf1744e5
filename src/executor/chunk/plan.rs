//! Every statement of a chunk's transaction, built once per run ([`ChunkPlan`]), with the
//! statements on the range's row that, sent in the chunk's one transaction, are the exactly-once
//! rule (see `chunk::run`). Builds text only: must not send anything except preparing the
//! statements a chunk sends ([`ChunkPlan::apply_statements`]).

use crate::db::Timeouts;
use crate::executor::failure::{cached, failed, Cached, Failure};
use crate::job::JobSpec;
use crate::keyset::{KeyValue, Keyset};
use crate::store::{self, Store};
use std::time::Duration;
use tokio_postgres::types::ToSql;

/// A chunk's first and last key and its key count.
pub(super) type Chunk = (KeyValue, KeyValue, i64);

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
pub(in crate::executor) fn chunk_timeouts(lock: Duration, statement: Duration) -> Timeouts {
    Timeouts::chunk(lock, statement, store::LEASE_TIMEOUT)
}

/// Every statement of a chunk's transaction, built once per run (in the order they are sent).
pub(in crate::executor) struct ChunkPlan<'a> {
    pub(super) job: &'a JobSpec,
    pub(super) keyset: &'a Keyset,
    pub(super) timeouts: Timeouts,
    /// `BEGIN`, the timeouts, and the rows of the job's table written so far (nothing yet), in
    /// one message: `after_statement` subtracts it.
    pub(super) begin: String,
    pub(super) lock_range: String,
    /// Locks the range's row for a chunk on bounds found earlier, and fails ([`NOTHING_MOVED`])
    /// unless they still hold (see [`claim_sql`]).
    pub(super) claim: String,
    pub(super) first_bounds: String,
    pub(super) next_bounds: String,
    /// Copies the chunk's old values of the job's undo columns (same parameters as `statement`).
    pub(super) undo_copy: Option<String>,
    pub(super) statement: String,
    /// After the statement: the server's clock, sessions blocked on the chunk's locks, and the
    /// rows of the job's table the statement wrote.
    pub(super) after_statement: String,
    /// The rows in the chunk's bounds now (parameters as `statement`'s).
    pub(super) count_chunk: String,
    pub(super) advance: String,
    pub(super) range_done: String,
}

impl<'a> ChunkPlan<'a> {
    pub(in crate::executor) fn new(
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
                "BEGIN; {}; SELECT set_config('{WRITTEN_BEFORE}', {}::text, true)",
                timeouts.set_local(),
                keyset.written_sql()
            ),
            lock_range: lock_range_sql(store.quoted_schema()),
            claim: claim_sql(store.quoted_schema(), keyset),
            first_bounds: keyset.next_chunk_sql(false),
            next_bounds: keyset.next_chunk_sql(true),
            undo_copy: crate::undo::copy_sql(store, job, keyset),
            statement: keyset.render(&job.sql),
            after_statement: format!(
                "SELECT extract(epoch FROM clock_timestamp())::float8, ({BLOCKED_SQL}),
                        {} - current_setting('{WRITTEN_BEFORE}')::bigint",
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

/// Locks an owned range's row for a chunk whose bounds were found by the chunk before (with
/// `$5` the cursor and `$6` the upper bound they were found for, `$7…` that cursor and then the
/// chunk's first key, one parameter per key column): one row when the range still has that
/// cursor and upper bound and no key of the table lies between the cursor and the first key
/// (one inserted there since would be skipped). Otherwise it fails with [`NOTHING_MOVED`], so
/// the statements sent behind it in the same round trip fail too and nothing of them runs.
/// (The page walk's first page always follows its cursor: nothing to look for.)
fn claim_sql(s: &str, keyset: &Keyset) -> String {
    format!(
        "SELECT 1 / count(*)::int
           FROM (SELECT 1 FROM {s}.ranges
                  WHERE job = $1 AND id = $2 AND owner_run = $3 AND owner_worker = $4
                    AND NOT done AND cursor IS NOT DISTINCT FROM $5 AND upper_bound = $6
                  FOR UPDATE) owned
          WHERE {}",
        keyset.nothing_between_sql(7)
    )
}

/// Moves an owned range's cursor from `$5` (the value read under the lock) to `$6` and books
/// `$7` keys, `$8` rows affected and a chunk size of `$9` on the range and on the run's worker,
/// in one statement, so the run's history holds exactly what its committed chunks did even when
/// a COMMIT's answer was lost. When the range is no longer owned or its cursor is no longer `$5`,
/// it moves nothing and fails with [`NOTHING_MOVED`] (a division by the zero rows moved), so that
/// a COMMIT sent behind it in the same round trip rolls back.
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
         SELECT 1 / count(*)::int FROM moved"
    )
}

/// The SQLSTATE of the cursor advance that moved nothing (division by zero, see [`advance_sql`]):
/// the range is no longer this worker's.
pub(super) const NOTHING_MOVED: &str = "22012";

/// Marks an owned range finished (no key left in it) and lets it go.
fn range_done_sql(s: &str) -> String {
    format!(
        "UPDATE {s}.ranges SET done = true, owner_run = NULL, owner_worker = NULL, updated_at = now()
          WHERE job = $1 AND id = $2 AND owner_run = $3 AND owner_worker = $4"
    )
}

/// The statements [`apply`] sends, from the connection's cache.
pub(super) struct ApplyStatements {
    pub(super) stamp: Cached,
    pub(super) undo_copy: Option<Cached>,
    pub(super) statement: Cached,
    pub(super) after: Cached,
}

impl ApplyStatements {
    /// Marks the statements as prepared by an earlier transaction (see `failure::cached`).
    pub(super) fn prepared_earlier(&mut self) {
        let all = [&mut self.stamp, &mut self.statement, &mut self.after];
        for (_, reused) in all.into_iter().chain(self.undo_copy.as_mut()) {
            *reused = true;
        }
    }
}

impl ChunkPlan<'_> {
    pub(super) async fn apply_statements(
        &self,
        conn: &deadpool_postgres::ClientWrapper,
        chunk: &Chunk,
    ) -> Result<ApplyStatements, Failure> {
        let at = Some(chunk);
        let undo_copy = match &self.undo_copy {
            Some(sql) => Some(
                cached(conn, sql)
                    .await
                    .map_err(failed("preparing the undo copy", at))?,
            ),
            None => None,
        };
        Ok(ApplyStatements {
            stamp: cached(conn, STAMP_SQL)
                .await
                .map_err(failed("preparing the job's statement", at))?,
            undo_copy,
            statement: cached(conn, &self.statement)
                .await
                .map_err(failed("preparing the job's statement", at))?,
            after: cached(conn, &self.after_statement)
                .await
                .map_err(failed("preparing the job's statement", at))?,
        })
    }
}

/// The server's clock, in seconds: around the statement, the chunk's work as the server saw it.
const STAMP_SQL: &str = "SELECT extract(epoch FROM clock_timestamp())::float8";

/// The job statement's parameters for a chunk: its first and last key, as the statement binds
/// them (pages become tids for the page walk).
pub(super) struct StatementArgs {
    from: KeyValue,
    to: KeyValue,
}

impl StatementArgs {
    pub(super) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.from.iter().chain(&self.to).map(|v| v as _).collect()
    }
}

impl ChunkPlan<'_> {
    pub(super) fn statement_args(&self, chunk: &Chunk) -> StatementArgs {
        let (from, to) = self.keyset.statement_bounds(&chunk.0, &chunk.1);
        StatementArgs { from, to }
    }
}
