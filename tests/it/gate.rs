//! The gate from SQL (`backfill.assert_done`), for any migrator, and the run's preconditions:
//! `requires_sql`, and refusing to run once the contract step has run.

use crate::support::*;
use std::time::Duration;

#[test]
fn assert_done_raises_until_the_job_is_complete_and_verified() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    db.write_job(
        "j",
        "table = \"t\"\nkey = \"id\"\nchunk_rows = 100\non_error = \"skip\"\n\
         sql = \"UPDATE t SET n = 1 / (id - 7) * 0 + 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n\
         verify = \"SELECT count(*) FROM t WHERE n = 0 AND id <> 7\"\n\
         throttle = { target_chunk_time = \"0s\" }\nlock_timeout = \"60s\"\n",
    );
    let s = db.session();
    // The engine's schema is made by `init` (or the first run) before a contract can call it.
    db.run(&["init"]).expect(0);
    let e = s.try_exec("SELECT backfill.assert_done('j')").unwrap_err();
    assert!(e.contains("has never run") && e.contains("P0001"), "{e}");

    // The run waits at a held row: it is running when the gate is called.
    let app = hold_row(&db, "t", "id", 1000);
    let child = spawn_part_way(&db, &["run", "j"], "j", Duration::from_secs(30));
    let e = s.try_exec("SELECT backfill.assert_done('j')").unwrap_err();
    assert!(e.contains("not complete (state running)"), "{e}");
    app.exec("COMMIT");
    let out = wait_out(child, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out:?}");

    // Key 7 fails (division by zero) and was skipped: the gate stays shut.
    let e = s.try_exec("SELECT backfill.assert_done('j')").unwrap_err();
    assert!(e.contains("skipped 1 keys"), "{e}");
    db.exec("UPDATE backfill.failures SET resolved_at = now() WHERE job = 'j'");
    s.exec("SELECT backfill.assert_done('j')");

    // Given the verify query, the gate counts now, inside the contract's own transaction: a row
    // written behind the backfill fails it. Without it, the gate trusts the engine's last verify.
    let verify =
        "SELECT backfill.assert_done('j', 'SELECT count(*) FROM t WHERE n = 0 AND id <> 7')";
    s.exec(verify);
    s.exec("BEGIN; INSERT INTO t (id) VALUES (-1)");
    let e = s.try_exec(verify).unwrap_err();
    assert!(e.contains("the verify query counts 1 rows"), "{e}");
    s.exec("ROLLBACK");
    s.exec(verify);
    db.exec("INSERT INTO t (id) VALUES (-1)");
    db.run(&["gate", "j"]).expect(3);
    let e = s.try_exec("SELECT backfill.assert_done('j')").unwrap_err();
    assert!(e.contains("its last verify counted 1 rows"), "{e}");

    // A migration's role may call the gate with nothing more than --grant-gate-to gives it.
    let role = format!("migrator_{}", db.name);
    db.exec(&format!(
        "DELETE FROM t WHERE id = -1; CREATE ROLE {role} LOGIN"
    ));
    db.run(&["gate", "j"]).expect(0);
    db.run(&["init", "--grant-gate-to", &role]).expect(0);
    let m = Session::connect(&db.url_as(&role));
    m.exec("SELECT backfill.assert_done('j')");
    let e = m
        .try_exec("UPDATE backfill.checkpoints SET state = 'done'")
        .unwrap_err();
    assert!(e.contains("42501"), "{e}");
}

