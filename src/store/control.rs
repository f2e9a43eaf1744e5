//! Live control of a running job from any host, through the engine's schema: pause, resume,
//! cancel, and new throttle values. The running process reads its row before its next chunk and
//! writes back what it is doing (chunk size, hold reason) for `status`.
//! Owns the `controls` table and the record of every change made to it (`control_events`: who,
//! when, what); never a job's state, ranges or runs.

use super::Store;
use crate::db;
use crate::error::{Error, Result};
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

/// The throttle flags a run was started with (`run --rows-per-second|--target-chunk-time|--pause`),
/// published on its `runs` row, so `set` can say which value a live runner is using. None: not
/// given (the job file applies).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ThrottleFlags {
    pub rows_per_second: Option<u32>,
    pub target_chunk_time_ms: Option<u64>,
    pub pause_ms: Option<u64>,
}

impl ThrottleFlags {
    pub fn given(
        rows_per_second: Option<u32>,
        target_chunk_time: Option<Duration>,
        pause: Option<Duration>,
    ) -> ThrottleFlags {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        ThrottleFlags {
            rows_per_second,
            target_chunk_time_ms: ms(target_chunk_time),
            pause_ms: ms(pause),
        }
    }
}

/// A live run of a job and the throttle flags it was given.
#[derive(Debug, Clone)]
pub struct LiveRunFlags {
    pub host: String,
    pub pid: i32,
    pub flags: ThrottleFlags,
}

/// What a recorded control event did; the `action` column of `control_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    Pause,
    Resume,
    Cancel,
    Set,
    /// The live overrides were dropped because the job completed (recorded by the run).
    OverridesEnded,
}

impl ControlAction {
    pub const ALL: [ControlAction; 5] = [
        ControlAction::Pause,
        ControlAction::Resume,
        ControlAction::Cancel,
        ControlAction::Set,
        ControlAction::OverridesEnded,
    ];

    pub fn literal(self) -> &'static str {
        match self {
            ControlAction::Pause => "pause",
            ControlAction::Resume => "resume",
            ControlAction::Cancel => "cancel",
            ControlAction::Set => "set",
            ControlAction::OverridesEnded => "overrides_ended",
        }
    }

    fn from_literal(s: &str) -> Option<ControlAction> {
        Self::ALL.into_iter().find(|a| a.literal() == s)
    }
}

/// One recorded pause/resume/cancel/set (or the end of the overrides at completion): who (the
/// database role, and the session's login role when `SET ROLE` changed it; the client's host
/// name and pid, and its address as the server saw it), when, and what changed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControlEvent {
    pub at: String,
    pub action: ControlAction,
    /// The fields changed, as stored: `paused`, `cancel`, `rows_per_second`,
    /// `target_chunk_time_ms`, `pause_ms`; null for an override dropped.
    pub change: serde_json::Value,
    pub role: String,
    pub session_role: String,
    /// None over a Unix socket.
    pub client_addr: Option<String>,
    pub host: String,
    pub pid: i32,
}

impl ControlChange {
    /// The fields this change sets, as recorded in `control_events.change`.
    pub fn recorded(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        let mut m = serde_json::Map::new();
        if let Some(p) = self.paused {
            m.insert("paused".into(), p.into());
        }
        if let Some(c) = self.cancel {
            m.insert("cancel".into(), c.into());
        }
        if let Some(r) = self.rows_per_second {
            m.insert("rows_per_second".into(), r.into());
        }
        if let Some(t) = self.target_chunk_time {
            m.insert("target_chunk_time_ms".into(), ms(t).into());
        }
        if let Some(p) = self.pause {
            m.insert("pause_ms".into(), ms(p).into());
        }
        serde_json::Value::Object(m)
    }
}

impl Store {
    /// Applies an operator's control change and records who made it, in one transaction: a
    /// change is never in force without its record, nor recorded without taking effect.
    pub async fn apply_control(
        &self,
        client: &mut tokio_postgres::Client,
        job: &str,
        action: ControlAction,
        change: &ControlChange,
        by: &super::Runner,
    ) -> Result<Controls> {
        let err = |e| db::error(e, format!("job {job}: saving the control change"));
        let tx = client.transaction().await.map_err(err)?;
        self.change_controls(&tx, job, change).await?;
        self.record_control(&tx, job, action, &change.recorded(), by)
            .await
            .map_err(err)?;
        let controls = self
            .controls(&tx, job)
            .await
            .map_err(|e| db::error(e, format!("job {job}: reading its controls")))?;
        tx.commit().await.map_err(err)?;
        Ok(controls)
    }

