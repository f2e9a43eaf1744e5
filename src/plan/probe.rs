//! The probe behind `backfill plan`, inside the caller's transaction (which it never commits):
//! find the first chunk, EXPLAIN its statement, execute it twice and compare the chunk's rows
//! before and after each execution, then read the catalog for what the changes will cost.
//! Rolling back is the caller's (`plan::rolled_back`); nothing here commits or writes the
//! engine's schema.

use super::explain::{self, JsonText, Rel};
use super::rows::{changed_columns, changed_rows, Rows};
use super::{Estimates, Finding, FirstChunk, Plan, PlanOptions, Severity, LARGE_TABLE_ROWS};
use crate::db::{self, Limit, Timeouts};
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::keyset::{ChunkBounds, KeyValue, Keyset, NextChunkError};
use crate::store::Checkpoint;
use std::time::{Duration, Instant};
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Transaction};

pub(super) async fn run(
    tx: &Transaction<'_>,
    job: &JobSpec,
    checkpoint: Option<&Checkpoint>,
    opts: &PlanOptions,
) -> Result<Plan> {
    let name = &job.name;
    let fail = |what: &'static str| {
        move |e: tokio_postgres::Error| db::error(e, format!("job {name}: {what}"))
    };
    let timeouts = Timeouts::chunk(
        job.lock_timeout,
        job.statement_timeout,
        crate::store::LEASE_TIMEOUT,
    );
    tx.batch_execute(&timeouts.set_local())
        .await
        .map_err(fail("setting timeouts"))?;
    let keyset = Keyset::resolve(tx, job).await?;
    let table = table_info(tx, job).await?;
    let mut findings = Vec::new();
    let mut estimates = Estimates {
        table_rows: table.rows,
        ..Estimates::default()
    };
    verify_estimate(tx, job, opts, &mut estimates).await?;

    let first = first_chunk(tx, job, &keyset, checkpoint).await?;
    if let Some(chunk) = &first {
        probe_chunk(
            tx,
            job,
            &keyset,
            &table,
            chunk,
            &mut estimates,
            &mut findings,
        )
        .await?;
    }
    // A statement that writes outside its chunk is often planned as a full scan (it does read
    // the rest of the table); ANALYZE would not help, so only the real cause is reported.
    if findings.iter().any(|f| f.code == "writes_outside_chunk") {
        findings.retain(|f| f.code != "planner_prefers_full_scan");
    }
    super::sessions::long_transactions(tx, job, opts, &mut findings).await?;
    if estimates.table_rows.unwrap_or(0) >= LARGE_TABLE_ROWS && !super::has_brakes(job) {
        findings.push(Finding {
            severity: Severity::Warning,
            code: "unthrottled_large_table",
            message: format!(
                "{} has ~{} rows and the job sets neither a rate ceiling nor a health signal: it will write as fast as the server allows, replicas and WAL archiving included",
                job.table,
                estimates.table_rows.unwrap_or(0)
            ),
            fix: "set [throttle] max_replication_lag (and/or rows_per_second, max_wal_rate, throttle_sql)".into(),
        });
    }
    expected_duration(job, &mut estimates);
    Ok(Plan {
        job: job.name.clone(),
        file: job.path.display().to_string(),
        table: job.table.to_string(),
        key: job.key.clone(),
        index: keyset.index.clone(),
        walk: if keyset.is_ctid() { "pages" } else { "index" },
        chunk_rows: job.chunk_rows,
        lock_timeout_ms: job.lock_timeout.as_millis() as u64,
        statement_timeout_ms: job.statement_timeout.as_millis() as u64,
        throttle: super::throttle_lines(job),
        phases: Vec::new(),
        first_chunk: first,
        estimates,
        findings,
    })
}

