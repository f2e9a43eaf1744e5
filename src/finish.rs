//! The finishing steps of a job (`finish_sql`): schema work that belongs right after the backfill,
//! such as the three-step NOT NULL or `CREATE INDEX CONCURRENTLY`, run once the backfill is done
//! and verified.
//!
//! Each step is one statement, sent on its own with the simple-query protocol and outside any
//! transaction block: `CREATE INDEX CONCURRENTLY` refuses to run inside one, and a step that
//! commits on its own holds its lock only for itself. Every statement waits at most
//! `lock_timeout` for its lock, because a DDL statement queued behind a long transaction blocks
//! every later query on the table; contention is retried after a jittered backoff instead.
//!
//! This module owns the `finish_steps` rows of a job and the job's step count on its checkpoint
//! (`checkpoints.finish_steps`, which the gate `assert_done` compares with the done rows). It
//! never touches the checkpoint's state, ranges or runs: the executor decides when a job is done
//! and calls in here afterwards. Here: the order of the steps and the lock that keeps finishers
//! apart; [`step`] reads one step offline, [`attempt`] runs one step to its end. What happens
//! (waiting for another finisher, a step started, retried, done, skipped) is told as typed events
//! (`events::Finishing`) to a listener; telemetry writes the lines, this module writes none.

mod attempt;
mod step;

pub use attempt::contention_reason;

use crate::db::{self, Limit, Timeouts};
use crate::error::{Error, Result};
use crate::events::{Event, Finishing, Listener, StepBefore, StepOf};
use crate::job::JobSpec;
use crate::sql::quote_ident;
use crate::state::StepState;
use std::time::Duration;
use step::{shorten, Step};
use tokio_postgres::{Client, GenericClient};

/// The wait after a contended attempt: 200 ms, doubling up to 10 s.
const STEP_BACKOFF: crate::backoff::Backoff = crate::backoff::Backoff {
    base: Duration::from_millis(200),
    max: Duration::from_secs(10),
};

/// How the finishing steps run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishOptions {
    /// How long each statement may wait for a lock before it gives up and is retried.
    pub lock_timeout: Duration,
    /// Attempts per step, the first included, before contention stops the run.
    pub max_attempts: u32,
    /// A limit on each statement's running time; None (the default) lifts any limit the session
    /// has, because an index build on a large table may take hours.
    pub statement_timeout: Option<Duration>,
}

impl Default for FinishOptions {
    fn default() -> FinishOptions {
        FinishOptions {
            lock_timeout: Duration::from_secs(2),
            max_attempts: 20,
            statement_timeout: None,
        }
    }
}

/// What happened to one step in this call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// Recorded as done with the same statement by an earlier run; not run again.
    AlreadyDone,
    /// Run now and done, after `attempts` attempts in this call.
    Ran {
        attempts: u32,
        /// An invalid index left by an interrupted `CREATE INDEX CONCURRENTLY` was dropped first.
        dropped_invalid_index: bool,
    },
}

/// One step of a successful [`run_steps`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// The 1-based position of the step in the job's `finish_sql`.
    pub step: i32,
    pub sql: String,
    pub outcome: StepOutcome,
}

/// Checks each finishing step of the job offline (one statement, not a transaction command); the
/// error names the job file, the line and the key `finish_sql`.
pub fn check_steps(job: &JobSpec) -> Result<()> {
    // Named by the file it came from, as the error's other half names the file.
    let name = job
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for (i, sql) in job.finish_sql.iter().enumerate() {
        Step::parse(&name, i + 1, job.finish_sql.len(), sql)
            .map_err(|e| Error::Usage(format!("{}: {e}", job.file_key("finish_sql"))))?;
    }
    Ok(())
}

/// Runs the job's finishing steps in order on `client` (a dedicated session, not inside a
/// transaction), skipping those already recorded as done with the same SQL.
///
/// Every attempt is recorded in `finish_steps` (committed before the statement runs and again
/// after it), so a crash leaves the step `running`, and the next call runs it again. Concurrent
/// callers for the same job are serialised by a session advisory lock: the second one waits,
/// then finds the steps done. If this future is dropped midway, the lock stays with the session
/// until it closes. `attempts` in the table counts every attempt since the step's statement last
/// changed; [`StepOutcome::Ran`] counts those of this call.
pub async fn run_steps(
    client: &Client,
    schema: &str,
    job: &str,
    steps: &[String],
    opts: &FinishOptions,
    events: &dyn Listener,
) -> Result<Vec<StepReport>> {
    let parsed = steps
        .iter()
        .enumerate()
        .map(|(i, sql)| Step::parse(job, i + 1, steps.len(), sql))
        .collect::<Result<Vec<_>>>()?;
    if opts.max_attempts == 0 {
        return Err(Error::Usage(format!(
            "job {job}: the finishing steps need at least one attempt each (max_attempts is 0)"
        )));
    }
    let run = Finisher {
        client,
        s: quote_ident(schema),
        job,
        opts,
        events,
        total: steps.len(),
    };
    run.lock(schema).await?;
    let result = run.all(&parsed).await;
    // A failed unlock means the session is gone, and the lock went with it.
    let _ = client
        .execute(
            "SELECT pg_advisory_unlock(hashtext('backfill finish ' || $1::text || '.' || $2::text))",
            &[&schema, &job],
        )
        .await;
    result
}

