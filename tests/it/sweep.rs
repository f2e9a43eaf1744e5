//! Verify and sweep: rows written behind the cursor during a run are caught by `verify` and swept
//! by bounded passes over every key; a statement that must not be applied twice is never swept.

use crate::support::*;
use std::time::Duration;

/// A guarded job over `t`: applying it twice changes nothing.
fn guarded_job(extra: &str) -> String {
    format!(
        "table = \"t\"\nkey = \"id\"\nchunk_rows = 100\n\
         sql = \"UPDATE t SET n = 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n\
         verify = \"SELECT count(*) FROM t WHERE n = 0\"\n\
         throttle = {{ target_chunk_time = \"0s\" }}\n{extra}"
    )
}

#[test]
fn rows_written_behind_the_cursor_are_swept() {
    let db = TestDb::new();
    counter_table(&db, 6000);
    db.write_job("j", &guarded_job("lock_timeout = \"60s\"\n"));
    // The run waits at a held row past the middle while old code writes.
    let held = hold_row(&db, "t", "id", 4500);
    let mut child = db.spawn(&["run", "j"]);
    db.wait_for_child(
        &mut child,
        &format!(
            "{} AND coalesce((SELECT rows_done >= 3000 FROM backfill.progress WHERE job = 'j'), false)",
            engine_lock_waits(1)
        ),
        Duration::from_secs(60),
    );
    // Old application code, still deployed: rows behind the cursor and beyond the bound.
    db.exec(
        "UPDATE t SET n = 0 WHERE id IN (SELECT id FROM t ORDER BY id LIMIT 50);
         INSERT INTO t (id) SELECT 5000000 + g FROM generate_series(1, 20) g;",
    );
    held.exec("COMMIT");
    let out = wait_out(child, Duration::from_secs(120));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("sweep 1 of at most 3"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    assert_eq!(
        db.i64("SELECT sweeps::bigint FROM backfill.checkpoints WHERE job = 'j'"),
        1
    );
    assert_eq!(
        db.text("SELECT phase FROM backfill.checkpoints WHERE job = 'j'")
            .as_deref(),
        Some("done and verified")
    );
    db.run(&["gate", "j"]).expect(0);
}

/// 500 rows and job `j` (guarded, `max_sweeps = 2`) whose statement cannot fix one row yet (say,
/// it waits for data from elsewhere): the row listed in table `blocked`.
fn job_with_a_row_it_cannot_fix(db: &TestDb) {
    counter_table(db, 500);
    db.exec("CREATE TABLE blocked (id bigint); INSERT INTO blocked SELECT min(id) FROM t;");
    db.write_job(
        "j",
        &guarded_job("max_sweeps = 2").replace(
            "AND n = 0\"",
            "AND n = 0 AND NOT EXISTS (SELECT 1 FROM blocked b WHERE b.id = t.id)\"",
        ),
    );
}

#[test]
fn a_sweep_that_cannot_converge_ends_incomplete_and_a_new_run_sweeps_again() {
    let db = TestDb::new();
    job_with_a_row_it_cannot_fix(&db);
    let out = db.run(&["run", "j"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("after 2 sweeps") && out.stderr.contains("1 rows are still to do"),
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT sweeps::bigint FROM backfill.checkpoints WHERE job = 'j'"),
        2
    );
    let out = db.run(&["gate", "j"]);
    assert_eq!(out.code, 3, "{out:?}");
    let status = db.run(&["status", "j"]);
    assert!(status.stdout.contains("incomplete"), "{status:?}");

    // Fixed: a new run sweeps again and completes.
    db.exec("DELETE FROM blocked");
    let out = db.run(&["run", "j"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("sweep 1 of at most 2"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    db.run(&["gate", "j"]).expect(0);
}

#[test]
fn max_sweeps_zero_turns_sweeping_off() {
    let db = TestDb::new();
    counter_table(&db, 300);
    db.exec(
        "CREATE FUNCTION undo_one() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN IF NEW.id = (SELECT min(id) FROM t) THEN NEW.n := 0; END IF; RETURN NEW; END $$;
         CREATE TRIGGER undo_one BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION undo_one();",
    );
    db.write_job("j", &guarded_job("max_sweeps = 0"));
    let out = db.run(&["run", "j"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("max_sweeps = 0"), "{out:?}");
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'j'"),
        300,
        "no second pass"
    );
}

#[test]
fn two_runners_share_one_sweep() {
    let db = TestDb::new();
    counter_table(&db, 6000);
    db.write_job("j", &guarded_job("lock_timeout = \"60s\"\n"));
    // The pass cannot end while a row near its end is held: both runners are still in it when
    // old code writes behind them.
    let held = hold_row(&db, "t", "id", 5900);
    let a = db.spawn(&["run", "j"]);
    let b = db.spawn(&["run", "j"]);
    db.wait_for(
        &format!(
            "{} AND coalesce((SELECT rows_done >= 3000 FROM backfill.progress WHERE job = 'j'), false)
               AND (SELECT count(*) = 2 FROM backfill.runs WHERE job = 'j' AND outcome IS NULL)",
            engine_lock_waits(1)
        ),
        Duration::from_secs(60),
    );
    db.exec("UPDATE t SET n = 0 WHERE id IN (SELECT id FROM t ORDER BY id LIMIT 30)");
    held.exec("COMMIT");
    let (a, b) = (
        wait_out(a, Duration::from_secs(120)),
        wait_out(b, Duration::from_secs(120)),
    );
    assert_eq!((a.code, b.code), (0, 0), "{a:?}\n{b:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    assert_eq!(
        db.i64("SELECT sweeps::bigint FROM backfill.checkpoints WHERE job = 'j'"),
        1,
        "both runs walked the same sweep\n{a:?}\n{b:?}"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.ranges WHERE job = 'j' AND NOT done"),
        0
    );
}

/// A statement without a guard is exactly-once in a pass, but a sweep would apply it again to
/// every key and overwrite what the application wrote since: no sweep then. The plan says so
/// before the run; the run's end says what will help (a guard, then a run that accepts the
/// changed statement), and that path completes the job.
#[test]
fn a_statement_without_a_guard_is_not_swept() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE o (id bigint PRIMARY KEY, legacy text NOT NULL, status text);
         INSERT INTO o SELECT g, 'x', NULL FROM generate_series(1, 4000) g;",
    );
    let job = "table = \"o\"\nkey = \"id\"\nchunk_rows = 100\n\
         sql = \"UPDATE o SET status = upper(legacy) WHERE id BETWEEN :start AND :end\"\n\
         verify = \"SELECT count(*) FROM o WHERE status IS NULL\"\n\
         throttle = { target_chunk_time = \"0s\" }\nlock_timeout = \"60s\"\n";
    db.write_job("j", job);
    let out = db.run(&["plan", "j"]);
    assert_eq!(out.code, 0, "a warning: {out:?}");
    assert!(
        out.stdout.contains("warning [no_guard]")
            && out
                .stdout
                .contains("no run will sweep (max_sweeps = 3 has no effect)")
            && out.stdout.contains("verify; no sweep")
            && !out.stdout.contains("up to 3 sweeps"),
        "{out:?}"
    );
    // The run waits at a row held past the middle while the application writes behind it.
    let held = hold_row(&db, "o", "id", 3000);
    let mut child = db.spawn(&["run", "j"]);
    db.wait_for_child(
        &mut child,
        &format!(
            "{} AND coalesce((SELECT rows_done >= 2000 FROM backfill.progress WHERE job = 'j'), false)",
            engine_lock_waits(1)
        ),
        Duration::from_secs(60),
    );
    // New code changes a row already done; old code writes a row behind the cursor.
    db.exec(
        "UPDATE o SET status = 'refunded' WHERE id = 1; UPDATE o SET status = NULL WHERE id = 2",
    );
    held.exec("COMMIT");
    let out = wait_out(child, Duration::from_secs(60));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("not swept") && out.stderr.contains("guard"),
        "{out:?}"
    );
    assert_eq!(
        db.text("SELECT status FROM o WHERE id = 1").as_deref(),
        Some("refunded"),
        "the application's write survives"
    );
    assert_eq!(
        db.i64("SELECT sweeps::bigint FROM backfill.checkpoints WHERE job = 'j'"),
        0
    );
    // Not "run again: it sweeps again" — that would end the same way.
    assert!(
        !out.stderr.contains("it sweeps again")
            && out.stderr.contains("would refuse to sweep again")
            && out
                .stderr
                .contains("backfill run j --allow-changed-definition"),
        "{out:?}"
    );

    // The guard added: the plan no longer warns, and a run without the flag says exactly what
    // to do.
    db.write_job("j", &job.replace(":end\"", ":end AND status IS NULL\""));
    let out = db.run(&["plan", "j"]);
    assert!(
        !out.stdout.contains("no_guard")
            && out.stdout.contains("up to 3 sweeps")
            && out.stdout.contains("warning [changed_definition]")
            && out
                .stdout
                .contains("backfill run j --allow-changed-definition"),
        "{out:?}"
    );
    let out = db.run(&["run", "j"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .contains("Every key was processed under the old definition")
            && out
                .stderr
                .contains("backfill run j --allow-changed-definition"),
        "{out:?}"
    );
    let out = db.run(&["run", "j", "--allow-changed-definition"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("sweep 1 of at most 3"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM o WHERE status IS NULL"), 0);
    assert_eq!(
        db.text("SELECT status FROM o WHERE id = 1").as_deref(),
        Some("refunded"),
        "the sweep's guard kept the application's write"
    );
}

/// Whether the next run sweeps afresh is one decision (`state::next_run_sweeps`): only when the
/// last pass ended incomplete *and* no key range is left to walk. A sweep pass left unfinished by
/// a run that died (state still incomplete from the run before) is continued, and its count is
/// not started again; the plan says the same (no sweep chunk).
#[test]
fn an_unfinished_sweep_pass_is_continued_not_counted_afresh() {
    let db = TestDb::new();
    job_with_a_row_it_cannot_fix(&db);
    assert_eq!(db.run(&["run", "j"]).code, 1);
    assert_eq!(
        db.i64("SELECT sweeps::bigint FROM backfill.checkpoints WHERE job = 'j'"),
        2
    );
    // What a run that died walking a third pass leaves behind: a key range not done.
    db.exec(
        "INSERT INTO backfill.ranges (job, id, upper_bound)
         SELECT job, 99, upper_bound FROM backfill.checkpoints WHERE job = 'j'",
    );
    db.exec("DELETE FROM blocked");
    let plan = db.run(&["plan", "j", "--json"]);
    assert!(!plan.stdout.contains("\"sweep\": true"), "{plan:?}");
    let out = db.run(&["run", "j"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    assert_eq!(
        db.i64("SELECT sweeps::bigint FROM backfill.checkpoints WHERE job = 'j'"),
        2
    );
    db.run(&["gate", "j"]).expect(0);
}
