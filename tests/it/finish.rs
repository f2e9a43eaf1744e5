//! The finishing steps (`finish::run_steps`) against a real server: the NOT NULL recipe, lock
//! contention retried and exhausted, invalid indexes left by interrupted concurrent builds, a
//! unique build over duplicates, refused steps, and two finishers racing for the same job.

use crate::support::*;
use backfill::db::Target;
use backfill::finish::{self, FinishOptions, StepOutcome, StepReport};
use backfill::store::Store;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

const JOB: &str = "fill_x";

const NOT_NULL: [&str; 4] = [
    "ALTER TABLE t ADD CONSTRAINT t_x_nn CHECK (x IS NOT NULL) NOT VALID",
    "ALTER TABLE t VALIDATE CONSTRAINT t_x_nn",
    "ALTER TABLE t ALTER COLUMN x SET NOT NULL",
    "ALTER TABLE t DROP CONSTRAINT t_x_nn",
];

const BUILD: &str = "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_x_idx ON t (x)";

async fn connect(url: &str) -> tokio_postgres::Client {
    Target::resolve(Some(url)).unwrap().connect().await.unwrap()
}

/// Table `t` with `rows` rows and `x` filled, the engine's schema, and a checkpoint for JOB.
fn setup(db: &TestDb, rows: i64) {
    db.exec(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, x int);
         INSERT INTO t SELECT g, g FROM generate_series(1, {rows}) g;"
    ));
    block_on(async {
        let mut c = connect(&db.url).await;
        Store::new("backfill").ensure(&mut c).await.unwrap();
    });
    db.exec(&format!(
        "INSERT INTO backfill.checkpoints (job, fingerprint, table_name, key_columns)
         VALUES ('{JOB}', 'test', 't', '{{id}}')"
    ));
}

fn steps(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn opts(lock_timeout_ms: u64, max_attempts: u32) -> FinishOptions {
    FinishOptions {
        lock_timeout: Duration::from_millis(lock_timeout_ms),
        max_attempts,
        statement_timeout: None,
    }
}

type Finished = (backfill::Result<Vec<StepReport>>, Vec<String>);

/// Runs the steps on a new session of `url`; returns the result and the log lines.
fn finish_at(url: &str, list: &[String], opts: &FinishOptions) -> Finished {
    let lines = Mutex::new(Vec::new());
    let log = |l: &str| lines.lock().unwrap().push(l.to_string());
    let result = block_on(async {
        let c = connect(url).await;
        finish::run_steps(&c, "backfill", JOB, list, opts, &log).await
    });
    (result, lines.into_inner().unwrap())
}

fn finish(db: &TestDb, list: &[String], opts: &FinishOptions) -> Finished {
    finish_at(&db.url, list, opts)
}

fn ran(r: &StepReport) -> (u32, bool) {
    match r.outcome {
        StepOutcome::Ran {
            attempts,
            dropped_invalid_index,
        } => (attempts, dropped_invalid_index),
        StepOutcome::AlreadyDone => panic!("step {} did not run: {r:?}", r.step),
    }
}

fn attempts(db: &TestDb, step: i32) -> i64 {
    db.i64(&format!(
        "SELECT attempts::bigint FROM backfill.finish_steps WHERE job = '{JOB}' AND step = {step}"
    ))
}

fn state(db: &TestDb, step: i32) -> Option<String> {
    db.text(&format!(
        "SELECT (SELECT state FROM backfill.finish_steps WHERE job = '{JOB}' AND step = {step})"
    ))
}

/// Polls `sql` (true when the state is reached) on `session` until it holds, or `limit` passes.
fn poll(session: &Session, sql: &str, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if session.i64(sql) > 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn index_count(db: &TestDb, name: &str, valid: bool) -> i64 {
    db.i64(&format!(
        "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
          WHERE c.relname = '{name}' AND (i.indisvalid AND i.indisready) = {valid}"
    ))
}

#[test]
fn not_null_recipe_runs_every_step_once_and_a_rerun_skips_them_all() {
    let db = TestDb::new();
    setup(&db, 1000);
    let list = steps(&NOT_NULL);
    let (result, log) = finish(&db, &list, &FinishOptions::default());
    let reports = result.unwrap();
    assert_eq!(reports.len(), 4);
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.step, i as i32 + 1);
        assert_eq!(r.sql, NOT_NULL[i]);
        assert_eq!(ran(r), (1, false), "{r:?}");
    }
    assert!(
        log.iter()
            .any(|l| l.contains("starting finishing step 2/4")),
        "{log:?}"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'x' AND attnotnull"),
        1,
        "x must be NOT NULL"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM pg_constraint WHERE conname = 't_x_nn'"),
        0,
        "the check constraint must be gone"
    );
    assert_eq!(
        db.i64(&format!(
            "SELECT count(*) FROM backfill.finish_steps WHERE job = '{JOB}' AND state = 'done'
                AND attempts = 1 AND last_error IS NULL AND started_at IS NOT NULL AND done_at >= started_at"
        )),
        4
    );
    assert_eq!(
        db.i64(&format!(
            "SELECT finish_steps::bigint FROM backfill.checkpoints WHERE job = '{JOB}'"
        )),
        4,
        "the gate counts the job's steps"
    );

    let (again, log) = finish(&db, &list, &FinishOptions::default());
    let again = again.unwrap();
    assert!(
        again.iter().all(|r| r.outcome == StepOutcome::AlreadyDone),
        "{again:?}"
    );
    assert!(log.iter().all(|l| l.contains("already done")), "{log:?}");
    for step in 1..=4 {
        assert_eq!(attempts(&db, step), 1, "step {step} must not run again");
    }
    let done = block_on(async {
        let c = connect(&db.url).await;
        finish::done_steps(&c, "backfill", JOB).await.unwrap()
    });
    assert_eq!(
        done,
        (1..=4)
            .map(|n| (n, "done".to_string(), None))
            .collect::<Vec<_>>()
    );
}

