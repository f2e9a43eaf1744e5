//! Joining a job as a run: closing the history rows of runs that died, refusing while a revert
//! is unfinished or live runs use another definition, and recording the new run, all under the
//! job's checkpoint row lock. Does not touch key ranges (see `ranges.rs`).

use super::{revert_name, Checkpoint, Owner, Store};
use crate::db;
use crate::db::{Limit, Timeouts};
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::state::{made_progress, next_run_sweeps, JobState, Phase, RunOutcome};
use std::time::Duration;
use tokio_postgres::GenericClient;

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

impl Store {
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
        let err = |e| join_error(name, e);
        let tx = client.transaction().await.map_err(err)?;
        let wait = Timeouts {
            lock: Some(Limit::Within(JOIN_LOCK_WAIT)),
            ..Timeouts::default()
        };
        tx.batch_execute(&wait.set_local()).await.map_err(err)?;
        // First, before the job's row is locked: a finishing run updates its run row, then the
        // job's row, and the two must not wait on each other in a cycle.
        self.close_abandoned(&tx, name).await.map_err(err)?;
        // A job and its revert never run at once: both lock the job's row first.
        if let Some(forward) = &job.reverts {
            self.may_revert(&tx, forward).await?;
        }
        let checkpoint = self.lock_for_join(&tx, job).await?;
        if job.reverts.is_none() {
            self.refuse_unfinished_revert(&tx, name).await?;
        }
        let live: Vec<&Owner> = checkpoint.runners.iter().filter(|o| o.alive).collect();
        refuse_changed_definition(job, &checkpoint, &live, allow_changed_definition)?;
        if checkpoint.state.recorded().is_finished() {
            tx.commit().await.map_err(err)?;
            return Ok(Claim::AlreadyDone(checkpoint));
        }
        let alone = live.is_empty();
        // A new run after an incomplete pass may sweep again (the writers were fixed): unless
        // another run is still at it, the sweep count starts afresh.
        let sweeps_afresh = alone
            && next_run_sweeps(
                checkpoint.state.recorded(),
                checkpoint.ranges.iter().all(|r| r.done),
            );
        let run_id = self
            .record_run(&tx, job, runner, workers, alone, sweeps_afresh)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(Claim::Owned { run_id, checkpoint })
    }

    /// Runs that died or hung: closes their history rows (their ranges are free to take).
    async fn close_abandoned(
        &self,
        tx: &impl GenericClient,
        job: &str,
    ) -> Result<u64, tokio_postgres::Error> {
        tx.execute(
            &format!(
                "UPDATE {s}.runs r SET outcome = $2, ended_at = coalesce(r.heartbeat_at, now()),
                        last_error = 'the runner stopped without finishing (killed, crashed or lost its connection)',
                        {counts}
                  WHERE r.job = $1 AND r.outcome IS NULL AND NOT {alive}",
                s = self.q,
                counts = self.run_counts_sql("r.id"),
                alive = Self::run_alive_sql("r")
            ),
            &[&job, &RunOutcome::Abandoned.as_sql()],
        )
        .await
    }

    /// Makes the job's checkpoint row if it has none, locks it until the transaction ends, and
    /// reads it.
    async fn lock_for_join(&self, tx: &impl GenericClient, job: &JobSpec) -> Result<Checkpoint> {
        let name = job.name.as_str();
        let err = |e| join_error(name, e);
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
        self.lock_checkpoint(tx, name).await.map_err(err)?;
        let row = tx
            .query_one(&format!("{} WHERE c.job = $1", self.select_sql()), &[&name])
            .await
            .map_err(err)?;
        let mut checkpoint = Self::from_row(&row)?;
        self.detail(tx, &mut checkpoint).await?;
        Ok(checkpoint)
    }

    /// Refuses to run a job while a revert of it is unfinished.
    async fn refuse_unfinished_revert(&self, tx: &impl GenericClient, name: &str) -> Result<()> {
        let revert = revert_name(name);
        let row = tx
            .query_opt(
                &format!(
                    "SELECT state FROM {s}.checkpoints WHERE job = $1",
                    s = self.q
                ),
                &[&revert],
            )
            .await
            .map_err(|e| join_error(name, e))?;
        let Some(row) = row else { return Ok(()) };
        let state: JobState = row
            .try_get(0)
            .map_err(|e| db::error(e, format!("job {revert}: reading its state")))?;
        Err(Error::NotSatisfied(format!(
            "a revert of job {name} is unfinished (job {revert}, state {state}); finish it with `backfill revert {name}` before running the job again"
        )))
    }

    /// Records the new run and the job as running under it; returns the run's id. `alone`: no
    /// other run is alive on the job; `sweeps_afresh`: its sweep count starts again at 0.
    async fn record_run(
        &self,
        tx: &impl GenericClient,
        job: &JobSpec,
        runner: &Runner,
        workers: u32,
        alone: bool,
        sweeps_afresh: bool,
    ) -> Result<i64, tokio_postgres::Error> {
        let name = job.name.as_str();
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
            .await?
            .get(0);
        tx.execute(
            &format!(
                "UPDATE {s}.checkpoints SET state = $5, fingerprint = $2, last_error = NULL,
                        started_at = coalesce(started_at, now()), updated_at = now(),
                        has_verify = $3, finish_steps = $4, phase = $6,
                        sweeps = CASE WHEN $7 THEN 0 ELSE sweeps END
                  WHERE job = $1",
                s = self.q,
            ),
            &[
                &name,
                &job.fingerprint,
                &job.verify.is_some(),
                &(job.finish_sql.len() as i32),
                &JobState::Running.as_sql(),
                &Phase::Running.as_sql(),
                &sweeps_afresh,
            ],
        )
        .await?;
        if alone {
            // A cancel was for the runs it stopped; this run starts fresh.
            tx.execute(
                &format!(
                    "UPDATE {s}.controls SET cancel = false WHERE job = $1",
                    s = self.q
                ),
                &[&name],
            )
            .await?;
        }
        Ok(run_id)
    }
}