/// EXPLAINs the statement on the first chunk, then, when it can be planned, executes it.
async fn probe_chunk(
    tx: &Transaction<'_>,
    job: &JobSpec,
    keyset: &Keyset,
    table: &TableInfo,
    chunk: &FirstChunk,
    estimates: &mut Estimates,
    findings: &mut Vec<Finding>,
) -> Result<()> {
    let bounds: Vec<&(dyn ToSql + Sync)> = chunk
        .start
        .iter()
        .chain(chunk.end.iter())
        .map(|v| v as &(dyn ToSql + Sync))
        .collect();
    let statement = keyset.render(&job.sql);
    let small = estimates.table_rows.unwrap_or(0) < 10 * job.chunk_rows as i64;
    let Some(written) =
        check_plan(tx, job, &table.rel, &statement, &bounds, small, findings).await?
    else {
        return Ok(());
    };
    probe_statement(
        tx, job, keyset, table, &statement, &bounds, &written, estimates, findings,
    )
    .await
}

/// Chunks to do at the starting chunk size, and how long they take at the sample chunk's time
/// or the rate ceiling, whichever is slower.
fn expected_duration(job: &JobSpec, estimates: &mut Estimates) {
    let to_do = estimates
        .rows_to_do
        .or(estimates.table_rows)
        .map(|n| n.max(0));
    estimates.chunks = to_do.map(|n| (n + job.chunk_rows as i64 - 1) / job.chunk_rows as i64);
    if let (Some(chunks), Some(ms)) = (estimates.chunks, estimates.sample_chunk_ms) {
        let by_chunks = chunks as f64 * ms / 1000.0;
        let by_ceiling = match (job.throttle.rows_per_second, to_do) {
            (Some(r), Some(n)) => n as f64 / r as f64,
            _ => 0.0,
        };
        estimates.expected_seconds = Some(by_chunks.max(by_ceiling));
    }
}

/// Runs `verify` under a short statement_timeout, inside a savepoint so a timeout leaves the
/// transaction usable.
async fn verify_estimate(
    tx: &Transaction<'_>,
    job: &JobSpec,
    opts: &PlanOptions,
    estimates: &mut Estimates,
) -> Result<()> {
    let Some(verify) = &job.verify else {
        estimates.rows_to_do_note = Some("no verify query in the job".into());
        return Ok(());
    };
    let name = &job.name;
    let sql = |q: &'static str| async move {
        tx.batch_execute(q)
            .await
            .map_err(|e| db::error(e, format!("job {name}: around the verify estimate")))
    };
    sql("SAVEPOINT bf_verify").await?;
    let counted = async {
        let timeouts = Timeouts {
            statement: Some(Limit::Within(opts.verify_timeout)),
            ..Timeouts::default()
        };
        tx.batch_execute(&timeouts.set_local()).await?;
        tx.query_one(verify.as_str(), &[]).await
    }
    .await;
    // Rolling back to the savepoint also restores the job's statement_timeout.
    sql("ROLLBACK TO SAVEPOINT bf_verify").await?;
    match counted {
        Ok(row) => {
            estimates.rows_to_do = row.try_get::<_, i64>(0).ok();
            if estimates.rows_to_do.is_none() {
                estimates.rows_to_do_note = Some("verify did not return a bigint count".into());
            }
        }
        Err(e) => {
            estimates.rows_to_do_note = Some(if db::sqlstate(&e) == Some("57014") {
                format!(
                    "unknown: verify ran longer than {}",
                    humantime::format_duration(opts.verify_timeout)
                )
            } else {
                format!("unknown: verify failed: {}", db::describe(&e))
            });
        }
    }
    Ok(())
}