#[test]
fn validate_behind_a_held_lock_retries_until_the_lock_is_released() {
    let db = TestDb::new();
    setup(&db, 1000);
    let list = steps(&NOT_NULL[..2]);
    finish(&db, &list[..1], &FinishOptions::default())
        .0
        .unwrap();

    // VALIDATE CONSTRAINT takes SHARE UPDATE EXCLUSIVE, which conflicts with itself.
    let blocker = db.session();
    blocker.exec("BEGIN; LOCK TABLE t IN SHARE UPDATE EXCLUSIVE MODE");
    let releaser = std::thread::spawn(move || {
        // The row says `running` while the statement waits: it was committed before it ran.
        let seen = poll(
            &blocker,
            &format!(
                "SELECT count(*) FROM backfill.finish_steps
                  WHERE job = '{JOB}' AND step = 2 AND state = 'running' AND attempts >= 3
                    AND last_error LIKE '%55P03%'"
            ),
            Duration::from_secs(30),
        );
        blocker.exec("COMMIT");
        seen
    });
    let (result, log) = finish(&db, &list, &opts(100, 20));
    assert!(
        releaser.join().unwrap(),
        "step 2 never showed as running and retried in finish_steps"
    );
    let reports = result.unwrap();
    assert_eq!(reports[0].outcome, StepOutcome::AlreadyDone);
    let (tries, _) = ran(&reports[1]);
    assert!(tries >= 3, "{reports:?}");
    assert!(
        log.iter()
            .any(|l| l.contains("finishing step 2/2: retrying after")
                && l.contains("lock timeout (55P03)")),
        "{log:?}"
    );
    assert_eq!(state(&db, 2).as_deref(), Some("done"));
    assert_eq!(attempts(&db, 2), tries as i64);
    assert_eq!(
        db.i64(&format!(
            "SELECT count(*) FROM backfill.finish_steps WHERE job = '{JOB}' AND step = 2 AND last_error IS NULL"
        )),
        1
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM pg_constraint WHERE conname = 't_x_nn' AND convalidated"),
        1
    );
}

