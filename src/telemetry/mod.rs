//! What the operator sees while a job runs, and what Prometheus scrapes. It listens to the
//! engine's events (`listen`: each event becomes a log line, a metric or the bar's state), so
//! the engine formats none of it; it must not reach back into the engine.
//!
//! On a terminal: a progress bar on stderr (rows of the estimated total, percent, rate, ETA, chunk
//! size, workers, and why the run is held, if it is), redrawn on a steady tick so its timer runs
//! while nothing commits; its text and layout are `bar`'s. Otherwise: one plain line every
//! `--progress-interval`, as text or JSON (`--log-format json`). Log lines go through the bar's
//! `suspend`, so they never break it. This module owns the reporter's state (which the bar reads
//! at each draw: the bar is never called while that state is locked). Metrics use the `metrics`
//! facade; the exporter is installed (by [`serve_metrics`]) before any handle is created, or the
//! handles would stay no-ops.

mod bar;
mod export;
mod finishing;
mod fleet;
mod listen;

pub use export::{
    parse_metrics_addr, serve_metrics, CHUNK_DURATION_BUCKETS, CHUNK_OUTCOMES, ERROR_CLASSES,
    METRICS, PAUSED_STATE, STATES,
};
pub use fleet::{FleetDisplay, TOTAL as FLEET_TOTAL};
pub use listen::describe_controls;

use crate::hold::HoldReason;
use crate::state::JobState;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Label};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
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
    /// The sweep pass being walked (None: the first pass).
    sweep: Option<i32>,
    /// The job's keys done when the current pass started: a sweep walks every key again, and
    /// its progress is counted from zero against the same total.
    pass_base: u64,
}

impl State {
    fn new() -> State {
        State {
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
            sweep: None,
            pass_base: 0,
        }
    }

    /// Keys done in the current pass.
    fn pass_rows(&self) -> u64 {
        self.rows.saturating_sub(self.pass_base)
    }

    /// What the bar and the progress line show now.
    fn frame<'a>(&'a self, job: &'a str, shard: Option<&'a str>) -> bar::Frame<'a> {
        let (_, eta, rate) = figures(self);
        bar::Frame {
            job,
            shard,
            sweep: self.sweep,
            done: self.pass_rows(),
            total: self.total,
            rate,
            eta,
            held: self.held.as_deref(),
            chunk: self.chunk_size,
            workers: self.workers,
            elapsed: self.started.elapsed(),
        }
    }
}

/// How often the bar is redrawn while nothing else happens, so its timer runs while held.
const STEADY_TICK: Duration = Duration::from_millis(200);

/// A bar that draws nothing until the run starts (`start` points it at stderr); its one line
/// is rendered from the reporter's state at each draw, fitted to the terminal's width.
fn terminal_bar(job: &str, shard: Option<&str>, state: &Arc<Mutex<State>>) -> ProgressBar {
    let (job, shard, state) = (job.to_string(), shard.map(str::to_string), state.clone());
    line_bar(move |width| {
        let s = state.lock().unwrap();
        bar::render(&s.frame(&job, shard.as_deref()), width)
    })
}

/// A bar that draws nothing until it is given a target, whose one line is `line(width)` at each
/// draw.
fn line_bar(line: impl Fn(usize) -> String + Clone + Send + Sync + 'static) -> ProgressBar {
    let key = move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = w.write_str(&line(bar::terminal_width()));
    };
    let style = ProgressStyle::with_template("{line}")
        .expect("valid template")
        .with_key("line", key);
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    bar.set_style(style);
    bar
}

/// Where a reporter draws its bar: nowhere (plain lines), alone on the terminal, or as one line
/// of a fleet's display.
enum Screen {
    Plain,
    Terminal,
    Fleet(MultiProgress),
}

/// The run's reporter: progress display, log lines and metrics for one job (on one shard of a
/// fleet, when `shard` is set: its log lines name it, its metrics carry a `shard` label).
pub struct Progress {
    job: String,
    shard: Option<String>,
    /// `backfill_job`, and `shard` on a fleet: every series carries them.
    labels: Vec<Label>,
    bar: Option<ProgressBar>,
    /// The fleet's display the bar is a line of.
    multi: Option<MultiProgress>,
    opts: ProgressOptions,
    quiet: bool,
    /// Shared with the bar, which reads it at each draw: never call the bar while holding it.
    state: Arc<Mutex<State>>,
    m: Handles,
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn new(job: &str, opts: ProgressOptions) -> Progress {
        let screen = match std::io::stderr().is_terminal() {
            true => Screen::Terminal,
            false => Screen::Plain,
        };
        Progress::build(job, None, opts, screen)
    }

