//! Least privilege: roles with exactly what the README's Privileges section gives them. A runner
//! without `pg_read_all_stats` cannot see other roles' sessions, so its signals would be blind:
//! it holds, saying which grant is missing, until `init --grant-to` (as a role that may grant it)
//! gives it; then it sees an application session of another role queued behind a chunk. `plan`
//! says it cannot see other roles' transactions. A migration's role made by `init
//! --grant-gate-to` can run `backfill gate`.

use crate::support::*;
use serde_json::Value;
use std::time::{Duration, Instant};

fn hold_reason(db: &TestDb, name: &str) -> Option<String> {
    db.text(&format!(
        "SELECT (SELECT hold_reason FROM backfill.progress WHERE job = '{name}')"
    ))
}

fn rows_done(db: &TestDb, name: &str) -> i64 {
    db.i64(&format!(
        "SELECT coalesce((SELECT rows_done FROM backfill.progress WHERE job = '{name}'), 0)"
    ))
}

/// Waits until the job's run is held with a reason containing every needle.
fn wait_held(db: &TestDb, name: &str, needles: &[&str]) -> String {
    let t = Instant::now();
    loop {
        if let Some(r) = hold_reason(db, name) {
            if needles.iter().all(|n| r.contains(n)) {
                return r;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never held for {needles:?}; reason {:?}",
            hold_reason(db, name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Roles named after the test's database (roles are cluster-wide).
fn role(db: &TestDb, what: &str) -> String {
    format!("{what}_{}", db.name)
}

#[test]
fn a_runner_without_pg_read_all_stats_holds_until_granted_then_sees_other_roles_waiting() {
    let db = TestDb::new();
    let (owner, runner, app) = (role(&db, "owner"), role(&db, "runner"), role(&db, "app"));
    // The database owner (not a superuser) sets the engine up, as the README says; it may not
    // grant pg_read_all_stats. Each chunk holds its row locks for 300 ms after updating them.
    db.exec(&format!(
        "CREATE ROLE {owner} LOGIN; CREATE ROLE {runner} LOGIN; CREATE ROLE {app} LOGIN;
         ALTER DATABASE {db} OWNER TO {owner};
         CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 2000);
         CREATE FUNCTION linger() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
         CREATE TRIGGER linger AFTER UPDATE ON t FOR EACH STATEMENT EXECUTE FUNCTION linger();
         CREATE TABLE u (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO u (id) SELECT generate_series(1, 500);
         GRANT SELECT, UPDATE ON t, u TO {runner};
         GRANT SELECT, UPDATE ON t TO {app};",
        db = db.name
    ));
    let init = Out::from(
        db.cmd_at(&db.url_as(&owner), &["init", "--grant-to", &runner])
            .output()
            .unwrap(),
    );
    init.expect(0);
    assert!(
        init.stderr.contains("could not grant pg_read_all_stats")
            && init
                .stderr
                .contains(&format!("GRANT pg_read_all_stats TO \"{runner}\"")),
        "{init:?}"
    );
    db.write_job(
        "y",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 400\n\
         sql = \"UPDATE t SET n = n + 1 WHERE id BETWEEN :start AND :end\"\n\
         verify = \"SELECT count(*) FROM t WHERE n = 0\"\n\
         [throttle]\ntarget_chunk_time = \"0s\"\nhold_during_autovacuum = true\ncheck_interval = \"100ms\"\n",
    );
    let as_runner = db.url_as(&runner);
    let child = db
        .cmd_at(&as_runner, &["run", "y"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let reason = wait_held(
        &db,
        "y",
        &[
            "the lock-wait yield and hold_during_autovacuum",
            &format!("role {runner} lacks pg_read_all_stats"),
            "on_signal_error = \"hold\"",
        ],
    );
    let status = db.run(&["status", "y"]);
    assert!(
        status.stdout.contains("held") && status.stdout.contains(&reason),
        "{status:?}"
    );
    assert_eq!(rows_done(&db, "y"), 0, "a blind run must not process keys");

    // A superuser grants it through init; the held run notices and goes on by itself.
    let granted = db.run(&["init", "--grant-to", &runner]);
    granted.expect(0);
    assert!(
        granted
            .stdout
            .contains(&format!("granted role {runner} pg_read_all_stats")),
        "{granted:?}"
    );
    db.wait_for(
        "SELECT coalesce((SELECT rows_done >= 400 FROM backfill.progress WHERE job = 'y'), false)",
        Duration::from_secs(30),
    );
    // An application session of another role touches a row inside the chunk in flight: the
    // runner sees it waiting (wait_event_type is no longer hidden) and yields.
    let session = Session::connect(&db.url_as(&app));
    session.exec("SET application_name = 'the_application'");
    for _ in 0..3 {
        let id = db.i64("SELECT cursor[1]::bigint + 10 FROM backfill.ranges WHERE job = 'y'");
        session.exec(&format!("UPDATE t SET n = n WHERE id = {id}"));
    }
    let out = wait_out(child, Duration::from_secs(60));
    out.expect(0);
    assert!(
        out.stderr.contains("no longer held")
            && out.stderr.contains("waited on this chunk's locks"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);

    // Told to ignore unreadable signals, a blind runner goes on (and the reason said how).
    db.exec(&format!("REVOKE pg_read_all_stats FROM {runner}"));
    db.write_job(
        "z",
        "table = \"u\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"UPDATE u SET n = n + 1 WHERE id BETWEEN :start AND :end\"\n\
         verify = \"SELECT count(*) FROM u WHERE n = 0\"\n\
         [throttle]\non_signal_error = \"ignore\"\n",
    );
    Out::from(db.cmd_at(&as_runner, &["run", "z"]).output().unwrap()).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM u WHERE n <> 1"), 0);
}

#[test]
fn plan_says_it_cannot_see_other_roles_transactions() {
    let db = TestDb::new();
    let (runner, app) = (role(&db, "runner"), role(&db, "app"));
    db.exec(&format!(
        "CREATE ROLE {runner} LOGIN; CREATE ROLE {app} LOGIN;
         CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 1000);
         GRANT SELECT, UPDATE ON t TO {runner};
         GRANT SELECT ON t TO {app};"
    ));
    db.run(&["init", "--grant-to", &runner]).expect(0);
    db.exec(&format!("REVOKE pg_read_all_stats FROM {runner}"));
    db.write_job(
        "p",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"UPDATE t SET n = 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n",
    );
    // Another role's transaction, open (with a transaction id) while plan looks.
    let idle = Session::connect(&db.url_as(&app));
    idle.exec("BEGIN; SELECT txid_current();");
    let pid = idle.i64("SELECT pg_backend_pid()::bigint");
    let plan = |args: &[&str]| {
        let mut all = vec!["plan", "p", "--json", "--long-transaction", "1ms"];
        all.extend_from_slice(args);
        let out = Out::from(db.cmd_at(&db.url_as(&runner), &all).output().unwrap());
        assert_eq!(out.code, 0, "{out:?}");
        let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        v["findings"].as_array().unwrap().clone()
    };
    let findings = plan(&[]);
    let hidden = findings
        .iter()
        .find(|f| f["code"] == "sessions_hidden")
        .unwrap_or_else(|| panic!("no sessions_hidden finding: {findings:#?}"));
    let message = hidden["message"].as_str().unwrap();
    assert!(
        message.contains("1 of them hold a transaction")
            && message.contains("a run would hold until it is granted"),
        "{hidden:#}"
    );
    assert!(
        hidden["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("GRANT pg_read_all_stats TO \"{runner}\"")),
        "{hidden:#}"
    );

    // Granted, the same role sees the transaction itself.
    db.exec(&format!("GRANT pg_read_all_stats TO {runner}"));
    let findings = plan(&[]);
    assert!(
        !findings.iter().any(|f| f["code"] == "sessions_hidden"),
        "{findings:#?}"
    );
    assert!(
        findings.iter().any(|f| f["code"] == "long_transaction"
            && f["message"]
                .as_str()
                .unwrap()
                .contains(&format!("pid {pid}"))),
        "{findings:#?}"
    );
    idle.exec("COMMIT");
}

#[test]
fn the_gate_runs_as_the_role_made_by_grant_gate_to() {
    let db = TestDb::new();
    counter_table(&db, 500);
    let migrator = role(&db, "migrator");
    db.exec(&format!(
        "CREATE ROLE {migrator} LOGIN; GRANT SELECT ON t TO {migrator};"
    ));
    db.write_job("j", &counter_job(""));
    // A job that stops at a row its statement fails on: unfinished.
    db.write_job(
        "k",
        &counter_job("").replace("SET n = n + 1", "SET n = n + 1 / (id - 7) * 0 + 1"),
    );
    db.run(&["init", "--grant-gate-to", &migrator]).expect(0);
    db.run(&["run", "j"]).expect(0);
    assert_eq!(db.run(&["run", "k"]).code, 1);

    let as_migrator = db.url_as(&migrator);
    let gate = |name: &str| Out::from(db.cmd_at(&as_migrator, &["gate", name]).output().unwrap());
    let done = gate("j");
    done.expect(0);
    assert!(done.stdout.contains("complete and verified"), "{done:?}");
    let unfinished = gate("k");
    unfinished.expect(3);
    assert!(
        unfinished.stdout.contains("is not complete"),
        "{unfinished:?}"
    );

    // A row written behind the backfill: the gate closes, and records it, so the SQL gate that
    // trusts the last verify closes too.
    db.exec("INSERT INTO t (id) VALUES (-1)");
    gate("j").expect(3);
    let m = Session::connect(&as_migrator);
    let e = m.try_exec("SELECT backfill.assert_done('j')").unwrap_err();
    assert!(e.contains("its last verify counted 1 rows"), "{e}");
    // It still may not change anything else.
    let e = m
        .try_exec("UPDATE backfill.checkpoints SET state = 'done'")
        .unwrap_err();
    assert!(e.contains("42501"), "{e}");

    // A role granted by an older `init` (without what the CLI gate reads) is told what is missing.
    db.exec(&format!(
        "REVOKE SELECT ON backfill.ranges FROM {migrator}; REVOKE UPDATE (verified_at) ON backfill.checkpoints FROM {migrator}"
    ));
    let old = gate("j");
    old.expect(1);
    assert!(
        old.stderr.contains("SELECT on backfill.ranges")
            && old
                .stderr
                .contains("UPDATE (verified_at) on backfill.checkpoints")
            && old
                .stderr
                .contains(&format!("backfill init --grant-gate-to {migrator}")),
        "{old:?}"
    );
    db.run(&["init", "--grant-gate-to", &migrator]).expect(0);
    gate("j").expect(3);
}
