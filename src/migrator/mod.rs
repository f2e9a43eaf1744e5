//! Coordination with the schema migrator: what must hold before a job may run (its
//! `requires_sql`, its expand revision applied, its contract revision not yet applied), and the
//! gate — a job is complete only when its runs finished every key, its finishing steps succeeded
//! and its `verify` query returns 0 *when the gate asks*, so a contract migration gated on it
//! cannot drop what the application still needs. The same gate exists in SQL, for any migrator:
//! `SELECT backfill.assert_done('job')` raises unless the job is complete (schema v6).

pub mod alembic;
pub mod history;

use crate::db::{self, Limit, Timeouts};
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::state::{CompletionGap, JobState, ShownState};
use crate::store::{Checkpoint, Incomplete, Store};
use std::time::Duration;

/// Checks, offline, that the job's expand and contract revisions are written as its migrator
/// writes them; the error names the job file, the line and the key. The revision files and the
/// history are read only when a command asks whether a revision is applied.
pub fn check_revisions(job: &JobSpec) -> Result<()> {
    let Some(m) = &job.migration else {
        return Ok(());
    };
    let history = history::History::of(m);
    for (key, revision) in [("expand", &m.expand), ("contract", &m.contract)] {
        if let Some(r) = revision {
            history
                .check_revision(r)
                .map_err(|e| Error::Usage(format!("{}: {e}", job.file_key(key))))?;
        }
    }
    Ok(())
}

/// Why the job may not run yet (`requires_sql` false, expand not applied), or None when it may.
pub async fn not_ready(client: &tokio_postgres::Client, job: &JobSpec) -> Result<Option<String>> {
    if let Some(why) = requires_unmet(client, job).await? {
        return Ok(Some(why));
    }
    let expand = revision(client, job, |m| &m.expand).await?;
    Ok(expand_missing(expand.as_ref()))
}

/// Why the job's `requires_sql` does not hold yet, or None when it does (or there is none).
pub async fn requires_unmet(
    client: &tokio_postgres::Client,
    job: &JobSpec,
) -> Result<Option<String>> {
    let Some(q) = &job.requires_sql else {
        return Ok(None);
    };
    let ok: Option<bool> = match client
        .query_one(&format!("SELECT ({q})::boolean"), &[])
        .await
    {
        Ok(row) => row.get(0),
        // What the expand step creates is not there yet: not ready, rather than broken.
        Err(e)
            if matches!(
                db::sqlstate(&e),
                Some("42P01" | "42703" | "42883" | "3F000")
            ) =>
        {
            return Ok(Some(format!(
                "its requires_sql cannot run yet ({}): {q}",
                db::describe(&e)
            )))
        }
        Err(e) => {
            return Err(Error::Runtime(format!(
                "job {}: the requires_sql query failed: {}; check `requires_sql` in {}",
                job.name,
                db::describe(&e),
                job.path.display()
            )))
        }
    };
    Ok((ok != Some(true)).then(|| {
        format!(
            "its requires_sql returned {} (it must return true before the backfill may run): {q}",
            ok.map(|b| b.to_string()).unwrap_or_else(|| "NULL".into())
        )
    }))
}

/// When the job's contract migration is already applied: what the history says.
pub async fn contract_applied(
    client: &tokio_postgres::Client,
    job: &JobSpec,
) -> Result<Option<String>> {
    let contract = revision(client, job, |m| &m.contract).await?;
    Ok(contract_done(contract.as_ref()))
}

/// One of the job's declared revisions and what the migrator's history says of it.
pub struct Revision {
    pub id: String,
    pub tool: &'static str,
    pub applied: history::Applied,
}

/// Reads the history for one of the job's declared revisions (None when it declares none).
pub async fn revision(
    client: &tokio_postgres::Client,
    job: &JobSpec,
    which: impl Fn(&crate::job::MigrationSpec) -> &Option<String>,
) -> Result<Option<Revision>> {
    let Some(m) = &job.migration else {
        return Ok(None);
    };
    let Some(id) = which(m) else {
        return Ok(None);
    };
    let applied = history::History::of(m).is_applied(client, id).await?;
    Ok(Some(Revision {
        id: id.clone(),
        tool: m.tool.name(),
        applied,
    }))
}

