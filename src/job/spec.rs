//! Validation of a raw job into a typed [`JobSpec`], with errors that name file, line and key.
//! Offline: never reads another file, connects, or checks anything against the database or the
//! migrator's project (that is `keyset` and `resolve`).

use super::duration::{parse_duration, parse_server_timeout};
use super::locate::Locator;
use super::raw::RawJob;
use crate::error::Result;
use crate::sql::TableName;
use crate::sql::{SqlTemplate, CTID};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

pub const DEFAULT_CHUNK_ROWS: u32 = 1000;
/// A chunk waits at most this long for a lock held by the application, then gives up (and is
/// retried), so that application sessions queued behind it are not stalled.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(1);
/// No chunk statement may run longer than this: it bounds how long the chunk's row locks are held.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_CHUNK_ROWS: i64 = 10_000_000;

/// What a run does with a key whose row makes the statement fail (a "poison row").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Record the failure and stop (exit 1); the next run retries from that key.
    Stop,
    /// Record the key in the failures table and go on; the gate fails while any remain.
    Skip,
}

/// A validated job definition.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    pub path: PathBuf,
    pub description: Option<String>,
    pub table: TableName,
    pub key: Vec<String>,
    pub sql: SqlTemplate,
    pub chunk_rows: u32,
    pub verify: Option<String>,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    /// How long one chunk may keep meeting lock contention before the run fails (None: the
    /// engine's default, unless `run --contention-budget` says otherwise).
    pub contention_budget: Option<Duration>,
    pub on_error: OnError,
    pub throttle: super::ThrottleSpec,
    /// A query that must return true before the job may run (e.g. the new column exists).
    pub requires_sql: Option<String>,
    /// Passes over the whole key range after the main one while `verify` still counts rows.
    pub max_sweeps: u32,
    /// Statements run once, outside a transaction, after the job is done and verified.
    pub finish_sql: Vec<String>,
    pub revert: Option<super::Revert>,
    pub migration: Option<super::MigrationSpec>,
    /// For the revert job derived from a job (`backfill revert`): that job's name.
    pub reverts: Option<String>,
    /// Stable hash of what the job does to the data (table, key, sql). Progress made under one
    /// fingerprint is not resumed under another without `--allow-changed-definition`.
    pub fingerprint: String,
    /// The line each of `table`, `key`, `undo`, `finish_sql` and the migration's `expand` and
    /// `contract` is written on, for the checks made after parsing (against the catalog at run
    /// and plan time, against the project in `crate::resolve`) that must still name the file, the
    /// line and the key.
    pub lines: Vec<(&'static str, usize)>,
}

impl JobSpec {
    /// "invalid job file PATH:LINE: key `KEY`", the start of an error about `key` found after
    /// the file was parsed.
    pub fn file_key(&self, key: &str) -> String {
        match self.lines.iter().find(|(k, _)| *k == key) {
            Some((_, line)) => format!(
                "invalid job file {}:{line}: key `{key}`",
                self.path.display()
            ),
            None => format!("invalid job file {}: key `{key}`", self.path.display()),
        }
    }
}

