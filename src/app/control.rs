//! The live-control commands (`pause`, `resume`, `cancel`, `set`) and `history`, which shows
//! them next to the runs; and the end of a job's live overrides when it completes. Owns what the
//! operator reads: the value now in effect for each setting and where it comes from (a live
//! override, the job file, a run flag the engine cannot see from here). Every change is applied
//! and recorded by the store in one transaction; this module never writes SQL itself and never
//! decides a job's state.

use super::tables;
use crate::cli::{SetArgs, Setting};
use crate::db::Target;
use crate::error::{exit, Error, Result};
use crate::job::{self, JobSpec};
use crate::store::{
    ControlAction, ControlChange, ControlEvent, Controls, LiveRunFlags, RunRecord, Runner, Store,
    ThrottleFlags,
};
use crate::telemetry::Progress;
use std::path::Path;
use std::time::Duration;

pub(super) enum Control {
    Pause,
    Resume,
    Cancel,
    Set(ControlChange),
}

/// The overrides `backfill set` asks for: each one given (or dropped with `none`), or all
/// cleared.
pub(super) fn control_change(args: &SetArgs) -> Result<ControlChange> {
    if args.clear {
        return Ok(ControlChange {
            rows_per_second: Some(None),
            target_chunk_time: Some(None),
            pause: Some(None),
            ..ControlChange::default()
        });
    }
    if args.rows_per_second.is_none() && args.target_chunk_time.is_none() && args.pause.is_none() {
        return Err(Error::Usage(
            "nothing to set: give --rows-per-second, --target-chunk-time, --pause (a value, or `none` to drop that override), or --clear"
                .into(),
        ));
    }
    fn change<T>(s: Option<Setting<T>>) -> Option<Option<T>> {
        s.map(|s| match s {
            Setting::To(v) => Some(v),
            Setting::Clear => None,
        })
    }
    Ok(ControlChange {
        rows_per_second: change(args.rows_per_second),
        target_chunk_time: change(args.target_chunk_time),
        pause: change(args.pause),
        ..ControlChange::default()
    })
}

pub(super) async fn control(
    target: &Target,
    store: &Store,
    jobs: &Path,
    name: &str,
    what: Control,
) -> Result<u8> {
    let known_here = job::file_exists(jobs, name)?;
    let mut client = target.connect().await?;
    // A mistyped name must not "pause" a job that does not exist while the real one runs on:
    // the job needs a file here or progress in the engine's schema (a job run from another
    // host's jobs directory). Checked before anything is written, the schema included.
    if !known_here && store.load(&client, name).await?.is_none() {
        return Err(Error::Usage(format!(
            "job `{name}` not found: no file {} and no progress in schema {} ({}); nothing was changed. Check the name, or pass --jobs DIR if the jobs live elsewhere",
            job::path_for(jobs, name).display(),
            store.schema(),
            job::known_jobs(jobs)
        )));
    }
    store.ensure(&mut client).await?;
    let running = store
        .load(&client, name)
        .await?
        .and_then(|c| c.owner)
        .filter(|o| o.alive);
    let runner = running
        .as_ref()
        .map(|o| format!("the runner on host {} (pid {})", o.host, o.pid));
    let (action, change, done) = match what {
        Control::Pause => (
            ControlAction::Pause,
            ControlChange { paused: Some(true), ..ControlChange::default() },
            match &runner {
                Some(r) => format!("job {name}: paused; {r} holds before its next chunk. `backfill resume {name}` lets it go on"),
                None => format!("job {name}: paused; no runner is active, so the next `backfill run {name}` will start held until `backfill resume {name}`"),
            },
        ),
        Control::Resume => (ControlAction::Resume, ControlChange { paused: Some(false), ..ControlChange::default() }, match &runner {
            Some(r) => format!("job {name}: resumed; {r} goes on"),
            None => String::new(),
        }),
        Control::Cancel => {
            let Some(r) = &runner else {
                return Err(Error::NotSatisfied(format!("job {name} is not running; nothing to cancel")));
            };
            (
                ControlAction::Cancel,
                ControlChange { cancel: Some(true), ..ControlChange::default() },
                format!("job {name}: cancel requested; {r} stops after its current chunk (progress kept; `backfill run {name}` resumes)"),
            )
        }
        Control::Set(change) => (ControlAction::Set, change, String::new()),
    };
    let by = Runner::this_process();
    let controls = store
        .apply_control(&mut client, name, action, &change, &by)
        .await?;
    match action {
        ControlAction::Resume if runner.is_none() => Err(Error::NotSatisfied(format!(
            "job {name}: no runner is active (the pause flag is cleared); start it with `backfill run {name}`"
        ))),
        ControlAction::Set => {
            let applies = match &runner {
                Some(r) => format!("{r} applies them before its next chunk. In effect now:"),
                None => "they apply when the job next runs. For that run:".into(),
            };
            // A revert (`NAME:revert`) is paced by its job's file.
            let stem = name.strip_suffix(":revert").unwrap_or(name);
            let file = known_here.then(|| crate::resolve::load(jobs, stem));
            println!("job {name}: overrides saved; {applies}");
            let runs = store.live_run_flags(&client, name).await?;
            for line in in_effect(&controls, &change, file.as_ref(), jobs, &runs) {
                println!("  {line}");
            }
            Ok(exit::SUCCESS)
        }
        _ => {
            println!("{done}");
            Ok(exit::SUCCESS)
        }
    }
}

