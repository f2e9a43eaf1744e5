//! The first chunk's rows as the probe snapshots them (key → column → value), and what changed
//! between two snapshots. Pure: the probe takes the snapshots; this module only compares them.

use std::collections::{BTreeMap, BTreeSet};

/// The chunk's rows, by key (text form), as JSON objects of column → value.
pub(super) type Rows = BTreeMap<Vec<String>, serde_json::Map<String, serde_json::Value>>;

/// Columns whose value differs between two snapshots, with the number of rows each changed in.
pub(super) fn changed_columns(a: &Rows, b: &Rows) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (key, row) in b {
        let old = a.get(key);
        for (col, v) in row {
            if old.and_then(|o| o.get(col)) != Some(v) {
                *out.entry(col.clone()).or_insert(0) += 1;
            }
        }
    }
    out
}

/// Rows that differ (or appeared, or vanished) between two snapshots.
pub(super) fn changed_rows(a: &Rows, b: &Rows) -> usize {
    let keys: BTreeSet<_> = a.keys().chain(b.keys()).collect();
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Rows from `(key, {column: value})` pairs.
    fn rows(list: &[(&str, serde_json::Value)]) -> Rows {
        list.iter()
            .map(|(k, v)| {
                let serde_json::Value::Object(m) = v.clone() else {
                    panic!("an object")
                };
                (vec![k.to_string()], m)
            })
            .collect()
    }

    #[test]
    fn changes_between_snapshots_are_counted_by_column_and_by_row() {
        let before = rows(&[
            ("1", json!({"a": 1, "b": null})),
            ("2", json!({"a": 2, "b": null})),
        ]);
        /// The rows after, the columns changed (with their row counts), the rows changed.
        type Case = (Rows, &'static [(&'static str, usize)], usize);
        let cases: [Case; 5] = [
            (before.clone(), &[], 0),
            (
                rows(&[
                    ("1", json!({"a": 1, "b": "x"})),
                    ("2", json!({"a": 2, "b": "y"})),
                ]),
                &[("b", 2)],
                2,
            ),
            (
                rows(&[
                    ("1", json!({"a": 9, "b": "x"})),
                    ("2", json!({"a": 2, "b": null})),
                ]),
                &[("a", 1), ("b", 1)],
                1,
            ),
            // A row that vanished changes no column, but is a changed row.
            (rows(&[("1", json!({"a": 1, "b": null}))]), &[], 1),
            // A row that appeared changes every one of its columns.
            (
                rows(&[
                    ("1", json!({"a": 1, "b": null})),
                    ("2", json!({"a": 2, "b": null})),
                    ("3", json!({"a": 3, "b": null})),
                ]),
                &[("a", 1), ("b", 1)],
                1,
            ),
        ];
        for (after, columns, changed) in cases {
            let expected: BTreeMap<String, usize> =
                columns.iter().map(|(c, n)| (c.to_string(), *n)).collect();
            assert_eq!(changed_columns(&before, &after), expected, "{after:?}");
            assert_eq!(changed_rows(&before, &after), changed, "{after:?}");
        }
    }
}