impl JobSpec {
    pub fn parse(name: &str, path: &Path, text: &str) -> Result<JobSpec> {
        let at = Locator {
            kind: "job file",
            path,
            text,
        };
        let raw: RawJob = at.parse()?;
        reject_nul(&at, &raw)?;

        let table = TableName::parse(raw.table.get_ref()).map_err(|m| {
            at.err(
                "table",
                &raw.table,
                format!("`{}`: {m}", raw.table.get_ref()),
            )
        })?;

        let key = key_columns(&at, &raw)?;

        let sql = SqlTemplate::parse(raw.sql.get_ref()).map_err(|m| at.err("sql", &raw.sql, m))?;

        let (chunk_rows, verify) = chunk_rows_and_verify(&at, &raw)?;

        let lock_timeout = parse_timeout(
            &at,
            "lock_timeout",
            raw.lock_timeout.as_ref(),
            DEFAULT_LOCK_TIMEOUT,
        )?;
        let statement_timeout = parse_timeout(
            &at,
            "statement_timeout",
            raw.statement_timeout.as_ref(),
            DEFAULT_STATEMENT_TIMEOUT,
        )?;

        let contention_budget = match raw.contention_budget.as_ref() {
            None => None,
            Some(v) => {
                Some(parse_duration(v.get_ref()).map_err(|m| at.err("contention_budget", v, m))?)
            }
        };

        let on_error = on_error(&at, &raw)?;

        let throttle = super::ThrottleSpec::parse(&at, raw.throttle.as_ref())?;
        let phases = super::phases::parse(&at, &raw, &key)?;
        let undo: &[String] = match &phases.revert {
            Some(super::Revert::Undo(cols)) => cols,
            _ => &[],
        };
        let fingerprint = fingerprint(&table, &key, raw.sql.get_ref(), undo);
        let lines = key_lines(&at, &raw);
        Ok(JobSpec {
            name: name.to_string(),
            path: path.to_path_buf(),
            description: raw.description.map(|d| d.into_inner()),
            table,
            key,
            sql,
            chunk_rows,
            verify,
            lock_timeout,
            statement_timeout,
            contention_budget,
            on_error,
            throttle,
            requires_sql: phases.requires_sql,
            max_sweeps: phases.max_sweeps,
            finish_sql: phases.finish_sql,
            revert: phases.revert,
            migration: phases.migration,
            reverts: None,
            fingerprint,
            lines,
        })
    }
}

/// The key columns: one name or a list, none empty or repeated, `ctid` only alone.
fn key_columns(at: &Locator<'_>, raw: &RawJob) -> Result<Vec<String>> {
    let names: Vec<&str> = match raw.key.get_ref() {
        toml::Value::String(one) => vec![one.as_str()],
        toml::Value::Array(many) => many
            .iter()
            .map(|v| v.as_str())
            .collect::<Option<_>>()
            .ok_or_else(|| {
                at.err("key", &raw.key, "every key column must be a string, e.g. key = [\"tenant_id\", \"id\"]")
            })?,
        _ => {
            return Err(at.err(
                "key",
                &raw.key,
                "expected a column name or a list of them, e.g. key = [\"id\"] (or key = \"ctid\" for a table without a usable key)",
            ))
        }
    };
    if names.is_empty() {
        return Err(at.err(
            "key",
            &raw.key,
            "the key list is empty: name the primary key column(s), e.g. key = [\"id\"]",
        ));
    }
    let mut key = Vec::new();
    for col in names {
        let c = col.trim();
        if c.is_empty() {
            return Err(at.err("key", &raw.key, "empty column name"));
        }
        if key.iter().any(|k: &String| k == c) {
            return Err(at.err("key", &raw.key, format!("column `{c}` is listed twice")));
        }
        key.push(c.to_string());
    }
    if key.len() > 1 && key.iter().any(|k| k == CTID) {
        return Err(at.err(
            "key",
            &raw.key,
            "`ctid` walks the table's pages and cannot be combined with other key columns: use key = \"ctid\" alone",
        ));
    }
    Ok(key)
}

/// `chunk_rows` (or the default) and the `verify` query, which takes no placeholders.
fn chunk_rows_and_verify(at: &Locator<'_>, raw: &RawJob) -> Result<(u32, Option<String>)> {
    let chunk_rows = match &raw.chunk_rows {
        None => DEFAULT_CHUNK_ROWS,
        Some(n) => {
            let v = *n.get_ref();
            if !(1..=MAX_CHUNK_ROWS).contains(&v) {
                return Err(at.err(
                    "chunk_rows",
                    n,
                    format!("{v} is out of range: use 1 to {MAX_CHUNK_ROWS}"),
                ));
            }
            v as u32
        }
    };

    let verify = match &raw.verify {
        None => None,
        Some(v) => {
            let q = v.get_ref().trim();
            if q.is_empty() {
                return Err(at.err("verify", v, "empty query: give a query returning the number of rows still to do, or remove the key"));
            }
            if SqlTemplate::mentions_placeholder(q) {
                return Err(at.err(
                    "verify",
                    v,
                    "`verify` runs over the whole table and takes no :start/:end placeholders",
                ));
            }
            Some(q.trim_end_matches(';').to_string())
        }
    };
    Ok((chunk_rows, verify))
}

