//! What each schema migrator's own history table says about one revision: "is the expand
//! migration applied?", read from the table exactly as the tool writes it.
//!
//! Every tool records its work differently — one row per migration with a success flag (sqlx,
//! flyway), a plain list (rails, diesel, refinery, django), a single current version with a dirty
//! flag (golang-migrate), or only the current heads of a revision graph (alembic, see
//! [`super::alembic`]). This module owns those readings and the sentence that explains each answer.
//! It only reads: it never creates, repairs or writes a migrator's table.

use super::alembic::RevisionGraph;
use crate::db;
use crate::error::{Error, Result};
use crate::job::MigrationSpec;
use crate::sql::TableName;
use std::path::{Path, PathBuf};
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Row};

pub use crate::job::Tool;

/// What the history module knows of each tool: where it keeps its history and how it spells a
/// revision.
impl Tool {
    /// The table the tool creates when not configured otherwise.
    pub fn default_table(&self) -> &'static str {
        match self {
            Tool::Alembic => "alembic_version",
            Tool::Sqlx => "_sqlx_migrations",
            Tool::Refinery => "refinery_schema_history",
            Tool::Flyway => "flyway_schema_history",
            Tool::GolangMigrate | Tool::Rails => "schema_migrations",
            Tool::Diesel => "__diesel_schema_migrations",
            Tool::Django => "django_migrations",
        }
    }

    /// The columns we read; a table without them is some other tool's (rails and golang-migrate
    /// both default to `schema_migrations`).
    fn columns(&self) -> &'static [&'static str] {
        match self {
            Tool::Alembic => &["version_num"],
            Tool::Sqlx => &["version", "description", "installed_on", "success"],
            Tool::Refinery => &["version", "name", "applied_on"],
            Tool::Flyway => &[
                "installed_rank",
                "version",
                "type",
                "script",
                "installed_on",
                "success",
            ],
            Tool::GolangMigrate => &["version", "dirty"],
            Tool::Rails => &["version"],
            Tool::Diesel => &["version", "run_on"],
            Tool::Django => &["id", "app", "name", "applied"],
        }
    }

    /// How a revision is written for this tool, for error messages.
    fn example(&self) -> &'static str {
        match self {
            Tool::Alembic => "an alembic revision id such as 3f2a1b9c4d5e (or a unique prefix of at least four characters)",
            Tool::Sqlx => "20240101120000 or 20240101120000_add_status (the number that starts the migration's file name)",
            Tool::Refinery => "3, V3 or V3__add_status",
            Tool::Flyway => "2, V2, 1.1 or V1_1__add_status",
            Tool::GolangMigrate => "3 or 000003_add_status (the number that starts the .up.sql file name)",
            Tool::Diesel => "20240101120000 or 2024-01-01-120000_add_status (the migration's directory name)",
            Tool::Rails => "20240101120000 or 20240101120000_add_status",
            Tool::Django => "orders.0002_add_status (the app label, a dot, the migration name)",
        }
    }
}

/// Where to look and how.
#[derive(Debug, Clone)]
pub struct History {
    pub tool: Tool,
    /// Overrides the tool's default table; may be schema-qualified (`flyway.flyway_schema_history`).
    /// Without it, the default name is resolved through the session's `search_path`, as the tool
    /// itself would.
    pub table: Option<String>,
    /// The alembic versions directory; required for alembic, whose table holds only heads.
    pub alembic_dir: Option<PathBuf>,
    /// Alembic's `recursive_version_locations`: read the subdirectories of `alembic_dir` too.
    pub alembic_recursive: bool,
}

/// The answer, with a sentence an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    pub applied: bool,
    pub detail: String,
}

impl Applied {
    fn yes(detail: String) -> Applied {
        Applied {
            applied: true,
            detail,
        }
    }

    fn no(detail: String) -> Applied {
        Applied {
            applied: false,
            detail,
        }
    }
}

/// A revision validated for its tool.
enum Revision {
    /// sqlx, refinery, golang-migrate: an integer version.
    Int(i64),
    Flyway(FlywayVersion),
    /// rails, diesel: the version string as stored.
    Text(String),
    Django {
        app: String,
        name: String,
    },
    /// The name as the job gives it (an id, a prefix, a branch label or `label@head`), resolved
    /// against the revision files when the history is read.
    Alembic {
        dir: PathBuf,
        name: String,
    },
}

