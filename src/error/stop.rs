//! The errors a run stops with, as values: at a chunk ([`ChunkStop`]: why, the chunk's keys,
//! where the next run resumes, what failed), giving up while starting ([`StartGaveUp`]), and
//! stopped while its end could not be recorded ([`StoppedUnrecorded`]). Each keeps the database
//! error it came from (class, SQLSTATE, driver error as `source()`), and renders the operator's
//! message from its fields: the text is decided here, once, not assembled where the run stops.
//!
//! Owns only these types and their text; like the rest of `error`, it depends on no other module
//! of the crate (keys arrive already shown, advice already chosen by `db`).

use super::{DbError, Error, ErrorClass};
use std::time::Duration;
use tokio_postgres::error::SqlState;

/// What a failed chunk attempt failed with: the database's error, kept whole, or a failure of
/// the engine's own.
#[derive(Debug)]
pub enum ChunkCause {
    /// A statement of the chunk failed.
    Database {
        error: Box<DbError>,
        /// 0A000 from a statement an earlier transaction prepared: its saved plan went stale
        /// because the table changed; the connection's statements are prepared again.
        stale_plan: bool,
    },
    /// The key range is no longer the run's (its runner was declared gone, the range taken).
    RangeLost,
    /// The walk would not move forward (the keyset's description of why).
    Stalled(String),
    /// The job's statement wrote rows of its table outside the chunk's bounds.
    WroteOutside(Box<WroteOutside>),
    /// Not sent: a request before it in the same round trip could not be sent.
    NotSent,
    /// No connection from the run's pool, for a reason of the pool's own (a timeout, a closed
    /// pool; a server's refusal is [`ChunkCause::Database`]).
    Pool(String),
}

/// A chunk whose statement wrote more rows of the job's table than the chunk's bounds hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WroteOutside {
    pub job: String,
    pub table: String,
    /// The key columns as a `WHERE` would name them: `id`, `(tenant_id, id)`.
    pub key: String,
    /// Rows of the job's table the statement wrote.
    pub written: i64,
    /// Keys in the chunk when its bounds were found (rows, for the page walk).
    pub keys: i64,
    /// The chunk is a range of pages (`ctid`), not of keys.
    pub pages: bool,
    /// Rows in the chunk's bounds after the statement.
    pub now: i64,
}

impl std::fmt::Display for WroteOutside {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let WroteOutside {
            job,
            table,
            key,
            written,
            keys,
            pages,
            now,
        } = self;
        let held = if *pages {
            format!("the chunk's pages held {keys} rows")
        } else {
            format!("the chunk holds {keys} keys")
        };
        write!(
            f,
            "the statement wrote {written} rows of {table}, but {held} ({now} rows are in its bounds now): it writes rows outside :start..:end, so every chunk would rewrite rows of other chunks. Restrict every row it changes to the chunk, e.g. `WHERE {key} BETWEEN :start AND :end` (`backfill plan {job}` shows what a chunk writes); a trigger on {table} that writes other rows of it has the same effect"
        )
    }
}

impl ChunkCause {
    /// A driver error, with the class `db` decided for it (no context, no advice: the chunk's
    /// stop says those).
    pub fn driver(e: tokio_postgres::Error, class: ErrorClass) -> ChunkCause {
        ChunkCause::Database {
            error: Box::new(DbError::driver(e, class)),
            stale_plan: false,
        }
    }

    pub fn database(&self) -> Option<&DbError> {
        match self {
            ChunkCause::Database { error, .. } => Some(error),
            ChunkCause::RangeLost
            | ChunkCause::Stalled(_)
            | ChunkCause::WroteOutside(_)
            | ChunkCause::NotSent
            | ChunkCause::Pool(_) => None,
        }
    }

    /// The SQLSTATE, when the server sent one.
    pub fn sqlstate(&self) -> Option<&str> {
        self.database()?.sqlstate.as_ref().map(SqlState::code)
    }
}

