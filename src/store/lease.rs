//! Keeping the lease while a run works: a heartbeat every few seconds on the dedicated lease
//! session; if that session dies (server restart, terminated backend), a new one is opened and
//! re-attached to the run — unless another runner took the job over meanwhile, in which case the
//! run is told it lost the job (its next checkpoint advance would be refused anyway).

use super::{Store, HEARTBEAT_EVERY};
use crate::db::Target;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shared between the heartbeat task and the chunk loop.
#[derive(Default)]
pub struct LeaseState {
    lost: AtomicBool,
}

impl LeaseState {
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Store {
    /// Points the job's lease at the calling session. False when the run no longer owns the job.
    pub async fn reattach(
        &self,
        client: &tokio_postgres::Client,
        job: &str,
        run_id: i64,
    ) -> Result<bool, tokio_postgres::Error> {
        let n = client
            .execute(
                &format!(
                    "UPDATE {s}.checkpoints SET owner_backend_pid = pg_backend_pid(),
                            owner_backend_start = (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()),
                            heartbeat_at = now()
                      WHERE job = $1 AND owner_run = $2",
                    s = self.q
                ),
                &[&job, &run_id],
            )
            .await?;
        Ok(n == 1)
    }

    /// Heartbeats until aborted, re-opening the lease session for up to `reconnect_for` after it
    /// breaks. Marks `state` lost when the job was taken over or the database stayed away.
    pub async fn keep_lease(
        self,
        target: Target,
        mut client: tokio_postgres::Client,
        job: String,
        run_id: i64,
        reconnect_for: Duration,
        state: Arc<LeaseState>,
    ) {
        loop {
            tokio::time::sleep(HEARTBEAT_EVERY).await;
            match self.heartbeat(&client, &job, run_id).await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => {}
            }
            let since = Instant::now();
            let reattached = loop {
                if since.elapsed() > reconnect_for {
                    break false;
                }
                if let Ok(c) = target.connect().await {
                    if let Ok(owned) = self.reattach(&c, &job, run_id).await {
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