/// The chunk a run would process next: after the saved cursor if any, else the first keys.
async fn first_chunk(
    tx: &Transaction<'_>,
    job: &JobSpec,
    keyset: &Keyset,
    checkpoint: Option<&Checkpoint>,
) -> Result<Option<FirstChunk>> {
    let name = &job.name;
    // The next chunk of the first unfinished range, as a run would take it.
    let range = checkpoint.and_then(|c| c.ranges.iter().find(|r| !r.done));
    let cursor = range.and_then(|r| r.cursor.clone());
    let upper: Option<KeyValue> = match (range, checkpoint) {
        (Some(r), _) => Some(r.upper_bound.clone()),
        (None, Some(c)) if c.bound_taken => None,
        _ => tx
            .query_opt(&keyset.last_key_sql(), &[])
            .await
            .map_err(|e| db::error(e, format!("job {name}: finding the last key")))?
            .map(|r| r.get(0)),
    };
    let Some(upper) = upper else {
        return Ok(None);
    };
    let query = keyset.next_chunk_sql(cursor.is_some());
    let found = keyset
        .next_chunk(tx, &query, cursor.as_ref(), &upper, job.chunk_rows as i64)
        .await
        .map_err(|e| match e {
            NextChunkError::Query(e) => {
                db::error(e, format!("job {name}: finding the first chunk"))
            }
            NextChunkError::Stalled(stall) => {
                Error::Runtime(format!("job {name}: {stall}; a run would stop here"))
            }
        })?;
    let Some(ChunkBounds { keys, first, last }) = found else {
        return Ok(None);
    };
    let (start, end) = keyset.statement_bounds(&first, &last);
    Ok(Some(FirstChunk {
        sql: keyset.render_with(&job.sql, &start, &end),
        start,
        end,
        keys,
        resumes: cursor.is_some(),
        sweep: false,
    }))
}

/// EXPLAINs the statement for the chunk; a full scan of the job's table is an error when the
/// planner cannot avoid it (it can, with enable_seqscan off, when the statement is merely cheap
/// to scan at today's table size: then a warning, and nothing on a table of under ten chunks).
/// Returns the relations the statement writes, or None when it cannot even be planned.
async fn check_plan(
    tx: &Transaction<'_>,
    job: &JobSpec,
    table: &Rel,
    statement: &str,
    bounds: &[&(dyn ToSql + Sync)],
    small_table: bool,
    findings: &mut Vec<Finding>,
) -> Result<Option<Vec<Rel>>> {
    let text = match guarded(tx, explain_json(tx, statement, bounds)).await? {
        Ok(t) => t,
        Err(e) => {
            findings.push(Finding {
                severity: Severity::Error,
                code: "statement_fails",
                message: format!("the statement cannot be planned: {}", db::describe(&e)),
                fix: format!("fix `sql` in {}", job.path.display()),
            });
            return Ok(None);
        }
    };
    let analysis = explain::analyse(&text).map_err(Error::Runtime)?;
    let full: Vec<_> = analysis
        .full_scans_of(std::slice::from_ref(table))
        .cloned()
        .collect();
    if let Some(scan) = full.first() {
        let step = |e| db::error(e, "EXPLAIN without sequential scans");
        tx.batch_execute("SAVEPOINT bf_explain; SET LOCAL enable_seqscan = off")
            .await
            .map_err(step)?;
        let forced = explain_json(tx, statement, bounds).await;
        tx.batch_execute("ROLLBACK TO SAVEPOINT bf_explain")
            .await
            .map_err(step)?;
        let forced = forced.map_err(step)?;
        let unavoidable = explain::analyse(&forced)
            .map_err(Error::Runtime)?
            .full_scans_of(std::slice::from_ref(table))
            .next()
            .is_some();
        if unavoidable {
            findings.push(Finding {
                severity: Severity::Error,
                code: "full_scan",
                message: format!(
                    "the statement reads all of {table} for every chunk ({}): the run would be quadratic in the table's size",
                    scan.node
                ),
                fix: format!(
                    "restrict the statement to the chunk on the key, e.g. `WHERE ({}) BETWEEN :start AND :end`, so the key's index is used",
                    job.key.join(", ")
                ),
            });
        } else if !small_table {
            findings.push(Finding {
                severity: Severity::Warning,
                code: "planner_prefers_full_scan",
                message: format!(
                    "the planner reads all of {table} for this chunk ({}) although an index path exists; fine on a small table, slow on a large one",
                    scan.node
                ),
                fix: format!("ANALYZE {}; check the plan again on production-sized data", job.table),
            });
        }
    }
    Ok(Some(analysis.written))
}

