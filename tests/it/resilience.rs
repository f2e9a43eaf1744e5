//! Guarantees under interruption: SIGKILL at random moments, SIGINT (once and twice), a long
//! statement cancelled on stop, a second runner, a runner killed and taken over, a held lock.
//! Every job here is non-idempotent (n = n + 1), so a chunk applied twice or skipped shows.

use crate::support::*;
use std::time::{Duration, Instant};

/// Each chunk sleeps a little on the server, so kills land inside transactions too.
fn slow_counter_job(sleep: &str, chunk: u32) -> String {
    format!(
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = {chunk}\n\
         sql = \"UPDATE t SET n = n + 1 FROM (SELECT pg_sleep({sleep})) s WHERE id BETWEEN :start AND :end\"\n\
         verify = \"SELECT count(*) FROM t WHERE n = 0\"\n\
         throttle = {{ target_chunk_time = \"0s\" }}\n"
    )
}

#[test]
fn sigkill_at_random_moments_then_resume_applies_every_row_exactly_once() {
    let db = TestDb::new();
    counter_table(&db, 6000);
    db.write_job("k", &slow_counter_job("0.005", 20));
    let mut kills = 0;
    let mut mid_chunk = 0;
    let done = || db.i64("SELECT count(*) FROM t WHERE n > 0");
    // Each round kills a run at a random moment after it made progress of its own (so the
    // kills land anywhere in the chunk loop, however slow the machine is to start a process).
    for round in 0..400 {
        let before = done();
        let mut child = db.spawn(&["run", "k"]);
        let mut finished = None;
        let started = Instant::now();
        while finished.is_none() && done() == before {
            finished = child.try_wait().unwrap();
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "round {round}: no progress in 60 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let wait = Duration::from_millis(fastrand::u64(0..120));
        let t = Instant::now();
        while finished.is_none() && t.elapsed() < wait {
            finished = child.try_wait().unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        match finished {
            Some(_) => {
                let out = wait_out(child, Duration::from_secs(5));
                // A run started right after a kill must take over, never refuse.
                assert_eq!(out.code, 0, "round {round}: {out:?}");
                break;
            }
            None => {
                // Is a chunk transaction open right now?
                if db.i64("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'backfill' AND state = 'active' AND query LIKE 'UPDATE t SET%'") > 0 {
                    mid_chunk += 1;
                }
                signal(&child, libc::SIGKILL);
                let _ = child.wait();
                kills += 1;
            }
        }
        assert!(round < 399, "the job never finished");
    }
    assert!(
        kills >= 5,
        "only {kills} kills landed; the test proves little"
    );
    assert!(mid_chunk >= 1, "no kill landed inside a chunk");
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n <> 1"),
        0,
        "after {kills} kills every row must be applied exactly once"
    );
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'k'"),
        6000
    );
    // Every killed run that had claimed the job is recorded as abandoned (a kill that lands
    // before the claim leaves no run behind); only the last run finished.
    let abandoned =
        db.i64("SELECT count(*) FROM backfill.runs WHERE job = 'k' AND outcome = 'abandoned'");
    assert!(
        abandoned >= 1 && abandoned <= kills,
        "{abandoned} abandoned, {kills} kills"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.runs WHERE job = 'k'"),
        abandoned + 1
    );
    db.run(&["gate", "k"]).expect(0);
    eprintln!("sigkill test: {kills} kills, {mid_chunk} inside a chunk");
}

