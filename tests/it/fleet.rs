//! Fleets (`--fleet FILE`): one job over several databases, each with its own engine schema and
//! checkpoint. The shards here are databases of the shared test cluster, plus one that is not
//! there.

use crate::support::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Shards `a` and `b`, each a fresh database with the counter table and job `j`.
struct Shards {
    a: TestDb,
    b: TestDb,
}

impl Shards {
    fn new(rows: i64) -> Shards {
        let (a, b) = (TestDb::new(), TestDb::new());
        for db in [&a, &b] {
            counter_table(db, rows);
        }
        a.write_job("j", &counter_job(""));
        Shards { a, b }
    }

    /// A fleet file in a's jobs directory listing the given `name = "url"` lines.
    fn fleet_file(&self, body: &str) -> PathBuf {
        let path = self.a.jobs.join("fleet.toml.txt");
        std::fs::write(&path, body).unwrap();
        path
    }

    fn two_shards(&self) -> PathBuf {
        self.fleet_file(&format!(
            "max_parallel = 2\n[shards]\nsh_a = \"{}\"\nsh_b = \"{}\"\n",
            self.a.url, self.b.url
        ))
    }

    /// The binary on the fleet, with a's jobs and none of the caller's PG*/DATABASE_URL settings.
    fn fleet(&self, fleet: &PathBuf, args: &[&str]) -> Out {
        let mut c = Command::new(env!("CARGO_BIN_EXE_backfill"));
        for (k, _) in std::env::vars() {
            if k.starts_with("PG") || k == "DATABASE_URL" || k.starts_with("BACKFILL_") {
                c.env_remove(k);
            }
        }
        c.arg("--jobs").arg(&self.a.jobs).arg("--fleet").arg(fleet);
        c.args(args).stdin(Stdio::null());
        Out::from(c.output().unwrap())
    }
}

#[test]
fn the_fleet_gate_passes_only_when_every_shard_is_done_and_names_those_that_are_not() {
    let s = Shards::new(300);
    let fleet = s.two_shards();

    let out = s.fleet(&fleet, &["gate", "j"]);
    out.expect(3);
    assert!(
        out.stdout
            .contains("job j: 2 of 2 shards not ready: sh_a, sh_b"),
        "{out:?}"
    );

    s.a.run(&["run", "j"]).expect(0);
    let out = s.fleet(&fleet, &["gate", "j", "--json"]);
    out.expect(3);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["passed"], false, "{out:?}");
    assert_eq!(report["not_ready"], serde_json::json!(["sh_b"]), "{out:?}");
    assert_eq!(report["shards"][0]["shard"], "sh_a", "{out:?}");
    assert_eq!(report["shards"][0]["passed"], true, "{out:?}");
    assert_eq!(report["shards"][1]["state"], "new", "{out:?}");

    // b's run, on b alone, with the same job file.
    s.a.cmd_at(&s.b.url, &["run", "j"])
        .output()
        .map(Out::from)
        .unwrap()
        .expect(0);
    let out = s.fleet(&fleet, &["gate", "j"]);
    out.expect(0);
    assert!(
        out.stdout.contains("job j: every shard (2) is ready"),
        "{out:?}"
    );
    for db in [&s.a, &s.b] {
        assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    }
}

#[test]
fn an_unreachable_shard_is_an_error_of_its_own_and_never_shows_its_password() {
    let s = Shards::new(50);
    s.a.run(&["run", "j"]).expect(0);
    // Port 9 (discard) on loopback: nothing of PostgreSQL listens there.
    let fleet = s.fleet_file(&format!(
        "[shards]\nsh_a = \"{}\"\ngone = \"postgresql://app:s3cret@127.0.0.1:9/app?connect_timeout=2\"\n",
        s.a.url
    ));
    let out = s.fleet(&fleet, &["gate", "j"]);
    out.expect(1);
    assert!(out.stdout.contains("sh_a"), "{out:?}");
    assert!(out.stdout.contains("ready"), "{out:?}");
    assert!(out.stdout.contains("gone         error"), "{out:?}");
    assert!(
        out.stdout.contains("1 of 2 shards not ready: gone"),
        "{out:?}"
    );
    assert!(!format!("{out:?}").contains("s3cret"), "{out:?}");
}

#[test]
fn a_bad_fleet_file_or_fleet_with_a_database_url_is_a_usage_error() {
    let s = Shards::new(10);
    let fleet = s.fleet_file(&format!(
        "[shards]\nsh_a = \"{}\"\nsh_b = \"${{BACKFILL_TEST_UNSET_SHARD_URL}}\"\n",
        s.a.url
    ));
    let out = s.fleet(&fleet, &["gate", "j"]);
    out.expect(2);
    assert!(
        out.stderr.contains(&format!(
            "invalid fleet file {}:3: key `shards.sh_b`: environment variable BACKFILL_TEST_UNSET_SHARD_URL is not set",
            fleet.display()
        )),
        "{out:?}"
    );

    let fleet = s.two_shards();
    let out = Out::from(
        s.a.cmd(&["--fleet", fleet.to_str().unwrap(), "gate", "j"])
            .output()
            .unwrap(),
    );
    out.expect(2);
    assert!(out.stderr.contains("--fleet"), "{out:?}");

    // Not a fleet command yet: refused, not run on one database.
    let out = s.fleet(&fleet, &["run", "j"]);
    out.expect(2);
    assert!(
        out.stderr
            .contains("`backfill run` does not take --fleet yet"),
        "{out:?}"
    );
    assert_eq!(s.a.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);

    let out = s.fleet(&fleet, &["check", "j"]);
    out.expect(0);
    assert!(out.stdout.contains("2 shards, max_parallel 2"), "{out:?}");
}
