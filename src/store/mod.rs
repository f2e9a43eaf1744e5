//! The engine's own tables (in `--schema`, default `backfill`): one checkpoint row per job (its
//! definition's fingerprint, key range, state), the job's key *ranges* (each with its own cursor
//! and owner, see `ranges.rs`), one history row per run, and the leases that keep runners apart.
//!
//! A *run* is one `backfill run` process; it may run several workers, and several runs (on one
//! host or many) may work on a job at once. A run is alive while its *lease session* (a dedicated
//! connection held for the whole run) is still in `pg_stat_activity` and its heartbeat is fresher
//! than the lease timeout. A killed runner's session disappears at once, so its ranges are taken
//! over within moments; a hung runner whose session stays open loses them after the timeout.
//! Every chunk locks its range row and checks the owner inside its own transaction, so even a
//! runner that lost its lease cannot commit a chunk twice.

mod control;
mod failures;
mod lease;
mod phases;
mod ranges;
mod schema;

pub use control::{ControlChange, Controls};
pub use failures::{FailedKey, Poison};
pub use lease::LeaseState;
pub use phases::{revert_name, Sweep};
pub use ranges::{Acquired, Advance, RangeInfo, RangeLease, Splitter};
pub use schema::{
    gate_grants, gate_privileges_missing, grants, installed_version, migrate, migrate_up_to,
    LATEST as SCHEMA_VERSION,
};

use crate::db;
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::keyset::KeyValue;
use crate::sql::quote_ident;
use std::time::Duration;
use tokio_postgres::GenericClient;

/// A hung runner (session open, no heartbeat) loses its ranges after this long.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a run proves it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// A job's persisted progress, as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Checkpoint {
    pub job: String,
    /// new, running, stopped, cancelled, failed, done, incomplete — or `interrupted` when the row
    /// says running but no runner is alive (a crash or kill).
    pub state: String,
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
    pub updated_at: String,
    pub finished_at: Option<String>,
    pub last_error: Option<String>,
    /// The first live run (or, when none is alive, an unfinished dead one).
    pub owner: Option<Owner>,
    /// Every unfinished run, alive or not.
    pub runners: Vec<Owner>,
    pub ranges: Vec<RangeInfo>,
    /// Rows per second over all live runs (or of the last run), all processes together.
    pub rate_rows_per_second: Option<f64>,
    /// Keys recorded as failing and not yet resolved (`backfill failures`).
    pub failed_keys: i64,
    /// Keys per chunk of the last committed chunk.
    pub chunk_rows_now: Option<i32>,
    /// Why a live run is held right now, with the value seen and the threshold.
    pub hold_reason: Option<String>,
    pub held_since: Option<String>,
    /// What the job is doing or last did: running, verifying, sweeping, finishing, done and
    /// verified, reverting, reverted… (`status` adds waiting for expand and contract applied).
    pub phase: Option<String>,
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

/// Who is running: this process.
#[derive(Debug, Clone)]
pub struct Runner {
    pub host: String,
    pub pid: i32,
}

impl Runner {
    pub fn this_process() -> Runner {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let host = if rc == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        } else {
            "unknown".into()
        };
        Runner {
            host,
            pid: std::process::id() as i32,
        }
    }
}

/// What joining a job gave us.
pub enum Claim {
    /// We work on the job as run `run_id`; the checkpoint as it was when we joined.
    Owned { run_id: i64, checkpoint: Checkpoint },
    /// The job is already done; nothing to run.
    AlreadyDone(Checkpoint),
}

/// How long joining waits for the checkpoint row lock (held briefly by a split or a finish).
const JOIN_LOCK_WAIT: Duration = Duration::from_secs(10);

