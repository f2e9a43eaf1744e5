//! A job's key ranges: the unit of ownership between workers and runs. Each range is the keys
//! in `(cursor, upper_bound]` still to do, with its own cursor, counters and owner (a run and a
//! worker of it). The first run of a job records one range covering every key; from then on:
//!
//! - a worker without a range takes a free one — never owned, or owned by a run that is gone —
//!   with `FOR UPDATE SKIP LOCKED`, so two workers never take the same;
//! - when none is free, it *splits* the busy range with the most keys left: it finds the key in
//!   the middle of what is left — by walking the key's index to the middle, or, for a very large
//!   remainder, from a page sample of the table; always compared in SQL, never by key arithmetic
//!   — without locking the range (so the owner's chunks never wait for that walk), then locks it
//!   (waiting at most for the chunk in flight), checks that the owner has not passed the middle
//!   and nobody split it meanwhile (else it looks again), and takes the upper half as a new
//!   range. The owner sees its shorter range at its next chunk. So workers that start together
//!   split the job evenly, and workers that finish early take half of a slower one's
//!   work, until what is left is too small to be worth splitting;
//! - every chunk locks its range's row and checks the owner in its own transaction
//!   (`executor::chunk` owns those statements), so a split, a takeover or a lost lease can never
//!   make a key be processed twice.

use super::{ts, Store};
use crate::db::{Limit, Timeouts};
use crate::keyset::{KeyValue, Keyset};
use crate::state::RunOutcome;
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

/// Above this many keys left, a split point is taken from a page sample instead of an index walk.
const EXACT_SPLIT_MAX: i64 = 2_000_000;
/// Keys a page sample should find in the range being split.
const SAMPLE_KEYS: f64 = 2000.0;
/// How often one look for work retries a split whose range changed meanwhile.
const SPLIT_TRIES: usize = 5;

/// What a split attempt came to.
enum Split {
    /// The new (upper) range's id.
    Made(i32),
    /// Too little left, or fewer keys than estimated: not now.
    NotWorth,
    /// The range was split by another, or its owner passed the middle: look again.
    Changed,
}

/// How long a splitter waits for the chunk in flight on the range it wants to split.
const SPLIT_LOCK_WAIT: Timeouts = Timeouts {
    lock: Some(Limit::Within(Duration::from_secs(2))),
    statement: None,
    idle_in_transaction: None,
};

/// A range as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RangeInfo {
    pub id: i32,
    /// Keys above this one (None: from the first key).
    pub lower_bound: Option<KeyValue>,
    /// Keys up to and including this one.
    pub upper_bound: KeyValue,
    /// The last key committed in this range.
    pub cursor: Option<KeyValue>,
    pub done: bool,
    /// Keys the range was estimated to hold when it was made.
    pub estimate: Option<i64>,
    pub rows_done: i64,
    pub chunks_done: i64,
    pub owner_run: Option<i64>,
    pub owner_worker: Option<i32>,
    pub updated_at: String,
}

/// A range a worker holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeLease {
    pub id: i32,
    pub run_id: i64,
    pub worker: i32,
}

impl RangeLease {
    /// The parameters `$1`..`$4` (job, range, owner run, owner worker) of the statements that
    /// touch a range only while this lease owns it.
    pub fn owner_params<'a>(&'a self, job: &'a &'a str) -> [&'a (dyn ToSql + Sync); 4] {
        [job, &self.id, &self.run_id, &self.worker]
    }
}

/// What a worker looking for work found.
pub enum Acquired {
    Range(RangeLease),
    /// Every range is taken and none is worth splitting; look again shortly (a runner may die).
    Wait,
    /// Every range is done.
    AllDone,
}

/// How to split: the key's SQL, and the smallest remainder worth splitting.
pub struct Splitter<'a> {
    pub keyset: &'a Keyset,
    pub min_keys: i64,
}

