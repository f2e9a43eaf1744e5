//! Reading a job's checkpoint as `status`, the gate and a joining run see it: its row, with
//! progress summed over its key ranges, its live and dead runners, the rate and why it is held.
//! Only reads; what writes the checkpoint lives with the step that writes it.

use super::{ts, RangeInfo, Store};
use crate::db;
use crate::error::Result;
use crate::keyset::KeyValue;
use crate::state::{CompletionGap, JobState, Phase, RunOutcome, ShownState, StepState};
use tokio_postgres::GenericClient;

/// A job's persisted progress, as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Checkpoint {
    pub job: String,
    /// The recorded state — or `interrupted` when the row says running but no runner is alive
    /// (a crash or kill).
    pub state: ShownState,
    pub fingerprint: String,
    pub table: String,
    pub key_columns: Vec<String>,
    /// The last key committed, while the job has a single range (with several, see `ranges`).
    pub cursor: Option<KeyValue>,
    pub upper_bound: Option<KeyValue>,
    pub bound_taken: bool,
    pub rows_done: i64,
    pub rows_affected: i64,
    pub chunks_done: i64,
    pub total_estimate: Option<i64>,
    /// Whether `total_estimate` is an exact count (of the key range at the start, or of a
    /// finished job) rather than the planner's estimate.
    pub total_exact: bool,
    pub verify_remaining: Option<i64>,
    pub verified_at: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    /// When the job's row or one of its key ranges last changed: while a run goes, the time its
    /// last chunk committed.
    pub updated_at: String,
    pub finished_at: Option<String>,
    pub last_error: Option<String>,
    /// The first live run (or, when none is alive, an unfinished dead one).
    pub owner: Option<Owner>,
    /// Every unfinished run, alive or not.
    pub runners: Vec<Owner>,
    pub ranges: Vec<RangeInfo>,
    /// Rows per second over all live runs (or of the last run), all processes together, on
    /// average since the first live run started.
    pub rate_rows_per_second: Option<f64>,
    /// Rows per second the live runs committed over their last 30 s, summed (see
    /// `lease::RecentRate`); None while no live run has measured one yet, or none is alive.
    pub recent_rows_per_second: Option<f64>,
    /// Keys recorded as failing and not yet resolved (`backfill failures`).
    pub failed_keys: i64,
    /// Keys per chunk of the last committed chunk.
    pub chunk_rows_now: Option<i32>,
    /// Why a live run is held right now, with the value seen and the threshold.
    pub hold_reason: Option<String>,
    pub held_since: Option<String>,
    /// What the job is doing or last did (waiting for expand, running, verifying, sweeping,
    /// finishing, done and verified, reverted…; `status` adds contract applied).
    pub phase: Option<Phase>,
    /// Sweep passes started after the main pass (rows written behind the cursor).
    pub sweeps: i32,
    /// Finishing steps declared by the job when it last ran, and those that succeeded.
    pub finish_steps: i32,
    pub finish_steps_done: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Owner {
    pub run_id: i64,
    pub host: String,
    pub pid: i32,
    pub workers: i32,
    pub alive: bool,
    pub heartbeat_at: Option<String>,
}

