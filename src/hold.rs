//! Why a run is held, as a typed value with its data: the health signals' verdicts
//! (`throttle`), the operator's pause, a chunk's lock contention, an absent database. Owns the one
//! sentence each hold is shown as — stored for `status`, on the progress line and in the log — and
//! the metric label it is booked under. Must not decide whether to hold (throttle and the
//! executor's pace do) nor depend on the engine or telemetry (both depend on it).

use std::fmt;
use std::time::Duration;

/// Why the run is held now.
#[derive(Debug, Clone, PartialEq)]
pub enum Hold {
    /// `backfill pause` paused the job.
    Paused { job: String },
    /// A streaming standby lags more than `max_replication_lag` (seconds, and which standby).
    ReplicationLag {
        lag: f64,
        standby: String,
        max: Duration,
    },
    /// The server writes WAL faster than `max_wal_rate` (bytes per second).
    WalRate { rate: f64, max: u64 },
    /// A vacuum runs on the job's table (`hold_during_autovacuum`); the table as quoted.
    Autovacuum { table: String },
    /// The job's `throttle_sql` returned true.
    ThrottleSql,
    /// A signal could not be read and `on_signal_error = "hold"`: what, and why not.
    SignalUnreadable { what: String, why: String },
    /// A worker's chunk keeps meeting lock contention; the chunk as shown ("keys A..=B").
    LockContention { chunk: String },
    /// The database is unreachable; the run waits for it.
    WaitingForDatabase,
    /// A chunk at a single key exceeded the statement timeout and waits to be retried.
    RetryingAfterTimeout,
}

/// What time held is booked under on `backfill_held_seconds_total` (its `reason` label): the
/// holds, and the waits that are no hold of their own (the rate ceiling, the pause after a chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldReason {
    DatabaseUnavailable,
    RetryBackoff,
    LockContention,
    RateLimit,
    Pause,
    Paused,
    ReplicationLag,
    WalRate,
    Autovacuum,
    ThrottleSql,
    SignalError,
}

impl HoldReason {
    /// Every reason, in the order of their discriminants (`reason as usize` indexes it).
    pub const ALL: [HoldReason; 11] = [
        HoldReason::DatabaseUnavailable,
        HoldReason::RetryBackoff,
        HoldReason::LockContention,
        HoldReason::RateLimit,
        HoldReason::Pause,
        HoldReason::Paused,
        HoldReason::ReplicationLag,
        HoldReason::WalRate,
        HoldReason::Autovacuum,
        HoldReason::ThrottleSql,
        HoldReason::SignalError,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            HoldReason::DatabaseUnavailable => "database_unavailable",
            HoldReason::RetryBackoff => "retry_backoff",
            HoldReason::LockContention => "lock_contention",
            HoldReason::RateLimit => "rate_limit",
            HoldReason::Pause => "pause",
            HoldReason::Paused => "paused",
            HoldReason::ReplicationLag => "replication_lag",
            HoldReason::WalRate => "wal_rate",
            HoldReason::Autovacuum => "autovacuum",
            HoldReason::ThrottleSql => "throttle_sql",
            HoldReason::SignalError => "signal_error",
        }
    }
}

impl Hold {
    /// What the time held is booked under.
    pub fn reason(&self) -> HoldReason {
        match self {
            Hold::Paused { .. } => HoldReason::Paused,
            Hold::ReplicationLag { .. } => HoldReason::ReplicationLag,
            Hold::WalRate { .. } => HoldReason::WalRate,
            Hold::Autovacuum { .. } => HoldReason::Autovacuum,
            Hold::ThrottleSql => HoldReason::ThrottleSql,
            Hold::SignalUnreadable { .. } => HoldReason::SignalError,
            Hold::LockContention { .. } => HoldReason::LockContention,
            Hold::WaitingForDatabase => HoldReason::DatabaseUnavailable,
            Hold::RetryingAfterTimeout => HoldReason::RetryBackoff,
        }
    }
}

