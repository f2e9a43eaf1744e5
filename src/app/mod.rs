//! The commands: each turns parsed arguments into calls on the library and prints the result.
//! Data goes to stdout (JSON with `--json`); progress and logs go to stderr. `run`/`revert` live
//! in `run`, `status` in `status`, the live controls and `history` in `control`; the smaller
//! commands here. A command decides nothing about states, classes or what "done" means: it asks
//! `state` (finished, a finished run's phase, the state a job shows), `migrator` (the gate, the
//! contract applied) and the executor's outcome, then prints and returns an exit code or a typed
//! error for `main` to map. What it does own is what follows a run's outcome (a complete revert
//! is recorded, a complete run's finishing steps run) and the operator's text. Must not write
//! SQL on the engine's schema itself (the store does).

mod control;
mod fleet;
mod fleet_run;
mod fleet_status;
mod outlook;
mod run;
mod status;
mod tables;

use crate::cli::{Cli, Command, LogFormat, Place};
use crate::db::Target;
use crate::error::{exit, Error, Result};
use crate::executor::{self, RunOptions};
use crate::keyset::show_key;
use crate::store::{self, Store};
use crate::telemetry::{Progress, ProgressOptions};
use control::{control, control_change, history, Control};
use run::Mode;
use status::state_of;
use std::path::Path;

/// The whole process after parsing: runs the command on a runtime of its own, and turns its
/// outcome into the exit code, printing an error (or a deliberate stop) on stderr (a JSON line
/// with `--log-format json`).
pub fn main(cli: Cli) -> std::process::ExitCode {
    let json = cli.global.log_format == LogFormat::Json;
    let job = cli.command.job_name().map(str::to_string);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(execute(cli));
    // A reader that went away is a normal end (`out`); any other lost output is a failure.
    let result = match (result, crate::out::stdout_error()) {
        (Ok(_), Some(e)) => Err(Error::Runtime(format!(
            "writing to stdout failed: {e}; the output is incomplete"
        ))),
        (r, _) => r,
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            crate::out::stderr(format_args!("{}\n", final_line(&e, job.as_deref(), json)));
            e.process_exit_code()
        }
    }
}

/// The last line of a command that ended in an error. A deliberate stop (a signal, `backfill
/// cancel`) is no failure: it says where the next run resumes, without `error:`, and its JSON
/// level is `info`. As a JSON object it carries `ts`, `level` and `job` like every log line.
fn final_line(e: &Error, job: Option<&str>, json: bool) -> String {
    let stopped = e.kind() == crate::error::ErrorKind::Interrupted;
    if json {
        let ts = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let level = if stopped { "info" } else { "error" };
        serde_json::json!({
            "ts": ts,
            "level": level,
            "job": job,
            "msg": e.to_string(),
            "exit_code": e.exit_code(),
        })
        .to_string()
    } else if stopped {
        e.to_string()
    } else {
        format!("error: {e}")
    }
}

/// A command's `--json` answer on stdout.
fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// Runs one command; returns the exit code for outcomes that are not errors.
pub async fn execute(cli: Cli) -> Result<u8> {
    match cli.global.place().map_err(Error::Usage)? {
        Place::Fleet(path) => fleet::execute(&path, &cli).await,
        Place::Database(url) => {
            on_database(&cli, url.as_deref(), || Target::resolve(url.as_deref())).await
        }
    }
}

/// The command on one database, which `target` gives when the command needs one (a fleet calls
/// this once per shard).
async fn on_database(
    cli: &Cli,
    url: Option<&str>,
    target: impl Fn() -> Result<Target>,
) -> Result<u8> {
    let g = &cli.global;
    let store = Store::new(&g.schema);
    let log_json = g.log_format == LogFormat::Json;
    match &cli.command {
        Command::Run(args) => {
            run::run(&target()?, &store, &g.jobs, args, log_json, Mode::Forward).await
        }
        Command::Revert(args) => {
            run::run(&target()?, &store, &g.jobs, args, log_json, Mode::Revert).await
        }
        Command::DropUndo { name, yes } => run::drop_undo(&target()?, &store, name, *yes).await,
        Command::Status { name, json } => {
            status::status(&target()?, &store, &g.jobs, name.as_deref(), *json).await
        }
        Command::List { json } => list(url, &store, &g.jobs, *json).await,
        Command::Check { name } => check(&g.jobs, name.as_deref()),
        Command::Plan {
            name,
            json,
            verify_timeout,
            long_transaction,
        } => {
            let opts = crate::plan::PlanOptions {
                verify_timeout: *verify_timeout,
                long_transaction: *long_transaction,
            };
            plan(&target()?, &store, &g.jobs, name, &opts, *json).await
        }
        Command::Gate {
            name,
            json,
            verify_timeout,
        } => gate(&target()?, &store, &g.jobs, name, *verify_timeout, *json).await,
        Command::Pause { name } => control(&target()?, &store, &g.jobs, name, Control::Pause).await,
        Command::Resume { name } => {
            control(&target()?, &store, &g.jobs, name, Control::Resume).await
        }
        Command::Cancel { name } => {
            control(&target()?, &store, &g.jobs, name, Control::Cancel).await
        }
        Command::Set(args) => {
            let change = control_change(args)?;
            control(
                &target()?,
                &store,
                &g.jobs,
                &args.name,
                Control::Set(change),
            )
            .await
        }
        Command::History { name, json } => history(&target()?, &store, name, *json).await,
        Command::Failures { name, all, json } => {
            failures(&target()?, &store, name, *all, *json).await
        }
        Command::RetryFailures { name } => {
            retry_failures(&target()?, &store, &g.jobs, name, log_json).await
        }
        Command::Reset { name, yes } => reset(&target()?, &store, &g.jobs, name, *yes).await,
        Command::Init {
            grant_to,
            grant_gate_to,
        } => init(&target()?, &store, grant_to, grant_gate_to).await,
        Command::Demo { rows } => crate::demo::run(url, &store, &g.jobs, *rows).await,
    }
}