#[test]
fn sigint_stops_with_130_and_the_next_run_resumes() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    db.write_job("s", &slow_counter_job("0.02", 20));
    let child = db.spawn(&["run", "s"]);
    db.wait_for(
        "SELECT coalesce((SELECT rows_done >= 200 FROM backfill.progress WHERE job = 's'), false)",
        Duration::from_secs(30),
    );
    signal(&child, libc::SIGINT);
    let out = wait_out(child, Duration::from_secs(10));
    assert_eq!(out.code, 130, "{out:?}");
    // A deliberate stop is no error: a calm line with where the next run resumes.
    assert!(
        out.stderr
            .contains("s: stopped; the next run resumes after key")
            && out.stderr.contains("progress is saved")
            && !out.stderr.contains("error:"),
        "{out:?}"
    );
    assert_eq!(
        db.text("SELECT state FROM backfill.checkpoints WHERE job = 's'")
            .as_deref(),
        Some("stopped")
    );
    let done = db.i64("SELECT rows_done FROM backfill.progress WHERE job = 's'");
    assert!(done < 2000);
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n = 1"),
        done,
        "the checkpoint matches the data"
    );
    let out = db.run(&["run", "s", "--chunk-rows", "500"]);
    out.expect(0);
    assert!(out.stderr.contains("resuming after key"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    assert_eq!(
        db.text("SELECT string_agg(outcome, ',' ORDER BY id) FROM backfill.runs WHERE job = 's'")
            .as_deref(),
        Some("stopped,done")
    );
}

#[test]
fn a_long_statement_is_cancelled_on_stop_and_rolled_back() {
    let db = TestDb::new();
    counter_table(&db, 500);
    // The third chunk would run for a minute.
    db.write_job(
        "l",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\nstatement_timeout = \"5m\"\n\
         sql = \"UPDATE t SET n = n + 1 FROM (SELECT CASE WHEN :start::bigint > 300 THEN pg_sleep(60) END) s WHERE id BETWEEN :start AND :end\"\n",
    );
    // The backend running the sleeping chunk (0: none).
    let sleeping = "SELECT coalesce((SELECT pid::bigint FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'backfill' AND wait_event = 'PgSleep' LIMIT 1), 0)";
    let wait_sleeping = || {
        db.wait_for(
            &format!("SELECT ({sleeping}) <> 0"),
            Duration::from_secs(30),
        );
        db.i64(sleeping)
    };
    let still_sleeping = |pid: i64| {
        db.i64(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND wait_event = 'PgSleep'"
        ))
    };
    // Once: the chunk is given the 5 s grace period, then cancelled on the server.
    let child = db.spawn(&["run", "l"]);
    let pid = wait_sleeping();
    let t = Instant::now();
    signal(&child, libc::SIGINT);
    let out = wait_out(child, Duration::from_secs(30));
    assert_eq!(out.code, 130, "{out:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(4900) && t.elapsed() < Duration::from_secs(15),
        "stop took {:?} (grace 5 s)",
        t.elapsed()
    );
    assert_eq!(still_sleeping(pid), 0, "the server's statement was stopped");
    let done = db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'l'");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n = 1"), done);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n > 1"), 0);
    // Twice: out at once, and the statement of this run's own backend stopped within 2 s.
    assert_eq!(db.i64(sleeping), 0, "nothing left over from the first run");
    let child = db.spawn(&["run", "l"]);
    let pid = wait_sleeping();
    let t = Instant::now();
    signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, libc::SIGINT);
    let out = wait_out(child, Duration::from_secs(10));
    assert_eq!(out.code, 130, "{out:?}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "second Ctrl-C took {:?}",
        t.elapsed()
    );
    db.wait_for(
        &format!("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = {pid} AND wait_event = 'PgSleep')"),
        Duration::from_secs(10),
    );
    assert!(
        t.elapsed() < Duration::from_millis(2200),
        "the statement ran on for {:?} after the second Ctrl-C",
        t.elapsed()
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n = 1"),
        db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'l'")
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n > 1"), 0);
}

