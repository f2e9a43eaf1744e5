//! `run --fleet` and `revert --fleet`: the job on every shard, at most `max_parallel` shards at
//! once, the next starting as one ends. A shard that fails, is refused or cannot be reached is
//! reported and the others go on; one Ctrl-C stops every shard after its in-flight chunk. Owns
//! the scheduling, the per-shard summary and the fleet's exit code; what a run does on one
//! shard is `run::run_on`'s (each shard keeps its own exactly-once checkpoint).

use super::run::{self, Mode};
use crate::cli::RunArgs;
use crate::error::{exit, Error, ErrorKind, Result};
use crate::executor::{Outcome, Report};
use crate::fleet::{Fleet, Shard};
use crate::store::Store;
use crate::telemetry::{FleetDisplay, Progress, ProgressOptions};
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use std::path::Path;

/// How one shard's run ended (the fleet's summary lists them in the file's order).
struct ShardEnd {
    shard: String,
    /// The exit code its run alone would have had.
    code: u8,
    report: Option<Report>,
    /// The line its run ended with (the error, or the stop and where it resumes).
    error: Option<String>,
}

pub(super) async fn run(
    fleet: &Fleet,
    store: &Store,
    jobs: &Path,
    args: &RunArgs,
    log_json: bool,
    mode: Mode,
) -> Result<u8> {
    let (forward, job) = run::load(jobs, store, &args.name, mode)?;
    let popts = ProgressOptions {
        interval: args.progress_interval,
        json: log_json,
    };
    let (metrics, log, shutdown) = run::start_reporting(args, &job.name, || {
        FleetDisplay::new(&job.name, fleet.shards.len(), popts)
    })?;
    log.log(&format!(
        "{}: fleet {}: {} shards, {} at once",
        job.name,
        fleet.path.display(),
        fleet.shards.len(),
        fleet.max_parallel.min(fleet.shards.len() as u32)
    ));
    let runs = crate::fleet::on_every_shard(fleet, |shard| {
        let (forward, job, shutdown, log) = (&forward, &job, &shutdown, &log);
        async move {
            if shutdown.stop_requested() {
                return not_started(shard, &job.name);
            }
            let progress = log.shard(&shard.name);
            let args = shard_args(args, shard);
            let run = run::run_on(
                &shard.target,
                store,
                (forward, job),
                &args,
                mode,
                shutdown,
                &progress,
            );
            // A bug that panics on one shard ends that shard's run (its open transaction
            // rolls back with its connection), not the others'.
            let result = AssertUnwindSafe(run).catch_unwind().await.unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(Error::Runtime(format!(
                        "{}: the run on this shard panicked ({what}); a bug: please report it. Its committed chunks are kept; `backfill run {} --fleet FILE` resumes it",
                        job.name, job.name
                    )))
                });
            end_of(shard, job, result, &progress)
        }
    });
    tokio::pin!(runs);
    // Without a terminal, the fleet's total every --progress-interval, among the shards' lines.
    let mut every = tokio::time::interval(args.progress_interval);
    every.tick().await;
    let ends = loop {
        tokio::select! {
            ends = &mut runs => break ends.into_iter().map(|(_, end)| end).collect(),
            _ = every.tick() => {
                if let Some(line) = log.total_line() {
                    crate::out::stderr(format_args!("{line}\n"));
                }
            }
        }
    };
    log.finish();
    run::linger(args, metrics, &job.name, &*log, &shutdown).await;
    summarize(fleet, &job.name, ends, args.json, &log)
}

/// The shard's run flags: its `[shard_settings]` take the place of the run's flags.
fn shard_args(args: &RunArgs, shard: &Shard) -> RunArgs {
    let mut mine = args.clone();
    if let Some(r) = shard.settings.rows_per_second {
        mine.rows_per_second = Some(r);
    }
    if let Some(w) = shard.settings.workers {
        mine.workers = w;
    }
    // One endpoint for the fleet, served above.
    mine.metrics_addr = None;
    mine
}

