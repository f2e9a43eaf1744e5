//! Other sessions, as the plan sees them: transactions open long enough to hold back vacuum of
//! what the backfill leaves behind, and whether this role may see other roles' sessions at all.
//! Owns only these reads of `pg_stat_activity` and their findings; it never touches the job's
//! table.

use super::{Finding, PlanOptions, Severity};
use crate::db;
use crate::error::Result;
use crate::job::JobSpec;
use std::time::Duration;
use tokio_postgres::Transaction;

/// Transactions open for longer than the threshold hold back vacuum of every row version the
/// backfill leaves behind. A role without `pg_read_all_stats` sees no `xact_start` for other
/// roles' sessions: that is reported as such, never as "no long transaction".
pub(super) async fn long_transactions(
    tx: &Transaction<'_>,
    job: &JobSpec,
    opts: &PlanOptions,
    findings: &mut Vec<Finding>,
) -> Result<()> {
    let access = db::StatsAccess::read(tx)
        .await
        .map_err(|e| db::error(e, "asking whether this role sees other roles' sessions"))?;
    if !access.sees_all {
        // Their transaction ids and snapshots stay visible, only the start time is hidden.
        let hidden: i64 = tx
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE xact_start IS NULL AND pid <> pg_backend_pid()
                    AND coalesce(datname = current_database(), true)
                    AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)",
                &[],
            )
            .await
            .map_err(|e| db::error(e, "reading pg_stat_activity"))?
            .get(0);
        let run = match job.throttle.on_signal_error {
            crate::job::OnSignalError::Hold => "a run would hold until it is granted (on_signal_error = \"hold\"): its lock-wait yield cannot see application sessions queued behind a chunk".to_string(),
            crate::job::OnSignalError::Ignore => "a run would go on blind (on_signal_error = \"ignore\"): application sessions queued behind a chunk would not make it yield".to_string(),
        };
        findings.push(Finding {
            severity: Severity::Warning,
            code: "sessions_hidden",
            message: format!(
                "role {} cannot see other roles' sessions: how long their transactions have been open is hidden ({hidden} of them hold a transaction or snapshot in this database now), so a long transaction cannot be ruled out; {run}",
                access.role
            ),
            fix: access.missing(),
        });
    }
    let rows = tx
        .query(
            "SELECT pid, coalesce(usename::text, '?'), coalesce(application_name, ''), coalesce(state, '?'),
                    extract(epoch FROM now() - xact_start)::float8
               FROM pg_stat_activity
              WHERE xact_start < now() - make_interval(secs => $1)
                AND pid <> pg_backend_pid()
                -- other databases' transactions do not hold back this database's vacuum
                AND coalesce(datname = current_database(), true)
                AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
              ORDER BY xact_start",
            &[&opts.long_transaction.as_secs_f64()],
        )
        .await
        .map_err(|e| db::error(e, "reading pg_stat_activity"))?;
    for r in rows {
        let (pid, user, app, state, age): (i32, String, String, String, f64) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        findings.push(Finding {
            severity: Severity::Warning,
            code: "long_transaction",
            message: format!(
                "a transaction has been open for {} (pid {pid}, user {user}, application '{app}', {state}): until it ends, vacuum cannot remove any row version the backfill replaces",
                humantime::format_duration(Duration::from_secs(age as u64))
            ),
            fix: format!("end it (or `SELECT pg_terminate_backend({pid})` if it is abandoned) before a long run"),
        });
    }
    Ok(())
}
