//! Production safety: the rate ceiling, the adaptive chunk size, lock waits bounded by
//! lock_timeout, health signals (throttle_sql, vacuum, WAL rate, unreadable signals, replication
//! lag on a real standby), and live control from another process.

use crate::support::*;
use backfill::pgtemp::TempCluster;
use std::time::{Duration, Instant};

fn job(sql_extra: &str, throttle: &str) -> String {
    format!(
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"UPDATE t SET n = n + 1 {sql_extra} WHERE id BETWEEN :start AND :end\"\n\
         verify = \"SELECT count(*) FROM t WHERE n = 0\"\n[throttle]\n{throttle}"
    )
}

/// A database whose checkpoint table exists before the test polls it (`backfill init`).
fn polled_db(db: TestDb) -> TestDb {
    db.run(&["init"]).expect(0);
    db
}

fn rows_done(db: &TestDb, name: &str) -> i64 {
    db.i64(&format!(
        "SELECT coalesce((SELECT rows_done FROM backfill.progress WHERE job = '{name}'), 0)"
    ))
}

fn hold_reason(db: &TestDb, name: &str) -> Option<String> {
    db.text(&format!(
        "SELECT (SELECT hold_reason FROM backfill.progress WHERE job = '{name}')"
    ))
}

/// Waits until the run is held with a reason containing `needle`, and checks it stays put.
fn assert_held(db: &TestDb, name: &str, needle: &str) {
    let t = Instant::now();
    while !hold_reason(db, name).is_some_and(|r| r.contains(needle)) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never held for {needle}; reason {:?}",
            hold_reason(db, name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = rows_done(db, name);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        rows_done(db, name),
        before,
        "a held run must not process keys"
    );
    let status = db.run(&["status", name]);
    assert!(
        status.stdout.contains("held") && status.stdout.contains(needle),
        "{status:?}"
    );
}

