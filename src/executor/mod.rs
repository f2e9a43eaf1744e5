//! The run of a job. A run joins the job (alongside any other live runs, on any host), fixes the
//! job's key range on its first run, and starts its workers; each worker takes a key range (see
//! `store::ranges`: a free one, or half of the busiest) and walks it chunk by chunk. When no
//! range is left, the run verifies (and sweeps), then records its outcome. [`run`] reads as that
//! sequence; each step lives in its own module:
//!
//! - `start`: join the job, fix its key range and row estimate, connect patiently;
//! - `worker`: one worker's walk, and carrying out the recovery policy's action after a failure;
//! - `chunk`: one chunk's transaction top to bottom, in two round trips — every statement it
//!   sends, built once per run in a `ChunkPlan` — and the exactly-once rule it enforces;
//! - `failure`: a failed attempt (`Failure`) and how a driver error becomes one, with the
//!   statement cache's stale-plan rule;
//! - `recovery`: the pure recovery policy (failure × attempts × narrowing → action);
//! - `pace`: what the workers share — rate ceiling, adaptive chunk size, health holds, live
//!   controls — and why the run is held;
//! - `verify`: verify and sweep; `retry`: `backfill retry-failures`; `options`: the run's flags.
//!
//! The run tells the world what happens as typed events (`crate::events`) to a listener
//! (telemetry's progress display, log lines and metrics), which writes the sentences; a hold is a
//! typed `crate::hold::Hold` whose one `Display` is also what `status` stores. What the run still
//! writes as text itself: the errors it ends with, why rows that verify still counts stay undone
//! (`verify`: recorded as the run's error and reported in its outcome), and how a chunk or a
//! failed key is named in an event ("keys A..=B", "after key K"). It must not touch the engine's
//! schema except through `store`.

mod chunk;
mod failure;
mod options;
mod pace;
mod recovery;
mod retry;
mod start;
mod verify;
mod worker;

pub use options::{
    RunOptions, DEFAULT_CONTENTION_BUDGET, DEFAULT_MAX_ATTEMPTS, DEFAULT_RECONNECT_FOR,
    DEFAULT_VERIFY_TIMEOUT, MAX_WORKERS,
};
pub use retry::retry_failures;
pub use start::{estimate_rows, EXACT_COUNT_WITHIN};
pub use verify::NotSwept;

use crate::db::{self, Target};
use crate::error::Result;
use crate::events::{Event, Listener};
use crate::job::{JobSpec, ThrottleSpec};
use crate::keyset::{show_key, KeyValue, Keyset};
use crate::signals::Shutdown;
use crate::state::{JobState, RunEnd};
use crate::store::{self, LeaseState, Store};
use crate::throttle::Throttle;
use chunk::ChunkPlan;
use pace::Pace;
use start::{connect_patiently, start, stopped_unrecorded, Start, Started};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use verify::AfterPass;
use worker::Worker;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// Every key up to the bound was processed and `verify` (if any) returned 0.
    Done { verify_remaining: Option<i64> },
    /// Nothing to do: the job was already done.
    AlreadyDone,
    /// Every key was processed (and swept) but `verify` still counts rows to do.
    Incomplete {
        verify_remaining: i64,
        why: String,
        not_swept: NotSwept,
    },
    /// Stopped by a signal; the next run resumes from the cursor.
    Stopped,
    /// A canary run (`--limit`) committed its rows and stopped; recorded as `stopped`, so the
    /// next run resumes from the cursor.
    #[serde(rename = "stopped")]
    LimitReached { limit: u64 },
    /// Stopped by `backfill cancel`; the next run resumes from the cursor.
    Cancelled,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub job: String,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Keys processed by this run (all its workers).
    pub rows: i64,
    /// Rows the statement reported changing in this run.
    pub rows_affected: i64,
    pub chunks: i64,
    /// Round trips to the database that this run's committed chunks waited for (two per chunk
    /// in the steady state).
    pub round_trips: i64,
    /// Poison keys this run skipped (`on_error = "skip"`).
    pub skipped: i64,
    pub workers: u32,
    pub elapsed_seconds: f64,
    /// Keys processed by all runs of the job.
    pub rows_done_total: i64,
    /// The last key committed, while the job has a single range.
    pub cursor: Option<KeyValue>,
    /// The job's key ranges (more than one once workers split the work).
    pub ranges: usize,
}

