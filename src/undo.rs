//! Undo data and reverts. A job with `undo = ["col", …]` keeps, for every row it touches, those
//! columns' values from before the job, in an undo table in the engine's schema: each chunk copies
//! its rows' old values there in its own transaction, just before its statement (the first copy
//! of a row wins, so sweeps and re-runs never overwrite an original). `backfill revert` then puts
//! them back chunk by chunk, or runs the job's `down_sql`, as a run of a *revert job* derived from
//! the job: same table and key, checkpointed and throttled like any run.

use crate::db;
use crate::error::{Error, Result};
use crate::job::{JobSpec, Revert};
use crate::keyset::Keyset;
use crate::sql::quote_ident;
use crate::sql::SqlTemplate;
pub use crate::store::revert_name;
use crate::store::Store;
use sha2::{Digest, Sha256};

/// The undo table of a job (quoted, in the engine's schema). Long job names are shortened with a
/// hash so the name stays within PostgreSQL's 63 bytes.
pub fn undo_table(store: &Store, job: &str) -> String {
    let name = if job.len() <= 50 {
        format!("undo_{job}")
    } else {
        let digest = Sha256::digest(job.as_bytes());
        let cut = (0..=40)
            .rev()
            .find(|&i| job.is_char_boundary(i))
            .unwrap_or(0);
        let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        format!("undo_{}_{hash}", &job[..cut])
    };
    format!("{}.{}", quote_ident(store.schema()), quote_ident(&name))
}

fn undo_columns(job: &JobSpec) -> Option<&[String]> {
    match &job.revert {
        Some(Revert::Undo(cols)) => Some(cols),
        _ => None,
    }
}

fn column_list(cols: &[String], prefix: &str) -> String {
    cols.iter()
        .map(|c| format!("{prefix}{}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates the job's undo table (key and undo columns, their types copied from the table) unless
/// it exists. Called under the job's checkpoint lock when its first run fixes the key range.
pub async fn ensure_table(
    client: &impl tokio_postgres::GenericClient,
    store: &Store,
    job: &JobSpec,
) -> Result<()> {
    let Some(cols) = undo_columns(job) else {
        return Ok(());
    };
    let table = undo_table(store, &job.name);
    let err = |e| {
        db::error(
            e,
            format!(
                "job {}: creating its undo table {table} (the role needs CREATE on schema {}; `backfill init --grant-to ROLE` grants it)",
                job.name,
                store.schema()
            ),
        )
    };
    if exists(client, store, &job.name).await? {
        return Ok(());
    }
    let key = column_list(&job.key, "");
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} AS SELECT {key}, {undo} FROM {source} WITH NO DATA;
             ALTER TABLE {table} ADD PRIMARY KEY ({key});",
            undo = column_list(cols, ""),
            source = job.table.quoted()
        ))
        .await
        .map_err(err)?;
    Ok(())
}

/// The statement each chunk runs before the job's: copies the chunk's rows' current values of the
/// undo columns, keeping any copy made before. It locks the rows it copies, so no application
/// write can land between the copy and the statement (whose snapshot is a later one). Same
/// placeholders (and so the same parameters) as the job's statement.
pub fn copy_sql(store: &Store, job: &JobSpec, keyset: &Keyset) -> Option<String> {
    let cols = undo_columns(job)?;
    let key = column_list(&job.key, "");
    let text = format!(
        "INSERT INTO {undo} ({key}, {cols}) SELECT {key}, {cols} FROM {source} WHERE ({key}) BETWEEN :start AND :end FOR UPDATE ON CONFLICT DO NOTHING",
        undo = undo_table(store, &job.name),
        cols = column_list(cols, ""),
        source = job.table.quoted()
    );
    let template = SqlTemplate::parse(&text).expect("the copy statement has both placeholders");
    Some(keyset.render(&template))
}

/// The revert job: the job's `down_sql`, or a statement putting the undo columns back.
pub fn revert_job(store: &Store, job: &JobSpec) -> Result<JobSpec> {
    let sql = match &job.revert {
        None => {
            return Err(Error::Usage(format!(
                "job {} declares no way back: add `down_sql` (a statement undoing `sql` for :start..:end) or `undo = [\"column\", …]` to {}",
                job.name,
                job.path.display()
            )))
        }
        Some(Revert::DownSql(sql)) => sql.clone(),
        Some(Revert::Undo(cols)) => {
            let set = cols
                .iter()
                .map(|c| format!("{q} = u.{q}", q = quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ");
            let text = format!(
                "UPDATE {source} AS t SET {set} FROM {undo} AS u
                  WHERE ({tkey}) = ({ukey}) AND ({ukey}) BETWEEN :start AND :end
                    AND ({tcols}) IS DISTINCT FROM ({ucols})",
                source = job.table.quoted(),
                undo = undo_table(store, &job.name),
                tkey = column_list(&job.key, "t."),
                ukey = column_list(&job.key, "u."),
                tcols = column_list(cols, "t."),
                ucols = column_list(cols, "u."),
            );
            SqlTemplate::parse(&text).expect("the restore statement has both placeholders")
        }
    };
    let mut revert = job.clone();
    revert.name = revert_name(&job.name);
    let digest = Sha256::digest(revert_sql_source(&sql).as_bytes());
    let hash: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    revert.fingerprint = format!("{}-revert-{hash}", job.fingerprint);
    revert.sql = sql;
    revert.verify = None;
    revert.max_sweeps = 0;
    revert.finish_sql = Vec::new();
    revert.revert = None;
    revert.migration = None;
    revert.requires_sql = None;
    revert.reverts = Some(job.name.clone());
    Ok(revert)
}

fn revert_sql_source(sql: &SqlTemplate) -> String {
    sql.source()
}

/// Whether the job has an undo table.
pub async fn exists(
    client: &impl tokio_postgres::GenericClient,
    store: &Store,
    job: &str,
) -> Result<bool> {
    let table = undo_table(store, job);
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(|e| db::error(e, format!("job {job}: looking for its undo table {table}")))?
        .get(0))
}

/// The rows kept in the job's undo table, or None when it has none.
pub async fn undo_rows(
    client: &impl tokio_postgres::GenericClient,
    store: &Store,
    job: &str,
) -> Result<Option<i64>> {
    if !exists(client, store, job).await? {
        return Ok(None);
    }
    let table = undo_table(store, job);
    let rows: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map_err(|e| db::error(e, format!("job {job}: reading its undo table {table}")))?
        .get(0);
    Ok(Some(rows))
}

/// Drops the job's undo table.
pub async fn drop_table(
    client: &impl tokio_postgres::GenericClient,
    store: &Store,
    job: &str,
) -> Result<()> {
    let table = undo_table(store, job);
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .map_err(|e| db::error(e, format!("job {job}: dropping its undo table {table}")))
}
