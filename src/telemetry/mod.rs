//! What the operator sees while a job runs, and what Prometheus scrapes. It listens to the
//! engine's events (`listen`: each event becomes a log line, a metric or the bar's state), so
//! the engine formats none of it; it must not reach back into the engine.
//!
//! On a terminal: a progress bar on stderr (rows of the estimated total, percent, rate, ETA, chunk
//! size, workers, and why the run is held, if it is). Otherwise: one plain line every
//! `--progress-interval`, as text or JSON (`--log-format json`). Log lines go through the bar's
//! `suspend`, so they never break it. Metrics use the `metrics` facade; the exporter is installed
//! (by [`serve_metrics`]) before any handle is created, or the handles would stay no-ops.

mod export;
mod finishing;
mod listen;

pub use export::{
    parse_metrics_addr, serve_metrics, CHUNK_DURATION_BUCKETS, CHUNK_OUTCOMES, ERROR_CLASSES,
    METRICS, PAUSED_STATE, STATES,
};
pub use listen::describe_controls;

use crate::hold::HoldReason;
use crate::state::JobState;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Default interval of the plain (non-terminal) progress line.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// How progress is shown when stderr is not a terminal, and how log lines are written.
#[derive(Debug, Clone, Copy)]
pub struct ProgressOptions {
    pub interval: Duration,
    pub json: bool,
}

impl Default for ProgressOptions {
    fn default() -> Self {
        ProgressOptions {
            interval: DEFAULT_PROGRESS_INTERVAL,
            json: false,
        }
    }
}

struct Handles {
    rows: Counter,
    changed: Counter,
    round_trips: Counter,
    duration: Histogram,
    chunk_size: Gauge,
    ratio: Gauge,
    eta: Gauge,
    rows_done: Gauge,
    total: Gauge,
    workers: Gauge,
    lag: Gauge,
    failing: Gauge,
}

struct State {
    last_line: Instant,
    started: Instant,
    start_rows: u64,
    rows: u64,
    total: Option<u64>,
    chunk_size: u64,
    workers: u32,
    held: Option<String>,
    held_carry: [f64; HoldReason::ALL.len()],
    /// Why the run is held now, as the `backfill_held` gauge shows it.
    hold: Option<HoldReason>,
    /// Between the run's start and its end (a pause shows as a state only then).
    running: bool,
    /// The job's unresolved failing keys: the store's count at the start, plus this run's.
    failing: u64,
}

fn workers(n: u32) -> String {
    match n {
        1 => "1 worker".into(),
        n => format!("{n} workers"),
    }
}

