//! `status NAME --fleet FILE`: the job on every shard, one line each (state, phase, rows, rate,
//! ETA, held or last error), and the fleet's total; or all of it as JSON. A shard that cannot
//! be read is a line with its error, and the others are still shown. Owns the fleet's table and
//! total; what a shard's line says is decided as for one database (`status`, `outlook`).

use super::outlook::Outlook;
use super::status::{overview_rate, progress_text, recorded_phase, state_of};
use crate::error::{exit, Error, Result};
use crate::fleet::on_every_shard;
use crate::fleet::Fleet;
use crate::store::{Checkpoint, Controls, Store};
use std::path::Path;
use std::time::Duration;

/// One shard's status, or why it could not be read.
#[derive(serde::Serialize)]
struct ShardStatus {
    shard: String,
    job: String,
    state: String,
    /// What the engine last recorded (`status NAME`'s phase, without asking the migrator).
    phase: String,
    #[serde(flatten)]
    outlook: Option<Outlook>,
    checkpoint: Option<Checkpoint>,
    controls: Option<Controls>,
    /// The shard could not be read (unreachable, privileges…).
    error: Option<String>,
}

/// The fleet's figures: rows over every shard; the ETA of the slowest shard when every shard
/// still to finish has one.
#[derive(serde::Serialize)]
struct FleetTotal {
    shards: usize,
    shards_done: usize,
    rows_done: i64,
    total_estimate: Option<i64>,
    recent_rows_per_second: f64,
    eta_seconds: Option<u64>,
}

pub(super) async fn status(
    fleet: &Fleet,
    store: &Store,
    jobs: &Path,
    name: &str,
    json: bool,
) -> Result<u8> {
    let rows = on_every_shard(fleet, |shard| async move {
        let read: Result<(Option<Checkpoint>, Controls)> = async {
            let client = shard.target.connect().await?;
            let c = store.load(&client, name).await?;
            let controls = store.controls_for_status(&client, name).await?;
            Ok((c, controls))
        }
        .await;
        match read {
            Ok((c, controls)) => ShardStatus {
                shard: shard.name.clone(),
                job: name.to_string(),
                state: state_of(c.as_ref()).to_string(),
                phase: recorded_phase(c.as_ref()),
                outlook: Some(Outlook::of(c.as_ref(), &controls)),
                checkpoint: c,
                controls: Some(controls),
                error: None,
            },
            Err(e) => ShardStatus {
                shard: shard.name.clone(),
                job: name.to_string(),
                state: "unknown".into(),
                phase: "cannot be read".into(),
                outlook: None,
                checkpoint: None,
                controls: None,
                error: Some(e.to_string()),
            },
        }
    })
    .await;
    let shards: Vec<ShardStatus> = rows.into_iter().map(|(_, s)| s).collect();
    // A mistyped name would show every shard "new": refused, as `status NAME` refuses it.
    let known = shards.iter().any(|s| s.checkpoint.is_some())
        || crate::job::file_exists(jobs, name).unwrap_or(false);
    if !known && shards.iter().all(|s| s.error.is_none()) {
        return Err(Error::Usage(format!(
            "job `{name}`: no checkpoint on any shard of {} and no file {}",
            fleet.path.display(),
            crate::job::path_for(jobs, name).display()
        )));
    }
    let total = total(&shards);
    if json {
        let out = serde_json::json!({ "job": name, "shards": shards, "total": total });
        super::print_json(&out);
    } else {
        print_table(name, &shards, &total);
    }
    Ok(if shards.iter().any(|s| s.error.is_some()) {
        exit::FAILURE
    } else {
        exit::SUCCESS
    })
}

fn total(shards: &[ShardStatus]) -> FleetTotal {
    let read: Vec<(&Checkpoint, &Outlook)> = shards
        .iter()
        .filter_map(|s| s.checkpoint.as_ref().zip(s.outlook.as_ref()))
        .collect();
    let done = |c: &Checkpoint| c.state.recorded().is_finished();
    let shards_done = read.iter().filter(|(c, _)| done(c)).count();
    let every_shard_counted = read.len() == shards.len();
    let total_estimate = read
        .iter()
        .map(|(c, _)| c.total_estimate.map(|t| t.max(c.rows_done)))
        .sum::<Option<i64>>()
        .filter(|_| every_shard_counted);
    // Every shard not done has an ETA (so every one is running): the slowest decides.
    let unfinished: Vec<Option<u64>> = read
        .iter()
        .filter(|(c, _)| !done(c))
        .map(|(_, o)| o.eta_seconds)
        .collect();
    let eta_seconds = match every_shard_counted {
        true if unfinished.is_empty() => Some(0),
        true => unfinished
            .iter()
            .copied()
            .sum::<Option<u64>>()
            .and(unfinished.iter().flatten().max().copied()),
        false => None,
    };
    FleetTotal {
        shards: shards.len(),
        shards_done,
        rows_done: read.iter().map(|(c, _)| c.rows_done).sum(),
        total_estimate,
        // Only the live runs' recent rate: a stopped shard's last average is not flowing now.
        recent_rows_per_second: read
            .iter()
            .filter(|(_, o)| o.flowing())
            .filter_map(|(_, o)| o.recent_rows_per_second)
            .fold(0.0, |sum, r| sum + r),
        eta_seconds,
    }
}

fn print_table(name: &str, shards: &[ShardStatus], total: &FleetTotal) {
    let width = shards
        .iter()
        .map(|s| s.shard.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<width$} {:<12} {:<20} {:>24} {:>10} {:>10}  HELD / LAST ERROR",
        "SHARD", "STATE", "PHASE", "ROWS DONE", "ROWS/S", "ETA"
    );
    for s in shards {
        let c = s.checkpoint.as_ref();
        let (rate, eta, note) = match &s.outlook {
            Some(o) => {
                let note = match (
                    o.hold_cell().as_str(),
                    c.and_then(|c| c.last_error.as_deref()),
                ) {
                    ("-", Some(e)) => e.to_string(),
                    (held, _) => held.to_string(),
                };
                let rate = c
                    .and_then(|c| overview_rate(c, o))
                    .map(|r| format!("{r:.0}"))
                    .unwrap_or_else(|| "-".into());
                (rate, o.eta_cell(), note)
            }
            None => ("-".into(), "-".into(), s.error.clone().unwrap_or_default()),
        };
        let phase = &s.phase;
        println!(
            "{:<width$} {:<12} {:<20} {:>24} {:>10} {:>10}  {note}",
            s.shard,
            s.state,
            phase,
            c.map(progress_text).unwrap_or_else(|| "-".into()),
            rate,
            eta
        );
    }
    let of = total
        .total_estimate
        .map(|t| format!(" of ~{t}"))
        .unwrap_or_default();
    let eta = match total.eta_seconds {
        Some(s) => humantime::format_duration(Duration::from_secs(s)).to_string(),
        None => "unknown".into(),
    };
    println!(
        "{name}: {} of {} shards done; {}{of} rows; {:.0} rows/s; eta {eta}",
        total.shards_done, total.shards, total.rows_done, total.recent_rows_per_second
    );
}
