//! Each tool's history table read as the tool writes it, and the sentence that explains the answer
//! ("applied at …", "failed: fix it and …"). Reads only: never creates, repairs or writes a
//! migrator's table. Which table and which revision are `super`'s to say.

use super::revision::FlywayVersion;
use super::{Applied, Tool};
use crate::db;
use crate::error::{Error, Result};
use crate::migrator::alembic::RevisionGraph;
use std::path::Path;
use std::sync::Arc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Row};

/// One history table on one connection.
pub(super) struct Reader<'a, C> {
    pub(super) client: &'a C,
    pub(super) tool: Tool,
    /// Quoted for SQL.
    pub(super) table: String,
    /// As the operator wrote it (or the tool's default), for messages.
    pub(super) shown: String,
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

    pub(super) async fn one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
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

    pub(super) async fn sqlx(&self, v: i64) -> Result<Applied> {
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

    pub(super) async fn refinery(&self, v: i64) -> Result<Applied> {
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

    pub(super) async fn flyway(&self, v: &FlywayVersion) -> Result<Applied> {
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

    pub(super) async fn golang_migrate(&self, v: i64) -> Result<Applied> {
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

    pub(super) async fn rails(&self, v: &str) -> Result<Applied> {
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

    pub(super) async fn diesel(&self, v: &str) -> Result<Applied> {
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

    pub(super) async fn django(&self, app: &str, name: &str) -> Result<Applied> {
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

    /// `graph` is the one `name` was resolved against, to `id`; the name is resolved again only
    /// when the files had to be read again.
    pub(super) async fn alembic(
        &self,
        dir: &Path,
        recursive: bool,
        name: &str,
        mut graph: Arc<RevisionGraph>,
        mut id: String,
    ) -> Result<Applied> {
        let t = &self.shown;
        let heads: Vec<String> = self
            .all("SELECT version_num::text FROM {t} ORDER BY 1", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if heads.iter().any(|h| !graph.contains(h)) {
            // The files may have changed since they were read (a deploy during a wait).
            graph = RevisionGraph::reload(dir, recursive)?;
            id = graph.resolve(name)?;
        }
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
