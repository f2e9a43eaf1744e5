//! `backfill plan`: what a job will do, reviewed before it touches production. Everything happens
//! in one transaction that is always rolled back: the first chunk is found as a run would find it,
//! its statement is EXPLAINed, then executed twice (timed, and to see whether a second execution
//! changes rows again), and the rows of the chunk are compared before and after each execution.
//! The findings come from what PostgreSQL did, not from reading the SQL text.
//!
//! The probe holds the first chunk's row locks for as long as the two executions take (about
//! two chunks' time, under the job's lock_timeout and statement_timeout), then rolls back.
//!
//! `probe` runs the review in that transaction; `explain` reads EXPLAIN's JSON, `rows` compares
//! the chunk's snapshots, `costs` reads what changed columns cost, `sessions` reads other
//! sessions, `render` prints the plan. Nothing here commits, writes the engine's schema, or
//! builds a timeout `SET` of its own (`db::Timeouts` does).

mod costs;
pub mod explain;
mod probe;
mod render;
mod rows;
mod sessions;

use crate::db::Target;
use crate::error::{ErrorKind, Result};
use crate::job::JobSpec;
use crate::keyset::KeyValue;
use crate::state::{made_progress, next_run_sweeps};
use crate::store::Store;
use std::time::Duration;

pub use render::print_text;

/// Tables with at least this many rows (planner's estimate) should have a rate ceiling or a
/// health signal.
pub const LARGE_TABLE_ROWS: i64 = 1_000_000;

#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Longest the `verify` estimate may run before it is reported as unknown.
    pub verify_timeout: Duration,
    /// A transaction open longer than this is reported.
    pub long_transaction: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable identifier for scripts: `full_scan`, `writes_indexed_column`, `not_idempotent`,
    /// `row_triggers`, `foreign_keys`, `long_transaction`, `unthrottled_large_table`,
    /// `statement_fails`, `planner_prefers_full_scan`, `writes_outside_chunk`, `no_guard`,
    /// `changed_definition`, `not_ready`, `contract_applied`, `sessions_hidden`.
    pub code: &'static str,
    pub message: String,
    pub fix: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FirstChunk {
    pub start: KeyValue,
    pub end: KeyValue,
    pub keys: i64,
    /// The statement with the chunk's bounds as literals.
    pub sql: String,
    /// True when the run would resume after a saved cursor rather than start at the first key.
    pub resumes: bool,
    /// True when every key was processed and the job ended incomplete: the next run verifies,
    /// then sweeps from this chunk.
    pub sweep: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Estimates {
    /// The planner's row count for the table (None: never analyzed).
    pub table_rows: Option<i64>,
    /// What `verify` returned now (None: no verify, it failed, or it timed out).
    pub rows_to_do: Option<i64>,
    /// Why `rows_to_do` is unknown, when it is.
    pub rows_to_do_note: Option<String>,
    /// Chunks at the starting chunk size.
    pub chunks: Option<i64>,
    /// How long the first chunk's statement took (inside the rolled-back transaction).
    pub sample_chunk_ms: Option<f64>,
    /// Rows the statement's second execution on the first chunk affected: 0 when a guard
    /// (`AND new_col IS NULL`) makes applying it again a no-op, which a sweep relies on.
    pub rows_reapplied: Option<i64>,
    /// Expected duration of the run at the starting chunk size and the rate ceiling.
    pub expected_seconds: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub job: String,
    pub file: String,
    pub table: String,
    pub key: Vec<String>,
    pub index: String,
    /// How the key space is walked: `index` (the key's unique index) or `pages` (`key = "ctid"`).
    pub walk: &'static str,
    pub chunk_rows: u32,
    pub lock_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    /// The throttle as `key = value` lines.
    pub throttle: Vec<String>,
    /// What the job declares around its pass, and where its migrator stands now.
    pub phases: Vec<String>,
    pub first_chunk: Option<FirstChunk>,
    pub estimates: Estimates,
    pub findings: Vec<Finding>,
}

impl Plan {
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }
}