/// The run's reporter: progress display, log lines and metrics for one job.
pub struct Progress {
    job: String,
    bar: Option<ProgressBar>,
    opts: ProgressOptions,
    quiet: bool,
    state: Mutex<State>,
    m: Handles,
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn new(job: &str, opts: ProgressOptions) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows ({percent}%) {per_sec} eta {eta} {msg}",
                )
                .expect("valid template"),
            );
            bar.set_prefix(job.to_string());
            bar
        });
        let j = job.to_string();
        let m = Handles {
            rows: counter!("backfill_rows_processed_total", "backfill_job" => j.clone()),
            changed: counter!("backfill_rows_changed_total", "backfill_job" => j.clone()),
            round_trips: counter!("backfill_round_trips_total", "backfill_job" => j.clone()),
            duration: histogram!("backfill_chunk_duration_seconds", "backfill_job" => j.clone()),
            chunk_size: gauge!("backfill_chunk_size_rows", "backfill_job" => j.clone()),
            ratio: gauge!("backfill_progress_ratio", "backfill_job" => j.clone()),
            eta: gauge!("backfill_eta_seconds", "backfill_job" => j.clone()),
            rows_done: gauge!("backfill_rows_done", "backfill_job" => j.clone()),
            total: gauge!("backfill_rows_total_estimate", "backfill_job" => j.clone()),
            workers: gauge!("backfill_active_workers", "backfill_job" => j.clone()),
            lag: gauge!("backfill_replication_lag_seconds", "backfill_job" => j.clone()),
            failing: gauge!("backfill_failing_keys", "backfill_job" => j.clone()),
        };
        // Register every labelled series at zero, so dashboards and alerts see 0, not "no data".
        for o in CHUNK_OUTCOMES {
            counter!("backfill_chunks_total", "backfill_job" => j.clone(), "outcome" => *o)
                .increment(0);
        }
        for r in HoldReason::ALL {
            counter!("backfill_held_seconds_total", "backfill_job" => j.clone(), "reason" => r.label())
                .increment(0);
        }
        for c in ERROR_CLASSES {
            counter!("backfill_retries_total", "backfill_job" => j.clone(), "class" => *c)
                .increment(0);
        }
        gauge!("backfill_rate_limit_rows_per_second", "backfill_job" => j.clone()).set(0.0);
        for r in HoldReason::ALL {
            gauge!("backfill_held", "backfill_job" => j.clone(), "reason" => r.label()).set(0.0);
        }
        m.failing.set(0.0);
        Progress {
            job: j,
            bar,
            opts,
            quiet: false,
            state: Mutex::new(State {
                last_line: Instant::now(),
                started: Instant::now(),
                start_rows: 0,
                rows: 0,
                total: None,
                chunk_size: 0,
                workers: 1,
                held: None,
                held_carry: [0.0; HoldReason::ALL.len()],
                hold: None,
                running: false,
                failing: 0,
            }),
            m,
        }
    }

    /// No output at all (library callers); metrics still count.
    pub fn hidden(job: &str) -> Progress {
        Progress {
            quiet: true,
            bar: None,
            ..Progress::new(job, ProgressOptions::default())
        }
    }

    /// Starts (or resumes) at `done` keys of an estimated `total`. Restored keys are not counted
    /// as this run's progress, so rate and ETA stay honest after a resume.
    pub fn start(&self, done: u64, total: Option<u64>, chunk_size: u64, failing_keys: u64) {
        let total = total.map(|t| t.max(done));
        if let Some(bar) = &self.bar {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(done);
            bar.reset_eta();
        }
        {
            let mut s = self.state.lock().unwrap();
            s.start_rows = done;
            s.rows = done;
            s.total = total;
            s.started = Instant::now();
            s.last_line = Instant::now();
            s.running = true;
            s.failing = failing_keys;
        }
        self.m.failing.set(failing_keys as f64);
        self.set_state(JobState::Running);
        self.m.workers.set(1.0);
        self.m.total.set(total.unwrap_or(0) as f64);
        self.m.rows_done.set(done as f64);
        self.set_chunk_size(chunk_size);
        self.update(0);
    }

    /// A chunk committed: `keys` processed, `changed` rows changed, in `took`.
    pub fn chunk_committed(&self, keys: u64, changed: u64, took: Duration, round_trips: u32) {
        counter!("backfill_chunks_total", "backfill_job" => self.job.clone(), "outcome" => "committed")
            .increment(1);
        self.m.changed.increment(changed);
        self.m.round_trips.increment(u64::from(round_trips));
        self.m.duration.record(took.as_secs_f64());
        self.set_held(None);
        self.set_hold_reason(None);
        self.update(keys);
    }

    /// A poison key was recorded and passed (`on_error = "skip"`); `newly_failing` when it was
    /// not already recorded as failing.
    pub fn key_skipped(&self, newly_failing: bool) {
        counter!("backfill_chunks_total", "backfill_job" => self.job.clone(), "outcome" => "skipped")
            .increment(1);
        self.failing_keys_moved(|n| n + u64::from(newly_failing));
        self.update(1);
    }

    /// A failing key now succeeds (`retry-failures`).
    pub fn key_resolved(&self) {
        self.failing_keys_moved(|n| n.saturating_sub(1));
    }

    fn failing_keys_moved(&self, change: impl FnOnce(u64) -> u64) {
        let mut s = self.state.lock().unwrap();
        s.failing = change(s.failing);
        self.m.failing.set(s.failing as f64);
    }

    /// A chunk attempt failed with an error of `class` and will be retried (or narrowed).
    pub fn chunk_failed(&self, class: &'static str) {
        counter!("backfill_chunks_total", "backfill_job" => self.job.clone(), "outcome" => "failed")
            .increment(1);
        counter!("backfill_retries_total", "backfill_job" => self.job.clone(), "class" => class)
            .increment(1);
    }

    /// The run was held for `d` for `reason`. Prometheus counters are
    /// integers here, so whole seconds are exported and the remainder is carried to the next hold.
    /// Without a terminal, a held run still prints its progress line every interval (no chunk
    /// commits to trigger one), saying why it is held.
    pub fn held(&self, reason: HoldReason, d: Duration) {
        let i = reason as usize;
        let (whole, line) = {
            let mut s = self.state.lock().unwrap();
            s.held_carry[i] += d.as_secs_f64();
            let whole = s.held_carry[i].floor();
            s.held_carry[i] -= whole;
            let due = self.bar.is_none()
                && !self.quiet
                && s.held.is_some()
                && s.last_line.elapsed() >= self.opts.interval;
            let line = due.then(|| {
                s.last_line = Instant::now();
                self.progress_line(&s)
            });
            (whole as u64, line)
        };
        if let Some(line) = line {
            eprintln!("{line}");
        }
        if whole > 0 {
            counter!("backfill_held_seconds_total", "backfill_job" => self.job.clone(), "reason" => reason.label())
                .increment(whole);
        }
    }

    /// Shows why the run is not making progress right now (None: it is).
    pub fn set_held(&self, reason: Option<&str>) {
        self.update_message(|s| s.held = reason.map(str::to_string));
    }

    /// Workers of this run.
    pub fn set_workers(&self, n: u32) {
        self.m.workers.set(n as f64);
        self.update_message(|s| s.workers = n);
    }

    /// The job's keys done by all its runs together (read from the database), so that progress,
    /// rate and ETA cover every process working on the job. This run's own counter is unchanged.
    pub fn sync_job_rows(&self, done: u64) {
        let mut s = self.state.lock().unwrap();
        if done <= s.rows {
            return;
        }
        let more = done - s.rows;
        s.rows = done;
        self.rows_moved(&mut s);
        drop(s);
        if let Some(bar) = &self.bar {
            bar.inc(more);
        }
    }

    pub fn set_chunk_size(&self, rows: u64) {
        self.m.chunk_size.set(rows as f64);
        self.update_message(|s| s.chunk_size = rows);
    }

    /// The rate ceiling in force (None: none).
    pub fn set_rate_limit(&self, rows_per_second: Option<u32>) {
        gauge!("backfill_rate_limit_rows_per_second", "backfill_job" => self.job.clone())
            .set(rows_per_second.unwrap_or(0) as f64);
    }

    pub fn replication_lag(&self, seconds: f64) {
        self.m.lag.set(seconds);
    }

    /// Why the run is held now (None: it is not), for the `backfill_held` gauge; a pause also
    /// shows as the state `paused` instead of `running`. Only a change touches the gauges.
    pub fn set_hold_reason(&self, reason: Option<HoldReason>) {
        let running = {
            let mut s = self.state.lock().unwrap();
            if s.hold == reason {
                return;
            }
            s.hold = reason;
            s.running
        };
        self.set_held_gauges(reason);
        if running {
            self.set_state(JobState::Running);
        }
    }

    fn set_held_gauges(&self, reason: Option<HoldReason>) {
        for r in HoldReason::ALL {
            gauge!("backfill_held", "backfill_job" => self.job.clone(), "reason" => r.label())
                .set(if Some(r) == reason { 1.0 } else { 0.0 });
        }
    }

    fn set_state(&self, state: JobState) {
        let paused = state == JobState::Running
            && self.state.lock().unwrap().hold == Some(HoldReason::Paused);
        for s in STATES {
            gauge!("backfill_state", "backfill_job" => self.job.clone(), "state" => s.as_sql())
                .set(if *s == state && !paused { 1.0 } else { 0.0 });
        }
        gauge!("backfill_state", "backfill_job" => self.job.clone(), "state" => PAUSED_STATE)
            .set(if paused { 1.0 } else { 0.0 });
    }

    /// Changes what the bar's message shows, then redraws it (outside the lock).
    fn update_message(&self, change: impl FnOnce(&mut State)) {
        let mut s = self.state.lock().unwrap();
        change(&mut s);
        let msg = self.bar_message(&s);
        drop(s);
        if let Some(bar) = &self.bar {
            bar.set_message(msg);
        }
    }

    fn bar_message(&self, s: &State) -> String {
        let held = s
            .held
            .as_deref()
            .map(|h| format!(" · held: {h}"))
            .unwrap_or_default();
        format!("chunk {} · {}{held}", s.chunk_size, workers(s.workers))
    }

    /// After the rows done changed: the total is at least that, and the gauges follow.
    fn rows_moved(&self, s: &mut State) {
        if let Some(t) = s.total {
            s.total = Some(t.max(s.rows));
        }
        let (ratio, eta, _) = figures(s);
        self.m.rows_done.set(s.rows as f64);
        self.m.ratio.set(ratio.unwrap_or(0.0));
        self.m.eta.set(eta.unwrap_or(0.0));
    }

    fn update(&self, keys: u64) {
        self.m.rows.increment(keys);
        let mut s = self.state.lock().unwrap();
        s.rows += keys;
        self.rows_moved(&mut s);
        if let Some(bar) = &self.bar {
            bar.inc(keys);
            if bar.length().is_some_and(|l| bar.position() > l) {
                bar.set_length(bar.position());
            }
            return;
        }
        if !self.quiet && keys > 0 && s.last_line.elapsed() >= self.opts.interval {
            s.last_line = Instant::now();
            let line = self.progress_line(&s);
            drop(s);
            eprintln!("{line}");
        }
    }

    fn progress_line(&self, s: &State) -> String {
        let (ratio, eta, rate) = figures(s);
        if self.opts.json {
            return serde_json::json!({
                "ts": now(),
                "level": "info",
                "job": self.job,
                "event": "progress",
                "rows_done": s.rows,
                "rows_total_estimate": s.total,
                "percent": ratio.map(|r| (r * 1000.0).round() / 10.0),
                "rows_per_second": rate.round(),
                "eta_seconds": eta.map(f64::round),
                "chunk_rows": s.chunk_size,
                "workers": s.workers,
                "held": s.held,
            })
            .to_string();
        }
        let of = s.total.map(|t| format!(" of ~{t}")).unwrap_or_default();
        let pct = ratio
            .map(|r| format!(" ({:.1}%)", r * 100.0))
            .unwrap_or_default();
        let eta = eta
            .map(|e| format!("{}s", e.round() as u64))
            .unwrap_or_else(|| "unknown".into());
        let held = s
            .held
            .as_deref()
            .map(|h| format!(", held: {h}"))
            .unwrap_or_default();
        format!(
            "{}: {}{of} rows{pct}, {rate:.0} rows/s, eta {eta}, chunk {} rows, {}{held}",
            self.job,
            s.rows,
            s.chunk_size,
            workers(s.workers)
        )
    }

    /// A log line on stderr that does not break the bar.
    pub fn log(&self, line: &str) {
        if self.quiet {
            return;
        }
        let line = if self.opts.json {
            let level = if line.starts_with("warning") {
                "warn"
            } else {
                "info"
            };
            serde_json::json!({ "ts": now(), "level": level, "job": self.job, "msg": line })
                .to_string()
        } else {
            line.to_string()
        };
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// Ends the display and records the final state.
    pub fn finish(&self, state: JobState) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        {
            let mut s = self.state.lock().unwrap();
            s.running = false;
            s.hold = None;
        }
        self.set_held_gauges(None);
        self.set_state(state);
        self.m.workers.set(0.0);
        if state == JobState::Done {
            self.m.eta.set(0.0);
        }
    }
}

/// Progress ratio, ETA seconds and this run's rate.
fn figures(s: &State) -> (Option<f64>, Option<f64>, f64) {
    let secs = s.started.elapsed().as_secs_f64().max(0.001);
    let rate = (s.rows - s.start_rows) as f64 / secs;
    let ratio = s
        .total
        .filter(|t| *t > 0)
        .map(|t| (s.rows as f64 / t as f64).min(1.0));
    let eta = s
        .total
        .filter(|_| rate > 0.0)
        .map(|t| t.saturating_sub(s.rows) as f64 / rate);
    (ratio, eta, rate)
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_never_exceed_one_and_ignore_restored_rows() {
        let s = State {
            last_line: Instant::now(),
            started: Instant::now() - Duration::from_secs(10),
            start_rows: 900,
            rows: 1000,
            total: Some(950),
            chunk_size: 10,
            workers: 1,
            held: None,
            held_carry: [0.0; HoldReason::ALL.len()],
            hold: None,
            running: true,
            failing: 0,
        };
        let (ratio, eta, rate) = figures(&s);
        assert_eq!(ratio, Some(1.0));
        assert_eq!(eta, Some(0.0));
        assert!((rate - 10.0).abs() < 0.5, "{rate}");
    }
}
