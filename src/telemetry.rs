//! What the operator sees while a job runs: a progress bar on a terminal, a plain progress line
//! every few seconds otherwise, and log lines that never break the bar (all on stderr).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the plain (non-terminal) progress line is printed.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    job: String,
    bar: Option<ProgressBar>,
    plain: Mutex<PlainState>,
    quiet: bool,
}

struct PlainState {
    last: Instant,
    started: Instant,
    start_rows: u64,
    rows: u64,
    total: Option<u64>,
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn new(job: &str) -> Progress {
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
        Progress {
            job: job.to_string(),
            bar,
            plain: Mutex::new(PlainState {
                last: Instant::now(),
                started: Instant::now(),
                start_rows: 0,
                rows: 0,
                total: None,
            }),
            quiet: false,
        }
    }

    /// No output at all (library callers, tests).
    pub fn hidden(job: &str) -> Progress {
        Progress {
            quiet: true,
            bar: None,
            ..Progress::new(job)
        }
    }

    /// Starts (or resumes) at `done` rows of an estimated `total`. Restored rows are not counted
    /// as progress of this run, so rate and ETA stay honest after a resume.
    pub fn start(&self, done: u64, total: Option<u64>) {
        let total = total.map(|t| t.max(done));
        if let Some(bar) = &self.bar {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(done);
            bar.reset_eta();
        }
        let mut p = self.plain.lock().unwrap();
        p.start_rows = done;
        p.rows = done;
        p.total = total;
        p.started = Instant::now();
        p.last = Instant::now();
    }

    /// Records rows finished.
    pub fn advance(&self, rows: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(rows);
            if bar.length().is_some_and(|l| bar.position() > l) {
                bar.set_length(bar.position());
            }
            return;
        }
        let mut p = self.plain.lock().unwrap();
        p.rows += rows;
        if let Some(t) = p.total {
            p.total = Some(t.max(p.rows));
        }
        if p.last.elapsed() >= PLAIN_EVERY && !self.quiet {
            p.last = Instant::now();
            let line = plain_line(&self.job, &p);
            drop(p);
            eprintln!("{line}");
        }
    }

    /// A short status after the bar (e.g. "retrying after lock timeout").
    pub fn message(&self, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg.to_string());
        }
    }

    /// A log line on stderr that does not break the bar.
    pub fn log(&self, line: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn plain_line(job: &str, p: &PlainState) -> String {
    let secs = p.started.elapsed().as_secs_f64().max(0.001);
    let rate = (p.rows - p.start_rows) as f64 / secs;
    match p.total {
        Some(t) if t > 0 => {
            let pct = 100.0 * p.rows as f64 / t as f64;
            let eta = if rate > 0.0 {
                format!("{}s", ((t - p.rows) as f64 / rate).round() as u64)
            } else {
                "unknown".into()
            };
            format!(
                "{job}: {} of ~{t} rows ({pct:.1}%), {rate:.0} rows/s, eta {eta}",
                p.rows
            )
        }
        _ => format!("{job}: {} rows, {rate:.0} rows/s", p.rows),
    }
}
