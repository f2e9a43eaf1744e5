//! What `status` says about a job's near future: whether it is paused, why it is held and since
//! when, the rate its live runs reached recently, and when it will finish at that rate (or why
//! that is not known). Decided here, once, for the detail, the overview and their JSON, from what
//! the store read; never reads or writes the database, never prints.

use crate::store::{Checkpoint, Controls};
use std::time::{Duration, SystemTime};

/// Why `status` gives no ETA (`eta_unknown` in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum NoEta {
    /// No run of the job is alive.
    NotRunning,
    /// `backfill pause` holds the job.
    Paused,
    /// A live run is held (a health signal, lock contention, the database away…).
    Held,
    /// No live run has counted for long enough to have a recent rate.
    Measuring,
    /// The live runs committed nothing in their recent window, without being held.
    Stalled,
    /// The job's row count is not known.
    NoEstimate,
    /// The runs went past the row count estimated at the start (sweeping, verifying, or a
    /// planner's estimate that was low): what is left is not known.
    PastEstimate,
}

impl NoEta {
    /// Why, for an operator.
    fn explain(self, job: &str) -> String {
        match self {
            NoEta::NotRunning => "no run is alive".into(),
            NoEta::Paused => format!("paused; `backfill resume {job}` lets it go on"),
            NoEta::Held => "held".into(),
            NoEta::Measuring => format!(
                "measuring the rate, known {}s after a run starts",
                crate::store::HEARTBEAT_EVERY.as_secs()
            ),
            NoEta::Stalled => format!(
                "no chunk committed in the last {}s",
                crate::store::RECENT_RATE_WINDOW.as_secs()
            ),
            NoEta::NoEstimate => "the job's row count is not known".into(),
            NoEta::PastEstimate => "past the row count estimated at the start".into(),
        }
    }
}

/// A job's near future as `status` shows it (the top-level fields of its JSON besides `job`,
/// `state`, `phase`, `checkpoint`, `controls`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(super) struct Outlook {
    pub(super) paused: bool,
    /// Why a live run is held now (also "paused by `backfill pause`"), and since when.
    pub(super) hold_reason: Option<String>,
    pub(super) held_since: Option<String>,
    /// Rows per second over the live runs' last 30 s, summed over them.
    pub(super) recent_rows_per_second: Option<f64>,
    /// Rows left to the row count estimated at the start.
    pub(super) rows_to_go: Option<i64>,
    /// Seconds until done at the recent rate, and the time that makes (UTC).
    pub(super) eta_seconds: Option<u64>,
    pub(super) eta_at: Option<String>,
    pub(super) eta_unknown: Option<NoEta>,
}

impl Outlook {
    pub(super) fn of(c: Option<&Checkpoint>, controls: &Controls) -> Outlook {
        let live = c.is_some_and(|c| c.runners.iter().any(|o| o.alive));
        let recent = c.and_then(|c| c.recent_rows_per_second);
        let rows_to_go = c.and_then(|c| c.total_estimate.map(|t| (t - c.rows_done).max(0)));
        let held = c.is_some_and(|c| c.hold_reason.is_some());
        let eta = eta(live, controls.paused, held, recent, rows_to_go);
        Outlook {
            paused: controls.paused,
            hold_reason: c.and_then(|c| c.hold_reason.clone()),
            held_since: c.and_then(|c| c.held_since.clone()),
            recent_rows_per_second: recent.filter(|_| live),
            rows_to_go,
            eta_seconds: eta.ok(),
            eta_at: eta.ok().map(|s| {
                humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(s))
                    .to_string()
            }),
            eta_unknown: eta.err(),
        }
    }

    /// The ETA for the detail: how long, when, and from what; or unknown, and why.
    pub(super) fn eta_text(&self, job: &str) -> String {
        match (self.eta_seconds, self.eta_unknown) {
            (Some(s), _) => format!(
                "{} (about {}): {} rows to go at {:.0} rows/s over the last {}s",
                humantime::format_duration(Duration::from_secs(s)),
                self.eta_at.as_deref().unwrap_or("?"),
                self.rows_to_go.unwrap_or(0),
                self.recent_rows_per_second.unwrap_or(0.0),
                crate::store::RECENT_RATE_WINDOW.as_secs()
            ),
            (None, Some(NoEta::Held)) => format!(
                "unknown (held: {})",
                self.hold_reason.as_deref().unwrap_or("?")
            ),
            (None, why) => format!(
                "unknown ({})",
                why.unwrap_or(NoEta::NotRunning).explain(job)
            ),
        }
    }

    /// The overview's ETA column: a duration, `unknown`, or `-` with no live run.
    pub(super) fn eta_cell(&self) -> String {
        match (self.eta_seconds, self.eta_unknown) {
            (Some(s), _) => humantime::format_duration(Duration::from_secs(s)).to_string(),
            (None, Some(NoEta::NotRunning)) => "-".into(),
            (None, _) => "unknown".into(),
        }
    }

    /// The overview's last column: paused or held, since when; `-` when neither.
    pub(super) fn hold_cell(&self) -> String {
        let since = self.held_since.as_deref().unwrap_or("?");
        match (&self.hold_reason, self.paused) {
            (Some(_), true) => format!("paused since {since}"),
            (None, true) => "paused (a run holds until resumed)".into(),
            (Some(r), false) => format!("held since {since}: {r}"),
            (None, false) => "-".into(),
        }
    }

    /// True when rows flow by design: no pause and no hold.
    pub(super) fn flowing(&self) -> bool {
        !self.paused && self.hold_reason.is_none()
    }
}