/// Connects, probes the job inside a transaction that is always rolled back, and reports.
pub async fn plan(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    opts: &PlanOptions,
) -> Result<Plan> {
    let mut client = target.connect().await?;
    let checkpoint = store.load(&client, &job.name).await?;
    // A pass that ended incomplete has no next chunk: the next run sweeps from the first key,
    // so that is the chunk to probe (whether the statement may be applied again is the question).
    let sweeps_next = checkpoint
        .as_ref()
        .is_some_and(|c| next_run_sweeps(c.state.recorded(), c.ranges.iter().all(|r| r.done)));
    let from = if sweeps_next {
        None
    } else {
        checkpoint.as_ref()
    };
    let mut plan = rolled_back(&mut client, job, from, opts).await?;
    if let Some(c) = plan.first_chunk.as_mut() {
        c.sweep = sweeps_next;
    }
    if let Some(c) = checkpoint
        .as_ref()
        .filter(|c| c.fingerprint != job.fingerprint && made_progress(c.rows_done, c.bound_taken))
    {
        plan.findings.push(Finding {
            severity: Severity::Warning,
            code: "changed_definition",
            message: format!(
                "the job's definition changed since progress was saved ({} rows done; fingerprint {} now, {} in the checkpoint): a run refuses it (exit 2) unless told to accept it",
                c.rows_done, job.fingerprint, c.fingerprint
            ),
            fix: format!(
                "if the change is only a guard (or is otherwise safe for the keys left), `backfill run {} --allow-changed-definition`; else `backfill reset {} --yes` and start over",
                job.name, job.name
            ),
        });
    }
    no_guard(job, &mut plan);
    phases(&client, job, &mut plan).await;
    Ok(plan)
}

/// The probe alone, on the table's first keys whatever the job's progress: what a sweep needs to
/// know before it applies the statement again to keys already done (`estimates.rows_reapplied`,
/// and the `not_idempotent`/`statement_fails` findings).
pub async fn probe_first_chunk(target: &Target, job: &JobSpec) -> Result<Plan> {
    let opts = PlanOptions {
        verify_timeout: Duration::from_secs(1),
        long_transaction: Duration::from_secs(3600),
    };
    rolled_back(&mut target.connect().await?, job, None, &opts).await
}

/// Runs the probe inside a transaction that is always rolled back.
async fn rolled_back(
    client: &mut tokio_postgres::Client,
    job: &JobSpec,
    checkpoint: Option<&crate::store::Checkpoint>,
    opts: &PlanOptions,
) -> Result<Plan> {
    let tx = client.transaction().await.map_err(|e| {
        crate::db::error(
            e,
            format!("job {}: starting the plan's transaction", job.name),
        )
    })?;
    let result = probe::run(&tx, job, checkpoint, opts).await;
    // Whatever happened, nothing the probe did may stay.
    let _ = tx.rollback().await;
    result.map_err(|e| match e.kind() {
        ErrorKind::Runtime => e.followed_by("the plan rolled back everything it did"),
        _ => e,
    })
}

/// Why applying the job's statement again to keys already done would be wrong, if it would — so
/// that a sweep (which walks every key again) must not run. A sweep is for statements with a
/// guard: the probe runs the statement twice on one chunk (rolled back), and the second
/// execution must affect no row at all — a statement without a guard would overwrite what the
/// application wrote since the pass.
pub fn unsafe_to_sweep(plan: &Plan) -> Option<String> {
    if let Some(f) = plan
        .findings
        .iter()
        .find(|f| f.code == "not_idempotent" || f.code == "statement_fails")
    {
        return Some(format!(
            "a sweep applies the statement again to every key, and {} — {}",
            f.message, f.fix
        ));
    }
    match plan.estimates.rows_reapplied {
        Some(0) => None,
        Some(n) => Some(format!(
            "a sweep applies the statement again to every key, and applied again to the first chunk it wrote {n} rows once more: without a guard (e.g. `AND status IS NULL`) a sweep would overwrite what the application wrote since the pass; add a guard, or fix the rows by hand"
        )),
        None => Some(
            "whether the statement is safe to apply twice could not be checked (no first chunk to probe)".into(),
        ),
    }
}

/// A statement without a guard makes `max_sweeps` void: said before the run, not after it.
fn no_guard(job: &JobSpec, plan: &mut Plan) {
    if job.verify.is_none() || job.max_sweeps == 0 {
        return;
    }
    let Some(n) = plan.estimates.rows_reapplied.filter(|n| *n > 0) else {
        return;
    };
    // A statement that changes rows again, or fails again, is reported as that already.
    if plan
        .findings
        .iter()
        .any(|f| f.code == "not_idempotent" || f.code == "statement_fails")
    {
        return;
    }
    plan.findings.push(Finding {
        severity: Severity::Warning,
        code: "no_guard",
        message: format!(
            "executed again on the first chunk, the statement wrote its {n} rows again: it has no guard that skips rows already done, so no run will sweep (max_sweeps = {} has no effect). Rows that code not yet filling the new column writes behind the cursor stay undone, and the run ends incomplete (exit 1) while verify counts them",
            job.max_sweeps
        ),
        fix: "add a guard, so that applying the statement again changes nothing: e.g. `AND new_col IS NULL` (or `IS DISTINCT FROM` the new value)".into(),
    });
}

