//! How fast a run may go: the rate ceiling (governor), the chunk size adapted toward a target
//! chunk time, the pauses between chunks, and the health signals that hold the run.
//!
//! **Rate ceiling.** A token bucket of `rows_per_second` cells with a burst of one second's worth,
//! starting empty, charged *before* each chunk with the chunk's size (the most keys it can take).
//! So no window from the run's start (or from a change of the ceiling) sees more than the
//! ceiling, and because a chunk may not exceed the burst, no 10-second window anywhere sees more
//! than 1.1 × the ceiling. (governor refuses a charge larger than the burst at once; the chunk
//! size is capped so that never happens, and the refusal is still handled, never ignored.)
//!
//! **Adaptive chunk size**, toward `target_chunk_time` (T), from the time t of each full chunk:
//! t > 2T → shrink to max(0.1, T/t) × size (a hard cut); t < 0.8T → grow by min(1.5, T/t);
//! otherwise keep. Always within `min_chunk_rows..=max_chunk_rows`, and never above the rate
//! ceiling's burst. Application sessions found waiting on the chunk's locks halve it.
//!
//! **Health signals**, read at most every `check_interval`, each holding the run while it is
//! over its threshold, with the reason, the value seen and the threshold: replication lag of any
//! streaming standby, the server's WAL rate, a vacuum running on the table, and a custom
//! `throttle_sql`. A signal that cannot be read holds the run (`on_signal_error = "hold"`, the
//! default: fail closed) or is ignored (`"ignore"`), and the reason says which.
//!
//! **Seeing other sessions.** The lock-wait yield (after every chunk, in the executor), the vacuum
//! signal and the replication lag read other roles' sessions, which a role without
//! `pg_read_all_stats` sees with their details NULL: blind, they would report "nothing
//! happening". So before the first signal read, and again at each read until it can, the run asks
//! whether its role sees them (`db::StatsAccess`); while it cannot, that counts as a signal that
//! cannot be read, with a reason naming the missing grant. Asking again lets a run held for it go
//! on as soon as the grant is given.

use crate::db::StatsAccess;
use crate::hold::Hold;
use crate::job::{OnSignalError, ThrottleSpec};
use crate::store::Controls;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A token bucket of `rate` cells a second with a burst of one second's worth, starting empty:
/// a full one would let the first second (and the first after every change of the ceiling) run
/// at twice the ceiling — 150,000 rows at 25,000 a second took 5.2 s, not 6.
fn empty_bucket(rate: NonZeroU32) -> DefaultDirectRateLimiter {
    let bucket = RateLimiter::direct(Quota::per_second(rate));
    // The whole burst at once always fits a fresh bucket; its cells come back at `rate`.
    let _ = bucket.check_n(rate);
    bucket
}

/// A handle on the rate ceiling's token bucket, to wait on without holding the throttle.
pub struct Bucket {
    rate: u32,
    limiter: Arc<DefaultDirectRateLimiter>,
}

impl Bucket {
    /// Waits until the ceiling admits `rows` more keys; returns how long it waited.
    pub async fn admit(&self, rows: i64) -> Duration {
        let started = Instant::now();
        let n = NonZeroU32::new(rows.clamp(1, self.rate as i64) as u32).expect("at least one");
        if self.limiter.until_n_ready(n).await.is_err() {
            // Cannot happen (n ≤ burst); if it did, wait a full second per burst rather than
            // letting the chunk through unthrottled.
            tokio::time::sleep(Duration::from_secs_f64(rows as f64 / self.rate as f64)).await;
        }
        started.elapsed()
    }
}

pub struct Throttle {
    base: ThrottleSpec,
    spec: ThrottleSpec,
    table: String,
    limiter: Option<(u32, Arc<DefaultDirectRateLimiter>)>,
    /// Live runs sharing the rate ceiling (this one included).
    share: u32,
    size: i64,
    last_check: Option<Instant>,
    verdict: Option<Hold>,
    wal: Option<(Instant, i64)>,
    /// Per standby: the replay position last seen and since when it has not moved.
    replay: HashMap<String, (String, Instant)>,
    /// The replication lag last read (seconds), for the gauge.
    lag: Option<f64>,
    /// Whether this run's role was seen to see other roles' sessions (asked until it does).
    sees_all: bool,
}

