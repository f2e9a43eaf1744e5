//! Commands given `--fleet FILE`: the same command on every shard the file lists, each shard
//! a database of its own, at most `max_parallel` of them at once, answers in the file's order.
//! One shard that cannot be reached or fails is reported with its name and does not stop the
//! others. Owns the per-shard tables and the fleet's exit code; what a command does on one shard
//! is the single-database code's (migrator, status), never repeated here.

use super::run::Mode;
use crate::cli::{Cli, Command, LogFormat};
use crate::error::{exit, Error, Result};
use crate::fleet::Fleet;
use crate::job::JobSpec;
use crate::migrator::GateReport;
use crate::store::Store;
use std::path::Path;
use std::time::Duration;

pub(super) async fn execute(path: &Path, cli: &Cli) -> Result<u8> {
    let fleet = crate::fleet::load(path)?;
    let store = Store::new(&cli.global.schema);
    let jobs = &cli.global.jobs;
    let log_json = cli.global.log_format == LogFormat::Json;
    match &cli.command {
        Command::Check { name } => check(&fleet, jobs, name.as_deref()),
        Command::Gate {
            name,
            json,
            verify_timeout,
        } => {
            let job = crate::resolve::load(jobs, name)?;
            gate(&fleet, &store, &job, *verify_timeout, *json).await
        }
        Command::Status {
            name: Some(name),
            json,
        } => super::fleet_status::status(&fleet, &store, jobs, name, *json).await,
        Command::Run(args) => super::fleet_run::run(&fleet, &store, jobs, args, log_json, Mode::Forward).await,
        Command::Revert(args) => super::fleet_run::run(&fleet, &store, jobs, args, log_json, Mode::Revert).await,
        Command::List { .. } | Command::Demo { .. } | Command::Status { name: None, .. } => {
            Err(Error::Usage(format!(
                "`backfill {}` does not take --fleet{}",
                cli.command.verb(),
                match &cli.command {
                    Command::Status { .. } => ": name the job (`backfill status NAME --fleet FILE`)",
                    _ => "",
                }
            )))
        }
        Command::Plan { json: true, .. }
        | Command::History { json: true, .. }
        | Command::Failures { json: true, .. } => Err(Error::Usage(format!(
            "`backfill {} --json` does not take --fleet: run it once per shard with --database-url (with --fleet, --json is for status, gate and run)",
            cli.command.verb()
        ))),
        _ => each_shard(&fleet, cli).await,
    }
}

/// A command with nothing fleet-wide to add, on one shard after another in the file's order,
/// each shard's output under a line naming it; a shard whose command fails does not stop the
/// next. Exits with the fleet's code over the shards' (see [`crate::fleet::exit_code`]).
async fn each_shard(fleet: &Fleet, cli: &Cli) -> Result<u8> {
    let job = cli.command.job_name();
    let log_json = cli.global.log_format == LogFormat::Json;
    let mut codes = Vec::with_capacity(fleet.shards.len());
    let mut failed = Vec::new();
    for shard in &fleet.shards {
        println!("== shard {} ({})", shard.name, shard.target.describe());
        let code = match super::on_database(cli, None, || Ok(shard.target.clone())).await {
            Ok(code) => code,
            Err(e) => {
                let line = super::final_line(&e, job, log_json);
                crate::out::stderr(format_args!("{}: {line}\n", shard.name));
                e.exit_code()
            }
        };
        if code != exit::SUCCESS {
            failed.push(format!("{} (exit {code})", shard.name));
        }
        codes.push(code);
    }
    let verb = cli.command.verb();
    let total = fleet.shards.len();
    if failed.is_empty() {
        println!("`{verb}` succeeded on every shard ({total})");
    } else {
        println!(
            "`{verb}` did not succeed on {} of {total} shards: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(crate::fleet::exit_code(codes.into_iter()))
}

/// The fleet file and the job files, offline, like `check` on one database.
fn check(fleet: &Fleet, jobs: &Path, name: Option<&str>) -> Result<u8> {
    println!(
        "ok       fleet {} ({} shards, max_parallel {})",
        fleet.path.display(),
        fleet.shards.len(),
        fleet.max_parallel
    );
    for shard in &fleet.shards {
        println!("         {:<12} {}", shard.name, shard.target.describe());
    }
    super::check(jobs, name)
}

/// One shard's gate: its report, or why it could not be asked.
#[derive(serde::Serialize)]
struct ShardGate {
    shard: String,
    passed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    reason: String,
    /// The shard could not be asked (unreachable, missing privileges…): exit 1, not 3.
    error: bool,
}

impl ShardGate {
    /// What the gate on this shard alone would exit with.
    fn code(&self) -> u8 {
        match (self.passed, self.error) {
            (true, _) => exit::SUCCESS,
            (false, false) => exit::NOT_SATISFIED,
            (false, true) => exit::FAILURE,
        }
    }
}

/// Exit 0 only when every shard's gate passes; else 1 when a shard could not be asked, else 3.
/// The shards that are not ready are listed, each with its reason.
async fn gate(
    fleet: &Fleet,
    store: &Store,
    job: &JobSpec,
    verify_timeout: Duration,
    json: bool,
) -> Result<u8> {
    let answers = crate::fleet::on_every_shard(fleet, |shard| async move {
        let report: Result<GateReport> = async {
            let mut client = shard.target.connect().await?;
            crate::migrator::gate(&mut client, store, job, verify_timeout).await
        }
        .await;
        match report {
            Ok(r) => ShardGate {
                shard: shard.name.clone(),
                passed: r.passed,
                state: Some(r.state),
                reason: r.reason,
                error: false,
            },
            Err(e) => ShardGate {
                shard: shard.name.clone(),
                passed: false,
                state: None,
                reason: e.to_string(),
                error: true,
            },
        }
    })
    .await;
    let gates: Vec<ShardGate> = answers.into_iter().map(|(_, g)| g).collect();
    let not_ready: Vec<&str> = gates
        .iter()
        .filter(|g| !g.passed)
        .map(|g| g.shard.as_str())
        .collect();
    let passed = not_ready.is_empty();
    if json {
        let out = serde_json::json!({
            "job": job.name,
            "passed": passed,
            "not_ready": not_ready,
            "shards": gates,
        });
        super::print_json(&out);
    } else {
        for g in &gates {
            let verdict = match g.code() {
                exit::SUCCESS => "ready",
                exit::NOT_SATISFIED => "not ready",
                _ => "error",
            };
            println!("{:<12} {verdict:<9}  {}", g.shard, g.reason);
        }
        if passed {
            println!("job {}: every shard ({}) is ready", job.name, gates.len());
        } else {
            println!(
                "job {}: {} of {} shards not ready: {}",
                job.name,
                not_ready.len(),
                gates.len(),
                not_ready.join(", ")
            );
        }
    }
    Ok(crate::fleet::exit_code(gates.iter().map(ShardGate::code)))
}