impl History {
    /// Where the history of a job's `[migration]` is, and how to read it.
    pub fn of(m: &MigrationSpec) -> History {
        History {
            tool: m.tool,
            table: m.history_table.clone(),
            alembic_dir: m.alembic_dir.clone(),
            alembic_recursive: m.alembic_recursive,
        }
    }

    /// Offline validation of a revision string for this tool.
    pub fn check_revision(&self, revision: &str) -> Result<()> {
        self.parse_revision(revision).map(|_| ())
    }

    fn parse_revision(&self, revision: &str) -> Result<Revision> {
        let tool = self.tool;
        let raw = revision.trim();
        let bad = |why: &str| {
            Error::Usage(format!(
                "{tool} revision `{revision}`: {why}; write it like {}",
                tool.example()
            ))
        };
        if raw.is_empty() {
            return Err(bad("it is empty"));
        }
        match tool {
            Tool::Sqlx | Tool::GolangMigrate => {
                let head = raw.split('_').next().unwrap_or(raw);
                let head = head.split('.').next().unwrap_or(head);
                integer(head)
                    .map(Revision::Int)
                    .ok_or_else(|| bad("expected an integer version"))
            }
            Tool::Refinery => {
                let rest = raw
                    .strip_prefix(['V', 'v', 'U', 'u'])
                    .filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
                    .unwrap_or(raw);
                let head = rest.split("__").next().unwrap_or(rest);
                integer(head)
                    .map(Revision::Int)
                    .ok_or_else(|| bad("expected an integer version"))
            }
            Tool::Flyway => {
                if raw.starts_with("R__") {
                    return Err(bad(
                        "repeatable migrations (R__) have no version, so flyway's history cannot say whether one is applied",
                    ));
                }
                let rest = raw
                    .strip_prefix(['V', 'v'])
                    .filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
                    .unwrap_or(raw);
                let head = rest.split("__").next().unwrap_or(rest);
                FlywayVersion::parse(&head.replace('_', "."))
                    .map(Revision::Flyway)
                    .ok_or_else(|| bad("expected a version made of numbers and dots"))
            }
            Tool::Rails => {
                let head = raw.split('_').next().unwrap_or(raw);
                if !head.is_empty() && head.bytes().all(|b| b.is_ascii_digit()) {
                    Ok(Revision::Text(head.to_string()))
                } else {
                    Err(bad("expected the migration's numeric version"))
                }
            }
            Tool::Diesel => {
                let head = raw.split('_').next().unwrap_or(raw).replace('-', "");
                if !head.is_empty() && head.bytes().all(|b| b.is_ascii_digit()) {
                    Ok(Revision::Text(head))
                } else {
                    Err(bad("expected the migration's version (its directory name up to the first `_`, without dashes)"))
                }
            }
            Tool::Django => {
                let text = raw.strip_suffix(".py").unwrap_or(raw);
                let Some((app, name)) = text.split_once('.') else {
                    return Err(bad("expected app.migration_name"));
                };
                let word =
                    |s: &str| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_');
                if !word(app) || !word(name) {
                    return Err(bad("expected app.migration_name"));
                }
                Ok(Revision::Django {
                    app: app.to_string(),
                    name: name.to_string(),
                })
            }
            Tool::Alembic => {
                let dir = self.alembic_dir.as_ref().ok_or_else(|| {
                    Error::Usage(format!(
                        "alembic revision `{revision}`: set `alembic_dir` to the versions directory (e.g. migrations/versions): alembic_version holds only the current heads, so whether {raw} is applied is decided from the revision files"
                    ))
                })?;
                let symbolic = ["head", "heads", "base"].contains(&raw)
                    || raw.contains(['+', ':'])
                    || raw
                        .split_once('@')
                        .is_some_and(|(b, h)| b.is_empty() || h != "head");
                if symbolic {
                    return Err(bad(
                        "name one revision (an id, a unique prefix, a branch label, or label@head); other symbolic and relative names are not accepted",
                    ));
                }
                // The files are read when the history is (once per command), not here: a job
                // file is validated without reading the migrator's files.
                Ok(Revision::Alembic {
                    dir: dir.clone(),
                    name: raw.to_string(),
                })
            }
        }
    }