#[test]
fn contention_that_outlasts_the_attempts_fails_the_step_and_a_later_run_resumes() {
    let db = TestDb::new();
    setup(&db, 1000);
    let list = steps(&NOT_NULL);
    finish(&db, &list[..1], &FinishOptions::default())
        .0
        .unwrap();

    let blocker = db.session();
    blocker.exec("BEGIN; LOCK TABLE t IN SHARE UPDATE EXCLUSIVE MODE");
    let (result, _) = finish(&db, &list, &opts(100, 3));
    let err = result.unwrap_err();
    assert_eq!(err.exit_code(), 1);
    let msg = err.to_string();
    for needle in [
        "job fill_x: finishing step 2/4 (`ALTER TABLE t VALIDATE CONSTRAINT t_x_nn`)",
        "failed after 3 attempts",
        "lock timeout (55P03)",
        "another session holds a lock on t",
        "pg_stat_activity",
        "`backfill run fill_x`",
        "step 1 is done and will be skipped",
    ] {
        assert!(msg.contains(needle), "missing {needle:?} in: {msg}");
    }
    assert_eq!(state(&db, 2).as_deref(), Some("failed"));
    assert_eq!(attempts(&db, 2), 3);
    assert_eq!(state(&db, 3), None, "no later step may run after a failure");
    assert_eq!(
        db.i64(&format!(
            "SELECT count(*) FROM backfill.finish_steps WHERE job = '{JOB}' AND step = 2 AND last_error LIKE '%55P03%'"
        )),
        1
    );
    // The gate refuses while a step is missing (the blocker's session runs the check).
    db.exec(&format!(
        "UPDATE backfill.checkpoints SET state = 'done' WHERE job = '{JOB}'"
    ));
    let other = db.session();
    let gate = other
        .try_exec(&format!("SELECT backfill.assert_done('{JOB}')"))
        .unwrap_err();
    assert!(gate.contains("1 of its 4 finishing steps"), "{gate}");

    blocker.exec("COMMIT");
    let reports = finish(&db, &list, &opts(100, 3)).0.unwrap();
    assert_eq!(reports[0].outcome, StepOutcome::AlreadyDone);
    for r in &reports[1..] {
        assert_eq!(ran(r), (1, false), "{r:?}");
    }
    assert_eq!(attempts(&db, 1), 1, "step 1 must not run again");
    // The table keeps counting a step's attempts across runs until it is done.
    assert_eq!(attempts(&db, 2), 4);
    other.exec(&format!("SELECT backfill.assert_done('{JOB}')"));
}

#[test]
fn an_invalid_index_left_by_an_interrupted_build_is_dropped_and_built_again() {
    let db = TestDb::new();
    setup(&db, 5000);
    // A build waits for every older transaction that wrote to the table; cancelling it while it
    // waits leaves the index behind, marked invalid, as a cancelled or crashed build does.
    let writer = db.session();
    writer.exec("BEGIN; INSERT INTO t VALUES (100000, 1)");
    let builder = db.session();
    builder.exec("SET statement_timeout = '300ms'");
    let cancelled = builder
        .try_exec("CREATE INDEX CONCURRENTLY t_x_idx ON t (x)")
        .unwrap_err();
    assert!(cancelled.contains("57014"), "{cancelled}");
    writer.exec("COMMIT");
    assert_eq!(
        index_count(&db, "t_x_idx", false),
        1,
        "no invalid index to start from"
    );

    let (result, log) = finish(&db, &steps(&[BUILD]), &FinishOptions::default());
    let reports = result.unwrap();
    assert_eq!(ran(&reports[0]), (1, true));
    assert!(
        log.iter()
            .any(|l| l.contains("dropped the invalid index public.t_x_idx")),
        "{log:?}"
    );
    assert_eq!(index_count(&db, "t_x_idx", true), 1);
    assert_eq!(index_count(&db, "t_x_idx", false), 0);
}

#[test]
fn the_engines_own_build_held_up_by_an_old_transaction_is_retried_until_valid() {
    let db = TestDb::new();
    setup(&db, 5000);
    let writer = db.session();
    writer.exec("BEGIN; INSERT INTO t VALUES (100000, 1)");
    let releaser = std::thread::spawn(move || {
        let seen = poll(
            &writer,
            &format!(
                "SELECT count(*) FROM backfill.finish_steps
                  WHERE job = '{JOB}' AND step = 1 AND attempts >= 3"
            ),
            Duration::from_secs(30),
        );
        writer.exec("COMMIT");
        seen
    });
    let (result, log) = finish(&db, &steps(&[BUILD]), &opts(100, 20));
    assert!(releaser.join().unwrap(), "the build never retried");
    let reports = result.unwrap();
    let (tries, dropped) = ran(&reports[0]);
    assert!(tries >= 3, "{reports:?}");
    assert!(
        dropped,
        "the first attempt left an invalid index to drop: {log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("retrying after") && l.contains("55P03")),
        "{log:?}"
    );
    assert_eq!(index_count(&db, "t_x_idx", true), 1);
    assert_eq!(
        db.i64("SELECT count(*) FROM pg_index WHERE indrelid = 't'::regclass"),
        2,
        "only the primary key and one t_x_idx may exist"
    );
    assert_eq!(state(&db, 1).as_deref(), Some("done"));
    assert_eq!(attempts(&db, 1), tries as i64);
}

