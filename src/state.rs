//! The engine's persisted states as types: a job's state, the phase `status` shows, a run's
//! outcome in the history, and a finishing step's state. Each enum's SQL text is written once, in
//! the table of its `text_enum!` below; every statement binds or formats that text, and every
//! row read parses it back, so no other module spells a state. The decisions taken on them are
//! made here too, as pure functions with their tests: whether a job is finished and which states
//! a run's end may replace, whether a pass ended, which phase a finished job shows (from its
//! recorded verify count), whether it made progress, whether its next run sweeps, whether it may
//! be reverted. What keeps a job from being complete is the one exception: the SQL function
//! `completion_gap` decides it (the SQL gate must too), and `CompletionGap` names its answers.
//!
//! Bottom of the dependency order: this module imports nothing of the crate and sends no SQL.
//! The CHECK constraints of the engine's schema (`store/schema.rs`) list the same texts; a unit
//! test there checks that they agree.

use std::fmt;
use tokio_postgres::types::{FromSql, Type};

/// A text the engine does not know for one of its enums (written by a newer engine, or by hand).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{text}` (written by a newer backfill?)")]
pub struct UnknownText {
    pub kind: &'static str,
    pub text: String,
}

/// Defines an enum whose variants are stored as fixed texts: the one table of those texts, the
/// conversions both ways, `Display`, JSON (the same text) and reading from a text column.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The text stored in the engine's tables.
            pub fn as_sql(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The variant stored as `text`.
            pub fn parse(text: &str) -> Result<$name, UnknownText> {
                match text {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownText { kind: $kind, text: text.to_string() }),
                }
            }

            /// As a quoted SQL literal, for a statement that compares with a constant (the texts
            /// are fixed and hold no quote).
            pub fn literal(self) -> String {
                format!("'{}'", self.as_sql())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_sql())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_sql())
            }
        }

        impl<'a> FromSql<'a> for $name {
            fn from_sql(
                ty: &Type,
                raw: &'a [u8],
            ) -> Result<$name, Box<dyn std::error::Error + Sync + Send>> {
                let text = <&str as FromSql>::from_sql(ty, raw)?;
                Ok($name::parse(text)?)
            }

            fn accepts(ty: &Type) -> bool {
                <&str as FromSql>::accepts(ty)
            }
        }
    };
}

text_enum! {
    /// A job's state in its checkpoint row (`checkpoints.state`).
    JobState, "job state" {
        /// Its checkpoint exists (e.g. it waits for its expand migration) but no run joined yet.
        New = "new",
        Running = "running",
        Stopped = "stopped",
        Cancelled = "cancelled",
        Failed = "failed",
        /// Every key processed and, with a verify query, verified to 0.
        Done = "done",
        /// Every key processed, but verify still counts rows (its sweeps are used up).
        Incomplete = "incomplete",
        /// A revert put the old values back; the next run starts over.
        Reverted = "reverted",
    }
}

text_enum! {
    /// What the job is doing or last did, as `status` shows it (`checkpoints.phase`).
    Phase, "phase" {
        WaitingForExpand = "waiting for expand",
        Running = "running",
        Verifying = "verifying",
        Sweeping = "sweeping",
        Finishing = "finishing",
        FinishingFailed = "finishing failed",
        DoneAndVerified = "done and verified",
        Done = "done",
        Incomplete = "incomplete",
        Stopped = "stopped",
        Cancelled = "cancelled",
        Failed = "failed",
        Reverted = "reverted",
    }
}

text_enum! {
    /// How a run ended, in its history row (`runs.outcome`; NULL while it runs).
    RunOutcome, "run outcome" {
        Done = "done",
        Incomplete = "incomplete",
        Stopped = "stopped",
        Cancelled = "cancelled",
        Failed = "failed",
        /// Closed by another run: this one died or hung without recording its end.
        Abandoned = "abandoned",
    }
}

text_enum! {
    /// A finishing step's state (`finish_steps.state`).
    StepState, "finishing step state" {
        Pending = "pending",
        /// Started and not recorded as ended: also what a step interrupted mid-way shows.
        Running = "running",
        Done = "done",
        Failed = "failed",
    }
}