/// Runs `op` inside a savepoint, so that its failure leaves the transaction usable. The outer
/// Result is the savepoint's own, the inner one the operation's.
async fn guarded<T>(
    tx: &Transaction<'_>,
    op: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> Result<std::result::Result<T, tokio_postgres::Error>> {
    let step = |e| db::error(e, "a savepoint of the plan's transaction");
    tx.batch_execute("SAVEPOINT bf_step").await.map_err(step)?;
    let r = op.await;
    let end = if r.is_ok() {
        "RELEASE SAVEPOINT bf_step"
    } else {
        "ROLLBACK TO SAVEPOINT bf_step"
    };
    tx.batch_execute(end).await.map_err(step)?;
    Ok(r)
}

async fn explain_json(
    client: &impl GenericClient,
    statement: &str,
    bounds: &[&(dyn ToSql + Sync)],
) -> std::result::Result<String, tokio_postgres::Error> {
    let sql = format!("EXPLAIN (VERBOSE, FORMAT JSON) {statement}");
    let row = client.query_one(&sql, bounds).await?;
    Ok(row.get::<_, JsonText>(0).0)
}

/// The job's table as the catalog knows it, read once.
struct TableInfo {
    oid: u32,
    /// Schema and name, as EXPLAIN VERBOSE names relations.
    rel: Rel,
    /// The planner's row count (None: never analyzed).
    rows: Option<i64>,
}

async fn table_info(tx: &Transaction<'_>, job: &JobSpec) -> Result<TableInfo> {
    let row = tx
        .query_one(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.reltuples::bigint
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = to_regclass($1)",
            &[&job.table.quoted()],
        )
        .await
        .map_err(|e| {
            db::error(
                e,
                format!("job {}: reading the table's catalog entry", job.name),
            )
        })?;
    Ok(TableInfo {
        oid: row.get(0),
        rel: Rel {
            schema: row.get(1),
            name: row.get(2),
        },
        rows: row.get::<_, Option<i64>>(3).filter(|n| *n >= 0),
    })
}

/// The first chunk's statement, executed inside savepoints, and the chunk's rows around it.
struct ChunkProbe<'a> {
    tx: &'a Transaction<'a>,
    job: &'a JobSpec,
    statement: &'a str,
    bounds: &'a [&'a (dyn ToSql + Sync)],
    /// The chunk's rows, as key text and row JSON.
    rows_sql: String,
    /// Rows of the job's table the transaction has written so far (the statement may target
    /// another table, or reach rows outside the chunk through a join or a trigger).
    written_sql: String,
}

