//! `status`: one job in detail (state, phase, progress, ETA, ranges, runners, controls) or every
//! job in a table; text or JSON. What the job's near future is (paused, held, ETA) is `outlook`'s
//! to decide; this module reads and prints.

use super::outlook::Outlook;
use crate::db::Target;
use crate::error::{exit, Error, Result};
use crate::job::{self, JobSpec};
use crate::keyset::show_key;
use crate::state::{JobState, Phase, ShownState};
use crate::store::{Checkpoint, Controls, Store};
use std::path::Path;

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

/// One job as `status --json` shows it: the checkpoint and controls as read, and the outlook
/// (paused, held since, recent rate, ETA) as top-level fields.
#[derive(serde::Serialize)]
struct Shown<'a> {
    job: &'a str,
    state: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    phase: Option<&'a str>,
    #[serde(flatten)]
    outlook: &'a Outlook,
    checkpoint: Option<&'a Checkpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    controls: Option<&'a Controls>,
}

pub(super) async fn status(
    target: &Target,
    store: &Store,
    jobs: &Path,
    name: Option<&str>,
    json: bool,
) -> Result<u8> {
    let client = target.connect().await?;
    match name {
        Some(name) => one(&client, store, jobs, name, json).await?,
        None => overview(&client, store, jobs, json).await?,
    }
    Ok(exit::SUCCESS)
}

/// `status NAME`: one job in detail.
async fn one(
    client: &tokio_postgres::Client,
    store: &Store,
    jobs: &Path,
    name: &str,
    json: bool,
) -> Result<()> {
    let c = store.load(client, name).await?;
    let controls = store.controls_for_status(client, name).await?;
    let spec = crate::resolve::load(jobs, name).ok();
    if c.is_none() && spec.is_none() {
        return Err(Error::Usage(format!(
            "job `{name}`: no checkpoint in schema {} and no file {}",
            store.schema(),
            job::path_for(jobs, name).display()
        )));
    }
    let phase = phase_of(client, spec.as_ref(), c.as_ref()).await;
    let outlook = Outlook::of(c.as_ref(), &controls);
    if json {
        super::print_json(&Shown {
            job: name,
            state: state_of(c.as_ref()),
            phase: Some(&phase),
            outlook: &outlook,
            checkpoint: c.as_ref(),
            controls: Some(&controls),
        });
    } else {
        print_status(name, spec.as_ref(), c.as_ref(), &controls, &phase, &outlook);
    }
    Ok(())
}

/// `status`: every job, one line each.
async fn overview(
    client: &tokio_postgres::Client,
    store: &Store,
    jobs: &Path,
    json: bool,
) -> Result<()> {
    let all = store.load_all(client).await?;
    let mut rows = Vec::new();
    for n in job_names(jobs, &all) {
        let controls = store.controls_for_status(client, &n).await?;
        let c = all.iter().find(|c| c.job == n);
        let outlook = Outlook::of(c, &controls);
        rows.push((n, c, outlook));
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(n, c, outlook)| Shown {
                job: n,
                state: state_of(*c),
                phase: None,
                outlook,
                checkpoint: *c,
                controls: None,
            })
            .collect();
        super::print_json(&v);
        return Ok(());
    }
    println!(
        "{:<24} {:<12} {:<20} {:>24} {:>9} {:>12} {:>12}  {:<20}  HELD",
        "JOB", "STATE", "PHASE", "ROWS DONE", "CHUNKS", "ROWS/S", "ETA", "UPDATED"
    );
    for (n, c, outlook) in &rows {
        println!(
            "{:<24} {:<12} {:<20} {:>24} {:>9} {:>12} {:>12}  {:<20}  {}",
            n,
            state_of(*c),
            recorded_phase(*c),
            c.map(progress_text).unwrap_or_else(|| "-".into()),
            c.map(|c| c.chunks_done.to_string())
                .unwrap_or_else(|| "-".into()),
            c.and_then(|c| overview_rate(c, outlook))
                .map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "-".into()),
            outlook.eta_cell(),
            c.map(|c| c.updated_at.as_str()).unwrap_or("-"),
            outlook.hold_cell(),
        );
    }
    Ok(())
}

