//! Connections: where to connect (URL or libpq variables, `.pgpass`), TLS, the pool with its
//! timeouts, SQLSTATE classification and query cancellation, and what the role may see of other
//! sessions (`visibility`).
//!
//! Every session the engine opens gets the same settings (UTC, ISO dates, exact float text) so that
//! key values written as text by one session read back identically in another.
//!
//! A driver error becomes a [`DbError`] here (its class decided by SQLSTATE, see [`classify`]),
//! with the caller's context; nothing here knows jobs, chunks or the engine's schema, and no
//! error is classified by its message text.

mod target;
mod timeouts;
mod tls;
mod visibility;

pub use target::{SslMode, Target};
pub use timeouts::{Limit, Timeouts};
pub use visibility::{StatsAccess, STATS_ROLE};

pub use crate::error::{describe, DbError, ErrorClass};

use crate::error::{DbCause, Error};
use std::time::Duration;
use tokio_postgres::error::SqlState;

/// How long the pool waits for a free connection before failing.
const POOL_WAIT: Duration = Duration::from_secs(30);

pub type Pool = deadpool_postgres::Pool;

/// The SQLSTATE of a server error, if the error came from the server.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(SqlState::code)
}

/// The class of a driver error: by SQLSTATE when the server sent one; without one, the error is
/// the client's, and only a failure of the connection itself (the socket's I/O, or a connection
/// already closed) is [`ErrorClass::Connection`] — a value the driver cannot encode, a row it
/// cannot decode or a bad configuration is [`ErrorClass::Fatal`], as retrying cannot fix it.
pub fn classify(e: &tokio_postgres::Error) -> ErrorClass {
    let Some(code) = sqlstate(e) else {
        return if e.is_closed() || transport_failed(e) {
            ErrorClass::Connection
        } else {
            ErrorClass::Fatal
        };
    };
    match code {
        "40001" | "40P01" | "55P03" => ErrorClass::Contention,
        "57014" => ErrorClass::Timeout,
        "57P01" | "57P02" | "57P03" | "53300" => ErrorClass::Connection,
        c if c.starts_with("08") => ErrorClass::Connection,
        "P0001" => ErrorClass::Data,
        c if ["22", "23", "2F", "38", "39", "44"]
            .iter()
            .any(|class| c.starts_with(class)) =>
        {
            ErrorClass::Data
        }
        _ => ErrorClass::Fatal,
    }
}

/// True when the driver error comes from the socket: an I/O error among its causes that is not
/// about the bytes themselves (the driver reports a message it cannot encode or parse as invalid
/// input or data, wrapped the same way as a reset connection).
fn transport_failed(e: &tokio_postgres::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{InvalidData, InvalidInput};
            return !matches!(io.kind(), InvalidInput | InvalidData);
        }
        cause = c.source();
    }
    false
}

/// What an operator should do about a failure that retrying cannot fix.
pub fn advice(code: Option<&str>) -> &'static str {
    match code {
        Some("25006") => "the server is read-only: a standby, or the old primary after a failover; point --database-url at the primary",
        Some("42501") => "permission denied: grant the running role what the job's statement needs on the table (see `backfill init --grant-to` for the engine's own schema)",
        Some("42P01") => "a table is missing: was it dropped or renamed while the job ran? check `table` and `sql` in the job file",
        Some("42703") => "a column is missing: is the expand migration applied? check the job's `sql`",
        Some("53100") => "the server's disk is full: free space (or grow the volume), then run again",
        Some("53200") => "the server ran out of memory: retry with a smaller --chunk-rows",
        Some(c) if c.starts_with("42") => "the job's SQL is invalid for this database: fix `sql` in the job file (`backfill check` validates the file offline)",
        _ => "fix the cause, then run again",
    }
}