text_enum! {
    /// What keeps a job from being complete, its verify aside: the answer of the engine's SQL
    /// function `completion_gap` (schema v9), which the SQL gate `assert_done` and `backfill gate`
    /// both ask, so the two cannot disagree.
    CompletionGap, "completion gap" {
        NeverRan = "never run",
        NotDone = "not done",
        /// Keys skipped for a data error and not resolved since.
        FailedKeys = "failed keys",
        FinishingSteps = "finishing steps",
    }
}

impl JobState {
    /// Whether the job is finished: every key processed and, with a verify query, verified to
    /// 0. A run then has nothing left to do (joining returns at once, no sweep starts, its
    /// preconditions are not asked), and its contract step may follow (`status` shows "contract
    /// applied" as expected). Not the gate's verdict: that also asks for failed keys, finishing
    /// steps and verify now (`completion_gap`).
    pub fn is_finished(self) -> bool {
        self == JobState::Done
    }

    /// Whether a run's end may record `next` over this state: a finished job stays finished, so
    /// that a run ending late (stopped, failed) does not undo another run's finish.
    pub fn may_become(self, next: JobState) -> bool {
        !self.is_finished() || next.is_finished()
    }

    /// The states a run's end may record `next` over ([`JobState::may_become`]), as texts to bind
    /// for an update that checks the row's state in the same statement.
    pub fn may_become_from(next: JobState) -> Vec<&'static str> {
        JobState::ALL
            .iter()
            .filter(|s| s.may_become(next))
            .map(|s| s.as_sql())
            .collect()
    }
}

/// How a run ends by itself: what it records as its outcome and as the job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    Done,
    Incomplete,
    Stopped,
    Cancelled,
    Failed,
}

impl RunEnd {
    pub fn outcome(self) -> RunOutcome {
        match self {
            RunEnd::Done => RunOutcome::Done,
            RunEnd::Incomplete => RunOutcome::Incomplete,
            RunEnd::Stopped => RunOutcome::Stopped,
            RunEnd::Cancelled => RunOutcome::Cancelled,
            RunEnd::Failed => RunOutcome::Failed,
        }
    }

    pub fn state(self) -> JobState {
        match self {
            RunEnd::Done => JobState::Done,
            RunEnd::Incomplete => JobState::Incomplete,
            RunEnd::Stopped => JobState::Stopped,
            RunEnd::Cancelled => JobState::Cancelled,
            RunEnd::Failed => JobState::Failed,
        }
    }

    /// Whether the pass over every key ended (done or incomplete): the run then records when it
    /// finished, the verify count, and the exact number of keys as the total.
    pub fn ends_pass(self) -> bool {
        matches!(self, RunEnd::Done | RunEnd::Incomplete)
    }

    /// The phase a run that ended this way records. `verify_remaining` is what its verify
    /// query counted at the end (None: the job has none).
    pub fn phase(self, verify_remaining: Option<i64>) -> Phase {
        match self {
            RunEnd::Done => Phase::done(verify_remaining),
            RunEnd::Incomplete => Phase::Incomplete,
            RunEnd::Stopped => Phase::Stopped,
            RunEnd::Cancelled => Phase::Cancelled,
            RunEnd::Failed => Phase::Failed,
        }
    }
}

impl Phase {
    /// The phase of a job that is done, from the count its verify query recorded (None: it has
    /// none): "done and verified" only when verify confirmed it (counted 0), else just "done".
    /// The one place this is decided (a run's end and the end of its finishing steps both ask
    /// here, with the recorded count).
    pub fn done(verify_remaining: Option<i64>) -> Phase {
        if verify_remaining == Some(0) {
            Phase::DoneAndVerified
        } else {
            Phase::Done
        }
    }
}

/// A job's state as `status` and the gate report it: the recorded state, except that a job
/// recorded as running with no live runner shows as `interrupted` (a crash or a kill).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShownState {
    Recorded(JobState),
    Interrupted,
}

impl ShownState {
    pub fn of(recorded: JobState, runner_alive: bool) -> ShownState {
        match recorded {
            JobState::Running if !runner_alive => ShownState::Interrupted,
            state => ShownState::Recorded(state),
        }
    }