impl std::fmt::Display for ChunkCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkCause::Database {
                error,
                stale_plan: true,
            } => write!(
                f,
                "the statement's saved plan is stale, the table changed ({error}); prepared again"
            ),
            ChunkCause::Database { error, .. } => write!(f, "{error}"),
            ChunkCause::RangeLost => f.write_str("the key range is no longer this run's"),
            ChunkCause::NotSent => f.write_str(
                "not sent, because a request before it in the same round trip could not be",
            ),
            ChunkCause::Stalled(why) | ChunkCause::Pool(why) => f.write_str(why),
            ChunkCause::WroteOutside(w) => write!(f, "{w}"),
        }
    }
}

/// Why a run stopped at a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The database was unreachable for this long, past `--reconnect-for`.
    Unreachable { for_: Duration },
    /// The chunk met lock contention for this long, past the whole budget.
    ContentionBudget { for_: Duration, budget: Duration },
    /// The chunk failed this many attempts in a row (`--max-attempts`).
    Attempts(u32),
    /// The statement fails at one key, and `on_error = "stop"`.
    PoisonKey,
    /// Retrying cannot help.
    Fatal,
    /// The walk would not move forward.
    Stalled,
}

/// Where the next run resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// After the last key this worker committed (as shown).
    AfterKey(String),
    /// At the committed cursor of the key range the worker held.
    AtRangeCursor(i64),
    /// Nothing is known of the worker's place.
    WhereItStopped,
}

impl std::fmt::Display for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resume::AfterKey(k) => write!(f, "after key {k}"),
            Resume::AtRangeCursor(id) => write!(f, "at the saved cursor of key range {id}"),
            Resume::WhereItStopped => f.write_str("where it stopped"),
        }
    }
}

/// A run stopped at a chunk: the job, why, what the chunk was doing, its keys when known, where
/// the next run resumes, what failed (`source()`: the database error, keeping class and
/// SQLSTATE) and what to do. Its text is the operator's message.
#[derive(Debug)]
pub struct ChunkStop {
    pub job: String,
    pub why: StopReason,
    /// What the chunk was doing ("running the job's statement").
    pub stage: &'static str,
    /// The chunk's first and last key (as shown), when known.
    pub chunk: Option<(String, String)>,
    pub resume: Resume,
    pub cause: ChunkCause,
    /// What to do, for a [`StopReason::Fatal`] stop (from the SQLSTATE); the other reasons say it
    /// in their own words.
    pub advice: Option<&'static str>,
}

impl ChunkStop {
    /// The chunk's keys ("key K", "keys A..=B"), or where it would have started.
    fn chunk_keys(&self) -> String {
        match &self.chunk {
            Some((a, b)) if a == b => format!("key {a}"),
            Some((a, b)) => format!("keys {a}..={b}"),
            None => format!("the chunk {}", self.resume),
        }
    }
}

impl std::fmt::Display for ChunkStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ChunkStop {
            job: name,
            stage,
            resume,
            cause,
            ..
        } = self;
        let keys = self.chunk_keys();
        match self.why {
            StopReason::Unreachable { for_ } => write!(
                f,
                "job {name}: the database has been unreachable for {}s (last error while {stage}: {cause}); gave up (--reconnect-for); nothing uncommitted was kept; run `backfill run {name}` again when it is back: it resumes {resume}",
                for_.as_secs()
            ),
            StopReason::ContentionBudget { for_, budget } => write!(
                f,
                "job {name}: {keys} kept meeting lock contention for {}s, the whole contention budget ({}; --contention-budget or the job's contention_budget), last while {stage}: {cause}; nothing of this chunk was committed; find the session holding the lock (pg_locks, pg_blocking_pids) or give a longer budget, then run `backfill run {name}` again: it resumes {resume}",
                for_.as_secs(),
                humantime::format_duration(budget)
            ),
            StopReason::Attempts(attempts) => write!(
                f,
                "job {name}: {keys} failed while {stage} (gave up after {attempts} attempts, --max-attempts): {cause}; nothing of this chunk was committed; run `backfill run {name}` again (perhaps with a longer --statement-timeout): it resumes {resume}"
            ),
            StopReason::PoisonKey => write!(
                f,
                "job {name}: key {} makes the statement fail: {cause}; every key before it is done (on_error = \"stop\"); fix the row or the statement and run again — it resumes at this key — or set on_error = \"skip\" to record such keys and go on",
                self.chunk.as_ref().map_or("?", |(first, _)| first.as_str())
            ),
            StopReason::Fatal => write!(
                f,
                "job {name}: {keys} failed while {stage}: {cause}; {}; nothing of this chunk was committed: `backfill run {name}` resumes {resume}",
                self.advice.unwrap_or("fix the cause, then run again")
            ),
            StopReason::Stalled => write!(
                f,
                "job {name}: {cause}; nothing of this chunk was committed, and the run stops rather than apply the statement to the same rows again; this is a defect of backfill with this key type: report it with the key's type, or key the job on another unique index"
            ),
        }
    }
}

