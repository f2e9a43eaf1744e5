//! A poison key skipped (`on_error = "skip"`): recorded in the failures table and passed, in one
//! transaction under the chunk's timeouts and range lock, so the key is skipped exactly once.
//! Must not decide when to skip (that is `recovery`'s).

use super::plan::{ChunkPlan, NOTHING_MOVED};
use crate::db;
use crate::keyset::KeyValue;
use crate::store::{Poison, RangeLease, Store};
use tokio_postgres::types::ToSql;

/// What became of a poison key.
pub(in crate::executor) enum Skip {
    /// Recorded and passed; `newly_failing` when it was not already recorded as failing.
    Skipped { newly_failing: bool },
    /// The range is no longer this worker's: nothing was recorded.
    RangeLost,
}

/// Records a poison key as skipped and moves the range's cursor past it, in one transaction
/// under the chunk's timeouts and range lock (so the key is skipped exactly once).
pub(in crate::executor) async fn skip_key(
    conn: &mut deadpool_postgres::Object,
    plan: &ChunkPlan<'_>,
    store: &Store,
    range: &RangeLease,
    poison: &Poison<'_>,
) -> Result<Skip, tokio_postgres::Error> {
    let job = plan.job.name.as_str();
    let tx = conn.transaction().await?;
    tx.batch_execute(&plan.timeouts.set_local()).await?;
    let Some(locked) = tx
        .query_opt(&plan.lock_range, &range.owner_params(&job))
        .await?
    else {
        return Ok(Skip::RangeLost);
    };
    let cursor: Option<KeyValue> = locked.get(0);
    let newly_failing = store
        .record_failure(&*tx, job, Some(range.run_id), poison)
        .await?;
    let skipped: [&(dyn ToSql + Sync); 5] = [&cursor, poison.key, &1i64, &0i64, &1i32];
    let advance: Vec<_> = range
        .owner_params(&job)
        .into_iter()
        .chain(skipped)
        .collect();
    match tx.execute(&plan.advance, &advance).await {
        Ok(_) => {}
        Err(e) if db::sqlstate(&e) == Some(NOTHING_MOVED) => return Ok(Skip::RangeLost),
        Err(e) => return Err(e),
    }
    tx.commit().await?;
    Ok(Skip::Skipped { newly_failing })
}
