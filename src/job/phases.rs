//! What a job declares around its main pass: the precondition (`requires_sql`; the migrator's
//! expand and contract revisions are read by [`super::migration`]), how many sweeps may chase rows
//! written behind the cursor, the finishing steps, and how the job is reverted (`down_sql` or
//! `undo` columns). Offline like all of job parsing: that each finishing step is one statement is
//! checked when the job is resolved against the project (`crate::resolve`), not here.

use super::locate::Locator;
use super::migration::MigrationSpec;
use super::raw::RawJob;
use crate::error::Result;
use crate::sql::{SqlTemplate, CTID};
use toml::Spanned;

/// Sweeps after the main pass when `verify` still counts rows, unless the job says otherwise.
pub const DEFAULT_MAX_SWEEPS: u32 = 3;
const MAX_SWEEPS_LIMIT: i64 = 100;

/// How `backfill revert` undoes the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revert {
    /// A statement run chunk by chunk like the forward one.
    DownSql(SqlTemplate),
    /// These columns' values before the job touched them are kept in an undo table and put back.
    Undo(Vec<String>),
}

/// The parsed phase settings of one job.
pub(super) struct Phases {
    pub requires_sql: Option<String>,
    pub max_sweeps: u32,
    pub finish_sql: Vec<String>,
    pub revert: Option<Revert>,
    pub migration: Option<MigrationSpec>,
}

pub(super) fn parse(at: &Locator<'_>, raw: &RawJob, key: &[String]) -> Result<Phases> {
    let requires_sql = match &raw.requires_sql {
        None => None,
        Some(q) => Some(query(at, "requires_sql", q, "a query returning true once the backfill may run, e.g. SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'orders' AND column_name = 'status')")?),
    };
    let max_sweeps = match &raw.max_sweeps {
        None => DEFAULT_MAX_SWEEPS,
        Some(n) if (0..=MAX_SWEEPS_LIMIT).contains(n.get_ref()) => *n.get_ref() as u32,
        Some(n) => {
            return Err(at.err(
                "max_sweeps",
                n,
                format!(
                    "{} is out of range: use 0 (no sweep) to {MAX_SWEEPS_LIMIT}",
                    n.get_ref()
                ),
            ))
        }
    };
    let finish_sql = match &raw.finish_sql {
        None => Vec::new(),
        Some(list) => {
            let mut steps = Vec::new();
            for (i, s) in list.get_ref().iter().enumerate() {
                let s = s.trim().trim_end_matches(';').trim();
                if s.is_empty() {
                    return Err(at.err("finish_sql", list, format!("step {} is empty", i + 1)));
                }
                if SqlTemplate::mentions_placeholder(s) {
                    return Err(at.err("finish_sql", list, format!("step {} uses :start/:end; finishing steps run once over the whole table", i + 1)));
                }
                steps.push(s.to_string());
            }
            steps
        }
    };
    let revert =
        match (&raw.down_sql, &raw.undo) {
            (Some(_), Some(u)) => return Err(at.err(
                "undo",
                u,
                "declare either `down_sql` or `undo`, not both: the revert must have one meaning",
            )),
            (Some(d), None) => Some(Revert::DownSql(
                SqlTemplate::parse(d.get_ref()).map_err(|m| at.err("down_sql", d, m))?,
            )),
            (None, Some(u)) => Some(Revert::Undo(undo_columns(at, u, key)?)),
            (None, None) => None,
        };
    let migration = match &raw.migration {
        None => None,
        Some(m) => Some(super::migration::parse(at, m.get_ref())?),
    };
    Ok(Phases {
        requires_sql,
        max_sweeps,
        finish_sql,
        revert,
        migration,
    })
}

fn query(at: &Locator<'_>, key: &str, q: &Spanned<String>, example: &str) -> Result<String> {
    let text = q.get_ref().trim().trim_end_matches(';').trim();
    if text.is_empty() {
        return Err(at.err(key, q, format!("empty query: give {example}")));
    }
    if SqlTemplate::mentions_placeholder(text) {
        return Err(at.err(key, q, "this query takes no :start/:end placeholders"));
    }
    Ok(text.to_string())
}

fn undo_columns(at: &Locator<'_>, u: &Spanned<Vec<String>>, key: &[String]) -> Result<Vec<String>> {
    if key.iter().any(|k| k == CTID) {
        return Err(at.err("undo", u, "undo needs a real key to put values back by (a row's ctid changes when it is updated); use a key column, or `down_sql`"));
    }
    let mut cols: Vec<String> = Vec::new();
    for c in u.get_ref() {
        let c = c.trim();
        if c.is_empty() {
            return Err(at.err("undo", u, "empty column name"));
        }
        if key.iter().any(|k| k == c) {
            return Err(at.err(
                "undo",
                u,
                format!("`{c}` is a key column; key values identify rows and are never changed by a backfill"),
            ));
        }
        if cols.iter().any(|x| x == c) {
            return Err(at.err("undo", u, format!("column `{c}` is listed twice")));
        }
        cols.push(c.to_string());
    }
    if cols.is_empty() {
        return Err(at.err(
            "undo",
            u,
            "name the columns the statement changes, e.g. undo = [\"status\"]",
        ));
    }
    Ok(cols)
}

