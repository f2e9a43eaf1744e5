//! Checks a job's key against the catalog and resolves it into a [`Keyset`]: the table exists, the
//! key columns exist and are NOT NULL, exactly a valid unique index backs them (in order, with the
//! column's collation and the default operator class), and the `undo` columns exist; or, for
//! `key = "ctid"`, the server can walk the heap's pages.
//!
//! The catalog is read into plain values ([`TableColumn`], [`UniqueIndex`]) and each check is a
//! pure function over them, so the checks are unit-tested without a database. Every problem found
//! here is the job definition's (a usage error, exit 2), and is said in terms of the job file.
//! Only reads the catalog; never builds the walk's SQL (`walk`, `range`).

use super::{KeyColumn, Keyset, Walk};
use crate::db;
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::sql::CTID;
use tokio_postgres::GenericClient;

/// A column of the job's table, as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableColumn {
    name: String,
    /// `format_type` with the type modifier: `character(3)`, not `character`.
    sql_type: String,
    not_null: bool,
    attnum: i16,
    /// The column's own collation: its oid (0 for a type without one) and its name.
    collation: u32,
    collation_name: String,
}

/// A valid, ready, non-partial unique index on plain columns of the job's table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UniqueIndex {
    name: String,
    /// The indexed columns' attribute numbers, in index order.
    attnums: Vec<i16>,
    /// The collation each index column is ordered by.
    collations: Vec<u32>,
    /// Each index column's operator class, suffixed ` (not default)` when it is not the type's
    /// default one.
    opclasses: Vec<String>,
}

/// What an operator class name ends with when it is not its type's default.
const NOT_DEFAULT: &str = " (not default)";

/// The key columns found in the table, in key order, with what the index checks need.
struct FoundKey<'a> {
    columns: Vec<KeyColumn>,
    of_table: Vec<&'a TableColumn>,
}