#[test]
fn a_second_runner_joins_and_takes_over_a_killed_runners_range() {
    let db = TestDb::new();
    counter_table(&db, 3000);
    db.write_job("o", &slow_counter_job("0.02", 20));
    let first = db.spawn(&["run", "o"]);
    db.wait_for(
        "SELECT coalesce((SELECT rows_done > 0 FROM backfill.progress WHERE job = 'o'), false)",
        Duration::from_secs(30),
    );
    // A second runner does not refuse: it splits the first one's range and takes half.
    let second = db.spawn(&["run", "o"]);
    db.wait_for(
        "SELECT (SELECT count(DISTINCT owner_run) FROM backfill.ranges WHERE job = 'o' AND NOT done) = 2",
        Duration::from_secs(30),
    );
    let status = db.run(&["status", "o", "--json"]);
    let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(
        s["checkpoint"]["runners"].as_array().unwrap().len(),
        2,
        "{status:?}"
    );
    signal(&first, libc::SIGKILL);
    let mut first = first;
    let _ = first.wait();
    // The second runner finishes its half, then takes the dead runner's range at once (its
    // session is gone): what is left takes a few seconds, while waiting for the dead runner's
    // 30 s lease would take longer than this limit.
    let out = wait_out(second, Duration::from_secs(25));
    out.expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    assert_eq!(
        db.text("SELECT string_agg(outcome, ',' ORDER BY id) FROM backfill.runs WHERE job = 'o'")
            .as_deref(),
        Some("abandoned,done")
    );
    let status = db.run(&["status", "o", "--json"]);
    let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(s["state"], "done");
}

