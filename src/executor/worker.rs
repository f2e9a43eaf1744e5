//! One worker's walk: take a key range, run its chunks one after another (`chunk::run`), book
//! what committed, and carry out the recovery policy's action after a failure (`recovery`). Must
//! not build or send a chunk's statements itself, nor decide what a failure means.

use super::chunk::{self, ChunkDone, NextChunk, Step};
use super::failure::{failed, Failure};
use super::recovery::{self, Action, Problem, Situation, Span, Stop, RETRY_BACKOFF};
use super::{LoopEnd, Shared, Tally};
use crate::db::{self, ErrorClass, Target};
use crate::error::{ChunkCause, ChunkStop, Error, Result, Resume, StopReason};
use crate::events::Event;
use crate::hold::HoldReason;
use crate::keyset::{show_key, KeyValue};
use crate::signals::Shutdown;
use crate::store::{Acquired, Poison, RangeLease, Splitter};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often a worker with nothing to take looks again (for a range freed by a runner that died).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// A range is split only when at least this many chunks are left in it.
const SPLIT_MIN_CHUNKS: i64 = 2;

/// One worker's walk: the range it holds and its own connection and failure state.
pub(super) struct Worker<'s, 'a> {
    pub(super) shared: &'s Shared<'a>,
    pub(super) id: i32,
    pub(super) conn: Option<deadpool_postgres::Object>,
    pub(super) range: Option<RangeLease>,
    /// The last key this worker committed in its range (for messages).
    pub(super) cursor: Option<KeyValue>,
    /// The next chunk's bounds, as the last committed chunk found them.
    pub(super) next: Option<NextChunk>,
    /// Keys per chunk now.
    pub(super) limit: i64,
    /// Keys still inside a range that failed at a larger size; the size is restored after them.
    pub(super) narrow_left: i64,
    /// Consecutive failed attempts at the same chunk.
    pub(super) attempt: u32,
    /// When the database became unreachable, while it is.
    pub(super) outage: Option<Instant>,
    /// While the worker's chunk keeps meeting lock contention.
    pub(super) contention: Option<Contention>,
    pub(super) tally: Tally,
}

/// A chunk that keeps meeting lock contention (reset when a chunk commits).
pub(super) struct Contention {
    pub(super) since: Instant,
    /// The hold reason: lock contention on the chunk first met.
    pub(super) reason: crate::hold::Hold,
    /// When it started, as shown: "since T".
    pub(super) since_utc: String,
    pub(super) logged: Instant,
    /// From when the time held is not booked on the metrics yet.
    pub(super) unbooked: Instant,
}