impl Throttle {
    /// `table` is the quoted name of the job's table (for the vacuum signal).
    pub fn new(spec: ThrottleSpec, chunk_rows: u32, table: String) -> Throttle {
        let mut t = Throttle {
            base: spec.clone(),
            spec,
            table,
            limiter: None,
            share: 1,
            size: chunk_rows as i64,
            last_check: None,
            verdict: None,
            wal: None,
            replay: HashMap::new(),
            lag: None,
            sees_all: false,
        };
        t.reset_limiter();
        t
    }

    pub fn spec(&self) -> &ThrottleSpec {
        &self.spec
    }

    /// Applies live overrides (`backfill set`) on top of the job's and the run's settings.
    pub fn apply(&mut self, c: &Controls) {
        let mut spec = self.base.clone();
        if let Some(r) = c.rows_per_second {
            spec.rows_per_second = Some(r);
        }
        if let Some(t) = c.target_chunk_time {
            // `backfill set --target-chunk-time 0s` fixes the size, as `0s` does in a job file.
            spec.target_chunk_time = (!t.is_zero()).then_some(t);
        }
        if let Some(p) = c.pause {
            spec.pause = p;
        }
        let share = c.live_runs.max(1);
        if spec != self.spec || share != self.share {
            self.spec = spec;
            self.share = share;
            self.reset_limiter();
        }
    }

    /// A quota cannot be changed in place: a new ceiling (or a new share of it) gets a new
    /// limiter. Each live run gets an even share of the job's ceiling.
    fn reset_limiter(&mut self) {
        let rate = self
            .spec
            .rows_per_second
            .map(|r| r.div_ceil(self.share))
            .and_then(NonZeroU32::new);
        if self.limiter.as_ref().map(|l| l.0) != rate.map(NonZeroU32::get) {
            self.limiter = rate.map(|r| (r.get(), Arc::new(empty_bucket(r))));
        }
    }

    /// Keys for the next chunk.
    pub fn chunk_rows(&self) -> i64 {
        let ceiling = self
            .limiter
            .as_ref()
            .map(|l| l.0 as i64)
            .unwrap_or(i64::MAX);
        self.size.min(ceiling).max(1)
    }

    fn clamp(&self, n: i64) -> i64 {
        n.clamp(
            self.spec.min_chunk_rows as i64,
            self.spec.max_chunk_rows as i64,
        )
    }

    /// Adapts the chunk size after a committed chunk of `keys` keys that took `took`, asked for
    /// `asked`. Returns the new size when it changed.
    pub fn adapt(&mut self, keys: i64, asked: i64, took: Duration) -> Option<i64> {
        let target = self.spec.target_chunk_time?;
        let ratio = target.as_secs_f64() / took.as_secs_f64().max(1e-6);
        let size = self.size;
        let next = if took > target * 2 {
            self.clamp((size as f64 * ratio.max(0.1)).floor() as i64)
        } else if took.as_secs_f64() < target.as_secs_f64() * 0.8 && keys >= asked {
            self.clamp((size as f64 * ratio.min(1.5)).ceil() as i64)
                .max(size)
        } else {
            size
        };
        self.size = next;
        (next != size).then_some(next)
    }

    /// Sessions were waiting on the chunk's locks: yield by halving.
    pub fn shrink(&mut self) -> i64 {
        self.size = self.clamp(self.size / 2);
        self.size
    }

    /// The rate ceiling's bucket, shared by every worker of this run (None: no ceiling).
    pub fn bucket(&self) -> Option<Bucket> {
        self.limiter.as_ref().map(|(rate, l)| Bucket {
            rate: *rate,
            limiter: l.clone(),
        })
    }

    /// The pause after a chunk that took `took`.
    pub fn rest(&self, took: Duration) -> Duration {
        self.spec.pause + took.mul_f64(self.spec.nice_ratio)
    }

    /// Whether the run must hold now. Reads the signals at most every `check_interval`; between
    /// reads, the last verdict stands.
    pub async fn check(&mut self, client: &tokio_postgres::Client) -> Option<Hold> {
        if self
            .last_check
            .is_some_and(|t| t.elapsed() < self.spec.check_interval)
        {
            return self.verdict.clone();
        }
        self.last_check = Some(Instant::now());
        self.verdict = self.read_signals(client).await;
        self.verdict.clone()
    }

