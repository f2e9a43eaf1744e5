//! The commands: each turns parsed arguments into calls on the library and prints the result.
//! Data goes to stdout (JSON with `--json`); progress and logs go to stderr.

use crate::cli::{Cli, Command, LogFormat, RunArgs};
use crate::db::Target;
use crate::error::{exit, Error, Result};
use crate::executor::{self, Outcome, RunOptions};
use crate::job::{self, JobSpec};
use crate::keyset::show_key;
use crate::signals::Shutdown;
use crate::store::{self, Checkpoint, ControlChange, Controls, Store};
use crate::telemetry::{Progress, ProgressOptions};
use std::path::Path;

/// Runs one command; returns the exit code for outcomes that are not errors.
pub async fn execute(cli: Cli) -> Result<u8> {
    let g = &cli.global;
    let store = Store::new(&g.schema);
    let target = || Target::resolve(g.database_url.as_deref());
    match cli.command {
        Command::Run(args) => {
            let json = g.log_format == LogFormat::Json;
            run(&target()?, &store, &g.jobs, &args, json, Mode::Forward).await
        }
        Command::Revert(args) => {
            let json = g.log_format == LogFormat::Json;
            run(&target()?, &store, &g.jobs, &args, json, Mode::Revert).await
        }
        Command::DropUndo { name, yes } => drop_undo(&target()?, &store, &g.jobs, &name, yes).await,
        Command::Status { name, json } => {
            status(&target()?, &store, &g.jobs, name.as_deref(), json).await
        }
        Command::List { json } => list(g.database_url.as_deref(), &store, &g.jobs, json).await,
        Command::Check { name } => check(&g.jobs, name.as_deref()),
        Command::Plan {
            name,
            json,
            verify_timeout,
            long_transaction,
        } => {
            let job = job::load(&g.jobs, &name)?;
            let opts = crate::plan::PlanOptions {
                verify_timeout,
                long_transaction,
                from_first_key: false,
            };
            let plan = crate::plan::plan(&target()?, &store, &job, &opts).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&plan).expect("serializable")
                );
            } else {
                crate::plan::print_text(&plan);
            }
            Ok(if plan.has_errors() {
                exit::USAGE
            } else {
                exit::SUCCESS
            })
        }
        Command::Gate {
            name,
            json,
            verify_timeout,
        } => {
            let job = job::load(&g.jobs, &name)?;
            let client = target()?.connect().await?;
            let report = crate::migrator::gate(&client, &store, &job, verify_timeout).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serializable")
                );
            } else {
                println!("{}", report.reason);
            }
            Ok(if report.passed {
                exit::SUCCESS
            } else {
                exit::NOT_SATISFIED
            })
        }
        Command::Pause { name } => control(&target()?, &store, &name, Control::Pause).await,
        Command::Resume { name } => control(&target()?, &store, &name, Control::Resume).await,
        Command::Cancel { name } => control(&target()?, &store, &name, Control::Cancel).await,
        Command::Set(args) => {
            let change = if args.clear {
                ControlChange {
                    rows_per_second: Some(None),
                    target_chunk_time: Some(None),
                    pause: Some(None),
                    ..ControlChange::default()
                }
            } else {
                if args.rows_per_second.is_none()
                    && args.target_chunk_time.is_none()
                    && args.pause.is_none()
                {
                    return Err(Error::Usage("nothing to set: give --rows-per-second, --target-chunk-time, --pause, or --clear".into()));
                }
                ControlChange {
                    rows_per_second: args.rows_per_second.map(Some),
                    target_chunk_time: args.target_chunk_time.map(Some),
                    pause: args.pause.map(Some),
                    ..ControlChange::default()
                }
            };
            control(&target()?, &store, &args.name, Control::Set(change)).await
        }
        Command::History { name, json } => history(&target()?, &store, &name, json).await,
        Command::Failures { name, all, json } => {
            failures(&target()?, &store, &name, all, json).await
        }
        Command::RetryFailures { name } => retry_failures(&target()?, &store, &g.jobs, &name).await,
        Command::Reset { name, yes } => reset(&target()?, &store, &g.jobs, &name, yes).await,
        Command::Init {
            grant_to,
            grant_gate_to,
        } => init(&target()?, &store, &grant_to, &grant_gate_to).await,
        Command::Demo { rows } => {
            crate::demo::run(g.database_url.as_deref(), &store, &g.jobs, rows).await
        }
    }
}