/// The job's phases as lines, and a finding when it may not run yet or its contract step ran.
async fn phases(client: &tokio_postgres::Client, job: &JobSpec, plan: &mut Plan) {
    // Without a chunk to probe (nothing left to do) the plan cannot tell; the run checks anyway.
    let sweep_blocked = plan.first_chunk.is_some() && unsafe_to_sweep(plan).is_some();
    let lines = &mut plan.phases;
    if let Some(q) = &job.requires_sql {
        let q = q.split_whitespace().collect::<Vec<_>>().join(" ");
        lines.push(format!("requires_sql: {q}"));
    }
    // Each revision's history is read once, for its line and its finding.
    let expand = crate::migrator::revision(client, job, |m| &m.expand).await;
    let contract = crate::migrator::revision(client, job, |m| &m.contract).await;
    for (what, rev) in [("expand", &expand), ("contract", &contract)] {
        match rev {
            Ok(Some(r)) => lines.push(format!(
                "{what} {} {}: {}: {}",
                r.tool,
                r.id,
                if r.applied.applied {
                    "applied"
                } else {
                    "not applied"
                },
                r.applied.detail
            )),
            Ok(None) => {}
            Err(e) => lines.push(format!("{what}: unknown: {e}")),
        }
    }
    let not_ready = match crate::migrator::requires_unmet(client, job).await {
        Ok(Some(why)) => Some(why),
        Ok(None) => expand
            .as_ref()
            .ok()
            .and_then(|r| crate::migrator::expand_missing(r.as_ref())),
        Err(e) => {
            lines.push(format!("precondition could not be checked: {e}"));
            None
        }
    };
    if let Some(why) = not_ready {
        plan.findings.push(Finding {
            severity: Severity::Warning,
            code: "not_ready",
            message: format!("a run would exit 3 now: {why}"),
            fix: "apply the expand migration first, or run with --wait-for-expand".into(),
        });
    }
    if let Some(why) = contract
        .as_ref()
        .ok()
        .and_then(|r| crate::migrator::contract_done(r.as_ref()))
    {
        plan.findings.push(Finding {
            severity: Severity::Warning,
            code: "contract_applied",
            message: format!("{why}; a run of an unfinished job is refused"),
            fix:
                "check what the contract step removed; downgrade it if the backfill still needs it"
                    .into(),
        });
    }
    lines.push(match job.verify {
        Some(_) if job.max_sweeps == 0 => "verify; no sweep (max_sweeps = 0)".into(),
        Some(_) if sweep_blocked => {
            "verify; no sweep: the statement is not safe to apply again (see findings)".into()
        }
        Some(_) => format!(
            "verify, then up to {} sweeps while rows remain",
            job.max_sweeps
        ),
        None => "no verify query: no sweep, and the gate cannot re-check completion".into(),
    });
    if !job.finish_sql.is_empty() {
        lines.push(format!(
            "{} finishing steps after the job is done",
            job.finish_sql.len()
        ));
    }
    lines.push(match &job.revert {
        Some(crate::job::Revert::DownSql(_)) => "revert: down_sql".into(),
        Some(crate::job::Revert::Undo(cols)) => {
            format!("revert: undo keeps the old {}", cols.join(", "))
        }
        None => "revert: none declared (add down_sql or undo)".into(),
    });
}

fn throttle_lines(job: &JobSpec) -> Vec<String> {
    let t = &job.throttle;
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let mut v = vec![
        match t.target_chunk_time {
            Some(target) => format!(
                "target_chunk_time = {} (chunk size adapts within {}..{})",
                d(target),
                t.min_chunk_rows,
                t.max_chunk_rows
            ),
            None => "target_chunk_time = off (chunk size fixed)".into(),
        },
        match t.rows_per_second {
            Some(r) => format!("rows_per_second = {r}"),
            None => "rows_per_second = none (no rate ceiling)".into(),
        },
    ];
    if !t.pause.is_zero() {
        v.push(format!("pause = {}", d(t.pause)));
    }
    if t.nice_ratio > 0.0 {
        v.push(format!("nice_ratio = {}", t.nice_ratio));
    }
    if let Some(l) = t.max_replication_lag {
        v.push(format!("max_replication_lag = {}", d(l)));
    }
    if let Some(w) = t.max_wal_rate {
        v.push(format!("max_wal_rate = {w} bytes/s"));
    }
    if t.hold_during_autovacuum {
        v.push("hold_during_autovacuum = true".into());
    }
    if let Some(q) = &t.throttle_sql {
        v.push(format!("throttle_sql = {q}"));
    }
    v
}

/// True when the job has something that slows it down when the database is busy.
fn has_brakes(job: &JobSpec) -> bool {
    let t = &job.throttle;
    t.rows_per_second.is_some()
        || t.max_replication_lag.is_some()
        || t.max_wal_rate.is_some()
        || t.throttle_sql.is_some()
        || t.hold_during_autovacuum
}