#[test]
fn a_unique_build_over_duplicates_fails_clearly_and_leaves_no_invalid_index() {
    let db = TestDb::new();
    setup(&db, 1000);
    db.exec("UPDATE t SET x = 7 WHERE id IN (3, 4)");
    let (result, log) = finish(
        &db,
        &steps(&["CREATE UNIQUE INDEX CONCURRENTLY t_x_key ON t (x)"]),
        &FinishOptions::default(),
    );
    let err = result.unwrap_err();
    assert_eq!(err.exit_code(), 1);
    let msg = err.to_string();
    for needle in [
        "job fill_x: finishing step 1/1 (`CREATE UNIQUE INDEX CONCURRENTLY t_x_key ON t (x)`) failed",
        "SQLSTATE 23505",
        "the invalid index public.t_x_key it left behind was dropped",
        "duplicate values",
        "no step is done yet",
    ] {
        assert!(msg.contains(needle), "missing {needle:?} in: {msg}");
    }
    assert!(
        !log.iter().any(|l| l.contains("retrying")),
        "a unique violation is not contention: {log:?}"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM pg_class WHERE relname = 't_x_key'"),
        0,
        "the invalid index must be dropped"
    );
    assert_eq!(state(&db, 1).as_deref(), Some("failed"));
    assert_eq!(attempts(&db, 1), 1);
}

#[test]
fn a_step_with_two_statements_is_refused_before_anything_runs() {
    let db = TestDb::new();
    setup(&db, 10);
    for (bad, why) in [
        (
            "ALTER TABLE t ADD COLUMN y int; ALTER TABLE t ADD COLUMN z int",
            "holds more than one statement",
        ),
        ("BEGIN", "is a transaction command"),
        ("  ", "is empty"),
    ] {
        let list = steps(&["ALTER TABLE t ADD COLUMN w int", bad]);
        let err = finish(&db, &list, &FinishOptions::default()).0.unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("job fill_x: finishing step 2/2") && msg.contains(why),
            "{msg}"
        );
    }
    assert_eq!(
        db.i64("SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname IN ('w', 'y', 'z')"),
        0,
        "nothing may run"
    );
    assert_eq!(db.i64("SELECT count(*) FROM backfill.finish_steps"), 0);
}

