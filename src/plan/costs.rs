//! What the columns the job's statement changes will cost, read from the catalog inside the
//! plan's transaction: indexes that rule out HOT updates, foreign keys checked per row, row
//! triggers that fire. Owns only these catalog reads and their findings; it never executes the
//! job's statement (`probe` does) and writes nothing.

use super::{Finding, Severity};
use crate::db;
use crate::error::Result;
use crate::job::JobSpec;
use std::collections::BTreeMap;
use tokio_postgres::types::ToSql;
use tokio_postgres::Transaction;

/// What the changed columns cost: indexes (no HOT updates), foreign keys checked, row triggers.
pub(super) async fn catalog_findings(
    tx: &Transaction<'_>,
    job: &JobSpec,
    oid: u32,
    changed: &BTreeMap<String, usize>,
    table_written: bool,
    findings: &mut Vec<Finding>,
) -> Result<()> {
    let cols: Vec<String> = changed.keys().cloned().collect();
    if !cols.is_empty() {
        // Plain index columns are in indkey; columns used by expressions and predicates are
        // recorded in pg_depend.
        let indexed = names(
            tx,
            job,
            "reading the table's indexes",
            "SELECT a.attname || ' (in ' || string_agg(DISTINCT i.indexrelid::regclass::text, ', ') || ')'
               FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid
              WHERE i.indrelid = $1 AND a.attname = ANY ($2)
                AND (a.attnum = ANY (i.indkey::int2[])
                     OR EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                                   AND d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indrelid
                                   AND d.refobjsubid = a.attnum))
              GROUP BY a.attname ORDER BY a.attname",
            &[&oid, &cols],
        )
        .await?;
        if !indexed.is_empty() {
            findings.push(Finding {
                severity: Severity::Warning,
                code: "writes_indexed_column",
                message: format!(
                    "the statement changes indexed column(s) {}: no update can be HOT, every row gets new index entries and the table and its indexes bloat",
                    indexed.join(", ")
                ),
                fix: "if the index exists only for the new column, create it after the backfill (CREATE INDEX CONCURRENTLY)".into(),
            });
        }
        let fks = names(
            tx,
            job,
            "reading foreign keys",
            "SELECT c.conname || ' → ' || c.confrelid::regclass::text
               FROM pg_constraint c
              WHERE c.conrelid = $1 AND c.contype = 'f'
                AND EXISTS (SELECT 1 FROM pg_attribute a
                             WHERE a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
                               AND a.attname = ANY ($2))
              ORDER BY 1",
            &[&oid, &cols],
        )
        .await?;
        if !fks.is_empty() {
            findings.push(Finding {
                severity: Severity::Warning,
                code: "foreign_keys",
                message: format!(
                    "the statement changes columns of foreign key(s) {}: each changed row is checked against the referenced table (a lookup and a share lock per row)",
                    fks.join(", ")
                ),
                fix: "expected for a new reference column; make sure the referenced key is indexed, or add the constraint NOT VALID and VALIDATE it after the backfill".into(),
            });
        }
    }
    if table_written {
        let triggers = names(
            tx,
            job,
            "reading triggers",
            "SELECT tgname::text FROM pg_trigger
              WHERE tgrelid = $1 AND NOT tgisinternal AND tgenabled <> 'D' AND (tgtype & 1) = 1
              ORDER BY 1",
            &[&oid],
        )
        .await?;
        if !triggers.is_empty() {
            findings.push(Finding {
                severity: Severity::Warning,
                code: "row_triggers",
                message: format!(
                    "row trigger(s) {} on {} fire for every row the statement writes",
                    triggers.join(", "),
                    job.table
                ),
                fix: "check they are meant to fire for a backfill (audit rows, notifications, denormalised copies); their cost is in the sample chunk's time".into(),
            });
        }
    }
    Ok(())
}

/// A catalog query whose single text column names what it found.
async fn names(
    tx: &Transaction<'_>,
    job: &JobSpec,
    what: &str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<String>> {
    Ok(tx
        .query(sql, params)
        .await
        .map_err(|e| db::error(e, format!("job {}: {what}", job.name)))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