    fn build(job: &str, shard: Option<&str>, opts: ProgressOptions, screen: Screen) -> Progress {
        let state = Arc::new(Mutex::new(State::new()));
        let (bar, multi) = match screen {
            Screen::Plain => (None, None),
            Screen::Terminal => (Some(terminal_bar(job, shard, &state)), None),
            Screen::Fleet(m) => (Some(terminal_bar(job, shard, &state)), Some(m)),
        };
        let mut labels = vec![Label::new("backfill_job", job.to_string())];
        if let Some(shard) = shard {
            labels.push(Label::new("shard", shard.to_string()));
        }
        let with = |k: &'static str, v: &'static str| {
            let mut l = labels.clone();
            l.push(Label::new(k, v));
            l
        };
        let j = labels.clone();
        let m = Handles {
            rows: counter!("backfill_rows_processed_total", j.clone()),
            changed: counter!("backfill_rows_changed_total", j.clone()),
            round_trips: counter!("backfill_round_trips_total", j.clone()),
            duration: histogram!("backfill_chunk_duration_seconds", j.clone()),
            chunk_size: gauge!("backfill_chunk_size_rows", j.clone()),
            ratio: gauge!("backfill_progress_ratio", j.clone()),
            eta: gauge!("backfill_eta_seconds", j.clone()),
            rows_done: gauge!("backfill_rows_done", j.clone()),
            total: gauge!("backfill_rows_total_estimate", j.clone()),
            workers: gauge!("backfill_active_workers", j.clone()),
            lag: gauge!("backfill_replication_lag_seconds", j.clone()),
            failing: gauge!("backfill_failing_keys", j.clone()),
        };
        // Register every labelled series at zero, so dashboards and alerts see 0, not "no data".
        for o in CHUNK_OUTCOMES {
            counter!("backfill_chunks_total", with("outcome", o)).increment(0);
        }
        for r in HoldReason::ALL {
            counter!("backfill_held_seconds_total", with("reason", r.label())).increment(0);
        }
        for c in ERROR_CLASSES {
            counter!("backfill_retries_total", with("class", c)).increment(0);
        }
        gauge!("backfill_rate_limit_rows_per_second", j.clone()).set(0.0);
        for r in HoldReason::ALL {
            gauge!("backfill_held", with("reason", r.label())).set(0.0);
        }
        m.failing.set(0.0);
        Progress {
            job: job.to_string(),
            shard: shard.map(str::to_string),
            labels,
            bar,
            multi,
            opts,
            quiet: false,
            state,
            m,
        }
    }

    /// No output at all (library callers); metrics still count.
    pub fn hidden(job: &str) -> Progress {
        Progress {
            quiet: true,
            ..Progress::build(job, None, ProgressOptions::default(), Screen::Plain)
        }
    }

    /// Starts (or resumes) at `done` keys of an estimated `total`, `pass_done` of them in the
    /// pass over the keys the job is in (`sweep`: a sweep pass; None: the first pass), which the
    /// bar counts. Restored keys are not counted as this run's progress, so rate and ETA stay
    /// honest after a resume.
    pub fn start(
        &self,
        done: u64,
        pass: (Option<i32>, u64),
        total: Option<u64>,
        chunk_size: u64,
        failing_keys: u64,
    ) {
        let (sweep, pass_done) = pass;
        let total = total.map(|t| t.max(pass_done));
        {
            let mut s = self.state.lock().unwrap();
            s.sweep = sweep;
            s.pass_base = done.saturating_sub(pass_done);
            s.chunk_size = chunk_size;
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
        if let Some(bar) = &self.bar {
            match &self.multi {
                Some(multi) => {
                    multi.add(bar.clone());
                }
                None => bar.set_draw_target(ProgressDrawTarget::stderr()),
            }
            bar.enable_steady_tick(STEADY_TICK);
        }
    }

    /// A sweep pass starts walking every key again: its progress counts from zero.
    pub fn sweep_started(&self, pass: i32) {
        self.change_state(|s| {
            s.sweep = Some(pass);
            s.pass_base = s.rows;
        });
    }

    /// A chunk of `size` keys at most committed (the size `status` shows as the last chunk's):
    /// `keys` processed, `changed` rows changed, in `took`.
    pub fn chunk_committed(
        &self,
        size: u64,
        keys: u64,
        changed: u64,
        took: Duration,
        round_trips: u32,
    ) {
        counter!("backfill_chunks_total", self.with("outcome", "committed")).increment(1);
        self.m.changed.increment(changed);
        self.m.round_trips.increment(u64::from(round_trips));
        self.m.duration.record(took.as_secs_f64());
        self.change_state(|s| {
            s.held = None;
            s.chunk_size = size;
        });
        self.set_hold_reason(None);
        self.update(keys);
    }

    /// A poison key was recorded and passed (`on_error = "skip"`); `newly_failing` when it was
    /// not already recorded as failing.
    pub fn key_skipped(&self, newly_failing: bool) {
        counter!("backfill_chunks_total", self.with("outcome", "skipped")).increment(1);
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
        counter!("backfill_chunks_total", self.with("outcome", "failed")).increment(1);
        counter!("backfill_retries_total", self.with("class", class)).increment(1);
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
            counter!(
                "backfill_held_seconds_total",
                self.with("reason", reason.label())
            )
            .increment(whole);
        }
    }

    /// Shows why the run is not making progress right now (None: it is).
    pub fn set_held(&self, reason: Option<&str>) {
        self.change_state(|s| s.held = reason.map(str::to_string));
    }

