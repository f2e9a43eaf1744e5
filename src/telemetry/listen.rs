//! Telemetry listening to a run's events: each [`Event`] becomes the progress display's state,
//! the metrics and the log lines an operator reads. Owns the text of those lines; must not
//! reach back into the engine (it only sees events).

use super::finishing::finishing_line;
use super::Progress;
use crate::events::{Event, Listener};
use crate::hold::{Hold, Shown};
use crate::store::Controls;

impl Listener for Progress {
    fn on(&self, event: Event<'_>) {
        if !self.run_event(event) {
            self.walk_event(event);
        }
    }
}

impl Progress {
    /// The events of the run as a whole (start-up, key range, verify and sweep, its end, the
    /// finishing steps); false
    /// for any other.
    fn run_event(&self, event: Event<'_>) -> bool {
        let name = self.job.as_str();
        match event {
            Event::LostWhileStarting { error, patience } => self.log(&format!(
                "{name}: lost the database while starting the run ({error}); waiting for it to come back (up to {}s)",
                patience.as_secs()
            )),
            Event::BackWhileStarting => {
                self.set_held(None);
                self.set_hold_reason(None);
                self.log(&format!("{name}: database is back; starting"));
            }
            Event::Rejoining { run_id } => self.log(&format!(
                "{name}: run {run_id} was declared gone while the database was away; joining the job again"
            )),
            Event::NoEstimate { table } => self.log(&format!(
                "{name}: no row estimate for {table} (never analyzed, and counting takes long): its key range cannot be split, so only one worker will work; run ANALYZE {table} first to use several"
            )),
            Event::KeyRange { table, upper, rows } => match upper {
                Some(u) => self.log(&format!(
                    "{name}: processing keys up to {u} (~{} rows)",
                    rows.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
                )),
                None => self.log(&format!(
                    "{name}: table {table} was empty when the job started; nothing to do"
                )),
            },
            Event::RunStarted {
                done,
                sweep,
                pass_done,
                total,
                chunk_size,
                workers,
                failing_keys,
            } => {
                self.start(done, (sweep, pass_done), total, chunk_size, failing_keys);
                self.set_workers(workers);
            }
            Event::ResumingAfter { key, rows_done } => self.log(&format!(
                "{name}: resuming after key {key} ({rows_done} rows already done)"
            )),
            Event::ResumingRanges {
                rows_done,
                finished,
                ranges,
            } => self.log(&format!(
                "{name}: resuming ({rows_done} rows already done; {finished} of {ranges} key ranges finished)"
            )),
            Event::Incomplete { why } => self.log(&format!("{name}: {why}")),
            Event::Sweeping {
                remaining,
                pass,
                max,
            } => {
                self.log(&format!(
                    "{name}: verify counts {remaining} rows still to do (written behind the cursor?); sweep {pass} of at most {max}: walking every key again (the statement's guard skips rows already done)"
                ));
                self.sweep_started(pass);
            }
            Event::CompletedElsewhere => self.log(&format!(
                "{name}: another run completed the job meanwhile (its verify returned 0)"
            )),
            Event::RunEnded(state) => self.finish(state),
            Event::FailureResolved { key } => {
                self.log(&format!("{name}: key {key} now succeeds; resolved"));
                self.key_resolved();
            }
            Event::FailureRemains { key, error } => {
                self.log(&format!("{name}: key {key} still fails: {error}"))
            }
            Event::Finishing(happened) => self.log(&finishing_line(&happened)),
            _ => return false,
        }
        true
    }