impl Keyset {
    /// Checks that the table exists, that the key columns exist, are NOT NULL, and are exactly
    /// the columns of a valid unique index, in order, and that the `undo` columns exist.
    /// Definition problems are usage errors (exit 2).
    pub async fn resolve(client: &impl GenericClient, job: &JobSpec) -> Result<Keyset> {
        let oid = table_oid(client, job).await?;
        if job.key == [CTID] {
            return Self::pages(client, job, oid).await;
        }
        let table_columns = read_columns(client, job, oid).await?;
        let key = find_key_columns(job, &table_columns)?;
        check_undo_columns(job, &table_columns)?;
        let indexes = read_unique_indexes(client, job, oid).await?;
        let index = backing_index(job, &key, &indexes)?;
        check_index_ordering(job, &key, index)?;
        Ok(Keyset {
            table: job.table.clone(),
            columns: key.columns,
            index: index.name.clone(),
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

/// The job's table, as the connection's search_path resolves it; missing is the job file's error.
async fn table_oid(client: &impl GenericClient, job: &JobSpec) -> Result<u32> {
    let table = &job.table;
    let row = client
        .query_one("SELECT to_regclass($1)::oid", &[&table.quoted()])
        .await
        .map_err(|e| db::error(e, format!("job {}: looking up table {table}", job.name)))?;
    row.get::<_, Option<u32>>(0).ok_or_else(|| {
        Error::Usage(format!(
            "job {}: table `{table}` does not exist (or is not visible on the search_path of this connection); check `table` in {}",
            job.name,
            job.path.display()
        ))
    })
}

async fn read_columns(
    client: &impl GenericClient,
    job: &JobSpec,
    oid: u32,
) -> Result<Vec<TableColumn>> {
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
        .map_err(|e| {
            db::error(
                e,
                format!("job {}: reading columns of {}", job.name, job.table),
            )
        })?;
    Ok(rows
        .iter()
        .map(|r| TableColumn {
            name: r.get(0),
            sql_type: r.get(1),
            not_null: r.get(2),
            attnum: r.get::<_, i32>(3) as i16,
            collation: r.get(4),
            collation_name: r.get(5),
        })
        .collect())
}

async fn read_unique_indexes(
    client: &impl GenericClient,
    job: &JobSpec,
    oid: u32,
) -> Result<Vec<UniqueIndex>> {
    let rows = client
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
        .map_err(|e| {
            db::error(
                e,
                format!("job {}: reading indexes of {}", job.name, job.table),
            )
        })?;
    Ok(rows
        .iter()
        .map(|r| UniqueIndex {
            name: r.get(0),
            attnums: r.get(1),
            collations: r.get(2),
            opclasses: r.get(3),
        })
        .collect())
}

/// ` (did you mean `Name`?)` when the table has a column that differs from `wanted` only in case.
fn case_hint(columns: &[TableColumn], wanted: &str) -> String {
    columns
        .iter()
        .find(|c| c.name.eq_ignore_ascii_case(wanted))
        .map(|c| format!(" (did you mean `{}`?)", c.name))
        .unwrap_or_default()
}

/// Each key column must exist and be NOT NULL.
fn find_key_columns<'a>(job: &JobSpec, columns: &'a [TableColumn]) -> Result<FoundKey<'a>> {
    let table = &job.table;
    let mut found = FoundKey {
        columns: Vec::new(),
        of_table: Vec::new(),
    };
    for k in &job.key {
        let Some(c) = columns.iter().find(|c| c.name == *k) else {
            return Err(Error::Usage(format!(
                "job {}: key column `{k}` does not exist in table {table}{}; check `key` in {}",
                job.name,
                case_hint(columns, k),
                job.path.display()
            )));
        };
        if !c.not_null {
            return Err(Error::Usage(format!(
                "job {}: key column `{k}` of {table} is nullable; the key must be NOT NULL and unique (a primary key or a unique index on NOT NULL columns)",
                job.name
            )));
        }
        found.columns.push(KeyColumn {
            name: k.clone(),
            sql_type: c.sql_type.clone(),
        });
        found.of_table.push(c);
    }
    Ok(found)
}

/// Undo columns are copied by every chunk: a missing one would fail each chunk at run time with
/// an error that looks like a privilege or `sql` problem. It is the job file's.
fn check_undo_columns(job: &JobSpec, columns: &[TableColumn]) -> Result<()> {
    let Some(crate::job::Revert::Undo(undo)) = &job.revert else {
        return Ok(());
    };
    match undo.iter().find(|u| !columns.iter().any(|c| c.name == **u)) {
        None => Ok(()),
        Some(c) => Err(Error::Usage(format!(
            "job {}: {}: column `{c}` does not exist in table {}{}; `undo` names the columns `sql` changes, whose old values each chunk keeps for `backfill revert` (if the expand migration adds it, apply that first)",
            job.name,
            job.file_key("undo"),
            job.table,
            case_hint(columns, c),
        ))),
    }
}

/// The unique index whose columns are exactly the key's, in the key's order (the primary key
/// first). Without one, says whether an index has the columns in another order.
fn backing_index<'i>(
    job: &JobSpec,
    key: &FoundKey,
    indexes: &'i [UniqueIndex],
) -> Result<&'i UniqueIndex> {
    let attnums: Vec<i16> = key.of_table.iter().map(|c| c.attnum).collect();
    if let Some(exact) = indexes.iter().find(|i| i.attnums == attnums) {
        return Ok(exact);
    }
    let sorted = |cols: &[i16]| {
        let mut cols = cols.to_vec();
        cols.sort();
        cols
    };
    let wanted = sorted(&attnums);
    let reordered = indexes.iter().find(|i| sorted(&i.attnums) == wanted);
    let table = &job.table;
    let hint = match reordered {
        Some(i) => format!(
            "; the unique index {} has these columns in another order: list `key` in the index's order",
            i.name
        ),
        None => format!(
            "; create one (CREATE UNIQUE INDEX CONCURRENTLY … ON {table} ({})) or choose the primary key",
            job.key.join(", ")
        ),
    };
    Err(Error::Usage(format!(
        "job {}: key ({}) of {table} is not backed by a unique index: chunks are found by walking such an index, so that each key is visited once and no chunk scans the table{hint}",
        job.name,
        job.key.join(", ")
    )))
}

