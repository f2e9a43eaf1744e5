//! The statements over a key range or the whole table, other than the chunk walk: a key that
//! splits a range, comparing two keys, the rows and the row count between two keys, the rows a
//! transaction has written to the table, and the greatest key now.
//!
//! Builds SQL text only (parameters bound by the caller, in the order each function states); never
//! runs it, and never builds the bounds query (`walk`).

use super::Keyset;

impl Keyset {
    /// Query for a key that splits the keys after a cursor and before an upper bound in two: the
    /// `offset`-th key (an index walk), or with `sampled` the middle of a page sample of `percent`
    /// of the table. Returns one text array, or no row. Parameters: [cursor…,] upper…, offset
    /// (bigint) or percent (float8). Always strictly inside (cursor, upper).
    pub fn split_sql(&self, after_cursor: bool, sampled: bool) -> String {
        let (lower, upper_at) = self.after_cursor(after_cursor);
        let last = upper_at + self.columns.len();
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
}
