//! The engine as a contender: the real `backfill` binary, pointed at the benchmark's database
//! and jobs, run to completion and measured by its own rusage (wait4), or stopped at the budget;
//! its own counters (rows, chunks, round trips) come from the JSON report it prints with
//! `--json`.
//!
//! Knows nothing of the contenders or of the report: it runs a command and says what it cost.

use crate::measured::Counters;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The engine process's own cost.
pub struct Usage {
    pub cpu: Duration,
    pub max_rss_kb: i64,
    /// From the run's JSON report (`--json` on stdout), when it printed one.
    pub counters: Option<Counters>,
}

/// The engine binary with the database `url` (the benchmark's, or through the proxy) and jobs.
pub fn command(url: &str, jobs: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backfill"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") || k == "DATABASE_URL" || k.starts_with("BACKFILL_") {
            c.env_remove(k);
        }
    }
    c.arg("--database-url")
        .arg(url)
        .arg("--jobs")
        .arg(jobs)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

/// Why an engine run gave no measurement.
#[derive(Debug)]
pub enum EngineRun {
    /// Still running at the budget: stopped (SIGINT, as an operator's Ctrl-C; SIGKILL when it
    /// does not stop within `STOP_GRACE`), with its counters so far when it printed them.
    OverBudget(Option<Counters>),
    /// Exited with this wait status (not 0).
    Failed(i32),
}

/// How long an engine stopped at the budget may take to stop cleanly.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Creates the engine's schema (`backfill init`), so that no measured run pays for it.
pub fn init(url: &str, jobs: &Path) {
    let status = command(url, jobs, &["init"])
        .stdout(Stdio::null())
        .status()
        .expect("the backfill binary");
    assert!(status.success(), "backfill init failed: {status}");
}

/// Runs the engine to completion and returns its own rusage, or why there is none.
// The child is reaped with wait4 (for its rusage), not through std's Child.
#[allow(clippy::zombie_processes)]
pub fn run_measured(mut cmd: Command, budget: Duration) -> Result<Usage, EngineRun> {
    let mut child = cmd.spawn().expect("the backfill binary");
    let pid = child.id() as libc::pid_t;
    // Read on a thread of its own, so a full pipe never stalls the engine.
    let stdout = child.stdout.take().map(|mut out| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            text
        })
    });
    let read_counters = move || counters(&stdout.and_then(|t| t.join().ok()).unwrap_or_default());
    let t = Instant::now();
    let mut interrupted = false;
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills in; pid is our own child.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            if interrupted {
                return Err(EngineRun::OverBudget(read_counters()));
            }
            if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                return Err(EngineRun::Failed(status));
            }
            let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
            return Ok(Usage {
                cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
                max_rss_kb: ru.ru_maxrss,
                counters: read_counters(),
            });
        }
        if t.elapsed() > budget && !interrupted {
            interrupted = true;
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        if t.elapsed() > budget + STOP_GRACE {
            // SAFETY: signalling our own child, then reaping it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let mut st = 0;
            unsafe { libc::waitpid(pid, &mut st, 0) };
            return Err(EngineRun::OverBudget(None));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Rows, chunks and round trips from the run's JSON report; `round_trips` may be absent (an
/// engine that does not count them).
fn counters(stdout: &str) -> Option<Counters> {
    let start = stdout.find('{')?;
    let v: serde_json::Value = serde_json::from_str(stdout[start..].trim()).ok()?;
    Some(Counters {
        rows: v.get("rows")?.as_i64()?,
        chunks: v.get("chunks")?.as_i64()?,
        round_trips: v.get("round_trips").and_then(|r| r.as_i64()),
    })
}