impl Report {
    fn new(
        cx: &Context<'_>,
        started: Instant,
        outcome: Outcome,
        tally: &Tally,
        total: &Option<store::Checkpoint>,
    ) -> Self {
        Report {
            job: cx.job.name.clone(),
            outcome,
            rows: tally.rows,
            rows_affected: tally.affected,
            chunks: tally.chunks,
            round_trips: tally.round_trips,
            skipped: tally.skipped,
            workers: cx.workers,
            elapsed_seconds: started.elapsed().as_secs_f64(),
            rows_done_total: total.as_ref().map(|c| c.rows_done).unwrap_or(tally.rows),
            cursor: total.as_ref().and_then(|c| c.cursor.clone()),
            ranges: total.as_ref().map(|c| c.ranges.len()).unwrap_or(0),
        }
    }
}

/// What every step of a run is given.
struct Context<'a> {
    target: &'a Target,
    store: &'a Store,
    job: &'a JobSpec,
    opts: &'a RunOptions,
    shutdown: &'a Shutdown,
    events: &'a dyn Listener,
    /// This run's workers.
    workers: u32,
}

/// Runs (or resumes, or joins) a job to completion, a stop, or a failure.
pub async fn run(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    opts: &RunOptions,
    shutdown: &Shutdown,
    events: &dyn Listener,
) -> Result<Report> {
    let started = Instant::now();
    let workers = opts.workers.clamp(1, MAX_WORKERS);
    let cx = Context {
        target,
        store,
        job,
        opts,
        shutdown,
        events,
        workers,
    };
    // Join the job, and fix its key range on its first run.
    let joined = match start(target, store, job, opts, workers, shutdown, events).await? {
        Start::Owned(s) => *s,
        Start::AlreadyDone(c) => {
            let outcome = Outcome::AlreadyDone;
            return Ok(Report::new(
                &cx,
                started,
                outcome,
                &Tally::default(),
                &Some(*c),
            ));
        }
    };
    let Started {
        lease,
        keyset,
        run_id,
        checkpoint,
        total,
        failing_keys,
    } = joined;
    let lease_state = Arc::new(LeaseState::new());
    let heartbeat = tokio::spawn(store.clone().keep_lease(
        target.clone(),
        lease,
        job.name.clone(),
        run_id,
        opts.reconnect_for,
        lease_state.clone(),
    ));
    let chunk_rows = opts.chunk_rows.unwrap_or(job.chunk_rows);
    announce(&cx, &checkpoint, total, chunk_rows, failing_keys);
    // The workers, then verify and sweep.
    let shared = Shared::new(&cx, run_id, &lease_state, &keyset, chunk_rows)?;
    let passes = shared.walk_and_verify(chunk_rows as i64).await;
    drop(shared);
    // Record the end.
    let (outcome, tally, total) = record_end(&cx, run_id, heartbeat, passes, &checkpoint).await?;
    Ok(Report::new(&cx, started, outcome, &tally, &total))
}

/// Shows the run starting: the progress display, and where a resumed job goes on.
fn announce(
    cx: &Context<'_>,
    checkpoint: &store::Checkpoint,
    total: Option<i64>,
    chunk_rows: u32,
    failing_keys: i64,
) {
    let events = cx.events;
    let (sweep, pass_done) = current_pass(checkpoint);
    events.on(Event::RunStarted {
        done: checkpoint.rows_done.max(0) as u64,
        sweep,
        pass_done: pass_done.max(0) as u64,
        total: total.map(|t| t.max(0) as u64),
        chunk_size: chunk_rows as u64,
        workers: cx.workers,
        failing_keys: failing_keys.max(0) as u64,
    });
    if let Some(c) = &checkpoint.cursor {
        events.on(Event::ResumingAfter {
            key: &show_key(c),
            rows_done: checkpoint.rows_done,
        });
    } else if checkpoint.ranges.len() > 1 {
        events.on(Event::ResumingRanges {
            rows_done: checkpoint.rows_done,
            finished: checkpoint.ranges.iter().filter(|r| r.done).count(),
            ranges: checkpoint.ranges.len(),
        });
    }
}

/// The pass over the keys the job is in when the run starts: its sweep number (None: the first
/// pass) and the keys done in it. Every pass starts with one range without a lower bound (a
/// split's upper part has one, and gets a higher id), so the current pass is the last such range
/// and every range made after it.
fn current_pass(checkpoint: &store::Checkpoint) -> (Option<i32>, i64) {
    let ranges = &checkpoint.ranges;
    let start = ranges
        .iter()
        .filter(|r| r.lower_bound.is_none())
        .map(|r| r.id)
        .max()
        .unwrap_or(0);
    let done = ranges
        .iter()
        .filter(|r| r.id >= start)
        .map(|r| r.rows_done)
        .sum();
    match start {
        0 => (None, checkpoint.rows_done),
        _ => (Some(checkpoint.sweeps.max(1)), done),
    }
}

