//! The engine's error type, the exit code each kind of failure maps to, and the database error
//! that keeps its class, SQLSTATE, driver error and context instead of flattening them into text.
//!
//! The errors a run stops with (at a chunk, giving up while starting, stopped unrecorded) are
//! values with fields, in `error/stop.rs`, re-exported here.
//!
//! Every message is written for an operator: lowercase, naming the job, file, key range or SQLSTATE
//! involved, and saying what to do next. Exit codes are part of the public contract (README).
//!
//! Owns only the types and how they render; it depends on no module of the crate (every other
//! module depends on it). Deciding a database error's class from its SQLSTATE, and the advice for
//! it, is `db`'s business: this module stores what `db` decided.

use std::borrow::Cow;
use std::process::ExitCode;
use std::time::Duration;
use tokio_postgres::error::SqlState;

mod stop;
pub use stop::{
    ChunkCause, ChunkStop, NextRun, Resume, StartGaveUp, StopReason, StoppedUnrecorded,
    WroteOutside,
};

/// Documented exit codes.
pub mod exit {
    pub const SUCCESS: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_SATISFIED: u8 = 3;
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line or invalid job definition (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A gate or precondition is not satisfied (exit 3).
    #[error("{0}")]
    NotSatisfied(String),
    /// Stopped by a signal with progress saved (exit 130).
    #[error("{0}")]
    Interrupted(String),
    /// Anything that went wrong at run time (exit 1).
    #[error("{0}")]
    Runtime(String),
    /// The database could not be reached, or the connection was lost (SQLSTATE class 08,
    /// 57P01–57P03, 53300, a closed socket): worth waiting for, unlike other runtime errors
    /// (exit 1 when it is given up on). Always a database error of class
    /// [`ErrorClass::Connection`], kept apart so that the code waiting for the database can match
    /// it.
    #[error("{0}")]
    Unavailable(Box<DbError>),
    /// A statement or a connection attempt failed for any other reason (exit 1).
    #[error("{0}")]
    Database(Box<DbError>),
    /// What was being done when `source` happened; rendered `context: source`, and of the kind
    /// (so the exit code) of `source`.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
    /// `source`, then what was done about it; rendered `source (note)`, of the kind of `source`.
    #[error("{source} ({note})")]
    Followed {
        #[source]
        source: Box<Error>,
        note: String,
    },
    /// A run stopped at a chunk it could not get through (exit 1): why, where, and where the
    /// next run resumes, with the database error when there was one.
    #[error("{0}")]
    ChunkStopped(Box<ChunkStop>),
    /// A run gave up waiting for the database while starting (`--reconnect-for`; exit 1).
    #[error("{0}")]
    StartGaveUp(Box<StartGaveUp>),
    /// A run stopped (signal or `backfill cancel`) while the database was unreachable, so that
    /// its end could not be recorded (exit 130: its committed chunks are saved).
    #[error("{0}")]
    StoppedUnrecorded(Box<StoppedUnrecorded>),
    /// This run lost ownership of the job while it ran (its lease expired, or another runner
    /// took its ranges over); exit 1. Nothing was committed twice.
    #[error("job {job}: this run lost ownership of the job (its lease expired or another runner took over); no chunk was committed twice; check `backfill status {job}` before running again")]
    RunLost { job: String },
}

/// What kind of failure an [`Error`] is, whatever context wraps it: decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Usage,
    NotSatisfied,
    Interrupted,
    Runtime,
    Unavailable,
}

impl Error {
    /// The kind of the innermost error: context never changes it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Usage(_) => ErrorKind::Usage,
            Error::NotSatisfied(_) => ErrorKind::NotSatisfied,
            Error::Interrupted(_) | Error::StoppedUnrecorded(_) => ErrorKind::Interrupted,
            Error::Runtime(_)
            | Error::Database(_)
            | Error::ChunkStopped(_)
            | Error::StartGaveUp(_)
            | Error::RunLost { .. } => ErrorKind::Runtime,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::Context { source, .. } | Error::Followed { source, .. } => source.kind(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self.kind() {
            ErrorKind::Usage => exit::USAGE,
            ErrorKind::NotSatisfied => exit::NOT_SATISFIED,
            ErrorKind::Interrupted => exit::INTERRUPTED,
            ErrorKind::Runtime | ErrorKind::Unavailable => exit::FAILURE,
        }
    }

    pub fn process_exit_code(&self) -> ExitCode {
        ExitCode::from(self.exit_code())
    }

    /// This run lost ownership of job `job` (see [`Error::RunLost`]).
    pub fn run_lost(job: &str) -> Error {
        Error::RunLost {
            job: job.to_string(),
        }
    }

