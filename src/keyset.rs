//! Keys and the SQL built around them: the `:start`/`:end` placeholders in a job's statement, the
//! catalog checks that a key is usable, and the index walk that finds each chunk's bounds.
//!
//! Key values travel as their PostgreSQL text form and are bound as text parameters cast back to the
//! column's own type (`$1::text::bigint`), so every comparison happens in SQL, in the column's type
//! and collation, and uses the key's index; nothing is ever spliced into SQL and no key arithmetic
//! happens in Rust. One mechanism serves every key type (integers, text, uuid, timestamps, numeric).
//!
//! A table without a usable unique key can be walked by `key = "ctid"`: the "keys" are then the
//! heap's page numbers, each chunk a TID range scan over whole pages (PostgreSQL 14+), and
//! `:start`/`:end` stand for the first and last tuple id of those pages. An updated row gets a new
//! ctid (perhaps on a page still ahead), so such a job's statement must carry a guard predicate
//! (`AND new_col IS NULL`) that makes a second visit harmless.

use crate::db;
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::sql::{SqlTemplate, TableName, CTID};
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

/// A key value: one text-form value per key column, in key order.
pub type KeyValue = Vec<String>;

/// The next chunk of a walk: how many keys it holds, and its first and last key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkBounds {
    pub keys: i64,
    pub first: KeyValue,
    pub last: KeyValue,
}

/// Why a chunk cannot be run: the walk would not strictly move forward. Never retried: the same
/// bounds would come back, and a loop would apply the statement to the same rows again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stall {
    #[error("the chunk's bounds {} and {} do not read back as themselves when cast to the key's type {key}, so the statement would be bound to other keys than the ones found", show_key(.first), show_key(.last))]
    Lossy {
        key: String,
        first: KeyValue,
        last: KeyValue,
    },
    #[error("the cursor would not move forward: the chunk after key {} ends at key {} (key {key})", show_key(.cursor), show_key(.last))]
    NoAdvance {
        key: String,
        cursor: KeyValue,
        last: KeyValue,
    },
}

/// The highest line pointer number a tuple id can name: `(p,65535)` is past every tuple of page p.
const LAST_LINE_POINTER: u32 = 65535;

/// Renders a key value for messages: `42` or `(7, 42)`.
pub fn show_key(key: &[String]) -> String {
    if key.len() == 1 {
        key[0].clone()
    } else {
        format!("({})", key.join(", "))
    }
}

/// One key column and its SQL type, exactly as `format_type` names it with the column's type
/// modifier (`character(3)`, `numeric(12,2)`, `bit(6)`): every bound is cast to this type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyColumn {
    pub name: String,
    pub sql_type: String,
}

/// How the key space is walked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Walk {
    /// Along a unique index on the key columns.
    Index,
    /// Over the heap's pages (`key = "ctid"`), about this many rows per page.
    Pages { rows_per_page: f64 },
}