fn rate_text(r: Option<u32>) -> String {
    r.map_or_else(|| "none (no ceiling)".into(), |r| r.to_string())
}

fn target_text(t: Option<Duration>) -> String {
    match t.filter(|t| !t.is_zero()) {
        Some(t) => humantime::format_duration(t).to_string(),
        None => "off (chunk size fixed)".into(),
    }
}

fn pause_text(p: Duration) -> String {
    humantime::format_duration(p).to_string()
}

/// What is known here of one setting: its live override, the job file's value (or why it is not
/// known), and the live runners that were given it as a run flag (who, value).
struct Known {
    setting: &'static str,
    live: Option<String>,
    cleared: bool,
    file: std::result::Result<String, String>,
    flags: Vec<(String, String)>,
    runners: usize,
}

impl Known {
    /// The setting's line: the value in force and where it comes from. With no live runner, the
    /// next run's flags are not known, and the line says so.
    fn line(&self) -> String {
        let Known { setting, .. } = self;
        let cleared = if self.cleared {
            "override cleared; "
        } else {
            ""
        };
        let flags = self
            .flags
            .iter()
            .map(|(who, v)| format!("{v} of {who}"))
            .collect::<Vec<_>>()
            .join(", ");
        let file = match &self.file {
            Ok(f) => format!("job file: {f}"),
            Err(why) => why.clone(),
        };
        match (&self.live, self.flags.is_empty(), self.runners) {
            (Some(v), _, 0) => format!(
                "{setting} {v}: live override ({file}; a run flag, if any, is overridden)"
            ),
            (Some(v), true, _) => format!("{setting} {v}: live override ({file}; no run flag)"),
            (Some(v), false, _) => format!(
                "{setting} {v}: live override ({file}; overrides the run flag {flags})"
            ),
            (None, false, _) => format!("{setting} {flags}: run flag ({cleared}{file})"),
            (None, true, runners) => match &self.file {
                Ok(f) if runners == 0 => {
                    format!("{setting} {f}: job file ({cleared}a run flag, if any, applies)")
                }
                Ok(f) => format!("{setting} {f}: job file ({cleared}no run flag)"),
                Err(why) => format!(
                    "{setting}: the runner's job file{} ({cleared}{why}, so its value is not known here)",
                    if runners == 0 { " or run flag" } else { "" }
                ),
            },
        }
    }
}

