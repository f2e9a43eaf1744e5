//! One finishing step run to success or to an error that says what to do: each attempt recorded
//! in `finish_steps` before and after it runs, contention retried after a jittered backoff, an
//! invalid index left by a failed concurrent build dropped, the statement sent under the step
//! timeouts (session-level, then reset). Never touches the checkpoint; the order of the steps and
//! the lock that keeps finishers apart are `super`'s.

use super::step::{display, render, shorten, IndexName, Step};
use super::{Finisher, StepOutcome, STEP_BACKOFF};
use crate::db::{self, ErrorClass, Limit, Timeouts};
use crate::error::{Error, Result};
use crate::events::Finishing;
use crate::state::StepState;
use std::time::Instant;

/// How one attempt went wrong.
struct Failure {
    error: tokio_postgres::Error,
    /// The statement that failed was our drop of an invalid index, not the step itself.
    in_drop: bool,
}

impl Finisher<'_> {
    /// Runs one step to success, or to an error that says what to do.
    pub(super) async fn run_step(
        &self,
        step: &Step,
        interrupted_before: bool,
    ) -> Result<StepOutcome> {
        let t = Instant::now();
        let mut dropped = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.record_attempt(step, attempt == 1).await?;
            let failure = match self.attempt(step, &mut dropped).await {
                Ok(()) => break,
                Err(f) => f,
            };
            let described = db::describe(&failure.error);
            let code = db::sqlstate(&failure.error).map(str::to_string);
            let class = db::classify(&failure.error);
            if class == ErrorClass::Contention && attempt < self.opts.max_attempts {
                self.record(step, StepState::Running, Some(&described))
                    .await?;
                let wait = STEP_BACKOFF.delay(attempt);
                self.emit(Finishing::Retrying {
                    job: self.job,
                    step: self.of(step),
                    wait,
                    in_drop: failure.in_drop,
                    sqlstate: code.as_deref(),
                    next: attempt + 1,
                    max_attempts: self.opts.max_attempts,
                });
                tokio::time::sleep(wait).await;
                continue;
            }
            // Stopping: a concurrent build that failed leaves its invalid index behind, and an
            // invalid index still slows every write to the table; drop it before saying why.
            let cleanup = match (&step.index, class) {
                (Some(index), c) if c != ErrorClass::Connection => {
                    match self.drop_invalid(step, index).await {
                        Ok(Some(name)) => {
                            format!("; the invalid index {name} it left behind was dropped")
                        }
                        Ok(None) => String::new(),
                        Err(e) => format!(
                            "; an invalid index {} may be left behind and could not be dropped now ({}): the next run drops it before building, or drop it yourself with `DROP INDEX CONCURRENTLY`",
                            index.render(),
                            db::describe(&e)
                        ),
                    }
                }
                _ => String::new(),
            };
            // With the connection gone the row cannot be updated: it stays `running`, which is
            // the honest state (the statement may or may not have taken effect).
            if class != ErrorClass::Connection {
                self.record(step, StepState::Failed, Some(&described))
                    .await?;
            }
            return Err(self.failure_message(
                step,
                attempt,
                &failure,
                &described,
                code.as_deref(),
                class,
                &cleanup,
                interrupted_before,
            ));
        }
        self.record(step, StepState::Done, None).await?;
        self.emit(Finishing::Done {
            job: self.job,
            step: self.of(step),
            attempts: attempt,
            took: t.elapsed(),
        });
        Ok(StepOutcome::Ran {
            attempts: attempt,
            dropped_invalid_index: dropped,
        })
    }

    /// One attempt: clear an invalid leftover of the same index build, then run the statement.
    async fn attempt(&self, step: &Step, dropped: &mut bool) -> Result<(), Failure> {
        if let Some(index) = &step.index {
            match self.drop_invalid(step, index).await {
                Ok(Some(_)) => *dropped = true,
                Ok(None) => {}
                Err(error) => {
                    return Err(Failure {
                        error,
                        in_drop: true,
                    })
                }
            }
        }
        self.timed(&step.sql).await.map_err(|error| Failure {
            error,
            in_drop: false,
        })
    }

    /// Runs one statement on its own under the step timeouts, then puts the session's settings
    /// back to their defaults.
    async fn timed(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        // Set explicitly even when unlimited: a role-level statement_timeout would otherwise
        // cancel an index build that is meant to take hours.
        let timeouts = Timeouts {
            lock: Some(Limit::Within(self.opts.lock_timeout)),
            statement: Some(
                self.opts
                    .statement_timeout
                    .map_or(Limit::Unlimited, Limit::Within),
            ),
            idle_in_transaction: None,
        };
        self.client.batch_execute(&timeouts.set_session()).await?;
        let result = self.client.batch_execute(sql).await;
        let reset = self.client.batch_execute(&timeouts.reset()).await;
        result.and(reset)
    }

    /// Drops the index named by a concurrent build when it exists and is invalid (or not ready),
    /// and returns its name. A valid index of that name is kept: the build is then done.
    async fn drop_invalid(
        &self,
        step: &Step,
        index: &IndexName,
    ) -> Result<Option<String>, tokio_postgres::Error> {
        // An unqualified index name lives in the schema of its table, wherever search_path
        // points; only an index on that same table is ours to drop.
        let row = self
            .client
            .query_opt(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
                   FROM pg_index i
                   JOIN pg_class c ON c.oid = i.indexrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relname = $1::name
                    AND NOT (i.indisvalid AND i.indisready)
                    AND ($3::text IS NULL OR to_regclass($3::text) IS NULL
                         OR i.indrelid = to_regclass($3::text))
                    AND n.oid = coalesce(
                          (SELECT oid FROM pg_namespace WHERE nspname = $2::text),
                          (SELECT relnamespace FROM pg_class WHERE oid = to_regclass($3::text)),
                          (SELECT relnamespace FROM pg_class WHERE oid = to_regclass(quote_ident($1::name))))",
                &[&index.name, &index.schema, &step.table.as_deref().map(render)],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let name: String = row.get(0);
        self.timed(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
            .await?;
        self.emit(Finishing::DroppedInvalidIndex {
            job: self.job,
            step: self.of(step),
            index: &name,
        });
        Ok(Some(name))
    }

    /// Records the start of an attempt; committed before the statement runs.
    async fn record_attempt(&self, step: &Step, first_of_call: bool) -> Result<()> {
        let sql = format!(
            "INSERT INTO {s}.finish_steps AS f (job, step, sql, sql_hash, state, attempts, started_at)
             VALUES ($1, $2, $3, $4, {running}, 1, now())
             ON CONFLICT (job, step) DO UPDATE
                SET attempts = CASE WHEN f.sql_hash = EXCLUDED.sql_hash AND f.state <> {done}
                                    THEN f.attempts + 1 ELSE 1 END,
                    last_error = CASE WHEN f.sql_hash = EXCLUDED.sql_hash AND f.state <> {done}
                                      THEN f.last_error END,
                    started_at = CASE WHEN $5 THEN now() ELSE f.started_at END,
                    sql = EXCLUDED.sql, sql_hash = EXCLUDED.sql_hash,
                    state = {running}, done_at = NULL",
            s = self.s,
            running = StepState::Running.literal(),
            done = StepState::Done.literal(),
        );
        self.client
            .execute(
                &sql,
                &[&self.job, &step.n, &step.sql, &step.hash, &first_of_call],
            )
            .await
            .map_err(|e| {
                self.db_err(
                    e,
                    &format!("recording the start of finishing step {}", step.n),
                )
            })?;
        Ok(())
    }

    async fn record(&self, step: &Step, state: StepState, error: Option<&str>) -> Result<()> {
        let sql = format!(
            "UPDATE {}.finish_steps
                SET state = $3, last_error = $4,
                    done_at = CASE WHEN $3 = {done} THEN now() END
              WHERE job = $1 AND step = $2",
            self.s,
            done = StepState::Done.literal(),
        );
        self.client
            .execute(&sql, &[&self.job, &step.n, &state.as_sql(), &error])
            .await
            .map_err(|e| {
                self.db_err(
                    e,
                    &format!("recording finishing step {} as {state}", step.n),
                )
            })?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn failure_message(
        &self,
        step: &Step,
        attempts: u32,
        failure: &Failure,
        described: &str,
        code: Option<&str>,
        class: ErrorClass,
        cleanup: &str,
        interrupted_before: bool,
    ) -> Error {
        let job = self.job;
        let table = step
            .table
            .as_deref()
            .map_or_else(|| "the table".to_string(), display);
        let head = format!(
            "job {job}: finishing step {}/{} (`{}`)",
            step.n,
            self.total,
            shorten(&step.sql)
        );
        let progress = match step.n {
            1 => "no step is done yet".to_string(),
            2 => "step 1 is done and will be skipped".to_string(),
            k => format!("steps 1–{} are done and will be skipped", k - 1),
        };
        let doing = if failure.in_drop {
            "dropping the invalid index it left behind"
        } else {
            ""
        };
        if class == ErrorClass::Contention {
            let waiting = if step.index.is_some() || failure.in_drop {
                format!("an older transaction is still open on {table} (a concurrent index build or drop waits for every transaction that could use the table); find it in pg_stat_activity (oldest xact_start) and end it")
            } else {
                match code {
                    Some("40P01") => format!("it deadlocked with another session on {table} each time; find that session in pg_stat_activity"),
                    Some("40001") => "it conflicted with concurrent transactions each time; find them in pg_stat_activity".to_string(),
                    _ => format!("another session holds a lock on {table}; find it in pg_stat_activity (pg_locks shows who waits for whom)"),
                }
            };
            return Error::Runtime(format!(
                "{head} failed after {attempts} attempts{}: {} ({}){cleanup} — {waiting}, or run `backfill run {job}` again later: {progress}",
                if doing.is_empty() { String::new() } else { format!(" {doing}") },
                contention_reason(code),
                code.unwrap_or("?"),
            ));
        }
        let advice = match (class, code) {
            (ErrorClass::Connection, _) => "the connection was lost, so whether the step took effect is unknown (its row stays `running`); run again once the server is reachable: an interrupted CREATE INDEX CONCURRENTLY is dropped and rebuilt, other steps must be safe to repeat".to_string(),
            (ErrorClass::Timeout, _) => match self.opts.statement_timeout {
                Some(d) => format!("it ran longer than the finishing statement timeout of {}; raise that timeout (or leave it unset for index builds)", humantime::format_duration(d)),
                None => "it was cancelled (pg_cancel_backend, or the server shutting down)".to_string(),
            },
            (_, Some("23505")) => "the table holds duplicate values for the unique index (the detail names one); fix those rows, or the step".to_string(),
            (ErrorClass::Data, _) => format!("rows of {table} make the statement fail; fix those rows (or the step's SQL)"),
            (_, Some("42710" | "42P07")) if interrupted_before => "the object already exists: an earlier run was interrupted in this step after it took effect; make the step idempotent (IF NOT EXISTS / IF EXISTS) or drop the object".to_string(),
            (_, Some("42710" | "42P07")) => "the object already exists; make the step idempotent (IF NOT EXISTS / IF EXISTS) or drop the object".to_string(),
            (_, Some(c)) if c.starts_with("42") && c != "42501" => "fix the step in the job's `finish_sql`".to_string(),
            (_, c) => db::advice(c).to_string(),
        };
        Error::Runtime(format!(
            "{head} failed{}: {described}{cleanup} — {advice}; then run `backfill run {job}` again: {progress}",
            if doing.is_empty() { String::new() } else { format!(" {doing}") },
        ))
    }
}

/// The kind of contention a SQLSTATE names, for the step's error and its retry line.
pub fn contention_reason(code: Option<&str>) -> &'static str {
    match code {
        Some("55P03") => "lock timeout",
        Some("40P01") => "deadlock",
        Some("40001") => "serialization failure",
        _ => "contention",
    }
}