impl Store {
    /// The job's ranges, by id.
    pub async fn ranges(
        &self,
        client: &impl GenericClient,
        job: &str,
    ) -> crate::error::Result<Vec<RangeInfo>> {
        let rows = client
            .query(
                &format!(
                    "SELECT id, lower_bound, upper_bound, cursor, done, estimate, rows_done, chunks_done,
                            owner_run, owner_worker, {updated}
                       FROM {s}.ranges WHERE job = $1 ORDER BY id",
                    updated = ts("updated_at"),
                    s = self.q
                ),
                &[&job],
            )
            .await
            .map_err(|e| crate::db::error(e, format!("job {job}: reading its ranges")))?;
        Ok(rows
            .iter()
            .map(|r| RangeInfo {
                id: r.get(0),
                lower_bound: r.get(1),
                upper_bound: r.get(2),
                cursor: r.get(3),
                done: r.get(4),
                estimate: r.get(5),
                rows_done: r.get(6),
                chunks_done: r.get(7),
                owner_run: r.get(8),
                owner_worker: r.get(9),
                updated_at: r.get(10),
            })
            .collect())
    }

    /// Finds work for `worker` of run `run_id`: a free range, else the upper half of the busiest.
    pub async fn acquire(
        &self,
        client: &mut tokio_postgres::Client,
        job: &str,
        run_id: i64,
        worker: i32,
        splitter: &Splitter<'_>,
    ) -> Result<Acquired, tokio_postgres::Error> {
        // A range that changed while we found its middle (another worker split it first, or its
        // owner passed the middle) is looked at again at once: workers starting together must
        // still split the job between them.
        for _ in 0..SPLIT_TRIES {
            if let Some(got) = self
                .acquire_once(client, job, run_id, worker, splitter)
                .await?
            {
                return Ok(got);
            }
        }
        Ok(Acquired::Wait)
    }

    async fn acquire_once(
        &self,
        client: &mut tokio_postgres::Client,
        job: &str,
        run_id: i64,
        worker: i32,
        splitter: &Splitter<'_>,
    ) -> Result<Option<Acquired>, tokio_postgres::Error> {
        let lease = |id| RangeLease { id, run_id, worker };
        let tx = client.transaction().await?;
        if let Some(id) = self.take_free(&tx, job, run_id, worker).await? {
            tx.commit().await?;
            return Ok(Some(Acquired::Range(lease(id))));
        }
        let busiest = tx
            .query_opt(
                &format!(
                    "SELECT id FROM {s}.ranges
                      WHERE job = $1 AND NOT done AND coalesce(estimate, 0) - rows_done >= $2
                      ORDER BY coalesce(estimate, 0) - rows_done DESC LIMIT 1",
                    s = self.q
                ),
                &[&job, &splitter.min_keys.max(2)],
            )
            .await?;
        let Some(busiest) = busiest else {
            let all_done: bool = tx
                .query_one(
                    &format!(
                        "SELECT coalesce(bool_and(done), true) FROM {s}.ranges WHERE job = $1",
                        s = self.q
                    ),
                    &[&job],
                )
                .await?
                .get(0);
            tx.commit().await?;
            return Ok(Some(if all_done {
                Acquired::AllDone
            } else {
                Acquired::Wait
            }));
        };
        let id: i32 = busiest.get(0);
        match self.split(&tx, job, id, splitter).await {
            Ok(Split::Made(new_id)) => {
                self.own(&tx, job, new_id, run_id, worker).await?;
                tx.commit().await?;
                Ok(Some(Acquired::Range(lease(new_id))))
            }
            Ok(Split::NotWorth) => {
                tx.commit().await?;
                Ok(Some(Acquired::Wait))
            }
            Ok(Split::Changed) => {
                tx.rollback().await?;
                Ok(None)
            }
            // The range stayed locked (a slow chunk): not worth waiting for; look again soon.
            Err(e) if crate::db::sqlstate(&e) == Some("55P03") => Ok(Some(Acquired::Wait)),
            Err(e) => Err(e),
        }
    }

