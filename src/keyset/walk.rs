//! The walk: the bounds query that finds the next chunk (the index walk and the page walk of
//! `ctid`), its parameters, the decoding of its row with the guard against a walk that would not
//! move forward ([`Stall`]), and [`Keyset::next_chunk`], which does all of that on any client.
//! Runs and `backfill plan` both find chunks through it, so a plan shows the chunk a run takes.
//!
//! Never opens or ends a transaction and never touches the checkpoint: the caller holds the
//! transaction (and, for a run, the range's lock) around it.

use super::{row_value, ChunkBounds, KeyValue, Keyset, Stall, Walk, LAST_LINE_POINTER};
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, ToStatement};

/// Why [`Keyset::next_chunk`] found no chunk: the bounds query failed (the error is kept whole, so
/// the caller can classify it by SQLSTATE), or the walk would not move forward.
#[derive(Debug, thiserror::Error)]
pub enum NextChunkError {
    #[error(transparent)]
    Query(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Stalled(#[from] Stall),
}

impl Keyset {
    /// The next chunk of a walk, on any client (a run's chunk transaction, a plan's probe): the
    /// next `limit` keys after `cursor` (from the first key when None) and at most `upper`, or
    /// None when no key is left. Binds the parameters, runs the bounds query, and refuses a walk
    /// that would not move forward ([`Keyset::read_bounds`]).
    ///
    /// `query` is [`Keyset::next_chunk_sql`]`(cursor.is_some())`, as text or as a statement the
    /// caller prepared from that text (a run prepares it once per connection); given the other
    /// one, the parameter count does not match and the query fails.
    pub async fn next_chunk<Q>(
        &self,
        client: &impl GenericClient,
        query: &Q,
        cursor: Option<&KeyValue>,
        upper: &KeyValue,
        limit: i64,
    ) -> Result<Option<ChunkBounds>, NextChunkError>
    where
        Q: ToStatement + Sync + Send + ?Sized,
    {
        let params = next_chunk_params(cursor, upper, &limit);
        let row = client.query_one(query, &params).await?;
        Ok(self.read_bounds(&row, cursor)?)
    }
}

impl Keyset {
    /// Query for the next chunk after a cursor: returns (key count, first key, last key) of the
    /// next `limit` keys in index order that are greater than the cursor and at most the upper
    /// bound, and the two checks [`Keyset::read_bounds`] needs. Parameters: [cursor…,] upper…,
    /// limit.
    ///
    /// Each part is a plain walk of the key's index, with nothing materialised or sorted: the
    /// first key is the first entry, and the last is the entry `limit - 1` further on. Only that
    /// entry is turned into text: the walk past the others reads the key columns alone (turning
    /// every skipped key into a text array cost three times the walk itself), and only once
    /// (`OFFSET 0` keeps the planner from copying the walk into each place that reads it). Only when
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

    /// A condition true when no key of the table lies strictly between the key bound at
    /// parameters `$first…` (a cursor) and the one bound after it (a chunk's first key): bounds
    /// found earlier still start at the first key after the cursor. Always true for the page
    /// walk, whose chunk starts at the page after the cursor's.
    pub fn nothing_between_sql(&self, first: usize) -> String {
        match self.walk {
            Walk::Pages { .. } => "true".into(),
            Walk::Index => format!(
                "NOT EXISTS (SELECT 1 FROM {table} WHERE {row} > {cursor} AND {row} < {next})",
                table = self.table.quoted(),
                row = self.row(),
                cursor = self.bind_expr(first),
                next = self.bind_expr(first + self.columns.len()),
            ),
        }
    }

    /// What [`Keyset::nothing_between_sql`] binds, in its order: the cursor's key columns, then
    /// the first key's (nothing for the page walk, whose condition binds none).
    pub fn nothing_between_params<'a>(
        &self,
        cursor: &'a KeyValue,
        first: &'a KeyValue,
    ) -> Vec<&'a (dyn ToSql + Sync)> {
        match self.walk {
            Walk::Pages { .. } => Vec::new(),
            Walk::Index => cursor
                .iter()
                .chain(first)
                .map(|v| v as &(dyn ToSql + Sync))
                .collect(),
        }
    }

    fn next_keys_sql(&self, after_cursor: bool) -> String {
        let (lower, upper_at) = self.after_cursor(after_cursor);
        let limit_at = upper_at + self.columns.len();
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
               FROM (SELECT (SELECT {arr} FROM (SELECT {cols} {range} ORDER BY {cols}
                                                 OFFSET ${limit_at}::bigint - 1 LIMIT 1) k) AS nth
                      OFFSET 0) w",
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
fn next_chunk_params<'a>(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(parts: &[&str]) -> KeyValue {
        parts.iter().map(|p| p.to_string()).collect()
    }

    /// The bounds query's parameters in its order: [cursor…,] upper…, limit.
    #[test]
    fn bounds_parameters_are_cursor_then_upper_then_limit() {
        let cases: &[(Option<KeyValue>, KeyValue, i64, &str)] = &[
            (None, key(&["9"]), 5, r#"["9", 5]"#),
            (Some(key(&["3"])), key(&["9"]), 5, r#"["3", "9", 5]"#),
            (
                Some(key(&["1", "40"])),
                key(&["3", "50"]),
                4,
                r#"["1", "40", "3", "50", 4]"#,
            ),
        ];
        for (cursor, upper, limit, want) in cases {
            let params = next_chunk_params(cursor.as_ref(), upper, limit);
            assert_eq!(format!("{params:?}"), *want, "cursor {cursor:?}");
        }
    }
}
