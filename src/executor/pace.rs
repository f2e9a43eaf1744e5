//! The run's pace, shared by its workers: the rate ceiling and adaptive chunk size
//! (`throttle`), the live controls (`backfill pause|resume|cancel|set`), the health holds, and
//! what `status`, the progress display and the log are told about why the run is held. Must not
//! run chunks or decide what a failure means.

use super::failure::{failed, Failure};
use super::worker::{Contention, Worker};
use crate::error::Result;
use crate::events::Event;
use crate::hold::{Hold, HoldReason, Shown};
use crate::store;
use crate::throttle::Throttle;
use std::time::{Duration, Instant};

const LAG_SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How often a running job reads its controls (pause, cancel, new settings).
const CONTROLS_EVERY: Duration = Duration::from_millis(200);
/// While a chunk keeps meeting contention, a log line at most this often (status shows it live).
const CONTENTION_LOG_EVERY: Duration = Duration::from_secs(30);

/// The run's pace, shared by its workers: throttle, controls, and what `status` was told.
pub(super) struct Pace {
    pub(super) throttle: Throttle,
    /// When the controls were last read.
    pub(super) controls_read: Option<Instant>,
    pub(super) controls: store::Controls,
    /// The hold reason last written to the run's row, as written: a hold whose sentence did
    /// not change (a lag of 3.21s, then 3.24s) is not news.
    pub(super) holding: Option<String>,
    /// Workers whose chunk keeps meeting lock contention, with the hold reason each shows.
    pub(super) contended: std::collections::BTreeMap<i32, Shown>,
    /// When replication lag was last sampled.
    pub(super) lag_sampled: Option<Instant>,
    pub(super) rate_shown: bool,
}

impl Worker<'_, '_> {
    /// Every few seconds, the largest replication lag of the streaming standbys, for the
    /// metrics, read as the `max_replication_lag` hold reads it (`Throttle::replication_lag`).
    /// (Unreadable without pg_monitor's rights on other roles' senders; then not reported.)
    pub(super) async fn sample_replication_lag(&mut self) {
        let mut pace = self.shared.pace.lock().await;
        if pace
            .lag_sampled
            .is_some_and(|t| t.elapsed() < LAG_SAMPLE_EVERY)
        {
            return;
        }
        let Some(conn) = self.conn.as_ref().filter(|c| !c.is_closed()) else {
            return;
        };
        pace.lag_sampled = Some(Instant::now());
        if let Ok((lag, _)) = pace.throttle.replication_lag(conn).await {
            self.shared.emit(Event::ReplicationLag(lag));
        }
    }

    /// Reads the job's controls (at most every 0.2 s for the whole run) and applies new
    /// settings. True: cancel. The first read happens before the worker's first chunk, on a
    /// connection of its own if it has none yet: a job paused or cancelled before the run started
    /// must not write a chunk first. Until one read has succeeded, a failed read is a failed
    /// attempt (waited out like any other); after that, the last controls read stay in force.
    pub(super) async fn read_controls(&mut self) -> Result<bool, Failure> {
        let shared = self.shared;
        {
            let mut pace = shared.pace.lock().await;
            if !pace.rate_shown {
                pace.rate_shown = true;
                shared.emit(Event::RateLimit(pace.throttle.spec().rows_per_second));
            }
            if pace
                .controls_read
                .is_some_and(|t| t.elapsed() < CONTROLS_EVERY)
            {
                return Ok(pace.controls.cancel);
            }
        }
        // Connect without holding the run's pace: the other workers go on meanwhile.
        let conn = self.connection().await?;
        let mut pace = shared.pace.lock().await;
        if pace
            .controls_read
            .is_some_and(|t| t.elapsed() < CONTROLS_EVERY)
        {
            return Ok(pace.controls.cancel);
        }
        let c = match shared.store.controls(&***conn, &shared.job.name).await {
            Ok(c) => c,
            Err(e) if pace.controls_read.is_none() => {
                return Err(failed("reading the job's controls", None)(e))
            }
            Err(_) => return Ok(pace.controls.cancel),
        };
        pace.controls_read = Some(Instant::now());
        if c != pace.controls {
            pace.throttle.apply(&c);
            shared.emit(Event::ChunkSize(pace.throttle.chunk_rows() as u64));
            shared.emit(Event::RateLimit(pace.throttle.spec().rows_per_second));
            if c.rows_per_second != pace.controls.rows_per_second
                || c.target_chunk_time != pace.controls.target_chunk_time
                || c.pause != pace.controls.pause
            {
                shared.emit(Event::SettingsChanged(&c));
            }
            pace.controls = c;
        }
        Ok(pace.controls.cancel)
    }