/// One line per setting: the value in force for the job and where it comes from. The flags of
/// live runs are read from their published `throttle_flags`.
fn in_effect(
    c: &Controls,
    change: &ControlChange,
    file: Option<&Result<JobSpec>>,
    jobs: &Path,
    runs: &[LiveRunFlags],
) -> Vec<String> {
    let spec = match file {
        Some(Ok(spec)) => Ok(&spec.throttle),
        Some(Err(e)) => Err(format!("the job file is invalid: {e}")),
        None => Err(format!("no job file under {}", jobs.display())),
    };
    let ms = |v: Option<u64>| v.map(Duration::from_millis);
    let who = |r: &LiveRunFlags| format!("the runner on host {} (pid {})", r.host, r.pid);
    let flags = |of: &dyn Fn(&ThrottleFlags) -> Option<String>| -> Vec<(String, String)> {
        runs.iter()
            .filter_map(|r| of(&r.flags).map(|v| (who(r), v)))
            .collect()
    };
    let known = [
        Known {
            setting: "rows_per_second",
            live: c.rows_per_second.map(|r| rate_text(Some(r))),
            cleared: change.rows_per_second == Some(None),
            file: spec
                .as_ref()
                .map(|t| rate_text(t.rows_per_second))
                .map_err(Clone::clone),
            flags: flags(&|f| f.rows_per_second.map(|r| rate_text(Some(r)))),
            runners: runs.len(),
        },
        Known {
            setting: "target_chunk_time",
            live: c.target_chunk_time.map(|t| target_text(Some(t))),
            cleared: change.target_chunk_time == Some(None),
            file: spec
                .as_ref()
                .map(|t| target_text(t.target_chunk_time))
                .map_err(Clone::clone),
            flags: flags(&|f| ms(f.target_chunk_time_ms).map(|t| target_text(Some(t)))),
            runners: runs.len(),
        },
        Known {
            setting: "pause",
            live: c.pause.map(pause_text),
            cleared: change.pause == Some(None),
            file: spec
                .as_ref()
                .map(|t| pause_text(t.pause))
                .map_err(Clone::clone),
            flags: flags(&|f| ms(f.pause_ms).map(pause_text)),
            runners: runs.len(),
        },
    ];
    known.iter().map(Known::line).collect()
}

/// Ends the job's live overrides once it completed, so a later run of the job (after `reset`)
/// starts from its file and flags again; recorded like an operator's change. A failure here is a
/// warning: the job is complete either way.
pub(super) async fn end_overrides_at_completion(
    target: &Target,
    store: &Store,
    name: &str,
    progress: &Progress,
) {
    let ended = async {
        let mut client = target.connect().await?;
        store
            .end_overrides(&mut client, name, &Runner::this_process())
            .await
    }
    .await;
    match ended {
        Ok(before) => {
            let mut set = Vec::new();
            if let Some(r) = before.rows_per_second {
                set.push(format!("rows_per_second {r}"));
            }
            if let Some(t) = before.target_chunk_time {
                set.push(format!("target_chunk_time {}", target_text(Some(t))));
            }
            if let Some(p) = before.pause {
                set.push(format!("pause {}", pause_text(p)));
            }
            if !set.is_empty() {
                progress.log(&format!(
                    "{name}: live overrides ended with the job's completion ({})",
                    set.join(", ")
                ));
            }
        }
        Err(e) => progress.log(&format!(
            "{name}: warning: the live overrides could not be ended ({e:#}); `backfill set {name} --clear` drops them"
        )),
    }
}

pub(super) async fn history(target: &Target, store: &Store, name: &str, json: bool) -> Result<u8> {
    let client = target.connect().await?;
    let runs = store.history(&client, name).await?;
    let events = store.control_events(&client, name).await?;
    if json {
        super::print_json(&runs_with_controls(&runs, &events));
        return Ok(exit::SUCCESS);
    }
    if runs.is_empty() {
        println!("job {name}: no runs");
    } else {
        for line in tables::runs(&runs) {
            println!("{line}");
        }
    }
    if !events.is_empty() {
        println!();
        for line in tables::control_events(&events) {
            println!("{line}");
        }
    }
    Ok(exit::SUCCESS)
}

/// The runs as `history --json` always printed them, each with a `controls` list added: the
/// control events from its start until the next run's start (those before the first run with
/// the first run). Events of a job that never ran show only in the text table.
fn runs_with_controls(runs: &[RunRecord], events: &[ControlEvent]) -> serde_json::Value {
    // Both timestamps are UTC RFC 3339 of one width, so they compare as text.
    let run_of = |e: &ControlEvent| runs.iter().rposition(|r| r.started_at <= e.at).unwrap_or(0);
    let list = runs
        .iter()
        .enumerate()
        .map(|(i, run)| {
            let mut v = serde_json::to_value(run).expect("serializable");
            let mine: Vec<&ControlEvent> = events.iter().filter(|e| run_of(e) == i).collect();
            v["controls"] = serde_json::to_value(mine).expect("serializable");
            v
        })
        .collect();
    serde_json::Value::Array(list)
}
