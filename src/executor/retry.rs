//! `backfill retry-failures`: re-runs the job's statement for the keys it recorded as failing
//! (`on_error = "skip"`), each in its own transaction under a chunk's timeouts. Must not touch
//! the job's key ranges or checkpoint.

use super::chunk;
use super::RunOptions;
use crate::db::{self, Target};
use crate::error::Result;
use crate::events::{Event, Listener};
use crate::job::JobSpec;
use crate::keyset::{show_key, Keyset};
use crate::store::{Poison, Store};
use tokio_postgres::types::ToSql;

/// Re-runs only the keys a job recorded as failing; each success is marked resolved in the same
/// transaction as the statement, so a key is retried to success exactly once.
pub async fn retry_failures(
    target: &Target,
    store: &Store,
    job: &JobSpec,
    opts: &RunOptions,
    events: &dyn Listener,
) -> Result<(usize, usize)> {
    let name = &job.name;
    let mut client = target.connect().await?;
    store.ensure(&mut client).await?;
    let keyset = Keyset::resolve(&client, job).await?;
    let statement = keyset.render(&job.sql);
    crate::undo::ensure_table(&client, store, job).await?;
    let undo_copy = crate::undo::copy_sql(store, job, &keyset);
    // The same timeouts as a chunk: the retried key is applied under the same limits.
    let set_local = chunk::chunk_timeouts(
        opts.lock_timeout.unwrap_or(job.lock_timeout),
        opts.statement_timeout.unwrap_or(job.statement_timeout),
    )
    .set_local();
    let failures = store.failures(&client, name, false).await?;
    let (mut fixed, mut still) = (0, 0);
    for f in &failures {
        let err = |e| db::error(e, format!("job {name}: retrying key {}", show_key(&f.key)));
        let tx = client.transaction().await.map_err(err)?;
        if !store.lock_failure(&tx, f.id).await.map_err(err)? {
            continue; // resolved meanwhile, or another retrier has it
        }
        tx.batch_execute(&set_local).await.map_err(err)?;
        tx.batch_execute("SAVEPOINT retry").await.map_err(err)?;
        let (from, to) = keyset.statement_bounds(&f.key, &f.key);
        let args: Vec<&(dyn ToSql + Sync)> = from
            .iter()
            .chain(to.iter())
            .map(|v| v as &(dyn ToSql + Sync))
            .collect();
        let applied = async {
            if let Some(copy) = &undo_copy {
                tx.execute(copy, &args).await?;
            }
            tx.execute(&statement, &args).await
        };
        match applied.await {
            Ok(_) => {
                store.resolve_failure(&tx, f.id).await.map_err(err)?;
                tx.commit().await.map_err(err)?;
                fixed += 1;
                events.on(Event::FailureResolved {
                    key: &show_key(&f.key),
                });
            }
            Err(e) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT retry")
                    .await
                    .map_err(err)?;
                let text = db::describe(&e);
                let poison = Poison {
                    key: &f.key,
                    sqlstate: db::sqlstate(&e),
                    message: &text,
                };
                store
                    .record_failure(&tx, name, None, &poison)
                    .await
                    .map_err(err)?;
                tx.commit().await.map_err(err)?;
                still += 1;
                events.on(Event::FailureRemains {
                    key: &show_key(&f.key),
                    error: &text,
                });
            }
        }
    }
    Ok((fixed, still))
}