/// Seconds to go at the recent rate, or why that is not known.
fn eta(
    live: bool,
    paused: bool,
    held: bool,
    recent: Option<f64>,
    rows_to_go: Option<i64>,
) -> Result<u64, NoEta> {
    if !live {
        return Err(NoEta::NotRunning);
    }
    if paused {
        return Err(NoEta::Paused);
    }
    if held {
        return Err(NoEta::Held);
    }
    let rate = recent.ok_or(NoEta::Measuring)?;
    if rate <= 0.0 {
        return Err(NoEta::Stalled);
    }
    match rows_to_go.ok_or(NoEta::NoEstimate)? {
        0 => Err(NoEta::PastEstimate),
        n => Ok((n as f64 / rate).ceil() as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_is_the_rows_to_go_at_the_recent_rate_and_unknown_whenever_that_misleads() {
        let (r, n) = (Some(100.0), Some(1050));
        assert_eq!(eta(true, false, false, r, n), Ok(11));
        assert_eq!(eta(false, false, false, r, n), Err(NoEta::NotRunning));
        assert_eq!(eta(true, true, true, r, n), Err(NoEta::Paused));
        assert_eq!(eta(true, false, true, r, n), Err(NoEta::Held));
        assert_eq!(eta(true, false, false, None, n), Err(NoEta::Measuring));
        assert_eq!(eta(true, false, false, Some(0.0), n), Err(NoEta::Stalled));
        assert_eq!(eta(true, false, false, r, None), Err(NoEta::NoEstimate));
        assert_eq!(
            eta(true, false, false, r, Some(0)),
            Err(NoEta::PastEstimate)
        );
    }

    #[test]
    fn the_overview_cells_say_paused_or_held_with_since_when() {
        let o = |paused: bool, reason: Option<&str>, eta: Result<u64, NoEta>| Outlook {
            paused,
            hold_reason: reason.map(str::to_string),
            held_since: reason.map(|_| "2026-12-01T16:00:00Z".to_string()),
            recent_rows_per_second: Some(10.0),
            rows_to_go: Some(100),
            eta_seconds: eta.ok(),
            eta_at: None,
            eta_unknown: eta.err(),
        };
        let paused = o(true, Some("paused by `backfill pause`"), Err(NoEta::Paused));
        assert_eq!(paused.hold_cell(), "paused since 2026-12-01T16:00:00Z");
        assert_eq!(paused.eta_cell(), "unknown");
        assert!(!paused.flowing());
        let held = o(false, Some("throttle_sql returned true"), Err(NoEta::Held));
        assert_eq!(
            held.hold_cell(),
            "held since 2026-12-01T16:00:00Z: throttle_sql returned true"
        );
        assert_eq!(
            held.eta_text("j"),
            "unknown (held: throttle_sql returned true)"
        );
        let going = o(false, None, Ok(75));
        assert_eq!(
            (going.hold_cell().as_str(), going.eta_cell().as_str()),
            ("-", "1m 15s")
        );
        assert!(going.flowing());
        let stopped = o(false, None, Err(NoEta::NotRunning));
        assert_eq!(stopped.eta_cell(), "-");
    }
}