impl std::error::Error for ChunkStop {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .database()
            .map(|d| d as &(dyn std::error::Error + 'static))
    }
}

/// A run that gave up waiting for the database while starting: nothing was processed.
#[derive(Debug)]
pub struct StartGaveUp {
    pub job: String,
    /// How long the database had been unreachable.
    pub waited: Duration,
    /// The last error while trying to start.
    pub last: Box<DbError>,
}

impl std::fmt::Display for StartGaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let StartGaveUp {
            job: name, last, ..
        } = self;
        write!(
            f,
            "job {name}: the database has been unreachable for {}s while the run was starting (last error: {last}); gave up (--reconnect-for); nothing was processed by this run: run `backfill run {name}` again when it is back",
            self.waited.as_secs()
        )
    }
}

impl std::error::Error for StartGaveUp {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.last)
    }
}

/// Where the next run goes on after a run stopped unrecorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextRun {
    /// Several key ranges: each after its own last committed key.
    EachRange,
    /// After this key (as shown).
    AfterKey(String),
    /// Nothing was committed yet.
    FirstKey,
}

impl std::fmt::Display for NextRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NextRun::EachRange => {
                f.write_str("resumes each key range after its last committed key")
            }
            NextRun::AfterKey(k) => write!(f, "resumes after key {k}"),
            NextRun::FirstKey => f.write_str("starts at the first key"),
        }
    }
}

/// A run stopped while the database was unreachable: every chunk it committed is saved with its
/// checkpoint, but its end could not be recorded (`why`), so the next run finds it gone.
#[derive(Debug)]
pub struct StoppedUnrecorded {
    pub job: String,
    /// Keys and chunks this run committed.
    pub rows: i64,
    pub chunks: i64,
    pub next: NextRun,
    /// Why the end could not be recorded.
    pub why: Error,
}

impl std::fmt::Display for StoppedUnrecorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let StoppedUnrecorded {
            job: name,
            rows,
            chunks,
            next,
            why,
        } = self;
        write!(
            f,
            "{name}: stopped while the database is unreachable: {rows} rows in {chunks} chunks this run, each committed with its checkpoint; the stop itself could not be recorded ({why}), so the run will show as abandoned; `backfill run {name}` {next} once the database is back"
        )
    }
}

impl std::error::Error for StoppedUnrecorded {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::tests::no_answer;
    use crate::error::{exit, ErrorKind};

    fn stop(why: StopReason, chunk: Option<(&str, &str)>, cause: ChunkCause) -> ChunkStop {
        ChunkStop {
            job: "orders".into(),
            why,
            stage: "running the job's statement",
            chunk: chunk.map(|(a, b)| (a.to_string(), b.to_string())),
            resume: Resume::AfterKey("41".into()),
            cause,
            advice: None,
        }
    }

    fn boom() -> ChunkCause {
        ChunkCause::Pool("boom".into())
    }