    async fn record_control(
        &self,
        client: &impl GenericClient,
        job: &str,
        action: ControlAction,
        change: &serde_json::Value,
        by: &super::Runner,
    ) -> Result<(), tokio_postgres::Error> {
        client
            .execute(
                &format!(
                    "INSERT INTO {s}.control_events (job, action, change, host, pid)
                     VALUES ($1, $2, $3::text::jsonb, $4, $5)",
                    s = self.q
                ),
                &[
                    &job,
                    &action.literal(),
                    &change.to_string(),
                    &by.host,
                    &by.pid,
                ],
            )
            .await?;
        Ok(())
    }

    /// Drops the job's live overrides (rate, target chunk time, pause) because it completed, and
    /// records that. Returns the overrides that were in force (all None: there were none, and
    /// nothing is recorded).
    pub async fn end_overrides(
        &self,
        client: &mut tokio_postgres::Client,
        job: &str,
        by: &super::Runner,
    ) -> Result<Controls> {
        let err = |e| db::error(e, format!("job {job}: ending its live overrides"));
        let tx = client.transaction().await.map_err(err)?;
        let before = self.controls(&tx, job).await.map_err(err)?;
        let ended = ControlChange {
            rows_per_second: before.rows_per_second.map(|_| None),
            target_chunk_time: before.target_chunk_time.map(|_| None),
            pause: before.pause.map(|_| None),
            ..ControlChange::default()
        };
        let recorded = ended.recorded();
        if recorded.as_object().is_some_and(|m| m.is_empty()) {
            return Ok(Controls::default());
        }
        self.change_controls(&tx, job, &ended).await?;
        self.record_control(&tx, job, ControlAction::OverridesEnded, &recorded, by)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(before)
    }

    /// The job's recorded control events, oldest first (kept by `reset`, like its runs).
    pub async fn control_events(
        &self,
        client: &impl GenericClient,
        job: &str,
    ) -> Result<Vec<ControlEvent>> {
        let err = |e| db::error(e, format!("job {job}: reading its control events"));
        if !self.readable(client).await? {
            return Ok(Vec::new());
        }
        let rows = client
            .query(
                &format!(
                    "SELECT {at}, action, change::text, role, session_role, host(client_addr), host, pid
                       FROM {s}.control_events WHERE job = $1 ORDER BY id",
                    at = super::ts("at"),
                    s = self.q
                ),
                &[&job],
            )
            .await
            .map_err(err)?;
        rows.iter()
            .map(|r| {
                let action: String = r.get(1);
                let action = ControlAction::from_literal(&action).ok_or_else(|| {
                    Error::Runtime(format!(
                        "job {job}: a control event has the unknown action `{action}`; upgrade the backfill binary"
                    ))
                })?;
                Ok(ControlEvent {
                    at: r.get(0),
                    action,
                    change: serde_json::from_str(r.get(2)).unwrap_or(serde_json::Value::Null),
                    role: r.get(3),
                    session_role: r.get(4),
                    client_addr: r.get(5),
                    host: r.get(6),
                    pid: r.get(7),
                })
            })
            .collect()
    }
}

impl Store {
    /// Publishes the throttle flags of run `run_id` on its row (see [`ThrottleFlags`]).
    pub async fn publish_throttle_flags(
        &self,
        client: &impl GenericClient,
        run_id: i64,
        flags: &ThrottleFlags,
    ) -> Result<()> {
        let flags = serde_json::to_string(flags).expect("serializable");
        client
            .execute(
                &format!(
                    "UPDATE {s}.runs SET throttle_flags = $2::text::jsonb WHERE id = $1",
                    s = self.q
                ),
                &[&run_id, &flags],
            )
            .await
            .map_err(|e| db::error(e, format!("run {run_id}: publishing its throttle flags")))?;
        Ok(())
    }

    /// The job's live runs with the throttle flags each was given, oldest first.
    pub async fn live_run_flags(
        &self,
        client: &impl GenericClient,
        job: &str,
    ) -> Result<Vec<LiveRunFlags>> {
        let rows = client
            .query(
                &format!(
                    "SELECT r.host, r.pid, coalesce(r.throttle_flags, '{{}}')::text FROM {s}.runs r
                      WHERE r.job = $1 AND {alive} ORDER BY r.id",
                    s = self.q,
                    alive = Store::run_alive_sql("r")
                ),
                &[&job],
            )
            .await
            .map_err(|e| db::error(e, format!("job {job}: reading its live runs' flags")))?;
        Ok(rows
            .iter()
            .map(|r| LiveRunFlags {
                host: r.get(0),
                pid: r.get(1),
                flags: serde_json::from_str(r.get(2)).unwrap_or_default(),
            })
            .collect())
    }
}