/// The recorded finishing steps of a job, by step: (step, state, last error). A step is done when
/// its state is `done`; `pending`, `running` (in progress, or interrupted by a crash) and
/// `failed` are not. Status and the gate count the done ones.
pub async fn done_steps(
    client: &impl GenericClient,
    schema: &str,
    job: &str,
) -> Result<Vec<(i32, String, Option<String>)>> {
    let rows = client
        .query(
            &format!(
                "SELECT step, state, last_error FROM {}.finish_steps WHERE job = $1 ORDER BY step",
                quote_ident(schema)
            ),
            &[&job],
        )
        .await
        .map_err(|e| db::error(e, format!("job {job}: reading its finishing steps")))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// The state of one run of the steps, shared by its helpers.
struct Finisher<'a> {
    client: &'a Client,
    /// The engine's schema, quoted.
    s: String,
    job: &'a str,
    opts: &'a FinishOptions,
    events: &'a dyn Listener,
    total: usize,
}

impl Finisher<'_> {
    fn emit(&self, happened: Finishing<'_>) {
        self.events.on(Event::Finishing(happened));
    }

    /// Which step `step` is, for the events.
    fn of(&self, step: &Step) -> StepOf {
        StepOf {
            n: step.n,
            total: self.total,
        }
    }

    fn db_err(&self, e: tokio_postgres::Error, what: &str) -> Error {
        db::error(e, format!("job {}: {what}", self.job))
    }

    /// Takes the job's finishing lock for this session, waiting for another finisher if needed.
    async fn lock(&self, schema: &str) -> Result<()> {
        let key = "hashtext('backfill finish ' || $1::text || '.' || $2::text)";
        let fail = |e| self.db_err(e, "taking the lock that keeps finishers of the job apart");
        let got: bool = self
            .client
            .query_one(
                &format!("SELECT pg_try_advisory_lock({key})"),
                &[&schema, &self.job],
            )
            .await
            .map_err(fail)?
            .get(0);
        if got {
            return Ok(());
        }
        self.emit(Finishing::WaitingForOtherFinisher { job: self.job });
        // The other finisher may be building an index for hours: wait without a lock timeout.
        let unlimited = Timeouts {
            lock: Some(Limit::Unlimited),
            ..Timeouts::default()
        };
        self.client
            .batch_execute(&unlimited.set_session())
            .await
            .map_err(fail)?;
        let waited = self
            .client
            .execute(
                &format!("SELECT pg_advisory_lock({key})"),
                &[&schema, &self.job],
            )
            .await;
        let reset = self.client.batch_execute(&unlimited.reset()).await;
        waited.map_err(fail)?;
        reset.map_err(fail)?;
        Ok(())
    }

    async fn all(&self, steps: &[Step]) -> Result<Vec<StepReport>> {
        let (job, s) = (self.job, &self.s);
        let n = steps.len() as i32;
        let exists = self
            .client
            .query_opt(
                &format!("SELECT 1 FROM {s}.checkpoints WHERE job = $1"),
                &[&job],
            )
            .await
            .map_err(|e| self.db_err(e, "reading its checkpoint"))?;
        if exists.is_none() {
            return Err(Error::NotSatisfied(format!(
                "job {job} has no checkpoint: its finishing steps run after its backfill; run `backfill run {job}`"
            )));
        }
        // The gate compares the done rows with this count; rows of steps the job no longer lists
        // would otherwise count as done.
        self.client
            .execute(
                &format!("UPDATE {s}.checkpoints SET finish_steps = $2 WHERE job = $1"),
                &[&job, &n],
            )
            .await
            .map_err(|e| self.db_err(e, "recording its number of finishing steps"))?;
        self.client
            .execute(
                &format!("DELETE FROM {s}.finish_steps WHERE job = $1 AND step > $2"),
                &[&job, &n],
            )
            .await
            .map_err(|e| self.db_err(e, "forgetting finishing steps it no longer lists"))?;
        let recorded = self
            .client
            .query(
                &format!("SELECT step, sql_hash, state FROM {s}.finish_steps WHERE job = $1"),
                &[&job],
            )
            .await
            .map_err(|e| self.db_err(e, "reading its finishing steps"))?;
        let recorded: Vec<(i32, String, StepState)> = recorded
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();

        let mut reports = Vec::with_capacity(steps.len());
        for step in steps {
            let before = recorded.iter().find(|(n, _, _)| *n == step.n);
            let outcome = match before {
                Some((_, hash, state)) if *state == StepState::Done && *hash == step.hash => {
                    self.emit(Finishing::AlreadyDone {
                        job,
                        step: self.of(step),
                    });
                    StepOutcome::AlreadyDone
                }
                _ => {
                    let before_now = match before {
                        Some((_, hash, _)) if *hash != step.hash => StepBefore::StatementChanged,
                        Some((_, _, StepState::Running)) => StepBefore::Interrupted,
                        Some((_, _, StepState::Failed)) => StepBefore::Failed,
                        _ => StepBefore::Nothing,
                    };
                    self.emit(Finishing::Started {
                        job,
                        step: self.of(step),
                        before: before_now,
                        statement: &shorten(&step.sql),
                    });
                    let interrupted =
                        matches!(before, Some((_, h, StepState::Running)) if *h == step.hash);
                    self.run_step(step, interrupted).await?
                }
            };
            reports.push(StepReport {
                step: step.n,
                sql: step.sql.clone(),
                outcome,
            });
        }
        Ok(reports)
    }
}