/// What verify said at the end of the run's passes: None when the job has no `verify` (or the
/// passes did not finish); Err with the rows still counted, why, and why they were not swept.
type Verified = Option<std::result::Result<(), (i64, String, NotSwept)>>;

/// How the run's passes ended, and what its workers did.
struct Passes {
    result: Result<LoopEnd>,
    verified: Verified,
    tally: Tally,
}

/// Records the run's end (state, error, verify's count) on a fresh session: the lease session
/// belongs to the heartbeat (kept until the outcome is saved), and the database may just be
/// coming back. Returns the outcome, what this run did, and the job's checkpoint now.
async fn record_end(
    cx: &Context<'_>,
    run_id: i64,
    heartbeat: tokio::task::JoinHandle<()>,
    passes: Passes,
    checkpoint: &store::Checkpoint,
) -> Result<(Outcome, Tally, Option<store::Checkpoint>)> {
    let (store, events) = (cx.store, cx.events);
    let Passes {
        result,
        verified,
        mut tally,
    } = passes;
    let finisher = match connect_patiently(cx.target, cx.opts.reconnect_for, events, cx.shutdown)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            heartbeat.abort();
            if let Ok(LoopEnd::Stopped | LoopEnd::LimitReached(_) | LoopEnd::Cancelled) = result {
                events.on(Event::RunEnded(JobState::Stopped));
                return Err(stopped_unrecorded(
                    cx.job, e, &tally, checkpoint, cx.workers,
                ));
            }
            // A run that failed (e.g. gave up waiting for the database) says why and where the
            // next run resumes; that its end could not be recorded as well changes neither.
            if let Err(failed) = result {
                events.on(Event::RunEnded(JobState::Failed));
                return Err(failed);
            }
            return Err(e);
        }
    };
    let name = cx.job.name.as_str();
    let (state, error, remaining, outcome) = ending(result, verified);
    events.on(Event::RunEnded(state.state()));
    let saved = store
        .finish(&finisher, name, run_id, state, error.as_deref(), remaining)
        .await;
    // The lease is kept until the outcome is saved: a run verifying for minutes is alive.
    heartbeat.abort();
    if saved.is_ok() && state == RunEnd::Cancelled {
        // Best effort: `status` hides a cancel with no live run to stop anyway.
        let _ = store.clear_spent_cancel(&finisher, name).await;
    }
    let outcome = outcome?;
    saved?;
    // What this run did, as its chunks counted it when they committed: the tally kept here
    // misses a chunk whose COMMIT took effect but whose answer was lost with the connection.
    if let Ok((rows, affected, chunks)) = store.run_counts(&finisher, run_id).await {
        (tally.rows, tally.affected, tally.chunks) = (rows, affected, chunks);
    }
    let total = store.load(&finisher, name).await.ok().flatten();
    Ok((outcome, tally, total))
}

/// The run's end as recorded (state, error, verify's count) and as reported.
#[allow(clippy::type_complexity)]
fn ending(
    result: Result<LoopEnd>,
    verified: Verified,
) -> (RunEnd, Option<String>, Option<i64>, Result<Outcome>) {
    match result {
        Ok(LoopEnd::Cancelled) => (RunEnd::Cancelled, None, None, Ok(Outcome::Cancelled)),
        Ok(LoopEnd::Stopped) => (RunEnd::Stopped, None, None, Ok(Outcome::Stopped)),
        Ok(LoopEnd::LimitReached(limit)) => (
            RunEnd::Stopped,
            None,
            None,
            Ok(Outcome::LimitReached { limit }),
        ),
        Ok(LoopEnd::Finished) => match verified {
            Some(Err((n, why, not_swept))) => (
                RunEnd::Incomplete,
                Some(format!(
                    "every key up to the bound was processed, but {why}"
                )),
                Some(n),
                Ok(Outcome::Incomplete {
                    verify_remaining: n,
                    why,
                    not_swept,
                }),
            ),
            Some(Ok(())) => (
                RunEnd::Done,
                None,
                Some(0),
                Ok(Outcome::Done {
                    verify_remaining: Some(0),
                }),
            ),
            None => (
                RunEnd::Done,
                None,
                None,
                Ok(Outcome::Done {
                    verify_remaining: None,
                }),
            ),
        },
        Err(e) => (RunEnd::Failed, Some(e.to_string()), None, Err(e)),
    }
}

