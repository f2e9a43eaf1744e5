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
//! and calls in here afterwards.

use crate::db::{self, ErrorClass};
use crate::error::{Error, Result};
use crate::sql::quote_ident;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, GenericClient};

/// First wait after a contended attempt; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

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

/// Runs the job's finishing steps in order on `client` (a dedicated session, not inside a
/// transaction), skipping those already recorded as done with the same SQL.
///
/// Every attempt is recorded in `finish_steps` (committed before the statement runs and again
/// after it), so a crash leaves the step `running`, and the next call runs it again. Concurrent
/// callers for the same job are serialised by a session advisory lock: the second one waits,
/// then finds the steps done. If this future is dropped midway, the lock stays with the session
/// until it closes. `attempts` in the table counts every attempt since the step's statement last
/// changed; [`StepOutcome::Ran`] counts those of this call.
/// Checks each step offline (one statement, not a transaction command), as a job file is read.
pub fn check_steps(job: &str, steps: &[String]) -> Result<()> {
    for (i, sql) in steps.iter().enumerate() {
        Step::parse(job, i + 1, steps.len(), sql)?;
    }
    Ok(())
}

pub async fn run_steps(
    client: &Client,
    schema: &str,
    job: &str,
    steps: &[String],
    opts: &FinishOptions,
    log: &(dyn Fn(&str) + Sync),
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
        log,
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

/// One validated step.
struct Step {
    n: i32,
    sql: String,
    hash: String,
    /// The relation the statement works on, as its name's parts, when the statement says.
    table: Option<Vec<String>>,
    /// Set for `CREATE INDEX CONCURRENTLY name …`, whose failure leaves an invalid index behind.
    index: Option<IndexName>,
}

/// The name a concurrent index build gives its index.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IndexName {
    schema: Option<String>,
    name: String,
}

impl Step {
    fn parse(job: &str, n: usize, total: usize, sql: &str) -> Result<Step> {
        let sql = sql.trim();
        let refuse = |why: &str| {
            Error::Usage(format!(
                "job {job}: finishing step {n}/{total} (`{}`) {why}",
                shorten(sql)
            ))
        };
        let toks = tokens(sql).map_err(|what| {
            refuse(&format!(
                "has {what}; close it, or fix the step in the job's `finish_sql`"
            ))
        })?;
        let words: Vec<&Tok> = toks.iter().filter(|t| **t != Tok::Semi).collect();
        if words.is_empty() {
            return Err(refuse(
                "is empty; remove it from the job's `finish_sql` or write the statement",
            ));
        }
        let first_semi = toks.iter().position(|t| *t == Tok::Semi);
        if first_semi.is_some_and(|i| toks[i..].iter().any(|t| *t != Tok::Semi)) {
            return Err(refuse(
                "holds more than one statement; put each statement in its own entry of the job's `finish_sql` (each runs on its own, outside any transaction)",
            ));
        }
        if let Tok::Word(w) = &toks[0] {
            let second = matches!(toks.get(1), Some(Tok::Word(t)) if t == "transaction");
            let control = matches!(
                w.as_str(),
                "begin" | "commit" | "end" | "rollback" | "abort" | "savepoint" | "release"
            ) || (w == "start" && second)
                || (w == "prepare" && second);
            if control {
                return Err(refuse(
                    "is a transaction command; finishing steps run one by one outside any transaction, so remove it from the job's `finish_sql`",
                ));
            }
        }
        let mut h = Sha256::new();
        h.update(sql.as_bytes());
        Ok(Step {
            n: n as i32,
            sql: sql.to_string(),
            hash: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
            table: relation_of(&toks),
            index: concurrent_index(&toks),
        })
    }
}

/// The state of one run of the steps, shared by its helpers.
struct Finisher<'a> {
    client: &'a Client,
    /// The engine's schema, quoted.
    s: String,
    job: &'a str,
    opts: &'a FinishOptions,
    log: &'a (dyn Fn(&str) + Sync),
    total: usize,
}

/// How one attempt went wrong.
struct Failure {
    error: tokio_postgres::Error,
    /// The statement that failed was our drop of an invalid index, not the step itself.
    in_drop: bool,
}