#[cfg(test)]
mod tests {
    use crate::job::{JobSpec, Revert};
    use std::path::Path;

    const OK: &str = "table = \"t\"\nkey = \"id\"\nsql = \"UPDATE t SET n = 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n";

    fn parse(extra: &str) -> Result<JobSpec, String> {
        JobSpec::parse("j", Path::new("jobs/j.toml"), &format!("{OK}{extra}"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_the_reference_job() {
        let j = parse("").unwrap();
        assert_eq!(j.max_sweeps, super::DEFAULT_MAX_SWEEPS);
        assert!(j.finish_sql.is_empty() && j.revert.is_none() && j.migration.is_none());
        let text = include_str!("../../jobs/orders_status.toml");
        let j =
            JobSpec::parse("orders_status", Path::new("jobs/orders_status.toml"), text).unwrap();
        assert!(j.requires_sql.is_some());
        assert!(matches!(j.revert, Some(Revert::DownSql(_))));
    }

    #[test]
    fn revert_is_down_sql_or_undo_never_both() {
        let m = parse(
            "down_sql = \"UPDATE t SET n = 0 WHERE id BETWEEN :start AND :end\"\nundo = [\"n\"]\n",
        )
        .unwrap_err();
        assert!(m.contains("not both") && m.contains(":5"), "{m}");
        let m = parse("down_sql = \"UPDATE t SET n = 0\"\n").unwrap_err();
        assert!(m.contains("down_sql") && m.contains(":start"), "{m}");
        let m = parse("undo = [\"id\"]\n").unwrap_err();
        assert!(m.contains("key column"), "{m}");
        let m = parse("undo = []\n").unwrap_err();
        assert!(m.contains("name the columns"), "{m}");
        let m = JobSpec::parse(
            "j",
            Path::new("jobs/j.toml"),
            &format!(
                "{}undo = [\"n\"]\n",
                OK.replace("key = \"id\"", "key = \"ctid\"")
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(m.contains("ctid"), "{m}");
        let a = parse("").unwrap().fingerprint;
        let b = parse("undo = [\"n\"]\n").unwrap().fingerprint;
        assert_ne!(a, b, "a chunk done without undo data could not be reverted");
    }

    #[test]
    fn finish_steps_are_single_statements() {
        let j = parse("finish_sql = [\"ALTER TABLE t VALIDATE CONSTRAINT c;\"]\n").unwrap();
        assert_eq!(j.finish_sql, ["ALTER TABLE t VALIDATE CONSTRAINT c"]);
        // One statement per step is checked when the job is resolved (crate::resolve).
        assert!(parse("finish_sql = [\"SELECT 1; SELECT 2\"]\n").is_ok());
        let m = parse("finish_sql = [\" \"]\n").unwrap_err();
        assert!(m.contains("step 1 is empty"), "{m}");
        let m = parse("max_sweeps = -1\n").unwrap_err();
        assert!(m.contains("max_sweeps"), "{m}");
    }

    #[test]
    fn migration_table() {
        let j = parse("[migration]\ntool = \"golang-migrate\"\nexpand = \"20240101\"\n").unwrap();
        let m = j.migration.unwrap();
        assert_eq!(m.expand.as_deref(), Some("20240101"));
        assert!(m.contract.is_none());
        let m = parse("[migration]\ntool = \"liquibase\"\nexpand = \"1\"\n").unwrap_err();
        assert!(m.contains("liquibase") && m.contains("alembic"), "{m}");
        let m = parse("[migration]\ntool = \"alembic\"\nexpand = \"ab12\"\n").unwrap_err();
        assert!(m.contains("alembic_dir"), "{m}");
        let m = parse("[migration]\ntool = \"sqlx\"\n").unwrap_err();
        assert!(m.contains("neither"), "{m}");
        // How a revision is spelled is the migrator's to check (crate::resolve).
        assert!(parse("[migration]\ntool = \"sqlx\"\nexpand = \"one\"\n").is_ok());
        let m = parse("[migration]\ntool = \"sqlx\"\nexpand = \"1\"\nalembic_dir = \"x\"\n")
            .unwrap_err();
        assert!(m.contains("for tool = \"alembic\" only"), "{m}");
        let m = parse("[migration]\ntool = \"sqlx\"\nexpand = \"1\"\ncolour = 1\n").unwrap_err();
        assert!(m.contains("colour"), "{m}");
    }
}