enum LoopEnd {
    Finished,
    Stopped,
    /// This run committed the keys its `--limit` asked for (a canary run).
    LimitReached(u64),
    /// `backfill cancel`.
    Cancelled,
}

#[derive(Default)]
struct Tally {
    rows: i64,
    affected: i64,
    chunks: i64,
    /// Round trips the committed chunks waited for.
    round_trips: i64,
    skipped: i64,
    /// The last key committed (for a run of one worker on one range: its cursor).
    last: Option<KeyValue>,
}

impl Tally {
    fn add(&mut self, t: &Tally) {
        self.rows += t.rows;
        self.affected += t.affected;
        self.chunks += t.chunks;
        self.round_trips += t.round_trips;
        self.skipped += t.skipped;
        if t.last.is_some() {
            self.last = t.last.clone();
        }
    }
}

/// What the workers of one run share.
struct Shared<'a> {
    target: &'a Target,
    store: &'a Store,
    job: &'a JobSpec,
    opts: &'a RunOptions,
    run_id: i64,
    shutdown: &'a Shutdown,
    events: &'a dyn Listener,
    lease: &'a LeaseState,
    pool: db::Pool,
    keyset: &'a Keyset,
    workers: u32,
    chunk: ChunkPlan<'a>,
    pace: tokio::sync::Mutex<Pace>,
    /// A worker failed: the others stop after their chunk in flight.
    aborted: AtomicBool,
    /// Keys this run's workers committed, for `--limit`.
    committed_keys: AtomicI64,
    /// A range was finished: idle workers look again at once (the job may be done).
    range_finished: tokio::sync::Notify,
}

