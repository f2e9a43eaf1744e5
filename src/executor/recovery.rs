//! The recovery policy: what a worker does after a failed attempt, as a pure function of the
//! failure's class, the attempts so far and the chunk's narrowing state ([`decide`]). No
//! database, no clock, no operator text: the worker measures the durations it passes in and
//! carries the returned [`Action`] out (sleeping, reconnecting, narrowing, skipping, logging).
//!
//! - contention (lock timeout, deadlock, serialization, a stale saved plan): normal on a live
//!   database, so the chunk is retried after a jittered backoff for up to the contention budget;
//! - a statement timeout at a single key: retried at most `max_attempts` times in a row;
//! - connection lost or server restarting: wait for the database, for up to `reconnect_for`;
//! - a statement timeout or a data error in a chunk of several keys: halve the chunk;
//! - a data error at a single key (a poison row): stop, or skip it (`on_error`);
//! - anything else, a walk that would not move forward, or a range taken from the worker: stop.

use crate::backoff::Backoff;
use crate::db::ErrorClass;
use crate::job::OnError;
use std::time::Duration;

/// The first pause while waiting for the database, and the base of the retry backoff.
pub(super) const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Short enough that a released lock is noticed within seconds, however long the contention.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The backoff between attempts at a chunk (contention, a statement timeout at one key).
pub(super) const RETRY_BACKOFF: Backoff = Backoff {
    base: BACKOFF_BASE,
    max: BACKOFF_MAX,
};
/// The longest pause between two attempts to reach the database.
pub(super) const RECONNECT_POLL_MAX: Duration = Duration::from_secs(2);

/// How long to wait before the next try while the database has been unreachable for `down`:
/// quickly at first (a terminated session reconnects at once), then every 2 s.
pub(super) fn reconnect_pause(down: Duration) -> Duration {
    (down / 2).clamp(BACKOFF_BASE, RECONNECT_POLL_MAX)
}

/// What went wrong, as far as recovery cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Problem {
    /// A database error, classified by SQLSTATE.
    Db(ErrorClass),
    /// The walk would not move forward (the same bounds would come back).
    Stalled,
    /// The range is no longer this worker's (the run was declared gone).
    Lost,
}

/// What is known of the keys the failed attempt covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Span {
    /// The attempt failed before its bounds were known.
    Unknown,
    /// A chunk of several keys (or pages).
    Several { keys: i64 },
    /// A single key (for the page walk, a single page).
    Single,
}

/// Everything the policy looks at.
#[derive(Debug, Clone, Copy)]
pub(super) struct Situation {
    pub problem: Problem,
    pub span: Span,
    /// A stop (signal) was requested.
    pub stopping: bool,
    /// Failed attempts at this chunk in a row, before this one.
    pub attempts: u32,
    pub max_attempts: u32,
    /// How long the database has been unreachable, when it already was before this failure.
    pub outage: Option<Duration>,
    pub reconnect_for: Duration,
    /// How long this chunk has been meeting lock contention, when it already was.
    pub contention: Option<Duration>,
    pub contention_budget: Duration,
    pub on_error: OnError,
}

/// What the worker does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// The connection is gone while stopping: nothing is in flight, so drop it and let the walk
    /// end.
    LetGo,
    /// Wait `pause` for the database, then try again on a new connection.
    Reconnect { pause: Duration },
    /// Wait out lock contention: retry after the backoff of `attempt`, but at most `at_most`
    /// (what is left of the budget).
    OutlastContention { attempt: u32, at_most: Duration },
    /// Retry the same chunk after the backoff of `attempt`.
    RetryAfterBackoff { attempt: u32 },
    /// Retry in chunks of `to` keys until past the `keys` that failed together.
    Narrow { to: i64, keys: i64 },
    /// Record the poison key and move the cursor past it.
    Skip,
    /// End the run.
    Stop(Stop),
}

/// Why the run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// The database stayed unreachable for all of `reconnect_for`.
    Unreachable,
    /// The chunk met lock contention for the whole budget.
    ContentionBudget,
    /// A single key kept exceeding the statement timeout; the attempts made.
    Attempts(u32),
    /// A poison key with `on_error = "stop"`.
    PoisonKey,
    /// Retrying cannot help.
    Fatal,
    Stalled,
    Lost,
}

