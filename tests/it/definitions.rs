//! Bad job files and bad keys: exit 2 with the file, line, key and what to do.

use crate::support::*;
use std::time::Duration;

const GOOD: &str = "table = \"t\"\nkey = [\"id\"]\nsql = \"UPDATE t SET n = n + 1 WHERE id BETWEEN :start AND :end\"\n";

#[test]
fn bad_job_files_are_rejected_offline_with_file_line_and_key() {
    let db = TestDb::new();
    let cases: &[(&str, String, &[&str])] = &[
        (
            "unknown_key",
            format!("{GOOD}colour = \"red\"\n"),
            &[":4", "colour"],
        ),
        (
            "missing_sql",
            "table = \"t\"\nkey = [\"id\"]\n".into(),
            &["sql"],
        ),
        (
            "missing_table",
            "key = [\"id\"]\nsql = \"x :start :end\"\n".into(),
            &["table"],
        ),
        (
            "wrong_type",
            GOOD.replace("[\"id\"]", "[\"id\", 7]"),
            &[":2", "key"],
        ),
        (
            "no_placeholders",
            GOOD.replace(":start AND :end", "1 AND 2"),
            &[":3", "key `sql`", ":start"],
        ),
        (
            "only_start",
            GOOD.replace(":end", "10"),
            &["key `sql`", ":end"],
        ),
        (
            "quoted_placeholder",
            GOOD.replace(":end", "':end'"),
            &["key `sql`", ":end"],
        ),
        (
            "empty_key",
            GOOD.replace("[\"id\"]", "[]"),
            &[":2", "empty"],
        ),
        (
            "bad_timeout",
            format!("{GOOD}lock_timeout = \"soonish\"\n"),
            &[":4", "lock_timeout"],
        ),
        (
            "bad_chunk",
            format!("{GOOD}chunk_rows = -5\n"),
            &[":4", "chunk_rows"],
        ),
        ("not_toml", "table = \n".into(), &["invalid job file"]),
    ];
    for (name, text, needles) in cases {
        db.write_job(name, text);
        for args in [vec!["check", name], vec!["run", name]] {
            let out = db.run(&args);
            assert_eq!(out.code, 2, "{name} {args:?}: {out:?}");
            let all = format!("{}{}", out.stdout, out.stderr);
            assert!(
                all.contains(&format!("{name}.toml")),
                "{name}: file not named: {out:?}"
            );
            for n in *needles {
                assert!(all.contains(n), "{name}: `{n}` missing: {out:?}");
            }
        }
    }
    // `check` with no name reports every file and fails as a whole.
    db.write_job("fine", GOOD);
    let out = db.run(&["check"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stdout.contains("ok       fine"), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "{} of {} job files are invalid",
            cases.len(),
            cases.len() + 1
        )),
        "{out:?}"
    );
    db.run(&["check", "fine"]).expect(0);
    // An unknown job names the directory's jobs.
    let out = db.run(&["run", "nope"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("job `nope` not found") && out.stderr.contains("fine"),
        "{out:?}"
    );
}

#[test]
fn keys_the_database_cannot_walk_are_rejected_before_any_work() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE nokey (id bigint NOT NULL, n int NOT NULL DEFAULT 0);
         CREATE TABLE nullable (id bigint, n int NOT NULL DEFAULT 0);
         CREATE UNIQUE INDEX ON nullable (id);
         CREATE TABLE comp (a int NOT NULL, b int NOT NULL, n int NOT NULL DEFAULT 0, PRIMARY KEY (a, b));
         INSERT INTO nokey (id) VALUES (1); INSERT INTO nullable (id) VALUES (1);",
    );
    let job = |table: &str, key: &str| {
        format!("table = \"{table}\"\nkey = {key}\nsql = \"UPDATE {table} SET n = 1 WHERE true AND :start IS NOT NULL AND :end IS NOT NULL\"\n")
    };
    let cases = [
        ("missing_table", job("nosuch", "[\"id\"]"), "does not exist"),
        (
            "missing_column",
            job("nokey", "[\"ID\"]"),
            "did you mean `id`",
        ),
        (
            "not_unique",
            job("nokey", "[\"id\"]"),
            "not backed by a unique index",
        ),
        ("nullable", job("nullable", "[\"id\"]"), "nullable"),
        (
            "wrong_order",
            job("comp", "[\"b\", \"a\"]"),
            "in another order",
        ),
    ];
    for (name, text, needle) in &cases {
        db.write_job(name, text);
        let out = db.run(&["run", name]);
        assert_eq!(out.code, 2, "{name}: {out:?}");
        assert!(out.stderr.contains(needle), "{name}: {out:?}");
        assert!(
            out.stderr.contains(&format!("job {name}")),
            "{name}: {out:?}"
        );
    }
    assert_eq!(db.i64("SELECT count(*) FROM nokey WHERE n <> 0"), 0);
}