    /// Workers of this run.
    pub fn set_workers(&self, n: u32) {
        self.m.workers.set(n as f64);
        self.change_state(|s| s.workers = n);
    }

    /// The job's keys done by all its runs together (read from the database), so that progress,
    /// rate and ETA cover every process working on the job. This run's own counter is unchanged.
    pub fn sync_job_rows(&self, done: u64) {
        let mut s = self.state.lock().unwrap();
        if done <= s.rows {
            return;
        }
        s.rows = done;
        self.rows_moved(&mut s);
        drop(s);
        self.redraw();
    }

    /// The chunk size now in use, for the gauge (the bar shows the last committed chunk's).
    pub fn set_chunk_size(&self, rows: u64) {
        self.m.chunk_size.set(rows as f64);
    }

    /// The rate ceiling in force (None: none).
    pub fn set_rate_limit(&self, rows_per_second: Option<u32>) {
        gauge!("backfill_rate_limit_rows_per_second", self.labels.clone())
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
            gauge!("backfill_held", self.with("reason", r.label())).set(if Some(r) == reason {
                1.0
            } else {
                0.0
            });
        }
    }

    fn set_state(&self, state: JobState) {
        let paused = state == JobState::Running
            && self.state.lock().unwrap().hold == Some(HoldReason::Paused);
        for s in STATES {
            gauge!("backfill_state", self.with("state", s.as_sql()))
                .set(if *s == state && !paused { 1.0 } else { 0.0 });
        }
        gauge!("backfill_state", self.with("state", PAUSED_STATE)).set(if paused {
            1.0
        } else {
            0.0
        });
    }

    /// Changes what the bar and the progress line show, then redraws the bar (outside the lock).
    fn change_state(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.state.lock().unwrap());
        self.redraw();
    }

    fn redraw(&self) {
        if let Some(bar) = &self.bar {
            bar.tick();
        }
    }

    /// After the rows done changed: the total is at least that, and the gauges follow.
    fn rows_moved(&self, s: &mut State) {
        if let Some(t) = s.total {
            s.total = Some(t.max(s.pass_rows()));
        }
        let (ratio, eta, _) = figures(s);
        self.m.rows_done.set(s.rows as f64);
        self.m.ratio.set(ratio.unwrap_or(0.0));
        self.m.eta.set(eta.unwrap_or(0.0));
    }

    fn update(&self, keys: u64) {
        self.m.rows.increment(keys);
        let line = {
            let mut s = self.state.lock().unwrap();
            s.rows += keys;
            self.rows_moved(&mut s);
            let due = self.bar.is_none()
                && !self.quiet
                && keys > 0
                && s.last_line.elapsed() >= self.opts.interval;
            due.then(|| {
                s.last_line = Instant::now();
                self.progress_line(&s)
            })
        };
        match line {
            Some(line) => eprintln!("{line}"),
            None => self.redraw(),
        }
    }

    fn progress_line(&self, s: &State) -> String {
        bar::progress_line(&s.frame(&self.job, self.shard.as_deref()), self.opts.json)
    }

    /// A log line on stderr that does not break the bar.
    pub fn log(&self, line: &str) {
        if self.quiet {
            return;
        }
        let line = bar::log_line(&self.job, self.shard.as_deref(), self.opts.json, line);
        match (&self.multi, &self.bar) {
            (Some(multi), _) => multi.suspend(|| eprintln!("{line}")),
            (None, Some(bar)) => bar.suspend(|| eprintln!("{line}")),
            (None, None) => eprintln!("{line}"),
        }
    }

    /// The series' labels with one more.
    fn with(&self, key: &'static str, value: &'static str) -> Vec<Label> {
        let mut labels = self.labels.clone();
        labels.push(Label::new(key, value));
        labels
    }

    /// Ends the display and records the final state.
    pub fn finish(&self, state: JobState) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            if let Some(multi) = &self.multi {
                multi.remove(bar);
            }
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
    let done = s.pass_rows();
    let ratio = s
        .total
        .filter(|t| *t > 0)
        .map(|t| (done as f64 / t as f64).min(1.0));
    let eta = s
        .total
        .filter(|_| rate > 0.0)
        .map(|t| t.saturating_sub(done) as f64 / rate);
    (ratio, eta, rate)
}

/// Now, as the `ts` of a JSON log line.
fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_counts_its_own_pass_against_the_same_total() {
        let s = State {
            rows: 450,
            pass_base: 300,
            total: Some(300),
            ..State::new()
        };
        let (ratio, _, _) = figures(&s);
        assert_eq!(ratio, Some(0.5));
        assert_eq!(s.frame("j", None).done, 150);
    }

    #[test]
    fn figures_never_exceed_one_and_ignore_restored_rows() {
        let s = State {
            started: Instant::now() - Duration::from_secs(10),
            start_rows: 900,
            rows: 1000,
            total: Some(950),
            chunk_size: 10,
            ..State::new()
        };
        let (ratio, eta, rate) = figures(&s);
        assert_eq!(ratio, Some(1.0));
        assert_eq!(eta, Some(0.0));
        assert!((rate - 10.0).abs() < 0.5, "{rate}");
    }
}
