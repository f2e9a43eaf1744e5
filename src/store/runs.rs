//! A run's history row: what it counted, its heartbeat, how it ended (and what that makes the
//! job's state), and the history as `backfill history` shows it.

use super::{ts, Store};
use crate::db;
use crate::error::Result;
use crate::state::{JobState, RunEnd, RunOutcome};
use tokio_postgres::GenericClient;

/// Another job's live run on the same table: the job, and where its runner is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRunner {
    pub job: String,
    pub host: String,
    pub pid: i32,
}

impl Store {
    /// A live run of a job other than `jobs` on the same table as `table` (both names resolved
    /// the way this session resolves them, so `orders` and `public.orders` are one table; a
    /// table that does not exist matches nothing). `jobs[0]` names the job in errors.
    pub async fn other_job_on_table(
        &self,
        client: &impl GenericClient,
        jobs: &[String],
        table: &str,
    ) -> Result<Option<TableRunner>> {
        let job = jobs.first().map(String::as_str).unwrap_or_default();
        let row = client
            .query_opt(
                &format!(
                    "SELECT r.job, r.host, r.pid FROM {s}.runs r
                       JOIN {s}.checkpoints c ON c.job = r.job
                      WHERE r.job <> ALL($1)
                        AND to_regclass(c.table_name) = to_regclass($2)
                        AND {alive}
                      ORDER BY r.id LIMIT 1",
                    s = self.q,
                    alive = Self::run_alive_sql("r"),
                ),
                &[&jobs, &table],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: looking for other jobs on {table}")))?;
        Ok(row.map(|r| TableRunner {
            job: r.get(0),
            host: r.get(1),
            pid: r.get(2),
        }))
    }

    /// `SET` assignments of a run row's counters from what its workers counted in their chunks'
    /// transactions (`run` is the SQL expression of the run's id).
    pub(super) fn run_counts_sql(&self, run: &str) -> String {
        format!(
            "rows_done = (SELECT coalesce(sum(w.rows_done), 0) FROM {s}.run_workers w WHERE w.run_id = {run}),
             chunks_done = (SELECT coalesce(sum(w.chunks_done), 0) FROM {s}.run_workers w WHERE w.run_id = {run})",
            s = self.q
        )
    }

    /// What run `run_id` committed so far, all its workers together: (keys, rows the statement
    /// changed, chunks). Counted in the chunks' own transactions, so exact whatever was lost.
    pub async fn run_counts(
        &self,
        client: &impl GenericClient,
        run_id: i64,
    ) -> Result<(i64, i64, i64)> {
        let row = client
            .query_one(
                &format!(
                    "SELECT coalesce(sum(rows_done), 0)::bigint, coalesce(sum(rows_affected), 0)::bigint,
                            coalesce(sum(chunks_done), 0)::bigint
                       FROM {s}.run_workers WHERE run_id = $1",
                    s = self.q
                ),
                &[&run_id],
            )
            .await
            .map_err(|e| db::error(e, format!("run {run_id}: reading what it did")))?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }

    /// Renews the run's lease, and records its recent rate (see `RecentRate`; None: not
    /// measured yet). Returns false when the run was declared gone meanwhile.
    pub async fn heartbeat(
        &self,
        client: &impl GenericClient,
        run_id: i64,
        recent_rows_per_second: Option<f64>,
    ) -> Result<bool> {
        let n = client
            .execute(
                &format!(
                    "UPDATE {s}.runs SET heartbeat_at = now(), recent_rows_per_second = $2
                      WHERE id = $1 AND outcome IS NULL",
                    s = self.q
                ),
                &[&run_id, &recent_rows_per_second],
            )
            .await
            .map_err(|e| db::error(e, format!("run {run_id}: renewing the lease")))?;
        Ok(n == 1)
    }

    /// Ends a run: closes its history row with what it did (as its chunks counted it in their
    /// own transactions, see `advance`), frees its ranges for others, and
    /// sets the job's state — `done`/`incomplete` unless another run's sweep is still being
    /// walked, any other outcome only when no other run is still working on the job; nothing
    /// but `done` replaces `done`. A run already declared gone
    /// (`abandoned` by another) changes nothing.
    pub async fn finish(
        &self,
        client: &impl GenericClient,
        job: &str,
        run_id: i64,
        end: RunEnd,
        error: Option<&str>,
        verify_remaining: Option<i64>,
    ) -> Result<()> {
        let state = end.state();
        let err = |e| db::error(e, format!("job {job}: saving the final state ({state})"));
        // The run's ranges are let go first, on their own: locking range rows and then the job's
        // row is the order a split follows, so the two never wait on each other in a cycle.
        client
            .execute(
                &format!(
                    "UPDATE {s}.ranges SET owner_run = NULL, owner_worker = NULL
                      WHERE job = $1 AND owner_run = $2",
                    s = self.q
                ),
                &[&job, &run_id],
            )
            .await
            .map_err(err)?;
        client
            .execute(
                &format!(
                    "WITH run AS (
                        UPDATE {s}.runs SET ended_at = now(), outcome = $3, last_error = $4,
                               {counts}, hold_reason = NULL, held_since = NULL,
                               end_cursor = CASE WHEN (SELECT count(*) FROM {s}.ranges WHERE job = $1) = 1
                                                 THEN (SELECT cursor FROM {s}.ranges WHERE job = $1) END
                         WHERE id = $2 AND outcome IS NULL RETURNING id)
                     UPDATE {s}.checkpoints c SET state = $6, last_error = $4, updated_at = now(), phase = $7,
                            finished_at = CASE WHEN $8 THEN now() ELSE finished_at END,
                            verify_remaining = CASE WHEN $8 THEN $5 ELSE verify_remaining END,
                            verified_at = CASE WHEN $5::bigint IS NOT NULL THEN now() ELSE verified_at END,
                            total_estimate = CASE WHEN $8
                                THEN (SELECT coalesce(sum(rows_done), 0) FROM {s}.ranges WHERE job = $1)
                                ELSE total_estimate END,
                            total_exact = total_exact OR $8
                      WHERE c.job = $1 AND EXISTS (SELECT 1 FROM run)
                        -- nothing but a finish replaces a finished job's state
                        AND c.state = ANY($9)
                        -- another run's sweep still being walked: that run records the outcome
                        AND (NOT $8
                             OR NOT EXISTS (SELECT 1 FROM {s}.ranges g WHERE g.job = $1 AND NOT g.done))
                        AND ($8
                             OR NOT EXISTS (SELECT 1 FROM {s}.runs r WHERE r.job = $1 AND r.id <> $2 AND {alive}))",
                    s = self.q,
                    alive = Self::run_alive_sql("r"),
                    counts = self.run_counts_sql("$2"),
                ),
                &[
                    &job,
                    &run_id,
                    &end.outcome().as_sql(),
                    &error,
                    &verify_remaining,
                    &state.as_sql(),
                    &end.phase(verify_remaining).as_sql(),
                    &end.ends_pass(),
                    &JobState::may_become_from(state),
                ],
            )
            .await
            .map_err(err)?;
        Ok(())
    }
}

