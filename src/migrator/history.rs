//! What each schema migrator's own history table says about one revision: "is the expand
//! migration applied?", read from the table exactly as the tool writes it.
//!
//! Every tool records its work differently — one row per migration with a success flag (sqlx,
//! flyway), a plain list (rails, diesel, refinery, django), a single current version with a dirty
//! flag (golang-migrate), or only the current heads of a revision graph (alembic, see
//! [`super::alembic`]). This module owns those readings and the sentence that explains each answer:
//! here, where each tool keeps its history and the order of one reading; [`revision`] checks how
//! a job spells a revision (offline), [`read`] reads each tool's table. It only reads: it never
//! creates, repairs or writes a migrator's table.

mod read;
mod revision;

use super::alembic::RevisionGraph;
use crate::error::{Error, Result};
use crate::job::MigrationSpec;
use crate::sql::TableName;
use read::Reader;
use revision::Revision;
use std::path::PathBuf;
use tokio_postgres::GenericClient;

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
        // An unknown or ambiguous alembic name is refused before the database is read; the id it
        // resolves to is what the history is then asked about.
        let alembic = match &revision {
            Revision::Alembic { dir, name } => {
                let graph = RevisionGraph::cached(dir, self.alembic_recursive)?;
                let id = graph.resolve(name)?;
                Some((graph, id))
            }
            _ => None,
        };
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
            Revision::Alembic { dir, name } => {
                let (graph, id) = alembic.expect("resolved above");
                r.alembic(&dir, self.alembic_recursive, &name, graph, id)
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::revision::FlywayVersion;
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