/// Why the run must wait, when the expand revision is not applied.
pub fn expand_missing(expand: Option<&Revision>) -> Option<String> {
    expand.filter(|r| !r.applied.applied).map(|r| {
        format!(
            "its expand migration {} ({}) is not applied yet: {}",
            r.id, r.tool, r.applied.detail
        )
    })
}

/// What the history says, when the contract revision is already applied.
pub fn contract_done(contract: Option<&Revision>) -> Option<String> {
    contract.filter(|r| r.applied.applied).map(|r| {
        format!(
            "its contract migration {} ({}) is already applied: {}",
            r.id, r.tool, r.applied.detail
        )
    })
}

/// Runs the job's `verify` query (under a statement timeout) and returns its count.
pub async fn verify(
    client: &tokio_postgres::Client,
    job: &JobSpec,
    timeout: Duration,
) -> Result<i64> {
    let Some(q) = &job.verify else {
        return Err(Error::Usage(format!(
            "job {} has no `verify` query",
            job.name
        )));
    };
    let name = &job.name;
    let err = |e: tokio_postgres::Error| {
        let why = if db::sqlstate(&e) == Some("57014") {
            format!(
                "it did not finish within {}s (raise --verify-timeout)",
                timeout.as_secs()
            )
        } else {
            db::describe(&e)
        };
        Error::Runtime(format!(
            "job {name}: the verify query failed: {why}; check `verify` in {}",
            job.path.display()
        ))
    };
    client
        .batch_execute(&format!(
            "BEGIN READ ONLY; {}",
            Timeouts {
                statement: Some(Limit::Within(timeout)),
                ..Timeouts::default()
            }
            .set_local()
        ))
        .await
        .map_err(err)?;
    let result = client
        .query_one(&format!("SELECT ({q})::bigint"), &[])
        .await;
    let _ = client.batch_execute("ROLLBACK").await;
    let n: Option<i64> = result.map_err(err)?.get(0);
    n.ok_or_else(|| {
        Error::Usage(format!(
            "job {name}: the verify query returned NULL; it must return one number, the rows still to do (e.g. SELECT count(*) FROM … WHERE new_col IS NULL)"
        ))
    })
}

/// Why a job that is not done is not, as the gate says it.
fn not_done_detail(c: &Checkpoint) -> String {
    match c.state {
        ShownState::Recorded(JobState::Running) => {
            format!("it is running ({} rows done)", c.rows_done)
        }
        ShownState::Recorded(JobState::Reverted) => {
            "it was reverted (`backfill revert`)".to_string()
        }
        ShownState::Recorded(JobState::Incomplete) => format!(
            "verify counted {} rows still to do when the run ended",
            c.verify_remaining.unwrap_or(-1)
        ),
        s => format!(
            "its state is {s} ({} rows done{})",
            c.rows_done,
            c.last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        ),
    }
}

/// What the gate found.
#[derive(Debug, serde::Serialize)]
pub struct GateReport {
    pub job: String,
    pub passed: bool,
    pub state: String,
    pub verify_remaining: Option<i64>,
    pub reason: String,
}