fn not_started(shard: &Shard, job: &str) -> ShardEnd {
    ShardEnd {
        shard: shard.name.clone(),
        code: exit::INTERRUPTED,
        report: None,
        error: Some(format!(
            "{job}: not started: the fleet run was stopped first"
        )),
    }
}

fn end_of(
    shard: &Shard,
    job: &crate::job::JobSpec,
    result: Result<Report>,
    progress: &Progress,
) -> ShardEnd {
    let (report, concluded) = match result {
        Ok(report) => (Some(report.clone()), run::conclude(job, report, progress)),
        Err(e) => (None, Err(e)),
    };
    let (code, error) = match concluded {
        Ok(code) => (code, None),
        Err(e) => {
            let code = e.exit_code();
            let line = e.to_string();
            if e.kind() != ErrorKind::Interrupted {
                progress.log(&format!("error: {line}"));
            }
            (code, Some(line))
        }
    };
    ShardEnd {
        shard: shard.name.clone(),
        code,
        report,
        error,
    }
}

fn summarize(
    fleet: &Fleet,
    job: &str,
    ends: Vec<ShardEnd>,
    json: bool,
    log: &FleetDisplay,
) -> Result<u8> {
    let code = crate::fleet::exit_code(ends.iter().map(|e| e.code));
    if json {
        let shards: Vec<serde_json::Value> = ends
            .iter()
            .map(|e| {
                serde_json::json!({
                    "shard": e.shard,
                    "exit_code": e.code,
                    "report": e.report,
                    "error": e.error,
                })
            })
            .collect();
        let out = serde_json::json!({ "job": job, "exit_code": code, "shards": shards });
        super::print_json(&out);
    }
    let width = ends.iter().map(|e| e.shard.len()).max().unwrap_or(5).max(5);
    log.log(&format!(
        "{:<width$}  {:<11}  {:>10}  NOTE",
        "SHARD", "OUTCOME", "ROWS"
    ));
    for e in &ends {
        let outcome = match (e.code, &e.report) {
            (exit::SUCCESS, Some(r)) => match r.outcome {
                Outcome::AlreadyDone => "already done",
                Outcome::LimitReached { .. } => "canary",
                _ => "done",
            },
            (exit::INTERRUPTED, _) => "stopped",
            (exit::NOT_SATISFIED, _) => "not ready",
            (exit::USAGE, _) => "refused",
            _ => "failed",
        };
        let rows = e
            .report
            .as_ref()
            .map(|r| r.rows.to_string())
            .unwrap_or_else(|| "-".into());
        let note = e.error.as_deref().unwrap_or("-");
        log.log(&format!(
            "{:<width$}  {outcome:<11}  {rows:>10}  {note}",
            e.shard
        ));
    }
    // A canary (`--limit`) ends with exit 0 and the job not done.
    let canary = |e: &ShardEnd| {
        e.report
            .as_ref()
            .is_some_and(|r| matches!(r.outcome, Outcome::LimitReached { .. }))
    };
    let unfinished: Vec<&str> = ends
        .iter()
        .filter(|e| e.code != exit::SUCCESS || canary(e))
        .map(|e| e.shard.as_str())
        .collect();
    let total = ends.len();
    // A revert (`JOB:revert`) goes on with `backfill revert JOB`.
    let again = match job.strip_suffix(":revert") {
        Some(forward) => format!("backfill revert {forward}"),
        None => format!("backfill run {job}"),
    };
    let again = format!(
        "`{again} --fleet {}` again does only the shards not done",
        fleet.path.display()
    );
    if unfinished.is_empty() {
        log.log(&format!("{job}: every shard ({total}) done"));
        return Ok(code);
    }
    let line = format!(
        "{job}: {} of {total} shards not done: {}; {again}",
        unfinished.len(),
        unfinished.join(", ")
    );
    if code == exit::SUCCESS {
        log.log(&line);
        return Ok(code);
    }
    Err(match code {
        exit::INTERRUPTED => Error::Interrupted(line),
        exit::USAGE => Error::Usage(line),
        exit::NOT_SATISFIED => Error::NotSatisfied(line),
        _ => Error::Runtime(line),
    })
}
