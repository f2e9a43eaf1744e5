//! A fleet file: the shards one job runs on (each a database with the engine's schema of its
//! own), how many are processed at once, and per-shard settings. Turns the file into a
//! [`Fleet`] or an exit-2 error naming the file, the line and the key.
//! Reads the environment for `${VAR}` and for what a shard's connection string leaves out (as
//! libpq does); opens no connection. Never prints a shard's connection string or the value of a
//! variable: either may hold a password.

use crate::db::Target;
use crate::error::{Error, Result};
use crate::job::locate::Locator;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Shards processed at once when the file does not say.
pub const DEFAULT_MAX_PARALLEL: u32 = 4;
const MAX_PARALLEL_LIMIT: i64 = 64;

/// A fleet: its shards in the order the file lists them.
#[derive(Debug)]
pub struct Fleet {
    pub path: PathBuf,
    pub max_parallel: u32,
    pub shards: Vec<Shard>,
}

/// One database of a fleet.
#[derive(Debug)]
pub struct Shard {
    pub name: String,
    pub target: Target,
    pub settings: ShardSettings,
}

/// What `[shard_settings.NAME]` sets for one shard: it takes the place of the job file's value
/// and of the run's flag, on that shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardSettings {
    pub rows_per_second: Option<u32>,
    pub workers: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    max_parallel: Option<Spanned<i64>>,
    shards: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    #[serde(default)]
    shard_settings: BTreeMap<String, Spanned<RawSettings>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    rows_per_second: Option<Spanned<i64>>,
    workers: Option<Spanned<i64>>,
}

/// Reads and checks a fleet file.
pub fn load(path: &Path) -> Result<Fleet> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Usage(format!(
            "cannot read fleet file {}: {e} (pass --fleet FILE or set BACKFILL_FLEET)",
            path.display()
        ))
    })?;
    parse(path, &text, &|name| std::env::var(name).ok())
}

