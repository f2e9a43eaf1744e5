//! A run's start-up and the connections it makes outside its workers: the engine's schema, the
//! key against the catalog, joining the job (or re-attaching to it after an outage), fixing the
//! job's key range and row estimate on its first run, and connecting patiently while the
//! database is away. Must not run chunks or decide anything about a chunk's failure.

use super::recovery::{reconnect_pause, RECONNECT_POLL_MAX};
use super::{RunOptions, Tally};
use crate::db::{self, ErrorClass, Target};
use crate::error::{Error, NextRun, Result, StartGaveUp, StoppedUnrecorded};
use crate::events::{Event, Listener};
use crate::hold::HoldReason;
use crate::job::JobSpec;
use crate::keyset::{show_key, KeyValue, Keyset};
use crate::signals::Shutdown;
use crate::state::RunEnd;
use crate::store::{self, Claim, Runner, Store};
use std::time::{Duration, Instant};

/// After a stop, how long recording the run's end may wait for the database to answer: a stop
/// must not wait out `reconnect_for`; a run whose end is not recorded is taken over anyway.
const STOP_CONNECT_WITHIN: Duration = Duration::from_secs(3);

/// What a run's start-up established.
pub(super) struct Started {
    /// The session the run's lease lives on (handed to the heartbeat).
    pub(super) lease: tokio_postgres::Client,
    pub(super) keyset: Keyset,
    pub(super) run_id: i64,
    /// The job's checkpoint as it was when the run joined.
    pub(super) checkpoint: store::Checkpoint,
    /// The job's row estimate.
    pub(super) total: Option<i64>,
    /// The job's unresolved failing keys when the run joined.
    pub(super) failing_keys: i64,
}

pub(super) enum Start {
    Owned(Box<Started>),
    AlreadyDone(Box<store::Checkpoint>),
}

/// The start-up: the engine's schema, the key against the catalog, joining the job, its key
/// range. A lost connection or an unreachable server is waited out as in the chunk loop (for up
/// to `--reconnect-for`, "waiting for database"), then the start-up goes on from the top on a new
/// session; a run already joined is re-attached to it rather than joined twice.
pub(super) async fn start(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    opts: &RunOptions,
    workers: u32,
    shutdown: &Shutdown,
    events: &dyn Listener,
) -> Result<Start> {
    let name = job.name.as_str();
    let mut joined = None;
    let mut outage: Option<Instant> = None;
    loop {
        let lost = match start_once(target, store, job, opts, workers, events, &mut joined).await {
            Err(Error::Unavailable(why)) => why,
            done => {
                if outage.is_some() {
                    events.on(Event::BackWhileStarting);
                }
                return done;
            }
        };
        let since = *outage.get_or_insert_with(|| {
            events.on(Event::LostWhileStarting {
                error: &lost.to_string(),
                patience: opts.reconnect_for,
            });
            Instant::now()
        });
        if since.elapsed() >= opts.reconnect_for {
            return Err(Error::StartGaveUp(Box::new(StartGaveUp {
                job: name.to_string(),
                waited: since.elapsed(),
                last: lost,
            })));
        }
        events.on(Event::WaitingForDatabase);
        let pause = reconnect_pause(since.elapsed());
        shutdown.sleep(pause).await;
        events.on(Event::Held {
            reason: HoldReason::DatabaseUnavailable,
            time: pause,
        });
        if shutdown.stop_requested() {
            return Err(Error::Interrupted(format!(
                "job {name}: stopped while waiting for the database to start the run; nothing was processed by this run: `backfill run {name}` starts it again"
            )));
        }
    }
}

