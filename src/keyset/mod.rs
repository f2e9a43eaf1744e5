//! Keys and the SQL built around them: what a job statement's `:start`/`:end` placeholders (parsed
//! by `sql::template`) become for this key, the catalog checks that a key is usable, and the index
//! walk that finds each chunk's bounds.
//!
//! This file owns the key's types (a key value, a chunk's bounds, why a walk stalls, the resolved
//! [`Keyset`]) and how a key value is written as SQL (binds, literals, the rendered statement).
//! The rest is split by what it asks of the database:
//!
//! - `catalog`: [`Keyset::resolve`], the checks of a job's key against the catalog (table,
//!   columns, NOT NULL, the unique index, its collation and operator class).
//! - `walk`: the bounds query of the index and page walks, its parameters and its decoding, and
//!   [`Keyset::next_chunk`], the one function that finds the next chunk (for runs and plans).
//! - `range`: the other statements over a key range or the table (split, compare, read, count,
//!   written rows, the greatest key).
//!
//! The key module builds SQL and reads its answers; it never opens transactions, writes the
//! engine's schema (`store`) or decides what a run does with a stalled walk (the engine).
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

use crate::sql::{SqlTemplate, TableName};

mod catalog;
mod range;
mod walk;

pub use walk::NextChunkError;

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

    /// The lower end of a key range in SQL, for statements whose parameters are `[cursor…,]
    /// upper…, …`: `(row) > (cursor) AND ` after a cursor (empty from the first key), and the
    /// parameter number where the upper bound starts.
    pub(crate) fn after_cursor(&self, after_cursor: bool) -> (String, usize) {
        if after_cursor {
            (
                format!("{} > {} AND ", self.row(), self.bind_expr(1)),
                self.columns.len() + 1,
            )
        } else {
            (String::new(), 1)
        }
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

    /// The key for messages: `code character(3)` or `(tenant_id integer, id bigint)`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("{} {}", c.name, c.sql_type))
            .collect();
        row_value(parts)
    }
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