/// A job's key, checked against the catalog: the columns, their types and the unique index that
/// backs the walk (or the heap, for `ctid`).
#[derive(Debug, Clone)]
pub struct Keyset {
    pub table: TableName,
    pub columns: Vec<KeyColumn>,
    pub index: String,
    pub walk: Walk,
}

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

    pub fn is_ctid(&self) -> bool {
        matches!(self.walk, Walk::Pages { .. })
    }

    /// The values bound to `:start` and `:end` for a chunk from `first` to `last`: the keys
    /// themselves, or for the page walk the first and the last possible tuple id of those pages.
    pub fn statement_bounds(&self, first: &[String], last: &[String]) -> (KeyValue, KeyValue) {
        match self.walk {
            Walk::Index => (first.to_vec(), last.to_vec()),
            Walk::Pages { .. } => (
                vec![format!("({},0)", first[0])],
                vec![format!("({},{LAST_LINE_POINTER})", last[0])],
            ),
        }
    }

    /// Query for a key that splits the keys after a cursor and before an upper bound in two: the
    /// `offset`-th key (an index walk), or with `sampled` the middle of a page sample of `percent`
    /// of the table. Returns one text array, or no row. Parameters: [cursor…,] upper…, offset
    /// (bigint) or percent (float8). Always strictly inside (cursor, upper).
    pub fn split_sql(&self, after_cursor: bool, sampled: bool) -> String {
        let n = self.columns.len();
        let (lower, upper_at) = if after_cursor {
            (
                format!("{} > {} AND ", self.row(), self.bind_expr(1)),
                n + 1,
            )
        } else {
            (String::new(), 1)
        };
        let last = upper_at + n;
        if self.is_ctid() {
            let cursor = if after_cursor {
                "$1::text::bigint"
            } else {
                "-1"
            };
            return format!(
                "SELECT ARRAY[m::text] FROM (SELECT ({cursor} + ${upper_at}::text::bigint) / 2 AS m) s
                  WHERE m > {cursor} AND m < ${upper_at}::text::bigint AND ${last}::bigint >= 0"
            );
        }
        let range = format!(
            "{lower}{row} < {upper}",
            row = self.row(),
            upper = self.bind_expr(upper_at)
        );
        if sampled {
            format!(
                "SELECT k FROM (SELECT {arr} AS k, row_number() OVER (ORDER BY {cols}) AS rn, count(*) OVER () AS n
                                  FROM {table} TABLESAMPLE SYSTEM ((${last}::float8)::float4) WHERE {range}) s
                  WHERE rn = (n + 1) / 2",
                arr = self.text_array(),
                cols = self.cols(""),
                table = self.table.quoted(),
            )
        } else {
            format!(
                "SELECT {arr} FROM {table} WHERE {range} ORDER BY {cols} OFFSET ${last}::bigint LIMIT 1",
                arr = self.text_array(),
                cols = self.cols(""),
                table = self.table.quoted(),
            )
        }
    }

    /// `SELECT a > b` for two key values of this key, bound as parameters a…, b… (for the page
    /// walk, page numbers).
    pub fn after_sql(&self) -> String {
        if self.is_ctid() {
            return "SELECT $1::text::bigint > $2::text::bigint".into();
        }
        format!(
            "SELECT {} > {}",
            self.bind_expr(1),
            self.bind_expr(self.columns.len() + 1)
        )
    }

    fn cols(&self, suffix: &str) -> String {
        self.columns
            .iter()
            .map(|c| format!("{}{suffix}", crate::sql::quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn row(&self) -> String {
        if self.columns.len() == 1 {
            self.cols("")
        } else {
            format!("({})", self.cols(""))
        }
    }

    fn text_array(&self) -> String {
        format!("ARRAY[{}]", self.cols("::text"))
    }

    /// The job statement with placeholders replaced by parameter expressions: `:start` binds
    /// parameters 1..=n, `:end` n+1..=2n, each cast to its key column's type.
    pub fn render(&self, statement: &SqlTemplate) -> String {
        let n = self.columns.len();
        statement.substitute(&self.bind_expr(1), &self.bind_expr(n + 1))
    }

    /// The job statement with the bounds written as typed literals, for an operator to read and
    /// run by hand (`backfill plan`). Runs never use this: they bind parameters.
    pub fn render_with(&self, statement: &SqlTemplate, start: &[String], end: &[String]) -> String {
        statement.substitute(&self.literal(start), &self.literal(end))
    }

    /// The parameter expression for a key value starting at parameter `first`: `$1::text::bigint`
    /// or `($1::text::int, $2::text::bigint)`.
    pub fn bind_expr(&self, first: usize) -> String {
        row_value(
            self.columns
                .iter()
                .enumerate()
                .map(|(i, c)| format!("${}::text::{}", first + i, c.sql_type))
                .collect(),
        )
    }

    /// A key value as SQL text: `'42'::bigint` or `('7'::int, '42'::bigint)`.
    pub fn literal(&self, key: &[String]) -> String {
        row_value(
            self.columns
                .iter()
                .zip(key)
                .map(|(c, v)| format!("'{}'::{}", v.replace('\'', "''"), c.sql_type))
                .collect(),
        )
    }

    /// Query returning each row of a key range as (key as a text array, the row as JSON text).
    /// Parameters: first key…, last key….
    pub fn rows_between_sql(&self) -> String {
        let n = self.columns.len();
        format!(
            "SELECT {arr}, to_jsonb(bf_row)::text FROM {table} AS bf_row
              WHERE {row} >= {lo} AND {row} <= {hi}",
            arr = self.text_array(),
            table = self.table.quoted(),
            row = self.row(),
            lo = self.bind_expr(1),
            hi = self.bind_expr(n + 1),
        )
    }

    /// Query counting the rows of a key range now (for the page walk, the live rows of its
    /// pages). Parameters: first key…, last key….
    pub fn count_between_sql(&self) -> String {
        let n = self.columns.len();
        format!(
            "SELECT count(*) FROM {table} WHERE {row} >= {lo} AND {row} <= {hi}",
            table = self.table.quoted(),
            row = self.row(),
            lo = self.bind_expr(1),
            hi = self.bind_expr(n + 1),
        )
    }

    /// A bigint expression: the rows of the table (and of its partitions) that the current
    /// transaction has inserted, updated or deleted so far. Read before and after a statement,
    /// the difference is what the statement (and the triggers it fired) wrote to the table,
    /// whatever table the statement itself targets. Only a difference inside one transaction
    /// means anything: PostgreSQL 15 keeps adding earlier transactions' counts until the
    /// session's statistics are flushed.
    pub fn written_sql(&self) -> String {
        format!(
            "(SELECT coalesce(sum(pg_stat_get_xact_tuples_inserted(relid) + pg_stat_get_xact_tuples_updated(relid)
                                 + pg_stat_get_xact_tuples_deleted(relid)), 0)
                FROM (SELECT '{t}'::regclass AS relid
                       UNION SELECT relid FROM pg_partition_tree('{t}'::regclass)) r)::bigint",
            t = self.table.quoted().replace('\'', "''")
        )
    }

    /// Query returning the greatest key now in the table (as a text array), or no row. For the
    /// page walk: the last page.
    pub fn last_key_sql(&self) -> String {
        if self.is_ctid() {
            return format!(
                "SELECT ARRAY[(n - 1)::text] FROM (SELECT pg_relation_size('{t}'::regclass) / current_setting('block_size')::bigint AS n) s WHERE n > 0",
                t = self.table.quoted().replace('\'', "''")
            );
        }
        format!(
            "SELECT {} FROM {} ORDER BY {} LIMIT 1",
            self.text_array(),
            self.table.quoted(),
            self.cols(" DESC")
        )
    }

    /// Query for the next chunk after a cursor: returns (key count, first key, last key) of the
    /// next `limit` keys in index order that are greater than the cursor and at most the upper
    /// bound, and the two checks [`Keyset::read_bounds`] needs. Parameters: [cursor…,] upper…,
    /// limit.
    ///
    /// Each part is a plain walk of the key's index, with nothing materialised or sorted: the
    /// first key is the first entry, and the last is the entry `limit - 1` further on. Only when
    /// fewer than `limit` keys are left (the final chunk) are they counted and the greatest taken.
    pub fn next_chunk_sql(&self, after_cursor: bool) -> String {
        let found = match self.walk {
            Walk::Pages { rows_per_page } => self.next_pages_sql(after_cursor, rows_per_page),
            Walk::Index => self.next_keys_sql(after_cursor),
        };
        self.checked(&found, after_cursor)
    }

    /// Adds to a bounds query (count, first, last) two columns that make a walk that does not
    /// move forward impossible to miss: whether both bounds read back unchanged when cast to the
    /// key's types (a lossy cast would bind another value than the one found), and whether the
    /// last key is past the cursor, compared in the key's types.
    fn checked(&self, found: &str, after_cursor: bool) -> String {
        let advances = if after_cursor {
            format!("{} > {}", self.recast("c.last"), self.cursor_expr())
        } else {
            "true".into()
        };
        format!(
            "SELECT c.n, c.first, c.last,
                    c.first IS NULL OR ({first} = c.first AND {last} = c.last),
                    c.first IS NULL OR ({advances})
               FROM ({found}) c(n, first, last)",
            first = self.retext("c.first"),
            last = self.retext("c.last"),
        )
    }

    /// The types values are bound as, one per key column (page numbers for the page walk).
    fn bound_types(&self) -> Vec<&str> {
        match self.walk {
            Walk::Index => self.columns.iter().map(|c| c.sql_type.as_str()).collect(),
            Walk::Pages { .. } => vec!["bigint"],
        }
    }

    /// A text array of key values cast to the key's types, as a key value.
    fn recast(&self, array: &str) -> String {
        let parts = self.bound_types().into_iter().enumerate();
        row_value(
            parts
                .map(|(i, t)| format!("({array}[{}])::{t}", i + 1))
                .collect(),
        )
    }

    /// A text array of key values cast to the key's types and back to text.
    fn retext(&self, array: &str) -> String {
        let parts = self.bound_types().into_iter().enumerate();
        let parts: Vec<String> = parts
            .map(|(i, t)| format!("(({array}[{}])::{t})::text", i + 1))
            .collect();
        format!("ARRAY[{}]", parts.join(", "))
    }

    /// The cursor parameter(s) of the bounds query as a key value.
    fn cursor_expr(&self) -> String {
        match self.walk {
            Walk::Index => self.bind_expr(1),
            Walk::Pages { .. } => "$1::text::bigint".into(),
        }
    }

    /// Reads a row of [`Keyset::next_chunk_sql`]: the next chunk, or None when no key is left.
    /// A chunk whose bounds do not read back as themselves, or whose last key is not strictly
    /// past the cursor, is refused: walking on would visit keys again, or forever.
    pub fn read_bounds(
        &self,
        row: &tokio_postgres::Row,
        cursor: Option<&KeyValue>,
    ) -> std::result::Result<Option<ChunkBounds>, Stall> {
        let (Some(first), Some(last)) = (
            row.get::<_, Option<KeyValue>>(1),
            row.get::<_, Option<KeyValue>>(2),
        ) else {
            return Ok(None);
        };
        let (lossless, advances): (bool, bool) = (row.get(3), row.get(4));
        let key = self.describe();
        if !lossless {
            return Err(Stall::Lossy { key, first, last });
        }
        if let Some(cursor) = cursor {
            if !advances || *cursor == last {
                return Err(Stall::NoAdvance {
                    key,
                    cursor: cursor.clone(),
                    last,
                });
            }
        }
        Ok(Some(ChunkBounds {
            keys: row.get(0),
            first,
            last,
        }))
    }

    /// The key for messages: `code character(3)` or `(tenant_id integer, id bigint)`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("{} {}", c.name, c.sql_type))
            .collect();
        row_value(parts)
    }

    fn next_keys_sql(&self, after_cursor: bool) -> String {
        let n = self.columns.len();
        let (lower, upper_at) = if after_cursor {
            (
                format!("{} > {} AND ", self.row(), self.bind_expr(1)),
                n + 1,
            )
        } else {
            (String::new(), 1)
        };
        let limit_at = upper_at + n;
        let range = format!(
            "FROM {table} WHERE {lower}{row} <= {upper}",
            table = self.table.quoted(),
            row = self.row(),
            upper = self.bind_expr(upper_at),
        );
        format!(
            "SELECT CASE WHEN w.nth IS NOT NULL THEN ${limit_at}::bigint
                         ELSE (SELECT count(*) {range}) END,
                    (SELECT {arr} {range} ORDER BY {cols} LIMIT 1),
                    coalesce(w.nth, (SELECT {arr} {range} ORDER BY {desc} LIMIT 1))
               FROM (SELECT (SELECT {arr} {range} ORDER BY {cols}
                              OFFSET ${limit_at}::bigint - 1 LIMIT 1) AS nth) w",
            cols = self.cols(""),
            arr = self.text_array(),
            desc = self.cols(" DESC"),
        )
    }
}

