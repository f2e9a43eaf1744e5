//! The `[migration]` table of a job: which schema migrator keeps the history, and the expand and
//! contract revisions the backfill sits between. Only the table's shape is checked here (known
//! tool, at least one revision, `alembic_dir` for alembic only): whether a revision is spelled as
//! its tool spells them, and what the history says of it, is `crate::migrator`'s business once
//! the job is resolved. Never reads a migrator's files or the database.

use super::locate::Locator;
use super::raw::RawMigration;
use crate::error::Result;
use std::path::PathBuf;
use toml::Spanned;

/// A schema migration tool whose history table we can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tool {
    Alembic,
    Sqlx,
    Refinery,
    Flyway,
    GolangMigrate,
    Diesel,
    Rails,
    Django,
}

impl Tool {
    /// The accepted names, for error messages.
    pub const NAMES: &'static [&'static str] = &[
        "alembic",
        "sqlx",
        "refinery",
        "flyway",
        "golang-migrate",
        "diesel",
        "rails",
        "django",
    ];

    const ALL: [Tool; 8] = [
        Tool::Alembic,
        Tool::Sqlx,
        Tool::Refinery,
        Tool::Flyway,
        Tool::GolangMigrate,
        Tool::Diesel,
        Tool::Rails,
        Tool::Django,
    ];

    pub fn parse(s: &str) -> Option<Tool> {
        let s = s.trim();
        Tool::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Tool::Alembic => "alembic",
            Tool::Sqlx => "sqlx",
            Tool::Refinery => "refinery",
            Tool::Flyway => "flyway",
            Tool::GolangMigrate => "golang-migrate",
            Tool::Diesel => "diesel",
            Tool::Rails => "rails",
            Tool::Django => "django",
        }
    }
}

impl std::fmt::Display for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The job's place in an expand-and-contract change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationSpec {
    pub tool: Tool,
    /// Must be applied before the backfill may run.
    pub expand: Option<String>,
    /// Must not be applied before the backfill is done and verified.
    pub contract: Option<String>,
    /// Alembic's versions directory (relative paths are taken from the working directory).
    pub alembic_dir: Option<PathBuf>,
    /// Alembic's `recursive_version_locations`: revision files in subdirectories count too.
    pub alembic_recursive: bool,
    /// Where the migrator keeps its history, when not its default table on the search_path.
    pub history_table: Option<String>,
}

pub(super) fn parse(at: &Locator<'_>, m: &RawMigration) -> Result<MigrationSpec> {
    let tool = Tool::parse(m.tool.get_ref().trim()).ok_or_else(|| {
        at.err(
            "tool",
            &m.tool,
            format!(
                "`{}` is not one of {}",
                m.tool.get_ref(),
                Tool::NAMES.join(", ")
            ),
        )
    })?;
    let revision = |key: &str, v: &Option<Spanned<String>>| -> Result<Option<String>> {
        let Some(v) = v else { return Ok(None) };
        let r = v.get_ref().trim();
        if r.is_empty() {
            return Err(at.err(key, v, "empty revision"));
        }
        Ok(Some(r.to_string()))
    };
    let spec = MigrationSpec {
        tool,
        expand: revision("expand", &m.expand)?,
        contract: revision("contract", &m.contract)?,
        alembic_dir: m.alembic_dir.as_ref().map(|d| PathBuf::from(d.get_ref())),
        alembic_recursive: m
            .recursive_version_locations
            .as_ref()
            .is_some_and(|r| *r.get_ref()),
        history_table: m
            .history_table
            .as_ref()
            .map(|t| t.get_ref().trim().to_string()),
    };
    if spec.expand.is_none() && spec.contract.is_none() {
        return Err(at.err(
            "tool",
            &m.tool,
            "[migration] names neither `expand` nor `contract`: give the revision the backfill follows and/or the one that must wait for it",
        ));
    }
    if let (Some(e), Some(c)) = (&spec.expand, &spec.contract) {
        if e == c {
            return Err(at.err(
                "contract",
                m.contract.as_ref().expect("contract given"),
                "expand and contract are the same revision",
            ));
        }
    }
    match (tool, &m.alembic_dir) {
        (Tool::Alembic, None) => {
            return Err(at.err(
                "tool",
                &m.tool,
                "alembic keeps only its current heads, so the engine reads the revision graph: add alembic_dir = \"migrations/versions\" (the directory of your revision files)",
            ))
        }
        (Tool::Alembic, Some(_)) | (_, None) => {
            if let (false, Some(r)) = (tool == Tool::Alembic, &m.recursive_version_locations) {
                return Err(at.err(
                    "recursive_version_locations",
                    r,
                    format!("recursive_version_locations is for tool = \"alembic\" only (tool is \"{}\")", tool.name()),
                ));
            }
        }
        (_, Some(d)) => {
            return Err(at.err(
                "alembic_dir",
                d,
                format!("alembic_dir is for tool = \"alembic\" only (tool is \"{}\")", tool.name()),
            ))
        }
    }
    if let Some(t) = &m.history_table {
        crate::sql::TableName::parse(t.get_ref())
            .map_err(|e| at.err("history_table", t, format!("`{}`: {e}", t.get_ref())))?;
    }
    Ok(spec)
}