/// Wraps a database error with what was being done: its class (see [`classify`]) decides the
/// variant — a lost connection or an unreachable server becomes [`Error::Unavailable`], which
/// callers may wait out — and a fatal one carries the advice for its SQLSTATE.
pub fn error(e: tokio_postgres::Error, context: impl std::fmt::Display) -> Error {
    database_error(e).with_context(context).into_error()
}

/// The structured form of a driver error: class, SQLSTATE, the error itself, and for a failure
/// that retrying cannot fix, what to do about it.
pub fn database_error(e: tokio_postgres::Error) -> DbError {
    let class = classify(&e);
    let advice = (class == ErrorClass::Fatal).then(|| advice(sqlstate(&e)));
    let d = DbError::driver(e, class);
    match advice {
        Some(a) => d.with_advice(a),
        None => d,
    }
}

/// Server-side settings applied to every new session after it connects.
async fn prepare_session(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    if version >= 140000 {
        // Lets the server notice within seconds that a killed runner is gone, so a zombie
        // statement does not keep its row locks until it finishes on its own.
        client
            .batch_execute("SET client_connection_check_interval = '2s'")
            .await?;
    }
    Ok(())
}

impl Target {
    fn connect_error(&self, e: tokio_postgres::Error) -> Error {
        // Refused, reset, starting up, too many connections: worth waiting for. A wrong password
        // or a missing database is not.
        let class = classify(&e);
        DbError::driver(e, class)
            .with_context(format!("cannot connect to {}", self.describe()))
            .with_advice("check --database-url / DATABASE_URL or the PG* variables, and that the server is up")
            .into_error()
    }

    /// One dedicated connection (not from the pool), for session-scoped work such as the lease.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, Error> {
        let limit = self.connect_timeout() * 2;
        let attempt = self.config.connect(self.tls.clone());
        let (client, connection) = match tokio::time::timeout(limit, attempt).await {
            Ok(r) => r.map_err(|e| self.connect_error(e))?,
            Err(_) => {
                return Err(DbError {
                    class: ErrorClass::Connection,
                    sqlstate: None,
                    cause: DbCause::NoAnswer(limit),
                    context: vec![format!("cannot connect to {}", self.describe())],
                    advice: Some("check the host, port and network".into()),
                }
                .into_error())
            }
        };
        tokio::spawn(async move {
            let _ = connection.await;
        });
        prepare_session(&client)
            .await
            .map_err(|e| self.connect_error(e))?;
        Ok(client)
    }

    /// A pool of up to `size` connections with bounded waits everywhere. Creating a pool never
    /// connects, so callers check it once with [`check_pool`].
    pub fn pool(&self, size: usize) -> Result<Pool, Error> {
        use deadpool_postgres::{
            Hook, HookError, Manager, ManagerConfig, RecyclingMethod, Runtime,
        };
        let manager = Manager::from_config(
            self.config.clone(),
            self.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        deadpool_postgres::Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(self.connect_timeout() * 2))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .post_create(Hook::async_fn(|client, _| {
                Box::pin(async move { prepare_session(client).await.map_err(HookError::Backend) })
            }))
            .build()
            .map_err(|e| Error::Runtime(format!("cannot create the connection pool: {e}")))
    }

    /// Takes a connection from the pool, with an operator-readable error.
    pub async fn get(&self, pool: &Pool) -> Result<deadpool_postgres::Object, Error> {
        pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => self.connect_error(e),
            deadpool_postgres::PoolError::PostCreateHook(
                deadpool_postgres::HookError::Backend(e),
            ) => self.connect_error(e),
            other => Error::Runtime(format!(
                "cannot get a connection to {}: {other}",
                self.describe()
            )),
        })
    }

    /// Asks the server to cancel whatever the session behind `token` is running. Best effort,
    /// bounded: the caller keeps awaiting its query, which then fails with SQLSTATE 57014.
    pub async fn cancel(&self, token: &tokio_postgres::CancelToken) {
        let _ = tokio::time::timeout(self.connect_timeout(), token.cancel_query(self.tls.clone()))
            .await;
    }
}