    /// Takes a free range — never owned, or owned by a run that is gone (whose history row is
    /// then closed as abandoned) — for `worker` of `run_id`; None when there is none.
    async fn take_free(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        job: &str,
        run_id: i64,
        worker: i32,
    ) -> Result<Option<i32>, tokio_postgres::Error> {
        let free = tx
            .query_opt(
                &format!(
                    "SELECT g.id, g.owner_run FROM {s}.ranges g
                      WHERE g.job = $1 AND NOT g.done
                        AND (g.owner_run IS NULL
                             OR (g.owner_run <> $2 -- our own run is alive, even while its lease reconnects
                                 AND NOT EXISTS (SELECT 1 FROM {s}.runs r WHERE r.id = g.owner_run AND {alive})))
                      ORDER BY g.id LIMIT 1 FOR UPDATE SKIP LOCKED",
                    s = self.q,
                    alive = Self::run_alive_sql("r")
                ),
                &[&job, &run_id],
            )
            .await?;
        let Some(row) = free else { return Ok(None) };
        let id: i32 = row.get(0);
        let previous: Option<i64> = row.get(1);
        self.own(tx, job, id, run_id, worker).await?;
        if let Some(gone) = previous.filter(|p| *p != run_id) {
            tx.execute(
                &format!(
                    "UPDATE {s}.runs SET outcome = {abandoned}, ended_at = coalesce(heartbeat_at, now()),
                            last_error = 'the runner stopped without finishing (killed, crashed or lost its connection); its ranges were taken over',
                            {counts}
                      WHERE id = $1 AND outcome IS NULL",
                    counts = self.run_counts_sql("$1"),
                    abandoned = RunOutcome::Abandoned.literal(),
                    s = self.q
                ),
                &[&gone],
            )
            .await?;
        }
        Ok(Some(id))
    }

    /// Makes range `id` the range of `worker` of `run_id` (its row is locked by the caller).
    async fn own(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        job: &str,
        id: i32,
        run_id: i64,
        worker: i32,
    ) -> Result<u64, tokio_postgres::Error> {
        tx.execute(
            &format!(
                "UPDATE {s}.ranges SET owner_run = $3, owner_worker = $4 WHERE job = $1 AND id = $2",
                s = self.q
            ),
            &[&job, &id, &run_id, &worker],
        )
        .await
    }

    /// The key in the middle of the `left` keys after `cursor` up to `upper`: by walking the
    /// key's index, or — above `EXACT_SPLIT_MAX` keys — from a page sample. None when fewer keys
    /// are left than that.
    async fn middle(
        tx: &tokio_postgres::Transaction<'_>,
        keyset: &Keyset,
        cursor: Option<&KeyValue>,
        upper: &KeyValue,
        left: i64,
    ) -> Result<Option<KeyValue>, tokio_postgres::Error> {
        let sampled = left > EXACT_SPLIT_MAX && !keyset.is_ctid();
        let sql = keyset.split_sql(cursor.is_some(), sampled);
        let offset = left / 2;
        let percent = (100.0 * SAMPLE_KEYS / left as f64).clamp(0.000_1, 100.0);
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if let Some(c) = &cursor {
            params.extend(c.iter().map(|v| v as &(dyn ToSql + Sync)));
        }
        params.extend(upper.iter().map(|v| v as &(dyn ToSql + Sync)));
        if sampled {
            params.push(&percent);
        } else {
            params.push(&offset);
        }
        Ok(tx.query_opt(&sql, &params).await?.map(|r| r.get(0)))
    }