#[test]
fn requires_sql_holds_the_run_and_wait_for_expand_waits_for_it() {
    let db = TestDb::new();
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 500)");
    let job = "table = \"t\"\nkey = \"id\"\n\
         sql = \"UPDATE t SET n = 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n\
         verify = \"SELECT count(*) FROM t WHERE n = 0\"\n\
         requires_sql = \"SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 't' AND column_name = 'n')\"\n";
    db.write_job("j", job);
    let out = db.run(&["run", "j"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr.contains("may not run yet")
            && out.stderr.contains("requires_sql returned false"),
        "{out:?}"
    );
    let out = db.run(&["run", "j", "--wait-for-expand=1s"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("waited 1s"), "{out:?}");
    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.checkpoints WHERE phase = 'waiting for expand'"),
        0,
        "a runner that gave up no longer shows as waiting"
    );

    // A requires_sql that cannot run before the expand step (the column is missing) means the
    // same: not yet.
    db.write_job(
        "k",
        &job.replace(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 't' AND column_name = 'n')",
            "SELECT count(n) >= 0 FROM t",
        ),
    );
    let out = db.run(&["run", "k"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr.contains("cannot run yet") && out.stderr.contains("42703"),
        "{out:?}"
    );

    // The runner starts first and waits; the expand step lands; the run goes on by itself.
    let child = db.spawn(&["run", "j", "--wait-for-expand"]);
    db.wait_for(
        "SELECT coalesce(phase = 'waiting for expand', false) FROM backfill.checkpoints WHERE job = 'j'",
        Duration::from_secs(30),
    );
    let status = db.run(&["status", "j"]);
    assert!(status.stdout.contains("waiting for expand"), "{status:?}");
    let all = db.run(&["status"]);
    assert!(
        all.stdout
            .lines()
            .any(|l| l.starts_with("j ") && l.contains("waiting for expand")),
        "{all:?}"
    );
    db.exec("ALTER TABLE t ADD COLUMN n int NOT NULL DEFAULT 0");
    let out = wait_out(child, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    let status = db.run(&["status", "j", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["phase"], "done and verified");
}

/// A runner stopped with Ctrl-C while it waits for its expand migration no longer shows as
/// waiting: nobody waits any more.
#[test]
fn a_runner_stopped_while_waiting_for_expand_no_longer_shows_as_waiting() {
    let db = TestDb::new();
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 50)");
    db.write_job(
        "j",
        "table = \"t\"\nkey = \"id\"\n\
         sql = \"UPDATE t SET n = 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n\
         requires_sql = \"SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 't' AND column_name = 'n')\"\n",
    );
    let mut child = db.spawn(&["run", "j", "--wait-for-expand"]);
    db.wait_for_child(
        &mut child,
        "SELECT coalesce((SELECT phase = 'waiting for expand' FROM backfill.checkpoints WHERE job = 'j'), false)",
        Duration::from_secs(30),
    );
    signal(&child, libc::SIGINT);
    let out = wait_out(child, Duration::from_secs(30));
    assert_eq!(out.code, 130, "{out:?}");
    assert!(
        out.stderr
            .contains("stopped while waiting for its expand migration"),
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.checkpoints WHERE phase = 'waiting for expand'"),
        0,
        "a runner that was stopped no longer shows as waiting"
    );
    let status = db.run(&["status", "j"]);
    assert!(!status.stdout.contains("waiting for expand"), "{status:?}");
}

/// The SQL gate runs with the migration's rights, so it must never execute (or splice into SQL)
/// anything stored in the engine's tables, which the runner's role can write: every text column
/// it could read is filled with SQL that would create a table if it were ever executed.
#[test]
fn the_sql_gate_never_executes_what_is_stored_in_the_engines_tables() {
    let db = TestDb::new();
    counter_table(&db, 300);
    db.write_job(
        "g",
        "table = \"t\"\nkey = \"id\"\nsql = \"UPDATE t SET n = 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n\
         verify = \"SELECT count(*) FROM t WHERE n = 0\"\non_error = \"skip\"\n",
    );
    db.run(&["run", "g"]).expect(0);
    db.exec(
        "INSERT INTO backfill.failures (job, key, sqlstate, message) VALUES ('g', ARRAY['1'], 'P0001', 'x')",
    );
    db.exec(
        r#"DO $$
        DECLARE col record;
        BEGIN
          FOR col IN SELECT table_name, column_name FROM information_schema.columns
                      WHERE table_schema = 'backfill' AND data_type = 'text'
                        AND column_name NOT IN ('job', 'state', 'outcome')
          LOOP
            BEGIN
              EXECUTE format('UPDATE backfill.%I SET %I = %L', col.table_name, col.column_name,
                             $p$'); CREATE TABLE pwned_a (); SELECT ('$p$ || ' ; CREATE TABLE pwned_b ()');
            EXCEPTION WHEN OTHERS THEN NULL; -- a constraint on that column: leave it
            END;
          END LOOP;
        END $$"#,
    );
    // The text really is in the tables the gate reads.
    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.failures WHERE message LIKE '%pwned_a%'"),
        1
    );
    assert!(
        db.i64("SELECT count(*) FROM backfill.checkpoints WHERE row(checkpoints.*)::text LIKE '%pwned_a%'") > 0
    );
    let s = db.session();
    let _ = s.try_exec("SELECT backfill.assert_done('g')");
    let _ = s.try_exec("SELECT backfill.assert_done('g', 'SELECT 0')");
    let _ = s.try_exec("SELECT backfill.assert_done($q$g'); CREATE TABLE pwned_c (); --$q$)");
    assert_eq!(
        db.i64("SELECT count(*) FROM pg_class WHERE relname LIKE 'pwned%'"),
        0,
        "the gate executed stored text"
    );
}

