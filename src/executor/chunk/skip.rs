//! A poison key skipped (`on_error = "skip"`): recorded in the failures table and passed, in one
//! transaction under the chunk's timeouts and range lock, so the key is skipped exactly once.
//! Must not decide when to skip (that is `recovery`'s).

use super::plan::{ChunkPlan, NOTHING_MOVED};
use crate::db;
use crate::keyset::KeyValue;
use crate::store::{Poison, RangeLease, Store};
use tokio_postgres::types::ToSql;

/// Records a poison key as skipped and moves the range's cursor past it, in one transaction
/// under the chunk's timeouts and range lock (so the key is skipped exactly once). False: the
/// range is no longer this worker's.
pub(in crate::executor) async fn skip_key(
    conn: &mut deadpool_postgres::Object,
    plan: &ChunkPlan<'_>,
    store: &Store,
    range: &RangeLease,
    poison: &Poison<'_>,
) -> Result<bool, tokio_postgres::Error> {
    let job = plan.job.name.as_str();
    let tx = conn.transaction().await?;
    tx.batch_execute(&plan.timeouts.set_local()).await?;
    let Some(locked) = tx
        .query_opt(&plan.lock_range, &range.owner_params(&job))
        .await?
    else {
        return Ok(false);
    };
    let cursor: Option<KeyValue> = locked.get(0);
    store
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
        Err(e) if db::sqlstate(&e) == Some(NOTHING_MOVED) => return Ok(false),
        Err(e) => return Err(e),
    }
    tx.commit().await?;
    Ok(true)
}