impl Keyset {
    /// [`Keyset::next_chunk_sql`] for the page walk: the next pages after the cursor page, as many
    /// as should hold `limit` rows, up to the last page; their live rows are counted (a TID range
    /// scan), and may be none — the walk ends when the first page is past the upper bound.
    fn next_pages_sql(&self, after_cursor: bool, rows_per_page: f64) -> String {
        let (cursor, upper, limit) = if after_cursor {
            ("$1::text::bigint", "$2::text::bigint", "$3::bigint")
        } else {
            ("-1::bigint", "$1::text::bigint", "$2::bigint")
        };
        format!(
            "WITH b AS (SELECT {cursor} + 1 AS lo,
                               least({cursor} + greatest(1, ceil({limit} / {rows_per_page:.3}))::bigint, {upper}) AS hi)
             SELECT CASE WHEN b.lo > b.hi THEN 0
                         ELSE (SELECT count(*) FROM {table}
                                WHERE ctid >= format('(%s,0)', b.lo)::tid
                                  AND ctid <= format('(%s,{LAST_LINE_POINTER})', b.hi)::tid) END,
                    CASE WHEN b.lo <= b.hi THEN ARRAY[b.lo::text] END,
                    CASE WHEN b.lo <= b.hi THEN ARRAY[b.hi::text] END
               FROM b",
            table = self.table.quoted(),
        )
    }
}