    /// The state its row records (`interrupted` is a running one whose runner is gone).
    pub fn recorded(self) -> JobState {
        match self {
            ShownState::Recorded(state) => state,
            ShownState::Interrupted => JobState::Running,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ShownState::Recorded(state) => state.as_sql(),
            ShownState::Interrupted => "interrupted",
        }
    }
}

/// A shown state equals a recorded one only when it is not `interrupted`.
impl PartialEq<JobState> for ShownState {
    fn eq(&self, other: &JobState) -> bool {
        *self == ShownState::Recorded(*other)
    }
}

impl fmt::Display for ShownState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ShownState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Why a job may not be reverted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevertRefusal {
    /// A run works on it.
    Running,
    /// Reverted already, and not run since.
    AlreadyReverted,
    /// Its key range was never fixed: no chunk can have run.
    NothingProcessed,
}

/// Whether a job made progress a definition change or a revert must reckon with: its key range
/// was fixed (the first step of its first run) or rows were done. A revert clears both, so a
/// reverted job made none. The one definition: a joining run, the plan and the revert ask here.
pub fn made_progress(rows_done: i64, bound_taken: bool) -> bool {
    rows_done > 0 || bound_taken
}

/// Whether the next run of a job sweeps (walks every key again from the first, its sweep count
/// started afresh) rather than continuing a pass: its last pass ended incomplete and none of its
/// key ranges is left to walk. The one place this is decided: the plan probes the chunk a sweep
/// starts with, and a joining run resets the sweep count.
pub fn next_run_sweeps(state: JobState, ranges_all_done: bool) -> bool {
    state == JobState::Incomplete && ranges_all_done
}

