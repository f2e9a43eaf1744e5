//! A job's phase as `status` shows it (waiting for expand, running, verifying, sweeping,
//! finishing, done and verified, reverted…); the sweep passes that chase rows written behind the
//! cursor — each one more key range over every key present when it starts, walked by the same
//! workers, chunks and checkpoints as the main pass; and what keeps a job, its revert and a
//! contract migration past the SQL gate apart (the job's row lock and its advisory lock).

use super::Store;
use crate::db;
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::keyset::KeyValue;
use crate::state::{made_progress, revert_refusal, JobState, Phase, RevertRefusal};
use tokio_postgres::GenericClient;

/// The revert job of `job` is checkpointed under this name (the store refuses to run a job while
/// its revert is unfinished, so the name is the store's to give).
pub fn revert_name(job: &str) -> String {
    format!("{job}:revert")
}

/// What asking for a sweep gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Sweep {
    /// A sweep pass is there to work on (this run started it, or another did since).
    Ready { pass: i32 },
    /// The job's sweeps are used up.
    Exhausted { passes: i32 },
    /// Another run recorded the job as done meanwhile (its verify returned 0).
    Done,
}

impl Store {
    /// Sets the phase shown by `status`.
    pub async fn set_phase(
        &self,
        client: &impl GenericClient,
        job: &str,
        phase: Phase,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {s}.checkpoints SET phase = $2, updated_at = now() WHERE job = $1",
                    s = self.q
                ),
                &[&job, &phase.as_sql()],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: recording its phase ({phase})")))?;
        Ok(())
    }

    /// The sweep passes started so far.
    pub async fn sweeps(&self, client: &impl GenericClient, job: &str) -> Result<i32> {
        let row = client
            .query_one(
                &format!(
                    "SELECT sweeps FROM {s}.checkpoints WHERE job = $1",
                    s = self.q
                ),
                &[&job],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: reading its sweeps")))?;
        Ok(row.get(0))
    }

    /// Starts sweep pass `seen + 1` over every key up to `upper` — unless another run already
    /// started one since this run counted `seen` passes (then that one is joined), or the job's
    /// `max_sweeps` are used up.
    pub async fn start_sweep(
        &self,
        client: &mut tokio_postgres::Client,
        job: &JobSpec,
        seen: i32,
        last_key_sql: &str,
    ) -> Result<Sweep> {
        let name = job.name.as_str();
        let err = |e| db::error(e, format!("job {name}: starting a sweep"));
        // The last key is read before the job's row is locked: waiting on the application's
        // table (behind a queued ALTER, say) must not hold up other runs' joins and splits.
        let upper: Option<KeyValue> = client
            .query_opt(last_key_sql, &[])
            .await
            .map_err(err)?
            .map(|r| r.get(0));
        let tx = client.transaction().await.map_err(err)?;
        let row = tx
            .query_one(
                &format!(
                    "SELECT sweeps, total_estimate, state FROM {s}.checkpoints WHERE job = $1 FOR UPDATE",
                    s = self.q
                ),
                &[&name],
            )
            .await
            .map_err(err)?;
        let (passes, estimate): (i32, Option<i64>) = (row.get(0), row.get(1));
        let state: JobState = row.try_get(2).map_err(err)?;
        if state.is_finished() {
            return Ok(Sweep::Done);
        }
        // Another run started a pass since (or one is still being walked): join it rather than
        // start another; its end is verified again.
        let unfinished: bool = tx
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {s}.ranges WHERE job = $1 AND NOT done)",
                    s = self.q
                ),
                &[&name],
            )
            .await
            .map_err(err)?
            .get(0);
        if passes != seen || unfinished {
            return Ok(Sweep::Ready { pass: passes });
        }
        if passes >= job.max_sweeps as i32 {
            return Ok(Sweep::Exhausted { passes });
        }
        let Some(upper) = upper else {
            return Ok(Sweep::Exhausted { passes });
        };
        tx.execute(
            &format!(
                "INSERT INTO {s}.ranges (job, id, upper_bound, estimate)
                 SELECT $1, coalesce(max(id), -1) + 1, $2, $3 FROM {s}.ranges WHERE job = $1",
                s = self.q
            ),
            &[&name, &upper, &estimate],
        )
        .await
        .map_err(err)?;
        tx.execute(
            &format!(
                "UPDATE {s}.checkpoints SET sweeps = sweeps + 1, phase = $2, updated_at = now()
                  WHERE job = $1",
                s = self.q
            ),
            &[&name, &Phase::Sweeping.as_sql()],
        )
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(Sweep::Ready { pass: passes + 1 })
    }

    /// The advisory lock key a job's reverts and resets take exclusively and the SQL gate
    /// `assert_done` takes shared, until their transaction (or, for a revert, its run) ends.
    pub fn job_lock_key(&self, job: &str) -> String {
        format!("backfill job {}.{job}", self.q)
    }

    /// Takes the job's advisory lock for this session (a revert holds it for its whole run),
    /// waiting while a migration that passed the gate is still open. Returns false when
    /// `stop` says to give up.
    pub async fn lock_job(
        &self,
        client: &tokio_postgres::Client,
        job: &str,
        mut waiting: impl FnMut(),
        stop: impl Fn() -> bool,
    ) -> Result<bool> {
        let key = self.job_lock_key(job);
        loop {
            let got: bool = client
                .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
                .await
                .map_err(|e| db::error(e, format!("job {job}: taking its lock")))?
                .get(0);
            if got {
                return Ok(true);
            }
            waiting();
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            if stop() {
                return Ok(false);
            }
        }
    }

    /// Locks the job's checkpoint row until the transaction ends.
    pub(super) async fn lock_checkpoint(
        &self,
        tx: &impl GenericClient,
        job: &str,
    ) -> Result<u64, tokio_postgres::Error> {
        tx.execute(
            &format!(
                "SELECT 1 FROM {s}.checkpoints WHERE job = $1 FOR UPDATE",
                s = self.q
            ),
            &[&job],
        )
        .await
    }

    /// Whether `job` may be reverted now: it made progress, is not reverted already, and no run
    /// works on it. Locks its checkpoint row until the caller's transaction ends.
    pub(super) async fn may_revert(&self, tx: &impl GenericClient, job: &str) -> Result<()> {
        let err = |e| db::error(e, format!("job {job}: checking that it may be reverted"));
        // Lock first, read after, in statements of their own: a statement that waited for the
        // row lock still reads other tables as of its start, so it would miss a run that joined
        // (and released the row) meanwhile; and the activity snapshot is per transaction.
        self.lock_checkpoint(tx, job).await.map_err(err)?;
        tx.execute("SELECT pg_stat_clear_snapshot()", &[])
            .await
            .map_err(err)?;
        let row = tx
            .query_opt(
                &format!(
                    "SELECT c.state, c.bound_taken,
                            coalesce((SELECT sum(g.rows_done) FROM {s}.ranges g WHERE g.job = c.job), 0)::bigint,
                            EXISTS (SELECT 1 FROM {s}.runs r WHERE r.job = c.job AND r.outcome IS NULL AND {alive})
                       FROM {s}.checkpoints c WHERE c.job = $1",
                    s = self.q,
                    alive = Self::run_alive_sql("r")
                ),
                &[&job],
            )
            .await
            .map_err(err)?;
        let refuse = |why: String| Err(Error::NotSatisfied(format!("job {job} {why}")));
        let Some(row) = row else {
            return refuse(format!(
                "has never run here (no checkpoint in schema {}); nothing to revert",
                self.schema
            ));
        };
        let state: JobState = row.try_get(0).map_err(err)?;
        let (taken, rows_done, running): (bool, i64, bool) = (row.get(1), row.get(2), row.get(3));
        match revert_refusal(state, made_progress(rows_done, taken), running) {
            None => Ok(()),
            Some(RevertRefusal::Running) => refuse(format!(
                "is running; stop it (Ctrl-C, or `backfill cancel {job}`) before reverting"
            )),
            Some(RevertRefusal::AlreadyReverted) => {
                refuse("is already reverted; nothing to revert until it runs again".into())
            }
            Some(RevertRefusal::NothingProcessed) => {
                refuse("has not processed anything yet; nothing to revert".into())
            }
        }
    }

    /// After a complete revert: the job's progress is forgotten (its next run starts over), its
    /// state says `reverted`, its finishing steps will run again, and the finished revert job is
    /// removed so that a later revert starts afresh. History rows stay.
    pub async fn mark_reverted(
        &self,
        client: &mut tokio_postgres::Client,
        job: &str,
        revert_job: &str,
        undo_table: Option<&str>,
    ) -> Result<()> {
        let err = |e| db::error(e, format!("job {job}: recording the revert"));
        let tx = client.transaction().await.map_err(err)?;
        self.lock_checkpoint(&tx, job).await.map_err(err)?;
        // The values are back in the table: kept ones would be stale in the job's next cycle.
        if let Some(undo_table) = undo_table {
            tx.batch_execute(&format!("DELETE FROM {undo_table}"))
                .await
                .map_err(err)?;
        }
        tx.execute(
            &format!(
                "UPDATE {s}.checkpoints SET state = $2, phase = $3, bound_taken = false,
                        upper_bound = NULL, total_estimate = NULL, total_exact = false, sweeps = 0,
                        verify_remaining = NULL, verified_at = NULL, finished_at = now(), updated_at = now(),
                        last_error = NULL
                  WHERE job = $1",
                s = self.q
            ),
            &[&job, &JobState::Reverted.as_sql(), &Phase::Reverted.as_sql()],
        )
        .await
        .map_err(err)?;
        for table in ["ranges", "finish_steps", "failures"] {
            tx.execute(
                &format!("DELETE FROM {s}.{table} WHERE job = $1", s = self.q),
                &[&job],
            )
            .await
            .map_err(err)?;
        }
        tx.execute(
            &format!("DELETE FROM {s}.checkpoints WHERE job = $1", s = self.q),
            &[&revert_job],
        )
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(())
    }

    /// A run that waited for the expand migration gave up: the job no longer shows it.
    pub async fn clear_waiting(&self, client: &impl GenericClient, job: &str) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {s}.checkpoints SET phase = NULL, updated_at = now()
                      WHERE job = $1 AND phase = $2",
                    s = self.q
                ),
                &[&job, &Phase::WaitingForExpand.as_sql()],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: recording that it no longer waits")))?;
        Ok(())
    }

    /// Shows that a run waits for the job's expand migration (the checkpoint row is made if the
    /// job never ran, so `status` can say so).
    pub async fn note_waiting(
        &self,
        client: &impl GenericClient,
        job: &JobSpec,
        why: &str,
    ) -> Result<()> {
        let name = job.name.as_str();
        client
            .execute(
                &format!(
                    "INSERT INTO {s}.checkpoints AS c (job, fingerprint, table_name, key_columns, phase, last_error)
                     VALUES ($1, $2, $3, $4, $6, $5)
                     ON CONFLICT (job) DO UPDATE SET phase = $6, last_error = $5, updated_at = now()
                      WHERE c.state <> $7",
                    s = self.q
                ),
                &[
                    &name,
                    &job.fingerprint,
                    &job.table.to_string(),
                    &job.key,
                    &why,
                    &Phase::WaitingForExpand.as_sql(),
                    &JobState::Running.as_sql(),
                ],
            )
            .await
            .map_err(|e| db::error(e, format!("job {name}: recording that it waits for its expand migration")))?;
        Ok(())
    }
}