    /// The events of the workers' walk (chunks, holds, failures and what is done about them).
    fn walk_event(&self, event: Event<'_>) {
        let name = self.job.as_str();
        match event {
            Event::RangeTaken { worker, range } => {
                self.log(&format!("{name}: worker {worker} took range {range}"))
            }
            Event::ChunkCommitted {
                size,
                keys,
                changed,
                took,
                round_trips,
            } => self.chunk_committed(size, keys, changed, took, round_trips),
            Event::JobRowsDone(n) => self.sync_job_rows(n),
            Event::Yielded { blocked, size } => self.log(&format!(
                "{name}: {blocked} application session(s) waited on this chunk's locks; chunks shrink to {size} keys"
            )),
            Event::ChunkSize(n) => self.set_chunk_size(n),
            Event::RateLimit(r) => self.set_rate_limit(r),
            Event::SettingsChanged(c) => self.log(&format!(
                "{name}: new settings from `backfill set`: {}",
                describe_controls(c)
            )),
            Event::ReplicationLag(lag) => self.replication_lag(lag),
            Event::Held { reason, time } => self.held(reason, time),
            Event::HoldChanged(hold) => {
                let shown = hold.map(Shown::to_string);
                // The bar redrawn under the log line already says it.
                self.set_held(shown.as_deref());
                self.set_hold_reason(hold.map(|h| h.hold.reason()));
                match &shown {
                    Some(d) => self.log(&format!("{name}: holding: {d}")),
                    None => self.log(&format!("{name}: no longer held; continuing")),
                }
            }
            Event::WaitingForDatabase => self.show_hold(&Hold::WaitingForDatabase),
            Event::AttemptFailed { class } => self.chunk_failed(class),
            Event::LostWhileStopping { stage, error } => self.log(&format!(
                "{name}: lost the database while {stage} ({error}) while stopping; nothing uncommitted was kept"
            )),
            Event::DatabaseLost {
                stage,
                error,
                patience,
            } => self.log(&format!(
                "{name}: lost the database while {stage} ({error}); waiting for it to come back (up to {}s)",
                patience.as_secs()
            )),
            Event::DatabaseBack => self.log(&format!("{name}: database is back; continuing")),
            Event::Narrowed {
                chunk,
                stage,
                error,
                size,
            } => self.log(&format!(
                "{name}: {chunk} failed while {stage} ({error}); retrying in chunks of {size} to narrow it down"
            )),
            Event::Retrying {
                chunk,
                stage,
                error,
                delay,
                attempt,
                max_attempts,
            } => {
                self.log(&format!(
                    "{name}: {chunk} failed while {stage}: {error}; retrying in {} ms (attempt {}/{max_attempts})",
                    delay.as_millis(),
                    attempt + 1,
                ));
                self.show_hold(&Hold::RetryingAfterTimeout);
            }
            Event::Contended {
                chunk,
                stage,
                error,
                so_far,
                delay,
                budget,
            } => self.log(&format!(
                "{name}: {chunk} failed while {stage}: {error}; lock contention for {}s so far: retrying in {} ms, for up to {} in all",
                so_far.as_secs(),
                delay.as_millis(),
                humantime::format_duration(budget)
            )),
            Event::ContentionOver { lasted } => self.log(&format!(
                "{name}: the lock contention is over after {}s; continuing",
                lasted.as_secs()
            )),
            Event::SkipInterrupted { key, error } => self.log(&format!(
                "{name}: recording the failure at key {key} was interrupted ({error}); trying again"
            )),
            Event::Skipped {
                key,
                error,
                newly_failing,
            } => self.skipped(key, error, newly_failing),
            _ => self.run_event_missed(event),
        }
    }

    /// A poison key was recorded and passed: the log line, and the counts.
    fn skipped(&self, key: &str, error: &str, newly_failing: bool) {
        let name = self.job.as_str();
        self.log(&format!(
            "{name}: skipped key {key} ({error}); recorded in the failures table — `backfill failures {name}` lists it, `backfill retry-failures {name}` retries it"
        ));
        self.key_skipped(newly_failing);
    }

    /// Shows a hold the run's row does not store on the progress line.
    fn show_hold(&self, hold: &Hold) {
        self.set_held(Some(&hold.to_string()));
        self.set_hold_reason(Some(hold.reason()));
    }

    /// Every event is either the run's or the walk's: a new one must be added to one of them.
    fn run_event_missed(&self, event: Event<'_>) {
        debug_assert!(false, "event not shown: {event:?}");
    }
}

/// The live settings `backfill set` gave, as the log line and `backfill set` show them.
pub fn describe_controls(c: &Controls) -> String {
    format!(
        "rows_per_second {}, target_chunk_time {}, pause {}",
        c.rows_per_second
            .map(|r| r.to_string())
            .unwrap_or_else(|| "(job's)".into()),
        c.target_chunk_time
            .map(|d| humantime::format_duration(d).to_string())
            .unwrap_or_else(|| "(job's)".into()),
        c.pause
            .map(|d| humantime::format_duration(d).to_string())
            .unwrap_or_else(|| "(job's)".into()),
    )
}