impl ChunkProbe<'_> {
    fn fail(&self, what: &'static str) -> impl Fn(tokio_postgres::Error) -> Error + '_ {
        move |e| db::error(e, format!("job {}: {what}", self.job.name))
    }

    async fn snapshot(&self) -> Result<Rows> {
        let rows = self
            .tx
            .query(&self.rows_sql, self.bounds)
            .await
            .map_err(self.fail("reading the chunk's rows"))?;
        let mut out = Rows::new();
        for r in rows {
            let key: Vec<String> = r.get(0);
            let json: String = r.get(1);
            if let Ok(serde_json::Value::Object(m)) = serde_json::from_str(&json) {
                out.insert(key, m);
            }
        }
        Ok(out)
    }

    /// Rows affected and time taken; the inner error is the statement's own (rolled back to the
    /// savepoint), the outer one the savepoint's.
    async fn execute(&self) -> Result<std::result::Result<(u64, Duration), tokio_postgres::Error>> {
        let t = Instant::now();
        guarded(self.tx, self.tx.execute(self.statement, self.bounds))
            .await
            .map(|r| r.map(|n| (n, t.elapsed())))
    }

    async fn table_rows_written(&self) -> Result<i64> {
        self.tx
            .query_one(&self.written_sql, &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .map_err(self.fail("reading what the statement wrote"))
    }
}

/// Executes the statement twice on the first chunk and compares the chunk's rows before and
/// after each execution: how long it takes, whether it writes outside the chunk, whether a second
/// execution changes rows again, and what the changed columns cost.
#[allow(clippy::too_many_arguments)]
async fn probe_statement(
    tx: &Transaction<'_>,
    job: &JobSpec,
    keyset: &Keyset,
    table: &TableInfo,
    statement: &str,
    bounds: &[&(dyn ToSql + Sync)],
    written: &[Rel],
    estimates: &mut Estimates,
    findings: &mut Vec<Finding>,
) -> Result<()> {
    let probe = ChunkProbe {
        tx,
        job,
        statement,
        bounds,
        rows_sql: keyset.rows_between_sql(),
        written_sql: format!("SELECT {}", keyset.written_sql()),
    };
    let before = probe.snapshot().await?;
    let written_before = probe.table_rows_written().await?;
    let (_, took) = match probe.execute().await? {
        Ok(r) => r,
        Err(e) => {
            findings.push(Finding {
                severity: Severity::Error,
                code: "statement_fails",
                message: format!(
                    "the statement fails on the first chunk: {}",
                    db::describe(&e)
                ),
                fix: format!("{} (or fix `sql`)", db::advice(db::sqlstate(&e))),
            });
            return Ok(());
        }
    };
    estimates.sample_chunk_ms = Some(took.as_secs_f64() * 1000.0);
    let wrote = probe.table_rows_written().await? - written_before;
    let once = probe.snapshot().await?;
    let held = before.len().max(once.len()) as i64;
    if wrote > held {
        findings.push(writes_outside_chunk(job, held, wrote));
    }
    let again = match probe.execute().await? {
        Ok((n, _)) => n,
        Err(e) => {
            findings.push(Finding {
                severity: Severity::Error,
                code: "statement_fails",
                message: format!(
                    "the statement succeeds once but fails when run again on the same chunk: {}",
                    db::describe(&e)
                ),
                fix: "make the statement idempotent (a guard such as `AND new_col IS NULL`)".into(),
            });
            return Ok(());
        }
    };
    estimates.rows_reapplied = Some(again as i64);
    let twice = probe.snapshot().await?;

    let changed = changed_columns(&before, &once);
    let table_written = written.contains(&table.rel);
    findings.extend(not_idempotent(
        changed_rows(&once, &twice),
        again,
        table_written,
        written,
    ));
    super::costs::catalog_findings(tx, job, table.oid, &changed, table_written, findings).await
}

/// The statement wrote more rows of the job's table than the chunk holds.
fn writes_outside_chunk(job: &JobSpec, held: i64, wrote: i64) -> Finding {
    Finding {
        severity: Severity::Error,
        code: "writes_outside_chunk",
        message: format!(
            "executed on the first chunk ({held} rows of {}), the statement wrote {wrote} rows of it: it changes rows outside :start..:end, so every chunk would rewrite rows of other chunks (a run stops at the first chunk)",
            job.table
        ),
        fix: format!(
            "restrict every row it changes to the chunk, e.g. `WHERE {} BETWEEN :start AND :end`; a trigger on {} that writes other rows of it has the same effect",
            match job.key.as_slice() {
                [one] => one.clone(),
                many => format!("({})", many.join(", ")),
            },
            job.table
        ),
    }
}

/// A second execution on the same chunk that changed its rows again (or, for a statement that
/// writes other tables, affected rows again).
fn not_idempotent(
    rechanged: usize,
    again: u64,
    table_written: bool,
    written: &[Rel],
) -> Option<Finding> {
    if rechanged > 0 {
        Some(Finding {
            severity: Severity::Warning,
            code: "not_idempotent",
            message: format!(
                "executed twice on the first chunk, the statement changed {rechanged} of its rows again: a chunk applied twice (by hand, or by a tool without exactly-once checkpoints) corrupts data"
            ),
            fix: "compute the new value from other columns only, and guard it (e.g. `AND new_col IS DISTINCT FROM <value>`)".into(),
        })
    } else if !table_written && again > 0 {
        Some(Finding {
            severity: Severity::Warning,
            code: "not_idempotent",
            message: format!(
                "executed twice on the first chunk, the second execution affected {again} rows of {} again",
                written.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ),
            fix: "make a second execution a no-op (e.g. `ON CONFLICT DO NOTHING`, or a NOT EXISTS guard)".into(),
        })
    } else {
        None
    }
}
