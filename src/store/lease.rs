//! Keeping a run alive: a heartbeat every few seconds on the run's dedicated lease session; if
//! that session dies (server restart, terminated backend), a new one is opened and re-attached to
//! the run — unless the run was declared gone meanwhile (its ranges may be someone else's now), in
//! which case the workers are told the run is lost. The same task reads the job's progress over
//! all runs every second, for this process's progress display and metrics, and this run's own
//! count, from which it measures the run's recent rate and writes it with the heartbeat for
//! `status` (so the chunks pay nothing for it).
//! Owns the run's lease session, heartbeat and recent rate; never a chunk's transaction or a
//! range's cursor.

use super::{Store, HEARTBEAT_EVERY};
use crate::db::Target;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SYNC_EVERY: Duration = Duration::from_secs(1);
/// The window a run's recent rate is measured over.
pub const RECENT_RATE_WINDOW: Duration = Duration::from_secs(30);
/// The shortest stretch a recent rate is given for: less says more about one chunk than a rate.
pub const RECENT_RATE_MIN_SPAN: Duration = Duration::from_secs(3);

/// A run's recent rate: the keys it committed over the last [`RECENT_RATE_WINDOW`], from its
/// own counter (what its chunks booked in their transactions) read every second.
#[derive(Debug, Default)]
pub struct RecentRate {
    /// (when read, keys the run had committed), oldest first.
    samples: VecDeque<(Instant, i64)>,
}

impl RecentRate {
    /// Adds a reading, forgetting those no longer needed to span the window.
    pub fn record(&mut self, at: Instant, rows: i64) {
        self.samples.push_back((at, rows));
        // Keep the newest reading at or before the window's start, as the rate's first point.
        while self
            .samples
            .get(1)
            .is_some_and(|(t, _)| at.duration_since(*t) >= RECENT_RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Keys per second between the oldest and newest readings kept; None until they span
    /// [`RECENT_RATE_MIN_SPAN`].
    pub fn rows_per_second(&self) -> Option<f64> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let span = last.0.duration_since(first.0);
        (span >= RECENT_RATE_MIN_SPAN)
            .then(|| (last.1 - first.1).max(0) as f64 / span.as_secs_f64())
    }
}

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

    /// (keys done by every run of the job, keys this run committed), in one round trip.
    async fn rows_done(
        &self,
        client: &tokio_postgres::Client,
        job: &str,
        run_id: i64,
    ) -> Result<(i64, i64), tokio_postgres::Error> {
        let row = client
            .query_one(
                &format!(
                    "SELECT (SELECT coalesce(sum(rows_done), 0)::bigint FROM {s}.ranges WHERE job = $1),
                            (SELECT coalesce(sum(rows_done), 0)::bigint FROM {s}.run_workers WHERE run_id = $2)",
                    s = self.q
                ),
                &[&job, &run_id],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
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
        let mut recent = RecentRate::default();
        loop {
            tokio::time::sleep(SYNC_EVERY).await;
            let mut healthy = true;
            if beat.elapsed() >= HEARTBEAT_EVERY {
                beat = Instant::now();
                match self
                    .heartbeat(&client, run_id, recent.rows_per_second())
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(_) => healthy = false,
                }
            }
            if healthy {
                match self.rows_done(&client, &job, run_id).await {
                    Ok((job_rows, run_rows)) => {
                        state.job_rows_done.store(job_rows, Ordering::Relaxed);
                        recent.record(Instant::now(), run_rows);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recent_rate_spans_the_last_window_and_waits_for_a_few_seconds_first() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut r = RecentRate::default();
        r.record(at(0), 0);
        r.record(at(2), 200);
        assert_eq!(r.rows_per_second(), None, "2 s is too short a stretch");
        r.record(at(5), 500);
        assert_eq!(r.rows_per_second(), Some(100.0));
        // 40 s at 100 keys/s, then 30 s with nothing committed (held): the rate falls to 0.
        for s in 6..=40 {
            r.record(at(s), 100 * s as i64);
        }
        assert_eq!(r.rows_per_second(), Some(100.0));
        for s in 41..=70 {
            r.record(at(s), 4000);
        }
        assert_eq!(r.rows_per_second(), Some(0.0));
        assert!(r.samples.len() <= 32, "{} readings kept", r.samples.len());
        // Half the window at 200 keys/s: half the window's rate.
        for s in 71..=85 {
            r.record(at(s), 4000 + 200 * (s as i64 - 70));
        }
        assert_eq!(r.rows_per_second(), Some(100.0));
    }
}