#[test]
fn the_rate_ceiling_holds_over_every_window() {
    let db = polled_db(TestDb::new());
    const RATE: f64 = 800.0;
    const ROWS: i64 = 10_400; // 13 s at the ceiling: room for several 10-second windows
    counter_table(&db, ROWS);
    db.write_job("r", &job("", "rows_per_second = 800\n"));
    let child = db.spawn(&["run", "r"]);
    let mut samples = Vec::new();
    let t = Instant::now();
    while samples.last().is_none_or(|(_, n)| *n < ROWS) {
        samples.push((t.elapsed(), rows_done(&db, "r")));
        assert!(t.elapsed() < Duration::from_secs(90));
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_out(child, Duration::from_secs(30)).expect(0);
    // From the first chunk on, no 10-second window sees more than 1.1 × the ceiling; and the
    // run is not merely slow: it reaches the ceiling on average.
    let first = samples.iter().position(|(_, n)| *n > 0).unwrap();
    let mut windows = 0;
    for (i, (ti, ni)) in samples.iter().enumerate().skip(first) {
        if let Some((tj, nj)) = samples[i..]
            .iter()
            .find(|(tj, _)| *tj - *ti >= Duration::from_secs(10))
        {
            let w = (*tj - *ti).as_secs_f64();
            let rate = (nj - ni) as f64 / w;
            assert!(
                rate <= 1.1 * RATE,
                "{rate:.0} rows/s over {w:.1}s from {ti:?}"
            );
            windows += 1;
        }
    }
    assert!(windows > 10, "too few 10-second windows sampled: {windows}");
    let (t0, n0) = samples[first];
    let (t1, n1) = samples.last().unwrap();
    let average = (n1 - n0) as f64 / (*t1 - t0).as_secs_f64();
    assert!(
        average > 0.8 * RATE,
        "average {average:.0} rows/s: far below the ceiling"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn the_chunk_size_shrinks_on_a_slow_stretch_and_grows_back() {
    let db = TestDb::new();
    // Keys 4001..8000 cost 1 ms each (4 s in all); the rest cost microseconds. The server logs
    // every chunk's first key and size (a transition table), so no chunk can be missed.
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 20000);
         CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.id BETWEEN 4001 AND 8000 THEN PERFORM pg_sleep(0.001); END IF; RETURN NEW; END $$;
         CREATE TRIGGER slow BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION slow();
         CREATE TABLE chunk_log (first bigint NOT NULL, size bigint NOT NULL);
         CREATE FUNCTION log_chunk() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO chunk_log SELECT min(id), count(*) FROM changed; RETURN NULL; END $$;
         CREATE TRIGGER log_chunk AFTER UPDATE ON t REFERENCING NEW TABLE AS changed
           FOR EACH STATEMENT EXECUTE FUNCTION log_chunk();",
    );
    db.write_job(
        "a",
        &job("", "target_chunk_time = \"50ms\"\nmax_chunk_rows = 1000\n"),
    );
    db.run(&["run", "a"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    assert_eq!(db.i64("SELECT sum(size)::bigint FROM chunk_log"), 20000);
    let largest = |lo: i64, hi: i64| {
        db.i64(&format!(
            "SELECT coalesce(max(size), 0) FROM chunk_log WHERE first > {lo} AND first <= {hi}"
        ))
    };
    let median = |lo: i64, hi: i64| {
        db.i64(&format!(
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY size) FROM chunk_log WHERE first > {lo} AND first <= {hi}"
        ))
    };
    let log =
        || db.text("SELECT string_agg(first || ':' || size, ' ' ORDER BY first) FROM chunk_log");
    assert!(
        largest(0, 4000) >= 500,
        "grew on the fast stretch: {:?}",
        log()
    );
    assert!(
        median(5000, 8000) <= 100,
        "shrank on the slow stretch (1 ms a key, 50 ms target): {:?}",
        log()
    );
    assert!(largest(9000, 20000) >= 500, "grew back: {:?}", log());
}

#[test]
fn an_application_session_waits_no_longer_than_lock_timeout() {
    let db = polled_db(TestDb::new());
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0); INSERT INTO t (id) SELECT generate_series(1, 1000);");
    db.write_job(
        "l",
        &job("", "target_chunk_time = \"0s\"\n")
            .replace("[throttle]", "lock_timeout = \"300ms\"\n[throttle]"),
    );
    let a = db.session();
    a.exec("BEGIN; UPDATE t SET n = n WHERE id = 950");
    let child = db.spawn(&["run", "l", "--max-attempts", "100"]);
    // The engine has locked 901..949 and waits for 950, held by A.
    db.wait_for(&engine_lock_waits(1), Duration::from_secs(30));
    // B wants 920: queued behind the engine, which gives up its locks within lock_timeout.
    let b = db.session();
    let t = Instant::now();
    b.exec("UPDATE t SET n = n WHERE id = 920");
    let waited = t.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    a.exec("COMMIT");
    wait_out(child, Duration::from_secs(60)).expect(0);
    assert!(
        waited < Duration::from_secs(2),
        "B waited {waited:?} while A held its lock for much longer"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn an_application_session_queued_behind_a_chunk_makes_the_run_yield_and_shrink() {
    let db = polled_db(TestDb::new());
    // Each chunk holds its row locks for 300 ms after updating them.
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 2000);
         CREATE FUNCTION linger() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
         CREATE TRIGGER linger AFTER UPDATE ON t FOR EACH STATEMENT EXECUTE FUNCTION linger();",
    );
    db.write_job(
        "y",
        &job("", "target_chunk_time = \"0s\"\n").replace("chunk_rows = 100", "chunk_rows = 400"),
    );
    let child = db.spawn(&["run", "y"]);
    db.wait_for(
        "SELECT coalesce((SELECT rows_done >= 400 FROM backfill.progress WHERE job = 'y'), false)",
        Duration::from_secs(30),
    );
    // The application touches a row just past the committed cursor: inside the chunk in flight.
    let app = db.session();
    app.exec("SET application_name = 'the_application'");
    let mut longest = Duration::ZERO;
    for _ in 0..3 {
        let t = Instant::now();
        app.exec(
            "UPDATE t SET n = n WHERE id = (SELECT cursor[1]::bigint + 10 FROM backfill.ranges WHERE job = 'y')",
        );
        longest = longest.max(t.elapsed());
    }
    let out = wait_out(child, Duration::from_secs(60));
    out.expect(0);
    assert!(
        out.stderr
            .contains("waited on this chunk's locks; chunks shrink to 200 keys"),
        "{out:?}"
    );
    // Released by the chunk's early commit: at most one chunk's time, never lock_timeout-long.
    assert!(
        longest < Duration::from_millis(900),
        "the application waited {longest:?}"
    );
    assert!(
        db.i64("SELECT chunk_rows_now::bigint FROM backfill.progress WHERE job = 'y'") <= 200,
        "the run did not stay shrunk"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn a_fixed_pause_and_a_nice_ratio_rest_between_chunks() {
    let db = TestDb::new();
    counter_table(&db, 1000); // 10 chunks of 100
                              // The server notes when each chunk's statement ended: the rest between chunks is read from
                              // those times (a lower bound, whatever the machine's load), not compared with another run.
    db.exec(
        "CREATE TABLE chunk_log (at timestamptz NOT NULL);
         CREATE FUNCTION log_chunk() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO chunk_log VALUES (clock_timestamp()); RETURN NULL; END $$;
         CREATE TRIGGER log_chunk AFTER UPDATE ON t FOR EACH STATEMENT EXECUTE FUNCTION log_chunk();",
    );
    // The shortest time between two chunks' ends, in ms, over a whole run.
    let shortest_gap = |throttle: &str, flags: &[&str]| -> i64 {
        db.exec("UPDATE t SET n = 0; DELETE FROM chunk_log");
        let _ = db.run(&["reset", "p", "--yes"]);
        db.write_job("p", &job("FROM (SELECT pg_sleep(0.03)) s", throttle));
        let mut args = vec!["run", "p"];
        args.extend_from_slice(flags);
        db.run(&args).expect(0);
        assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
        assert_eq!(db.i64("SELECT count(*) FROM chunk_log"), 10);
        db.i64(
            "SELECT min(gap)::bigint FROM (SELECT extract(epoch FROM at - lag(at) OVER (ORDER BY at)) * 1000 AS gap FROM chunk_log) s",
        )
    };
    // A rest of 150 ms, then the next chunk's 30 ms sleep.
    let paused = shortest_gap("target_chunk_time = \"0s\"\npause = \"150ms\"\n", &[]);
    assert!(paused >= 180, "{paused} ms between chunks");
    // Each chunk takes at least 30 ms; a ratio of 5 rests at least 150 ms after each.
    let nice = shortest_gap("target_chunk_time = \"0s\"\nnice_ratio = 5.0\n", &[]);
    assert!(nice >= 180, "{nice} ms between chunks");
    // Flags of `run` win over the job file.
    let flagged = shortest_gap(
        "target_chunk_time = \"0s\"\npause = \"0s\"\n",
        &["--pause", "150ms"],
    );
    assert!(flagged >= 180, "{flagged} ms between chunks");
    let t = Instant::now();
    db.exec("UPDATE t SET n = 0");
    let _ = db.run(&["reset", "p", "--yes"]);
    db.write_job(
        "p",
        &job(
            "FROM (SELECT pg_sleep(0.03)) s",
            "target_chunk_time = \"0s\"\nrows_per_second = 1000000\n",
        ),
    );
    db.run(&["run", "p", "--rows-per-second", "400"]).expect(0);
    // 1000 keys at 400 a second, the first second's burst free: at least 1.5 s.
    let capped = t.elapsed();
    assert!(capped >= Duration::from_millis(1400), "{capped:?}");
}

#[test]
fn throttle_sql_holds_and_releases_and_unreadable_signals_follow_on_signal_error() {
    let db = polled_db(TestDb::new());
    counter_table(&db, 3000);
    db.exec("CREATE TABLE flag (hold boolean NOT NULL); INSERT INTO flag VALUES (false);");
    db.write_job(
        "f",
        &job("FROM (SELECT pg_sleep(0.01)) s", "target_chunk_time = \"0s\"\nthrottle_sql = \"SELECT hold FROM flag\"\ncheck_interval = \"100ms\"\n"),
    );
    let child = db.spawn(&["run", "f"]);
    db.wait_for(
        "SELECT coalesce((SELECT rows_done >= 300 FROM backfill.progress WHERE job = 'f'), false)",
        Duration::from_secs(30),
    );
    db.exec("UPDATE flag SET hold = true");
    assert_held(&db, "f", "throttle_sql returned true");
    db.exec("UPDATE flag SET hold = false");
    let out = wait_out(child, Duration::from_secs(60));
    out.expect(0);
    assert!(
        out.stderr.contains("holding: throttle_sql returned true")
            && out.stderr.contains("no longer held"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);

    // A signal that errors: held (fail closed) by default, ignored when told.
    db.exec("UPDATE t SET n = 0");
    db.run(&["reset", "f", "--yes"]).expect(0);
    db.write_job("f", &job("", "target_chunk_time = \"0s\"\nthrottle_sql = \"SELECT 1 / 0 > 0\"\ncheck_interval = \"100ms\"\n"));
    let child = db.spawn(&["run", "f"]);
    assert_held(&db, "f", "cannot read throttle_sql");
    db.run(&["cancel", "f"]).expect(0);
    let out = wait_out(child, Duration::from_secs(30));
    assert_eq!(out.code, 130, "{out:?}");
    db.write_job("f", &job("", "target_chunk_time = \"0s\"\nthrottle_sql = \"SELECT 1 / 0 > 0\"\non_signal_error = \"ignore\"\n"));
    db.run(&["run", "f"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn a_vacuum_on_the_table_holds_the_run() {
    let db = polled_db(TestDb::new());
    counter_table(&db, 3000);
    db.write_job(
        "v",
        &job(
            "FROM (SELECT pg_sleep(0.01)) s",
            "target_chunk_time = \"0s\"\nhold_during_autovacuum = true\ncheck_interval = \"100ms\"\n",
        ),
    );
    // Wide rows with dead versions and a cost-throttled VACUUM: it lasts until we cancel it.
    db.exec("ALTER TABLE t ADD pad text; UPDATE t SET pad = repeat('x', 500);");
    let vacuum = db.session();
    vacuum.exec("SET vacuum_cost_delay = 100; SET vacuum_cost_limit = 1");
    let runner = std::thread::spawn(move || {
        // Its own statement: VACUUM cannot run in the implicit transaction of a batch. It ends
        // with an error when the test cancels it.
        let _ = vacuum.try_exec("VACUUM t");
    });
    db.wait_for(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_progress_vacuum WHERE relid = 't'::regclass)",
        Duration::from_secs(30),
    );
    let child = db.spawn(&["run", "v"]);
    assert_held(&db, "v", "a vacuum is running");
    db.exec(
        "SELECT pg_cancel_backend(pid) FROM pg_stat_progress_vacuum WHERE relid = 't'::regclass",
    );
    runner.join().unwrap();
    wait_out(child, Duration::from_secs(60)).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn pause_resume_set_and_cancel_from_another_process() {
    let db = polled_db(TestDb::new());
    counter_table(&db, 4000);
    db.write_job(
        "c",
        &job(
            "FROM (SELECT pg_sleep(0.01)) s",
            "target_chunk_time = \"0s\"\n",
        ),
    );
    let out = db.run(&["cancel", "c"]);
    assert_eq!(out.code, 3, "{out:?}");
    let child = db.spawn(&["run", "c"]);
    db.wait_for(
        "SELECT coalesce((SELECT rows_done >= 200 FROM backfill.progress WHERE job = 'c'), false)",
        Duration::from_secs(30),
    );
    let out = db.run(&["pause", "c"]);
    out.expect(0);
    assert!(
        out.stdout.contains("holds before its next chunk"),
        "{out:?}"
    );
    assert_held(&db, "c", "paused by `backfill pause`");
    db.run(&["resume", "c"]).expect(0);
    let at = rows_done(&db, "c");
    db.wait_for(
        &format!("SELECT (SELECT rows_done > {at} FROM backfill.progress WHERE job = 'c')"),
        Duration::from_secs(10),
    );

    let out = db.run(&["set", "c", "--rows-per-second", "40"]);
    out.expect(0);
    assert!(out.stdout.contains("rows_per_second 40"), "{out:?}");
    db.wait_for(
        "SELECT (SELECT chunk_rows_now <= 40 FROM backfill.progress WHERE job = 'c')",
        Duration::from_secs(10),
    );
    let a = (Instant::now(), rows_done(&db, "c"));
    std::thread::sleep(Duration::from_secs(2));
    let rate = (rows_done(&db, "c") - a.1) as f64 / a.0.elapsed().as_secs_f64();
    assert!(
        rate <= 40.0 * 1.1 + 25.0,
        "{rate:.0} rows/s after set --rows-per-second 40"
    );

    db.run(&["set", "c", "--pause", "5ms", "--target-chunk-time", "200ms"])
        .expect(0);
    let status = db.run(&["status", "c"]);
    assert!(
        status.stdout.contains("rows_per_second = 40")
            && status.stdout.contains("pause = 5ms")
            && status.stdout.contains("target_chunk_time = 200ms")
            && status.stdout.contains("chunk size"),
        "{status:?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&db.run(&["status", "c", "--json"]).stdout).unwrap();
    assert_eq!(json["controls"]["rows_per_second"], 40, "{json}");
    assert_eq!(json["controls"]["pause_ms"], 5, "{json}");

    let out = db.run(&["cancel", "c"]);
    out.expect(0);
    let out = wait_out(child, Duration::from_secs(30));
    assert_eq!(out.code, 130, "{out:?}");
    assert!(
        out.stderr
            .contains("c: cancelled; the next run resumes after key")
            && !out.stderr.contains("error:")
            && out.stderr.contains("new settings from `backfill set`"),
        "{out:?}"
    );
    assert_eq!(
        db.text("SELECT state FROM backfill.checkpoints WHERE job = 'c'")
            .as_deref(),
        Some("cancelled")
    );
    let done = rows_done(&db, "c");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n = 1"), done);

    let out = db.run(&["resume", "c"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("backfill run c"), "{out:?}");
    db.run(&["set", "c", "--clear"]).expect(0);
    db.run(&["run", "c"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn replication_lag_on_a_real_standby_holds_the_run() {
    let primary = TempCluster::start().expect("a throwaway PostgreSQL");
    let standby = primary
        .start_standby()
        .expect("a streaming standby (pg_basebackup -R)");
    let db = polled_db(TestDb::on(&primary.url("postgres"), "lag"));
    let replica = TestDb::on(&standby.url("postgres"), "replica");
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0); INSERT INTO t (id) SELECT generate_series(1, 4000);");
    db.write_job(
        "g",
        &job(
            "FROM (SELECT pg_sleep(0.02)) s",
            "target_chunk_time = \"0s\"\nmax_replication_lag = \"1s\"\ncheck_interval = \"200ms\"\n",
        )
        // About 4 s of chunks: the stall must outlast the 1 s threshold well before the end.
        .replace("chunk_rows = 100", "chunk_rows = 20"),
    );
    let child = db.spawn(&["run", "g"]);
    db.wait_for(
        "SELECT coalesce((SELECT rows_done >= 500 FROM backfill.progress WHERE job = 'g'), false)",
        Duration::from_secs(30),
    );
    replica.exec("SELECT pg_wal_replay_pause()");
    assert_held(&db, "g", "replication lag");
    replica.exec("SELECT pg_wal_replay_resume()");
    let out = wait_out(child, Duration::from_secs(90));
    out.expect(0);
    assert!(
        out.stderr.contains("holding: replication lag")
            && out.stderr.contains("max_replication_lag 1s"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn a_wal_rate_above_the_budget_holds_the_run() {
    // A private cluster: the WAL rate is server-wide, and other tests write plenty.
    let cluster = TempCluster::start().expect("a throwaway PostgreSQL");
    let db = TestDb::on(&cluster.url("postgres"), "wal");
    counter_table(&db, 3000);
    db.write_job(
        "w",
        &job(
            "FROM (SELECT pg_sleep(0.01)) s",
            "target_chunk_time = \"0s\"\nmax_wal_rate = \"1kB\"\ncheck_interval = \"200ms\"\n",
        ),
    );
    let out = db.run(&["run", "w"]);
    out.expect(0);
    assert!(
        out.stderr.contains("holding: WAL rate") && out.stderr.contains("no longer held"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn a_job_paused_before_its_run_starts_writes_nothing_until_resumed() {
    let db = polled_db(TestDb::new());
    counter_table(&db, 1000);
    db.write_job("q", &job("", "target_chunk_time = \"0s\"\n"));
    let out = db.run(&["pause", "q"]);
    out.expect(0);
    assert!(out.stdout.contains("will start held"), "{out:?}");
    let child = db.spawn(&["run", "q"]);
    // Held from the start: the controls are read before the first chunk, not after it.
    assert_held(&db, "q", "paused by `backfill pause`");
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n <> 0"),
        0,
        "a paused job must write nothing"
    );
    assert_eq!(rows_done(&db, "q"), 0);
    db.run(&["resume", "q"]).expect(0);
    let out = wait_out(child, Duration::from_secs(60));
    out.expect(0);
    assert!(out.stderr.contains("holding: paused"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn a_cancel_in_force_when_a_run_starts_is_honoured_before_any_write() {
    let db = polled_db(TestDb::new());
    counter_table(&db, 1000);
    db.write_job("z", &job("", "target_chunk_time = \"0s\"\n"));
    // A first runner, held by a pause from its start, then frozen: its lease stays alive (for
    // 30 s), so a cancel is accepted and is still in force when a second runner joins.
    db.run(&["pause", "z"]).expect(0);
    let first = db.spawn(&["run", "z"]);
    assert_held(&db, "z", "paused by `backfill pause`");
    signal(&first, libc::SIGSTOP);
    db.run(&["cancel", "z"]).expect(0);
    db.run(&["resume", "z"]).expect(0);
    let second = wait_out(db.spawn(&["run", "z"]), Duration::from_secs(30));
    assert_eq!(second.code, 130, "{second:?}");
    assert!(
        second.stderr.contains("z: cancelled; the next run") && !second.stderr.contains("error:"),
        "{second:?}"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n <> 0"),
        0,
        "a cancelled job must write nothing: {second:?}"
    );
    signal(&first, libc::SIGCONT);
    let first = wait_out(first, Duration::from_secs(30));
    assert_eq!(first.code, 130, "{first:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);
    assert_eq!(rows_done(&db, "z"), 0);
    // The cancel was for those runs: the next one goes to the end.
    db.run(&["run", "z"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

/// Two processes on one job share its rate ceiling (each takes its part of it while both are
/// alive): together they take at least as long as one process alone at the ceiling would.
#[test]
fn two_processes_share_the_jobs_rate_ceiling() {
    let db = polled_db(TestDb::new());
    counter_table(&db, 4000);
    db.write_job("s", &job("", "rows_per_second = 400\n"));
    let t = Instant::now();
    let first = db.spawn(&["run", "s"]);
    let second = db.spawn(&["run", "s"]);
    wait_out(first, Duration::from_secs(120)).expect(0);
    wait_out(second, Duration::from_secs(120)).expect(0);
    let took = t.elapsed();
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    // Both worked.
    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.runs WHERE job = 's' AND rows_done > 0"),
        2
    );
    // Shared: 4000 keys at 400 a second, less each process's first second of burst, is 8 s;
    // each at the full ceiling would have taken 4 s.
    assert!(took >= Duration::from_millis(7500), "{took:?}");
}

/// The rate ceiling holds from the first second: the bucket starts empty, so no window from the
/// start sees more than the ceiling (a full bucket let the first second run at twice it).
#[test]
fn the_rate_ceiling_holds_from_the_first_second() {
    let db = polled_db(TestDb::new());
    const RATE: f64 = 1000.0;
    counter_table(&db, 3000);
    db.write_job("f", &job("", "rows_per_second = 1000\n"));
    let t = Instant::now();
    let child = db.spawn(&["run", "f"]);
    let mut samples = Vec::new();
    while samples.last().is_none_or(|(_, n)| *n < 3000) {
        samples.push((t.elapsed(), rows_done(&db, "f")));
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(25));
    }
    wait_out(child, Duration::from_secs(30)).expect(0);
    for (at, n) in &samples {
        let ceiling = 1.1 * RATE * at.as_secs_f64();
        assert!(
            *n as f64 <= ceiling,
            "{n} rows after {at:?}: more than the ceiling allows"
        );
    }
    // 3,000 keys at 1,000 a second from an empty bucket: the last chunk is admitted at 3 s.
    let took = samples.last().unwrap().0;
    assert!(took >= Duration::from_millis(2700), "{took:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}
