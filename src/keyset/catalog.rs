//! Checks a job's key against the catalog and resolves it into a [`Keyset`]: the table exists, the
//! key columns exist and are NOT NULL, exactly a valid unique index backs them (in order, with the
//! column's collation and the default operator class), and the `undo` columns exist; or, for
//! `key = "ctid"`, the server can walk the heap's pages.
//!
//! Every problem found here is the job definition's (a usage error, exit 2), and is said in terms
//! of the job file. Only reads the catalog; never builds the walk's SQL (`walk`, `range`).

use super::{KeyColumn, Keyset, Walk};
use crate::db;
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::sql::CTID;
use tokio_postgres::GenericClient;

impl Keyset {
    /// Checks that the table exists, that the key columns exist, are NOT NULL, and are exactly
    /// the columns of a valid unique index, in order, and that the `undo` columns exist.
    /// Definition problems are usage errors (exit 2).
    pub async fn resolve(client: &impl GenericClient, job: &JobSpec) -> Result<Keyset> {
        let table = &job.table;
        let row = client
            .query_one("SELECT to_regclass($1)::oid", &[&table.quoted()])
            .await
            .map_err(|e| db::error(e, format!("job {}: looking up table {table}", job.name)))?;
        let oid: Option<u32> = row.get(0);
        let Some(oid) = oid else {
            return Err(Error::Usage(format!(
                "job {}: table `{table}` does not exist (or is not visible on the search_path of this connection); check `table` in {}",
                job.name,
                job.path.display()
            )));
        };
        if job.key == [CTID] {
            return Self::pages(client, job, oid).await;
        }
        let rows = client
            .query(
                // With its type modifier: `character` alone means character(1), and a bound
                // cast to it would be cut to one character.
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attnum::int,
                        a.attcollation, coalesce(c.collname::text, '')
                   FROM pg_attribute a LEFT JOIN pg_collation c ON c.oid = a.attcollation
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&oid],
            )
            .await
            .map_err(|e| db::error(e, format!("job {}: reading columns of {table}", job.name)))?;
        let mut columns = Vec::new();
        let mut attnums = Vec::new();
        // Each key column's own collation (oid, name), for the index check below.
        let mut collations_of_columns: Vec<(u32, String)> = Vec::new();
        for k in &job.key {
            let Some(r) = rows.iter().find(|r| r.get::<_, String>(0) == *k) else {
                let similar = rows
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .find(|n| n.eq_ignore_ascii_case(k));
                let hint = similar
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                return Err(Error::Usage(format!(
                    "job {}: key column `{k}` does not exist in table {table}{hint}; check `key` in {}",
                    job.name,
                    job.path.display()
                )));
            };
            if !r.get::<_, bool>(2) {
                return Err(Error::Usage(format!(
                    "job {}: key column `{k}` of {table} is nullable; the key must be NOT NULL and unique (a primary key or a unique index on NOT NULL columns)",
                    job.name
                )));
            }
            columns.push(KeyColumn {
                name: k.clone(),
                sql_type: r.get(1),
            });
            attnums.push(r.get::<_, i32>(3) as i16);
            collations_of_columns.push((r.get(4), r.get(5)));
        }
        // Undo columns are copied by every chunk: a missing one would fail each chunk at run time
        // with an error that looks like a privilege or `sql` problem. It is the job file's.
        if let Some(crate::job::Revert::Undo(undo)) = &job.revert {
            for c in undo {
                if rows.iter().any(|r| r.get::<_, String>(0) == *c) {
                    continue;
                }
                let hint = rows
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .find(|n| n.eq_ignore_ascii_case(c))
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                return Err(Error::Usage(format!(
                    "job {}: {}: column `{c}` does not exist in table {table}{hint}; `undo` names the columns `sql` changes, whose old values each chunk keeps for `backfill revert` (if the expand migration adds it, apply that first)",
                    job.name,
                    job.file_key("undo")
                )));
            }
        }
        let idx = client
            .query(
                "SELECT i.indexrelid::regclass::text, i.indkey::int2[], i.indcollation::oid[],
                        ARRAY(SELECT coalesce(o.opcname::text, '') || CASE WHEN o.opcdefault THEN '' ELSE ' (not default)' END
                                FROM unnest(i.indclass::oid[]) WITH ORDINALITY AS u(cls, n)
                                LEFT JOIN pg_opclass o ON o.oid = u.cls ORDER BY u.n)
                   FROM pg_index i
                  WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indisready
                    AND i.indpred IS NULL AND i.indexprs IS NULL
                  ORDER BY i.indisprimary DESC, i.indexrelid",
                &[&oid],
            )
            .await
            .map_err(|e| db::error(e, format!("job {}: reading indexes of {table}", job.name)))?;
        let exact = idx.iter().find(|r| r.get::<_, Vec<i16>>(1) == attnums);
        let Some(exact) = exact else {
            let mut wanted = attnums.clone();
            wanted.sort();
            let reordered = idx.iter().find(|r| {
                let mut cols: Vec<i16> = r.get(1);
                cols.sort();
                cols == wanted
            });
            let hint = match reordered {
                Some(r) => format!(
                    "; the unique index {} has these columns in another order: list `key` in the index's order",
                    r.get::<_, String>(0)
                ),
                None => format!(
                    "; create one (CREATE UNIQUE INDEX CONCURRENTLY … ON {table} ({})) or choose the primary key",
                    job.key.join(", ")
                ),
            };
            return Err(Error::Usage(format!(
                "job {}: key ({}) of {table} is not backed by a unique index: chunks are found by walking such an index, so that each key is visited once and no chunk scans the table{hint}",
                job.name,
                job.key.join(", ")
            )));
        };
        let index: String = exact.get(0);
        let collations: Vec<u32> = exact.get(2);
        let opclasses: Vec<String> = exact.get(3);
        for (i, k) in job.key.iter().enumerate() {
            let (own, own_name) = &collations_of_columns[i];
            if collations.get(i).is_some_and(|c| c != own) {
                return Err(Error::Usage(format!(
                    "job {}: the unique index {index} orders key column `{k}` ({}) by another collation than the column's own ({own_name}); the chunk bounds and the statement's `BETWEEN :start AND :end` compare in the column's collation, so the index cannot walk them — key the job on a unique index built with the column's collation",
                    job.name, columns[i].sql_type
                )));
            }
            if let Some(class) = opclasses.get(i).filter(|c| c.ends_with(" (not default)")) {
                return Err(Error::Usage(format!(
                    "job {}: the unique index {index} orders key column `{k}` ({}) with the operator class {}; the chunk bounds compare with the type's default ordering, which this index cannot serve (each chunk would scan the table) — key the job on a unique index with the default operator class",
                    job.name,
                    columns[i].sql_type,
                    class.trim_end_matches(" (not default)")
                )));
            }
        }
        Ok(Keyset {
            table: table.clone(),
            columns,
            index,
            walk: Walk::Index,
        })
    }

    /// The heap walk of `key = "ctid"`: needs TID range scans (PostgreSQL 14).
    async fn pages(client: &impl GenericClient, job: &JobSpec, oid: u32) -> Result<Keyset> {
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int, current_setting('server_version'),
                        CASE WHEN c.relpages > 0 AND c.reltuples > 0 THEN (c.reltuples / c.relpages)::float8 END
                   FROM pg_class c WHERE c.oid = $1",
                &[&oid],
            )
            .await
            .map_err(|e| db::error(e, format!("job {}: reading the server version", job.name)))?;
        let (num, version): (i32, String) = (row.get(0), row.get(1));
        if num < 140000 {
            return Err(Error::Usage(format!(
                "job {}: key = \"ctid\" walks the table by TID range scans, which need PostgreSQL 14 or later; this server is {version}. Give the table a unique key (CREATE UNIQUE INDEX CONCURRENTLY … on NOT NULL columns) and use it as `key`",
                job.name
            )));
        }
        Ok(Keyset {
            table: job.table.clone(),
            columns: vec![KeyColumn {
                name: CTID.into(),
                sql_type: "tid".into(),
            }],
            index: "(the table's pages)".into(),
            walk: Walk::Pages {
                rows_per_page: row.get::<_, Option<f64>>(2).unwrap_or(50.0).max(1.0),
            },
        })
    }
}