/// Parses a fleet file's text; `env` looks a `${VAR}` up.
pub fn parse(path: &Path, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Fleet> {
    let at = Locator {
        kind: "fleet file",
        path,
        text,
    };
    let raw: RawFleet = at.parse()?;
    let max_parallel = match &raw.max_parallel {
        None => DEFAULT_MAX_PARALLEL,
        Some(n) => in_range(&at, "max_parallel", n, MAX_PARALLEL_LIMIT)?,
    };
    let Some(listed) = raw.shards.as_ref() else {
        return Err(Error::Usage(format!(
            "invalid fleet file {}: no [shards] table; list each database as NAME = \"postgresql://…\"",
            path.display()
        )));
    };
    if listed.get_ref().is_empty() {
        return Err(at.err("shards", listed, "the shard list is empty"));
    }
    let mut in_file_order: Vec<(&String, &Spanned<String>)> = listed.get_ref().iter().collect();
    in_file_order.sort_by_key(|(_, url)| url.span().start);

    let mut shards: Vec<Shard> = Vec::with_capacity(in_file_order.len());
    for (name, url) in in_file_order {
        let key = format!("shards.{name}");
        check_shard_name(name).map_err(|m| at.err(&key, url, m))?;
        let expanded = expand_vars(url.get_ref(), env).map_err(|m| at.err(&key, url, m))?;
        let target = Target::resolve(Some(&expanded)).map_err(|e| at.err(&key, url, e))?;
        if let Some(same) = shards.iter().find(|s| s.target.same_database(&target)) {
            return Err(at.err(
                &key,
                url,
                format!(
                    "the same database as shard `{}` ({}): each shard must be a database of its own",
                    same.name,
                    target.database()
                ),
            ));
        }
        shards.push(Shard {
            name: name.clone(),
            target,
            settings: ShardSettings::default(),
        });
    }
    for (name, settings) in &raw.shard_settings {
        let key = format!("shard_settings.{name}");
        let Some(shard) = shards.iter_mut().find(|s| &s.name == name) else {
            return Err(at.err(&key, settings, format!("no shard `{name}` in [shards]")));
        };
        let s = settings.get_ref();
        let value = |field: &str, v: &Option<Spanned<i64>>, max: i64| {
            v.as_ref()
                .map(|v| in_range(&at, &format!("{key}.{field}"), v, max))
                .transpose()
        };
        shard.settings = ShardSettings {
            rows_per_second: value("rows_per_second", &s.rows_per_second, u32::MAX as i64)?,
            workers: value("workers", &s.workers, crate::executor::MAX_WORKERS as i64)?,
        };
    }
    Ok(Fleet {
        path: path.to_path_buf(),
        max_parallel,
        shards,
    })
}

fn in_range(at: &Locator<'_>, key: &str, n: &Spanned<i64>, max: i64) -> Result<u32> {
    match *n.get_ref() {
        v if (1..=max).contains(&v) => Ok(v as u32),
        v => Err(at.err(key, n, format!("{v} is out of range: use 1 to {max}"))),
    }
}

/// Shard names appear in metrics labels, tables and file names: letters, digits, `_` and `-`.
fn check_shard_name(name: &str) -> std::result::Result<(), String> {
    if name == crate::telemetry::FLEET_TOTAL {
        return Err(format!(
            "`{name}` names the fleet's total in progress lines: choose another shard name"
        ));
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err("a shard name is 1 to 63 letters, digits, `_` or `-`".into())
    }
}

/// Replaces each `${NAME}` by the variable's value (`$$` is a `$`; a `$` before anything else
/// stays as it is). Inside a URL (`postgresql://…`) that is more than the variable, the value is
/// percent-encoded, so a password holding `@`, `/` or `:` stays a password; in a key=value
/// string, such a value must be the whole string or a whole quoted value. An unset or empty
/// variable is an error that names it (its value is never shown).
fn expand_vars(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let whole = s.starts_with("${") && s.ends_with('}') && s[2..].find('}') == Some(s.len() - 3);
    let in_url = !whole && (s.starts_with("postgresql://") || s.starts_with("postgres://"));
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(more) = after.strip_prefix('$') {
            out.push('$');
            rest = more;
            continue;
        }
        let Some(inner) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = inner.find('}') else {
            return Err("`${` without a closing `}` (write `$$` for a `$`)".into());
        };
        let name = &inner[..end];
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            // Not shown: it may be part of a password written in the file.
            return Err("a `${…}` that is not a variable name (letters, digits and `_`; write `$$` for a `$`)".into());
        }
        match env(name).filter(|v| !v.is_empty()) {
            Some(v) if in_url => out.push_str(&percent_encode(&v)),
            Some(v) => out.push_str(&v),
            None => return Err(format!("environment variable {name} is not set")),
        }
        rest = &inner[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Every byte but RFC 3986's unreserved ones as `%XX`.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "US1_URL" => Some("postgresql://app:s3cret@us1.internal:6432/app".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn fleet(text: &str) -> Result<Fleet> {
        parse(Path::new("fleets/prod.toml"), text, &env)
    }

    fn usage(text: &str) -> String {
        match fleet(text) {
            Err(Error::Usage(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn shards_keep_file_order_and_expand_variables() {
        let f = fleet(
            "max_parallel = 2\n[shards]\nzz = \"postgresql://app@zz.internal/app\"\nus1 = \"${US1_URL}\"\nap1 = \"host=ap1.internal dbname=app user=app\"\n[shard_settings.us1]\nrows_per_second = 500\nworkers = 2\n",
        )
        .unwrap();
        assert_eq!(f.max_parallel, 2);
        let names: Vec<&str> = f.shards.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["zz", "us1", "ap1"]);
        assert_eq!(f.shards[1].target.describe(), "app@us1.internal:6432/app");
        assert_eq!(
            f.shards[1].settings,
            ShardSettings {
                rows_per_second: Some(500),
                workers: Some(2)
            }
        );
        assert_eq!(f.shards[0].settings, ShardSettings::default());
        assert_eq!(
            fleet("[shards]\na = \"postgresql://u@h/a\"")
                .unwrap()
                .max_parallel,
            DEFAULT_MAX_PARALLEL
        );
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let m = usage("[shards]\neu1 = \"postgresql://u@h/a\"\nus1 = \"${US1_DATABASE_URL}\"\n");
        assert_eq!(
            m,
            "invalid fleet file fleets/prod.toml:3: key `shards.us1`: environment variable US1_DATABASE_URL is not set"
        );
        assert!(usage("[shards]\na = \"${EMPTY}\"").contains("EMPTY is not set"));
        let m = usage("max_paralel = 2\n[shards]\na = \"postgresql://u@h/a\"");
        assert!(
            m.starts_with("invalid fleet file fleets/prod.toml:1"),
            "{m}"
        );
        assert!(m.contains("max_paralel"), "{m}");
        let m = usage("[shards]\na = \"postgresql://u@h/a\"\na = \"postgresql://u@h/b\"\n");
        assert!(
            m.starts_with("invalid fleet file fleets/prod.toml:3"),
            "{m}"
        );
        assert!(m.contains("duplicate"), "{m}");
        let m = usage("[shards]\n");
        assert!(
            m.contains(":1: key `shards`: the shard list is empty"),
            "{m}"
        );
        assert!(usage("max_parallel = 1\n").contains("no [shards] table"));
        let m = usage("max_parallel = 0\n[shards]\na = \"postgresql://u@h/a\"");
        assert!(
            m.contains(":1: key `max_parallel`: 0 is out of range"),
            "{m}"
        );
        let m = usage("[shards]\na = \"postgresql://u@h/a\"\n[shard_settings.b]\nworkers = 2\n");
        assert!(
            m.contains(":3: key `shard_settings.b`: no shard `b`"),
            "{m}"
        );
        let m = usage(
            "[shards]\na = \"postgresql://u@h/a\"\n[shard_settings.a]\nworkers = 2\nbatch = 3\n",
        );
        assert!(m.contains("batch"), "{m}");
        let m = usage("[shards]\n\"a b\" = \"postgresql://u@h/a\"\n");
        assert!(m.contains("key `shards.a b`: a shard name is"), "{m}");
        let m = usage("[shards]\nall = \"postgresql://u@h/a\"\n");
        assert!(m.contains("names the fleet's total"), "{m}");
        let m = usage("[shards]\na = \"postgresql://u@h/${1X}\"\n");
        assert!(
            m.contains("not a variable name") && !m.contains("1X"),
            "{m}"
        );
    }

    #[test]
    fn a_variable_inside_a_url_is_percent_encoded_and_dollars_are_escaped() {
        let env = |name: &str| match name {
            "PW" => Some("p@ss/w:rd".to_string()),
            _ => None,
        };
        let f = parse(
            Path::new("f.toml"),
            "[shards]\na = \"postgresql://app:${PW}@db.internal/app\"\nb = \"postgresql://app:pa$$word@db.internal/b\"\n",
            &env,
        )
        .unwrap();
        assert_eq!(f.shards[0].target.describe(), "app@db.internal:5432/app");
        assert_eq!(f.shards[1].target.describe(), "app@db.internal:5432/b");
    }

    #[test]
    fn two_names_for_one_database_are_refused() {
        let m = usage(
            "[shards]\neu1 = \"postgresql://app@db.internal:5432/app\"\neu2 = \"host=db.internal port=5432 dbname=app user=other\"\n",
        );
        assert_eq!(
            m,
            "invalid fleet file fleets/prod.toml:3: key `shards.eu2`: the same database as shard `eu1` (db.internal:5432/app): each shard must be a database of its own"
        );
        let m = usage(
            "[shards]\na = \"postgresql://app@DB.internal/app\"\nb = \"host=db.INTERNAL dbname=app user=app\"\n",
        );
        assert!(m.contains("the same database as shard `a`"), "{m}");
        // Another database on the same server is another shard.
        fleet("[shards]\na = \"postgresql://app@db.internal/app_a\"\nb = \"postgresql://app@db.internal/app_b\"\n")
            .unwrap();
    }

    #[test]
    fn no_error_shows_a_password() {
        for text in [
            "[shards]\na = \"${US1_URL}\"\nb = \"${US1_URL}\"\n",
            "[shards]\na = \"postgresql://app:s3cret@h:notaport/a\"\n",
            "[shards]\na = \"${US1_URL}\"\n[shard_settings.a]\nworkers = 0\n",
        ] {
            let m = usage(text);
            assert!(!m.contains("s3cret"), "{m}");
        }
    }
}
