//! The text tables of `list`, `history` and `failures`: a header row, then one row per item,
//! each column as wide as its widest cell, the last (free text) unpadded. Owns only the layout
//! and the column names; the rows come from the store and `--json` prints those rows as they are.

use crate::job::JobSpec;
use crate::keyset::show_key;
use crate::state::{JobState, RunOutcome};
use crate::store::{ControlEvent, FailedKey, RunRecord};

/// How a column's cells line up: numbers to the right, text to the left.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// Lines of a table: `columns` (name, alignment), then `rows`, cells two spaces apart.
fn layout(columns: &[(&str, Align)], rows: &[Vec<String>]) -> Vec<String> {
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([name.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let header: Vec<String> = columns.iter().map(|(n, _)| n.to_string()).collect();
    std::iter::once(&header)
        .chain(rows)
        .map(|cells| {
            let last = cells.len() - 1;
            let mut line = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let w = widths[i];
                match columns[i].1 {
                    Align::Right => line.push_str(&format!("{cell:>w$}")),
                    Align::Left if i == last => line.push_str(cell),
                    Align::Left => line.push_str(&format!("{cell:<w$}")),
                }
            }
            line.trim_end().to_string()
        })
        .collect()
}

/// `list`: each job file with its state, table and description (or why it is invalid).
pub(super) fn jobs<'a>(
    specs: impl IntoIterator<Item = (&'a str, Result<&'a JobSpec, String>, String)>,
) -> Vec<String> {
    let rows: Vec<Vec<String>> = specs
        .into_iter()
        .map(|(name, spec, state)| match spec {
            Ok(s) => vec![
                name.to_string(),
                state,
                s.table.to_string(),
                s.description.clone().unwrap_or_default(),
            ],
            Err(e) => vec![name.to_string(), state, "-".into(), format!("INVALID: {e}")],
        })
        .collect();
    use Align::Left;
    layout(
        &[
            ("JOB", Left),
            ("STATE", Left),
            ("TABLE", Left),
            ("DESCRIPTION", Left),
        ],
        &rows,
    )
}

/// `history`: one run a line; OUTCOME is the state word, the run's error its own last column.
pub(super) fn runs(runs: &[RunRecord]) -> Vec<String> {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.started_at.clone(),
                r.ended_at.clone().unwrap_or_else(|| "-".into()),
                r.host.clone(),
                r.pid.to_string(),
                r.rows_done.to_string(),
                r.chunks_done.to_string(),
                r.outcome
                    .map_or(JobState::Running.as_sql(), RunOutcome::as_sql)
                    .to_string(),
                r.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    use Align::{Left, Right};
    layout(
        &[
            ("RUN", Right),
            ("STARTED", Left),
            ("ENDED", Left),
            ("HOST", Left),
            ("PID", Right),
            ("ROWS", Right),
            ("CHUNKS", Right),
            ("OUTCOME", Left),
            ("ERROR", Left),
        ],
        &rows,
    )
}

/// `history`, below the runs: one recorded control a line — when, what, who (the database role,
/// with the login role when they differ), from which host and process, and what it changed.
pub(super) fn control_events(events: &[ControlEvent]) -> Vec<String> {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            let role = if e.role == e.session_role {
                e.role.clone()
            } else {
                format!("{} (login {})", e.role, e.session_role)
            };
            let host = match &e.client_addr {
                Some(addr) => format!("{} ({addr})", e.host),
                None => e.host.clone(),
            };
            vec![
                e.at.clone(),
                e.action.literal().to_string(),
                role,
                host,
                e.pid.to_string(),
                changed(&e.change),
            ]
        })
        .collect();
    use Align::{Left, Right};
    layout(
        &[
            ("AT", Left),
            ("ACTION", Left),
            ("ROLE", Left),
            ("HOST", Left),
            ("PID", Right),
            ("CHANGE", Left),
        ],
        &rows,
    )
}

/// A recorded change as `name=value` pairs: stored milliseconds as durations, a dropped
/// override as `none`.
fn changed(change: &serde_json::Value) -> String {
    let Some(fields) = change.as_object().filter(|m| !m.is_empty()) else {
        return "-".into();
    };
    fields
        .iter()
        .map(|(k, v)| match (k.strip_suffix("_ms"), v) {
            (_, serde_json::Value::Null) => format!("{}=none", k.trim_end_matches("_ms")),
            (Some(name), v) => match v.as_u64() {
                Some(ms) => format!(
                    "{name}={}",
                    humantime::format_duration(std::time::Duration::from_millis(ms))
                ),
                None => format!("{name}={v}"),
            },
            (None, v) => format!("{k}={v}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `failures`: one failing key a line, its error message last.
pub(super) fn failed_keys(keys: &[FailedKey]) -> Vec<String> {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|f| {
            vec![
                show_key(&f.key),
                f.sqlstate.clone().unwrap_or_else(|| "-".into()),
                f.attempts.to_string(),
                f.last_seen.clone(),
                f.resolved_at.clone().unwrap_or_else(|| "-".into()),
                f.message.clone(),
            ]
        })
        .collect();
    use Align::{Left, Right};
    layout(
        &[
            ("KEY", Left),
            ("SQLSTATE", Left),
            ("ATTEMPTS", Right),
            ("LAST_SEEN", Left),
            ("RESOLVED", Left),
            ("ERROR", Left),
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_under_their_header_and_the_last_is_unpadded() {
        use Align::{Left, Right};
        let lines = layout(
            &[("ID", Right), ("NAME", Left), ("NOTE", Left)],
            &[
                vec!["7".into(), "a".into(), "x".into()],
                vec!["12345".into(), "longer".into(), "".into()],
            ],
        );
        assert_eq!(
            lines,
            ["   ID  NAME    NOTE", "    7  a       x", "12345  longer",]
        );
    }

    #[test]
    fn a_recorded_change_reads_as_settings_with_durations_and_none() {
        let change = serde_json::json!({
            "pause_ms": 1500, "rows_per_second": null, "target_chunk_time_ms": 0
        });
        assert_eq!(
            changed(&change),
            "pause=1s 500ms, rows_per_second=none, target_chunk_time=0s"
        );
        assert_eq!(changed(&serde_json::json!({"paused": true})), "paused=true");
        assert_eq!(changed(&serde_json::json!({})), "-");
    }
}