/// A run walks the job forward, or reverts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Revert,
}

async fn run(
    target: &Target,
    store: &Store,
    jobs: &Path,
    args: &RunArgs,
    log_json: bool,
    mode: Mode,
) -> Result<u8> {
    let forward = job::load(jobs, &args.name)?;
    let job = match mode {
        Mode::Forward => forward.clone(),
        Mode::Revert => crate::undo::revert_job(store, &forward)?,
    };
    let metrics = match &args.metrics_addr {
        Some(addr) => Some(crate::telemetry::serve_metrics(addr).map_err(Error::Usage)?),
        None => None,
    };
    let popts = ProgressOptions {
        interval: args.progress_interval,
        json: log_json,
    };
    let progress = std::sync::Arc::new(Progress::new(&job.name, popts));
    if let Some(a) = metrics {
        progress.log(&format!(
            "{}: serving metrics on http://{a}/metrics",
            job.name
        ));
    }
    let p = progress.clone();
    let shutdown = Shutdown::install(move |line| p.log(line))
        .map_err(|e| Error::Runtime(format!("cannot install signal handlers: {e}")))?;
    let opts = RunOptions {
        allow_changed_definition: args.allow_changed_definition,
        lock_timeout: args.lock_timeout,
        statement_timeout: args.statement_timeout,
        chunk_rows: args.chunk_rows,
        max_attempts: args.max_attempts,
        verify_timeout: args.verify_timeout,
        reconnect_for: args.reconnect_for,
        rows_per_second: args.rows_per_second,
        target_chunk_time: args.target_chunk_time,
        pause: args.pause,
        workers: args.workers,
    };
    progress.log(&format!(
        "{}: running on {} ({})",
        job.name,
        target.describe(),
        job.table
    ));
    // A revert holds the job's lock for its whole run: a contract migration calling the SQL gate
    // waits for it (and then finds the job reverted), and it waits for one already past the gate.
    let _job_lock = match mode {
        Mode::Revert => Some(hold_job_lock(target, store, &forward, &shutdown, &progress).await?),
        Mode::Forward => None,
    };
    let result =
        match preconditions(target, store, &forward, mode, args, &shutdown, &progress).await {
            Ok(()) => executor::run(target, store, &job, &opts, &shutdown, &progress).await,
            Err(e) => Err(e),
        };
    if metrics.is_some() && !args.metrics_linger.is_zero() {
        progress.log(&format!(
            "{}: keeping the metrics endpoint up for {}s",
            job.name,
            args.metrics_linger.as_secs()
        ));
        shutdown.sleep(args.metrics_linger).await;
    }
    let report = result?;
    if mode == Mode::Revert && matches!(report.outcome, Outcome::Done { .. } | Outcome::AlreadyDone)
    {
        let mut client = target.connect().await?;
        store
            .mark_reverted(
                &mut client,
                &forward.name,
                &job.name,
                &crate::undo::undo_table(store, &forward.name),
            )
            .await?;
        progress.log(&format!(
            "{}: reverted; its progress is forgotten and its next `backfill run` starts over",
            forward.name
        ));
    }
    if mode == Mode::Forward
        && !job.finish_sql.is_empty()
        && matches!(report.outcome, Outcome::Done { .. } | Outcome::AlreadyDone)
    {
        finish(target, store, &job, &progress).await?;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
    }
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
        } => Err(Error::Runtime(format!(
            "job {name}: every key up to the bound was processed ({summary}), but {why}. {verify_remaining} rows are still to do — probably written behind the cursor by code that does not fill the new column yet; fix the writers, then `backfill run {name}` again: it sweeps again"
        ))),
        Outcome::Cancelled => Err(Error::Interrupted(format!(
            "{name}: cancelled by `backfill cancel`: {summary}; progress is saved — `backfill run {name}` {resume}"
        ))),
        Outcome::Stopped => Err(Error::Interrupted(format!(
            "{name}: stopped: {summary}; progress is saved — `backfill run {name}` {resume}"
        ))),
    }
}