impl Store {
    pub(super) fn select_sql(&self) -> String {
        format!(
            "SELECT c.job, c.state, c.fingerprint, c.table_name, c.key_columns,
                    CASE WHEN g.ranges = 1 THEN (SELECT x.cursor FROM {s}.ranges x WHERE x.job = c.job) END AS cursor,
                    c.upper_bound, c.bound_taken,
                    coalesce(g.rows_done, 0) AS rows_done, coalesce(g.rows_affected, 0) AS rows_affected,
                    coalesce(g.chunks_done, 0) AS chunks_done, c.total_estimate, c.verify_remaining,
                    {verified} AS verified_at, {created} AS created_at, {started} AS started_at,
                    {updated} AS updated_at,
                    (SELECT sum(r.recent_rows_per_second) FROM {s}.runs r
                      WHERE r.job = c.job AND {alive_r}) AS recent_rate, {finished} AS finished_at, c.last_error,
                    o.id AS owner_run, coalesce(o.alive, false) AS alive,
                    coalesce(
                      (SELECT (coalesce(g.rows_done, 0) - r.start_rows)::float8
                              / NULLIF(extract(epoch FROM (now() - r.started_at)), 0)::float8
                         FROM {s}.runs r WHERE r.job = c.job AND {alive_r} ORDER BY r.id LIMIT 1),
                      (SELECT r.rows_done::float8
                              / NULLIF(extract(epoch FROM (r.ended_at - r.started_at)), 0)::float8
                         FROM {s}.runs r WHERE r.job = c.job AND r.ended_at IS NOT NULL AND r.outcome <> {abandoned}
                        ORDER BY r.id DESC LIMIT 1)) AS rate,
                    (SELECT count(*) FROM {s}.failures f WHERE f.job = c.job AND f.resolved_at IS NULL) AS failed_keys,
                    c.total_exact, g.chunk_rows_now,
                    CASE WHEN o.alive THEN o.hold_reason END AS hold_reason,
                    CASE WHEN o.alive THEN {held_since} END AS held_since,
                    c.phase, c.sweeps, c.finish_steps,
                    (SELECT count(*) FROM {s}.finish_steps f WHERE f.job = c.job AND f.state = {step_done}) AS finish_steps_done
               FROM {s}.checkpoints c
               LEFT JOIN LATERAL (
                    SELECT sum(rows_done)::bigint AS rows_done, sum(rows_affected)::bigint AS rows_affected,
                           sum(chunks_done)::bigint AS chunks_done, count(*) AS ranges,
                           (SELECT x.chunk_rows_now FROM {s}.ranges x WHERE x.job = c.job
                             ORDER BY x.updated_at DESC LIMIT 1) AS chunk_rows_now
                      FROM {s}.ranges WHERE job = c.job) g ON true
               LEFT JOIN LATERAL (
                    SELECT * FROM (SELECT r.id, r.hold_reason, r.held_since, {alive_r} AS alive
                                     FROM {s}.runs r WHERE r.job = c.job AND r.outcome IS NULL) u
                     ORDER BY u.alive DESC, u.hold_reason IS NULL, u.id LIMIT 1) o ON true",
            verified = ts("c.verified_at"),
            created = ts("c.created_at"),
            started = ts("c.started_at"),
            // A chunk moves its range's row, never the job's: its commit time is the range's.
            updated = ts(&format!(
                "greatest(c.updated_at, (SELECT max(x.updated_at) FROM {}.ranges x WHERE x.job = c.job))",
                self.q
            )),
            finished = ts("c.finished_at"),
            held_since = ts("o.held_since"),
            alive_r = Self::run_alive_sql("r"),
            abandoned = RunOutcome::Abandoned.literal(),
            step_done = StepState::Done.literal(),
            s = self.q,
        )
    }

    /// The checkpoint in a row of [`Store::select_sql`], without its runners and ranges (see
    /// [`Store::detail`]). Fails on a state or phase this engine does not know.
    pub(super) fn from_row(r: &tokio_postgres::Row) -> Result<Checkpoint> {
        let job: String = r.get("job");
        let unknown = |e| db::error(e, format!("job {job}: reading its checkpoint"));
        let recorded: JobState = r.try_get("state").map_err(unknown)?;
        let phase: Option<Phase> = r.try_get("phase").map_err(unknown)?;
        Ok(Checkpoint {
            state: ShownState::of(recorded, r.get("alive")),
            job,
            fingerprint: r.get("fingerprint"),
            table: r.get("table_name"),
            key_columns: r.get("key_columns"),
            cursor: r.get("cursor"),
            upper_bound: r.get("upper_bound"),
            bound_taken: r.get("bound_taken"),
            rows_done: r.get("rows_done"),
            rows_affected: r.get("rows_affected"),
            chunks_done: r.get("chunks_done"),
            total_estimate: r.get("total_estimate"),
            verify_remaining: r.get("verify_remaining"),
            verified_at: r.get("verified_at"),
            created_at: r.get("created_at"),
            started_at: r.get("started_at"),
            updated_at: r.get("updated_at"),
            finished_at: r.get("finished_at"),
            last_error: r.get("last_error"),
            owner: None,
            runners: Vec::new(),
            ranges: Vec::new(),
            rate_rows_per_second: r.get("rate"),
            recent_rows_per_second: r.get("recent_rate"),
            failed_keys: r.get("failed_keys"),
            total_exact: r.get("total_exact"),
            chunk_rows_now: r.get("chunk_rows_now"),
            hold_reason: r.get("hold_reason"),
            phase,
            sweeps: r.get("sweeps"),
            finish_steps: r.get("finish_steps"),
            finish_steps_done: r.get("finish_steps_done"),
            held_since: r.get("held_since"),
        })
    }