#[test]
fn two_finishers_at_once_run_every_step_exactly_once() {
    let db = TestDb::new();
    setup(&db, 1000);
    // A slow step keeps the first finisher busy while the second arrives.
    let mut list = steps(&NOT_NULL);
    list.insert(2, "SELECT pg_sleep(1)".to_string());
    let barrier = Barrier::new(2);
    let (a, b) = std::thread::scope(|scope| {
        let run = || {
            barrier.wait();
            finish_at(&db.url, &list, &FinishOptions::default())
        };
        let a = scope.spawn(run);
        let b = scope.spawn(run);
        db.wait_for(
            "SELECT count(*) > 0 FROM pg_locks
              WHERE locktype = 'advisory' AND NOT granted
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            Duration::from_secs(20),
        );
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, a_log) = a;
    let (b, b_log) = b;
    let (a, b) = (a.unwrap(), b.unwrap());
    for (x, y) in a.iter().zip(&b) {
        let ran_here = |r: &StepReport| matches!(r.outcome, StepOutcome::Ran { attempts: 1, .. });
        assert!(
            ran_here(x) != ran_here(y) && (ran_here(x) || ran_here(y)),
            "step {} must run exactly once: {x:?} / {y:?}",
            x.step
        );
    }
    assert!(
        a_log
            .iter()
            .chain(&b_log)
            .any(|l| l.contains("waiting for it")),
        "{a_log:?} {b_log:?}"
    );
    assert_eq!(
        db.i64(&format!(
            "SELECT count(*) FROM backfill.finish_steps WHERE job = '{JOB}' AND state = 'done' AND attempts = 1"
        )),
        5
    );
    assert_eq!(
        db.i64(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        0,
        "both finishers must release the lock"
    );
}

#[test]
fn a_done_step_whose_statement_changed_runs_again_and_dropped_steps_are_forgotten() {
    let db = TestDb::new();
    setup(&db, 10);
    let first = steps(&[
        "COMMENT ON TABLE t IS 'first'",
        "COMMENT ON COLUMN t.x IS 'x'",
    ]);
    finish(&db, &first, &FinishOptions::default()).0.unwrap();
    let second = steps(&["COMMENT ON TABLE t IS 'second'"]);
    let reports = finish(&db, &second, &FinishOptions::default()).0.unwrap();
    assert_eq!(ran(&reports[0]), (1, false));
    assert_eq!(
        db.text("SELECT obj_description('t'::regclass, 'pg_class')")
            .as_deref(),
        Some("second")
    );
    assert_eq!(
        db.text(&format!(
            "SELECT sql FROM backfill.finish_steps WHERE job = '{JOB}' AND step = 1"
        ))
        .as_deref(),
        Some("COMMENT ON TABLE t IS 'second'")
    );
    assert_eq!(attempts(&db, 1), 1);
    assert_eq!(
        state(&db, 2),
        None,
        "a step the job no longer lists is forgotten"
    );
    assert_eq!(
        db.i64(&format!(
            "SELECT finish_steps::bigint FROM backfill.checkpoints WHERE job = '{JOB}'"
        )),
        1
    );
}

/// Through the binary: the finishing steps run once the job is done and verified; one that fails
/// keeps the gate (CLI and SQL) shut, and the next run does only what is left.
#[test]
fn a_run_finishes_with_its_steps_and_the_gate_waits_for_them() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE o (id bigint PRIMARY KEY, legacy text, status text);
         INSERT INTO o SELECT g, 'x' || g, NULL FROM generate_series(1, 1000) g;
         UPDATE o SET legacy = NULL WHERE id = 500;",
    );
    db.write_job(
        "o_status",
        r#"
table = "o"
key = "id"
sql = "UPDATE o SET status = upper(legacy) WHERE id BETWEEN :start AND :end AND status IS NULL"
verify = "SELECT count(*) FROM o WHERE status IS NULL AND legacy IS NOT NULL"
max_sweeps = 0
finish_sql = [
  "ALTER TABLE o ADD CONSTRAINT o_status_nn CHECK (status IS NOT NULL) NOT VALID",
  "ALTER TABLE o VALIDATE CONSTRAINT o_status_nn",
  "ALTER TABLE o ALTER COLUMN status SET NOT NULL",
  "ALTER TABLE o DROP CONSTRAINT o_status_nn",
]
"#,
    );
    // Row 500 has no legacy value, so its status stays NULL and VALIDATE fails.
    let out = db.run(&["run", "o_status"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("finishing step 2/4") && out.stderr.contains("23514"),
        "{out:?}"
    );
    let out = db.run(&["gate", "o_status"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stdout.contains("1 of its 4 finishing steps"), "{out:?}");
    let s = db.session();
    let e = s
        .try_exec("SELECT backfill.assert_done('o_status')")
        .unwrap_err();
    assert!(e.contains("1 of its 4 finishing steps succeeded"), "{e}");
    let status = db.run(&["status", "o_status"]);
    assert!(
        status.stdout.contains("finishing failed") && status.stdout.contains("1 of 4 succeeded"),
        "{status:?}"
    );

    db.exec("UPDATE o SET status = 'UNKNOWN' WHERE id = 500");
    let out = db.run(&["run", "o_status"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("step 1/4 already done"), "{out:?}");
    assert_eq!(
        db.text("SELECT attnotnull::text FROM pg_attribute WHERE attrelid = 'o'::regclass AND attname = 'status'")
            .as_deref(),
        Some("true")
    );
    db.run(&["gate", "o_status"]).expect(0);
    s.exec("SELECT backfill.assert_done('o_status')");
    let v: serde_json::Value =
        serde_json::from_str(&db.run(&["status", "o_status", "--json"]).stdout).unwrap();
    assert_eq!(v["phase"], "done and verified");
    assert_eq!(v["checkpoint"]["finish_steps_done"], 4);
}

/// A job without a verify query is never "verified": after its finishing steps its phase is
/// `done`, as the run itself records it when there is nothing to finish.
#[test]
fn a_job_without_verify_is_done_after_its_finishing_steps_not_verified() {
    let db = TestDb::new();
    counter_table(&db, 300);
    db.write_job(
        "nv",
        "table = \"t\"\nkey = \"id\"\nchunk_rows = 100\n\
         sql = \"UPDATE t SET n = n + 1 WHERE id BETWEEN :start AND :end\"\n\
         finish_sql = [\"CREATE INDEX t_n ON t (n)\"]\n",
    );
    db.run(&["run", "nv"]).expect(0);
    assert!(db.text("SELECT to_regclass('t_n')::text").is_some());
    let v: serde_json::Value =
        serde_json::from_str(&db.run(&["status", "nv", "--json"]).stdout).unwrap();
    assert_eq!(v["phase"], "done", "{v}");
    assert_eq!(v["checkpoint"]["finish_steps_done"], 1, "{v}");
}