/// Runs the job's finishing steps (those not done yet), once it is done and verified.
async fn finish(target: &Target, store: &Store, job: &JobSpec, progress: &Progress) -> Result<()> {
    let client = target.connect().await?;
    store.set_phase(&client, &job.name, "finishing").await?;
    let log = |line: &str| progress.log(line);
    let opts = crate::finish::FinishOptions::default();
    match crate::finish::run_steps(
        &client,
        store.schema(),
        &job.name,
        &job.finish_sql,
        &opts,
        &log,
    )
    .await
    {
        Ok(_) => {
            store
                .set_phase(&client, &job.name, "done and verified")
                .await?;
            Ok(())
        }
        Err(e) => {
            let _ = store
                .set_phase(&client, &job.name, "finishing failed")
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

/// What must hold before a run starts: no revert half done (forward) or no live forward run
/// (revert), the contract migration not applied while the job is unfinished, and the job ready
/// (`requires_sql`, expand applied) — waited for with `--wait-for-expand`.
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
    let checkpoint = store.load(&client, name).await?;
    // Whether the job runs, was reverted or has a revert unfinished is checked again where it
    // matters, under the job's checkpoint lock when the run joins (`Store::claim`).
    if mode == Mode::Revert {
        if let Some(why) = crate::migrator::contract_applied(&client, job).await? {
            return Err(Error::NotSatisfied(format!(
                "job {name} cannot be reverted: {why}; the data it would restore is gone — downgrade the contract migration first"
            )));
        }
        if matches!(job.revert, Some(crate::job::Revert::Undo(_)))
            && crate::undo::undo_rows(&client, store, name)
                .await?
                .is_none()
        {
            return Err(Error::NotSatisfied(format!(
                "job {name} has no undo data (table {} is missing: dropped by `backfill drop-undo`?); nothing can be restored",
                crate::undo::undo_table(store, name)
            )));
        }
        return Ok(());
    }
    if checkpoint.as_ref().is_some_and(|c| c.state == "done") {
        return Ok(());
    }
    if let Some(why) = crate::migrator::contract_applied(&client, job).await? {
        return Err(Error::NotSatisfied(format!(
            "job {name} is not done, but {why}. The contract step ran before the backfill finished; check what it removed before going on (a contract migration should first call {}.assert_done('{name}'), or run `backfill gate {name}`)",
            crate::job::quote_ident(store.schema())
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
            return Err(Error::Interrupted(format!(
                "{name}: stopped while waiting for its expand migration; nothing was processed"
            )));
        }
    }
}

async fn drop_undo(
    target: &Target,
    store: &Store,
    jobs: &Path,
    name: &str,
    yes: bool,
) -> Result<u8> {
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
    let _ = jobs;
    crate::undo::drop_table(&client, store, name).await?;
    println!("job {name}: undo data dropped ({table}, {rows} rows)");
    Ok(exit::SUCCESS)
}

fn job_names(jobs: &Path, checkpoints: &[Checkpoint]) -> Vec<String> {
    let mut names = job::list_names(jobs).unwrap_or_default();
    for c in checkpoints {
        if !names.contains(&c.job) {
            names.push(c.job.clone());
        }
    }
    names.sort();
    names
}

async fn status(
    target: &Target,
    store: &Store,
    jobs: &Path,
    name: Option<&str>,
    json: bool,
) -> Result<u8> {
    let client = target.connect().await?;
    match name {
        Some(name) => {
            let c = store.load(&client, name).await?;
            let controls = store.controls_for_status(&client, name).await?;
            let spec = job::load(jobs, name).ok();
            if c.is_none() && spec.is_none() {
                return Err(Error::Usage(format!(
                    "job `{name}`: no checkpoint in schema {} and no file {}",
                    store.schema(),
                    job::path_for(jobs, name).display()
                )));
            }
            let phase = phase_of(&client, spec.as_ref(), c.as_ref()).await;
            if json {
                let v = serde_json::json!({ "job": name, "state": state_of(c.as_ref()), "phase": phase, "checkpoint": c, "controls": controls });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).expect("serializable")
                );
            } else {
                print_status(name, spec.as_ref(), c.as_ref(), &controls, &phase);
            }
        }
        None => {
            let all = store.load_all(&client).await?;
            let names = job_names(jobs, &all);
            if json {
                let v: Vec<_> = names
                    .iter()
                    .map(|n| {
                        let c = all.iter().find(|c| &c.job == n);
                        serde_json::json!({ "job": n, "state": state_of(c), "checkpoint": c })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).expect("serializable")
                );
            } else {
                println!(
                    "{:<24} {:<12} {:>24} {:>9} {:>12}  UPDATED",
                    "JOB", "STATE", "ROWS DONE", "CHUNKS", "ROWS/S"
                );
                for n in &names {
                    let c = all.iter().find(|c| &c.job == n);
                    println!(
                        "{:<24} {:<12} {:>24} {:>9} {:>12}  {}",
                        n,
                        state_of(c),
                        c.map(progress_text).unwrap_or_else(|| "-".into()),
                        c.map(|c| c.chunks_done.to_string())
                            .unwrap_or_else(|| "-".into()),
                        c.and_then(|c| c.rate_rows_per_second)
                            .map(|r| format!("{r:.0}"))
                            .unwrap_or_else(|| "-".into()),
                        c.map(|c| c.updated_at.as_str()).unwrap_or("-"),
                    );
                }
            }
        }
    }
    Ok(exit::SUCCESS)
}

fn state_of(c: Option<&Checkpoint>) -> &str {
    c.map(|c| c.state.as_str()).unwrap_or("new")
}

fn progress_text(c: &Checkpoint) -> String {
    match c.total_estimate {
        Some(t) if t > 0 => {
            let t = t.max(c.rows_done);
            let pct = (100.0 * c.rows_done as f64 / t as f64).min(100.0);
            let approx = if c.total_exact { "" } else { "~" };
            format!("{}/{approx}{t} {pct:.1}%", c.rows_done)
        }
        _ => c.rows_done.to_string(),
    }
}

/// The phase `status` shows: what the engine last recorded (waiting for expand, running,
/// verifying, sweeping, finishing, done and verified, reverted…), or "contract applied" once the
/// job's migrator says so.
async fn phase_of(
    client: &tokio_postgres::Client,
    spec: Option<&JobSpec>,
    c: Option<&Checkpoint>,
) -> String {
    let recorded = match c {
        None => "not started".to_string(),
        Some(c) if c.state == "interrupted" => "interrupted (no live runner)".to_string(),
        Some(c) => c.phase.clone().unwrap_or_else(|| c.state.clone()),
    };
    let Some(spec) = spec else { return recorded };
    match crate::migrator::contract_applied(client, spec).await {
        Ok(Some(_)) if c.is_some_and(|c| c.state == "done") => "contract applied".into(),
        Ok(Some(_)) => format!("{recorded}; contract applied before the backfill finished"),
        Ok(None) => recorded,
        Err(e) => format!("{recorded} (the migrator's history could not be read: {e})"),
    }
}

fn print_status(
    name: &str,
    spec: Option<&JobSpec>,
    c: Option<&Checkpoint>,
    controls: &Controls,
    phase: &str,
) {
    let line = |k: &str, v: &str| println!("{k:<18} {v}");
    line("job", name);
    if let Some(d) = spec.and_then(|s| s.description.as_deref()) {
        line("description", d);
    }
    line("state", state_of(c));
    line("phase", phase);
    print_controls(name, controls, &line);
    let Some(c) = c else {
        line("progress", "never run");
        return;
    };
    line(
        "table",
        &format!("{} key ({})", c.table, c.key_columns.join(", ")),
    );
    let kind = match (c.total_estimate, c.total_exact) {
        (None, _) => "",
        (Some(_), true) => " (exact count)",
        (Some(_), false) => " (planner's estimate)",
    };
    line("rows done", &format!("{}{kind}", progress_text(c)));
    line("rows changed", &c.rows_affected.to_string());
    line("chunks done", &c.chunks_done.to_string());
    if c.ranges.len() > 1 {
        line(
            "key ranges",
            &format!(
                "{} ({} done, {} being worked on)",
                c.ranges.len(),
                c.ranges.iter().filter(|r| r.done).count(),
                c.ranges.iter().filter(|r| r.owner_run.is_some()).count()
            ),
        );
        for r in &c.ranges {
            let from = r.lower_bound.as_deref().map(show_key);
            line(
                "",
                &format!(
                    "#{} ({} ..= {}] {} rows{}{}",
                    r.id,
                    from.unwrap_or_else(|| "start".into()),
                    show_key(&r.upper_bound),
                    r.rows_done,
                    match &r.cursor {
                        Some(k) if !r.done => format!(", at {}", show_key(k)),
                        _ => String::new(),
                    },
                    match (r.done, r.owner_run, r.owner_worker) {
                        (true, _, _) => ", done".to_string(),
                        (false, Some(run), Some(w)) => format!(", run {run} worker {w}"),
                        _ => ", waiting".to_string(),
                    }
                ),
            );
        }
    } else {
        line(
            "cursor",
            &c.cursor
                .as_deref()
                .map(show_key)
                .unwrap_or_else(|| "none (not started)".into()),
        );
    }
    line(
        "upper bound",
        &match (&c.upper_bound, c.bound_taken) {
            (Some(u), _) => show_key(u),
            (None, true) => "none (table was empty)".into(),
            (None, false) => "not yet taken".into(),
        },
    );
    if let Some(r) = c.rate_rows_per_second {
        let of = match c.runners.iter().filter(|o| o.alive).count() {
            0 => "last run".to_string(),
            1 => "now".to_string(),
            n => format!("now, {n} runs together"),
        };
        line("rate", &format!("{r:.0} rows/s ({of})"));
    }
    if let Some(n) = c.chunk_rows_now {
        line("chunk size", &format!("{n} keys (last chunk)"));
    }
    if let Some(reason) = &c.hold_reason {
        line(
            "held",
            &format!(
                "{reason} (since {})",
                c.held_since.as_deref().unwrap_or("?")
            ),
        );
    }
    if c.sweeps > 0 {
        line(
            "sweeps",
            &format!(
                "{} (passes over every key after the first, for rows written behind the cursor)",
                c.sweeps
            ),
        );
    }
    if c.finish_steps > 0 {
        line(
            "finishing steps",
            &format!("{} of {} succeeded", c.finish_steps_done, c.finish_steps),
        );
    }
    if let Some(v) = c.verify_remaining {
        line(
            "verify",
            &format!(
                "{v} rows to do at {}",
                c.verified_at.as_deref().unwrap_or("?")
            ),
        );
    }
    line("created", &c.created_at);
    line("started", c.started_at.as_deref().unwrap_or("-"));
    line("updated", &c.updated_at);
    if let Some(f) = &c.finished_at {
        line("finished", f);
    }
    for o in &c.runners {
        line(
            "runner",
            &format!(
                "{} pid {} run {}, {} worker{} ({})",
                o.host,
                o.pid,
                o.run_id,
                o.workers,
                if o.workers == 1 { "" } else { "s" },
                if o.alive { "alive" } else { "gone" }
            ),
        );
    }
    if c.failed_keys > 0 {
        line(
            "failed keys",
            &format!("{} unresolved (`backfill failures {name}`)", c.failed_keys),
        );
    }
    if let Some(e) = &c.last_error {
        line("last error", e);
    }
    if let Some(s) = spec {
        if s.fingerprint != c.fingerprint {
            line(
                "warning",
                &format!(
                    "{} changed since progress was saved (fingerprint {} vs {})",
                    s.path.display(),
                    s.fingerprint,
                    c.fingerprint
                ),
            );
        }
    }
}

/// Operator overrides from `backfill pause|set|cancel`, shown only when any is in force.
fn print_controls(name: &str, c: &Controls, line: &impl Fn(&str, &str)) {
    if c.paused {
        line(
            "paused",
            &format!("yes (`backfill resume {name}` lets it go on)"),
        );
    }
    if c.cancel {
        line(
            "cancel",
            "requested; the runner stops before its next chunk",
        );
    }
    let mut set = Vec::new();
    if let Some(r) = c.rows_per_second {
        set.push(format!("rows_per_second = {r}"));
    }
    if let Some(d) = c.target_chunk_time {
        set.push(format!(
            "target_chunk_time = {}",
            humantime::format_duration(d)
        ));
    }
    if let Some(d) = c.pause {
        set.push(format!("pause = {}", humantime::format_duration(d)));
    }
    if !set.is_empty() {
        line(
            "overrides",
            &format!(
                "{} (`backfill set {name} --clear` drops them)",
                set.join(", ")
            ),
        );
    }
}

async fn list(url: Option<&str>, store: &Store, jobs: &Path, json: bool) -> Result<u8> {
    let specs = job::load_all(jobs)?;
    let checkpoints = match Target::resolve(url) {
        Ok(t) => match t.connect().await {
            Ok(client) => store.load_all(&client).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = &checkpoints {
        eprintln!("warning: states unknown: {e}");
    }
    let all = checkpoints.as_deref().unwrap_or_default();
    let state = |n: &str| match &checkpoints {
        Ok(_) => state_of(all.iter().find(|c| c.job == n)).to_string(),
        Err(_) => "unknown".into(),
    };
    if json {
        let v: Vec<_> = specs
            .iter()
            .map(|(n, s)| {
                serde_json::json!({
                    "job": n,
                    "state": state(n),
                    "valid": s.is_ok(),
                    "error": s.as_ref().err().map(|e| e.to_string()),
                    "table": s.as_ref().ok().map(|s| s.table.to_string()),
                    "description": s.as_ref().ok().and_then(|s| s.description.clone()),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("serializable")
        );
    } else {
        for (n, s) in &specs {
            let what = match s {
                Ok(s) => format!("{}  {}", s.table, s.description.as_deref().unwrap_or("")),
                Err(e) => format!("INVALID: {e}"),
            };
            println!("{n:<24} {:<12} {what}", state(n));
        }
    }
    Ok(exit::SUCCESS)
}

fn check(jobs: &Path, name: Option<&str>) -> Result<u8> {
    let results = match name {
        Some(n) => vec![(n.to_string(), job::load(jobs, n))],
        None => job::load_all(jobs)?,
    };
    if results.is_empty() {
        return Err(Error::Usage(format!(
            "no job files (*.toml) in {}",
            jobs.display()
        )));
    }
    let mut bad = 0;
    for (n, r) in &results {
        match r {
            Ok(j) => println!(
                "ok       {n} ({}; table {}, key ({}), chunk_rows {})",
                j.path.display(),
                j.table,
                j.key.join(", "),
                j.chunk_rows
            ),
            Err(e) => {
                bad += 1;
                println!("invalid  {n}: {e}");
            }
        }
    }
    if bad > 0 {
        return Err(Error::Usage(format!(
            "{bad} of {} job files are invalid",
            results.len()
        )));
    }
    Ok(exit::SUCCESS)
}

enum Control {
    Pause,
    Resume,
    Cancel,
    Set(ControlChange),
}

async fn control(target: &Target, store: &Store, name: &str, what: Control) -> Result<u8> {
    let mut client = target.connect().await?;
    store.ensure(&mut client).await?;
    let running = store
        .load(&client, name)
        .await?
        .and_then(|c| c.owner)
        .filter(|o| o.alive);
    let runner = running
        .as_ref()
        .map(|o| format!("the runner on host {} (pid {})", o.host, o.pid));
    let (change, done) = match what {
        Control::Pause => (
            ControlChange { paused: Some(true), ..ControlChange::default() },
            match &runner {
                Some(r) => format!("job {name}: paused; {r} holds before its next chunk. `backfill resume {name}` lets it go on"),
                None => format!("job {name}: paused; no runner is active, so the next `backfill run {name}` will start held until `backfill resume {name}`"),
            },
        ),
        Control::Resume => (ControlChange { paused: Some(false), ..ControlChange::default() }, match &runner {
            Some(r) => format!("job {name}: resumed; {r} goes on"),
            None => String::new(),
        }),
        Control::Cancel => {
            let Some(r) = &runner else {
                return Err(Error::NotSatisfied(format!("job {name} is not running; nothing to cancel")));
            };
            (
                ControlChange { cancel: Some(true), ..ControlChange::default() },
                format!("job {name}: cancel requested; {r} stops after its current chunk (progress kept; `backfill run {name}` resumes)"),
            )
        }
        Control::Set(change) => (change, String::new()),
    };
    let controls = store.change_controls(&client, name, &change).await?;
    if done.is_empty() {
        // resume without a runner, or set
        if change.paused == Some(false) {
            return Err(Error::NotSatisfied(format!(
                "job {name}: no runner is active (the pause flag is cleared); start it with `backfill run {name}`"
            )));
        }
        let applies = match &runner {
            Some(r) => format!("{r} applies them before its next chunk"),
            None => "they apply when the job next runs".into(),
        };
        println!(
            "job {name}: overrides now rows_per_second {}, target_chunk_time {}, pause {}; {applies}",
            controls.rows_per_second.map(|r| r.to_string()).unwrap_or_else(|| "(job's)".into()),
            controls.target_chunk_time.map(|d| humantime::format_duration(d).to_string()).unwrap_or_else(|| "(job's)".into()),
            controls.pause.map(|d| humantime::format_duration(d).to_string()).unwrap_or_else(|| "(job's)".into()),
        );
    } else {
        println!("{done}");
    }
    Ok(exit::SUCCESS)
}

async fn history(target: &Target, store: &Store, name: &str, json: bool) -> Result<u8> {
    let client = target.connect().await?;
    let runs = store.history(&client, name).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&runs).expect("serializable")
        );
        return Ok(exit::SUCCESS);
    }
    if runs.is_empty() {
        println!("job {name}: no runs");
        return Ok(exit::SUCCESS);
    }
    println!(
        "{:>5}  {:<20}  {:<20}  {:<24} {:>7} {:>10} {:>8}  OUTCOME",
        "RUN", "STARTED", "ENDED", "HOST", "PID", "ROWS", "CHUNKS"
    );
    for r in &runs {
        println!(
            "{:>5}  {:<20}  {:<20}  {:<24} {:>7} {:>10} {:>8}  {}{}",
            r.id,
            r.started_at,
            r.ended_at.as_deref().unwrap_or("-"),
            r.host,
            r.pid,
            r.rows_done,
            r.chunks_done,
            r.outcome.as_deref().unwrap_or("running"),
            r.last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    Ok(exit::SUCCESS)
}

async fn failures(target: &Target, store: &Store, name: &str, all: bool, json: bool) -> Result<u8> {
    let client = target.connect().await?;
    let list = store.failures(&client, name, all).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).expect("serializable")
        );
        return Ok(exit::SUCCESS);
    }
    if list.is_empty() {
        println!(
            "job {name}: no {}failing keys",
            if all { "" } else { "unresolved " }
        );
    }
    for f in &list {
        println!(
            "{:<24} {:<8} attempts {:<3} last {}{}  {}",
            show_key(&f.key),
            f.sqlstate.as_deref().unwrap_or("-"),
            f.attempts,
            f.last_seen,
            f.resolved_at
                .as_deref()
                .map(|r| format!(" resolved {r}"))
                .unwrap_or_default(),
            f.message
        );
    }
    Ok(exit::SUCCESS)
}

async fn retry_failures(target: &Target, store: &Store, jobs: &Path, name: &str) -> Result<u8> {
    let job = job::load(jobs, name)?;
    let progress = Progress::new(name, ProgressOptions::default());
    let (fixed, still) =
        executor::retry_failures(target, store, &job, &RunOptions::default(), &progress).await?;
    println!("job {name}: {fixed} failing keys now succeed, {still} still fail");
    if still > 0 {
        return Err(Error::Runtime(format!(
            "job {name}: {still} keys still fail; `backfill failures {name}` shows why"
        )));
    }
    Ok(exit::SUCCESS)
}

async fn reset(target: &Target, store: &Store, jobs: &Path, name: &str, yes: bool) -> Result<u8> {
    let mut client = target.connect().await?;
    if !yes {
        let c = store.load(&client, name).await?;
        let what = c
            .map(|c| {
                format!(
                    "{} rows done, cursor {}",
                    c.rows_done,
                    c.cursor
                        .as_deref()
                        .map(show_key)
                        .unwrap_or_else(|| "none".into())
                )
            })
            .unwrap_or_else(|| "no progress saved".into());
        return Err(Error::Usage(format!(
            "refusing to reset job {name} without --yes (it has {what}); `backfill reset {name} --yes` forgets the progress so the next run starts from the first key"
        )));
    }
    let _ = jobs;
    match store.reset(&mut client, name).await? {
        Some(c) => println!("job {name}: progress forgotten ({} rows done, state {}); the next run starts from the first key", c.rows_done, c.state),
        None => println!("job {name}: had no progress saved; nothing to reset"),
    }
    Ok(exit::SUCCESS)
}

async fn init(
    target: &Target,
    store: &Store,
    grant_to: &[String],
    grant_gate_to: &[String],
) -> Result<u8> {
    let mut client = target.connect().await?;
    let (before, after) = store::migrate(&mut client, store.schema()).await?;
    match before {
        None => println!(
            "created schema {} (version {after}) on {}",
            store.schema(),
            target.describe()
        ),
        Some(v) if v == after => {
            println!("schema {} is up to date (version {after})", store.schema())
        }
        Some(v) => println!(
            "upgraded schema {} from version {v} to {after}",
            store.schema()
        ),
    }
    let runners = grant_to
        .iter()
        .map(|r| (r, store::grants(store.schema(), r), "what a run needs"));
    let gates = grant_gate_to.iter().map(|r| {
        (
            r,
            store::gate_grants(store.schema(), r),
            "what the SQL gate assert_done needs",
        )
    });
    for (role, sql, what) in runners.chain(gates) {
        client.batch_execute(&sql).await.map_err(|e| {
            crate::db::error(
                e,
                format!("granting role {role} access to schema {}", store.schema()),
            )
        })?;
        println!("granted role {role} {what} on schema {}", store.schema());
    }
    Ok(exit::SUCCESS)
}