/// A joining run's database error; the checkpoint row staying locked past [`JOIN_LOCK_WAIT`]
/// says what to look for.
fn join_error(name: &str, e: tokio_postgres::Error) -> Error {
    if db::sqlstate(&e) == Some("55P03") {
        Error::Runtime(format!(
            "job {name}: its checkpoint row stayed locked for {}s (another runner's transaction still ending, or a session holding it); try again shortly, or look for the blocking session in pg_stat_activity",
            JOIN_LOCK_WAIT.as_secs()
        ))
    } else {
        db::error(e, format!("job {name}: joining the job"))
    }
}

/// Refuses to join with a definition other than the one live runs use, or (unless allowed) one
/// that changed after progress was saved.
fn refuse_changed_definition(
    job: &JobSpec,
    checkpoint: &Checkpoint,
    live: &[&Owner],
    allow_changed_definition: bool,
) -> Result<()> {
    let name = job.name.as_str();
    if checkpoint.fingerprint == job.fingerprint {
        return Ok(());
    }
    if let Some(other) = live.first() {
        return Err(Error::NotSatisfied(format!(
            "job {name} is running on host {} (pid {}, run {}) with another definition (fingerprint {} there, {} in {}); runs of one job must share its definition — wait for it, or stop it there (Ctrl-C / kill -TERM {}) before changing the job",
            other.host, other.pid, other.run_id, checkpoint.fingerprint, job.fingerprint,
            job.path.display(), other.pid
        )));
    }
    if !made_progress(checkpoint.rows_done, checkpoint.bound_taken) || allow_changed_definition {
        return Ok(());
    }
    // A pass that ended incomplete has processed every key: the new statement would only drive
    // sweeps — the usual change then is adding the guard they need.
    let sweeps_next = next_run_sweeps(
        checkpoint.state.recorded(),
        checkpoint.ranges.iter().all(|r| r.done),
    );
    let how = if sweeps_next {
        format!(
            "Every key was processed under the old definition; what is left is a sweep, which applies the new statement to every key again and runs only if applying it twice changes nothing (a guard, e.g. `AND new_col IS NULL`). If you added or fixed the guard and changed nothing else, run `backfill run {name} --allow-changed-definition`; if you changed what it writes, `backfill reset {name} --yes` starts over"
        )
    } else {
        format!(
            "If the change is safe to apply to the remaining keys only — adding a guard such as `AND new_col IS NULL` is — run `backfill run {name} --allow-changed-definition`; to start over, `backfill reset {name} --yes`"
        )
    };
    Err(Error::Usage(format!(
        "job {name}: the definition in {} changed since progress was saved (fingerprint {} now, {} in the checkpoint; {} rows done); resuming would mix two definitions. {how}",
        job.path.display(),
        job.fingerprint,
        checkpoint.fingerprint,
        checkpoint.rows_done,
    )))
}