    #[test]
    fn each_reason_a_run_stops_at_a_chunk_renders_its_message() {
        let fatal = ChunkStop {
            advice: Some("point --database-url at the primary"),
            ..stop(StopReason::Fatal, Some(("42", "50")), boom())
        };
        let stale = ChunkCause::Database {
            error: Box::new(no_answer(ErrorClass::Contention)),
            stale_plan: true,
        };
        let cases: [(ChunkStop, &str); 7] = [
            (
                stop(
                    StopReason::Unreachable {
                        for_: Duration::from_millis(30_900),
                    },
                    None,
                    boom(),
                ),
                "job orders: the database has been unreachable for 30s (last error while running the job's statement: boom); gave up (--reconnect-for); nothing uncommitted was kept; run `backfill run orders` again when it is back: it resumes after key 41",
            ),
            (
                stop(
                    StopReason::ContentionBudget {
                        for_: Duration::from_secs(61),
                        budget: Duration::from_secs(60),
                    },
                    Some(("42", "50")),
                    stale,
                ),
                "job orders: keys 42..=50 kept meeting lock contention for 61s, the whole contention budget (1m; --contention-budget or the job's contention_budget), last while running the job's statement: the statement's saved plan is stale, the table changed (no answer within 20s); prepared again; nothing of this chunk was committed; find the session holding the lock (pg_locks, pg_blocking_pids) or give a longer budget, then run `backfill run orders` again: it resumes after key 41",
            ),
            (
                stop(StopReason::Attempts(5), Some(("42", "42")), boom()),
                "job orders: key 42 failed while running the job's statement (gave up after 5 attempts, --max-attempts): boom; nothing of this chunk was committed; run `backfill run orders` again (perhaps with a longer --statement-timeout): it resumes after key 41",
            ),
            (
                stop(StopReason::PoisonKey, Some(("42", "42")), boom()),
                "job orders: key 42 makes the statement fail: boom; every key before it is done (on_error = \"stop\"); fix the row or the statement and run again — it resumes at this key — or set on_error = \"skip\" to record such keys and go on",
            ),
            (
                fatal,
                "job orders: keys 42..=50 failed while running the job's statement: boom; point --database-url at the primary; nothing of this chunk was committed: `backfill run orders` resumes after key 41",
            ),
            (
                ChunkStop {
                    resume: Resume::AtRangeCursor(3),
                    ..stop(StopReason::Fatal, None, boom())
                },
                "job orders: the chunk at the saved cursor of key range 3 failed while running the job's statement: boom; fix the cause, then run again; nothing of this chunk was committed: `backfill run orders` resumes at the saved cursor of key range 3",
            ),
            (
                ChunkStop {
                    resume: Resume::WhereItStopped,
                    ..stop(StopReason::Stalled, None, ChunkCause::Stalled("the walk is stuck".into()))
                },
                "job orders: the walk is stuck; nothing of this chunk was committed, and the run stops rather than apply the statement to the same rows again; this is a defect of backfill with this key type: report it with the key's type, or key the job on another unique index",
            ),
        ];
        for (stop, text) in cases {
            assert_eq!(stop.to_string(), text);
            let e = Error::ChunkStopped(Box::new(stop));
            assert_eq!(e.to_string(), text);
            assert_eq!(e.kind(), ErrorKind::Runtime);
            assert_eq!(e.exit_code(), exit::FAILURE);
        }
    }

    #[test]
    fn a_chunk_stop_keeps_the_database_error_its_class_and_sqlstate() {
        let cause = ChunkCause::Database {
            error: Box::new(no_answer(ErrorClass::Contention)),
            stale_plan: false,
        };
        assert_eq!(cause.sqlstate(), Some("55P03"));
        let e = Error::ChunkStopped(Box::new(stop(StopReason::Attempts(2), None, cause)))
            .context("outer");
        assert_eq!(e.exit_code(), exit::FAILURE);
        let d = e.database().expect("the database error survives");
        assert_eq!(d.class, ErrorClass::Contention);
        assert_eq!(d.sqlstate, Some(SqlState::LOCK_NOT_AVAILABLE));
        let Error::Context { source, .. } = &e else {
            panic!("{e:?}")
        };
        let Error::ChunkStopped(stop) = &**source else {
            panic!("{source:?}")
        };
        let inner = std::error::Error::source(&**stop).expect("a source");
        let inner = inner.downcast_ref::<DbError>().expect("the DbError");
        assert_eq!(inner.sqlstate, Some(SqlState::LOCK_NOT_AVAILABLE));
        let engine = Error::ChunkStopped(Box::new(stop_engine()));
        assert!(engine.database().is_none());
        assert!(std::error::Error::source(&stop_engine()).is_none());
    }

    fn stop_engine() -> ChunkStop {
        stop(StopReason::Stalled, None, boom())
    }

