//! The engine's own tables (in `--schema`, default `backfill`): one checkpoint row per job (its
//! definition's fingerprint, key range, state), the job's key *ranges* (each with its own cursor
//! and owner, see `ranges.rs`), one history row per run, and the leases that keep runners apart.
//!
//! A *run* is one `backfill run` process; it may run several workers, and several runs (on one
//! host or many) may work on a job at once. A run is alive while its *lease session* (a dedicated
//! connection held for the whole run) is still in `pg_stat_activity` and its heartbeat is fresher
//! than the lease timeout. A killed runner's session disappears at once, so its ranges are taken
//! over within moments; a hung runner whose session stays open loses them after the timeout.
//! Every chunk locks its range row and checks the owner inside its own transaction, so even a
//! runner that lost its lease cannot commit a chunk twice.
//!
//! Every statement on the engine's schema is here, one submodule per concern, except the three a
//! chunk sends on its range's row (lock, advance, range done): those are the exactly-once rule
//! and live with the chunk's transaction in `executor::chunk`. Here: `schema`
//! (versioned migrations, grants, the SQL gate), `checkpoint` (reading a job's checkpoint, and
//! the one completeness decision), `join` (a run joining a job), `runs` (a run's history row
//! and its end), `lease` (heartbeat), `ranges` (key ranges: taking, splitting, releasing), `phases`
//! (phase, sweeps, revert bookkeeping, the job's locks), `control` (pause, cancel, set) and
//! `failures` (poison keys). States, phases and outcomes are `crate::state` enums: outside the
//! fixed texts of its migrations, this module never spells them. It touches no application
//! table (the undo table a finished revert empties lives in the engine's schema).

mod checkpoint;
mod control;
mod failures;
mod join;
mod lease;
mod phases;
mod ranges;
mod runs;
mod schema;

pub use checkpoint::{Checkpoint, Incomplete, Owner};

pub use control::{
    ControlAction, ControlChange, ControlEvent, Controls, LiveRunFlags, ThrottleFlags,
};
pub use failures::{FailedKey, Poison};
pub use join::{Claim, Runner};
pub use lease::{LeaseState, RECENT_RATE_WINDOW};
pub use phases::{revert_name, Sweep};
pub use ranges::{Acquired, RangeInfo, RangeLease, Splitter};
pub use runs::{RunRecord, TableRunner};
pub use schema::{
    gate_grants, gate_privileges_missing, grants, installed_version, migrate, migrate_up_to,
    LATEST as SCHEMA_VERSION,
};

use crate::db;
use crate::error::{Error, Result};
use crate::keyset::KeyValue;
use crate::sql::quote_ident;
use std::time::Duration;
use tokio_postgres::GenericClient;

/// A hung runner (session open, no heartbeat) loses its ranges after this long.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a run proves it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

