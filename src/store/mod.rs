//! The engine's own tables (in `--schema`, default `backfill`): one checkpoint row per job, one
//! history row per run, and the ownership lease that keeps two runners off the same job.
//!
//! Ownership: a run owns a job while its checkpoint row names the run, the owner's *lease session*
//! (a dedicated connection held for the whole run) is still in `pg_stat_activity`, and its heartbeat
//! is fresher than the lease timeout. A killed runner's session disappears at once, so the next run
//! takes over immediately; a hung runner whose session stays open loses the job after the timeout.
//! Every chunk's checkpoint advance is guarded by the run id and the previous cursor, so even a
//! runner that lost its lease cannot commit a chunk twice.

mod control;
mod failures;
mod lease;
mod schema;

pub use control::{ControlChange, Controls};
pub use failures::{FailedKey, Poison};
pub use lease::LeaseState;
pub use schema::{grants, installed_version, migrate, LATEST as SCHEMA_VERSION};

use crate::db;
use crate::error::{Error, Result};
use crate::job::{quote_ident, JobSpec};
use crate::keyset::{show_key, KeyValue};
use std::time::Duration;
use tokio_postgres::GenericClient;

/// A hung runner (session open, no heartbeat) loses its job after this long.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a claim waits for the checkpoint row lock (held briefly by a chunk in flight).
const CLAIM_LOCK_WAIT: Duration = Duration::from_secs(10);
/// How long a claim keeps looking before it believes another runner is really alive.
const TAKEOVER_GRACE: Duration = Duration::from_secs(2);
/// How often a running job proves it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// A job's persisted progress, as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Checkpoint {
    pub job: String,
    /// new, running, stopped, failed, done, incomplete — or `interrupted` when the row says
    /// running but its owner is gone (a crash or kill).
    pub state: String,
    pub fingerprint: String,
    pub table: String,
    pub key_columns: Vec<String>,
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
    pub owner: Option<Owner>,
    /// Rows per second of the current (or last) run, from its history row.
    pub rate_rows_per_second: Option<f64>,
    /// Keys recorded as failing and not yet resolved (`backfill failures`).
    pub failed_keys: i64,
    /// Keys per chunk of the last committed chunk.
    pub chunk_rows_now: Option<i32>,
    /// Why the running job is held right now, with the value seen and the threshold.
    pub hold_reason: Option<String>,
    pub held_since: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Owner {
    pub run_id: i64,
    pub host: String,
    pub pid: i32,
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

/// What claiming a job gave us.
pub enum Claim {
    /// We own the job as run `run_id`; the checkpoint as it was when we took it.
    Owned { run_id: i64, checkpoint: Checkpoint },
    /// The job is already done; nothing to run.
    AlreadyDone(Checkpoint),
}

/// One chunk's move of the cursor: from `previous` (None: the start) to `last`.
pub struct Advance<'a> {
    pub previous: Option<&'a KeyValue>,
    pub last: &'a KeyValue,
    pub keys: i64,
    pub affected: i64,
    /// The chunk size in force (for `status`).
    pub chunk_rows: i32,
}

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

    /// The liveness test of a checkpoint row's owner, as a SQL expression.
    fn owner_alive_sql(&self) -> String {
        format!(
            "(c.owner_run IS NOT NULL
              AND c.heartbeat_at > now() - make_interval(secs => {lease})
              AND EXISTS (SELECT 1 FROM pg_stat_activity a
                           WHERE a.pid = c.owner_backend_pid
                             AND (a.backend_start IS NULL OR a.backend_start = c.owner_backend_start)))",
            lease = LEASE_TIMEOUT.as_secs()
        )
    }

    fn select_sql(&self) -> String {
        format!(
            "SELECT c.job, c.state, c.fingerprint, c.table_name, c.key_columns, c.cursor, c.upper_bound,
                    c.bound_taken, c.rows_done, c.rows_affected, c.chunks_done, c.total_estimate,
                    c.verify_remaining, {verified}, {created}, {started}, {updated}, {finished},
                    c.last_error, c.owner_run, c.owner_host, c.owner_pid, {heartbeat}, {alive},
                    (SELECT (c.rows_done - r.start_rows)::float8
                            / NULLIF(extract(epoch FROM (coalesce(r.ended_at, c.updated_at) - r.started_at)), 0)::float8
                       FROM {s}.runs r WHERE r.job = c.job ORDER BY r.id DESC LIMIT 1),
                    (SELECT count(*) FROM {s}.failures f WHERE f.job = c.job AND f.resolved_at IS NULL),
                    c.total_exact, c.chunk_rows_now, c.hold_reason, {held_since}
               FROM {s}.checkpoints c",
            verified = ts("c.verified_at"),
            created = ts("c.created_at"),
            started = ts("c.started_at"),
            updated = ts("c.updated_at"),
            finished = ts("c.finished_at"),
            heartbeat = ts("c.heartbeat_at"),
            held_since = ts("c.held_since"),
            alive = self.owner_alive_sql(),
            s = self.q,
        )
    }

    fn from_row(r: &tokio_postgres::Row) -> Checkpoint {
        let owner_run: Option<i64> = r.get(19);
        let alive: bool = r.get(23);
        let mut state: String = r.get(1);
        if state == "running" && !alive {
            state = "interrupted".into();
        }
        Checkpoint {
            job: r.get(0),
            state,
            fingerprint: r.get(2),
            table: r.get(3),
            key_columns: r.get(4),
            cursor: r.get(5),
            upper_bound: r.get(6),
            bound_taken: r.get(7),
            rows_done: r.get(8),
            rows_affected: r.get(9),
            chunks_done: r.get(10),
            total_estimate: r.get(11),
            verify_remaining: r.get(12),
            verified_at: r.get(13),
            created_at: r.get(14),
            started_at: r.get(15),
            updated_at: r.get(16),
            finished_at: r.get(17),
            last_error: r.get(18),
            owner: owner_run.map(|run_id| Owner {
                run_id,
                host: r.get::<_, Option<String>>(20).unwrap_or_default(),
                pid: r.get::<_, Option<i32>>(21).unwrap_or_default(),
                alive,
                heartbeat_at: r.get(22),
            }),
            rate_rows_per_second: r.get(24),
            failed_keys: r.get(25),
            total_exact: r.get(26),
            chunk_rows_now: r.get(27),
            hold_reason: if alive { r.get(28) } else { None },
            held_since: if alive { r.get(29) } else { None },
        }
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
        Ok(row.as_ref().map(Self::from_row))
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
        Ok(rows.iter().map(Self::from_row).collect())
    }

    /// Takes ownership of a job for this run, on the lease session `client`. Refuses when another
    /// live runner owns it, or when the definition changed after progress was made.
    pub async fn claim(
        &self,
        client: &mut tokio_postgres::Client,
        job: &JobSpec,
        runner: &Runner,
        allow_changed_definition: bool,
    ) -> Result<Claim> {
        let name = job.name.as_str();
        let err = |e: tokio_postgres::Error| {
            if db::sqlstate(&e) == Some("55P03") {
                Error::Runtime(format!(
                    "job {name}: its checkpoint row stayed locked for {}s (a previous runner's transaction still ending, or a session holding it); try again shortly, or look for the blocking session in pg_stat_activity",
                    CLAIM_LOCK_WAIT.as_secs()
                ))
            } else {
                db::error(e, format!("job {name}: claiming the job"))
            }
        };
        let waited = std::time::Instant::now();
        loop {
            let tx = client.transaction().await.map_err(err)?;
            tx.batch_execute(&format!(
                "SET LOCAL lock_timeout = {}",
                CLAIM_LOCK_WAIT.as_millis()
            ))
            .await
            .map_err(err)?;
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
            let row = tx
                .query_one(
                    &format!("{} WHERE c.job = $1 FOR UPDATE OF c", self.select_sql()),
                    &[&name],
                )
                .await
                .map_err(err)?;
            let checkpoint = Self::from_row(&row);
            if let Some(owner) = checkpoint.owner.as_ref().filter(|o| o.alive) {
                // A runner killed a moment ago may still show in pg_stat_activity for a few
                // milliseconds while its session exits: look again briefly before refusing.
                if waited.elapsed() < TAKEOVER_GRACE {
                    tx.rollback().await.map_err(err)?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                return Err(Error::NotSatisfied(format!(
                "job {name} is already running on host {} (pid {}, run {}, last heartbeat {}); only one runner may process a job at a time — wait for it, or stop it there (Ctrl-C / kill -TERM {})",
                owner.host,
                owner.pid,
                owner.run_id,
                owner.heartbeat_at.as_deref().unwrap_or("?"),
                owner.pid
            )));
            }
            let made_progress = checkpoint.rows_done > 0 || checkpoint.bound_taken;
            if checkpoint.fingerprint != job.fingerprint
                && made_progress
                && !allow_changed_definition
            {
                return Err(Error::Usage(format!(
                "job {name}: the definition in {} changed since progress was saved (fingerprint {} now, {} in the checkpoint; {} rows done, cursor {}); resuming would mix two definitions. If the change is safe to apply to the remaining keys only, run again with --allow-changed-definition; to start over, `backfill reset {name} --yes`",
                job.path.display(),
                job.fingerprint,
                checkpoint.fingerprint,
                checkpoint.rows_done,
                checkpoint.cursor.as_deref().map(show_key).unwrap_or_else(|| "none".into())
            )));
            }
            if checkpoint.state == "done" {
                tx.commit().await.map_err(err)?;
                return Ok(Claim::AlreadyDone(checkpoint));
            }
            if let Some(old) = &checkpoint.owner {
                // The previous runner died or hung: close its history row.
                tx.execute(
                &format!(
                    "UPDATE {s}.runs SET outcome = 'abandoned', ended_at = coalesce(
                         (SELECT heartbeat_at FROM {s}.checkpoints WHERE job = $2), now()),
                         last_error = 'the runner stopped without finishing (killed, crashed or lost its connection)'
                      WHERE id = $1 AND outcome IS NULL",
                    s = self.q
                ),
                &[&old.run_id, &name],
            )
            .await
            .map_err(err)?;
            }
            let run_id: i64 = tx
            .query_one(
                &format!(
                    "INSERT INTO {s}.runs (job, host, pid, engine_version, start_rows, start_chunks, start_cursor)
                     SELECT $1, $2, $3, $4, rows_done, chunks_done, cursor FROM {s}.checkpoints WHERE job = $1
                     RETURNING id",
                    s = self.q
                ),
                &[&name, &runner.host, &runner.pid, &env!("CARGO_PKG_VERSION")],
            )
            .await
            .map_err(err)?
            .get(0);
            tx.execute(
            &format!(
                "UPDATE {s}.checkpoints SET
                     state = 'running', fingerprint = $3, last_error = NULL,
                     started_at = coalesce(started_at, now()), updated_at = now(),
                     owner_run = $2, owner_host = $4, owner_pid = $5,
                     owner_backend_pid = pg_backend_pid(),
                     owner_backend_start = (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()),
                     heartbeat_at = now(), hold_reason = NULL, held_since = NULL
                  WHERE job = $1",
                s = self.q
            ),
            &[&name, &run_id, &job.fingerprint, &runner.host, &runner.pid],
        )
        .await
        .map_err(err)?;
            // A cancel was for the run it stopped; this run starts fresh.
            tx.execute(
                &format!(
                    "UPDATE {s}.controls SET cancel = false WHERE job = $1",
                    s = self.q
                ),
                &[&name],
            )
            .await
            .map_err(err)?;
            tx.commit().await.map_err(err)?;
            return Ok(Claim::Owned { run_id, checkpoint });
        }
    }

    /// Renews the lease. Returns false when this run no longer owns the job.
    pub async fn heartbeat(
        &self,
        client: &impl GenericClient,
        job: &str,
        run_id: i64,
    ) -> Result<bool> {
        let n = client
            .execute(
                &format!(
                    "UPDATE {s}.checkpoints SET heartbeat_at = now() WHERE job = $1 AND owner_run = $2",
                    s = self.q
                ),
                &[&job, &run_id],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: renewing the lease")))?;
        Ok(n == 1)
    }

    /// Records the key range the run will cover: keys up to `upper` (None: the table was empty).
    pub async fn set_bound(
        &self,
        client: &impl GenericClient,
        job: &str,
        run_id: i64,
        upper: Option<&KeyValue>,
        total_estimate: Option<i64>,
        total_exact: bool,
    ) -> Result<()> {
        let n = client
            .execute(
                &format!(
                    "UPDATE {s}.checkpoints SET upper_bound = $3, total_estimate = $4, total_exact = $5,
                            bound_taken = true, updated_at = now()
                      WHERE job = $1 AND owner_run = $2",
                    s = self.q
                ),
                &[&job, &run_id, &upper, &total_estimate, &total_exact],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: saving the key range")))?;
        if n != 1 {
            return Err(lost(job));
        }
        Ok(())
    }

    /// Advances the cursor past a chunk, inside the chunk's own transaction. Returns the number of
    /// rows updated: 1, or 0 when this run lost the job or another runner moved the cursor — the
    /// caller must then roll back.
    pub async fn advance(
        &self,
        tx: &impl GenericClient,
        job: &str,
        run_id: i64,
        step: Advance<'_>,
    ) -> Result<u64, tokio_postgres::Error> {
        tx.execute(
            &format!(
                "UPDATE {s}.checkpoints SET cursor = $4, rows_done = rows_done + $5,
                        rows_affected = rows_affected + $6, chunks_done = chunks_done + 1, updated_at = now(),
                        chunk_rows_now = $7
                  WHERE job = $1 AND owner_run = $2 AND cursor IS NOT DISTINCT FROM $3",
                s = self.q
            ),
            &[&job, &run_id, &step.previous, step.last, &step.keys, &step.affected, &step.chunk_rows],
        )
        .await
    }

    /// The cursor as committed, and whether `run_id` still owns the job.
    pub async fn committed_cursor(
        &self,
        client: &impl GenericClient,
        job: &str,
        run_id: i64,
    ) -> Result<(Option<KeyValue>, bool), tokio_postgres::Error> {
        let row = client
            .query_one(
                &format!("SELECT cursor, owner_run IS NOT DISTINCT FROM $2 FROM {s}.checkpoints WHERE job = $1", s = self.q),
                &[&job, &run_id],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Ends a run: sets the job's state, releases ownership, closes the history row.
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
        client
            .execute(
                &format!(
                    "WITH c AS (
                        UPDATE {s}.checkpoints SET state = $3, last_error = $4, updated_at = now(),
                               finished_at = CASE WHEN $3 IN ('done', 'incomplete') THEN now() ELSE finished_at END,
                               verify_remaining = CASE WHEN $3 IN ('done', 'incomplete') THEN $5 ELSE verify_remaining END,
                               verified_at = CASE WHEN $5::bigint IS NOT NULL THEN now() ELSE verified_at END,
                               total_estimate = CASE WHEN $3 IN ('done', 'incomplete') THEN rows_done ELSE total_estimate END,
                               total_exact = total_exact OR $3 IN ('done', 'incomplete'),
                               hold_reason = NULL, held_since = NULL,
                               owner_run = NULL, owner_host = NULL, owner_pid = NULL,
                               owner_backend_pid = NULL, owner_backend_start = NULL, heartbeat_at = NULL
                         WHERE job = $1 AND owner_run = $2
                         RETURNING rows_done, chunks_done, cursor)
                     UPDATE {s}.runs r SET ended_at = now(), outcome = $3, last_error = $4,
                            rows_done = c.rows_done - r.start_rows, chunks_done = c.chunks_done - r.start_chunks,
                            end_cursor = c.cursor
                       FROM c WHERE r.id = $2",
                    s = self.q
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

    /// Forgets a job's progress (its history rows stay). Refuses while a runner owns it.
    pub async fn reset(
        &self,
        client: &mut tokio_postgres::Client,
        job: &str,
    ) -> Result<Option<Checkpoint>> {
        let err = |e| db::error(e, format!("job {job}: resetting"));
        let tx = client.transaction().await.map_err(err)?;
        let row = tx
            .query_opt(
                &format!("{} WHERE c.job = $1 FOR UPDATE OF c", self.select_sql()),
                &[&job],
            )
            .await
            .map_err(err)?;
        let Some(row) = row else { return Ok(None) };
        let checkpoint = Self::from_row(&row);
        if let Some(owner) = checkpoint.owner.as_ref().filter(|o| o.alive) {
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