    #[test]
    fn a_start_up_that_gave_up_renders_its_message_and_keeps_the_last_error() {
        let e = Error::StartGaveUp(Box::new(StartGaveUp {
            job: "orders".into(),
            waited: Duration::from_millis(10_400),
            last: Box::new(no_answer(ErrorClass::Connection).with_context("cannot connect to h")),
        }));
        assert_eq!(
            e.to_string(),
            "job orders: the database has been unreachable for 10s while the run was starting (last error: cannot connect to h: no answer within 20s); gave up (--reconnect-for); nothing was processed by this run: run `backfill run orders` again when it is back"
        );
        assert_eq!(e.kind(), ErrorKind::Runtime);
        assert_eq!(e.exit_code(), exit::FAILURE);
        let d = e.database().expect("the last error");
        assert_eq!(d.class, ErrorClass::Connection);
        assert_eq!(d.sqlstate, Some(SqlState::LOCK_NOT_AVAILABLE));
        let Error::StartGaveUp(gave_up) = &e else {
            panic!("{e:?}")
        };
        let source = std::error::Error::source(&**gave_up).expect("a source");
        assert!(source.downcast_ref::<DbError>().is_some());
    }

    #[test]
    fn a_stop_that_could_not_be_recorded_renders_each_resume_and_exits_130() {
        let why = || {
            no_answer(ErrorClass::Connection)
                .with_context("cannot connect to h")
                .into_error()
        };
        let cases: [(NextRun, &str); 3] = [
            (
                NextRun::EachRange,
                "resumes each key range after its last committed key",
            ),
            (NextRun::AfterKey("7".into()), "resumes after key 7"),
            (NextRun::FirstKey, "starts at the first key"),
        ];
        for (next, resume) in cases {
            let e = Error::StoppedUnrecorded(Box::new(StoppedUnrecorded {
                job: "orders".into(),
                rows: 300,
                chunks: 3,
                next,
                why: why(),
            }));
            assert_eq!(
                e.to_string(),
                format!("orders: stopped while the database is unreachable: 300 rows in 3 chunks this run, each committed with its checkpoint; the stop itself could not be recorded (cannot connect to h: no answer within 20s), so the run will show as abandoned; `backfill run orders` {resume} once the database is back")
            );
            assert_eq!(e.kind(), ErrorKind::Interrupted);
            assert_eq!(e.exit_code(), exit::INTERRUPTED);
            assert_eq!(e.database().map(|d| d.class), Some(ErrorClass::Connection));
        }
    }

    #[test]
    fn a_statement_writing_outside_its_chunk_names_the_table_key_and_counts() {
        let wrote = |key: &str, pages: bool| WroteOutside {
            job: "orders".into(),
            table: "public.orders".into(),
            key: key.into(),
            written: 30,
            keys: 10,
            pages,
            now: 10,
        };
        let cases: [(WroteOutside, &str); 2] = [
            (
                wrote("id", false),
                "the statement wrote 30 rows of public.orders, but the chunk holds 10 keys (10 rows are in its bounds now): it writes rows outside :start..:end, so every chunk would rewrite rows of other chunks. Restrict every row it changes to the chunk, e.g. `WHERE id BETWEEN :start AND :end` (`backfill plan orders` shows what a chunk writes); a trigger on public.orders that writes other rows of it has the same effect",
            ),
            (
                wrote("(tenant, id)", true),
                "the statement wrote 30 rows of public.orders, but the chunk's pages held 10 rows (10 rows are in its bounds now): it writes rows outside :start..:end, so every chunk would rewrite rows of other chunks. Restrict every row it changes to the chunk, e.g. `WHERE (tenant, id) BETWEEN :start AND :end` (`backfill plan orders` shows what a chunk writes); a trigger on public.orders that writes other rows of it has the same effect",
            ),
        ];
        for (w, text) in cases {
            let cause = ChunkCause::WroteOutside(Box::new(w));
            assert_eq!(cause.to_string(), text);
            assert!(cause.database().is_none() && cause.sqlstate().is_none());
        }
        assert_eq!(
            ChunkCause::RangeLost.to_string(),
            "the key range is no longer this run's"
        );
    }
}
