//! A revision as a job names it, checked offline against how its tool spells revisions
//! (`20240101120000_add_status`, `V1_1__x`, `orders.0002_x`, an alembic id or label) and turned
//! into what the tool's history stores. Pure text: reading the history is [`super::read`]'s,
//! reading alembic's revision files is `super::super::alembic`'s.

use super::{History, Tool};
use crate::error::{Error, Result};
use std::path::PathBuf;

/// A revision validated for its tool.
pub(super) enum Revision {
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
    pub(super) fn parse_revision(&self, revision: &str) -> Result<Revision> {
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
            Tool::Django => django(raw, &bad),
            Tool::Alembic => self.alembic(revision, raw, &bad),
        }
    }

    /// An alembic name: one revision (id, unique prefix, branch label or `label@head`), never a
    /// symbolic or relative one.
    fn alembic(&self, revision: &str, raw: &str, bad: &dyn Fn(&str) -> Error) -> Result<Revision> {
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

/// A django migration: `app.migration_name` (a `.py` suffix is ignored).
fn django(raw: &str, bad: &dyn Fn(&str) -> Error) -> Result<Revision> {
    let text = raw.strip_suffix(".py").unwrap_or(raw);
    let Some((app, name)) = text.split_once('.') else {
        return Err(bad("expected app.migration_name"));
    };
    let word = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_');
    if !word(app) || !word(name) {
        return Err(bad("expected app.migration_name"));
    }
    Ok(Revision::Django {
        app: app.to_string(),
        name: name.to_string(),
    })
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
pub(super) struct FlywayVersion {
    text: String,
    pub(super) parts: Vec<u128>,
}

impl FlywayVersion {
    pub(super) fn parse(text: &str) -> Option<FlywayVersion> {
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
