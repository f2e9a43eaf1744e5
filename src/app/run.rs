//! `run`, `revert` and `drop-undo`: what must hold before a run (preconditions, waiting for the
//! expand migration, the job's lock for a revert), the run itself, and what follows it (the
//! finishing steps, recording a revert), with the operator's summary. The chunk loop itself is
//! the engine's: this module only starts it and reads its report.

use crate::cli::RunArgs;
use crate::db::Target;
use crate::error::{exit, Error, Result};
use crate::executor::{self, NotSwept, Outcome, RunOptions};
use crate::job::{self, JobSpec};
use crate::keyset::show_key;
use crate::signals::Shutdown;
use crate::state::Phase;
use crate::store::Store;
use crate::telemetry::{Progress, ProgressOptions};
use std::path::Path;
use std::sync::Arc;

/// A run walks the job forward, or reverts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Forward,
    Revert,
}

pub(super) async fn run(
    target: &Target,
    store: &Store,
    jobs: &Path,
    args: &RunArgs,
    log_json: bool,
    mode: Mode,
) -> Result<u8> {
    let (forward, job) = load(jobs, store, &args.name, mode)?;
    let popts = ProgressOptions {
        interval: args.progress_interval,
        json: log_json,
    };
    let (metrics, progress, shutdown) =
        start_reporting(args, &job.name, || Progress::new(&job.name, popts))?;
    let result = run_on(
        target,
        store,
        (&forward, &job),
        args,
        mode,
        &shutdown,
        &progress,
    )
    .await;
    linger(args, metrics, &job.name, &*progress, &shutdown).await;
    let report = result?;
    if args.json {
        super::print_json(&report);
    }
    conclude(&job, report, &progress)
}

/// The job a run walks: the job file's, and for a revert the revert job made from it.
pub(super) fn load(
    jobs: &Path,
    store: &Store,
    name: &str,
    mode: Mode,
) -> Result<(JobSpec, JobSpec)> {
    let forward = crate::resolve::load(jobs, name)?;
    let job = match mode {
        Mode::Forward => forward.clone(),
        Mode::Revert => crate::undo::revert_job(store, &forward)?,
    };
    Ok((forward, job))
}

/// What a run reports through: one job's reporter, or a fleet's display.
pub(super) trait Reporter: Send + Sync + 'static {
    fn log(&self, line: &str);
}

impl Reporter for Progress {
    fn log(&self, line: &str) {
        Progress::log(self, line)
    }
}

impl Reporter for crate::telemetry::FleetDisplay {
    fn log(&self, line: &str) {
        crate::telemetry::FleetDisplay::log(self, line)
    }
}

/// What a run starts with: the metrics endpoint `--metrics-addr` asks for, then the reporter
/// `make` builds (after the endpoint: metric handles made before it would count nowhere), then
/// the signal handlers, which log through it.
pub(super) fn start_reporting<R: Reporter>(
    args: &RunArgs,
    job: &str,
    make: impl FnOnce() -> R,
) -> Result<(Option<std::net::SocketAddr>, Arc<R>, Arc<Shutdown>)> {
    let metrics = match &args.metrics_addr {
        Some(addr) => Some(crate::telemetry::serve_metrics(addr).map_err(Error::Usage)?),
        None => None,
    };
    let reporter = Arc::new(make());
    if let Some(a) = metrics {
        reporter.log(&format!("{job}: serving metrics on http://{a}/metrics"));
    }
    let r = reporter.clone();
    let shutdown = Shutdown::install(move |line| r.log(line))
        .map_err(|e| Error::Runtime(format!("cannot install signal handlers: {e}")))?;
    Ok((metrics, reporter, shutdown))
}

/// Keeps the metrics endpoint up for `--metrics-linger` after the run, for a last scrape (a
/// signal ends the wait).
pub(super) async fn linger(
    args: &RunArgs,
    metrics: Option<std::net::SocketAddr>,
    job: &str,
    reporter: &impl Reporter,
    shutdown: &Shutdown,
) {
    if metrics.is_some() && !args.metrics_linger.is_zero() {
        reporter.log(&format!(
            "{job}: keeping the metrics endpoint up for {}s",
            args.metrics_linger.as_secs()
        ));
        shutdown.sleep(args.metrics_linger).await;
    }
}