impl<'a> Shared<'a> {
    fn new(
        cx: &Context<'a>,
        run_id: i64,
        lease: &'a LeaseState,
        keyset: &'a Keyset,
        chunk_rows: u32,
    ) -> Result<Self> {
        let (job, opts) = (cx.job, cx.opts);
        let lock_timeout = opts.lock_timeout.unwrap_or(job.lock_timeout);
        let statement_timeout = opts.statement_timeout.unwrap_or(job.statement_timeout);
        let throttle = ThrottleSpec {
            rows_per_second: opts.rows_per_second.or(job.throttle.rows_per_second),
            target_chunk_time: match opts.target_chunk_time {
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d),
                None => job.throttle.target_chunk_time,
            },
            pause: opts.pause.unwrap_or(job.throttle.pause),
            ..job.throttle.clone()
        };
        Ok(Shared {
            target: cx.target,
            store: cx.store,
            job,
            opts,
            run_id,
            shutdown: cx.shutdown,
            events: cx.events,
            lease,
            pool: cx.target.pool(cx.workers as usize + 1)?,
            keyset,
            workers: cx.workers,
            chunk: ChunkPlan::new(
                cx.store,
                job,
                keyset,
                chunk::chunk_timeouts(lock_timeout, statement_timeout),
            ),
            pace: tokio::sync::Mutex::new(Pace {
                throttle: Throttle::new(throttle, chunk_rows, job.table.quoted()),
                controls_read: None,
                controls: store::Controls::default(),
                holding: None,
                contended: Default::default(),
                lag_sampled: None,
                rate_shown: false,
            }),
            aborted: AtomicBool::new(false),
            committed_keys: AtomicI64::new(0),
            range_finished: tokio::sync::Notify::new(),
        })
    }

    /// The main pass, then — while `verify` still counts rows (written behind the cursor by code
    /// that does not fill the new column yet) — sweep passes over every key, up to max_sweeps.
    async fn walk_and_verify(&self, chunk_rows: i64) -> Passes {
        let mut tally = Tally::default();
        let mut verified: Verified = None;
        let result = loop {
            let pass = self.walk_all(chunk_rows, &mut tally).await;
            if !matches!(pass, Ok(LoopEnd::Finished)) || self.job.verify.is_none() {
                break pass;
            }
            match self.verify_and_sweep().await {
                Ok(AfterPass::Sweep) => continue,
                Ok(AfterPass::Verified) => verified = Some(Ok(())),
                Ok(AfterPass::Incomplete {
                    remaining,
                    why,
                    not_swept,
                }) => verified = Some(Err((remaining, why, not_swept))),
                Err(e) => break Err(e),
            }
            break pass;
        };
        Passes {
            result,
            verified,
            tally,
        }
    }

    /// The canary's limit, once this run's committed keys have reached it: no chunk is started
    /// after that.
    fn limit_reached(&self) -> Option<u64> {
        let limit = self.opts.limit?;
        let done = self.committed_keys.load(Ordering::SeqCst).max(0) as u64;
        (done >= limit).then_some(limit)
    }

    /// Tells the run's listeners (the progress display, the log, the metrics) what happened.
    fn emit(&self, event: Event<'_>) {
        self.events.on(event);
    }

    /// How long one chunk may keep meeting lock contention: the run's flag, else the job's.
    fn contention_budget(&self) -> Duration {
        self.opts
            .contention_budget
            .or(self.job.contention_budget)
            .unwrap_or(DEFAULT_CONTENTION_BUDGET)
    }

    /// Walks the job's ranges with this run's workers until none is left (or the run stops).
    async fn walk_all(&self, chunk_rows: i64, tally: &mut Tally) -> Result<LoopEnd> {
        let ends = futures_util::future::join_all(
            (0..self.workers as i32).map(|w| Worker::new(self, w, chunk_rows).drive()),
        )
        .await;
        let mut result: Result<LoopEnd> = Ok(LoopEnd::Finished);
        for (end, t) in ends {
            tally.add(&t);
            result = match (result, end) {
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                (Ok(LoopEnd::Cancelled), _) | (Ok(_), Ok(LoopEnd::Cancelled)) => {
                    Ok(LoopEnd::Cancelled)
                }
                (Ok(LoopEnd::Stopped), _) | (Ok(_), Ok(LoopEnd::Stopped)) => Ok(LoopEnd::Stopped),
                (Ok(LoopEnd::LimitReached(n)), _) | (Ok(_), Ok(LoopEnd::LimitReached(n))) => {
                    Ok(LoopEnd::LimitReached(n))
                }
                (Ok(LoopEnd::Finished), Ok(LoopEnd::Finished)) => Ok(LoopEnd::Finished),
            };
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn each_end_of_the_passes_is_recorded_and_reported_once() {
        let incomplete = Some(Err((7, "verify counts 7".to_string(), NotSwept::Disabled)));
        // The passes' end, verify's answer → the state recorded, verify's count, an error text.
        type Case = (Result<LoopEnd>, Verified, RunEnd, Option<i64>, bool);
        let cases: Vec<Case> = vec![
            (Ok(LoopEnd::Cancelled), None, RunEnd::Cancelled, None, false),
            (
                Ok(LoopEnd::Stopped),
                Some(Ok(())),
                RunEnd::Stopped,
                None,
                false,
            ),
            (
                Ok(LoopEnd::LimitReached(250)),
                None,
                RunEnd::Stopped,
                None,
                false,
            ),
            (Ok(LoopEnd::Finished), None, RunEnd::Done, None, false),
            (
                Ok(LoopEnd::Finished),
                Some(Ok(())),
                RunEnd::Done,
                Some(0),
                false,
            ),
            (
                Ok(LoopEnd::Finished),
                incomplete,
                RunEnd::Incomplete,
                Some(7),
                true,
            ),
            (
                Err(Error::Runtime("boom".into())),
                None,
                RunEnd::Failed,
                None,
                true,
            ),
        ];
        for (result, verified, state, remaining, has_error) in cases {
            let (s, error, r, outcome) = ending(result, verified);
            assert_eq!(
                (s, r, error.is_some()),
                (state, remaining, has_error),
                "{state:?}"
            );
            match (s, outcome) {
                (RunEnd::Failed, Err(_)) => {}
                (RunEnd::Cancelled, Ok(Outcome::Cancelled))
                | (RunEnd::Stopped, Ok(Outcome::Stopped))
                | (RunEnd::Stopped, Ok(Outcome::LimitReached { limit: 250 })) => {}
                (RunEnd::Done, Ok(Outcome::Done { verify_remaining })) => {
                    assert_eq!(verify_remaining, remaining)
                }
                (
                    RunEnd::Incomplete,
                    Ok(Outcome::Incomplete {
                        verify_remaining,
                        why,
                        ..
                    }),
                ) => {
                    assert_eq!(verify_remaining, 7);
                    assert_eq!(
                        error.as_deref(),
                        Some(
                            format!("every key up to the bound was processed, but {why}").as_str()
                        )
                    );
                }
                (s, o) => panic!("{s:?}: {o:?}"),
            }
        }
    }
}
