//! The log lines of a job's finishing steps, written from their events ([`Finishing`]); and any
//! function that takes a log line listens to a run's events as those lines (the finishing
//! steps' tests and callers without a progress display). Owns the text of those lines; must not
//! reach back into the finishing steps (it only sees events).

use crate::events::{Event, Finishing, Listener, StepBefore};
use crate::finish::contention_reason;
use std::time::Duration;

/// Any function that takes a log line listens to the finishing steps' events as their lines;
/// it is not told of other events (their lines are the progress display's).
impl<F: Fn(&str) + Sync> Listener for F {
    fn on(&self, event: Event<'_>) {
        if let Event::Finishing(happened) = event {
            self(&finishing_line(&happened));
        }
    }
}

/// The log line for something that happened to a job's finishing steps.
pub fn finishing_line(happened: &Finishing<'_>) -> String {
    match *happened {
        Finishing::WaitingForOtherFinisher { job } => format!(
            "job {job}: another runner is running its finishing steps; waiting for it to end"
        ),
        Finishing::AlreadyDone { job, step } => format!(
            "job {job}: finishing step {}/{} already done; skipping",
            step.n, step.total
        ),
        Finishing::Started {
            job,
            step,
            before,
            statement,
        } => {
            let note = match before {
                StepBefore::StatementChanged => " (its statement changed since it was recorded)",
                StepBefore::Interrupted => " (an earlier run was interrupted in it)",
                StepBefore::Failed => " (it failed in an earlier run)",
                StepBefore::Nothing => "",
            };
            format!(
                "job {job}: starting finishing step {}/{}{note}: `{statement}`",
                step.n, step.total
            )
        }
        Finishing::Retrying {
            job,
            step,
            wait,
            in_drop,
            sqlstate,
            next,
            max_attempts,
        } => format!(
            "job {job}: finishing step {}/{}: retrying after {} because {}{} ({}); attempt {next} of {max_attempts}",
            step.n,
            step.total,
            whole_millis(wait),
            if in_drop { "dropping the invalid index hit " } else { "" },
            contention_reason(sqlstate),
            sqlstate.unwrap_or("?"),
        ),
        Finishing::DroppedInvalidIndex { job, step, index } => format!(
            "job {job}: finishing step {}/{}: dropped the invalid index {index} left by an interrupted or failed CREATE INDEX CONCURRENTLY",
            step.n, step.total
        ),
        Finishing::Done {
            job,
            step,
            attempts,
            took,
        } => format!(
            "job {job}: finishing step {}/{} done ({attempts} attempt{}, {})",
            step.n,
            step.total,
            if attempts == 1 { "" } else { "s" },
            whole_millis(took)
        ),
    }
}

/// A duration for people, to the millisecond.
fn whole_millis(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::StepOf;
    use std::sync::Mutex;

    const STEP: StepOf = StepOf { n: 2, total: 3 };

    #[test]
    fn each_finishing_event_reads_as_the_log_has_always_shown_it() {
        let job = "orders_status";
        let cases: Vec<(Finishing<'_>, &str)> = vec![
            (
                Finishing::WaitingForOtherFinisher { job },
                "job orders_status: another runner is running its finishing steps; waiting for it to end",
            ),
            (
                Finishing::AlreadyDone { job, step: STEP },
                "job orders_status: finishing step 2/3 already done; skipping",
            ),
            (
                Finishing::Started {
                    job,
                    step: STEP,
                    before: StepBefore::Nothing,
                    statement: "ALTER TABLE orders VALIDATE CONSTRAINT c",
                },
                "job orders_status: starting finishing step 2/3: `ALTER TABLE orders VALIDATE CONSTRAINT c`",
            ),
            (
                Finishing::Started {
                    job,
                    step: STEP,
                    before: StepBefore::StatementChanged,
                    statement: "SELECT 1",
                },
                "job orders_status: starting finishing step 2/3 (its statement changed since it was recorded): `SELECT 1`",
            ),
            (
                Finishing::Started {
                    job,
                    step: STEP,
                    before: StepBefore::Interrupted,
                    statement: "SELECT 1",
                },
                "job orders_status: starting finishing step 2/3 (an earlier run was interrupted in it): `SELECT 1`",
            ),
            (
                Finishing::Started {
                    job,
                    step: STEP,
                    before: StepBefore::Failed,
                    statement: "SELECT 1",
                },
                "job orders_status: starting finishing step 2/3 (it failed in an earlier run): `SELECT 1`",
            ),
            (
                Finishing::Retrying {
                    job,
                    step: STEP,
                    wait: Duration::from_micros(412_345),
                    in_drop: false,
                    sqlstate: Some("55P03"),
                    next: 2,
                    max_attempts: 20,
                },
                "job orders_status: finishing step 2/3: retrying after 412ms because lock timeout (55P03); attempt 2 of 20",
            ),
            (
                Finishing::Retrying {
                    job,
                    step: STEP,
                    wait: Duration::from_millis(1_500),
                    in_drop: true,
                    sqlstate: None,
                    next: 3,
                    max_attempts: 5,
                },
                "job orders_status: finishing step 2/3: retrying after 1s 500ms because dropping the invalid index hit contention (?); attempt 3 of 5",
            ),
            (
                Finishing::DroppedInvalidIndex {
                    job,
                    step: STEP,
                    index: "public.orders_status_idx",
                },
                "job orders_status: finishing step 2/3: dropped the invalid index public.orders_status_idx left by an interrupted or failed CREATE INDEX CONCURRENTLY",
            ),
            (
                Finishing::Done {
                    job,
                    step: STEP,
                    attempts: 1,
                    took: Duration::from_micros(2_345_678),
                },
                "job orders_status: finishing step 2/3 done (1 attempt, 2s 345ms)",
            ),
            (
                Finishing::Done {
                    job,
                    step: STEP,
                    attempts: 4,
                    took: Duration::from_millis(30),
                },
                "job orders_status: finishing step 2/3 done (4 attempts, 30ms)",
            ),
        ];
        for (happened, line) in cases {
            assert_eq!(finishing_line(&happened), line, "{happened:?}");
        }
    }

    #[test]
    fn a_log_function_hears_only_the_finishing_lines() {
        let lines = Mutex::new(Vec::new());
        let log = |l: &str| lines.lock().unwrap().push(l.to_string());
        let listener: &dyn Listener = &log;
        listener.on(Event::DatabaseBack);
        listener.on(Event::Finishing(Finishing::AlreadyDone {
            job: "j",
            step: StepOf { n: 1, total: 1 },
        }));
        assert_eq!(
            lines.into_inner().unwrap(),
            ["job j: finishing step 1/1 already done; skipping"]
        );
    }
}