/// The one sentence for a hold: `status` stores and shows it, the progress line and the log
/// show it (`Shown` adds when it started, where that is part of the news).
impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::Paused { job } => write!(
                f,
                "paused by `backfill pause` (resume with `backfill resume {job}`)"
            ),
            Hold::ReplicationLag { lag, standby, max } => write!(
                f,
                "replication lag {lag:.1}s on standby {standby} > max_replication_lag {}",
                humantime::format_duration(*max)
            ),
            Hold::WalRate { rate, max } => write!(
                f,
                "WAL rate {:.1} MB/s > max_wal_rate {:.1} MB/s",
                rate / 1e6,
                *max as f64 / 1e6
            ),
            Hold::Autovacuum { table } => {
                write!(f, "a vacuum is running on {table} (hold_during_autovacuum)")
            }
            Hold::ThrottleSql => f.write_str("throttle_sql returned true"),
            Hold::SignalUnreadable { what, why } => write!(
                f,
                "cannot read {what} ({why}); holding because on_signal_error = \"hold\""
            ),
            Hold::LockContention { chunk } => write!(f, "lock contention on {chunk}"),
            Hold::WaitingForDatabase => f.write_str("waiting for database"),
            Hold::RetryingAfterTimeout => f.write_str("retrying after a statement timeout"),
        }
    }
}

/// A hold as the progress display and the log show it: the hold, and when it started where
/// that is part of the news (a worker's lock contention).
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    pub hold: Hold,
    /// When it started, as an RFC 3339 UTC timestamp.
    pub since: Option<String>,
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.since {
            Some(t) => write!(f, "{} since {t}", self.hold),
            None => write!(f, "{}", self.hold),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_hold_reads_as_status_and_the_log_have_always_shown_it() {
        let cases: &[(Hold, &str, &str)] = &[
            (
                Hold::Paused { job: "orders_status".into() },
                "paused",
                "paused by `backfill pause` (resume with `backfill resume orders_status`)",
            ),
            (
                Hold::ReplicationLag {
                    lag: 3.24,
                    standby: "replica1 (pid 42)".into(),
                    max: Duration::from_secs(1),
                },
                "replication_lag",
                "replication lag 3.2s on standby replica1 (pid 42) > max_replication_lag 1s",
            ),
            (
                Hold::WalRate { rate: 12_345_678.0, max: 5_000_000 },
                "wal_rate",
                "WAL rate 12.3 MB/s > max_wal_rate 5.0 MB/s",
            ),
            (
                Hold::Autovacuum { table: "public.\"Orders\"".into() },
                "autovacuum",
                "a vacuum is running on public.\"Orders\" (hold_during_autovacuum)",
            ),
            (Hold::ThrottleSql, "throttle_sql", "throttle_sql returned true"),
            (
                Hold::SignalUnreadable {
                    what: "throttle_sql".into(),
                    why: "it returned NULL".into(),
                },
                "signal_error",
                "cannot read throttle_sql (it returned NULL); holding because on_signal_error = \"hold\"",
            ),
            (
                Hold::LockContention { chunk: "keys 1..=500".into() },
                "lock_contention",
                "lock contention on keys 1..=500",
            ),
            (Hold::WaitingForDatabase, "database_unavailable", "waiting for database"),
            (
                Hold::RetryingAfterTimeout,
                "retry_backoff",
                "retrying after a statement timeout",
            ),
        ];
        for (hold, label, text) in cases {
            assert_eq!(hold.to_string(), *text, "{hold:?}");
            assert_eq!(hold.reason().label(), *label, "{hold:?}");
        }
    }

    #[test]
    fn every_reason_is_listed_once_at_its_own_index_with_the_label_dashboards_use() {
        let labels = [
            "database_unavailable",
            "retry_backoff",
            "lock_contention",
            "rate_limit",
            "pause",
            "paused",
            "replication_lag",
            "wal_rate",
            "autovacuum",
            "throttle_sql",
            "signal_error",
        ];
        for (i, (reason, label)) in HoldReason::ALL.iter().zip(labels).enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
            assert_eq!(reason.label(), label);
        }
    }

    #[test]
    fn a_shown_hold_says_since_when_only_when_it_knows() {
        let hold = Hold::LockContention {
            chunk: "key 7".into(),
        };
        let cases = [
            (None, "lock contention on key 7"),
            (
                Some("2026-12-01T12:00:00Z".to_string()),
                "lock contention on key 7 since 2026-12-01T12:00:00Z",
            ),
        ];
        for (since, text) in cases {
            let shown = Shown {
                hold: hold.clone(),
                since,
            };
            assert_eq!(shown.to_string(), text);
        }
    }
}