    /// The database error inside, if this is one (through any context).
    pub fn database(&self) -> Option<&DbError> {
        match self {
            Error::Unavailable(d) | Error::Database(d) => Some(d),
            Error::ChunkStopped(stop) => stop.cause.database(),
            Error::StartGaveUp(gave_up) => Some(&gave_up.last),
            Error::StoppedUnrecorded(stop) => stop.why.database(),
            Error::Context { source, .. } | Error::Followed { source, .. } => source.database(),
            _ => None,
        }
    }

    /// Adds what was being done, outermost first, keeping the kind (and so the exit code). A
    /// database error keeps its variant and takes the context into its own chain, so that the
    /// code waiting out an [`Error::Unavailable`] still recognises it.
    pub fn context(self, prefix: impl std::fmt::Display) -> Error {
        match self {
            Error::Unavailable(mut d) => {
                d.context.insert(0, prefix.to_string());
                Error::Unavailable(d)
            }
            Error::Database(mut d) => {
                d.context.insert(0, prefix.to_string());
                Error::Database(d)
            }
            other => Error::Context {
                context: prefix.to_string(),
                source: Box::new(other),
            },
        }
    }

    /// Adds what was done after the failure (e.g. that a transaction was rolled back).
    pub fn followed_by(self, note: impl Into<String>) -> Error {
        Error::Followed {
            source: Box::new(self),
            note: note.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a database failure means for the work that hit it, decided by SQLSTATE only (servers are
/// localised, so message text is never looked at) — see `db::classify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Contention with other sessions (40001 serialization, 40P01 deadlock, 55P03 lock timeout):
    /// the same chunk is retried after a jittered backoff.
    Contention,
    /// 57014 from `statement_timeout`: the chunk is too big for the time allowed; it is halved.
    Timeout,
    /// The connection or the server went away (08xxx, 57P01–57P03 shutdown, 53300 too many
    /// connections, an I/O error on the socket, a closed connection): reconnect and retry while
    /// `--reconnect-for` allows.
    Connection,
    /// The data of some row made the statement fail (22xxx data exception, 23xxx constraint,
    /// P0001 raised by a trigger or function, 2F/38/39 function errors, 44 check option): the
    /// chunk is halved down to the failing key, which `on_error` then stops at or skips.
    Data,
    /// Anything else — read-only server, permission denied, missing table, disk full, bad SQL, a
    /// value the driver cannot send: retrying cannot help; the run stops with the reason and
    /// keeps its progress.
    Fatal,
}

impl ErrorClass {
    /// The metric label of the class.
    pub fn label(self) -> &'static str {
        match self {
            ErrorClass::Contention => "contention",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Connection => "connection",
            ErrorClass::Data => "data",
            ErrorClass::Fatal => "fatal",
        }
    }
}

/// Why a database operation failed.
#[derive(Debug)]
pub enum DbCause {
    /// The driver's error: the server's (with its SQLSTATE), or the client's own.
    Driver(tokio_postgres::Error),
    /// The server did not answer at all within this time.
    NoAnswer(Duration),
}

/// A failed database operation: its class and SQLSTATE, the driver error itself, what was being
/// done (outermost first) and what the operator should do next. Rendered as
/// `context: …: cause; advice`.
#[derive(Debug)]
pub struct DbError {
    pub class: ErrorClass,
    pub sqlstate: Option<SqlState>,
    pub cause: DbCause,
    /// What was being done, outermost first (`job orders: reading its checkpoint`).
    pub context: Vec<String>,
    /// What to do next, when there is something better to say than "run again".
    pub advice: Option<Cow<'static, str>>,
}

impl DbError {
    /// A failure of the driver, with the class `db` decided for it.
    pub fn driver(e: tokio_postgres::Error, class: ErrorClass) -> DbError {
        DbError {
            class,
            sqlstate: e.code().cloned(),
            cause: DbCause::Driver(e),
            context: Vec::new(),
            advice: None,
        }
    }

    pub fn with_context(mut self, context: impl std::fmt::Display) -> DbError {
        self.context.insert(0, context.to_string());
        self
    }

    pub fn with_advice(mut self, advice: impl Into<Cow<'static, str>>) -> DbError {
        self.advice = Some(advice.into());
        self
    }

    /// As an [`Error`]: [`Error::Unavailable`] when the database went away, worth waiting for.
    pub fn into_error(self) -> Error {
        match self.class {
            ErrorClass::Connection => Error::Unavailable(Box::new(self)),
            _ => Error::Database(Box::new(self)),
        }
    }

    /// The driver's error, when there is one.
    pub fn driver_error(&self) -> Option<&tokio_postgres::Error> {
        match &self.cause {
            DbCause::Driver(e) => Some(e),
            DbCause::NoAnswer(_) => None,
        }
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.context {
            write!(f, "{c}: ")?;
        }
        match &self.cause {
            DbCause::Driver(e) => f.write_str(&describe(e))?,
            DbCause::NoAnswer(d) => write!(f, "no answer within {}s", d.as_secs())?,
        }
        if let Some(a) = &self.advice {
            write!(f, "; {a}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.driver_error()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A one-line description of a driver error: SQLSTATE, message, and the server's detail, hint
/// and where; or the client's error with its causes.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("SQLSTATE {}: {}", db.code().code(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(&format!(" (detail: {d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!(" (hint: {h})"));
            }
            if let Some(w) = db.where_() {
                s.push_str(&format!(" (where: {})", w.replace('\n', " / ")));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                let t = inner.to_string();
                if !s.contains(&t) {
                    s.push_str(&format!(": {t}"));
                }
                src = inner.source();
            }
            if e.is_closed() {
                s.push_str(" (the connection to the server was lost)");
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database error without a server behind it, for the tests of this module and `stop`.
    pub(super) fn no_answer(class: ErrorClass) -> DbError {
        DbError {
            class,
            sqlstate: Some(SqlState::LOCK_NOT_AVAILABLE),
            cause: DbCause::NoAnswer(Duration::from_secs(20)),
            context: Vec::new(),
            advice: None,
        }
    }

    #[test]
    fn each_kind_exits_with_its_documented_code_through_any_context() {
        let cases: [(Error, ErrorKind, u8); 9] = [
            (Error::Usage("u".into()), ErrorKind::Usage, exit::USAGE),
            (
                Error::RunLost { job: "j".into() },
                ErrorKind::Runtime,
                exit::FAILURE,
            ),
            (
                Error::NotSatisfied("n".into()),
                ErrorKind::NotSatisfied,
                exit::NOT_SATISFIED,
            ),
            (
                Error::Interrupted("i".into()),
                ErrorKind::Interrupted,
                exit::INTERRUPTED,
            ),
            (
                Error::Runtime("r".into()),
                ErrorKind::Runtime,
                exit::FAILURE,
            ),
            (
                no_answer(ErrorClass::Connection).into_error(),
                ErrorKind::Unavailable,
                exit::FAILURE,
            ),
            (
                no_answer(ErrorClass::Fatal).into_error(),
                ErrorKind::Runtime,
                exit::FAILURE,
            ),
            (
                Error::Usage("u".into()).context("a").context("b"),
                ErrorKind::Usage,
                exit::USAGE,
            ),
            (
                Error::NotSatisfied("n".into())
                    .followed_by("note")
                    .context("c"),
                ErrorKind::NotSatisfied,
                exit::NOT_SATISFIED,
            ),
        ];
        for (e, kind, code) in cases {
            assert_eq!(e.kind(), kind, "{e:?}");
            assert_eq!(e.exit_code(), code, "{e:?}");
        }
    }

    #[test]
    fn context_renders_as_a_prefix_chain_and_a_note_as_a_suffix() {
        let cases: [(Error, &str); 5] = [
            (
                Error::Runtime("boom".into()).context("job j"),
                "job j: boom",
            ),
            (
                Error::Usage("bad".into()).context("inner").context("outer"),
                "outer: inner: bad",
            ),
            (
                Error::Runtime("boom".into()).followed_by("rolled back"),
                "boom (rolled back)",
            ),
            (
                no_answer(ErrorClass::Connection)
                    .with_context("cannot connect to h")
                    .with_advice("check the network")
                    .into_error()
                    .context("job j"),
                "job j: cannot connect to h: no answer within 20s; check the network",
            ),
            (
                no_answer(ErrorClass::Fatal)
                    .into_error()
                    .context("reading")
                    .followed_by("n"),
                "reading: no answer within 20s (n)",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
    }

    #[test]
    fn a_database_error_keeps_its_variant_class_and_sqlstate_under_context() {
        let e = no_answer(ErrorClass::Connection)
            .into_error()
            .context("job j");
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        let d = e.database().expect("a database error");
        assert_eq!(d.class, ErrorClass::Connection);
        assert_eq!(d.sqlstate, Some(SqlState::LOCK_NOT_AVAILABLE));
        assert_eq!(d.context, ["job j"]);
        let wrapped = Error::Database(Box::new(no_answer(ErrorClass::Data))).followed_by("n");
        assert_eq!(wrapped.database().map(|d| d.class), Some(ErrorClass::Data));
        assert!(Error::Runtime("r".into()).database().is_none());
    }
}
