//! A job resolved against the project around it: the job file parsed (offline, by `job`), then
//! the checks that need more than the file's own text — each finishing step is one statement
//! (`finish`), each migrator revision is written as its tool writes them (`migrator`). The commands
//! load jobs through here, so an invalid job is refused, naming file, line and key, before
//! anything runs. Owns only that sequence: it neither reads the database nor runs anything, and
//! job parsing never calls back into it.

use crate::error::Result;
use crate::job::{self, JobSpec};
use std::path::Path;

/// Checks a parsed job against the project: its finishing steps, then its migrator revisions.
pub fn check(job: &JobSpec) -> Result<()> {
    crate::finish::check_steps(job)?;
    crate::migrator::check_revisions(job)
}

/// Loads, validates and checks one job by name.
pub fn load(dir: &Path, name: &str) -> Result<JobSpec> {
    let spec = job::load(dir, name)?;
    check(&spec)?;
    Ok(spec)
}

/// Loads and checks every job under `dir`, returning each name with its result.
pub fn load_all(dir: &Path) -> Result<Vec<(String, Result<JobSpec>)>> {
    Ok(job::load_all(dir)?
        .into_iter()
        .map(|(name, spec)| (name, spec.and_then(|s| check(&s).map(|()| s))))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "table = \"t\"\nkey = \"id\"\nsql = \"UPDATE t SET n = 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n";

    /// The error for a job file of `OK` plus `extra`, as the commands see it.
    fn checked(extra: &str) -> std::result::Result<JobSpec, String> {
        let spec = JobSpec::parse("j", Path::new("jobs/j.toml"), &format!("{OK}{extra}"))
            .map_err(|e| e.to_string())?;
        check(&spec).map_err(|e| e.to_string())?;
        Ok(spec)
    }

    #[test]
    fn project_checks_name_file_line_and_key() {
        // (extra lines, what the message must contain; None when accepted)
        let cases: &[(&str, Option<&[&str]>)] = &[
            (
                "finish_sql = [\"ALTER TABLE t VALIDATE CONSTRAINT c;\"]\n",
                None,
            ),
            (
                "finish_sql = [\"SELECT 1; SELECT 2\"]\n",
                Some(&[
                    "jobs/j.toml:4: key `finish_sql`",
                    "job j: finishing step 1/1",
                    "more than one statement",
                ]),
            ),
            (
                "finish_sql = [\"ALTER TABLE t VALIDATE CONSTRAINT c\", \"COMMIT\"]\n",
                Some(&[
                    "jobs/j.toml:4: key `finish_sql`",
                    "step 2/2",
                    "transaction command",
                ]),
            ),
            ("[migration]\ntool = \"sqlx\"\nexpand = \"1\"\n", None),
            (
                "[migration]\ntool = \"sqlx\"\nexpand = \"one\"\n",
                Some(&["jobs/j.toml:6: key `expand`", "sqlx revision `one`"]),
            ),
            (
                "[migration]\ntool = \"flyway\"\nexpand = \"1\"\ncontract = \"R__views\"\n",
                Some(&["jobs/j.toml:7: key `contract`", "repeatable"]),
            ),
            (
                "[migration]\ntool = \"alembic\"\nalembic_dir = \"nowhere\"\nexpand = \"heads\"\n",
                Some(&["jobs/j.toml:7: key `expand`", "name one revision"]),
            ),
        ];
        for (extra, want) in cases {
            match (checked(extra), want) {
                (Ok(_), None) => {}
                (Err(m), Some(parts)) => {
                    for p in *parts {
                        assert!(m.contains(p), "{extra}: {m} lacks {p}");
                    }
                }
                (got, _) => panic!("{extra}: {:?}", got.map(|s| s.name)),
            }
        }
    }
}