#[test]
fn a_held_row_lock_makes_the_chunk_retry_without_stalling_the_application() {
    let db = TestDb::new();
    counter_table(&db, 1000);
    db.write_job("h", &counter_job("lock_timeout = \"100ms\"\n"));
    let holder = db.session();
    holder.exec("BEGIN; SELECT * FROM t WHERE id = 700 FOR UPDATE;");
    let child = db.spawn(&["run", "h", "--max-attempts", "50"]);
    // The engine gives up its lock wait after 100 ms each time; an application session touching
    // a row of the chunk is therefore never queued behind the engine for long.
    db.wait_for(
        "SELECT coalesce((SELECT rows_done >= 400 FROM backfill.progress WHERE job = 'h'), false)",
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_millis(800));
    holder.exec("COMMIT");
    let out = wait_out(child, Duration::from_secs(60));
    out.expect(0);
    assert!(
        out.stderr.contains("SQLSTATE 55P03") && out.stderr.contains("retrying"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

/// The run's hold reason as `status` reads it.
fn hold_reason(db: &TestDb, job: &str) -> Option<String> {
    db.text(&format!(
        "SELECT (SELECT hold_reason FROM backfill.progress WHERE job = '{job}')"
    ))
}

#[test]
fn lock_contention_longer_than_a_few_retries_is_outlasted_and_shown_as_held() {
    use crate::observability::{free_port, http_get};
    let db = TestDb::new();
    db.run(&["init"]).expect(0);
    counter_table(&db, 1000);
    db.write_job("h", &counter_job("lock_timeout = \"200ms\"\n"));
    // An application transaction holds one row for 9 s: far longer than the old retry budget
    // (5 attempts: 1 s of lock waits and at most 3 s of backoff here).
    let holder = db.session();
    holder.exec("BEGIN; SELECT * FROM t WHERE id = 700 FOR UPDATE;");
    let locked = Instant::now();
    let mport = free_port();
    let mut child = db.spawn(&[
        "run",
        "h",
        "--progress-interval",
        "1s",
        "--metrics-addr",
        &mport.to_string(),
    ]);
    db.wait_for(
        "SELECT coalesce((SELECT hold_reason LIKE 'lock contention on keys %..=%' FROM backfill.progress WHERE job = 'h'), false)",
        Duration::from_secs(30),
    );
    let reason = hold_reason(&db, "h").unwrap();
    let status = db.run(&["status", "h"]);
    // status: "held   lock contention on keys 601..=750 (since 2026-12-01T08:19:31Z)"
    assert!(
        status
            .stdout
            .lines()
            .any(|l| l.starts_with("held ") && l.contains(&format!("{reason} (since 20"))),
        "{status:?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&db.run(&["status", "h", "--json"]).stdout).unwrap();
    assert_eq!(json["checkpoint"]["hold_reason"], reason.as_str(), "{json}");
    assert!(json["checkpoint"]["held_since"].is_string(), "{json}");
    // The metrics book the time as held for lock contention.
    let t = Instant::now();
    loop {
        let held = http_get(mport, "/metrics").and_then(|m| {
            m.lines()
                .find(|l| {
                    l.starts_with(
                        "backfill_held_seconds_total{backfill_job=\"h\",reason=\"lock_contention\"}",
                    )
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        });
        if held.is_some_and(|s| s >= 1.0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no lock_contention hold on the metrics: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The scenario: the lock stays for 9 s in all; the run waits it out.
    std::thread::sleep(Duration::from_secs(9).saturating_sub(locked.elapsed()));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run gave up while the lock was held"
    );
    let done = db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'h'");
    assert!(done < 1000, "{done}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n = 1"), done);
    holder.exec("COMMIT");
    let out = wait_out(child, Duration::from_secs(60));
    out.expect(0);
    assert!(
        out.stderr.contains("SQLSTATE 55P03")
            && out.stderr.contains(&format!("held: {reason} since 20"))
            && out.stderr.contains("the lock contention is over"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'h'"),
        1000
    );
}

#[test]
fn lock_contention_beyond_the_budget_fails_saying_where_it_resumes() {
    let db = TestDb::new();
    counter_table(&db, 1000);
    db.write_job(
        "b",
        &counter_job("lock_timeout = \"200ms\"\ncontention_budget = \"1h\"\n"),
    );
    let holder = db.session();
    holder.exec("BEGIN; SELECT * FROM t WHERE id = 700 FOR UPDATE;");
    // The flag overrides the job's budget.
    let out = db.run(&["run", "b", "--contention-budget", "3s"]);
    holder.exec("COMMIT");
    assert_eq!(out.code, 1, "{out:?}");
    let done = db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'b'");
    assert!(done > 0 && done < 1000, "{done}");
    assert!(
        out.stderr.contains("kept meeting lock contention")
            && out.stderr.contains("55P03")
            && out.stderr.contains("contention budget (3s")
            && out.stderr.contains("resumes after key"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n = 1"), done);
    assert_eq!(
        db.text("SELECT state FROM backfill.checkpoints WHERE job = 'b'")
            .as_deref(),
        Some("failed")
    );
    db.run(&["run", "b"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn json_final_lines_carry_ts_level_and_job_and_a_stop_is_not_an_error() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    db.write_job("s", &slow_counter_job("0.02", 20));
    // A real failure's last line: a job with no file.
    let out = db.run(&["--log-format", "json", "run", "nope"]);
    assert_eq!(out.code, 2, "{out:?}");
    let last: serde_json::Value = serde_json::from_str(out.stderr.lines().last().unwrap()).unwrap();
    assert!(last["ts"].is_string(), "{last}");
    assert_eq!(last["level"], "error", "{last}");
    assert_eq!(last["job"], "nope", "{last}");

    // A stop by a signal: every line JSON with ts and job, the last one not an error.
    let child = db.spawn(&["--log-format", "json", "run", "s"]);
    db.wait_for(
        "SELECT coalesce((SELECT rows_done >= 100 FROM backfill.progress WHERE job = 's'), false)",
        Duration::from_secs(30),
    );
    signal(&child, libc::SIGINT);
    let out = wait_out(child, Duration::from_secs(10));
    assert_eq!(out.code, 130, "{out:?}");
    for l in out.stderr.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["ts"].is_string(), "{l}");
        assert_eq!(v["job"], "s", "{l}");
    }
    let last: serde_json::Value = serde_json::from_str(out.stderr.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "info", "{last}");
    assert!(
        last["msg"]
            .as_str()
            .unwrap()
            .starts_with("s: stopped; the next run resumes after key"),
        "{last}"
    );
}