/// The recovery policy.
pub(super) fn decide(s: &Situation) -> Action {
    let class = match s.problem {
        Problem::Stalled => return Action::Stop(Stop::Stalled),
        Problem::Lost => return Action::Stop(Stop::Lost),
        Problem::Db(class) => class,
    };
    match (class, s.span) {
        (ErrorClass::Connection, _) if s.stopping => Action::LetGo,
        (ErrorClass::Connection, _) => {
            let down = s.outage.unwrap_or(Duration::ZERO);
            if down >= s.reconnect_for {
                return Action::Stop(Stop::Unreachable);
            }
            Action::Reconnect {
                pause: reconnect_pause(down),
            }
        }
        (ErrorClass::Timeout | ErrorClass::Data, Span::Several { keys }) => Action::Narrow {
            to: (keys / 2).max(1),
            keys,
        },
        (ErrorClass::Data, Span::Single) => match s.on_error {
            OnError::Stop => Action::Stop(Stop::PoisonKey),
            OnError::Skip => Action::Skip,
        },
        (ErrorClass::Contention, _) => {
            let spent = s.contention.unwrap_or(Duration::ZERO);
            if spent >= s.contention_budget {
                return Action::Stop(Stop::ContentionBudget);
            }
            Action::OutlastContention {
                attempt: s.attempts + 1,
                at_most: s.contention_budget - spent,
            }
        }
        (ErrorClass::Timeout, _) => {
            let attempt = s.attempts + 1;
            if attempt >= s.max_attempts {
                return Action::Stop(Stop::Attempts(attempt));
            }
            Action::RetryAfterBackoff { attempt }
        }
        (ErrorClass::Data | ErrorClass::Fatal, _) => Action::Stop(Stop::Fatal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn situation(problem: Problem, span: Span) -> Situation {
        Situation {
            problem,
            span,
            stopping: false,
            attempts: 0,
            max_attempts: 5,
            outage: None,
            reconnect_for: S(300),
            contention: None,
            contention_budget: S(600),
            on_error: OnError::Stop,
        }
    }

    #[test]
    fn each_failure_class_attempt_and_span_has_one_action() {
        use ErrorClass::*;
        let several = Span::Several { keys: 1000 };
        let cases: Vec<(&str, Situation, Action)> = vec![
            (
                "lost range",
                situation(Problem::Lost, several),
                Action::Stop(Stop::Lost),
            ),
            (
                "stalled walk",
                situation(Problem::Stalled, Span::Unknown),
                Action::Stop(Stop::Stalled),
            ),
            (
                "connection, first",
                situation(Problem::Db(Connection), Span::Unknown),
                Action::Reconnect {
                    pause: Duration::from_millis(200),
                },
            ),
            (
                "connection, down 10 s: poll every 2 s",
                Situation {
                    outage: Some(S(10)),
                    ..situation(Problem::Db(Connection), several)
                },
                Action::Reconnect { pause: S(2) },
            ),
            (
                "connection, down 1 s: half of it",
                Situation {
                    outage: Some(S(1)),
                    ..situation(Problem::Db(Connection), several)
                },
                Action::Reconnect {
                    pause: Duration::from_millis(500),
                },
            ),
            (
                "connection, down for all of reconnect_for",
                Situation {
                    outage: Some(S(300)),
                    ..situation(Problem::Db(Connection), several)
                },
                Action::Stop(Stop::Unreachable),
            ),
            (
                "connection while stopping",
                Situation {
                    stopping: true,
                    outage: Some(S(300)),
                    ..situation(Problem::Db(Connection), several)
                },
                Action::LetGo,
            ),
            (
                "timeout, several keys: halve",
                situation(Problem::Db(Timeout), several),
                Action::Narrow {
                    to: 500,
                    keys: 1000,
                },
            ),
            (
                "data error, two keys: halve to one",
                situation(Problem::Db(Data), Span::Several { keys: 2 }),
                Action::Narrow { to: 1, keys: 2 },
            ),
            (
                "data error, single key, on_error stop",
                situation(Problem::Db(Data), Span::Single),
                Action::Stop(Stop::PoisonKey),
            ),
            (
                "data error, single key, on_error skip",
                Situation {
                    on_error: OnError::Skip,
                    ..situation(Problem::Db(Data), Span::Single)
                },
                Action::Skip,
            ),
            (
                "data error before the bounds were known",
                situation(Problem::Db(Data), Span::Unknown),
                Action::Stop(Stop::Fatal),
            ),
            (
                "fatal, whatever the span",
                situation(Problem::Db(Fatal), several),
                Action::Stop(Stop::Fatal),
            ),
            (
                "timeout, single key, first attempt",
                situation(Problem::Db(Timeout), Span::Single),
                Action::RetryAfterBackoff { attempt: 1 },
            ),
            (
                "timeout, single key, the last attempt allowed fails",
                Situation {
                    attempts: 4,
                    ..situation(Problem::Db(Timeout), Span::Single)
                },
                Action::Stop(Stop::Attempts(5)),
            ),
            (
                "contention, first",
                situation(Problem::Db(Contention), several),
                Action::OutlastContention {
                    attempt: 1,
                    at_most: S(600),
                },
            ),
            (
                "contention for a while: the rest of the budget",
                Situation {
                    attempts: 7,
                    contention: Some(S(590)),
                    ..situation(Problem::Db(Contention), Span::Single)
                },
                Action::OutlastContention {
                    attempt: 8,
                    at_most: S(10),
                },
            ),
            (
                "contention beyond the budget",
                Situation {
                    contention: Some(S(600)),
                    ..situation(Problem::Db(Contention), several)
                },
                Action::Stop(Stop::ContentionBudget),
            ),
            (
                "contention with no budget at all",
                Situation {
                    contention_budget: Duration::ZERO,
                    ..situation(Problem::Db(Contention), several)
                },
                Action::Stop(Stop::ContentionBudget),
            ),
        ];
        for (name, situation, expected) in cases {
            assert_eq!(decide(&situation), expected, "{name}");
        }
    }
}