/// One attempt at the start-up, on a new session. `joined` keeps the run (and the checkpoint it
/// saw) once the job is joined, for the next attempt.
pub(super) async fn start_once(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    opts: &RunOptions,
    workers: u32,
    events: &dyn Listener,
    joined: &mut Option<(i64, store::Checkpoint)>,
) -> Result<Start> {
    let name = job.name.as_str();
    let mut lease = target.connect().await?;
    store.ensure(&mut lease).await?;
    let keyset = Keyset::resolve(&lease, job).await?;
    let attached = match joined.as_ref() {
        Some((run_id, _)) => store
            .reattach(&lease, *run_id)
            .await
            .map_err(|e| db::error(e, format!("job {name}: re-attaching run {run_id}")))?,
        None => false,
    };
    let (run_id, checkpoint) = match joined.take() {
        Some(run) if attached => run,
        earlier => {
            if let Some((run_id, _)) = earlier {
                // Declared gone meanwhile: its ranges may be someone else's now.
                events.on(Event::Rejoining { run_id });
            }
            let runner = Runner::this_process();
            let claim = store
                .claim(
                    &mut lease,
                    job,
                    &runner,
                    workers,
                    opts.allow_changed_definition,
                )
                .await?;
            match claim {
                Claim::Owned { run_id, checkpoint } => (run_id, checkpoint),
                Claim::AlreadyDone(c) => return Ok(Start::AlreadyDone(Box::new(c))),
            }
        }
    };
    *joined = Some((run_id, checkpoint.clone()));
    store
        .publish_throttle_flags(
            &lease,
            run_id,
            &store::ThrottleFlags::given(opts.rows_per_second, opts.target_chunk_time, opts.pause),
        )
        .await?;
    let failing_keys = store.failing_keys(&lease, name).await?;
    match key_range(&mut lease, store, job, &keyset, events).await {
        Ok(total) => Ok(Start::Owned(Box::new(Started {
            lease,
            keyset,
            run_id,
            checkpoint,
            total,
            failing_keys,
        }))),
        // Waited out by the caller, which comes back with the same run.
        Err(e @ Error::Unavailable(_)) => Err(e),
        Err(e) => {
            let _ = store
                .finish(
                    &lease,
                    name,
                    run_id,
                    RunEnd::Failed,
                    Some(&e.to_string()),
                    None,
                )
                .await;
            Err(e)
        }
    }
}

/// Fixes the job's key range on its first run (under the job's row lock, so runs starting
/// together agree): the greatest key now in the table, and the number of rows to process.
/// Returns the row estimate.
async fn key_range(
    lease: &mut tokio_postgres::Client,
    store: &Store,
    job: &JobSpec,
    keyset: &Keyset,
    events: &dyn Listener,
) -> Result<Option<i64>> {
    let name = &job.name;
    let err = |e| {
        db::error(
            e,
            format!("job {name}: finding the last key of {}", job.table),
        )
    };
    let tx = lease.transaction().await.map_err(err)?;
    let (taken, _, total) = store.lock_bound(&tx, name).await?;
    crate::undo::ensure_table(&tx, store, job).await?;
    if taken {
        tx.commit().await.map_err(err)?;
        return Ok(total);
    }
    // Rows inserted after this moment, beyond the bound, are left to the application (which
    // writes new rows correctly once the expand step is deployed) and to `verify`.
    let upper: Option<KeyValue> = tx
        .query_opt(&keyset.last_key_sql(), &[])
        .await
        .map_err(err)?
        .map(|r| r.get(0));
    let (total, exact) = estimate_rows(&tx, job, EXACT_COUNT_WITHIN)
        .await
        .map_err(|e| {
            db::error(
                e,
                format!("job {name}: estimating the rows of {}", job.table),
            )
        })?;
    if total.is_none() {
        events.on(Event::NoEstimate {
            table: &job.table.to_string(),
        });
    }
    store
        .set_bound(&tx, name, upper.as_ref(), total, exact)
        .await?;
    tx.commit().await.map_err(err)?;
    events.on(Event::KeyRange {
        table: &job.table.to_string(),
        upper: upper.as_ref().map(|u| show_key(u)).as_deref(),
        rows: total,
    });
    Ok(total)
}

/// Connects, retrying for up to `patience` while the database is unreachable (not when it
/// refuses us: a wrong password does not get better by waiting). Once a stop is requested it
/// waits for nothing: one attempt of at most `STOP_CONNECT_WITHIN`, then the error (the caller
/// says what could not be recorded).
pub(super) async fn connect_patiently(
    target: &Target,
    patience: Duration,
    events: &dyn Listener,
    shutdown: &Shutdown,
) -> Result<tokio_postgres::Client> {
    let since = Instant::now();
    loop {
        let stopping = shutdown.stop_requested();
        let attempt = if stopping {
            tokio::time::timeout(STOP_CONNECT_WITHIN, target.connect())
                .await
                .ok()
        } else {
            // A stop requested during a slow connect (an unreachable host) ends the wait.
            tokio::select! {
                r = target.connect() => Some(r),
                _ = shutdown.sleep(patience) => None,
            }
        };
        let gave_up = stopping || since.elapsed() >= patience;
        match attempt {
            Some(Ok(c)) => return Ok(c),
            Some(Err(e @ Error::Unavailable(_))) if gave_up => return Err(e),
            Some(Err(Error::Unavailable(_))) | None if !gave_up => {
                events.on(Event::WaitingForDatabase);
                let t = Instant::now();
                shutdown.sleep(RECONNECT_POLL_MAX).await;
                events.on(Event::Held {
                    reason: HoldReason::DatabaseUnavailable,
                    time: t.elapsed(),
                });
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(Error::Runtime(format!(
                    "{} did not answer within {}s",
                    target.describe(),
                    if stopping {
                        STOP_CONNECT_WITHIN
                    } else {
                        patience
                    }
                    .as_secs()
                )))
            }
        }
    }
}