/// One row of a job's run history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub host: String,
    pub pid: i32,
    pub engine_version: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub rows_done: i64,
    pub chunks_done: i64,
    /// None while the run is going (or died and no run noticed yet).
    pub outcome: Option<RunOutcome>,
    pub last_error: Option<String>,
}

impl Store {
    /// The runs of a job, oldest first.
    pub async fn history(&self, client: &impl GenericClient, job: &str) -> Result<Vec<RunRecord>> {
        let err = |e| db::error(e, format!("job {job}: reading its run history"));
        if !self.readable(client).await? {
            return Ok(Vec::new());
        }
        let rows = client
            .query(
                &format!(
                    "SELECT id, host, pid, engine_version, {started}, {ended}, rows_done, chunks_done, outcome, last_error
                       FROM {s}.runs WHERE job = $1 ORDER BY id",
                    started = ts("started_at"),
                    ended = ts("ended_at"),
                    s = self.q
                ),
                &[&job],
            )
            .await
            .map_err(err)?;
        rows.iter()
            .map(|r| {
                Ok(RunRecord {
                    id: r.get(0),
                    host: r.get(1),
                    pid: r.get(2),
                    engine_version: r.get(3),
                    started_at: r.get(4),
                    ended_at: r.get(5),
                    rows_done: r.get(6),
                    chunks_done: r.get(7),
                    outcome: r.try_get(8).map_err(err)?,
                    last_error: r.get(9),
                })
            })
            .collect()
    }
}
