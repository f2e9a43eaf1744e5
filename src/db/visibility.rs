//! Whether this session's role can see what other roles' sessions are doing.
//!
//! Without `pg_read_all_stats` (which `pg_monitor` includes), PostgreSQL shows a role only the
//! pid, user, database and application name of other roles' sessions: `wait_event_type`,
//! `xact_start`, `state`, `query` read as NULL in `pg_stat_activity`, and `relid` as NULL in
//! `pg_stat_progress_vacuum`. A check that reads those columns then sees "nothing happening"
//! where something is: the lock-wait yield would not see an application session queued behind a
//! chunk, `hold_during_autovacuum` would not see the vacuum, `plan` would not see a long
//! transaction. So the callers ask here first and, when the role is blind, say so instead.
//!
//! The question mirrors the server's own rule: a role sees another role's details when it has
//! the privileges of `pg_read_all_stats` or of that role (`pg_has_role(…, 'USAGE')`, true for a
//! superuser). Only the first answers for *every* role, so only it counts.

/// The grant that lets a role see other roles' sessions.
pub const STATS_ROLE: &str = "pg_read_all_stats";

/// What the session's role may see of other roles' sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsAccess {
    /// `current_user`.
    pub role: String,
    /// True when it sees every role's session details (`pg_read_all_stats`, or superuser).
    pub sees_all: bool,
}

impl StatsAccess {
    /// Asks the server.
    pub async fn read(
        client: &impl tokio_postgres::GenericClient,
    ) -> Result<StatsAccess, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT current_user::text, pg_has_role(current_user, $1::name, 'USAGE')",
                &[&STATS_ROLE],
            )
            .await?;
        Ok(StatsAccess {
            role: row.get(0),
            sees_all: row.get(1),
        })
    }

    /// What is missing and how to grant it, e.g. for a hold reason or a plan finding.
    pub fn missing(&self) -> String {
        let (role, quoted) = (&self.role, crate::sql::quote_ident(&self.role));
        format!(
            "role {role} lacks {STATS_ROLE}: grant it with `GRANT {STATS_ROLE} TO {quoted}` (or `backfill init --grant-to {role}` as a superuser or a role with ADMIN on {STATS_ROLE})"
        )
    }
}