/// What a poison row does: `stop` (the default) or `skip`.
fn on_error(at: &Locator<'_>, raw: &RawJob) -> Result<OnError> {
    let on_error = match raw.on_error.as_ref() {
        None => OnError::Stop,
        Some(v) => match v.get_ref().as_str() {
            "stop" => OnError::Stop,
            "skip" => OnError::Skip,
            other => {
                return Err(at.err(
                    "on_error",
                    v,
                    format!("`{other}` is not one of \"stop\", \"skip\""),
                ))
            }
        },
    };
    Ok(on_error)
}

/// The lines of the keys checked after parsing (see [`JobSpec::lines`]).
fn key_lines(at: &Locator<'_>, raw: &RawJob) -> Vec<(&'static str, usize)> {
    let mut lines = vec![("table", at.line(&raw.table)), ("key", at.line(&raw.key))];
    if let Some(u) = &raw.undo {
        lines.push(("undo", at.line(u)));
    }
    if let Some(f) = &raw.finish_sql {
        lines.push(("finish_sql", at.line(f)));
    }
    if let Some(m) = &raw.migration {
        let m = m.get_ref();
        for (key, v) in [("expand", &m.expand), ("contract", &m.contract)] {
            if let Some(v) = v {
                lines.push((key, at.line(v)));
            }
        }
    }
    lines
}

/// PostgreSQL takes no NUL character anywhere: not in an identifier (22021 when bound, as in a
/// table lookup), not in a statement (the protocol ends strings at NUL). TOML can write one
/// (`\u0000`), so every value that reaches the server is checked here, where file and line are
/// known.
fn reject_nul(at: &Locator<'_>, raw: &RawJob) -> Result<()> {
    const NUL: char = '\0';
    let ident =
        "contains a NUL character (\\u0000), which PostgreSQL does not accept in a name: remove it";
    let text = "contains a NUL character (\\u0000), which PostgreSQL does not accept in SQL text: remove it";
    if raw.table.get_ref().contains(NUL) {
        return Err(at.err("table", &raw.table, ident));
    }
    let key_has_nul = match raw.key.get_ref() {
        toml::Value::String(s) => s.contains(NUL),
        toml::Value::Array(a) => a
            .iter()
            .any(|v| v.as_str().is_some_and(|s| s.contains(NUL))),
        _ => false,
    };
    if key_has_nul {
        return Err(at.err("key", &raw.key, ident));
    }
    if let Some(u) = raw
        .undo
        .as_ref()
        .filter(|u| u.get_ref().iter().any(|c| c.contains(NUL)))
    {
        return Err(at.err("undo", u, ident));
    }
    if let Some(f) = raw
        .finish_sql
        .as_ref()
        .filter(|f| f.get_ref().iter().any(|c| c.contains(NUL)))
    {
        return Err(at.err("finish_sql", f, text));
    }
    let statements = [
        ("sql", Some(&raw.sql)),
        ("verify", raw.verify.as_ref()),
        ("requires_sql", raw.requires_sql.as_ref()),
        ("down_sql", raw.down_sql.as_ref()),
        (
            "throttle.throttle_sql",
            raw.throttle
                .as_ref()
                .and_then(|t| t.get_ref().throttle_sql.as_ref()),
        ),
    ];
    for (key, v) in statements {
        if let Some(v) = v.filter(|v| v.get_ref().contains(NUL)) {
            return Err(at.err(key, v, text));
        }
    }
    if let Some(m) = &raw.migration {
        let m = m.get_ref();
        let names = [
            ("expand", m.expand.as_ref()),
            ("contract", m.contract.as_ref()),
            ("history_table", m.history_table.as_ref()),
        ];
        for (key, v) in names {
            if let Some(v) = v.filter(|v| v.get_ref().contains(NUL)) {
                return Err(at.err(&format!("migration.{key}"), v, ident));
            }
        }
    }
    Ok(())
}

fn parse_timeout(
    at: &Locator<'_>,
    key: &str,
    value: Option<&Spanned<String>>,
    default: Duration,
) -> Result<Duration> {
    let Some(v) = value else { return Ok(default) };
    let d = parse_server_timeout(v.get_ref()).map_err(|m| at.err(key, v, m))?;
    Ok(d)
}