/// One database's run, from its preconditions to its finishing steps: what `run` does once its
/// reporter and signal handlers are up (a fleet runs this once per shard).
pub(super) async fn run_on(
    target: &Target,
    store: &Store,
    (forward, job): (&JobSpec, &JobSpec),
    args: &RunArgs,
    mode: Mode,
    shutdown: &Shutdown,
    progress: &Progress,
) -> Result<executor::Report> {
    let opts = run_options(args);
    progress.log(&format!(
        "{}: running on {} ({})",
        job.name,
        target.describe(),
        job.table
    ));
    // A revert holds the job's lock for its whole run: a contract migration calling the SQL gate
    // waits for it (and then finds the job reverted), and it waits for one already past the gate.
    let _job_lock = match mode {
        Mode::Revert => Some(hold_job_lock(target, store, forward, shutdown, progress).await?),
        Mode::Forward => None,
    };
    preconditions(target, store, forward, mode, args, shutdown, progress).await?;
    if !args.allow_shared_table {
        refuse_shared_table(target, store, forward, job).await?;
    }
    let report = executor::run(target, store, job, &opts, shutdown, progress).await?;
    let complete = matches!(report.outcome, Outcome::Done { .. } | Outcome::AlreadyDone);
    if matches!(report.outcome, Outcome::Done { .. }) {
        super::control::end_overrides_at_completion(target, store, &job.name, progress).await;
    }
    if mode == Mode::Revert && complete {
        record_revert(target, store, forward, job, progress).await?;
    }
    if mode == Mode::Forward && complete && !job.finish_sql.is_empty() {
        finish(target, store, job, progress).await?;
    }
    Ok(report)
}

/// Refuses to start while another job's live run walks the same table: two jobs writing one
/// table contend for its rows and double its write load. The same job run by several processes
/// is the way to add workers, and stays allowed; a job and its own revert refuse each other
/// with their own, more precise, errors.
async fn refuse_shared_table(
    target: &Target,
    store: &Store,
    forward: &JobSpec,
    job: &JobSpec,
) -> Result<()> {
    let client = target.connect().await?;
    let table = job.table.to_string();
    let this = [
        job.name.clone(),
        forward.name.clone(),
        crate::store::revert_name(&forward.name),
    ];
    match store.other_job_on_table(&client, &this, &table).await? {
        None => Ok(()),
        Some(other) => Err(Error::NotSatisfied(format!(
            "job {name} not started: job {other_job} is running on the same table {table} (runner on host {host}, pid {pid}); wait for it to end (`backfill status {other_job}`), or pass --allow-shared-table to run both at once",
            name = job.name,
            other_job = other.job,
            host = other.host,
            pid = other.pid,
        ))),
    }
}

/// The run's options from its command line.
fn run_options(args: &RunArgs) -> RunOptions {
    RunOptions {
        allow_changed_definition: args.allow_changed_definition,
        lock_timeout: args.lock_timeout,
        statement_timeout: args.statement_timeout,
        chunk_rows: args.chunk_rows,
        max_attempts: args.max_attempts,
        contention_budget: args.contention_budget,
        verify_timeout: args.verify_timeout,
        reconnect_for: args.reconnect_for,
        rows_per_second: args.rows_per_second,
        target_chunk_time: args.target_chunk_time,
        pause: args.pause,
        workers: args.workers,
        limit: args.limit,
    }
}

/// A completed revert: the job's progress is forgotten (and the undo table named in the record).
async fn record_revert(
    target: &Target,
    store: &Store,
    forward: &JobSpec,
    job: &JobSpec,
    progress: &Progress,
) -> Result<()> {
    let mut client = target.connect().await?;
    let undo_table = crate::undo::exists(&client, store, &forward.name)
        .await?
        .then(|| crate::undo::undo_table(store, &forward.name));
    store
        .mark_reverted(&mut client, &forward.name, &job.name, undo_table.as_deref())
        .await?;
    progress.log(&format!(
        "{}: reverted; its progress is forgotten and its next `backfill run` starts over",
        forward.name
    ));
    Ok(())
}