pub(crate) fn ts(col: &str) -> String {
    format!("to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
}

#[derive(Debug, Clone)]
pub struct Store {
    schema: String,
    q: String,
}

impl Store {
    pub fn new(schema: &str) -> Store {
        Store {
            schema: schema.to_string(),
            q: quote_ident(schema),
        }
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Makes sure the engine's schema is at the current version, creating or upgrading it when
    /// this role may; otherwise says to run `backfill init`.
    pub async fn ensure(&self, client: &mut tokio_postgres::Client) -> Result<()> {
        match installed_version(&*client, &self.schema).await? {
            Some(v) if v == SCHEMA_VERSION => Ok(()),
            _ => migrate(client, &self.schema).await.map(|_| ()),
        }
    }

    /// False when the engine's schema does not exist yet (nothing ever ran); an error when it is
    /// older than this engine reads and only `init` (or a run) may upgrade it.
    async fn readable(&self, client: &impl GenericClient) -> Result<bool> {
        match installed_version(client, &self.schema).await? {
            None => Ok(false),
            Some(v) if v < SCHEMA_VERSION => Err(Error::Runtime(format!(
                "the engine's schema `{}` is at version {v}; this backfill needs version {SCHEMA_VERSION}: run `backfill init` (or any `backfill run`) to upgrade it",
                self.schema
            ))),
            Some(_) => Ok(true),
        }
    }

    /// `SET` assignments of a run row's counters from what its workers counted in their chunks'
    /// transactions (`run` is the SQL expression of the run's id).
    fn run_counts_sql(&self, run: &str) -> String {
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

    /// Whether the run row aliased `r` is alive, as a SQL expression.
    fn run_alive_sql(r: &str) -> String {
        format!(
            "({r}.outcome IS NULL
              AND {r}.heartbeat_at > now() - make_interval(secs => {lease})
              AND EXISTS (SELECT 1 FROM pg_stat_activity a
                           WHERE a.pid = {r}.backend_pid
                             AND (a.backend_start IS NULL OR a.backend_start = {r}.backend_start)))",
            lease = LEASE_TIMEOUT.as_secs()
        )
    }

    fn select_sql(&self) -> String {
        format!(
            "SELECT c.job, c.state, c.fingerprint, c.table_name, c.key_columns,
                    CASE WHEN g.ranges = 1 THEN (SELECT x.cursor FROM {s}.ranges x WHERE x.job = c.job) END AS cursor,
                    c.upper_bound, c.bound_taken,
                    coalesce(g.rows_done, 0) AS rows_done, coalesce(g.rows_affected, 0) AS rows_affected,
                    coalesce(g.chunks_done, 0) AS chunks_done, c.total_estimate, c.verify_remaining,
                    {verified} AS verified_at, {created} AS created_at, {started} AS started_at,
                    {updated} AS updated_at, {finished} AS finished_at, c.last_error,
                    o.id AS owner_run, coalesce(o.alive, false) AS alive,
                    coalesce(
                      (SELECT (coalesce(g.rows_done, 0) - r.start_rows)::float8
                              / NULLIF(extract(epoch FROM (now() - r.started_at)), 0)::float8
                         FROM {s}.runs r WHERE r.job = c.job AND {alive_r} ORDER BY r.id LIMIT 1),
                      (SELECT r.rows_done::float8
                              / NULLIF(extract(epoch FROM (r.ended_at - r.started_at)), 0)::float8
                         FROM {s}.runs r WHERE r.job = c.job AND r.ended_at IS NOT NULL AND r.outcome <> 'abandoned'
                        ORDER BY r.id DESC LIMIT 1)) AS rate,
                    (SELECT count(*) FROM {s}.failures f WHERE f.job = c.job AND f.resolved_at IS NULL) AS failed_keys,
                    c.total_exact, g.chunk_rows_now,
                    CASE WHEN o.alive THEN o.hold_reason END AS hold_reason,
                    CASE WHEN o.alive THEN {held_since} END AS held_since,
                    c.phase, c.sweeps, c.finish_steps,
                    (SELECT count(*) FROM {s}.finish_steps f WHERE f.job = c.job AND f.state = 'done') AS finish_steps_done
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
            updated = ts("c.updated_at"),
            finished = ts("c.finished_at"),
            held_since = ts("o.held_since"),
            alive_r = Self::run_alive_sql("r"),
            s = self.q,
        )
    }

    fn from_row(r: &tokio_postgres::Row) -> Checkpoint {
        let alive: bool = r.get("alive");
        let mut state: String = r.get("state");
        if state == "running" && !alive {
            state = "interrupted".into();
        }
        Checkpoint {
            job: r.get("job"),
            state,
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
            failed_keys: r.get("failed_keys"),
            total_exact: r.get("total_exact"),
            chunk_rows_now: r.get("chunk_rows_now"),
            hold_reason: r.get("hold_reason"),
            phase: r.get("phase"),
            sweeps: r.get("sweeps"),
            finish_steps: r.get("finish_steps"),
            finish_steps_done: r.get("finish_steps_done"),
            held_since: r.get("held_since"),
        }
    }

    /// Fills in the job's unfinished runs and its ranges.
    async fn detail(&self, client: &impl GenericClient, c: &mut Checkpoint) -> Result<()> {
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
        let mut c = Self::from_row(&row);
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
            let mut c = Self::from_row(row);
            self.detail(client, &mut c).await?;
            all.push(c);
        }
        Ok(all)
    }

    /// Joins the job as a new run whose lease session is `client`, alongside any live runs.
    /// Refuses when the definition changed after progress was made, or while live runs work
    /// with another definition.
    pub async fn claim(
        &self,
        client: &mut tokio_postgres::Client,
        job: &JobSpec,
        runner: &Runner,
        workers: u32,
        allow_changed_definition: bool,
    ) -> Result<Claim> {
        let name = job.name.as_str();
        let err = |e: tokio_postgres::Error| {
            if db::sqlstate(&e) == Some("55P03") {
                Error::Runtime(format!(
                    "job {name}: its checkpoint row stayed locked for {}s (another runner's transaction still ending, or a session holding it); try again shortly, or look for the blocking session in pg_stat_activity",
                    JOIN_LOCK_WAIT.as_secs()
                ))
            } else {
                db::error(e, format!("job {name}: joining the job"))
            }
        };
        let tx = client.transaction().await.map_err(err)?;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = {}",
            JOIN_LOCK_WAIT.as_millis()
        ))
        .await
        .map_err(err)?;
        // Runs that died or hung: close their history rows (their ranges are free to take).
        // First, before the job's row is locked: a finishing run updates its run row, then the
        // job's row, and the two must not wait on each other in a cycle.
        tx.execute(
            &format!(
                "UPDATE {s}.runs r SET outcome = 'abandoned', ended_at = coalesce(r.heartbeat_at, now()),
                        last_error = 'the runner stopped without finishing (killed, crashed or lost its connection)',
                        {counts}
                  WHERE r.job = $1 AND r.outcome IS NULL AND NOT {alive}",
                s = self.q,
                counts = self.run_counts_sql("r.id"),
                alive = Self::run_alive_sql("r")
            ),
            &[&name],
        )
        .await
        .map_err(err)?;
        // A job and its revert never run at once: both lock the job's row first.
        if let Some(forward) = &job.reverts {
            self.may_revert(&tx, forward).await?;
        }
        tx.execute(
            &format!(
                "INSERT INTO {s}.checkpoints (job, fingerprint, table_name, key_columns)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (job) DO NOTHING",
                s = self.q
            ),
            &[&name, &job.fingerprint, &job.table.to_string(), &job.key],
        )
        .await
        .map_err(err)?;
        tx.execute(
            &format!(
                "SELECT 1 FROM {s}.checkpoints WHERE job = $1 FOR UPDATE",
                s = self.q
            ),
            &[&name],
        )
        .await
        .map_err(err)?;
        let row = tx
            .query_one(&format!("{} WHERE c.job = $1", self.select_sql()), &[&name])
            .await
            .map_err(err)?;
        let mut checkpoint = Self::from_row(&row);
        self.detail(&tx, &mut checkpoint).await?;
        if job.reverts.is_none() {
            let revert = revert_name(name);
            if let Some(r) = tx
                .query_opt(
                    &format!(
                        "SELECT state FROM {s}.checkpoints WHERE job = $1",
                        s = self.q
                    ),
                    &[&revert],
                )
                .await
                .map_err(err)?
            {
                let state: String = r.get(0);
                return Err(Error::NotSatisfied(format!(
                    "a revert of job {name} is unfinished (job {revert}, state {state}); finish it with `backfill revert {name}` before running the job again"
                )));
            }
        }
        let live: Vec<&Owner> = checkpoint.runners.iter().filter(|o| o.alive).collect();
        if checkpoint.fingerprint != job.fingerprint {
            if let Some(other) = live.first() {
                return Err(Error::NotSatisfied(format!(
                    "job {name} is running on host {} (pid {}, run {}) with another definition (fingerprint {} there, {} in {}); runs of one job must share its definition — wait for it, or stop it there (Ctrl-C / kill -TERM {}) before changing the job",
                    other.host, other.pid, other.run_id, checkpoint.fingerprint, job.fingerprint,
                    job.path.display(), other.pid
                )));
            }
            let made_progress = checkpoint.rows_done > 0 || checkpoint.bound_taken;
            if made_progress && !allow_changed_definition {
                // A pass that ended incomplete has processed every key: the new statement would
                // only drive sweeps — the usual change then is adding the guard they need.
                let how = if checkpoint.state == "incomplete" {
                    format!(
                        "Every key was processed under the old definition; what is left is a sweep, which applies the new statement to every key again and runs only if applying it twice changes nothing (a guard, e.g. `AND new_col IS NULL`). If you added or fixed the guard and changed nothing else, run `backfill run {name} --allow-changed-definition`; if you changed what it writes, `backfill reset {name} --yes` starts over"
                    )
                } else {
                    format!(
                        "If the change is safe to apply to the remaining keys only — adding a guard such as `AND new_col IS NULL` is — run `backfill run {name} --allow-changed-definition`; to start over, `backfill reset {name} --yes`"
                    )
                };
                return Err(Error::Usage(format!(
                    "job {name}: the definition in {} changed since progress was saved (fingerprint {} now, {} in the checkpoint; {} rows done); resuming would mix two definitions. {how}",
                    job.path.display(),
                    job.fingerprint,
                    checkpoint.fingerprint,
                    checkpoint.rows_done,
                )));
            }
        }
        if checkpoint.state == "done" {
            tx.commit().await.map_err(err)?;
            return Ok(Claim::AlreadyDone(checkpoint));
        }
        let run_id: i64 = tx
            .query_one(
                &format!(
                    "INSERT INTO {s}.runs (job, host, pid, engine_version, workers, start_rows, start_chunks,
                                           backend_pid, backend_start, heartbeat_at)
                     SELECT $1, $2, $3, $4, $5,
                            coalesce((SELECT sum(rows_done) FROM {s}.ranges WHERE job = $1), 0),
                            coalesce((SELECT sum(chunks_done) FROM {s}.ranges WHERE job = $1), 0),
                            pg_backend_pid(),
                            (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()), now()
                     RETURNING id",
                    s = self.q
                ),
                &[&name, &runner.host, &runner.pid, &env!("CARGO_PKG_VERSION"), &(workers as i32)],
            )
            .await
            .map_err(err)?
            .get(0);
        tx.execute(
            &format!(
                "UPDATE {s}.checkpoints SET state = 'running', fingerprint = $2, last_error = NULL,
                        started_at = coalesce(started_at, now()), updated_at = now(),
                        has_verify = $3, finish_steps = $4, phase = 'running',
                        -- a new run after an incomplete one may sweep again (the writers were fixed)
                        sweeps = CASE WHEN state = 'incomplete' AND NOT {live} THEN 0 ELSE sweeps END
                  WHERE job = $1",
                s = self.q,
                live = if live.is_empty() { "false" } else { "true" }
            ),
            &[
                &name,
                &job.fingerprint,
                &job.verify.is_some(),
                &(job.finish_sql.len() as i32),
            ],
        )
        .await
        .map_err(err)?;
        if live.is_empty() {
            // A cancel was for the runs it stopped; this run starts fresh.
            tx.execute(
                &format!(
                    "UPDATE {s}.controls SET cancel = false WHERE job = $1",
                    s = self.q
                ),
                &[&name],
            )
            .await
            .map_err(err)?;
        }
        tx.commit().await.map_err(err)?;
        Ok(Claim::Owned { run_id, checkpoint })
    }

    /// Renews the run's lease. Returns false when the run was declared gone meanwhile.
    pub async fn heartbeat(&self, client: &impl GenericClient, run_id: i64) -> Result<bool> {
        let n = client
            .execute(
                &format!(
                    "UPDATE {s}.runs SET heartbeat_at = now() WHERE id = $1 AND outcome IS NULL",
                    s = self.q
                ),
                &[&run_id],
            )
            .await
            .map_err(|e| db::error(e, format!("run {run_id}: renewing the lease")))?;
        Ok(n == 1)
    }

    /// The job's key range as fixed by the first run: (taken, upper bound, row estimate), with
    /// the checkpoint row locked until the caller's transaction ends.
    pub async fn lock_bound(
        &self,
        tx: &impl GenericClient,
        job: &str,
    ) -> Result<(bool, Option<KeyValue>, Option<i64>)> {
        let row = tx
            .query_one(
                &format!(
                    "SELECT bound_taken, upper_bound, total_estimate FROM {s}.checkpoints WHERE job = $1 FOR UPDATE",
                    s = self.q
                ),
                &[&job],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: reading the key range")))?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }

    /// Records the key range the job covers: keys up to `upper` (None: the table was empty), as
    /// its first range.
    pub async fn set_bound(
        &self,
        tx: &impl GenericClient,
        job: &str,
        upper: Option<&KeyValue>,
        total_estimate: Option<i64>,
        total_exact: bool,
    ) -> Result<()> {
        let err = |e| db::error(e, format!("job {job}: saving the key range"));
        tx.execute(
            &format!(
                "UPDATE {s}.checkpoints SET upper_bound = $2, total_estimate = $3, total_exact = $4,
                        bound_taken = true, updated_at = now()
                  WHERE job = $1",
                s = self.q
            ),
            &[&job, &upper, &total_estimate, &total_exact],
        )
        .await
        .map_err(err)?;
        if let Some(upper) = upper {
            tx.execute(
                &format!(
                    "INSERT INTO {s}.ranges (job, id, upper_bound, estimate) VALUES ($1, 0, $2, $3)",
                    s = self.q
                ),
                &[&job, upper, &total_estimate],
            )
            .await
            .map_err(err)?;
        }
        Ok(())
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
        state: &str,
        error: Option<&str>,
        verify_remaining: Option<i64>,
    ) -> Result<()> {
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
                     UPDATE {s}.checkpoints c SET state = $3, last_error = $4, updated_at = now(),
                            phase = CASE WHEN $3 = 'done' AND $5::bigint = 0 THEN 'done and verified' ELSE $3 END,
                            finished_at = CASE WHEN $3 IN ('done', 'incomplete') THEN now() ELSE finished_at END,
                            verify_remaining = CASE WHEN $3 IN ('done', 'incomplete') THEN $5 ELSE verify_remaining END,
                            verified_at = CASE WHEN $5::bigint IS NOT NULL THEN now() ELSE verified_at END,
                            total_estimate = CASE WHEN $3 IN ('done', 'incomplete')
                                THEN (SELECT coalesce(sum(rows_done), 0) FROM {s}.ranges WHERE job = $1)
                                ELSE total_estimate END,
                            total_exact = total_exact OR $3 IN ('done', 'incomplete')
                      WHERE c.job = $1 AND EXISTS (SELECT 1 FROM run)
                        AND (c.state <> 'done' OR $3 = 'done')
                        -- another run's sweep still being walked: that run records the outcome
                        AND ($3 NOT IN ('done', 'incomplete')
                             OR NOT EXISTS (SELECT 1 FROM {s}.ranges g WHERE g.job = $1 AND NOT g.done))
                        AND ($3 IN ('done', 'incomplete')
                             OR NOT EXISTS (SELECT 1 FROM {s}.runs r WHERE r.job = $1 AND r.id <> $2 AND {alive}))",
                    s = self.q,
                    alive = Self::run_alive_sql("r"),
                    counts = self.run_counts_sql("$2")
                ),
                &[&job, &run_id, &state, &error, &verify_remaining],
            )
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Records a gate-time verify result.
    pub async fn record_verify(
        &self,
        client: &impl GenericClient,
        job: &str,
        remaining: i64,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {s}.checkpoints SET verify_remaining = $2, verified_at = now() WHERE job = $1",
                    s = self.q
                ),
                &[&job, &remaining],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: recording the verify result")))?;
        Ok(())
    }

    /// Forgets a job's progress and ranges (its history rows stay). Refuses while a run is alive.
    pub async fn reset(
        &self,
        client: &mut tokio_postgres::Client,
        job: &str,
    ) -> Result<Option<Checkpoint>> {
        let err = |e| db::error(e, format!("job {job}: resetting"));
        let tx = client.transaction().await.map_err(err)?;
        // Waits for a migration that passed the SQL gate to end (it holds this lock shared).
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&self.job_lock_key(job)],
        )
        .await
        .map_err(err)?;
        let row = tx
            .query_opt(
                &format!("{} WHERE c.job = $1 FOR UPDATE OF c", self.select_sql()),
                &[&job],
            )
            .await
            .map_err(err)?;
        let Some(row) = row else { return Ok(None) };
        let mut checkpoint = Self::from_row(&row);
        self.detail(&tx, &mut checkpoint).await?;
        if let Some(owner) = checkpoint.runners.iter().find(|o| o.alive) {
            return Err(Error::NotSatisfied(format!(
                "job {job} is running on host {} (pid {}); stop it before resetting",
                owner.host, owner.pid
            )));
        }
        tx.execute(
            &format!("DELETE FROM {s}.checkpoints WHERE job = $1", s = self.q),
            &[&job],
        )
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(Some(checkpoint))
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
    /// done, incomplete, stopped, failed, abandoned — or null while running.
    pub outcome: Option<String>,
    pub last_error: Option<String>,
}

impl Store {
    /// The runs of a job, oldest first.
    pub async fn history(&self, client: &impl GenericClient, job: &str) -> Result<Vec<RunRecord>> {
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
            .map_err(|e| db::error(e, format!("job {job}: reading its run history")))?;
        Ok(rows
            .iter()
            .map(|r| RunRecord {
                id: r.get(0),
                host: r.get(1),
                pid: r.get(2),
                engine_version: r.get(3),
                started_at: r.get(4),
                ended_at: r.get(5),
                rows_done: r.get(6),
                chunks_done: r.get(7),
                outcome: r.get(8),
                last_error: r.get(9),
            })
            .collect())
    }
}

pub fn lost(job: &str) -> Error {
    Error::Runtime(format!(
        "job {job}: this run lost ownership of the job (its lease expired or another runner took over); no chunk was committed twice; check `backfill status {job}` before running again"
    ))
}
