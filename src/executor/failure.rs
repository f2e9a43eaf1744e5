//! A failed chunk attempt ([`Failure`]: what failed, at which stage, on which keys) and how a
//! driver error, or a request a round trip could not send ([`sent`]), becomes one, including the
//! statement cache's stale-plan rule ([`cached`], [`failed_cached`]). Must not decide what a failure means (that is `recovery`'s) nor send a
//! chunk's statements (that is `chunk`'s).

use super::recovery::Problem;
use crate::db::{self, ErrorClass};
use crate::error::ChunkCause;
use crate::keyset::{self, KeyValue};

/// A statement from the connection's cache, and whether an earlier transaction prepared it.
pub(super) type Cached = (tokio_postgres::Statement, bool);

/// A failed attempt at a chunk, with what is known of where it failed.
pub(super) struct Failure {
    pub problem: Problem,
    /// What failed: the database error itself (its SQLSTATE and class read from it), or the
    /// engine's own reason.
    pub cause: ChunkCause,
    pub stage: &'static str,
    pub range: Option<(KeyValue, KeyValue)>,
    pub keys: Option<i64>,
}

impl Failure {
    /// The range is no longer this worker's: the run was declared gone and its ranges taken.
    pub(super) fn lost(stage: &'static str) -> Self {
        Failure {
            problem: Problem::Lost,
            cause: ChunkCause::RangeLost,
            stage,
            range: None,
            keys: None,
        }
    }

    /// A request that its round trip could not send, because one before it could not be
    /// (that one's failure is read first, so this is only a backstop).
    pub(super) fn not_sent(stage: &'static str) -> Self {
        Failure {
            problem: Problem::Db(ErrorClass::Fatal),
            cause: ChunkCause::NotSent,
            stage,
            range: None,
            keys: None,
        }
    }

    /// The walk would not move forward (see [`keyset::Stall`]): fatal, never retried.
    pub(super) fn stalled(stall: &keyset::Stall) -> Self {
        Failure {
            problem: Problem::Stalled,
            cause: ChunkCause::Stalled(stall.to_string()),
            stage: "finding the chunk bounds",
            range: None,
            keys: None,
        }
    }

    /// The database class of the failure, if it is a database error.
    pub fn class(&self) -> Option<ErrorClass> {
        match self.problem {
            Problem::Db(class) => Some(class),
            Problem::Stalled | Problem::Lost => None,
        }
    }

    /// The SQLSTATE, when the server sent one.
    pub fn sqlstate(&self) -> Option<&str> {
        self.cause.sqlstate()
    }

    /// The failure as the operator reads it.
    pub fn text(&self) -> String {
        self.cause.to_string()
    }
}

/// Turns a database error at `stage` of a chunk into a [`Failure`] naming the key range.
pub(super) fn failed(
    stage: &'static str,
    chunk: Option<&(KeyValue, KeyValue, i64)>,
) -> impl FnOnce(tokio_postgres::Error) -> Failure {
    let chunk = chunk.cloned();
    move |e| {
        let class = db::classify(&e);
        Failure {
            problem: Problem::Db(class),
            cause: ChunkCause::driver(e, class),
            stage,
            keys: chunk.as_ref().map(|c| c.2),
            range: chunk.map(|(a, b, _)| (a, b)),
        }
    }
}

/// A statement from the connection's statement cache, and whether an earlier transaction
/// prepared it (its saved plan may then be stale, see [`failed_cached`]). One prepared in this
/// transaction cannot be: the locks it took keep the tables from changing until the end.
pub(super) async fn cached(
    conn: &deadpool_postgres::ClientWrapper,
    sql: &str,
) -> Result<Cached, tokio_postgres::Error> {
    let before = conn.statement_cache.size();
    let stmt = conn.prepare_cached(sql).await?;
    Ok((stmt, conn.statement_cache.size() == before))
}

/// Like [`failed`], for executing a statement from the cache. SQLSTATE 0A000 from a statement an
/// earlier transaction prepared means its saved plan went stale — the table changed under it,
/// e.g. `ALTER TABLE … ADD COLUMN` under `RETURNING *` ("cached plan must not change result
/// type"). That is transient: the connection's cache is emptied, so the retry prepares every
/// statement again, and the chunk is retried like contention (nothing of it was committed). A
/// 0A000 from a statement prepared afresh is a real "feature not supported" and stays fatal.
pub(super) fn failed_cached(
    stage: &'static str,
    chunk: Option<&(KeyValue, KeyValue, i64)>,
    reused: bool,
    conn: &deadpool_postgres::ClientWrapper,
) -> impl FnOnce(tokio_postgres::Error) -> Failure {
    let cache = conn.statement_cache.clone();
    let fail = failed(stage, chunk);
    move |e| {
        let stale = reused && db::sqlstate(&e) == Some("0A000");
        let mut error = fail(e);
        if stale {
            cache.clear();
            error.problem = Problem::Db(ErrorClass::Contention);
            if let ChunkCause::Database { error, stale_plan } = &mut error.cause {
                error.class = ErrorClass::Contention;
                *stale_plan = true;
            }
        }
        error
    }
}

/// Whether a request's answer is an error the server sent.
pub(super) fn from_server<T>(answer: &Option<Result<T, tokio_postgres::Error>>) -> bool {
    matches!(answer, Some(Err(e)) if e.as_db_error().is_some())
}

/// The failure of a request known to have failed (or not been sent) at `stage`.
pub(super) fn failure_of<T>(
    answer: Option<Result<T, tokio_postgres::Error>>,
    stage: &'static str,
    chunk: Option<&(KeyValue, KeyValue, i64)>,
) -> Failure {
    match answer {
        Some(Err(e)) => failed(stage, chunk)(e),
        Some(Ok(_)) | None => Failure::not_sent(stage),
    }
}

/// A request's answer from its flight, as a [`Failure`] at `stage` when it failed or could not
/// be sent (a request before it in its round trip could not be: that one's failure is read
/// first).
pub(super) fn sent<T>(
    answer: Option<Result<T, tokio_postgres::Error>>,
    stage: &'static str,
    chunk: Option<&(KeyValue, KeyValue, i64)>,
) -> Result<T, Failure> {
    match answer {
        Some(answer) => answer.map_err(failed(stage, chunk)),
        None => Err(Failure::not_sent(stage)),
    }
}
