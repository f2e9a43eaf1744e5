//! The engine as a contender: the real `backfill` binary, pointed at the benchmark's database
//! and jobs, run to completion and measured by its own rusage (wait4), or stopped at the budget.
//!
//! Knows nothing of the contenders or of the report: it runs a command and says what it cost.

use crate::Server;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The engine process's own cost.
pub struct Usage {
    pub cpu: Duration,
    pub max_rss_kb: i64,
}

/// The engine binary with the benchmark's database and jobs.
pub fn command(server: &Server, jobs: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backfill"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") || k == "DATABASE_URL" || k.starts_with("BACKFILL_") {
            c.env_remove(k);
        }
    }
    c.arg("--database-url")
        .arg(&server.url)
        .arg("--jobs")
        .arg(jobs)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Why an engine run gave no measurement.
#[derive(Debug)]
pub enum EngineRun {
    /// Still running at the budget: killed.
    OverBudget,
    /// Exited with this wait status (not 0).
    Failed(i32),
}

/// Creates the engine's schema (`backfill init`), so that no measured run pays for it.
pub fn init(server: &Server, jobs: &Path) {
    let status = command(server, jobs, &["init"])
        .status()
        .expect("the backfill binary");
    assert!(status.success(), "backfill init failed: {status}");
}

/// Runs the engine to completion and returns its own rusage, or why there is none.
pub fn run_measured(mut cmd: Command, budget: Duration) -> Result<Usage, EngineRun> {
    // Reaped below with wait4 (for its rusage), not through std's Child.
    let pid = cmd.spawn().expect("the backfill binary").id() as libc::pid_t;
    let t = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills in; pid is our own child.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                return Err(EngineRun::Failed(status));
            }
            let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
            return Ok(Usage {
                cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
                max_rss_kb: ru.ru_maxrss,
            });
        }
        if t.elapsed() > budget {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let mut st = 0;
            unsafe { libc::waitpid(pid, &mut st, 0) };
            return Err(EngineRun::OverBudget);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