    /// Holds while paused or while a health signal says so. True when it held (the caller
    /// re-checks stop, cancel and ownership before going on).
    pub(super) async fn hold_while_unhealthy(&mut self) -> Result<bool> {
        let shared = self.shared;
        let name = shared.job.name.as_str();
        let (hold, nap) = {
            let mut pace = shared.pace.lock().await;
            let hold = if pace.controls.paused {
                Some(Hold::Paused {
                    job: name.to_string(),
                })
            } else {
                let hold = match self.conn.as_ref().filter(|c| !c.is_closed()) {
                    Some(conn) => pace.throttle.check(conn).await,
                    None => None,
                };
                // The lag the hold just read shows on the gauge too, also while it holds.
                if let Some(lag) = pace.throttle.last_replication_lag() {
                    shared.emit(Event::ReplicationLag(lag));
                }
                hold
            };
            // A worker's lock contention shows while nothing else holds the run.
            let shown = hold
                .as_ref()
                .map(|h| Shown {
                    hold: h.clone(),
                    since: None,
                })
                .or_else(|| pace.contended.values().next().cloned());
            self.show_hold(&mut pace, shown).await;
            let nap = pace
                .throttle
                .spec()
                .check_interval
                .min(Duration::from_millis(500));
            (hold, nap)
        };
        let Some(hold) = hold else { return Ok(false) };
        shared.shutdown.sleep(nap).await;
        shared.emit(Event::Held {
            reason: hold.reason(),
            time: nap,
        });
        Ok(true)
    }

    /// Writes why the run is held (None: it is not) for `status`, the progress display and the
    /// log, when that changed.
    pub(super) async fn show_hold(&self, pace: &mut Pace, shown: Option<Shown>) {
        let shared = self.shared;
        let detail = shown.as_ref().map(|h| h.hold.to_string());
        if detail == pace.holding {
            return;
        }
        if let Some(conn) = self.conn.as_ref().filter(|c| !c.is_closed()) {
            let _ = shared
                .store
                .set_hold(&***conn, shared.run_id, detail.as_deref())
                .await;
        }
        shared.emit(Event::HoldChanged(shown.as_ref()));
        pace.holding = detail;
    }

    /// The worker's chunk went through: its lock contention (if any) is over.
    pub(super) async fn contention_over(&mut self) {
        let Some(c) = self.contention.take() else {
            return;
        };
        let shared = self.shared;
        shared.emit(Event::ContentionOver {
            lasted: c.since.elapsed(),
        });
        let mut pace = shared.pace.lock().await;
        pace.contended.remove(&self.id);
        // Nothing else held the run, or this worker would not have run its chunk.
        let shown = pace.contended.values().next().cloned();
        self.show_hold(&mut pace, shown).await;
    }

    /// Waits `delay` before the chunk that met lock contention is tried again, showing the run
    /// as held (a log line at most every `CONTENTION_LOG_EVERY`) and booking the time held.
    pub(super) async fn outlast_contention(&mut self, f: &Failure, where_: &str, delay: Duration) {
        let shared = self.shared;
        let budget = shared.contention_budget();
        let now = Instant::now();
        let first = self.contention.is_none();
        let c = self.contention.get_or_insert_with(|| Contention {
            since: now,
            reason: Hold::LockContention {
                chunk: where_.to_string(),
            },
            since_utc: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            logged: now,
            unbooked: now,
        });
        // The failed attempt waited for the lock: that is time held too.
        shared.emit(Event::Held {
            reason: HoldReason::LockContention,
            time: now.duration_since(c.unbooked),
        });
        c.unbooked = now;
        let spent = c.since.elapsed();
        if first || c.logged.elapsed() >= CONTENTION_LOG_EVERY {
            c.logged = now;
            shared.emit(Event::Contended {
                chunk: where_,
                stage: f.stage,
                error: &f.text(),
                so_far: spent,
                delay,
                budget,
            });
        }
        let shown = Shown {
            hold: c.reason.clone(),
            since: Some(c.since_utc.clone()),
        };
        {
            let mut pace = shared.pace.lock().await;
            pace.contended.insert(self.id, shown);
            // Not over another reason (a pause, a health signal): that one shows first.
            let other = pace
                .holding
                .as_ref()
                .is_some_and(|h| !pace.contended.values().any(|c| c.hold.to_string() == *h));
            if !other {
                let shown = pace.contended.values().next().cloned();
                self.show_hold(&mut pace, shown).await;
            }
        }
        shared.shutdown.sleep(delay).await;
        let c = self.contention.as_mut().expect("set above");
        shared.emit(Event::Held {
            reason: HoldReason::LockContention,
            time: c.unbooked.elapsed(),
        });
        c.unbooked = Instant::now();
    }
}