/// The operator's summary of a finished run, and its exit code (or the error it ends with).
pub(super) fn conclude(job: &JobSpec, report: executor::Report, progress: &Progress) -> Result<u8> {
    let rate = report.rows as f64 / report.elapsed_seconds.max(0.001);
    let resume = match (&report.cursor, report.ranges) {
        (Some(c), _) => format!("resumes after key {}", show_key(c)),
        (None, n) if n > 1 => format!("resumes each of the {n} key ranges where it stopped"),
        (None, _) => "starts at the first key".into(),
    };
    let skipped = match report.skipped {
        0 => String::new(),
        n => format!(
            ", {n} failing keys skipped (see `backfill failures {}`)",
            job.name
        ),
    };
    let summary = format!(
        "{} rows in {} chunks in {:.1}s ({rate:.0} rows/s, {} rows changed{skipped}); {} rows done in all",
        report.rows,
        report.chunks,
        report.elapsed_seconds,
        report.rows_affected,
        report.rows_done_total
    );
    let name = &job.name;
    // A revert (`JOB:revert`) goes on with `backfill revert JOB`, not with `run`.
    let again = match name.strip_suffix(":revert") {
        Some(forward) => format!("backfill revert {forward}"),
        None => format!("backfill run {name}"),
    };
    match report.outcome {
        Outcome::Done { verify_remaining } => {
            let verified = match verify_remaining {
                Some(_) => "verify returned 0",
                None => "no verify query",
            };
            progress.log(&format!("{name}: done: {summary}; {verified}"));
            Ok(exit::SUCCESS)
        }
        Outcome::AlreadyDone => {
            progress.log(&format!("{name}: already done ({} rows); nothing to do. `backfill gate {name}` re-checks it; `backfill reset {name} --yes` starts over", report.rows_done_total));
            Ok(exit::SUCCESS)
        }
        Outcome::Incomplete {
            verify_remaining,
            why,
            not_swept,
        } => {
            // What will actually help: a new run sweeps again only after exhausted sweeps.
            let next = match not_swept {
                NotSwept::Exhausted => format!("fix the writers, then `backfill run {name}` again: it sweeps again"),
                NotSwept::Disabled => format!(
                    "fix the writers, then set max_sweeps (e.g. 3) in {} and `backfill run {name}` again: it sweeps (max_sweeps is not part of the job's fingerprint); or fill the rows yourself and run again (verify returning 0 completes the job)",
                    job.path.display()
                ),
                NotSwept::Unsafe => format!(
                    "running again as it is would refuse to sweep again. Make the statement safe to apply twice: add a guard that skips rows already done, e.g. `AND new_col IS NULL` (`backfill plan {name}` reports `no_guard` until it has one), then `backfill run {name} --allow-changed-definition` — every key is done, so the new statement only drives the sweep, which checks the guard first; or fill the rows yourself and run again (verify returning 0 completes the job)"
                ),
            };
            Err(Error::Runtime(format!(
                "job {name}: every key up to the bound was processed ({summary}), but {why}. {verify_remaining} rows are still to do — probably written behind the cursor by code that does not fill the new column yet; {next}"
            )))
        }
        Outcome::Cancelled => Err(Error::Interrupted(format!(
            "{name}: cancelled; the next run {resume} (`{again}`; progress is saved). Cancelled by `backfill cancel`: {summary}"
        ))),
        Outcome::LimitReached { limit } => {
            let next = match (&report.cursor, report.ranges) {
                (Some(c), _) => format!("resumes after key {}", show_key(c)),
                _ => "resumes where it stopped".into(),
            };
            progress.log(&format!(
                "{name}: canary: {} rows done (--limit {limit}), next run {next}; `backfill run {name}` does the rest",
                report.rows
            ));
            Ok(exit::SUCCESS)
        }
        Outcome::Stopped => Err(Error::Interrupted(format!(
            "{name}: stopped; the next run {resume} (`{again}`; progress is saved). {summary}"
        ))),
    }
}

/// Runs the job's finishing steps (those not done yet), once it is done and verified.
async fn finish(target: &Target, store: &Store, job: &JobSpec, progress: &Progress) -> Result<()> {
    let client = target.connect().await?;
    store
        .set_phase(&client, &job.name, Phase::Finishing)
        .await?;
    let opts = crate::finish::FinishOptions::default();
    match crate::finish::run_steps(
        &client,
        store.schema(),
        &job.name,
        &job.finish_sql,
        &opts,
        progress,
    )
    .await
    {
        Ok(_) => {
            // From the count the job's verify recorded, as the run's end decided its phase.
            let recorded = store.load(&client, &job.name).await?;
            let done = Phase::done(recorded.and_then(|c| c.verify_remaining));
            store.set_phase(&client, &job.name, done).await?;
            Ok(())
        }
        Err(e) => {
            let _ = store
                .set_phase(&client, &job.name, Phase::FinishingFailed)
                .await;
            Err(e)
        }
    }
}

/// Takes the job's advisory lock on a session of its own, returned to be held (see `run`).
async fn hold_job_lock(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    shutdown: &crate::signals::Shutdown,
    progress: &Progress,
) -> Result<tokio_postgres::Client> {
    let client = target.connect().await?;
    let mut told = false;
    let waiting = || {
        if !told {
            progress.log(&format!(
                "{}: waiting for a migration that passed its gate (assert_done) to commit or roll back",
                job.name
            ));
            told = true;
        }
    };
    let stop = || shutdown.stop_requested() || shutdown.cancel_requested();
    if !store.lock_job(&client, &job.name, waiting, stop).await? {
        return Err(Error::Interrupted(format!(
            "{}: stopped while waiting for the job's lock; nothing was reverted",
            job.name
        )));
    }
    Ok(client)
}