    /// Fills in the job's unfinished runs and its ranges.
    pub(super) async fn detail(
        &self,
        client: &impl GenericClient,
        c: &mut Checkpoint,
    ) -> Result<()> {
        let rows = client
            .query(
                &format!(
                    "SELECT r.id, r.host, r.pid, r.workers, {hb}, {alive}
                       FROM {s}.runs r WHERE r.job = $1 AND r.outcome IS NULL ORDER BY r.id",
                    hb = ts("r.heartbeat_at"),
                    alive = Self::run_alive_sql("r"),
                    s = self.q
                ),
                &[&c.job],
            )
            .await
            .map_err(|e| db::error(e, format!("job {}: reading its runners", c.job)))?;
        c.runners = rows
            .iter()
            .map(|r| Owner {
                run_id: r.get(0),
                host: r.get(1),
                pid: r.get(2),
                workers: r.get(3),
                heartbeat_at: r.get(4),
                alive: r.get(5),
            })
            .collect();
        c.owner = c
            .runners
            .iter()
            .find(|o| o.alive)
            .or(c.runners.first())
            .cloned();
        c.ranges = self.ranges(client, &c.job).await?;
        Ok(())
    }

    /// The checkpoint of one job, if it ever ran. None also when the engine's schema is absent.
    pub async fn load(&self, client: &impl GenericClient, job: &str) -> Result<Option<Checkpoint>> {
        if !self.readable(client).await? {
            return Ok(None);
        }
        let sql = format!("{} WHERE c.job = $1", self.select_sql());
        let row = client
            .query_opt(&sql, &[&job])
            .await
            .map_err(|e| db::error(e, format!("job {job}: reading its checkpoint")))?;
        let Some(row) = row else { return Ok(None) };
        let mut c = Self::from_row(&row)?;
        self.detail(client, &mut c).await?;
        Ok(Some(c))
    }

    /// Every checkpoint, by job name.
    pub async fn load_all(&self, client: &impl GenericClient) -> Result<Vec<Checkpoint>> {
        if !self.readable(client).await? {
            return Ok(Vec::new());
        }
        let sql = format!("{} ORDER BY c.job", self.select_sql());
        let rows = client
            .query(&sql, &[])
            .await
            .map_err(|e| db::error(e, "reading checkpoints"))?;
        let mut all = Vec::new();
        for row in &rows {
            let mut c = Self::from_row(row)?;
            self.detail(client, &mut c).await?;
            all.push(c);
        }
        Ok(all)
    }

    /// What keeps `job` from being complete, its verify aside; None when nothing does. Asks the
    /// engine's SQL function `completion_gap`, the one definition the SQL gate uses too.
    /// `declared_steps`: the finishing steps the job's file declares now (None: those its last
    /// run recorded).
    pub async fn completion_gap(
        &self,
        client: &impl GenericClient,
        job: &str,
        declared_steps: Option<i32>,
    ) -> Result<Option<Incomplete>> {
        let err = |e| db::error(e, format!("job {job}: checking that it is complete"));
        let row = client
            .query_one(
                &format!(
                    "SELECT gap, failed_keys, steps_done, steps_declared FROM {s}.completion_gap($1, $2)",
                    s = self.q
                ),
                &[&job, &declared_steps],
            )
            .await
            .map_err(err)?;
        let gap: Option<CompletionGap> = row.try_get(0).map_err(err)?;
        // The function stops counting at the first gap it finds: later counts are NULL.
        let count = |i| row.get::<_, Option<i64>>(i).unwrap_or(0);
        Ok(gap.map(|gap| Incomplete {
            gap,
            failed_keys: count(1),
            steps_done: count(2),
            steps_declared: row.get::<_, Option<i32>>(3).unwrap_or(0),
        }))
    }
}

/// What keeps a job from being complete, its verify aside (see [`Store::completion_gap`]): the
/// gap, and the counts its message names (0 where the gap was found before they were counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incomplete {
    pub gap: CompletionGap,
    /// Keys skipped for a data error and unresolved.
    pub failed_keys: i64,
    /// Finishing steps that succeeded, of those declared.
    pub steps_done: i64,
    pub steps_declared: i32,
}