impl Finisher<'_> {
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
        (self.log)(&format!(
            "job {}: another runner is running its finishing steps; waiting for it to end",
            self.job
        ));
        // The other finisher may be building an index for hours: wait without a lock timeout.
        self.client
            .batch_execute("SET lock_timeout = 0")
            .await
            .map_err(fail)?;
        let waited = self
            .client
            .execute(
                &format!("SELECT pg_advisory_lock({key})"),
                &[&schema, &self.job],
            )
            .await;
        let reset = self.client.batch_execute("RESET lock_timeout").await;
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
        let recorded: Vec<(i32, String, String)> = recorded
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();

        let mut reports = Vec::with_capacity(steps.len());
        for step in steps {
            let before = recorded.iter().find(|(n, _, _)| *n == step.n);
            let outcome = match before {
                Some((_, hash, state)) if state == "done" && *hash == step.hash => {
                    (self.log)(&format!(
                        "job {job}: finishing step {}/{} already done; skipping",
                        step.n, self.total
                    ));
                    StepOutcome::AlreadyDone
                }
                _ => {
                    let note = match before {
                        Some((_, hash, _)) if *hash != step.hash => {
                            " (its statement changed since it was recorded)"
                        }
                        Some((_, _, state)) if state == "running" => {
                            " (an earlier run was interrupted in it)"
                        }
                        Some((_, _, state)) if state == "failed" => {
                            " (it failed in an earlier run)"
                        }
                        _ => "",
                    };
                    (self.log)(&format!(
                        "job {job}: starting finishing step {}/{}{note}: `{}`",
                        step.n,
                        self.total,
                        shorten(&step.sql)
                    ));
                    let interrupted =
                        matches!(before, Some((_, h, st)) if st == "running" && *h == step.hash);
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

    /// Runs one step to success, or to an error that says what to do.
    async fn run_step(&self, step: &Step, interrupted_before: bool) -> Result<StepOutcome> {
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
                self.record(step, "running", Some(&described)).await?;
                let wait = crate::backoff::Backoff {
                    base: BACKOFF_BASE,
                    max: BACKOFF_MAX,
                }
                .delay(attempt);
                (self.log)(&format!(
                    "job {}: finishing step {}/{}: retrying after {} because {}{} ({}); attempt {} of {}",
                    self.job,
                    step.n,
                    self.total,
                    humantime::format_duration(Duration::from_millis(wait.as_millis() as u64)),
                    if failure.in_drop { "dropping the invalid index hit " } else { "" },
                    contention_reason(code.as_deref()),
                    code.as_deref().unwrap_or("?"),
                    attempt + 1,
                    self.opts.max_attempts
                ));
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
                self.record(step, "failed", Some(&described)).await?;
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
        self.record(step, "done", None).await?;
        (self.log)(&format!(
            "job {}: finishing step {}/{} done ({} attempt{}, {})",
            self.job,
            step.n,
            self.total,
            attempt,
            if attempt == 1 { "" } else { "s" },
            humantime::format_duration(Duration::from_millis(t.elapsed().as_millis() as u64))
        ));
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
        let statement = self.opts.statement_timeout.map_or(0, db::millis);
        self.client
            .batch_execute(&format!(
                "SET lock_timeout = {}; SET statement_timeout = {statement}",
                db::millis(self.opts.lock_timeout)
            ))
            .await?;
        let result = self.client.batch_execute(sql).await;
        let reset = self
            .client
            .batch_execute("RESET lock_timeout; RESET statement_timeout")
            .await;
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
        (self.log)(&format!(
            "job {}: finishing step {}/{}: dropped the invalid index {name} left by an interrupted or failed CREATE INDEX CONCURRENTLY",
            self.job, step.n, self.total
        ));
        Ok(Some(name))
    }

    /// Records the start of an attempt; committed before the statement runs.
    async fn record_attempt(&self, step: &Step, first_of_call: bool) -> Result<()> {
        let sql = format!(
            "INSERT INTO {s}.finish_steps AS f (job, step, sql, sql_hash, state, attempts, started_at)
             VALUES ($1, $2, $3, $4, 'running', 1, now())
             ON CONFLICT (job, step) DO UPDATE
                SET attempts = CASE WHEN f.sql_hash = EXCLUDED.sql_hash AND f.state <> 'done'
                                    THEN f.attempts + 1 ELSE 1 END,
                    last_error = CASE WHEN f.sql_hash = EXCLUDED.sql_hash AND f.state <> 'done'
                                      THEN f.last_error END,
                    started_at = CASE WHEN $5 THEN now() ELSE f.started_at END,
                    sql = EXCLUDED.sql, sql_hash = EXCLUDED.sql_hash,
                    state = 'running', done_at = NULL",
            s = self.s
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

    async fn record(&self, step: &Step, state: &str, error: Option<&str>) -> Result<()> {
        let sql = format!(
            "UPDATE {}.finish_steps
                SET state = $3, last_error = $4,
                    done_at = CASE WHEN $3 = 'done' THEN now() END
              WHERE job = $1 AND step = $2",
            self.s
        );
        self.client
            .execute(&sql, &[&self.job, &step.n, &state, &error])
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

impl IndexName {
    fn render(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&self.name)),
            None => quote_ident(&self.name),
        }
    }
}

fn contention_reason(code: Option<&str>) -> &'static str {
    match code {
        Some("55P03") => "lock timeout",
        Some("40P01") => "deadlock",
        Some("40001") => "serialization failure",
        _ => "contention",
    }
}

/// A statement on one line, cut to a length that fits an error message.
fn shorten(sql: &str) -> String {
    const MAX: usize = 60;
    let one_line = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if one_line.chars().count() <= MAX {
        return one_line;
    }
    let cut: String = one_line.chars().take(MAX).collect();
    format!("{} …", cut.trim_end())
}

/// A token of SQL text: just enough to count statements and read the head of one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// An unquoted identifier or keyword, folded to lower case as the server folds it.
    Word(String),
    /// A double-quoted identifier, unescaped, its case kept.
    Quoted(String),
    Semi,
    Dot,
    /// Anything else: literals, numbers, operators, parameters.
    Other,
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

/// Splits SQL into tokens, skipping comments and the contents of quoted strings, so that a `;`
/// inside them is not mistaken for the end of a statement. Errs on unterminated text.
fn tokens(sql: &str) -> Result<Vec<Tok>, &'static str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'-' && next == Some(b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && next == Some(b'*') {
            // Block comments nest in PostgreSQL.
            let mut depth = 0;
            loop {
                match (b.get(i), b.get(i + 1)) {
                    (None, _) => return Err("an unterminated /* comment"),
                    (Some(b'/'), Some(b'*')) => {
                        depth += 1;
                        i += 2;
                    }
                    (Some(b'*'), Some(b'/')) => {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => i += 1,
                }
            }
        } else if c == b'\'' {
            i = skip_string(b, i, false)?;
            out.push(Tok::Other);
        } else if c == b'"' {
            let mut ident = Vec::new();
            i += 1;
            loop {
                match (b.get(i), b.get(i + 1)) {
                    (None, _) => return Err("an unterminated quoted identifier"),
                    (Some(b'"'), Some(b'"')) => {
                        ident.push(b'"');
                        i += 2;
                    }
                    (Some(b'"'), _) => {
                        i += 1;
                        break;
                    }
                    (Some(&x), _) => {
                        ident.push(x);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Quoted(String::from_utf8_lossy(&ident).into_owned()));
        } else if c == b'$' {
            // `$tag$ … $tag$` (or `$$ … $$`) quotes a string; `$1` is a parameter.
            let mut j = i + 1;
            while j < b.len() && (ident_start(b[j]) || (j > i + 1 && b[j].is_ascii_digit())) {
                j += 1;
            }
            if b.get(j) == Some(&b'$') {
                let tag = &b[i..=j];
                let end = b[j + 1..]
                    .windows(tag.len())
                    .position(|w| w == tag)
                    .ok_or("an unterminated dollar-quoted string")?;
                i = j + 1 + end + tag.len();
            } else {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            out.push(Tok::Other);
        } else if ident_start(c) {
            let start = i;
            // `$` continues an identifier, so `a$b$` is no dollar quote.
            while i < b.len() && (ident_start(b[i]) || b[i].is_ascii_digit() || b[i] == b'$') {
                i += 1;
            }
            let word = &sql[start..i];
            if b.get(i) == Some(&b'\'') && word.eq_ignore_ascii_case("e") {
                i = skip_string(b, i, true)?;
                out.push(Tok::Other);
            } else {
                out.push(Tok::Word(word.to_ascii_lowercase()));
            }
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Other);
        } else {
            out.push(match c {
                b';' => Tok::Semi,
                b'.' => Tok::Dot,
                _ => Tok::Other,
            });
            i += 1;
        }
    }
    Ok(out)
}

/// The index just past the string literal starting at `b[i]` (a quote); `''` is a quote inside,
/// and with `backslash` (E'…') so is `\'`.
fn skip_string(b: &[u8], mut i: usize, backslash: bool) -> Result<usize, &'static str> {
    i += 1;
    loop {
        match (b.get(i), b.get(i + 1)) {
            (None, _) => return Err("an unterminated quoted string"),
            (Some(b'\\'), Some(_)) if backslash => i += 2,
            (Some(b'\''), Some(b'\'')) => i += 2,
            (Some(b'\''), _) => return Ok(i + 1),
            _ => i += 1,
        }
    }
}

/// Reads the head of a statement token by token.
struct Cursor<'a> {
    toks: &'a [Tok],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(toks: &'a [Tok]) -> Cursor<'a> {
        Cursor { toks, at: 0 }
    }

    fn word(&mut self, w: &str) -> bool {
        let hit = matches!(self.toks.get(self.at), Some(Tok::Word(x)) if x == w);
        if hit {
            self.at += 1;
        }
        hit
    }

    fn words(&mut self, ws: &[&str]) -> bool {
        let save = self.at;
        if ws.iter().all(|w| self.word(w)) {
            return true;
        }
        self.at = save;
        false
    }

    /// An identifier other than the keyword `on` (reserved, so never an index name).
    fn ident(&mut self) -> Option<String> {
        let found = match self.toks.get(self.at)? {
            Tok::Word(w) if w != "on" => w.clone(),
            Tok::Quoted(q) => q.clone(),
            _ => return None,
        };
        self.at += 1;
        Some(found)
    }

    /// `a`, `a.b` or `a.b.c`, as its parts.
    fn qualified(&mut self) -> Option<Vec<String>> {
        let mut parts = vec![self.ident()?];
        while self.toks.get(self.at) == Some(&Tok::Dot) {
            self.at += 1;
            parts.push(self.ident()?);
        }
        Some(parts)
    }
}

