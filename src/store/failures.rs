//! Poison keys: keys whose row made the job's statement fail with a data error. With
//! `on_error = "skip"` a run records them here and goes on; `retry-failures` re-runs just those
//! keys; the gate fails while any is unresolved.
//! Owns the `failures` table only; a key's cursor move past a skipped key is the chunk's
//! (`executor::chunk`).

use super::Store;
use crate::db;
use crate::error::Result;
use crate::keyset::KeyValue;
use tokio_postgres::GenericClient;

#[derive(Debug, Clone, serde::Serialize)]
pub struct FailedKey {
    pub id: i64,
    pub key: KeyValue,
    pub sqlstate: Option<String>,
    pub message: String,
    pub attempts: i32,
    pub first_seen: String,
    pub last_seen: String,
    pub resolved_at: Option<String>,
}

/// A data error at one key.
pub struct Poison<'a> {
    pub key: &'a KeyValue,
    pub sqlstate: Option<&'a str>,
    pub message: &'a str,
}

impl Store {
    /// Records (or re-records) a failing key as unresolved. True when it was not already
    /// unresolved (the job has one failing key more).
    pub async fn record_failure(
        &self,
        client: &impl GenericClient,
        job: &str,
        run_id: Option<i64>,
        poison: &Poison<'_>,
    ) -> Result<bool, tokio_postgres::Error> {
        let row = client
            .query_one(
                &format!(
                    "WITH failing AS (SELECT 1 FROM {s}.failures WHERE job = $1 AND key = $2 AND resolved_at IS NULL)
                     INSERT INTO {s}.failures (job, key, sqlstate, message, run_id) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (job, key) DO UPDATE SET sqlstate = EXCLUDED.sqlstate, message = EXCLUDED.message,
                         run_id = EXCLUDED.run_id, attempts = {s}.failures.attempts + 1,
                         last_seen = now(), resolved_at = NULL
                     RETURNING NOT EXISTS (SELECT 1 FROM failing)",
                    s = self.q
                ),
                &[&job, poison.key, &poison.sqlstate, &poison.message, &run_id],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The job's failing keys (unresolved only, unless `all`), oldest first.
    pub async fn failures(
        &self,
        client: &impl GenericClient,
        job: &str,
        all: bool,
    ) -> Result<Vec<FailedKey>> {
        if !self.readable(client).await? {
            return Ok(Vec::new());
        }
        let rows = client
            .query(
                &format!(
                    "SELECT id, key, sqlstate, message, attempts, {first}, {last}, {resolved}
                       FROM {s}.failures WHERE job = $1 AND ($2 OR resolved_at IS NULL) ORDER BY id",
                    first = super::ts("first_seen"),
                    last = super::ts("last_seen"),
                    resolved = super::ts("resolved_at"),
                    s = self.q
                ),
                &[&job, &all],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: reading its failed keys")))?;
        Ok(rows
            .iter()
            .map(|r| FailedKey {
                id: r.get(0),
                key: r.get(1),
                sqlstate: r.get(2),
                message: r.get(3),
                attempts: r.get(4),
                first_seen: r.get(5),
                last_seen: r.get(6),
                resolved_at: r.get(7),
            })
            .collect())
    }

    /// How many of the job's failing keys are unresolved (0 before the schema exists).
    pub async fn failing_keys(&self, client: &impl GenericClient, job: &str) -> Result<i64> {
        if !self.readable(client).await? {
            return Ok(0);
        }
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {s}.failures WHERE job = $1 AND resolved_at IS NULL",
                    s = self.q
                ),
                &[&job],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: counting its failing keys")))?;
        Ok(row.get(0))
    }

    /// Locks one unresolved failure for a retry (skipping one another retrier holds).
    pub async fn lock_failure(
        &self,
        tx: &impl GenericClient,
        id: i64,
    ) -> Result<bool, tokio_postgres::Error> {
        let row = tx
            .query_opt(
                &format!(
                    "SELECT 1 FROM {s}.failures WHERE id = $1 AND resolved_at IS NULL FOR UPDATE SKIP LOCKED",
                    s = self.q
                ),
                &[&id],
            )
            .await?;
        Ok(row.is_some())
    }

    pub async fn resolve_failure(
        &self,
        tx: &impl GenericClient,
        id: i64,
    ) -> Result<(), tokio_postgres::Error> {
        tx.execute(
            &format!(
                "UPDATE {s}.failures SET resolved_at = now(), last_seen = now() WHERE id = $1",
                s = self.q
            ),
            &[&id],
        )
        .await?;
        Ok(())
    }
}
