//! A fleet run's display: one reporter per shard (an ordinary [`Progress`] whose lines name the
//! shard and whose metrics carry a `shard` label) and the fleet's total — on a terminal a line
//! under the shards' bars, otherwise a plain line every `--progress-interval`. Owns the total
//! and the shards' place on the screen; what one shard shows is the reporter's.

use super::bar::{self, log_line};
use super::{Progress, ProgressOptions, Screen, State, STEADY_TICK};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The name the total goes by where a shard's name would stand (no shard may be called so).
pub const TOTAL: &str = "all";

/// The shards' reporters, and the total over them.
pub struct FleetDisplay {
    job: String,
    opts: ProgressOptions,
    shards: usize,
    multi: Option<MultiProgress>,
    total: Option<ProgressBar>,
    /// Every shard's reporter state since its run began.
    started: Arc<Mutex<Vec<Arc<Mutex<State>>>>>,
    since: Instant,
}

impl FleetDisplay {
    /// For job `job` on a fleet of `shards`: bars when stderr is a terminal, plain lines
    /// otherwise.
    pub fn new(job: &str, shards: usize, opts: ProgressOptions) -> FleetDisplay {
        let started = Arc::new(Mutex::new(Vec::new()));
        let since = Instant::now();
        let (multi, total) = if std::io::stderr().is_terminal() {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let total = total_bar(job, shards, &started, since);
            (Some(multi.clone()), Some(multi.add(total)))
        } else {
            (None, None)
        };
        if let Some(total) = &total {
            total.enable_steady_tick(STEADY_TICK);
        }
        FleetDisplay {
            job: job.to_string(),
            opts,
            shards,
            multi,
            total,
            started,
            since,
        }
    }

    /// The reporter of the job's run on `shard`.
    pub fn shard(&self, shard: &str) -> Progress {
        let screen = match &self.multi {
            Some(m) => Screen::Fleet(m.clone()),
            None => Screen::Plain,
        };
        let progress = Progress::build(&self.job, Some(shard), self.opts, screen);
        self.started.lock().unwrap().push(progress.state.clone());
        progress
    }

    /// A log line about the whole fleet.
    pub fn log(&self, line: &str) {
        let line = log_line(&self.job, None, self.opts.json, line);
        match &self.multi {
            Some(m) => m.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// The plain total line (without a terminal; the bar draws its own).
    pub fn total_line(&self) -> Option<String> {
        if self.multi.is_some() {
            return None;
        }
        let states = self.started.lock().unwrap();
        let total = Total::of(&states, self.shards, self.since);
        Some(bar::progress_line(&total.frame(&self.job), self.opts.json))
    }

    /// Ends the display.
    pub fn finish(&self) {
        if let Some(total) = &self.total {
            total.finish_and_clear();
        }
    }
}

fn total_bar(
    job: &str,
    shards: usize,
    started: &Arc<Mutex<Vec<Arc<Mutex<State>>>>>,
    since: Instant,
) -> ProgressBar {
    let (job, started) = (job.to_string(), started.clone());
    super::line_bar(move |width| {
        let states = started.lock().unwrap();
        bar::render(&Total::of(&states, shards, since).frame(&job), width)
    })
}

/// The fleet's figures: keys done on every shard started so far, of their totals once every
/// shard has started (a shard that ended without walking, e.g. already done, counts for
/// nothing); the rate of the shards running now.
struct Total {
    done: u64,
    total: Option<u64>,
    rate: f64,
    workers: u32,
    elapsed: std::time::Duration,
}

impl Total {
    fn of(states: &[Arc<Mutex<State>>], shards: usize, since: Instant) -> Total {
        let mut t = Total {
            done: 0,
            total: Some(0),
            rate: 0.0,
            workers: 0,
            elapsed: since.elapsed(),
        };
        for state in states {
            let s = state.lock().unwrap();
            // A shard whose run ended before it walked (already done, refused, unreachable)
            // has nothing to add to the total, and must not keep it unknown.
            if !s.running && s.total.is_none() && s.rows == 0 {
                continue;
            }
            let (_, _, rate) = super::figures(&s);
            t.done += s.pass_rows();
            t.total = t.total.zip(s.total).map(|(a, b)| a + b);
            if s.running {
                t.rate += rate;
                t.workers += s.workers;
            }
        }
        if states.len() < shards {
            t.total = None;
        }
        t
    }

    fn frame<'a>(&self, job: &'a str) -> bar::Frame<'a> {
        let eta = self
            .total
            .filter(|_| self.rate > 0.0)
            .map(|total| total.saturating_sub(self.done) as f64 / self.rate);
        bar::Frame {
            job,
            shard: Some(TOTAL),
            sweep: None,
            done: self.done,
            total: self.total,
            rate: self.rate,
            eta,
            held: None,
            chunk: 0,
            workers: self.workers,
            elapsed: self.elapsed,
        }
    }
}