/// A qualified name for SQL, every part quoted.
fn render(parts: &[String]) -> String {
    parts
        .iter()
        .map(|p| quote_ident(p))
        .collect::<Vec<_>>()
        .join(".")
}

/// A qualified name for people: parts quoted only where SQL would need it.
fn display(parts: &[String]) -> String {
    parts
        .iter()
        .map(|p| {
            let plain = p
                .bytes()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == b'_')
                && p.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
            if plain {
                p.clone()
            } else {
                quote_ident(p)
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name ON …`: the index name, when given.
fn concurrent_index(toks: &[Tok]) -> Option<IndexName> {
    let mut c = Cursor::new(toks);
    if !c.word("create") {
        return None;
    }
    c.word("unique");
    if !c.words(&["index", "concurrently"]) {
        return None;
    }
    c.words(&["if", "not", "exists"]);
    let mut parts = c.qualified()?;
    if !c.word("on") {
        return None;
    }
    let name = parts.pop()?;
    Some(IndexName {
        schema: parts.pop(),
        name,
    })
}

/// The table an `ALTER TABLE` or `CREATE INDEX` works on, for messages and to find an index
/// build's leftover.
fn relation_of(toks: &[Tok]) -> Option<Vec<String>> {
    let mut c = Cursor::new(toks);
    if c.words(&["alter", "table"]) {
        c.words(&["if", "exists"]);
    } else if c.word("create") {
        c.word("unique");
        if !c.word("index") {
            return None;
        }
        c.word("concurrently");
        c.words(&["if", "not", "exists"]);
        if !c.word("on") {
            c.qualified()?;
            if !c.word("on") {
                return None;
            }
        }
    } else {
        return None;
    }
    c.word("only");
    c.qualified()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sql: &str) -> Result<Step> {
        Step::parse("j", 1, 1, sql)
    }

    fn refused(sql: &str, why: &str) {
        match parse(sql) {
            Err(Error::Usage(m)) => assert!(m.contains(why), "{sql}: {m}"),
            Err(e) => panic!("{sql}: wrong kind of error: {e}"),
            Ok(_) => panic!("{sql}: accepted"),
        }
    }

    #[test]
    fn one_statement_per_step() {
        for ok in [
            "ALTER TABLE t VALIDATE CONSTRAINT c",
            "ALTER TABLE t VALIDATE CONSTRAINT c;",
            "  ALTER TABLE t VALIDATE CONSTRAINT c ; ;  -- done\n",
            "COMMENT ON TABLE t IS 'a; b'",
            "COMMENT ON TABLE t IS E'it\\'s; fine'",
            "COMMENT ON TABLE t IS 'it''s; fine'",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; SELECT 2 $$",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ SELECT 1; $x$ $body$",
            "ALTER TABLE \"odd;name\" VALIDATE CONSTRAINT c /* a; /* nested; */ b; */",
            "SELECT a$b FROM t -- x; y",
        ] {
            assert!(parse(ok).is_ok(), "{ok}: {:?}", parse(ok).err());
        }
        refused(
            "ALTER TABLE t ADD c int; ALTER TABLE t DROP c",
            "more than one statement",
        );
        refused("SELECT 1;SELECT 2;", "more than one statement");
        refused("SELECT $$a$$; SELECT 2", "more than one statement");
        refused("", "is empty");
        refused(" ; -- nothing\n", "is empty");
        refused("BEGIN", "transaction command");
        refused("commit;", "transaction command");
        refused("/* c */ START TRANSACTION", "transaction command");
        refused("SELECT 'open", "unterminated");
        refused("SELECT $x$ open", "unterminated");
    }

    #[test]
    fn the_hash_ignores_surrounding_whitespace_only() {
        let a = parse("ALTER TABLE t VALIDATE CONSTRAINT c").unwrap();
        let b = parse("\n  ALTER TABLE t VALIDATE CONSTRAINT c  ").unwrap();
        let c = parse("ALTER TABLE t VALIDATE CONSTRAINT d").unwrap();
        assert_eq!(a.hash, b.hash);
        assert_ne!(a.hash, c.hash);
    }

    #[test]
    fn concurrent_index_names_are_read() {
        let name = |sql: &str| parse(sql).unwrap().index;
        let plain = |n: &str| {
            Some(IndexName {
                schema: None,
                name: n.into(),
            })
        };
        assert_eq!(
            name("CREATE INDEX CONCURRENTLY t_x_idx ON t (x)"),
            plain("t_x_idx")
        );
        assert_eq!(
            name("create unique index concurrently if not exists T_X ON t (x)"),
            plain("t_x")
        );
        assert_eq!(
            name("CREATE INDEX CONCURRENTLY \"Odd \"\"Name\" ON t (x)"),
            plain("Odd \"Name")
        );
        assert_eq!(
            name("CREATE INDEX CONCURRENTLY app.\"X\" ON app.t (x)"),
            Some(IndexName {
                schema: Some("app".into()),
                name: "X".into()
            })
        );
        assert_eq!(name("CREATE INDEX CONCURRENTLY ON t (x)"), None);
        assert_eq!(name("CREATE INDEX t_x_idx ON t (x)"), None);
        assert_eq!(name("ALTER TABLE t VALIDATE CONSTRAINT c"), None);
    }

    #[test]
    fn the_table_is_read_for_messages() {
        let table = |sql: &str| parse(sql).unwrap().table.as_deref().map(display);
        assert_eq!(
            table("ALTER TABLE orders VALIDATE CONSTRAINT c").as_deref(),
            Some("orders")
        );
        assert_eq!(
            table("ALTER TABLE IF EXISTS ONLY app.\"Orders\" SET NOT NULL").as_deref(),
            Some("app.\"Orders\"")
        );
        assert_eq!(
            table("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON ONLY t (x)").as_deref(),
            Some("t")
        );
        assert_eq!(
            table("CREATE INDEX CONCURRENTLY ON s.t (x)").as_deref(),
            Some("s.t")
        );
        assert_eq!(table("VACUUM t"), None);
    }

    #[test]
    fn long_statements_are_shortened_on_one_line() {
        assert_eq!(
            shorten("ALTER TABLE t\n   VALIDATE CONSTRAINT c;"),
            "ALTER TABLE t VALIDATE CONSTRAINT c"
        );
        let long = shorten(&format!("SELECT {}", "x, ".repeat(40)));
        assert!(long.ends_with(" …") && long.chars().count() <= 62, "{long}");
    }
}