impl<'s, 'a> Worker<'s, 'a> {
    pub(super) fn new(shared: &'s Shared<'a>, id: i32, limit: i64) -> Self {
        Worker {
            shared,
            id,
            conn: None,
            range: None,
            cursor: None,
            next: None,
            limit,
            narrow_left: 0,
            attempt: 0,
            outage: None,
            contention: None,
            tally: Tally::default(),
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.shared.job.name
    }

    /// Walks ranges until none is left, a stop, or a failure; then lets its range go.
    pub(super) async fn drive(mut self) -> (Result<LoopEnd>, Tally) {
        let end = self.walk().await;
        if end.is_err() {
            self.shared.aborted.store(true, Ordering::SeqCst);
        }
        if let (Some(range), Some(conn)) = (self.range.take(), self.conn.as_ref()) {
            if !conn.is_closed() {
                let _ = self
                    .shared
                    .store
                    .release(&***conn, self.name(), &range)
                    .await;
            }
        }
        (end, self.tally)
    }

    pub(super) async fn walk(&mut self) -> Result<LoopEnd> {
        let name = self.name().to_string();
        loop {
            if self.shared.shutdown.stop_requested() || self.shared.aborted.load(Ordering::SeqCst) {
                return Ok(LoopEnd::Stopped);
            }
            if self.shared.lease.is_lost() {
                return Err(Error::run_lost(&name));
            }
            match self.read_controls().await {
                Ok(true) => return Ok(LoopEnd::Cancelled),
                Ok(false) => {}
                Err(f) => {
                    self.recover(f).await?;
                    continue;
                }
            }
            if self.range.is_none() {
                match self.acquire().await {
                    Ok(Acquired::Range(r)) => {
                        self.range = Some(r);
                        self.cursor = None;
                        self.next = None;
                    }
                    Ok(Acquired::Wait) => {
                        tokio::select! {
                            _ = self.shared.shutdown.sleep(IDLE_POLL) => {}
                            _ = self.shared.range_finished.notified() => {}
                        }
                        continue;
                    }
                    Ok(Acquired::AllDone) => return Ok(LoopEnd::Finished),
                    Err(f) => {
                        self.recover(f).await?;
                        continue;
                    }
                }
            }
            // Checked once a range is held: when every range is done the run finishes instead.
            if let Some(limit) = self.shared.limit_reached() {
                return Ok(LoopEnd::LimitReached(limit));
            }
            if self.hold_while_unhealthy().await? {
                // Bounds found before a hold may be far behind the table by its end.
                self.next = None;
                continue;
            }
            self.sample_replication_lag().await;
            let bucket = {
                let pace = self.shared.pace.lock().await;
                if self.narrow_left == 0 {
                    self.limit = pace.throttle.chunk_rows();
                }
                pace.throttle.bucket()
            };
            if let Some(bucket) = bucket {
                let waited = bucket.admit(self.limit).await;
                self.shared.emit(Event::Held {
                    reason: HoldReason::RateLimit,
                    time: waited,
                });
            }
            match self.step().await {
                Ok(Step::Committed(done)) => {
                    let rest = self.committed(done).await;
                    if !rest.is_zero() {
                        self.shared.shutdown.sleep(rest).await;
                        self.shared.emit(Event::Held {
                            reason: HoldReason::Pause,
                            time: rest,
                        });
                    }
                }
                Ok(Step::RangeDone) => {
                    self.contention_over().await;
                    self.range = None;
                    self.shared.range_finished.notify_waiters();
                }
                Err(f) => {
                    if self.shared.shutdown.cancel_requested() && f.sqlstate() == Some("57014") {
                        return Ok(LoopEnd::Stopped);
                    }
                    self.recover(f).await?;
                }
            }
        }
    }

    /// A connection from the run's pool (a new one after a failure closed the old).
    pub(super) async fn connection(&mut self) -> Result<&mut deadpool_postgres::Object, Failure> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = None;
            // Found on the connection that is gone: its statements are prepared anew.
            self.next = None;
            let conn = self.shared.pool.get().await.map_err(|e| Failure {
                problem: Problem::Db(ErrorClass::Connection),
                cause: match e {
                    deadpool_postgres::PoolError::Backend(e) => {
                        ChunkCause::driver(e, ErrorClass::Connection)
                    }
                    other => ChunkCause::Pool(other.to_string()),
                },
                stage: "connecting",
                range: None,
                keys: None,
            })?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Looks for a range to work on: a free one, or half of the busiest.
    pub(super) async fn acquire(&mut self) -> Result<Acquired, Failure> {
        let shared = self.shared;
        let min_keys = SPLIT_MIN_CHUNKS * shared.pace.lock().await.throttle.chunk_rows();
        let (run_id, worker) = (shared.run_id, self.id);
        let conn = self.connection().await?;
        let splitter = Splitter {
            keyset: shared.keyset,
            min_keys,
        };
        let got = shared
            .store
            .acquire(conn, &shared.job.name, run_id, worker, &splitter)
            .await
            .map_err(failed("claiming a key range", None))?;
        if let Acquired::Range(r) = &got {
            if r.id > 0 || shared.opts.workers > 1 {
                shared.emit(Event::RangeTaken {
                    worker,
                    range: r.id,
                });
            }
        }
        Ok(got)
    }

    /// One attempt at the next chunk of the worker's range.
    pub(super) async fn step(&mut self) -> Result<Step, Failure> {
        let shared = self.shared;
        let range = self.range.expect("a range is held");
        let limit = self.limit;
        let next = self.next.take();
        let conn = self.connection().await?;
        let token = conn.cancel_token();
        let chunk = chunk::run(conn, &shared.chunk, &range, limit, next);
        cancellable(chunk, &token, shared.target, shared.shutdown).await
    }

    /// Books a committed chunk and adapts the pace; returns the rest to take before the next.
    pub(super) async fn committed(&mut self, mut done: Box<ChunkDone>) -> Duration {
        let shared = self.shared;
        // The size this chunk ran with, before `passed` may restore the configured one.
        let size = self.limit.max(0) as u64;
        self.next = done.next.take();
        self.attempt = 0;
        self.contention_over().await;
        if self.outage.take().is_some() {
            shared.emit(Event::DatabaseBack);
        }
        self.tally.rows += done.keys;
        shared.committed_keys.fetch_add(done.keys, Ordering::SeqCst);
        self.tally.affected += done.affected;
        self.tally.chunks += 1;
        self.tally.round_trips += i64::from(done.round_trips);
        let mut pace = shared.pace.lock().await;
        if done.blocked > 0 {
            let size = pace.throttle.shrink();
            shared.emit(Event::Yielded {
                blocked: done.blocked,
                size,
            });
        } else if self.narrow_left == 0 {
            pace.throttle.adapt(done.keys, done.asked, done.work);
        }
        let rest = pace.throttle.rest(done.work);
        drop(pace);
        self.tally.last = Some(done.last.clone());
        self.cursor = Some(done.last);
        self.passed(done.keys).await;
        shared.emit(Event::ChunkCommitted {
            size,
            keys: done.keys as u64,
            changed: done.affected.max(0) as u64,
            took: done.took,
            round_trips: done.round_trips,
        });
        if let Some(n) = shared.lease.job_rows_done() {
            shared.emit(Event::JobRowsDone(n.max(0) as u64));
        }
        rest
    }

    /// Counts keys passed inside a narrowed range; past it, the configured size returns.
    pub(super) async fn passed(&mut self, keys: i64) {
        if self.narrow_left > 0 {
            self.narrow_left -= keys;
            if self.narrow_left <= 0 {
                self.narrow_left = 0;
                self.limit = self.shared.pace.lock().await.throttle.chunk_rows();
                self.shared.emit(Event::ChunkSize(self.limit as u64));
            }
        }
    }

    /// What the recovery policy sees of a failed attempt now.
    pub(super) fn situation(&self, f: &Failure) -> Situation {
        let shared = self.shared;
        Situation {
            problem: f.problem,
            span: match (&f.range, f.keys) {
                (Some((a, b)), _) if a == b => Span::Single,
                (Some(_), keys) => Span::Several {
                    keys: keys.unwrap_or(0),
                },
                (None, _) => Span::Unknown,
            },
            stopping: shared.shutdown.stop_requested(),
            attempts: self.attempt,
            max_attempts: shared.opts.max_attempts,
            outage: self.outage.map(|since| since.elapsed()),
            reconnect_for: shared.opts.reconnect_for,
            contention: self.contention.as_ref().map(|c| c.since.elapsed()),
            contention_budget: shared.contention_budget(),
            on_error: shared.job.on_error,
        }
    }

    /// Carries out what the recovery policy (`recovery::decide`) says about a failed attempt;
    /// Ok to try again, Err to stop the run.
    pub(super) async fn recover(&mut self, f: Failure) -> Result<()> {
        let shared = self.shared;
        let resume = match (&self.range, &self.cursor) {
            (_, Some(c)) => Resume::AfterKey(show_key(c)),
            (Some(r), None) => Resume::AtRangeCursor(r.id.into()),
            (None, None) => Resume::WhereItStopped,
        };
        let where_ = match &f.range {
            Some((a, b)) if a == b => format!("key {}", show_key(a)),
            Some((a, b)) => format!("keys {}..={}", show_key(a), show_key(b)),
            None => format!("the chunk {resume}"),
        };
        let text = f.text();
        if let Some(class) = f.class().filter(|c| *c != ErrorClass::Fatal) {
            shared.emit(Event::AttemptFailed {
                class: class.label(),
            });
        }
        match recovery::decide(&self.situation(&f)) {
            // Stopping: nothing is in flight any more (the chunk failed), so there is nothing to
            // wait for; the caller's loop ends the walk.
            Action::LetGo => {
                shared.emit(Event::LostWhileStopping {
                    stage: f.stage,
                    error: &text,
                });
                self.conn = None;
                Ok(())
            }
            Action::Reconnect { pause } => {
                if self.outage.is_none() {
                    self.outage = Some(Instant::now());
                    shared.emit(Event::DatabaseLost {
                        stage: f.stage,
                        error: &text,
                        patience: shared.opts.reconnect_for,
                    });
                }
                shared.emit(Event::WaitingForDatabase);
                self.conn = None;
                shared.shutdown.sleep(pause).await;
                shared.emit(Event::Held {
                    reason: HoldReason::DatabaseUnavailable,
                    time: pause,
                });
                Ok(())
            }
            Action::Narrow { to, keys } => {
                self.limit = to;
                self.narrow_left = self.narrow_left.max(keys);
                shared.emit(Event::ChunkSize(self.limit as u64));
                shared.emit(Event::Narrowed {
                    chunk: &where_,
                    stage: f.stage,
                    error: &text,
                    size: self.limit,
                });
                Ok(())
            }
            Action::Skip => {
                let (key, _) = f.range.clone().expect("a single-key chunk has a range");
                self.skip(&key, &f).await
            }
            Action::OutlastContention { attempt, at_most } => {
                self.attempt = attempt;
                self.outlast_contention(&f, &where_, RETRY_BACKOFF.delay(attempt).min(at_most))
                    .await;
                Ok(())
            }
            Action::RetryAfterBackoff { attempt } => {
                self.attempt = attempt;
                let delay = RETRY_BACKOFF.delay(attempt);
                shared.emit(Event::Retrying {
                    chunk: &where_,
                    stage: f.stage,
                    error: &text,
                    delay,
                    attempt,
                    max_attempts: shared.opts.max_attempts,
                });
                shared.shutdown.sleep(delay).await;
                shared.emit(Event::Held {
                    reason: HoldReason::RetryBackoff,
                    time: delay,
                });
                Ok(())
            }
            Action::Stop(stop) => {
                if let (Stop::ContentionBudget, Some(c)) = (stop, &self.contention) {
                    // The failed attempt waited for the lock: that is time held too.
                    shared.emit(Event::Held {
                        reason: HoldReason::LockContention,
                        time: c.unbooked.elapsed(),
                    });
                }
                Err(self.stop_error(stop, f, resume))
            }
        }
    }

    /// The error a run ends with, saying where the next run resumes.
    pub(super) fn stop_error(&self, stop: Stop, f: Failure, resume: Resume) -> Error {
        let why = match stop {
            Stop::Lost => return Error::run_lost(self.name()),
            Stop::Stalled => StopReason::Stalled,
            Stop::Unreachable => StopReason::Unreachable {
                for_: self.outage.map(|since| since.elapsed()).unwrap_or_default(),
            },
            Stop::ContentionBudget => StopReason::ContentionBudget {
                for_: (self.contention.as_ref())
                    .map(|c| c.since.elapsed())
                    .unwrap_or_default(),
                budget: self.shared.contention_budget(),
            },
            Stop::Attempts(attempts) => StopReason::Attempts(attempts),
            // The key and the error go to the checkpoint's last_error and the run's history;
            // the failures table holds only skipped keys, which nothing else would revisit.
            Stop::PoisonKey => StopReason::PoisonKey,
            Stop::Fatal => StopReason::Fatal,
        };
        let advice = (why == StopReason::Fatal).then(|| db::advice(f.sqlstate()));
        Error::ChunkStopped(Box::new(ChunkStop {
            job: self.name().to_string(),
            why,
            stage: f.stage,
            chunk: f.range.map(|(a, b)| (show_key(&a), show_key(&b))),
            resume,
            cause: f.cause,
            advice,
        }))
    }

    /// A data error at one key with `on_error = "skip"`: record it and move past it.
    pub(super) async fn skip(&mut self, key: &KeyValue, f: &Failure) -> Result<()> {
        let shared = self.shared;
        let name = self.name().to_string();
        let message = f.text();
        let poison = Poison {
            key,
            sqlstate: f.sqlstate(),
            message: &message,
        };
        let range = self.range.expect("a range is held");
        let conn = match self.connection().await {
            Ok(c) => c,
            Err(_) => return Ok(()), // retried from the top once the database answers
        };
        let newly_failing =
            match chunk::skip_key(conn, &shared.chunk, shared.store, &range, &poison).await {
                Ok(chunk::Skip::Skipped { newly_failing }) => newly_failing,
                Ok(chunk::Skip::RangeLost) => return Err(Error::run_lost(&name)),
                // Nothing was committed: the chunk is tried again from the cursor (and
                // narrowed to this key again) once the lock or the database is back.
                Err(e)
                    if matches!(
                        db::classify(&e),
                        ErrorClass::Contention | ErrorClass::Connection
                    ) =>
                {
                    shared.emit(Event::SkipInterrupted {
                        key: &show_key(key),
                        error: &db::describe(&e),
                    });
                    return Ok(());
                }
                Err(e) => {
                    return Err(db::error(
                        e,
                        format!("job {name}: recording the failure at key {}", show_key(key)),
                    ))
                }
            };
        shared.emit(Event::Skipped {
            key: &show_key(key),
            error: &message,
            newly_failing,
        });
        self.cursor = Some(key.clone());
        self.tally.skipped += 1;
        self.passed(1).await;
        Ok(())
    }
}

/// Awaits `fut`; if a cancel is requested meanwhile, asks the server to cancel the session's
/// statement and keeps awaiting, so the transaction ends cleanly (dropping the future would not
/// stop the server and could leave the transaction half-open).
pub(super) async fn cancellable<T>(
    fut: impl std::future::Future<Output = T>,
    token: &tokio_postgres::CancelToken,
    target: &Target,
    shutdown: &Shutdown,
) -> T {
    tokio::pin!(fut);
    tokio::select! {
        r = &mut fut => return r,
        _ = shutdown.cancelled() => {}
    }
    target.cancel(token).await;
    fut.await
}