    /// The table as parsed (for quoting) and as shown in messages.
    fn table(&self) -> Result<(TableName, String)> {
        match &self.table {
            Some(t) => {
                let name = TableName::parse(t).map_err(|e| {
                    Error::Usage(format!("history_table `{t}` for {}: {e}", self.tool))
                })?;
                Ok((name, t.trim().to_string()))
            }
            None => {
                let name = self.tool.default_table();
                Ok((
                    TableName {
                        schema: None,
                        name: name.to_string(),
                    },
                    name.to_string(),
                ))
            }
        }
    }

    /// Whether `revision` is applied according to the tool's history table.
    pub async fn is_applied(&self, client: &impl GenericClient, revision: &str) -> Result<Applied> {
        let revision = self.parse_revision(revision)?;
        if let Revision::Alembic { dir, name } = &revision {
            // An unknown or ambiguous name is refused before the database is read.
            RevisionGraph::cached(dir, self.alembic_recursive)?.resolve(name)?;
        }
        let (name, shown) = self.table()?;
        let r = Reader {
            client,
            tool: self.tool,
            table: name.quoted(),
            shown,
        };
        // A catalog lookup rather than catching 42P01: a missing table is an answer, not a failure.
        let row = r
            .one(
                "SELECT c.oid IS NOT NULL,
                        ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
                               WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
                   FROM (SELECT pg_catalog.to_regclass($1::text) AS oid) c",
                &[&r.table],
            )
            .await?;
        if !row.get::<_, bool>(0) {
            return Ok(Applied::no(format!(
                "{} does not exist: {} has not run against this database (or set `history_table`)",
                r.shown, r.tool
            )));
        }
        let columns: Vec<String> = row.get(1);
        if let Some(missing) = r
            .tool
            .columns()
            .iter()
            .find(|c| !columns.iter().any(|have| have == *c))
        {
            let shared = if r.tool.default_table() == "schema_migrations" {
                " (rails and golang-migrate both name their table schema_migrations)"
            } else {
                ""
            };
            return Err(Error::Usage(format!(
                "{} has no column {missing}, so it is not {}'s history table{shared}; set `history_table` to the table {} writes",
                r.shown, r.tool, r.tool
            )));
        }
        match revision {
            Revision::Int(v) => match r.tool {
                Tool::Sqlx => r.sqlx(v).await,
                Tool::Refinery => r.refinery(v).await,
                _ => r.golang_migrate(v).await,
            },
            Revision::Flyway(v) => r.flyway(&v).await,
            Revision::Text(v) if r.tool == Tool::Rails => r.rails(&v).await,
            Revision::Text(v) => r.diesel(&v).await,
            Revision::Django { app, name } => r.django(&app, &name).await,
            Revision::Alembic { dir, name } => r.alembic(&dir, self.alembic_recursive, &name).await,
        }
    }
}

/// A non-negative integer version (leading zeros allowed, as in `000003_add_status`).
fn integer(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A flyway version: numbers separated by dots, compared part by part with missing parts as
/// zero, so `1.1`, `1.01` and `1.1.0` are the same version, as flyway compares them.
#[derive(Debug, Clone)]
struct FlywayVersion {
    text: String,
    parts: Vec<u128>,
}

impl FlywayVersion {
    fn parse(text: &str) -> Option<FlywayVersion> {
        let mut parts = Vec::new();
        for p in text.trim().split('.') {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            parts.push(p.parse().ok()?);
        }
        while parts.len() > 1 && parts.last() == Some(&0) {
            parts.pop();
        }
        Some(FlywayVersion {
            text: text.trim().to_string(),
            parts,
        })
    }
}

impl PartialEq for FlywayVersion {
    fn eq(&self, other: &Self) -> bool {
        self.parts == other.parts
    }
}

impl PartialOrd for FlywayVersion {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.parts.cmp(&other.parts))
    }
}

impl std::fmt::Display for FlywayVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// One history table on one connection.
struct Reader<'a, C> {
    client: &'a C,
    tool: Tool,
    /// Quoted for SQL.
    table: String,
    /// As the operator wrote it (or the tool's default), for messages.
    shown: String,
}