/// Whether a job may be reverted: it made progress ([`made_progress`]), is not reverted already,
/// and no run works on it (in that order of precedence). The one place this is decided.
pub fn revert_refusal(
    state: JobState,
    made_progress: bool,
    run_alive: bool,
) -> Option<RevertRefusal> {
    if run_alive {
        Some(RevertRefusal::Running)
    } else if state == JobState::Reverted {
        Some(RevertRefusal::AlreadyReverted)
    } else if !made_progress {
        Some(RevertRefusal::NothingProcessed)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_text_parses_back_to_its_variant_and_texts_are_distinct() {
        fn check<T: Copy + PartialEq + fmt::Debug>(
            all: &[T],
            text: fn(T) -> &'static str,
            parse: fn(&str) -> Result<T, UnknownText>,
        ) {
            for &v in all {
                assert_eq!(parse(text(v)), Ok(v));
                assert_eq!(all.iter().filter(|&&w| text(w) == text(v)).count(), 1);
            }
        }
        check(JobState::ALL, JobState::as_sql, JobState::parse);
        check(Phase::ALL, Phase::as_sql, Phase::parse);
        check(RunOutcome::ALL, RunOutcome::as_sql, RunOutcome::parse);
        check(StepState::ALL, StepState::as_sql, StepState::parse);
        check(
            CompletionGap::ALL,
            CompletionGap::as_sql,
            CompletionGap::parse,
        );
        assert_eq!(
            JobState::parse("interrupted"),
            Err(UnknownText {
                kind: "job state",
                text: "interrupted".into()
            })
        );
        assert_eq!(JobState::Done.literal(), "'done'");
    }

    #[test]
    fn a_run_end_records_matching_outcome_state_and_phase() {
        // (end, outcome, state, ends the pass, phase with verify 0, phase without verify)
        let cases = [
            (
                RunEnd::Done,
                RunOutcome::Done,
                JobState::Done,
                true,
                Phase::DoneAndVerified,
                Phase::Done,
            ),
            (
                RunEnd::Incomplete,
                RunOutcome::Incomplete,
                JobState::Incomplete,
                true,
                Phase::Incomplete,
                Phase::Incomplete,
            ),
            (
                RunEnd::Stopped,
                RunOutcome::Stopped,
                JobState::Stopped,
                false,
                Phase::Stopped,
                Phase::Stopped,
            ),
            (
                RunEnd::Cancelled,
                RunOutcome::Cancelled,
                JobState::Cancelled,
                false,
                Phase::Cancelled,
                Phase::Cancelled,
            ),
            (
                RunEnd::Failed,
                RunOutcome::Failed,
                JobState::Failed,
                false,
                Phase::Failed,
                Phase::Failed,
            ),
        ];
        for (end, outcome, state, ends_pass, verified, unverified) in cases {
            assert_eq!(end.outcome(), outcome, "{end:?}");
            assert_eq!(end.state(), state, "{end:?}");
            assert_eq!(end.ends_pass(), ends_pass, "{end:?}");
            assert_eq!(end.phase(Some(0)), verified, "{end:?}");
            assert_eq!(end.phase(None), unverified, "{end:?}");
            // The texts agree where they name the same thing (one column is set from another).
            assert_eq!(outcome.as_sql(), state.as_sql());
        }
        // Done with rows still counted is not verified (an incomplete run records that instead).
        assert_eq!(RunEnd::Done.phase(Some(3)), Phase::Done);
        assert_eq!(Phase::done(Some(0)), Phase::DoneAndVerified);
        assert_eq!(Phase::done(Some(2)), Phase::Done);
        assert_eq!(Phase::done(None), Phase::Done);
    }

    #[test]
    fn only_done_is_finished_and_only_a_finish_replaces_it() {
        for &from in JobState::ALL {
            assert_eq!(from.is_finished(), from == JobState::Done, "{from:?}");
            for &next in JobState::ALL {
                let want = from != JobState::Done || next == JobState::Done;
                assert_eq!(from.may_become(next), want, "{from:?} -> {next:?}");
                assert_eq!(
                    JobState::may_become_from(next).contains(&from.as_sql()),
                    want,
                    "{from:?} -> {next:?}"
                );
            }
        }
        assert!(!JobState::Done.may_become(JobState::Stopped));
        assert!(JobState::Done.may_become(JobState::Done));
        assert!(JobState::Incomplete.may_become(JobState::Failed));
    }

    #[test]
    fn a_running_job_without_a_live_runner_shows_as_interrupted() {
        for &state in JobState::ALL {
            let alive = ShownState::of(state, true);
            assert_eq!(alive, state);
            let dead = ShownState::of(state, false);
            assert_eq!(alive.recorded(), state);
            assert_eq!(dead.recorded(), state);
            if state == JobState::Running {
                assert_eq!(dead, ShownState::Interrupted);
                assert_ne!(dead, JobState::Running);
                assert_eq!(dead.as_str(), "interrupted");
            } else {
                assert_eq!(dead, state);
                assert_eq!(dead.as_str(), state.as_sql());
            }
        }
    }

    #[test]
    fn revert_is_refused_while_running_when_reverted_or_before_any_progress() {
        use RevertRefusal::*;
        // (state, made progress, a run alive, refusal)
        let cases = [
            (JobState::Done, true, false, None),
            (JobState::Failed, true, false, None),
            (JobState::Incomplete, true, false, None),
            (JobState::Stopped, true, false, None),
            (JobState::Running, true, false, None),
            (JobState::Running, true, true, Some(Running)),
            (JobState::Reverted, false, true, Some(Running)),
            (JobState::Reverted, false, false, Some(AlreadyReverted)),
            (JobState::Reverted, true, false, Some(AlreadyReverted)),
            (JobState::New, false, false, Some(NothingProcessed)),
            (JobState::Stopped, false, false, Some(NothingProcessed)),
        ];
        for (state, progress, alive, want) in cases {
            assert_eq!(
                revert_refusal(state, progress, alive),
                want,
                "{state:?} progress={progress} alive={alive}"
            );
        }
    }

    #[test]
    fn progress_is_rows_done_or_a_fixed_key_range() {
        // (rows done, bound taken, made progress)
        let cases = [
            (0, false, false),
            (0, true, true),
            (5, true, true),
            (5, false, true),
        ];
        for (rows, taken, want) in cases {
            assert_eq!(
                made_progress(rows, taken),
                want,
                "rows={rows} taken={taken}"
            );
        }
    }

    #[test]
    fn only_an_incomplete_job_with_every_range_walked_sweeps_next() {
        for &state in JobState::ALL {
            for all_done in [false, true] {
                let want = state == JobState::Incomplete && all_done;
                assert_eq!(
                    next_run_sweeps(state, all_done),
                    want,
                    "{state:?} {all_done}"
                );
            }
        }
    }
}