/// The parameters of [`Keyset::next_chunk_sql`], in its order: [cursor…,] upper…, limit.
pub fn next_chunk_params<'a>(
    cursor: Option<&'a KeyValue>,
    upper: &'a KeyValue,
    limit: &'a i64,
) -> Vec<&'a (dyn ToSql + Sync)> {
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
    if let Some(c) = cursor {
        params.extend(c.iter().map(|v| v as &(dyn ToSql + Sync)));
    }
    params.extend(upper.iter().map(|v| v as &(dyn ToSql + Sync)));
    params.push(limit);
    params
}

/// One expression per key column as a key value: the expression itself, or a row value.
fn row_value(mut parts: Vec<String>) -> String {
    if parts.len() == 1 {
        parts.remove(0)
    } else {
        format!("({})", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyset(types: &[&str]) -> Keyset {
        Keyset {
            table: TableName {
                schema: None,
                name: "t".into(),
            },
            columns: types
                .iter()
                .enumerate()
                .map(|(i, t)| KeyColumn {
                    name: format!("k{i}"),
                    sql_type: t.to_string(),
                })
                .collect(),
            index: "t_pkey".into(),
            walk: Walk::Index,
        }
    }
    #[test]
    fn bounds_render_as_typed_literals_for_reading() {
        let t =
            SqlTemplate::parse("UPDATE t SET n = 1 WHERE (a, b) BETWEEN :start AND :end").unwrap();
        let k = keyset(&["int", "text"]);
        assert_eq!(
            k.render_with(&t, &["1".into(), "o'k".into()], &["2".into(), "z".into()]),
            "UPDATE t SET n = 1 WHERE (a, b) BETWEEN ('1'::int, 'o''k'::text) AND ('2'::int, 'z'::text)"
        );
    }

    #[test]
    fn placeholders_render_as_typed_binds() {
        let t =
            SqlTemplate::parse("UPDATE t SET n = n + 1 WHERE id BETWEEN :start AND :end").unwrap();
        assert_eq!(
            keyset(&["bigint"]).render(&t),
            "UPDATE t SET n = n + 1 WHERE id BETWEEN $1::text::bigint AND $2::text::bigint"
        );
        let c = SqlTemplate::parse("WHERE (a, b) BETWEEN :start AND :end").unwrap();
        assert_eq!(
            keyset(&["integer", "uuid"]).render(&c),
            "WHERE (a, b) BETWEEN ($1::text::integer, $2::text::uuid) AND ($3::text::integer, $4::text::uuid)"
        );
    }
}
