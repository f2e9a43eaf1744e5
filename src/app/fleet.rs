//! Commands given `--fleet FILE`: the same command on every shard the file lists, each shard
//! a database of its own, at most `max_parallel` of them at once, answers in the file's order.
//! One shard that cannot be reached or fails is reported with its name and does not stop the
//! others. Owns the per-shard tables and the fleet's exit code; what a command does on one shard
//! is the single-database code's (migrator, status), never repeated here.

use crate::cli::{Cli, Command};
use crate::error::{exit, Error, Result};
use crate::fleet::{Fleet, Shard};
use crate::job::JobSpec;
use crate::migrator::GateReport;
use crate::store::Store;
use futures_util::stream::{self, StreamExt};
use std::future::Future;
use std::path::Path;
use std::time::Duration;

pub(super) async fn execute(path: &Path, cli: &Cli) -> Result<u8> {
    let fleet = crate::fleet::load(path)?;
    let store = Store::new(&cli.global.schema);
    let jobs = &cli.global.jobs;
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
        other => Err(Error::Usage(format!(
            "`backfill {}` does not take --fleet yet: run it once per shard with --database-url (fleet commands: check, gate)",
            other.verb()
        ))),
    }
}

/// The command on every shard, `max_parallel` at a time, answers in the file's order.
async fn on_every_shard<'a, T, F, Fut>(fleet: &'a Fleet, each: F) -> Vec<(&'a Shard, T)>
where
    F: Fn(&'a Shard) -> Fut,
    Fut: Future<Output = T> + 'a,
{
    stream::iter(&fleet.shards)
        .map(|shard| {
            let answer = each(shard);
            async move { (shard, answer.await) }
        })
        .buffered(fleet.max_parallel as usize)
        .collect()
        .await
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

/// Exit 0 only when every shard's gate passes; else 1 when a shard could not be asked, else 3.
/// The shards that are not ready are listed, each with its reason.
async fn gate(
    fleet: &Fleet,
    store: &Store,
    job: &JobSpec,
    verify_timeout: Duration,
    json: bool,
) -> Result<u8> {
    let answers = on_every_shard(fleet, |shard| async move {
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
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serializable")
        );
    } else {
        for g in &gates {
            let verdict = match (g.passed, g.error) {
                (true, _) => "ready",
                (false, false) => "not ready",
                (false, true) => "error",
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
    Ok(if passed {
        exit::SUCCESS
    } else if gates.iter().any(|g| g.error) {
        exit::FAILURE
    } else {
        exit::NOT_SATISFIED
    })
}
