//! Live control of a running job from any host, through the engine's schema: pause, resume,
//! cancel, and new throttle values. The running process reads its row before its next chunk and
//! writes back what it is doing (chunk size, hold reason) for `status`.
//! Owns the control columns of a job's checkpoint row; never its state, ranges or runs.

use super::Store;
use crate::db;
use crate::error::Result;
use std::time::Duration;
use tokio_postgres::GenericClient;

/// What an operator asked of a job (`backfill pause|resume|cancel|set`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Controls {
    pub paused: bool,
    pub cancel: bool,
    pub rows_per_second: Option<u32>,
    #[serde(rename = "target_chunk_time_ms", serialize_with = "as_millis")]
    pub target_chunk_time: Option<Duration>,
    #[serde(rename = "pause_ms", serialize_with = "as_millis")]
    pub pause: Option<Duration>,
    /// Live runs of the job (processes): a rate ceiling is shared evenly among them.
    #[serde(skip)]
    pub live_runs: u32,
}

fn r_bool(row: &tokio_postgres::Row, i: usize) -> bool {
    row.get::<_, Option<bool>>(i).unwrap_or(false)
}

fn as_millis<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_millis() as u64)),
        None => s.serialize_none(),
    }
}

/// A change to a job's controls; None leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ControlChange {
    pub paused: Option<bool>,
    pub cancel: Option<bool>,
    /// Some(None) clears an override.
    pub rows_per_second: Option<Option<u32>>,
    pub target_chunk_time: Option<Option<Duration>>,
    pub pause: Option<Option<Duration>>,
}

impl Store {
    pub async fn controls(
        &self,
        client: &impl GenericClient,
        job: &str,
    ) -> Result<Controls, tokio_postgres::Error> {
        let row = client
            .query_one(
                &format!(
                    "SELECT c.paused, c.cancel, c.rows_per_second, c.target_chunk_time_ms, c.pause_ms,
                            (SELECT count(*)::int FROM {s}.runs r
                              WHERE r.job = $1 AND {alive})
                       FROM (SELECT 1) one LEFT JOIN {s}.controls c ON c.job = $1",
                    s = self.q,
                    alive = Store::run_alive_sql("r")
                ),
                &[&job],
            )
            .await?;
        Ok(Controls {
            paused: r_bool(&row, 0),
            cancel: r_bool(&row, 1),
            rows_per_second: row.get::<_, Option<i64>>(2).map(|n| n as u32),
            target_chunk_time: row
                .get::<_, Option<i64>>(3)
                .map(|ms| Duration::from_millis(ms as u64)),
            pause: row
                .get::<_, Option<i64>>(4)
                .map(|ms| Duration::from_millis(ms as u64)),
            live_runs: row.get::<_, i32>(5).max(0) as u32,
        })
    }

    /// The job's controls for `status`: defaults when the engine's schema is not installed yet.
    pub async fn controls_for_status(
        &self,
        client: &impl GenericClient,
        job: &str,
    ) -> Result<Controls> {
        if !self.readable(client).await? {
            return Ok(Controls::default());
        }
        self.controls(client, job)
            .await
            .map_err(|e| db::error(e, format!("job {job}: reading its controls")))
    }

    pub async fn change_controls(
        &self,
        client: &impl GenericClient,
        job: &str,
        c: &ControlChange,
    ) -> Result<Controls> {
        let ms = |d: Option<Option<Duration>>| d.map(|o| o.map(|d| d.as_millis() as i64));
        let (set_rate, rate) = (
            c.rows_per_second.is_some(),
            c.rows_per_second.flatten().map(i64::from),
        );
        let (set_target, target) = (
            c.target_chunk_time.is_some(),
            ms(c.target_chunk_time).flatten(),
        );
        let (set_pause, pause) = (c.pause.is_some(), ms(c.pause).flatten());
        client
            .execute(
                &format!(
                    "INSERT INTO {s}.controls AS c (job, paused, cancel, rows_per_second, target_chunk_time_ms, pause_ms)
                     VALUES ($1, coalesce($2, false), coalesce($3, false), $5, $7, $9)
                     ON CONFLICT (job) DO UPDATE SET
                         paused = coalesce($2, c.paused), cancel = coalesce($3, c.cancel),
                         rows_per_second = CASE WHEN $4 THEN $5 ELSE c.rows_per_second END,
                         target_chunk_time_ms = CASE WHEN $6 THEN $7 ELSE c.target_chunk_time_ms END,
                         pause_ms = CASE WHEN $8 THEN $9 ELSE c.pause_ms END,
                         updated_at = now()",
                    s = self.q
                ),
                &[&job, &c.paused, &c.cancel, &set_rate, &rate, &set_target, &target, &set_pause, &pause],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: saving the control change")))?;
        self.controls(client, job)
            .await
            .map_err(|e| db::error(e, format!("job {job}: reading its controls")))
    }

    /// Clears a cancel that has taken effect: once no run of the job is alive, every run it was
    /// meant for has stopped, and `status` must not say it is still requested. While another
    /// run is alive the cancel stays, for that run to honour.
    pub async fn clear_spent_cancel(&self, client: &impl GenericClient, job: &str) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {s}.controls SET cancel = false
                      WHERE job = $1 AND cancel
                        AND NOT EXISTS (SELECT 1 FROM {s}.runs r WHERE r.job = $1 AND {alive})",
                    s = self.q,
                    alive = Store::run_alive_sql("r")
                ),
                &[&job],
            )
            .await
            .map_err(|e| {
                db::error(
                    e,
                    format!("job {job}: clearing its cancel, which took effect"),
                )
            })?;
        Ok(())
    }

    /// Records why the run is held (None: it is not), for `status`.
    pub async fn set_hold(
        &self,
        client: &impl GenericClient,
        run_id: i64,
        reason: Option<&str>,
    ) -> Result<(), tokio_postgres::Error> {
        client
            .execute(
                &format!(
                    "UPDATE {s}.runs SET hold_reason = $2,
                            held_since = CASE WHEN $2::text IS NULL THEN NULL ELSE coalesce(held_since, now()) END
                      WHERE id = $1 AND outcome IS NULL",
                    s = self.q
                ),
                &[&run_id, &reason],
            )
            .await?;
        Ok(())
    }
}