/// The overview's rate: the live runs' recent one (none while paused or held: rows stop on
/// purpose, and a 30 s window would still show the rate before), else the last run's average.
pub(super) fn overview_rate(c: &Checkpoint, outlook: &Outlook) -> Option<f64> {
    if !c.runners.iter().any(|o| o.alive) {
        return c.rate_rows_per_second;
    }
    outlook.recent_rows_per_second.filter(|_| outlook.flowing())
}

pub(super) fn state_of(c: Option<&Checkpoint>) -> &'static str {
    c.map_or(JobState::New.as_sql(), |c| c.state.as_str())
}

pub(super) fn progress_text(c: &Checkpoint) -> String {
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

/// The phase the engine last recorded for a job.
pub(super) fn recorded_phase(c: Option<&Checkpoint>) -> String {
    match c {
        None => "not started".to_string(),
        Some(c) if c.state == ShownState::Interrupted => "interrupted (no live runner)".to_string(),
        Some(c) => c.phase.map_or(c.state.as_str(), Phase::as_sql).to_string(),
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
    let recorded = recorded_phase(c);
    let Some(spec) = spec else { return recorded };
    match crate::migrator::contract_applied(client, spec).await {
        Ok(Some(_)) if c.is_some_and(|c| c.state.recorded().is_finished()) => {
            "contract applied".into()
        }
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
    outlook: &Outlook,
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
    print_progress(c, &line);
    line("eta", &outlook.eta_text(name));
    print_activity(c, outlook, &line);
    print_problems(name, spec, c, &line);
}

/// How far the job got: its table, counts, key ranges or cursor, and upper bound.
fn print_progress(c: &Checkpoint, line: &impl Fn(&str, &str)) {
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
}

/// The rate line: the live runs' recent rate (and their average), or the last run's average.
fn rate_text(c: &Checkpoint, outlook: &Outlook) -> Option<String> {
    let live = c.runners.iter().filter(|o| o.alive).count();
    // The window still holds what committed before a pause or hold began: say that it ended.
    let now = match (live, outlook.paused, outlook.flowing()) {
        (_, true, _) => "paused now".to_string(),
        (_, false, false) => "held now".to_string(),
        (1, _, _) => "now".to_string(),
        (n, _, _) => format!("now, {n} runs together"),
    };
    let average = "on average since the run started";
    match (c.recent_rows_per_second, c.rate_rows_per_second) {
        (Some(recent), a) if live > 0 => Some(format!(
            "{recent:.0} rows/s over the last {}s ({now}){}",
            crate::store::RECENT_RATE_WINDOW.as_secs(),
            a.map(|a| format!("; {a:.0} rows/s {average}"))
                .unwrap_or_default()
        )),
        (_, Some(r)) if live > 0 => Some(format!("{r:.0} rows/s ({average})")),
        (_, Some(r)) => Some(format!("{r:.0} rows/s (last run)")),
        (_, None) => None,
    }
}

/// What the job is doing and did: rate, chunk size, hold, sweeps, finishing steps, verify, times
/// and runners.
fn print_activity(c: &Checkpoint, outlook: &Outlook, line: &impl Fn(&str, &str)) {
    if let Some(rate) = rate_text(c, outlook) {
        line("rate", &rate);
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
}

/// What needs the operator: failed keys, the last error, a definition changed since.
fn print_problems(name: &str, spec: Option<&JobSpec>, c: &Checkpoint, line: &impl Fn(&str, &str)) {
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
    // A cancel with no live run left has taken effect (or its run died): nothing to stop.
    if c.cancel && c.live_runs > 0 {
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