impl<C: GenericClient> Reader<'_, C> {
    fn error(&self, e: tokio_postgres::Error) -> Error {
        db::error(
            e,
            format!("reading {}'s history in {}", self.tool, self.shown),
        )
    }

    /// `{t}` in `sql` stands for the quoted table.
    fn sql(&self, sql: &str) -> String {
        sql.replace("{t}", &self.table)
    }

    async fn one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        let sql = self.sql(sql);
        self.client
            .query_one(sql.as_str(), params)
            .await
            .map_err(|e| self.error(e))
    }

    async fn opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        let sql = self.sql(sql);
        self.client
            .query_opt(sql.as_str(), params)
            .await
            .map_err(|e| self.error(e))
    }

    async fn all(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let sql = self.sql(sql);
        self.client
            .query(sql.as_str(), params)
            .await
            .map_err(|e| self.error(e))
    }

    async fn sqlx(&self, v: i64) -> Result<Applied> {
        let t = &self.shown;
        let row = self
            .opt(
                "SELECT success, description, installed_on::text FROM {t} WHERE version = $1::int8",
                &[&v],
            )
            .await?;
        if let Some(row) = row {
            let (success, description, on): (bool, String, Option<String>) =
                (row.get(0), row.get(1), row.get(2));
            let on = on.unwrap_or_else(|| "an unknown time".into());
            return Ok(if success {
                Applied::yes(format!(
                    "{t} records version {v} ({description}) as applied successfully at {on}"
                ))
            } else {
                Applied::no(format!(
                    "{t} records version {v} ({description}) as failed at {on}: not applied; fix the database by hand, delete that row, and run `sqlx migrate run` again"
                ))
            });
        }
        let latest: Option<i64> = self
            .one("SELECT max(version)::int8 FROM {t} WHERE success", &[])
            .await?
            .get(0);
        Ok(Applied::no(format!(
            "{t} has no row for version {v} (latest successful: {}); run `sqlx migrate run`",
            latest.map_or("none".to_string(), |l| l.to_string())
        )))
    }

    async fn refinery(&self, v: i64) -> Result<Applied> {
        let t = &self.shown;
        let row = self
            .opt(
                "SELECT name, applied_on FROM {t} WHERE version = $1::int8",
                &[&v],
            )
            .await?;
        if let Some(row) = row {
            let (name, on): (Option<String>, Option<String>) = (row.get(0), row.get(1));
            return Ok(Applied::yes(format!(
                "{t} has version {v} ({}), applied on {}",
                name.unwrap_or_default(),
                on.unwrap_or_else(|| "an unknown date".into())
            )));
        }
        let latest: Option<i64> = self
            .one("SELECT max(version)::int8 FROM {t}", &[])
            .await?
            .get(0);
        Ok(Applied::no(format!(
            "{t} has no row for version {v} (highest applied: {}); run the refinery migrations",
            latest.map_or("none".to_string(), |l| l.to_string())
        )))
    }

    async fn flyway(&self, v: &FlywayVersion) -> Result<Applied> {
        let t = &self.shown;
        struct Entry {
            rank: i32,
            version: Option<FlywayVersion>,
            raw: String,
            kind: String,
            success: bool,
            on: String,
            script: String,
        }
        // Versions are compared numerically (`1.1` = `1.01`), which SQL on the varchar cannot do;
        // the history is small, so it is read whole.
        let rows = self
            .all(
                "SELECT installed_rank, version, coalesce(type, ''), coalesce(success, false),
                        coalesce(installed_on::text, 'an unknown time'), coalesce(script, '')
                   FROM {t} WHERE version IS NOT NULL ORDER BY installed_rank",
                &[],
            )
            .await?;
        let entries: Vec<Entry> = rows
            .iter()
            .map(|r| {
                let raw: String = r.get(1);
                Entry {
                    rank: r.get(0),
                    version: FlywayVersion::parse(&raw),
                    raw,
                    kind: r.get(2),
                    success: r.get(3),
                    on: r.get(4),
                    script: r.get(5),
                }
            })
            .collect();
        let is_undo = |kind: &str| kind.starts_with("UNDO_") || kind == "DELETE";
        let is_baseline = |kind: &str| kind == "BASELINE" || kind == "SQL_BASELINE";
        if let Some(e) = entries
            .iter()
            .filter(|e| e.version.as_ref() == Some(v))
            .max_by_key(|e| e.rank)
        {
            let rank = e.rank;
            return Ok(if e.kind.starts_with("UNDO_") {
                Applied::no(format!(
                    "{t}: version {v} was undone by {} at {} (installed_rank {rank}, the latest row for it); run `flyway migrate` to apply it again",
                    e.script, e.on
                ))
            } else if e.kind == "DELETE" {
                Applied::no(format!(
                    "{t}: version {v} was marked as deleted by `flyway repair` at {} (installed_rank {rank}); run `flyway migrate` to apply it again",
                    e.on
                ))
            } else if !e.success {
                Applied::no(format!(
                    "{t} has no successful row for version {v} (latest: failed at {}, installed_rank {rank}, {}); fix the migration, run `flyway repair`, then `flyway migrate`",
                    e.on, e.script
                ))
            } else if is_baseline(&e.kind) {
                Applied::yes(format!(
                    "{t}: version {v} is flyway's baseline, set at {}",
                    e.on
                ))
            } else {
                Applied::yes(format!(
                    "{t} has version {v} applied successfully at {} ({}, installed_rank {rank})",
                    e.on, e.script
                ))
            });
        }
        // Flyway skips versions below a baseline: the schema already contains them.
        if let Some(b) = entries.iter().rev().find(|e| {
            is_baseline(&e.kind) && e.success && e.version.as_ref().is_some_and(|b| b > v)
        }) {
            return Ok(Applied::yes(format!(
                "{t}: version {v} is below flyway's baseline {} (set at {}), so the schema already contains it",
                b.raw, b.on
            )));
        }
        // As for the asked version, each version's latest row says whether it is still applied.
        let latest = |of: &FlywayVersion| {
            entries
                .iter()
                .filter(|e| e.version.as_ref() == Some(of))
                .max_by_key(|e| e.rank)
        };
        let current = entries
            .iter()
            .filter_map(|e| e.version.as_ref())
            .filter(|ver| latest(ver).is_some_and(|e| e.success && !is_undo(&e.kind)))
            .max_by(|a, b| a.parts.cmp(&b.parts));
        Ok(Applied::no(format!(
            "{t} has no row for version {v} (highest applied: {}); run `flyway migrate`",
            current.map_or("none".to_string(), |c| c.to_string())
        )))
    }

    async fn golang_migrate(&self, v: i64) -> Result<Applied> {
        let t = &self.shown;
        let rows = self
            .all("SELECT version::int8, dirty FROM {t}", &[])
            .await?;
        let (current, dirty): (i64, bool) = match rows.as_slice() {
            [] => {
                return Ok(Applied::no(format!(
                    "{t} is empty: golang-migrate has applied no migration yet; run `migrate up`"
                )))
            }
            [row] => (row.get(0), row.get(1)),
            many => {
                return Err(Error::Usage(format!(
                    "{t} holds {} rows, but golang-migrate keeps exactly one (the current version): is it another tool's table? set `history_table` to golang-migrate's",
                    many.len()
                )))
            }
        };
        Ok(if current > v {
            let note = if dirty {
                format!(" (version {current} itself is dirty: it failed part-way)")
            } else {
                String::new()
            };
            Applied::yes(format!("{t} is at version {current}, past {v}{note}"))
        } else if current == v && !dirty {
            Applied::yes(format!("{t} is at version {v}, clean"))
        } else if current == v {
            Applied::no(format!(
                "{t} is at version {v} but not applied (dirty: the migration failed part-way; fix it and `migrate force`)"
            ))
        } else {
            let state = if dirty { ", dirty" } else { "" };
            Applied::no(format!(
                "{t} is at version {current}{state}, before {v}; run `migrate up`"
            ))
        })
    }

    async fn rails(&self, v: &str) -> Result<Applied> {
        let t = &self.shown;
        // Rails stores the version as an integer's text, so `001` is recorded as `1`.
        let row = self
            .opt(
                "SELECT version FROM {t} WHERE ltrim(version, '0') = ltrim($1::text, '0') LIMIT 1",
                &[&v],
            )
            .await?;
        if let Some(row) = row {
            let stored: String = row.get(0);
            return Ok(Applied::yes(format!(
                "{t} lists version {stored}: rails has run it"
            )));
        }
        let latest: Option<String> = self
            .opt(
                "SELECT version FROM {t} ORDER BY length(version) DESC, version DESC LIMIT 1",
                &[],
            )
            .await?
            .map(|r| r.get(0));
        Ok(Applied::no(format!(
            "{t} does not list version {v} (latest: {}); run `bin/rails db:migrate`",
            latest.unwrap_or_else(|| "none".into())
        )))
    }

    async fn diesel(&self, v: &str) -> Result<Applied> {
        let t = &self.shown;
        let row = self
            .opt(
                "SELECT run_on::text FROM {t} WHERE version = $1::text",
                &[&v],
            )
            .await?;
        if let Some(row) = row {
            let on: Option<String> = row.get(0);
            return Ok(Applied::yes(format!(
                "{t} has version {v}, run on {}",
                on.unwrap_or_else(|| "an unknown date".into())
            )));
        }
        let latest: Option<String> = self
            .one("SELECT max(version)::text FROM {t}", &[])
            .await?
            .get(0);
        Ok(Applied::no(format!(
            "{t} has no row for version {v} (latest: {}); run `diesel migration run`",
            latest.unwrap_or_else(|| "none".into())
        )))
    }

    async fn django(&self, app: &str, name: &str) -> Result<Applied> {
        let t = &self.shown;
        let row = self
            .opt(
                "SELECT applied::text FROM {t} WHERE app = $1::text AND name = $2::text ORDER BY id DESC LIMIT 1",
                &[&app, &name],
            )
            .await?;
        if let Some(row) = row {
            let on: Option<String> = row.get(0);
            return Ok(Applied::yes(format!(
                "{t} has {app}.{name}, applied at {}",
                on.unwrap_or_else(|| "an unknown time".into())
            )));
        }
        let names: Vec<String> = self
            .all(
                "SELECT name FROM {t} WHERE app = $1::text ORDER BY id DESC",
                &[&app],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let Some(latest) = names.first() else {
            return Ok(Applied::no(format!(
                "{t} has no migration of app {app} at all (is the app label right?); run `manage.py migrate {app}`"
            )));
        };
        // `manage.py migrate` accepts a prefix such as 0002; say which applied names it could mean.
        let similar: Vec<&str> = names
            .iter()
            .filter(|n| n.starts_with(name))
            .map(String::as_str)
            .collect();
        let hint = if similar.is_empty() {
            String::new()
        } else {
            format!(
                "; applied names starting with {name}: {} — give the full name",
                similar.join(", ")
            )
        };
        Ok(Applied::no(format!(
            "{t} has no row for {app}.{name} (latest for {app}: {latest}){hint}; run `manage.py migrate {app}`"
        )))
    }

    async fn alembic(&self, dir: &Path, recursive: bool, name: &str) -> Result<Applied> {
        let t = &self.shown;
        let heads: Vec<String> = self
            .all("SELECT version_num::text FROM {t} ORDER BY 1", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut graph = RevisionGraph::cached(dir, recursive)?;
        if heads.iter().any(|h| !graph.contains(h)) {
            // The files may have changed since they were read (a deploy during a wait).
            graph = RevisionGraph::reload(dir, recursive)?;
        }
        let id = graph.resolve(name)?;
        let id = id.as_str();
        let dir = graph.dir().display();
        if let Some(unknown) = heads.iter().find(|h| !graph.contains(h)) {
            return Err(Error::Usage(format!(
                "{t} holds head {unknown}, which no revision file under {dir} defines: the versions directory is out of date with the database; pull the latest revision files (or point `alembic_dir` at the right directory)"
            )));
        }
        let notes: String = graph
            .warnings()
            .iter()
            .map(|w| format!("; note: {w}"))
            .collect();
        if heads.is_empty() {
            return Ok(Applied::no(format!(
                "{t} is empty: alembic has applied no revision yet; run `alembic upgrade {id}`{notes}"
            )));
        }
        if let Some(head) = heads.iter().find(|h| graph.is_ancestor_or_self(id, h)) {
            return Ok(Applied::yes(if head == id {
                format!("alembic head {head} (from {dir}) is {id} itself{notes}")
            } else {
                format!("alembic head {head} (from {dir}) descends from {id}{notes}")
            }));
        }
        Ok(Applied::no(format!(
            "no alembic head descends from {id}: {t} holds {} (from {dir}); run `alembic upgrade {id}`",
            heads.join(", ")
        ) + &notes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(tool: Tool) -> History {
        History {
            tool,
            table: None,
            alembic_dir: None,
            alembic_recursive: false,
        }
    }

    fn parsed(tool: Tool, s: &str) -> Result<Revision> {
        history(tool).parse_revision(s)
    }

    fn int(tool: Tool, s: &str) -> Option<i64> {
        match parsed(tool, s) {
            Ok(Revision::Int(v)) => Some(v),
            _ => None,
        }
    }

    fn text(tool: Tool, s: &str) -> Option<String> {
        match parsed(tool, s) {
            Ok(Revision::Text(v)) => Some(v),
            _ => None,
        }
    }

    #[test]
    fn tool_names_round_trip() {
        for name in Tool::NAMES {
            assert_eq!(Tool::parse(name).unwrap().name(), *name);
        }
        assert_eq!(Tool::parse("Flyway"), Some(Tool::Flyway));
        assert_eq!(Tool::parse("liquibase"), None);
        assert_eq!(
            Tool::Rails.default_table(),
            Tool::GolangMigrate.default_table()
        );
    }

    #[test]
    fn integer_versions() {
        assert_eq!(
            int(Tool::Sqlx, "20240101120000_add_status.sql"),
            Some(20240101120000)
        );
        assert_eq!(int(Tool::Sqlx, "3"), Some(3));
        assert_eq!(
            int(Tool::GolangMigrate, "000003_add_status.up.sql"),
            Some(3)
        );
        assert_eq!(int(Tool::Refinery, "V3__add_status"), Some(3));
        assert_eq!(int(Tool::Refinery, "V3"), Some(3));
        assert_eq!(int(Tool::Refinery, "3"), Some(3));
        for (tool, bad) in [
            (Tool::Sqlx, "abc"),
            (Tool::Sqlx, "-3"),
            (Tool::Refinery, "V"),
            (Tool::GolangMigrate, "v3"),
        ] {
            match parsed(tool, bad) {
                Err(Error::Usage(m)) => assert!(
                    m.contains(tool.name()) && m.contains("write it like"),
                    "{m}"
                ),
                _ => panic!("{tool} accepted {bad}"),
            }
        }
    }

    #[test]
    fn flyway_versions() {
        let v = |s: &str| match parsed(Tool::Flyway, s) {
            Ok(Revision::Flyway(v)) => v.parts,
            _ => panic!("{s} rejected"),
        };
        assert_eq!(v("2"), vec![2]);
        assert_eq!(v("V2"), vec![2]);
        assert_eq!(v("1.1"), vec![1, 1]);
        assert_eq!(v("V1_1__add_status"), vec![1, 1]);
        assert_eq!(v("1.1.0"), vec![1, 1]);
        assert!(parsed(Tool::Flyway, "R__views").is_err());
        assert!(parsed(Tool::Flyway, "1..2").is_err());
        assert!(FlywayVersion::parse("1.10").unwrap() > FlywayVersion::parse("1.9").unwrap());
    }

    #[test]
    fn text_versions() {
        assert_eq!(
            text(Tool::Diesel, "2024-01-01-120000_add_status").as_deref(),
            Some("20240101120000")
        );
        assert_eq!(
            text(Tool::Diesel, "20240101120000").as_deref(),
            Some("20240101120000")
        );
        assert_eq!(
            text(Tool::Rails, "20240101120000_add_status.rb").as_deref(),
            Some("20240101120000")
        );
        assert!(parsed(Tool::Rails, "add_status").is_err());
        match parsed(Tool::Django, "orders.0002_add_status") {
            Ok(Revision::Django { app, name }) => {
                assert_eq!((app.as_str(), name.as_str()), ("orders", "0002_add_status"))
            }
            _ => panic!("django revision rejected"),
        }
        assert!(parsed(Tool::Django, "0002_add_status").is_err());
        assert!(parsed(Tool::Django, "orders.").is_err());
    }

    #[test]
    fn alembic_needs_its_directory() {
        match history(Tool::Alembic).check_revision("3f2a1b9c") {
            Err(Error::Usage(m)) => assert!(m.contains("alembic_dir"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