/// Passes only when the job is done and its verify query returns 0 now.
pub async fn gate(
    client: &mut tokio_postgres::Client,
    store: &Store,
    job: &JobSpec,
    timeout: Duration,
) -> Result<GateReport> {
    let name = &job.name;
    check_gate_privileges(client, store, name).await?;
    let (checkpoint, incomplete) = read_completion(client, store, job).await?;
    let state = checkpoint
        .as_ref()
        .map(|c| c.state.to_string())
        .unwrap_or_else(|| JobState::New.to_string());
    let fail = |reason: String, remaining| GateReport {
        job: name.clone(),
        passed: false,
        state: state.clone(),
        verify_remaining: remaining,
        reason,
    };
    let Some(c) = checkpoint else {
        return Ok(fail(
            format!("job {name} has never run: run `backfill run {name}` first"),
            None,
        ));
    };
    if c.fingerprint != job.fingerprint {
        return Ok(fail(
            format!("job {name} was completed under a different definition than {} now holds (fingerprint {} vs {}); run it again with the current definition", job.path.display(), c.fingerprint, job.fingerprint),
            None,
        ));
    }
    match incomplete.map(|i| (i.gap, i)) {
        None => {}
        Some((CompletionGap::NeverRan, _)) => {
            return Ok(fail(
                format!("job {name} has never run: run `backfill run {name}` first"),
                None,
            ))
        }
        Some((CompletionGap::NotDone, _)) => {
            return Ok(fail(
                format!(
                    "job {name} is not complete: {}; run `backfill run {name}` to finish it",
                    not_done_detail(&c)
                ),
                None,
            ));
        }
        Some((CompletionGap::FailedKeys, i)) => {
            let n = i.failed_keys;
            return Ok(fail(
                format!("job {name} skipped {n} keys whose rows made its statement fail; `backfill failures {name}` lists them, `backfill retry-failures {name}` retries them once fixed"),
                None,
            ));
        }
        Some((CompletionGap::FinishingSteps, i)) => {
            let (done, declared) = (i.steps_done, i.steps_declared);
            return Ok(fail(
                format!("job {name}: {done} of its {declared} finishing steps succeeded; `backfill run {name}` runs the rest (`backfill status {name}` shows the last error)"),
                None,
            ));
        }
    }
    if job.verify.is_none() {
        return Ok(GateReport {
            job: name.clone(),
            passed: true,
            state: c.state.to_string(),
            verify_remaining: None,
            reason: format!("job {name} is complete ({} rows); it has no verify query, so completion was not re-checked", c.rows_done),
        });
    }
    let remaining = verify(client, job, timeout).await?;
    store.record_verify(client, name, remaining).await?;
    if remaining > 0 {
        return Ok(fail(
            format!("job {name} finished its pass, but verify now counts {remaining} rows still to do (written after the cursor passed them?); reset and run again, or fix the application's writes"),
            Some(remaining),
        ));
    }
    Ok(GateReport {
        job: name.clone(),
        passed: true,
        state: c.state.to_string(),
        verify_remaining: Some(0),
        reason: format!("job {name} is complete and verified: verify returned 0 just now"),
    })
}

/// The job's checkpoint and what keeps it from being complete (its verify aside), read in one
/// read-only REPEATABLE READ transaction: both from one snapshot, so the reason the gate gives
/// cannot contradict its verdict when the job changes in between. Whether it is complete is the
/// one decision the SQL gate takes too (`completion_gap`).
async fn read_completion(
    client: &mut tokio_postgres::Client,
    store: &Store,
    job: &JobSpec,
) -> Result<(Option<Checkpoint>, Option<Incomplete>)> {
    let name = &job.name;
    let err = |e| db::error(e, format!("job {name}: checking that it is complete"));
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(err)?;
    let checkpoint = store.load(&tx, name).await?;
    let incomplete = match &checkpoint {
        // Never run: the schema may not even exist; the gate says so without asking.
        None => None,
        Some(_) => {
            let declared = job.finish_sql.len() as i32;
            store.completion_gap(&tx, name, Some(declared)).await?
        }
    };
    tx.commit().await.map_err(err)?;
    Ok((checkpoint, incomplete))
}

/// Fails unless the role may read the engine's schema as the gate does.
async fn check_gate_privileges(
    client: &tokio_postgres::Client,
    store: &Store,
    name: &str,
) -> Result<()> {
    let missing = crate::store::gate_privileges_missing(client, store.schema()).await?;
    if !missing.is_empty() {
        let role: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .map_err(|e| db::error(e, "reading the current role"))?
            .get(0);
        return Err(Error::Runtime(format!(
            "job {name}: role {role} may not read the engine's schema as the gate does (missing: {}); run `backfill init --grant-gate-to {role}` once as the schema's owner",
            missing.join(", ")
        )));
    }
    Ok(())
}
