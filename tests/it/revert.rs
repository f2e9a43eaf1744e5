//! Revert: by `down_sql` (a chunked run of its own) and by `undo` columns (old values kept in the
//! chunk's own transaction, restored exactly), resumable, refused when it would be wrong.

use crate::support::*;
use std::time::Duration;

/// `t (id, legacy, status)`: status is what the job fills; some rows already hold a value.
fn orders(db: &TestDb, rows: i64) {
    db.exec(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, legacy text NOT NULL, status text);
         INSERT INTO t SELECT g, chr(65 + g % 5), CASE WHEN g % 7 = 0 THEN 'kept-' || g END
           FROM generate_series(1, {rows}) g;"
    ));
}

/// The whole table's content, as one digest.
fn digest(db: &TestDb) -> String {
    db.text(
        "SELECT md5(string_agg(id || ':' || coalesce(status, '<null>'), ',' ORDER BY id)) FROM t",
    )
    .unwrap()
}

#[test]
fn down_sql_reverts_chunk_by_chunk_and_the_job_starts_over() {
    let db = TestDb::new();
    orders(&db, 3000);
    db.exec("UPDATE t SET status = NULL");
    db.write_job(
        "j",
        "table = \"t\"\nkey = \"id\"\nchunk_rows = 200\n\
         sql = \"UPDATE t SET status = lower(legacy) WHERE id BETWEEN :start AND :end AND status IS NULL\"\n\
         down_sql = \"UPDATE t SET status = NULL WHERE id BETWEEN :start AND :end AND status IS NOT NULL\"\n\
         verify = \"SELECT count(*) FROM t WHERE status IS NULL\"\n\
         throttle = { target_chunk_time = \"0s\" }\n",
    );
    db.run(&["run", "j"]).expect(0);
    db.run(&["gate", "j"]).expect(0);
    let out = db.run(&["revert", "j"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("reverted"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE status IS NOT NULL"), 0);
    assert_eq!(
        db.i64("SELECT chunks_done FROM backfill.runs WHERE job = 'j:revert'"),
        15,
        "the revert ran in chunks"
    );
    assert_eq!(
        db.text("SELECT state FROM backfill.checkpoints WHERE job = 'j'")
            .as_deref(),
        Some("reverted")
    );
    let out = db.run(&["gate", "j"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stdout.contains("reverted"), "{out:?}");
    let out = db.run(&["status", "j"]);
    assert!(out.stdout.contains("reverted"), "{out:?}");
    // The next run starts over from the first key.
    db.run(&["run", "j"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE status IS NULL"), 0);
    db.run(&["gate", "j"]).expect(0);
}

#[test]
fn undo_restores_the_original_values_exactly_even_after_kills() {
    let db = TestDb::new();
    orders(&db, 4000);
    let original = digest(&db);
    db.write_job(
        "j",
        "table = \"t\"\nkey = \"id\"\nchunk_rows = 100\n\
         sql = \"UPDATE t SET status = 'code-' || legacy WHERE id BETWEEN :start AND :end\"\n\
         undo = [\"status\"]\nlock_timeout = \"60s\"\n",
    );
    // Killed mid-run, while a chunk waits for a row the application holds: the chunks that
    // committed kept their old values in the same transaction; the one in flight left nothing.
    let app = hold_row(&db, "t", "id", 2000);
    let child = spawn_part_way(&db, &["run", "j"], "j", Duration::from_secs(60));
    signal(&child, libc::SIGKILL);
    let out = wait_out(child, Duration::from_secs(10));
    assert_eq!(
        out.code,
        128 + libc::SIGKILL,
        "killed while it ran: {out:?}"
    );
    let done = db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'j'");
    assert!(0 < done && done < 4000, "killed part-way: {done} rows done");
    app.exec("COMMIT");
    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.undo_j"),
        done,
        "one undo row per row done, no more"
    );
    db.run(&["run", "j"]).expect(0);
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE status NOT LIKE 'code-%'"),
        0
    );
    assert_eq!(db.i64("SELECT count(*) FROM backfill.undo_j"), 4000);
    // A row the application adds afterwards has no undo data and is left alone.
    db.exec("INSERT INTO t VALUES (100000, 'Z', 'new-row')");

    // An interrupted revert resumes; meanwhile the job may not run. (Stopped while a chunk
    // waits for a row the application holds: part-way by construction.)
    let app = hold_row(&db, "t", "id", 2000);
    let child = spawn_part_way(&db, &["revert", "j"], "j:revert", Duration::from_secs(60));
    signal(&child, libc::SIGINT);
    app.exec("COMMIT");
    let out = wait_out(child, Duration::from_secs(30));
    assert_eq!(out.code, 130, "{out:?}");
    assert!(
        out.stderr.contains("j:revert: stopped; the next run")
            && out
                .stderr
                .contains("(`backfill revert j`; progress is saved)")
            && !out.stderr.contains("error:"),
        "{out:?}"
    );
    assert!(
        db.i64("SELECT count(*) FROM t WHERE status LIKE 'code-%'") > 0,
        "stopped part-way"
    );
    let out = db.run(&["run", "j"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr.contains("revert of job j is unfinished"),
        "{out:?}"
    );
    db.run(&["revert", "j"]).expect(0);
    db.exec("DELETE FROM t WHERE id = 100000");
    assert_eq!(digest(&db), original, "every value is back, NULLs included");

    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.undo_j"),
        0,
        "restored values are not kept for the next cycle"
    );

    // Dropping the undo data needs --yes; afterwards there is nothing to restore from.
    let out = db.run(&["drop-undo", "j"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--yes"), "{out:?}");
    db.run(&["drop-undo", "j", "--yes"]).expect(0);
    assert!(db
        .text("SELECT to_regclass('backfill.undo_j')::text")
        .is_none());
    let out = db.run(&["revert", "j"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("no undo data"), "{out:?}");
}

#[test]
fn a_revert_is_refused_while_the_job_runs_and_for_a_job_without_a_way_back() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    db.write_job("plain", &counter_job(""));
    let out = db.run(&["revert", "plain"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("down_sql"), "{out:?}");

    db.write_job(
        "j",
        &counter_job(
            "down_sql = \"UPDATE t SET n = n - 1 WHERE id BETWEEN :start AND :end AND n > 0\"\n\
             lock_timeout = \"60s\"\n",
        ),
    );
    let out = db.run(&["revert", "j"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("never run"), "{out:?}");
    // The run waits at a held row: it is running, part-way, when the revert is tried.
    let app = hold_row(&db, "t", "id", 1000);
    let child = spawn_part_way(&db, &["run", "j"], "j", Duration::from_secs(30));
    let out = db.run(&["revert", "j"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("is running"), "{out:?}");
    signal(&child, libc::SIGINT);
    app.exec("COMMIT");
    assert_eq!(wait_out(child, Duration::from_secs(30)).code, 130);
    // Once it has stopped, a half-done job can be reverted.
    assert!(db.i64("SELECT count(*) FROM t WHERE n = 1") > 0);
    db.run(&["revert", "j"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);
}

/// Run, revert, the application writes, run again, revert again: the second revert restores the
/// values from before the second run, and a reverted job cannot be reverted twice.
#[test]
fn a_second_cycle_reverts_to_the_values_before_it() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE c (tenant text, id int, n int, PRIMARY KEY (tenant, id));
         INSERT INTO c SELECT 't' || (g % 3), g, 1 FROM generate_series(1, 900) g;",
    );
    db.write_job(
        "c",
        "table = \"c\"\nkey = [\"tenant\", \"id\"]\nchunk_rows = 100\n\
         sql = \"UPDATE c SET n = 2 WHERE (tenant, id) BETWEEN :start AND :end\"\n\
         undo = [\"n\"]\n",
    );
    db.run(&["run", "c"]).expect(0);
    db.run(&["revert", "c"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM c WHERE n <> 1"), 0);
    let out = db.run(&["revert", "c"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("already reverted"), "{out:?}");

    db.exec("UPDATE c SET n = 1000 WHERE id <= 10");
    db.run(&["run", "c"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM c WHERE n <> 2"), 0);
    db.run(&["revert", "c"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM c WHERE n = 1000"), 10);
    assert_eq!(db.i64("SELECT count(*) FROM c WHERE n = 1"), 890);
}

/// A contract migration that passed the SQL gate holds the job's lock until it ends: a revert
/// waits for it; and while a revert runs, a migration calling the gate waits (here: times out).
#[test]
fn a_revert_and_a_migration_past_the_gate_wait_for_each_other() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    db.write_job(
        "j",
        &counter_job(
            "down_sql = \"UPDATE t SET n = n - 1 WHERE id BETWEEN :start AND :end AND n > 0\"\n\
             lock_timeout = \"60s\"\n",
        ),
    );
    db.run(&["run", "j"]).expect(0);
    let migration = db.session();
    migration.exec("BEGIN; SELECT backfill.assert_done('j')");
    // The revert's sessions carry a name of their own, so that a session of the run before it,
    // still ending, cannot be taken for the revert's.
    let url = match (db.url.contains("://"), db.url.contains('?')) {
        (true, true) => format!("{}&application_name=the_revert", db.url),
        (true, false) => format!("{}?application_name=the_revert", db.url),
        (false, _) => format!("{} application_name=the_revert", db.url),
    };
    let mut child = db
        .cmd_at(&url, &["revert", "j"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The revert tried the job's lock, which the migration holds, and did not get it.
    db.wait_for_child(
        &mut child,
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity a
                         WHERE a.datname = current_database() AND a.state = 'idle'
                           AND a.application_name = 'the_revert'
                           AND a.query LIKE 'SELECT pg_try_advisory_lock%'
                           AND NOT EXISTS (SELECT 1 FROM pg_locks l
                                            WHERE l.pid = a.pid AND l.locktype = 'advisory'))",
        Duration::from_secs(30),
    );
    assert!(child.try_wait().unwrap().is_none(), "the revert waits");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    migration.exec("COMMIT");
    let out = wait_out(child, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("waiting for a migration that passed its gate"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);

    db.run(&["run", "j"]).expect(0);
    // The revert waits at a held row: it is running, holding the job's lock, when the gate is
    // called.
    let app = hold_row(&db, "t", "id", 1000);
    let child = spawn_part_way(&db, &["revert", "j"], "j:revert", Duration::from_secs(30));
    let e = migration
        .try_exec("SET lock_timeout = '300ms'; SELECT backfill.assert_done('j')")
        .unwrap_err();
    assert!(e.contains("55P03"), "{e}");
    signal(&child, libc::SIGINT);
    app.exec("COMMIT");
    assert_eq!(wait_out(child, Duration::from_secs(30)).code, 130);
}

/// A run and a revert of one job started together both decide under the job's checkpoint row
/// lock: exactly one goes on, the other is refused (exit 3). The test holds that row so both wait
/// for it, in a known order (row lock waiters are served in turn), and holds a row of each one's
/// way so the one that goes on is still running when the other decides. Both orders: the run
/// first (the revert must see the run that just joined), then the revert first.
#[test]
fn a_run_and_a_revert_started_together_cannot_both_go() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    db.write_job(
        "j",
        &counter_job(
            "down_sql = \"UPDATE t SET n = n - 1 WHERE id BETWEEN :start AND :end AND n > 0\"\n\
             lock_timeout = \"60s\"\n",
        ),
    );
    // Half done and stopped: a run and a revert may each go.
    let app = hold_row(&db, "t", "id", 1000);
    let mut child = db.spawn(&["run", "j"]);
    db.wait_for_child(&mut child, &engine_lock_waits(1), Duration::from_secs(60));
    signal(&child, libc::SIGINT);
    app.exec("COMMIT");
    assert_eq!(wait_out(child, Duration::from_secs(30)).code, 130);
    let done = db.i64("SELECT count(*) FROM t WHERE n = 1");
    assert!(0 < done && done < 2000, "{done}");

    // Returns (the first one's output, the second one's).
    let race = |first: &[&str], second: &[&str]| -> (Out, Out) {
        let rows = db.session();
        rows.exec(
            "BEGIN; SELECT 1 FROM t WHERE id IN ((SELECT id FROM t ORDER BY id OFFSET 500 LIMIT 1),
                                                 (SELECT id FROM t ORDER BY id OFFSET 1500 LIMIT 1)) FOR UPDATE",
        );
        let gate = db.session();
        gate.exec("BEGIN; SELECT 1 FROM backfill.checkpoints WHERE job = 'j' FOR UPDATE");
        let mut a = db.spawn(first);
        db.wait_for_child(&mut a, &engine_lock_waits(1), Duration::from_secs(30));
        let mut b = db.spawn(second);
        db.wait_for_child(&mut b, &engine_lock_waits(2), Duration::from_secs(30));
        gate.exec("COMMIT");
        // The second is refused; the first goes on, waiting at a held row meanwhile.
        let lost = wait_out(b, Duration::from_secs(30));
        assert!(
            a.try_wait().unwrap().is_none(),
            "the first goes on\n--- the second\n{lost:?}"
        );
        rows.exec("COMMIT");
        (wait_out(a, Duration::from_secs(60)), lost)
    };

    let (won, lost) = race(&["run", "j"], &["revert", "j"]);
    assert_eq!(lost.code, 3, "{lost:?}");
    assert!(lost.stderr.contains("is running"), "{lost:?}");
    assert_eq!(won.code, 0, "{won:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);

    let (won, lost) = race(&["revert", "j"], &["run", "j"]);
    assert_eq!(lost.code, 3, "{lost:?}");
    assert!(
        lost.stderr.contains("revert of job j is unfinished"),
        "{lost:?}"
    );
    assert_eq!(won.code, 0, "{won:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);
}