#[test]
fn a_changed_definition_is_refused_unless_allowed() {
    let db = TestDb::new();
    counter_table(&db, 1000);
    // Fails permanently at one key: division by zero in the chunk that holds id 601.
    let failing = "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
        sql = \"UPDATE t SET n = n + 1 / (CASE WHEN id = 601 THEN 0 ELSE 1 END) WHERE id BETWEEN :start AND :end\"\n";
    db.write_job("c", failing);
    let out = db.run(&["run", "c"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("SQLSTATE 22012"), "{out:?}");
    // The failing chunk is narrowed down to the exact key; every key before it is committed.
    assert!(
        out.stderr.contains("key 601 makes the statement fail")
            && out.stderr.contains("resumes at this key"),
        "{out:?}"
    );
    let done = db.i64("SELECT count(*) FROM t WHERE n = 1");
    assert_eq!(done, db.i64("SELECT count(*) FROM t WHERE id < 601"));
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n > 1"), 0);
    let out = db.run(&["status", "c", "--json"]);
    let st: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let last_error = st["checkpoint"]["last_error"].as_str().unwrap();
    assert!(
        last_error.contains("key 601") && last_error.contains("22012"),
        "{out:?}"
    );
    assert_eq!(st["state"], "failed");
    assert_eq!(
        db.text("SELECT state FROM backfill.checkpoints WHERE job = 'c'")
            .as_deref(),
        Some("failed")
    );

    db.write_job("c", &counter_job(""));
    let out = db.run(&["run", "c"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("changed since progress was saved")
            && out.stderr.contains("--allow-changed-definition"),
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n = 1"),
        done,
        "a refused run must not touch rows"
    );

    db.run(&["run", "c", "--allow-changed-definition"])
        .expect(0);
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n <> 1"),
        0,
        "every row exactly once"
    );
}

#[test]
fn values_postgresql_would_refuse_are_rejected_by_check_with_file_line_and_key() {
    let db = TestDb::new();
    counter_table(&db, 300);
    // TOML writes a NUL as \u0000; PostgreSQL takes none, in a name or in SQL text.
    let cases: &[(&str, String, &[&str])] = &[
        (
            "long_lock",
            format!("{GOOD}lock_timeout = \"30days\"\n"),
            &[":4", "key `lock_timeout`", "2147483647ms"],
        ),
        (
            "long_statement",
            format!("{GOOD}statement_timeout = \"100days\"\n"),
            &[":4", "key `statement_timeout`", "2147483647ms"],
        ),
        (
            "nul_table",
            GOOD.replace("\"t\"", r#""\"t\u0000x\"""#),
            &[":1", "key `table`", "NUL"],
        ),
        (
            "nul_key",
            GOOD.replace("[\"id\"]", r#"["i\u0000d"]"#),
            &[":2", "key `key`", "NUL"],
        ),
        (
            "nul_sql",
            GOOD.replace("n + 1", r#"n + 1 /* \u0000 */"#),
            &[":3", "key `sql`", "NUL"],
        ),
        (
            "nul_undo",
            format!("{GOOD}undo = [\"n\\u0000\"]\n"),
            &[":4", "key `undo`", "NUL"],
        ),
    ];
    for (name, text, needles) in cases {
        db.write_job(name, text);
        for args in [vec!["check", name], vec!["run", name], vec!["plan", name]] {
            let out = db.run(&args);
            assert_eq!(out.code, 2, "{name} {args:?}: {out:?}");
            let all = format!("{}{}", out.stdout, out.stderr);
            assert!(all.contains(&format!("{name}.toml")), "{name}: {out:?}");
            for n in *needles {
                assert!(all.contains(n), "{name} {args:?}: `{n}` missing: {out:?}");
            }
        }
    }
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);

    // The same limit for the flags that become server timeouts, and for what `set` stores.
    db.write_job(
        "ok",
        &format!("{GOOD}lock_timeout = \"24d\"\nstatement_timeout = \"24d\"\n"),
    );
    let flags: &[&[&str]] = &[
        &["run", "ok", "--lock-timeout", "30days"],
        &["run", "ok", "--statement-timeout", "100days"],
        &["run", "ok", "--verify-timeout", "25d"],
        &["gate", "ok", "--verify-timeout", "25d"],
        &["plan", "ok", "--verify-timeout", "25d"],
        &["set", "ok", "--pause", "30days"],
        &["set", "ok", "--target-chunk-time", "30days"],
    ];
    for args in flags {
        let out = db.run(args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains("2147483647ms"), "{args:?}: {out:?}");
    }
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);
    // Just under the limit is what the server accepts: the job runs.
    db.run(&["check", "ok"]).expect(0);
    db.run(&["run", "ok", "--statement-timeout", "24d"])
        .expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn an_undo_column_the_table_lacks_is_a_definition_error_before_any_work() {
    let db = TestDb::new();
    counter_table(&db, 300);
    for (name, col, hint) in [("u", "nn", None), ("v", "N", Some("did you mean `n`"))] {
        db.write_job(
            name,
            &format!("{GOOD}chunk_rows = 50\nundo = [\"{col}\"]\n"),
        );
        // `check` cannot know the table's columns; run and plan look them up first.
        db.run(&["check", name]).expect(0);
        for args in [vec!["run", name], vec!["plan", name]] {
            let out = db.run(&args);
            assert_eq!(out.code, 2, "{args:?}: {out:?}");
            assert!(
                out.stderr.contains(&format!("{name}.toml:5: key `undo`"))
                    && out
                        .stderr
                        .contains(&format!("column `{col}` does not exist in table t"))
                    && !out.stderr.contains("privilege")
                    && !out.stderr.contains("CREATE on schema"),
                "{args:?}: {out:?}"
            );
            if let Some(h) = hint {
                assert!(out.stderr.contains(h), "{args:?}: {out:?}");
            }
        }
    }
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);
    assert_eq!(
        db.i64("SELECT count(*) FROM pg_class WHERE relname LIKE 'undo_%'"),
        0,
        "no undo table for a refused job"
    );
    // With the column there, the same job runs and keeps its undo data.
    db.write_job("u", &format!("{GOOD}chunk_rows = 50\nundo = [\"n\"]\n"));
    db.run(&["run", "u"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM backfill.undo_u"), 300);
}

/// While a run works on the job, a run of another definition of it is refused (exit 3) — with or
/// without --allow-changed-definition, which is about saved progress, not a live run — naming
/// the running one; nothing of it is applied.
#[test]
fn a_run_with_another_definition_is_refused_while_the_job_runs() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    let job = counter_job("lock_timeout = \"60s\"\n");
    db.write_job("j", &job);
    let app = hold_row(&db, "t", "id", 1000);
    let child = spawn_part_way(&db, &["run", "j"], "j", Duration::from_secs(60));
    db.write_job("j", &job.replace("n = n + 1", "n = n + 2"));
    for args in [
        &["run", "j"][..],
        &["run", "j", "--allow-changed-definition"],
    ] {
        let out = db.run(args);
        assert_eq!(out.code, 3, "{out:?}");
        assert!(
            out.stderr.contains("with another definition")
                && out.stderr.contains(&format!("pid {}", child.id())),
            "{out:?}"
        );
    }
    app.exec("COMMIT");
    let out = wait_out(child, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n <> 1"),
        0,
        "every row once, by the running definition only"
    );
}