async fn plan(
    target: &Target,
    store: &Store,
    jobs: &Path,
    name: &str,
    opts: &crate::plan::PlanOptions,
    json: bool,
) -> Result<u8> {
    let job = crate::resolve::load(jobs, name)?;
    let plan = crate::plan::plan(target, store, &job, opts).await?;
    if json {
        print_json(&plan);
    } else {
        crate::plan::print_text(&plan);
    }
    Ok(if plan.has_errors() {
        exit::USAGE
    } else {
        exit::SUCCESS
    })
}

async fn gate(
    target: &Target,
    store: &Store,
    jobs: &Path,
    name: &str,
    verify_timeout: std::time::Duration,
    json: bool,
) -> Result<u8> {
    let job = crate::resolve::load(jobs, name)?;
    let mut client = target.connect().await?;
    let report = crate::migrator::gate(&mut client, store, &job, verify_timeout).await?;
    if json {
        print_json(&report);
    } else {
        println!("{}", report.reason);
    }
    Ok(if report.passed {
        exit::SUCCESS
    } else {
        exit::NOT_SATISFIED
    })
}

async fn list(url: Option<&str>, store: &Store, jobs: &Path, json: bool) -> Result<u8> {
    let specs = crate::resolve::load_all(jobs)?;
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
        print_json(&v);
    } else {
        let rows = specs.iter().map(|(n, s)| {
            let spec = s.as_ref().map_err(|e| e.to_string());
            (n.as_str(), spec, state(n).to_string())
        });
        for line in tables::jobs(rows) {
            println!("{line}");
        }
    }
    Ok(exit::SUCCESS)
}

fn check(jobs: &Path, name: Option<&str>) -> Result<u8> {
    let results = match name {
        Some(n) => vec![(n.to_string(), crate::resolve::load(jobs, n))],
        None => crate::resolve::load_all(jobs)?,
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

async fn failures(target: &Target, store: &Store, name: &str, all: bool, json: bool) -> Result<u8> {
    let client = target.connect().await?;
    let list = store.failures(&client, name, all).await?;
    if json {
        print_json(&list);
        return Ok(exit::SUCCESS);
    }
    if list.is_empty() {
        println!(
            "job {name}: no {}failing keys",
            if all { "" } else { "unresolved " }
        );
    } else {
        for line in tables::failed_keys(&list) {
            println!("{line}");
        }
    }
    Ok(exit::SUCCESS)
}

/// Retries the job's failing keys; its log lines follow `--log-format` (`json`) like a run's.
async fn retry_failures(
    target: &Target,
    store: &Store,
    jobs: &Path,
    name: &str,
    json: bool,
) -> Result<u8> {
    let job = crate::resolve::load(jobs, name)?;
    let opts = ProgressOptions {
        json,
        ..ProgressOptions::default()
    };
    let progress = Progress::new(name, opts);
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
            "what the gate needs (assert_done and `backfill gate`)",
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
    for role in grant_to {
        grant_stats(&client, role).await?;
    }
    Ok(exit::SUCCESS)
}

/// Lets a runner's role see other roles' sessions (`pg_read_all_stats`): the lock-wait yield,
/// `hold_during_autovacuum` and `plan` read them, and a run whose role cannot holds (see
/// `db::StatsAccess`). Granting a predefined role takes a superuser or ADMIN on it, which the
/// schema's owner often lacks: then this says what to ask for instead of failing the schema
/// grants already made.
async fn grant_stats(client: &tokio_postgres::Client, role: &str) -> Result<()> {
    use crate::db::STATS_ROLE;
    let sees = || async {
        client
            .query_one(
                "SELECT pg_has_role($1::name, $2::name, 'USAGE')",
                &[&role, &STATS_ROLE],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .map_err(|e| {
                crate::db::error(e, format!("checking whether role {role} has {STATS_ROLE}"))
            })
    };
    if sees().await? {
        println!("role {role} already sees other roles' sessions ({STATS_ROLE})");
        return Ok(());
    }
    let quoted = crate::sql::quote_ident(role);
    let grant = format!("GRANT {STATS_ROLE} TO {quoted}");
    match client.batch_execute(&grant).await {
        Ok(()) => {}
        Err(e) if crate::db::sqlstate(&e) == Some("42501") => {
            eprintln!(
                "warning: could not grant {STATS_ROLE} to role {role} ({}); without it the role cannot see other roles' sessions, so its runs hold (on_signal_error = \"hold\") until a superuser or a role with ADMIN on {STATS_ROLE} runs `{grant}`",
                crate::db::describe(&e)
            );
            return Ok(());
        }
        Err(e) => {
            return Err(crate::db::error(
                e,
                format!("granting role {role} {STATS_ROLE}"),
            ))
        }
    }
    if sees().await? {
        println!(
            "granted role {role} {STATS_ROLE}: its runs see other roles' lock waits and vacuums"
        );
    } else {
        eprintln!(
            "warning: role {role} is now a member of {STATS_ROLE} but does not inherit its privileges (NOINHERIT), so its runs still hold; `ALTER ROLE {quoted} INHERIT`, or grant it to a role it inherits from"
        );
    }
    Ok(())
}