    /// Splits range `id` at the middle of the keys it has left; returns the new (upper) range.
    async fn split(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        job: &str,
        id: i32,
        splitter: &Splitter<'_>,
    ) -> Result<Split, tokio_postgres::Error> {
        tx.batch_execute(&SPLIT_LOCK_WAIT.set_local()).await?;
        let row = tx
            .query_one(
                &format!(
                    // Not locked yet: finding the middle may walk a million index entries, and
                    // the owner's chunks must not wait for that (they would hit lock_timeout).
                    "SELECT cursor, upper_bound, coalesce(estimate, 0) - rows_done, done
                       FROM {s}.ranges WHERE job = $1 AND id = $2",
                    s = self.q
                ),
                &[&job, &id],
            )
            .await?;
        let (cursor, upper, left): (Option<KeyValue>, KeyValue, i64) =
            (row.get(0), row.get(1), row.get(2));
        if row.get::<_, bool>(3) || left < splitter.min_keys.max(2) {
            return Ok(Split::NotWorth);
        }
        let keyset = splitter.keyset;
        let middle = Self::middle(tx, keyset, cursor.as_ref(), &upper, left).await?;
        let Some(middle) = middle else {
            // Fewer keys left than estimated: remember that, so it is not picked again at once.
            tx.execute(
                &format!(
                    "UPDATE {s}.ranges SET estimate = rows_done + $3 WHERE job = $1 AND id = $2",
                    s = self.q
                ),
                &[&job, &id, &(left / 4)],
            )
            .await?;
            return Ok(Split::NotWorth);
        };
        // Now lock the range (waiting at most for the chunk in flight) and make sure the middle
        // is still ahead of its owner and the range was not split meanwhile.
        let now = tx
            .query_one(
                &format!(
                    "SELECT cursor, upper_bound, done FROM {s}.ranges WHERE job = $1 AND id = $2 FOR UPDATE",
                    s = self.q
                ),
                &[&job, &id],
            )
            .await?;
        let (cursor_now, upper_now, done_now): (Option<KeyValue>, KeyValue, bool) =
            (now.get(0), now.get(1), now.get(2));
        if done_now || upper_now != upper {
            return Ok(Split::Changed);
        }
        if let Some(c) = cursor_now.filter(|c| Some(c) != cursor.as_ref()) {
            let params: Vec<&(dyn ToSql + Sync)> = middle
                .iter()
                .chain(c.iter())
                .map(|v| v as &(dyn ToSql + Sync))
                .collect();
            let ahead: bool = tx.query_one(&keyset.after_sql(), &params).await?.get(0);
            if !ahead {
                return Ok(Split::Changed);
            }
        }
        // Range ids are allocated under the job's row lock (taken after the range's, the order
        // every other writer of both follows).
        tx.execute(
            &format!(
                "SELECT 1 FROM {s}.checkpoints WHERE job = $1 FOR UPDATE",
                s = self.q
            ),
            &[&job],
        )
        .await?;
        let upper_half = left / 2;
        let new_id: i32 = tx
            .query_one(
                &format!(
                    "INSERT INTO {s}.ranges (job, id, lower_bound, upper_bound, cursor, estimate)
                     SELECT $1, max(id) + 1, $2, $3, $2, $4 FROM {s}.ranges WHERE job = $1
                     RETURNING id",
                    s = self.q
                ),
                &[&job, &middle, &upper, &upper_half],
            )
            .await?
            .get(0);
        tx.execute(
            &format!(
                "UPDATE {s}.ranges SET upper_bound = $3, estimate = rows_done + $4, updated_at = now()
                  WHERE job = $1 AND id = $2",
                s = self.q
            ),
            &[&job, &id, &middle, &(left - upper_half)],
        )
        .await?;
        Ok(Split::Made(new_id))
    }

    /// Lets a range go unfinished (the worker stops), so another worker may take it at once.
    pub async fn release(
        &self,
        client: &impl GenericClient,
        job: &str,
        lease: &RangeLease,
    ) -> Result<u64, tokio_postgres::Error> {
        client
            .execute(
                &format!(
                    "UPDATE {s}.ranges SET owner_run = NULL, owner_worker = NULL
                      WHERE job = $1 AND id = $2 AND owner_run = $3 AND owner_worker = $4",
                    s = self.q
                ),
                &[&job, &lease.id, &lease.run_id, &lease.worker],
            )
            .await
    }
}