    async fn read_signals(&mut self, client: &tokio_postgres::Client) -> Option<Hold> {
        if !self.sees_all {
            match StatsAccess::read(client).await {
                Ok(a) if a.sees_all => self.sees_all = true,
                Ok(a) => {
                    let what = format!("other roles' sessions for {}", self.blind_signals());
                    if let Some(hold) = self.unreadable(&what, a.missing()) {
                        return Some(hold);
                    }
                }
                Err(e) => {
                    return self.unreadable(
                        "whether this role sees other roles' sessions",
                        crate::db::describe(&e),
                    )
                }
            }
        }
        if let Some(max) = self.spec.max_replication_lag {
            match self.replication_lag(client).await {
                Ok((lag, standby)) if lag > max.as_secs_f64() => {
                    return Some(Hold::ReplicationLag { lag, standby, max })
                }
                Ok(_) => {}
                Err(e) => return self.unreadable("replication lag", e),
            }
        }
        if let Some(max) = self.spec.max_wal_rate {
            match self.wal_rate(client).await {
                Ok(Some(rate)) if rate > max as f64 => return Some(Hold::WalRate { rate, max }),
                Ok(_) => {}
                Err(e) => return self.unreadable("WAL rate", e),
            }
        }
        if self.spec.hold_during_autovacuum {
            let q = "SELECT count(*) FROM pg_stat_progress_vacuum WHERE relid = to_regclass($1)";
            match client.query_one(q, &[&self.table]).await {
                Ok(r) if r.get::<_, i64>(0) > 0 => {
                    return Some(Hold::Autovacuum {
                        table: self.table.clone(),
                    })
                }
                Ok(_) => {}
                Err(e) => return self.unreadable("vacuum progress", crate::db::describe(&e)),
            }
        }
        if let Some(sql) = &self.spec.throttle_sql {
            let q = format!("SELECT ({sql})::boolean");
            match client.query_one(&q, &[]).await {
                Ok(r) => match r.get::<_, Option<bool>>(0) {
                    Some(true) => return Some(Hold::ThrottleSql),
                    Some(false) => {}
                    None => return self.unreadable("throttle_sql", "it returned NULL".into()),
                },
                Err(e) => return self.unreadable("throttle_sql", crate::db::describe(&e)),
            }
        }
        None
    }