pub(crate) fn ts(col: &str) -> String {
    format!("to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
}

#[derive(Debug, Clone)]
pub struct Store {
    schema: String,
    q: String,
}

impl Store {
    pub fn new(schema: &str) -> Store {
        Store {
            schema: schema.to_string(),
            q: quote_ident(schema),
        }
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The engine's schema, quoted for SQL.
    pub fn quoted_schema(&self) -> &str {
        &self.q
    }

    /// Makes sure the engine's schema is at the current version, creating or upgrading it when
    /// this role may; otherwise says to run `backfill init`.
    pub async fn ensure(&self, client: &mut tokio_postgres::Client) -> Result<()> {
        match installed_version(&*client, &self.schema).await? {
            Some(v) if v == SCHEMA_VERSION => Ok(()),
            _ => migrate(client, &self.schema).await.map(|_| ()),
        }
    }

    /// False when the engine's schema does not exist yet (nothing ever ran); an error when it is
    /// older than this engine reads and only `init` (or a run) may upgrade it.
    async fn readable(&self, client: &impl GenericClient) -> Result<bool> {
        match installed_version(client, &self.schema).await? {
            None => Ok(false),
            Some(v) if v < SCHEMA_VERSION => Err(Error::Runtime(format!(
                "the engine's schema `{}` is at version {v}; this backfill needs version {SCHEMA_VERSION}: run `backfill init` (or any `backfill run`) to upgrade it",
                self.schema
            ))),
            Some(_) => Ok(true),
        }
    }

    /// Whether the run row aliased `r` is alive, as a SQL expression.
    fn run_alive_sql(r: &str) -> String {
        format!(
            "({r}.outcome IS NULL
              AND {r}.heartbeat_at > now() - make_interval(secs => {lease})
              AND EXISTS (SELECT 1 FROM pg_stat_activity a
                           WHERE a.pid = {r}.backend_pid
                             AND (a.backend_start IS NULL OR a.backend_start = {r}.backend_start)))",
            lease = LEASE_TIMEOUT.as_secs()
        )
    }

    /// The job's key range as fixed by the first run: (taken, upper bound, row estimate), with
    /// the checkpoint row locked until the caller's transaction ends.
    pub async fn lock_bound(
        &self,
        tx: &impl GenericClient,
        job: &str,
    ) -> Result<(bool, Option<KeyValue>, Option<i64>)> {
        let row = tx
            .query_one(
                &format!(
                    "SELECT bound_taken, upper_bound, total_estimate FROM {s}.checkpoints WHERE job = $1 FOR UPDATE",
                    s = self.q
                ),
                &[&job],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: reading the key range")))?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }

    /// Records the key range the job covers: keys up to `upper` (None: the table was empty), as
    /// its first range.
    pub async fn set_bound(
        &self,
        tx: &impl GenericClient,
        job: &str,
        upper: Option<&KeyValue>,
        total_estimate: Option<i64>,
        total_exact: bool,
    ) -> Result<()> {
        let err = |e| db::error(e, format!("job {job}: saving the key range"));
        tx.execute(
            &format!(
                "UPDATE {s}.checkpoints SET upper_bound = $2, total_estimate = $3, total_exact = $4,
                        bound_taken = true, updated_at = now()
                  WHERE job = $1",
                s = self.q
            ),
            &[&job, &upper, &total_estimate, &total_exact],
        )
        .await
        .map_err(err)?;
        if let Some(upper) = upper {
            tx.execute(
                &format!(
                    "INSERT INTO {s}.ranges (job, id, upper_bound, estimate) VALUES ($1, 0, $2, $3)",
                    s = self.q
                ),
                &[&job, upper, &total_estimate],
            )
            .await
            .map_err(err)?;
        }
        Ok(())
    }

    /// Records a gate-time verify result.
    pub async fn record_verify(
        &self,
        client: &impl GenericClient,
        job: &str,
        remaining: i64,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {s}.checkpoints SET verify_remaining = $2, verified_at = now() WHERE job = $1",
                    s = self.q
                ),
                &[&job, &remaining],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: recording the verify result")))?;
        Ok(())
    }

    /// Forgets a job's progress and ranges (its history rows stay). Refuses while a run is alive.
    pub async fn reset(
        &self,
        client: &mut tokio_postgres::Client,
        job: &str,
    ) -> Result<Option<Checkpoint>> {
        let err = |e| db::error(e, format!("job {job}: resetting"));
        let tx = client.transaction().await.map_err(err)?;
        // Waits for a migration that passed the SQL gate to end (it holds this lock shared).
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&self.job_lock_key(job)],
        )
        .await
        .map_err(err)?;
        let row = tx
            .query_opt(
                &format!("{} WHERE c.job = $1 FOR UPDATE OF c", self.select_sql()),
                &[&job],
            )
            .await
            .map_err(err)?;
        let Some(row) = row else { return Ok(None) };
        let mut checkpoint = Self::from_row(&row)?;
        self.detail(&tx, &mut checkpoint).await?;
        if let Some(owner) = checkpoint.runners.iter().find(|o| o.alive) {
            return Err(Error::NotSatisfied(format!(
                "job {job} is running on host {} (pid {}); stop it before resetting",
                owner.host, owner.pid
            )));
        }
        tx.execute(
            &format!("DELETE FROM {s}.checkpoints WHERE job = $1", s = self.q),
            &[&job],
        )
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(Some(checkpoint))
    }
}