/// Schema v9 moved the SQL gate's decision into `completion_gap`, which `backfill gate` asks too:
/// on a database upgraded from v8, `assert_done` answers every case exactly as before, word for
/// word (passes, never ran, not done, skipped keys, finishing steps, the last verify).
#[test]
fn the_sql_gate_answers_as_before_after_the_upgrade_to_one_completeness_decision() {
    let db = TestDb::new();
    block_on(async {
        let mut client = db.connect().await;
        backfill::store::migrate_up_to(&mut client, "backfill", 8)
            .await
            .unwrap();
    });
    db.exec(
        "INSERT INTO backfill.checkpoints (job, state, fingerprint, table_name, key_columns, has_verify,
                                           verify_remaining, finish_steps)
         VALUES ('complete', 'done', 'f', 't', ARRAY['id'], true, 0, 1),
                ('steps_left', 'done', 'f', 't', ARRAY['id'], true, 0, 2),
                ('skipped', 'done', 'f', 't', ARRAY['id'], false, NULL, 0),
                ('stopped', 'stopped', 'f', 't', ARRAY['id'], false, NULL, 0),
                ('rows_left', 'done', 'f', 't', ARRAY['id'], true, 3, 0),
                ('unverified', 'done', 'f', 't', ARRAY['id'], false, NULL, 0);
         INSERT INTO backfill.finish_steps (job, step, sql, sql_hash, state)
         VALUES ('complete', 1, 'SELECT 1', 'h', 'done'), ('steps_left', 1, 'SELECT 1', 'h', 'done'),
                ('steps_left', 2, 'SELECT 2', 'h', 'failed');
         INSERT INTO backfill.failures (job, key, message) VALUES ('skipped', ARRAY['7'], 'division by zero');",
    );
    let jobs = [
        "complete",
        "steps_left",
        "skipped",
        "stopped",
        "rows_left",
        "unverified",
        "never_ran",
    ];
    let answers = || {
        let s = db.session();
        // The message and hint, not the line of the function that raised it.
        jobs.map(|job| {
            s.try_exec(&format!("SELECT backfill.assert_done('{job}')"))
                .map_err(|e| e.split(" (where: ").next().unwrap().to_string())
        })
    };
    let before = answers();
    assert!(before[0].is_ok() && before[5].is_ok(), "{before:?}");
    for (answer, says) in before[1..5].iter().zip([
        "1 of its 2 finishing steps succeeded",
        "skipped 1 keys",
        "is not complete (state stopped)",
        "its last verify counted 3 rows",
    ]) {
        assert!(answer.as_ref().unwrap_err().contains(says), "{answer:?}");
    }
    assert!(before[6].as_ref().unwrap_err().contains("has never run"));
    db.run(&["init"]).expect(0);
    assert_eq!(
        db.i64("SELECT max(version)::bigint FROM backfill.schema_version"),
        backfill::store::SCHEMA_VERSION as i64
    );
    assert_eq!(answers(), before);
}
