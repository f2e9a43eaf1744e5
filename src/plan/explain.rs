//! Reading `EXPLAIN (VERBOSE, FORMAT JSON)` of the job's statement: which relation it writes, and
//! how each relation is scanned. A scan that reads a relation whole (a `Seq Scan`, or an index
//! scan with no index condition) on a table the statement walks or writes is what makes a
//! backfill quadratic: every chunk pays for the whole table.
//! Reads a plan it is given; runs no statement itself and decides nothing about the job.

use serde_json::Value;
use tokio_postgres::types::{FromSql, Type};

/// A `json` column read as its text (the binary form of `json` is the text itself), so that the
/// plan can be parsed without a serde feature of the driver.
pub struct JsonText(pub String);

impl<'a> FromSql<'a> for JsonText {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> Result<JsonText, Box<dyn std::error::Error + Sync + Send>> {
        Ok(JsonText(std::str::from_utf8(raw)?.to_string()))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON
    }
}

/// A relation as EXPLAIN VERBOSE names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rel {
    pub schema: String,
    pub name: String,
}

impl std::fmt::Display for Rel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// One scan node of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub node: String,
    pub rel: Rel,
    pub index: Option<String>,
    /// True when the node reads the whole relation.
    pub full: bool,
}

#[derive(Debug, Default)]
pub struct Analysis {
    /// Relations written by a ModifyTable node (UPDATE, INSERT, DELETE, MERGE).
    pub written: Vec<Rel>,
    pub scans: Vec<Scan>,
}

impl Analysis {
    /// Full scans of any relation in `targets`.
    pub fn full_scans_of<'a>(&'a self, targets: &'a [Rel]) -> impl Iterator<Item = &'a Scan> {
        self.scans
            .iter()
            .filter(move |s| s.full && targets.contains(&s.rel))
    }
}

/// Parses the output of `EXPLAIN (VERBOSE, FORMAT JSON)`.
pub fn analyse(json: &str) -> Result<Analysis, String> {
    let v: Value =
        serde_json::from_str(json).map_err(|e| format!("unreadable EXPLAIN output: {e}"))?;
    let root = v
        .get(0)
        .and_then(|p| p.get("Plan"))
        .ok_or("EXPLAIN output without a plan")?;
    let mut a = Analysis::default();
    walk(root, None, &mut a);
    Ok(a)
}

fn rel_of(node: &Value) -> Option<Rel> {
    let name = node.get("Relation Name")?.as_str()?;
    let schema = node.get("Schema").and_then(Value::as_str).unwrap_or("");
    Some(Rel {
        schema: schema.to_string(),
        name: name.to_string(),
    })
}

/// `bitmap_rel`: the relation of the enclosing Bitmap Heap Scan, for its Bitmap Index Scans.
fn walk(node: &Value, bitmap_rel: Option<&Rel>, a: &mut Analysis) {
    let kind = node.get("Node Type").and_then(Value::as_str).unwrap_or("");
    let rel = rel_of(node);
    let index = node
        .get("Index Name")
        .and_then(Value::as_str)
        .map(str::to_string);
    match kind {
        "ModifyTable" => {
            if let Some(r) = &rel {
                a.written.push(r.clone());
            }
        }
        "Seq Scan" | "Sample Scan" => {
            if let Some(r) = &rel {
                a.scans.push(Scan {
                    node: kind.into(),
                    rel: r.clone(),
                    index: None,
                    full: true,
                });
            }
        }
        "Index Scan" | "Index Only Scan" => {
            if let Some(r) = &rel {
                a.scans.push(Scan {
                    node: kind.into(),
                    rel: r.clone(),
                    index,
                    full: node.get("Index Cond").is_none(),
                });
            }
        }
        "Bitmap Index Scan" => {
            if let Some(r) = bitmap_rel {
                a.scans.push(Scan {
                    node: kind.into(),
                    rel: r.clone(),
                    index,
                    full: node.get("Index Cond").is_none(),
                });
            }
        }
        _ => {}
    }
    let inner = if kind == "Bitmap Heap Scan" {
        rel.as_ref()
    } else {
        bitmap_rel
    };
    if let Some(Value::Array(children)) = node.get("Plans") {
        for c in children {
            walk(c, inner, a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_and_written_relations() {
        let plan = r#"[{"Plan": {"Node Type": "ModifyTable", "Operation": "Update",
            "Relation Name": "orders", "Schema": "public", "Plans": [
              {"Node Type": "Nested Loop", "Plans": [
                {"Node Type": "Index Scan", "Relation Name": "orders", "Schema": "public",
                 "Index Name": "orders_pkey", "Index Cond": "(id >= 1)"},
                {"Node Type": "Seq Scan", "Relation Name": "codes", "Schema": "public"},
                {"Node Type": "Bitmap Heap Scan", "Relation Name": "big", "Schema": "app",
                 "Plans": [{"Node Type": "Bitmap Index Scan", "Index Name": "big_idx",
                            "Index Cond": "(x = 1)"}]},
                {"Node Type": "Index Only Scan", "Relation Name": "other", "Schema": "public",
                 "Index Name": "other_pkey"}
              ]}]}}]"#;
        let a = analyse(plan).unwrap();
        let orders = Rel {
            schema: "public".into(),
            name: "orders".into(),
        };
        assert_eq!(a.written, vec![orders.clone()]);
        assert_eq!(a.scans.len(), 4);
        assert_eq!(a.scans[0].index.as_deref(), Some("orders_pkey"));
        assert!(!a.scans[0].full);
        assert!(a.scans[1].full);
        assert_eq!(a.scans[2].rel.to_string(), "app.big");
        assert!(!a.scans[2].full);
        assert!(
            a.scans[3].full,
            "an index scan without a condition reads it all"
        );
        assert_eq!(a.full_scans_of(&[orders]).count(), 0);
        assert!(analyse("[]").is_err());
    }
}