/// How often a run waiting for its expand migration looks again.
const EXPAND_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// What must hold before a run starts: for a revert, the contract migration not applied and the
/// undo data there; for a run, the contract migration not applied while the job is unfinished,
/// and the job ready (`requires_sql`, expand applied) — waited for with `--wait-for-expand`.
/// Whether the job runs, was reverted or has a revert unfinished is decided under the job's row
/// lock when the run joins (`Store::claim`).
async fn preconditions(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    mode: Mode,
    args: &RunArgs,
    shutdown: &crate::signals::Shutdown,
    progress: &Progress,
) -> Result<()> {
    let name = &job.name;
    let mut client = target.connect().await?;
    // A run creates or upgrades the engine's schema anyway; reading it needs the current version.
    store.ensure(&mut client).await?;
    if mode == Mode::Revert {
        if let Some(why) = crate::migrator::contract_applied(&client, job).await? {
            return Err(Error::NotSatisfied(format!(
                "job {name} cannot be reverted: {why}; the data it would restore is gone — downgrade the contract migration first"
            )));
        }
        if matches!(job.revert, Some(job::Revert::Undo(_)))
            && !crate::undo::exists(&client, store, name).await?
        {
            return Err(Error::NotSatisfied(format!(
                "job {name} has no undo data (table {} is missing: dropped by `backfill drop-undo`?); nothing can be restored",
                crate::undo::undo_table(store, name)
            )));
        }
        return Ok(());
    }
    if store
        .load(&client, name)
        .await?
        .is_some_and(|c| c.state.recorded().is_finished())
    {
        return Ok(());
    }
    if let Some(why) = crate::migrator::contract_applied(&client, job).await? {
        return Err(Error::NotSatisfied(format!(
            "job {name} is not done, but {why}. The contract step ran before the backfill finished; check what it removed before going on (a contract migration should first call {}.assert_done('{name}'), or run `backfill gate {name}`)",
            crate::sql::quote_ident(store.schema())
        )));
    }
    let since = std::time::Instant::now();
    let mut told: Option<std::time::Instant> = None;
    let mut client = Some(client);
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = target.connect().await.ok();
        }
        let why = match &client {
            // The database went away while we wait: wait for it too.
            None => "the database is unreachable (waiting for it)".to_string(),
            Some(c) => match crate::migrator::not_ready(c, job).await {
                Ok(None) => return Ok(()),
                Ok(Some(why)) => why,
                Err(_) if args.wait_for_expand.is_some() && c.is_closed() => {
                    "the database connection was lost (waiting for it)".to_string()
                }
                Err(e) => return Err(e),
            },
        };
        let Some(limit) = args.wait_for_expand else {
            return Err(Error::NotSatisfied(format!(
                "job {name} may not run yet: {why}. Apply the expand migration first, or pass --wait-for-expand to wait for it"
            )));
        };
        if !limit.is_zero() && since.elapsed() >= limit {
            if let Some(c) = &client {
                let _ = store.clear_waiting(c, name).await;
            }
            return Err(Error::NotSatisfied(format!(
                "job {name}: waited {}s for its expand migration, in vain: {why}",
                limit.as_secs()
            )));
        }
        if told.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60)) {
            if let Some(c) = &client {
                let _ = store.note_waiting(c, job, &why).await;
            }
            progress.log(&format!("{name}: waiting: {why}"));
            told = Some(std::time::Instant::now());
        }
        shutdown.sleep(EXPAND_POLL).await;
        if shutdown.stop_requested() || shutdown.cancel_requested() {
            if let Some(c) = &client {
                let _ = store.clear_waiting(c, name).await;
            }
            return Err(Error::Interrupted(format!(
                "{name}: stopped while waiting for its expand migration; nothing was processed"
            )));
        }
    }
}

pub(super) async fn drop_undo(target: &Target, store: &Store, name: &str, yes: bool) -> Result<u8> {
    let client = target.connect().await?;
    let table = crate::undo::undo_table(store, name);
    let Some(rows) = crate::undo::undo_rows(&client, store, name).await? else {
        println!("job {name}: no undo data ({table} does not exist); nothing to drop");
        return Ok(exit::SUCCESS);
    };
    if !yes {
        return Err(Error::Usage(format!(
            "refusing to drop the undo data of job {name} without --yes: {table} keeps the old values of {rows} rows, and without them `backfill revert {name}` cannot restore anything"
        )));
    }
    for job in [name.to_string(), crate::undo::revert_name(name)] {
        if let Some(o) = store
            .load(&client, &job)
            .await?
            .and_then(|c| c.runners.into_iter().find(|o| o.alive))
        {
            return Err(Error::NotSatisfied(format!(
                "job {job} is running on host {} (pid {}); wait for it to end before dropping the undo data",
                o.host, o.pid
            )));
        }
    }
    crate::undo::drop_table(&client, store, name).await?;
    println!("job {name}: undo data dropped ({table}, {rows} rows)");
    Ok(exit::SUCCESS)
}
