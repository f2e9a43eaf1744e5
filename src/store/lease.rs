//! Keeping a run alive: a heartbeat every few seconds on the run's dedicated lease session; if
//! that session dies (server restart, terminated backend), a new one is opened and re-attached to
//! the run — unless the run was declared gone meanwhile (its ranges may be someone else's now), in
//! which case the workers are told the run is lost. The same task reads the job's progress over
//! all runs every second, for this process's progress display and metrics.
//! Owns the run's lease session and heartbeat; never a chunk's transaction or a range's cursor.

use super::{Store, HEARTBEAT_EVERY};
use crate::db::Target;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Shared between the lease task and the workers.
#[derive(Default)]
pub struct LeaseState {
    lost: AtomicBool,
    /// Keys done by every run of the job together, as last read (-1: not read yet).
    job_rows_done: AtomicI64,
}

impl LeaseState {
    pub fn new() -> LeaseState {
        LeaseState {
            lost: AtomicBool::new(false),
            job_rows_done: AtomicI64::new(-1),
        }
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    pub fn job_rows_done(&self) -> Option<i64> {
        Some(self.job_rows_done.load(Ordering::Relaxed)).filter(|n| *n >= 0)
    }
}

impl Store {
    /// Points the run's lease at the calling session. False when the run was declared gone.
    pub async fn reattach(
        &self,
        client: &tokio_postgres::Client,
        run_id: i64,
    ) -> Result<bool, tokio_postgres::Error> {
        let n = client
            .execute(
                &format!(
                    "UPDATE {s}.runs SET backend_pid = pg_backend_pid(),
                            backend_start = (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()),
                            heartbeat_at = now()
                      WHERE id = $1 AND outcome IS NULL",
                    s = self.q
                ),
                &[&run_id],
            )
            .await?;
        Ok(n == 1)
    }

    async fn job_rows_done(
        &self,
        client: &tokio_postgres::Client,
        job: &str,
    ) -> Result<i64, tokio_postgres::Error> {
        let row = client
            .query_one(
                &format!(
                    "SELECT coalesce(sum(rows_done), 0)::bigint FROM {s}.ranges WHERE job = $1",
                    s = self.q
                ),
                &[&job],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Heartbeats until aborted, re-opening the lease session for up to `reconnect_for` after it
    /// breaks. Marks `state` lost when the run was declared gone or the database stayed away.
    pub async fn keep_lease(
        self,
        target: Target,
        mut client: tokio_postgres::Client,
        job: String,
        run_id: i64,
        reconnect_for: Duration,
        state: Arc<LeaseState>,
    ) {
        let mut beat = Instant::now();
        loop {
            tokio::time::sleep(SYNC_EVERY).await;
            let mut healthy = true;
            if beat.elapsed() >= HEARTBEAT_EVERY {
                beat = Instant::now();
                match self.heartbeat(&client, run_id).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(_) => healthy = false,
                }
            }
            if healthy {
                match self.job_rows_done(&client, &job).await {
                    Ok(n) => {
                        state.job_rows_done.store(n, Ordering::Relaxed);
                        continue;
                    }
                    Err(_) if !client.is_closed() => continue,
                    Err(_) => {}
                }
            }
            let since = Instant::now();
            let reattached = loop {
                if since.elapsed() > reconnect_for {
                    break false;
                }
                if let Ok(c) = target.connect().await {
                    if let Ok(owned) = self.reattach(&c, run_id).await {
                        client = c;
                        break owned;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            if !reattached {
                break;
            }
        }
        state.lost.store(true, Ordering::SeqCst);
    }
}