/// The fingerprint covers what the job does to the data; chunk size, timeouts, description and
/// verify may change between runs without invalidating progress. Undo columns count: a chunk
/// done without keeping its old values could not be reverted.
fn fingerprint(table: &TableName, key: &[String], sql: &str, undo: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(b"backfill-job-v1\0");
    h.update(table.to_string().as_bytes());
    h.update(b"\0");
    h.update(key.join("\u{1f}").as_bytes());
    h.update(b"\0");
    h.update(sql.trim().as_bytes());
    if !undo.is_empty() {
        h.update(b"\0undo\0");
        h.update(undo.join("\u{1f}").as_bytes());
    }
    let digest = h.finalize();
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::MAX_TIMEOUT;

    fn parse(text: &str) -> Result<JobSpec> {
        JobSpec::parse("t", Path::new("jobs/t.toml"), text)
    }

    const OK: &str = r#"
table = "orders"
key = ["id"]
sql = "UPDATE orders SET n = n + 1 WHERE id BETWEEN :start AND :end"
"#;

    #[test]
    fn minimal_job_gets_defaults() {
        let j = parse(OK).unwrap();
        assert_eq!(j.chunk_rows, DEFAULT_CHUNK_ROWS);
        assert_eq!(j.lock_timeout, DEFAULT_LOCK_TIMEOUT);
        assert_eq!(
            j.table,
            TableName {
                schema: None,
                name: "orders".into()
            }
        );
        assert_eq!(j.fingerprint.len(), 24);
    }

    #[test]
    fn sample_job_file_parses() {
        let text = include_str!("../../jobs/orders_status.toml");
        let j =
            JobSpec::parse("orders_status", Path::new("jobs/orders_status.toml"), text).unwrap();
        assert_eq!(j.table.to_string(), "orders");
        assert_eq!(j.key, vec!["id".to_string()]);
        assert!(j.verify.is_some());
        assert!(j.description.is_some());
        assert_eq!(
            j.throttle.max_replication_lag,
            Some(std::time::Duration::from_secs(10))
        );
        assert_eq!(
            j.throttle.target_chunk_time,
            Some(std::time::Duration::from_millis(10))
        );
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse(&format!("{OK}colour = 1\n")).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("jobs/t.toml:5"), "{m}");
        assert!(m.contains("colour"), "{m}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn missing_key_is_named() {
        let m = parse("table = \"t\"\nkey = [\"id\"]\n")
            .unwrap_err()
            .to_string();
        assert!(m.contains("sql"), "{m}");
    }

    #[test]
    fn wrong_type_is_reported() {
        let m = parse(&OK.replace("key = [\"id\"]", "key = 7"))
            .unwrap_err()
            .to_string();
        assert!(m.contains(":3") && m.contains("key `key`"), "{m}");
        let m = parse(&OK.replace("key = [\"id\"]", "key = [\"id\", 7]"))
            .unwrap_err()
            .to_string();
        assert!(m.contains(":3") && m.contains("must be a string"), "{m}");
    }

    #[test]
    fn a_single_key_may_be_a_string_and_ctid_stands_alone() {
        let spec = parse(&OK.replace("key = [\"id\"]", "key = \"id\"")).unwrap();
        assert_eq!(spec.key, ["id"]);
        let m = parse(&OK.replace("key = [\"id\"]", "key = [\"ctid\", \"id\"]"))
            .unwrap_err()
            .to_string();
        assert!(m.contains("ctid") && m.contains("alone"), "{m}");
    }

    #[test]
    fn sql_needs_both_placeholders() {
        let m = parse(&OK.replace("AND :end", "AND 10"))
            .unwrap_err()
            .to_string();
        assert!(m.contains("key `sql`") && m.contains(":end"), "{m}");
    }

    #[test]
    fn empty_key_rejected() {
        let m = parse(&OK.replace("[\"id\"]", "[]"))
            .unwrap_err()
            .to_string();
        assert!(m.contains("empty"), "{m}");
    }

    #[test]
    fn chunk_rows_range_and_durations() {
        assert!(parse(&format!("{OK}chunk_rows = 0\n")).is_err());
        assert!(parse(&format!("{OK}lock_timeout = \"soon\"\n")).is_err());
        let j = parse(&format!(
            "{OK}lock_timeout = \"250ms\"\nstatement_timeout = \"1m\"\n"
        ))
        .unwrap();
        assert_eq!(j.lock_timeout, Duration::from_millis(250));
        assert_eq!(j.statement_timeout, Duration::from_secs(60));
        assert_eq!(j.contention_budget, None);
        let j = parse(&format!("{OK}contention_budget = \"30m\"\n")).unwrap();
        assert_eq!(j.contention_budget, Some(Duration::from_secs(1800)));
        assert!(parse(&format!("{OK}contention_budget = \"forever\"\n")).is_err());
    }

    #[test]
    fn server_timeouts_stop_at_postgresql_limit() {
        assert_eq!(parse_server_timeout("2147483647ms").unwrap(), MAX_TIMEOUT);
        assert!(parse_server_timeout("24d").is_ok());
        let m = parse_server_timeout("2147483648ms").unwrap_err();
        assert!(m.contains("2147483647ms"), "{m}");
        let m = parse(&format!("{OK}statement_timeout = \"30days\"\n"))
            .unwrap_err()
            .to_string();
        assert!(m.contains(":5") && m.contains("statement_timeout"), "{m}");
        // A pause between chunks is not a server timeout.
        assert!(parse(&format!("{OK}[throttle]\npause = \"30days\"\n")).is_ok());
    }

    #[test]
    fn nul_characters_are_refused_where_written() {
        let m = parse(&OK.replace("\"orders\"", r#""\"ord\u0000ers\"""#))
            .unwrap_err()
            .to_string();
        assert!(
            m.contains(":2") && m.contains("key `table`") && m.contains("NUL"),
            "{m}"
        );
        let m = parse(&format!("{OK}verify = \"SELECT 0 -- \\u0000\"\n"))
            .unwrap_err()
            .to_string();
        assert!(m.contains(":5") && m.contains("key `verify`"), "{m}");
        let m = parse(&format!(
            "{OK}[migration]\ntool = \"sqlx\"\nexpand = \"1\\u0000\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(m.contains(":7") && m.contains("migration.expand"), "{m}");
    }

    #[test]
    fn throttle_table() {
        let j = parse(&format!("{OK}[throttle]\nrows_per_second = 500\ntarget_chunk_time = \"200ms\"\nmax_wal_rate = \"8MB\"\non_signal_error = \"ignore\"\n")).unwrap();
        assert_eq!(j.throttle.rows_per_second, Some(500));
        assert_eq!(
            j.throttle.target_chunk_time,
            Some(Duration::from_millis(200))
        );
        assert_eq!(j.throttle.max_wal_rate, Some(8_000_000));
        assert_eq!(
            j.throttle.on_signal_error,
            super::super::OnSignalError::Ignore
        );
        let m = parse(&format!("{OK}[throttle]\nrows_per_sec = 5\n"))
            .unwrap_err()
            .to_string();
        assert!(m.contains(":6") && m.contains("rows_per_sec"), "{m}");
        let m = parse(&format!(
            "{OK}[throttle]\nmin_chunk_rows = 500\nmax_chunk_rows = 100\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(m.contains("above max_chunk_rows"), "{m}");
        assert_eq!(
            parse(OK).unwrap().throttle,
            super::super::ThrottleSpec::default()
        );
    }

    #[test]
    fn on_error_modes() {
        assert_eq!(parse(OK).unwrap().on_error, OnError::Stop);
        assert_eq!(
            parse(&format!("{OK}on_error = \"skip\"\n"))
                .unwrap()
                .on_error,
            OnError::Skip
        );
        let m = parse(&format!("{OK}on_error = \"ignore\"\n"))
            .unwrap_err()
            .to_string();
        assert!(m.contains(":5") && m.contains("on_error"), "{m}");
    }

    #[test]
    fn fingerprint_tracks_data_changes_only() {
        let a = parse(OK).unwrap().fingerprint;
        let b = parse(&format!("{OK}chunk_rows = 7\n")).unwrap().fingerprint;
        let c = parse(&OK.replace("n + 1", "n + 2")).unwrap().fingerprint;
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