    /// The signals of this run that read other roles' sessions, for people.
    fn blind_signals(&self) -> String {
        let mut names = vec!["the lock-wait yield"];
        if self.spec.hold_during_autovacuum {
            names.push("hold_during_autovacuum");
        }
        if self.spec.max_replication_lag.is_some() {
            names.push("max_replication_lag");
        }
        match names.split_last() {
            Some((last, [])) => last.to_string(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
            None => String::new(),
        }
    }

    fn unreadable(&self, what: &str, why: String) -> Option<Hold> {
        match self.spec.on_signal_error {
            OnSignalError::Hold => Some(Hold::SignalUnreadable {
                what: what.to_string(),
                why,
            }),
            OnSignalError::Ignore => None,
        }
    }

    /// The replication lag last read by [`Throttle::replication_lag`] (by the hold or for the
    /// gauge), in seconds.
    pub fn last_replication_lag(&self) -> Option<f64> {
        self.lag
    }

    /// The largest lag over the streaming standbys, in seconds, and which standby. A standby
    /// whose replay position has not moved while it is behind counts as lagging for as long as
    /// it has not moved (its `replay_lag` stops being updated when replay is stuck). The one
    /// reader of replication lag: the `max_replication_lag` hold and the lag gauge both use it,
    /// so the gauge shows the lag the run holds for.
    pub async fn replication_lag(
        &mut self,
        client: &tokio_postgres::Client,
    ) -> Result<(f64, String), String> {
        let rows = client
            .query(
                "SELECT coalesce(application_name, '') || ' (pid ' || pid || ')', replay_lsn::text,
                        pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8,
                        coalesce(extract(epoch FROM replay_lag), 0)::float8
                   FROM pg_stat_replication",
                &[],
            )
            .await
            .map_err(|e| crate::db::describe(&e))?;
        let mut worst = (0.0, String::from("none"));
        let now = Instant::now();
        let mut seen = HashMap::new();
        for r in &rows {
            let name: String = r.get(0);
            let Some(lsn) = r.get::<_, Option<String>>(1) else {
                return Err(format!(
                    "replay position of {name} is hidden (grant pg_read_all_stats or pg_monitor)"
                ));
            };
            let behind: f64 = r.get::<_, Option<f64>>(2).unwrap_or(0.0);
            let reported: f64 = r.get(3);
            let since = match self.replay.get(&name) {
                Some((prev, since)) if *prev == lsn => *since,
                _ => now,
            };
            seen.insert(name.clone(), (lsn, since));
            let stalled = if behind > 0.0 {
                now.duration_since(since).as_secs_f64()
            } else {
                0.0
            };
            let lag = reported.max(stalled);
            if lag > worst.0 {
                worst = (lag, name);
            }
        }
        self.replay = seen;
        self.lag = Some(worst.0);
        Ok(worst)
    }

    /// Bytes of WAL per second since the previous reading (None on the first).
    async fn wal_rate(&mut self, client: &tokio_postgres::Client) -> Result<Option<f64>, String> {
        let row = client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
                &[],
            )
            .await
            .map_err(|e| crate::db::describe(&e))?;
        let now = (Instant::now(), row.get::<_, i64>(0));
        let rate = self
            .wal
            .map(|(t, b)| (now.1 - b) as f64 / now.0.duration_since(t).as_secs_f64().max(0.001));
        self.wal = Some(now);
        Ok(rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(target_ms: u64) -> Throttle {
        let spec = ThrottleSpec {
            target_chunk_time: Some(Duration::from_millis(target_ms)),
            min_chunk_rows: 10,
            max_chunk_rows: 10_000,
            ..ThrottleSpec::default()
        };
        Throttle::new(spec, 1000, "t".into())
    }

    #[test]
    fn grows_gently_and_shrinks_hard() {
        let mut t = throttle(100);
        assert_eq!(
            t.adapt(1000, 1000, Duration::from_millis(10)),
            Some(1500),
            "at most 1.5x a step"
        );
        assert_eq!(
            t.adapt(1500, 1500, Duration::from_millis(90)),
            None,
            "inside the band"
        );
        assert_eq!(
            t.adapt(1500, 1500, Duration::from_millis(1000)),
            Some(150),
            "a chunk 10x too slow cuts 10x"
        );
        assert_eq!(
            t.adapt(150, 150, Duration::from_millis(100_000)),
            Some(15),
            "never below a tenth per step"
        );
        assert_eq!(
            t.adapt(15, 15, Duration::from_secs(100)),
            Some(10),
            "clamped to min"
        );
        assert_eq!(
            t.adapt(5, 10, Duration::from_millis(1)),
            None,
            "a partial chunk does not grow it"
        );
        for _ in 0..40 {
            t.adapt(t.chunk_rows(), t.chunk_rows(), Duration::from_millis(1));
        }
        assert_eq!(t.chunk_rows(), 10_000, "clamped to max");
    }

    #[test]
    fn the_rate_ceiling_caps_the_chunk_and_can_change_live() {
        let mut t = throttle(100);
        t.apply(&Controls {
            rows_per_second: Some(300),
            ..Controls::default()
        });
        assert_eq!(t.chunk_rows(), 300);
        t.apply(&Controls::default());
        assert_eq!(t.chunk_rows(), 1000);
        assert!(t.limiter.is_none());
    }

    #[tokio::test]
    async fn admit_waits_for_the_ceiling() {
        let mut t = throttle(100);
        t.apply(&Controls {
            rows_per_second: Some(1000),
            ..Controls::default()
        });
        let bucket = t.bucket().expect("a ceiling");
        let waited = bucket.admit(500).await;
        assert!(
            waited >= Duration::from_millis(450),
            "the bucket starts empty: {waited:?}"
        );
        let waited = bucket.admit(500).await;
        assert!(waited >= Duration::from_millis(450), "{waited:?}");
    }

    #[test]
    fn live_runs_share_the_ceiling_evenly() {
        let mut t = throttle(100_000);
        t.apply(&Controls {
            rows_per_second: Some(1000),
            live_runs: 3,
            ..Controls::default()
        });
        assert_eq!(
            t.chunk_rows(),
            334,
            "each of 3 runs gets a third, rounded up"
        );
        t.apply(&Controls {
            rows_per_second: Some(1000),
            live_runs: 1,
            ..Controls::default()
        });
        assert_eq!(t.chunk_rows(), 1000);
    }

    #[test]
    fn the_reason_for_a_blind_role_names_the_signals_that_need_to_see() {
        let mut t = throttle(100);
        assert_eq!(t.blind_signals(), "the lock-wait yield");
        t.spec.hold_during_autovacuum = true;
        t.spec.max_replication_lag = Some(Duration::from_secs(1));
        assert_eq!(
            t.blind_signals(),
            "the lock-wait yield, hold_during_autovacuum and max_replication_lag"
        );
    }

    #[test]
    fn rest_is_pause_plus_nice_ratio() {
        let mut t = throttle(100);
        t.base.pause = Duration::from_millis(20);
        t.base.nice_ratio = 0.5;
        t.apply(&Controls::default());
        assert_eq!(
            t.rest(Duration::from_millis(100)),
            Duration::from_millis(70)
        );
    }
}