/// The index must order each key column as the bounds compare it: in the column's own collation
/// and with the type's default operator class.
fn check_index_ordering(job: &JobSpec, key: &FoundKey, index: &UniqueIndex) -> Result<()> {
    let name = &index.name;
    for (i, k) in job.key.iter().enumerate() {
        let (column, sql_type) = (key.of_table[i], &key.columns[i].sql_type);
        if index
            .collations
            .get(i)
            .is_some_and(|c| *c != column.collation)
        {
            return Err(Error::Usage(format!(
                "job {}: the unique index {name} orders key column `{k}` ({sql_type}) by another collation than the column's own ({}); the chunk bounds and the statement's `BETWEEN :start AND :end` compare in the column's collation, so the index cannot walk them — key the job on a unique index built with the column's collation",
                job.name, column.collation_name
            )));
        }
        if let Some(class) = index.opclasses.get(i).filter(|c| c.ends_with(NOT_DEFAULT)) {
            return Err(Error::Usage(format!(
                "job {}: the unique index {name} orders key column `{k}` ({sql_type}) with the operator class {}; the chunk bounds compare with the type's default ordering, which this index cannot serve (each chunk would scan the table) — key the job on a unique index with the default operator class",
                job.name,
                class.trim_end_matches(NOT_DEFAULT)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn job(key: &str, extra: &str) -> JobSpec {
        let text = format!(
            "table = \"t\"\nkey = {key}\nsql = \"UPDATE t SET n = 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n{extra}"
        );
        JobSpec::parse("j", Path::new("jobs/j.toml"), &text).unwrap()
    }

    fn column(name: &str, sql_type: &str, not_null: bool, attnum: i16) -> TableColumn {
        let collation = if sql_type == "text" { 100 } else { 0 };
        TableColumn {
            name: name.into(),
            sql_type: sql_type.into(),
            not_null,
            attnum,
            collation,
            collation_name: if collation == 0 { "" } else { "default" }.into(),
        }
    }

    fn index(name: &str, attnums: &[i16], collations: &[u32], opclasses: &[&str]) -> UniqueIndex {
        UniqueIndex {
            name: name.into(),
            attnums: attnums.to_vec(),
            collations: collations.to_vec(),
            opclasses: opclasses.iter().map(|c| c.to_string()).collect(),
        }
    }

    /// The checks in `resolve`'s order: the index backing the key, or the error's text.
    fn check(job: &JobSpec, indexes: &[UniqueIndex]) -> std::result::Result<String, String> {
        let columns = [
            column("id", "bigint", true, 1),
            column("tenant", "integer", true, 2),
            column("note", "text", false, 3),
            column("code", "text", true, 4),
            column("n", "integer", true, 5),
        ];
        let run = || -> Result<String> {
            let key = find_key_columns(job, &columns)?;
            check_undo_columns(job, &columns)?;
            let index = backing_index(job, &key, indexes)?;
            check_index_ordering(job, &key, index)?;
            Ok(index.name.clone())
        };
        run().map_err(|e| e.to_string())
    }

    #[test]
    fn a_key_is_checked_column_by_column_then_against_its_index() {
        let pkey = index("t_pkey", &[1], &[0], &["int8_ops"]);
        let tenant_id = index("t_tenant_id", &[2, 1], &[0, 0], &["int4_ops", "int8_ops"]);
        let code_c = index("t_code_c", &[4], &[950], &["text_ops"]);
        let code_pattern = index(
            "t_code_pattern",
            &[4],
            &[100],
            &["text_pattern_ops (not default)"],
        );
        let code = index("t_code", &[4], &[100], &["text_ops"]);
        // (key, more job file, the table's unique indexes, the backing index or the error's text)
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a [&'a UniqueIndex],
            std::result::Result<&'a str, &'a str>,
        );
        let cases: &[Case] = &[
            ("\"id\"", "", &[&pkey], Ok("t_pkey")),
            ("[\"tenant\", \"id\"]", "", &[&pkey, &tenant_id], Ok("t_tenant_id")),
            ("\"code\"", "", &[&code], Ok("t_code")),
            ("\"ID\"", "", &[&pkey], Err("key column `ID` does not exist in table t (did you mean `id`?); check `key` in jobs/j.toml")),
            ("\"nope\"", "", &[&pkey], Err("key column `nope` does not exist in table t; check")),
            ("\"note\"", "", &[], Err("key column `note` of t is nullable")),
            ("\"id\"", "undo = [\"n\", \"Tenant2\"]", &[&pkey], Err("column `Tenant2` does not exist in table t;")),
            ("\"id\"", "undo = [\"N\"]", &[&pkey], Err("column `N` does not exist in table t (did you mean `n`?); `undo` names")),
            ("\"id\"", "undo = [\"n\"]", &[&pkey], Ok("t_pkey")),
            ("\"tenant\"", "", &[&pkey, &tenant_id], Err("key (tenant) of t is not backed by a unique index: chunks are found by walking such an index, so that each key is visited once and no chunk scans the table; create one (CREATE UNIQUE INDEX CONCURRENTLY … ON t (tenant)) or choose the primary key")),
            ("[\"id\", \"tenant\"]", "", &[&tenant_id], Err("the unique index t_tenant_id has these columns in another order: list `key` in the index's order")),
            ("\"code\"", "", &[&code_c], Err("the unique index t_code_c orders key column `code` (text) by another collation than the column's own (default)")),
            ("\"code\"", "", &[&code_pattern], Err("with the operator class text_pattern_ops; the chunk bounds")),
            // The first index with exactly the key's columns is the one checked and walked.
            ("\"code\"", "", &[&code_c, &code], Err("t_code_c orders key column `code`")),
        ];
        for (key, extra, indexes, want) in cases {
            let indexes: Vec<UniqueIndex> = indexes.iter().map(|i| (*i).clone()).collect();
            let got = check(&job(key, extra), &indexes);
            match (want, &got) {
                (Ok(name), Ok(found)) => assert_eq!(name, found, "key {key} {extra}"),
                (Err(text), Err(message)) => assert!(
                    message.contains(text) && message.starts_with("job j: "),
                    "key {key} {extra}: {message}"
                ),
                _ => panic!("key {key} {extra}: expected {want:?}, got {got:?}"),
            }
        }
    }
}
