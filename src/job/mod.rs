//! Job definitions: `jobs/<name>.toml` files, parsed into a [`raw::RawJob`] and validated into a
//! [`JobSpec`]. Everything here works offline and depends only on `crate::sql` and `crate::error`:
//! it never reads a migrator's files or touches the database. Checks that need the database (does
//! the key column exist, is it backed by a unique index) live in `keyset`; those that need the
//! project around the job (finishing steps, migrator revisions) in `crate::resolve`.

mod duration;
pub(crate) mod locate;
mod migration;
mod phases;
pub mod raw;
mod spec;
mod throttle;

pub use migration::{MigrationSpec, Tool};
pub use phases::{Revert, DEFAULT_MAX_SWEEPS};
pub use throttle::{parse_bytes, OnSignalError, ThrottleSpec};

pub use duration::{check_stored_duration, parse_duration, parse_server_timeout, MAX_TIMEOUT};
pub use spec::{
    JobSpec, OnError, DEFAULT_CHUNK_ROWS, DEFAULT_LOCK_TIMEOUT, DEFAULT_STATEMENT_TIMEOUT,
};

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The job file for `name` under `dir`.
pub fn path_for(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.toml"))
}

/// Rejects names that cannot be the file stem of a job under `dir`.
fn check_name(dir: &Path, name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(Error::Usage(format!(
            "invalid job name `{name}`: give the file stem of a job under {}",
            dir.display()
        )));
    }
    Ok(())
}

/// The job files found under `dir`, for an error about a job that is not there.
pub fn known_jobs(dir: &Path) -> String {
    let known = list_names(dir).unwrap_or_default();
    if known.is_empty() {
        format!("no job files in {}", dir.display())
    } else {
        format!("jobs in {}: {}", dir.display(), known.join(", "))
    }
}

/// Whether `dir` has a file for job `name` (valid or not). The revert job of a job
/// (`NAME:revert`) counts as having the job's file.
pub fn file_exists(dir: &Path, name: &str) -> Result<bool> {
    check_name(dir, name)?;
    let stem = name.strip_suffix(":revert").unwrap_or(name);
    Ok(path_for(dir, stem).is_file())
}

/// Loads and validates one job by name.
pub fn load(dir: &Path, name: &str) -> Result<JobSpec> {
    check_name(dir, name)?;
    let path = path_for(dir, name);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Usage(format!(
                "job `{name}` not found: no file {} ({}); pass --jobs DIR if the jobs live elsewhere",
                path.display(),
                known_jobs(dir)
            ))
        } else {
            Error::Usage(format!("cannot read job file {}: {e}", path.display()))
        }
    })?;
    JobSpec::parse(name, &path, &text)
}

/// Job names (file stems of `*.toml`) under `dir`, sorted.
pub fn list_names(dir: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        Error::Usage(format!(
            "cannot read jobs directory {}: {e} (pass --jobs DIR)",
            dir.display()
        ))
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    Ok(names)
}

/// Loads every job under `dir`, returning each name with its result.
pub fn load_all(dir: &Path) -> Result<Vec<(String, Result<JobSpec>)>> {
    Ok(list_names(dir)?
        .into_iter()
        .map(|n| {
            let r = load(dir, &n);
            (n, r)
        })
        .collect())
}