/// The error of a run stopped (signal or `backfill cancel`) while the database was unreachable:
/// every chunk it committed is saved with its checkpoint, but its end could not be recorded, so
/// the next run finds it gone (history: `abandoned`) and takes over at once.
pub(super) fn stopped_unrecorded(
    job: &JobSpec,
    why: Error,
    tally: &Tally,
    at_start: &store::Checkpoint,
    workers: u32,
) -> Error {
    let next = match (&tally.last, &at_start.cursor) {
        _ if workers > 1 || at_start.ranges.len() > 1 => NextRun::EachRange,
        (Some(k), _) | (None, Some(k)) => NextRun::AfterKey(show_key(k)),
        (None, None) => NextRun::FirstKey,
    };
    Error::StoppedUnrecorded(Box::new(StoppedUnrecorded {
        job: job.name.clone(),
        rows: tally.rows,
        chunks: tally.chunks,
        next,
        why,
    }))
}

/// How long the exact count of a job's rows may take before an estimate is used instead.
pub const EXACT_COUNT_WITHIN: Duration = Duration::from_secs(3);

/// The rows of the job's table, and whether the number is exact: counted when that takes less
/// than `exact_within`, else the planner's estimate, else (a table never analyzed) the rows per
/// page of a 1 % page sample times the table's pages. Workers split ranges by these numbers, so "unknown" would leave one range.
/// A lost connection is an error, not "no estimate": the caller waits for the database and
/// tries again (taking it for a table never analyzed would misreport it and go on with a dead
/// session).
pub async fn estimate_rows(
    tx: &tokio_postgres::Transaction<'_>,
    job: &JobSpec,
    exact_within: Duration,
) -> Result<(Option<i64>, bool), tokio_postgres::Error> {
    let table = job.table.quoted();
    let lost = |e: &tokio_postgres::Error| db::classify(e) == ErrorClass::Connection;
    // In a savepoint: the timeout and a cancelled count end with it, the caller's work stays.
    let count = |sql: String, within: Duration| async move {
        let timeout = db::Timeouts {
            statement: Some(db::Limit::Within(within)),
            ..Default::default()
        };
        tx.batch_execute(&format!("SAVEPOINT bf_count; {}", timeout.set_local()))
            .await?;
        let r = tx.query_one(&sql, &[]).await;
        tx.batch_execute("ROLLBACK TO SAVEPOINT bf_count").await?;
        r
    };
    match count(format!("SELECT count(*) FROM {table}"), exact_within).await {
        Ok(row) => return Ok((Some(row.get(0)), true)),
        Err(e) if lost(&e) => return Err(e),
        Err(_) => {} // too slow: estimate instead
    }
    let planner = tx
        .query_one(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)",
            &[&table],
        )
        .await;
    match planner.map(|r| r.get::<_, i64>(0)) {
        Ok(n) if n >= 0 => return Ok((Some(n), false)),
        Err(e) if lost(&e) => return Err(e),
        _ => {} // never analyzed
    }
    // A hundredth of the pages: quick where the full count was not. The number of pages SYSTEM
    // picks varies a lot on a small table (a 1,600-page table gets 16 ± 4), the rows on a page
    // do not: rows per sampled page times the table's pages.
    let pages = match tx
        .query_one(
            "SELECT pg_relation_size(to_regclass($1)) / current_setting('block_size')::bigint",
            &[&table],
        )
        .await
    {
        Ok(row) => row.get::<_, i64>(0),
        Err(e) if lost(&e) => return Err(e),
        Err(_) => return Ok((None, false)),
    };
    let sql = format!(
        "SELECT count(*), count(DISTINCT (ctid::text::point)[0]) FROM {table} TABLESAMPLE SYSTEM (1)"
    );
    match count(sql, EXACT_COUNT_WITHIN).await {
        Ok(row) => {
            let (rows, pages_seen): (i64, i64) = (row.get(0), row.get(1));
            let estimate = match pages_seen {
                0 => 0,
                seen => (rows as f64 / seen as f64 * pages as f64).round() as i64,
            };
            Ok((Some(estimate), false))
        }
        Err(e) if lost(&e) => Err(e),
        Err(_) => Ok((None, false)),
    }
}
