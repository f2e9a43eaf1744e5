//! Faults made for real: the server restarted mid-run (several times), the engine's sessions
//! terminated, rows that make the statement fail (stop and skip), a deadlock, a read-only server,
//! a missing privilege, a dropped table, a statement timeout. Jobs are non-idempotent (n = n + 1),
//! so a chunk applied twice or skipped shows.

use crate::support::*;
use backfill::db::Target;
use backfill::pgtemp::TempCluster;
use std::time::{Duration, Instant};

fn slow_job(sleep: &str, chunk: u32, extra: &str) -> String {
    format!(
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = {chunk}\n\
         sql = \"UPDATE t SET n = n + 1 FROM (SELECT pg_sleep({sleep})) s WHERE id BETWEEN :start AND :end\"\n\
         verify = \"SELECT count(*) FROM t WHERE n = 0\"\n\
         throttle = {{ target_chunk_time = \"0s\" }}\n{extra}"
    )
}

fn query_i64(url: &str, sql: &str) -> Option<i64> {
    block_on(async {
        let c = Target::resolve(Some(url)).ok()?.connect().await.ok()?;
        c.query_one(sql, &[]).await.ok().map(|r| r.get(0))
    })
}

#[test]
fn server_restarts_mid_run_and_every_row_is_applied_exactly_once() {
    // Its own server: restarting the shared one would disturb the other tests.
    let mut cluster = TempCluster::start().expect("a throwaway PostgreSQL");
    let url = cluster.url("postgres");
    block_on(async {
        let c = Target::resolve(Some(&url))
            .unwrap()
            .connect()
            .await
            .unwrap();
        c.batch_execute(
            "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
             INSERT INTO t (id) SELECT g * 3 FROM generate_series(1, 4000) g;",
        )
        .await
        .unwrap();
    });
    let jobs = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("jobs-restart-{}", std::process::id()));
    std::fs::create_dir_all(&jobs).unwrap();
    std::fs::write(jobs.join("r.toml"), slow_job("0.01", 20, "")).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_backfill"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") || k == "DATABASE_URL" {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .args(["--database-url", &url, "--jobs"])
        .arg(&jobs)
        .args(["run", "r", "--reconnect-for", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let done = || {
        query_i64(
            &url,
            "SELECT coalesce((SELECT rows_done FROM backfill.progress WHERE job = 'r'), 0)",
        )
    };
    let mut recoveries = Vec::new();
    for restart in 0..4 {
        let before = done().unwrap_or(0);
        let t = Instant::now();
        while done().unwrap_or(0) < before + 200 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no progress before restart {restart}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..150)));
        cluster
            .restart(Duration::from_millis(fastrand::u64(200..1500)))
            .unwrap();
        let up = Instant::now();
        let at = done().unwrap();
        while done().unwrap_or(0) <= at {
            assert!(
                up.elapsed() < Duration::from_secs(60),
                "no progress after restart {restart}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        recoveries.push(up.elapsed());
    }
    let out = wait_out(child, Duration::from_secs(180));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("waiting for it to come back"),
        "{out:?}"
    );
    assert_eq!(
        query_i64(&url, "SELECT count(*) FROM t WHERE n <> 1"),
        Some(0),
        "every row exactly once after 4 restarts: {out:?}"
    );
    assert_eq!(
        query_i64(
            &url,
            "SELECT rows_done FROM backfill.progress WHERE job = 'r'"
        ),
        Some(4000)
    );
    eprintln!("restart test: 4 restarts; first commit after the server was back: {recoveries:?}");
    let _ = std::fs::remove_dir_all(&jobs);
    cluster.stop().unwrap();
}

#[test]
fn terminated_sessions_are_reopened_and_the_run_goes_on() {
    let db = TestDb::new();
    counter_table(&db, 3000);
    db.write_job("x", &slow_job("0.01", 20, ""));
    // The application holds a row near the end, so the run cannot finish before each check.
    let held = hold_row(&db, "t", "id", 2900);
    let child = db.spawn(&["run", "x"]);
    for round in 0..3 {
        let target = 300 * (round + 1);
        db.wait_for(
            &format!("SELECT coalesce((SELECT rows_done >= {target} FROM backfill.progress WHERE job = 'x'), false)"),
            Duration::from_secs(60),
        );
        // Both the chunk session and the lease session.
        let pids = db
            .text(
                "SELECT string_agg(pid::text, ',') FROM pg_stat_activity
                  WHERE application_name = 'backfill' AND datname = current_database() AND pid <> pg_backend_pid()",
            )
            .expect("the run's sessions");
        db.exec(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid IN ({pids})"
        ));
        // The lease is held again on a live session of its own (not one of those terminated),
        // and the heartbeat goes on.
        db.wait_for(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM backfill.runs r JOIN pg_stat_activity a ON a.pid = r.backend_pid
                                 WHERE r.job = 'x' AND r.outcome IS NULL AND r.backend_pid NOT IN ({pids})
                                   AND a.backend_start = r.backend_start)"
            ),
            Duration::from_secs(30),
        );
    }
    held.exec("ROLLBACK");
    let out = wait_out(child, Duration::from_secs(120));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("lost the database while"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0, "{out:?}");
    assert_eq!(
        db.text("SELECT state FROM backfill.checkpoints WHERE job = 'x'")
            .as_deref(),
        Some("done")
    );
}

const BOOM: &str = "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN IF NEW.id IN (301, 901) THEN RAISE EXCEPTION 'bad row %', NEW.id; END IF; RETURN NEW; END $$;
    CREATE TRIGGER boom BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION boom();";

#[test]
fn a_poison_row_stops_the_run_at_its_exact_key() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    db.exec(BOOM);
    db.write_job("p", &counter_job(""));
    let out = db.run(&["run", "p"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("key 301 makes the statement fail")
            && out.stderr.contains("P0001")
            && out.stderr.contains("bad row 301"),
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n = 1"),
        db.i64("SELECT count(*) FROM t WHERE id < 301")
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n > 1"), 0);
    // Fixed, the next run resumes at that key.
    db.exec("DROP TRIGGER boom ON t");
    db.run(&["run", "p"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    db.run(&["gate", "p"]).expect(0);
}

#[test]
fn poison_rows_are_skipped_recorded_retried_and_gate_the_job() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    db.exec(BOOM);
    db.write_job("s", &counter_job("on_error = \"skip\"\n"));
    let out = db.run(&["run", "s"]);
    // verify still counts the two rows, so the pass ends incomplete.
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("skipped key 301") && out.stderr.contains("skipped key 901"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 2);
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n = 0 AND id IN (301, 901)"),
        2
    );
    let out = db.run(&["failures", "s", "--json"]);
    let f: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(f.as_array().unwrap().len(), 2, "{out:?}");
    assert_eq!(f[0]["key"][0], "301");
    assert_eq!(f[1]["key"][0], "901");
    assert_eq!(f[0]["sqlstate"], "P0001");
    let out = db.run(&["gate", "s"]);
    assert_eq!(out.code, 3, "{out:?}");

    // Still broken: retrying changes nothing and says so.
    let out = db.run(&["retry-failures", "s"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout
            .contains("0 failing keys now succeed, 2 still fail"),
        "{out:?}"
    );
    db.exec("DROP TRIGGER boom ON t");
    db.run(&["retry-failures", "s"]).expect(0);
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n <> 1"),
        0,
        "each key exactly once"
    );
    let out = db.run(&["retry-failures", "s"]);
    out.expect(0);
    assert!(
        out.stdout
            .contains("0 failing keys now succeed, 0 still fail"),
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n <> 1"),
        0,
        "a resolved key is not retried again"
    );
    let out = db.run(&["failures", "s", "--all", "--json"]);
    let f: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(
        f.as_array()
            .unwrap()
            .iter()
            .all(|x| x["resolved_at"].is_string()),
        "{out:?}"
    );
    // The pass ended incomplete; with the rows fixed, a fresh pass confirms and the gate opens.
    db.run(&["reset", "s", "--yes"]).expect(0);
    db.write_job(
        "s",
        &counter_job("on_error = \"skip\"\n").replace("n = n + 1", "n = 1"),
    );
    db.run(&["run", "s"]).expect(0);
    db.run(&["gate", "s"]).expect(0);
}

#[test]
fn a_deadlock_with_the_application_is_retried() {
    let db = TestDb::new();
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0); INSERT INTO t (id) SELECT generate_series(1, 1000);");
    db.write_job("d", &counter_job("lock_timeout = \"10s\"\n"));
    let app = db.session();
    app.exec("BEGIN; SET LOCAL deadlock_timeout = '10s'; UPDATE t SET n = n WHERE id = 950;");
    let child = db.spawn(&["run", "d"]);
    db.wait_for(&engine_lock_waits(1), Duration::from_secs(30));
    // The engine holds 901..949 and waits for 950; the application now waits for 920: a cycle.
    // The engine's session detects it first (its deadlock_timeout is 1 s) and is the victim.
    app.exec("UPDATE t SET n = n WHERE id = 920");
    app.exec("COMMIT");
    let out = wait_out(child, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("40P01") && out.stderr.contains("retrying"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn a_statement_timeout_shrinks_the_chunk_instead_of_failing() {
    let db = TestDb::new();
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0); INSERT INTO t (id) SELECT generate_series(1, 1000);");
    // Any chunk wider than 100 ids takes 2 s; the statement timeout is 500 ms.
    db.write_job(
        "w",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 400\nstatement_timeout = \"500ms\"\n\
         sql = \"UPDATE t SET n = n + 1 FROM (SELECT pg_sleep(CASE WHEN :end::bigint - :start::bigint >= 100 THEN 2 ELSE 0 END)) s WHERE id BETWEEN :start AND :end\"\n",
    );
    let out = db.run(&["run", "w"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("57014") && out.stderr.contains("retrying in chunks of 100"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn hard_failures_stop_with_the_reason_and_keep_progress() {
    let db = TestDb::new();
    counter_table(&db, 3000);

    // A read-only server (e.g. the old primary after a failover), noticed mid-run.
    db.write_job("ro", &slow_job("0.01", 20, ""));
    let child = db.spawn(&["run", "ro"]);
    db.wait_for(
        "SELECT coalesce((SELECT rows_done >= 200 FROM backfill.progress WHERE job = 'ro'), false)",
        Duration::from_secs(60),
    );
    db.exec(&format!(
        "ALTER DATABASE {} SET default_transaction_read_only = on",
        db.name
    ));
    db.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'backfill' AND datname = current_database() AND pid <> pg_backend_pid()");
    let out = wait_out(child, Duration::from_secs(60));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("25006") && out.stderr.contains("read-only"),
        "{out:?}"
    );
    let done = db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'ro'");
    assert!(done >= 200);
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n = 1"),
        done,
        "progress kept, consistent"
    );
    db.exec(&format!(
        "ALTER DATABASE {} RESET default_transaction_read_only",
        db.name
    ));
    db.run(&["run", "ro"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);

    // Permission denied on the application table.
    db.exec("CREATE ROLE bf_ro_role LOGIN; GRANT SELECT ON t TO bf_ro_role;");
    db.run(&["init", "--grant-to", "bf_ro_role"]).expect(0);
    db.write_job("perm", &counter_job(""));
    let out = Out::from(
        db.cmd_at(&db.url_as("bf_ro_role"), &["run", "perm"])
            .output()
            .unwrap(),
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("42501") && out.stderr.contains("grant"),
        "{out:?}"
    );
    db.exec("DROP OWNED BY bf_ro_role; DROP ROLE bf_ro_role");

    // The table dropped while the job runs.
    db.exec("CREATE TABLE t2 (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0); INSERT INTO t2 (id) SELECT generate_series(1, 3000);");
    db.write_job(
        "gone",
        &slow_job("0.01", 20, "")
            .replace("\"t\"", "\"t2\"")
            .replace("UPDATE t ", "UPDATE t2 ")
            .replace("FROM t ", "FROM t2 "),
    );
    let child = db.spawn(&["run", "gone"]);
    db.wait_for("SELECT coalesce((SELECT rows_done >= 100 FROM backfill.progress WHERE job = 'gone'), false)", Duration::from_secs(60));
    db.exec("DROP TABLE t2");
    let out = wait_out(child, Duration::from_secs(60));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("does not exist"), "{out:?}");
    assert_eq!(
        db.text("SELECT state FROM backfill.checkpoints WHERE job = 'gone'")
            .as_deref(),
        Some("failed")
    );
    assert!(db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'gone'") >= 100);
}

/// A statement that ignores `:end` writes every row after the chunk's start: the first chunk's
/// check (rows of the job's table written vs the chunk's keys) stops the run with nothing
/// committed. Statements that write more rows than keys to *other* tables go on.
#[test]
fn a_statement_that_writes_outside_its_chunk_stops_the_run() {
    let db = TestDb::new();
    counter_table(&db, 3000);
    db.write_job(
        "runaway",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"UPDATE t SET n = n + 1 WHERE id >= :start AND :end IS NOT NULL\"\n\
         throttle = { target_chunk_time = \"0s\" }\n",
    );
    let out = db.run(&["run", "runaway"]);
    assert_eq!(out.code, 1, "{out:?}");
    for part in [
        "job runaway",
        "the statement wrote 3000 rows of t, but the chunk holds 100 keys",
        "outside :start..:end",
        "nothing of this chunk was committed",
    ] {
        assert!(out.stderr.contains(part), "{part}: {out:?}");
    }
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'runaway'"),
        0
    );

    // The page walk is checked the same way.
    db.write_job(
        "pages",
        "table = \"t\"\nkey = \"ctid\"\nchunk_rows = 100\n\
         sql = \"UPDATE t SET n = 1 WHERE ctid >= :start AND :end IS NOT NULL AND n = 0\"\n\
         throttle = { target_chunk_time = \"0s\" }\n",
    );
    let out = db.run(&["run", "pages"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("outside :start..:end"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);

    // Two rows of another table per key, and a trigger-free update of another table: fine.
    db.exec("CREATE TABLE audit (id bigint, copy int)");
    db.write_job(
        "fanout",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"INSERT INTO audit SELECT id, c FROM t, generate_series(1, 2) c WHERE id BETWEEN :start AND :end\"\n\
         throttle = { target_chunk_time = \"0s\" }\n",
    );
    db.run(&["run", "fanout"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM audit"), 6000);

    // Rows written inside the chunk's bounds are the chunk's, however many: filling the gaps
    // between its keys writes 9 rows per key, all in range (the gaps between chunks stay).
    db.exec("CREATE TABLE g (id bigint PRIMARY KEY); INSERT INTO g SELECT 10 * x FROM generate_series(1, 1000) x;");
    db.write_job(
        "gaps",
        "table = \"g\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"INSERT INTO g SELECT x FROM generate_series(:start, :end) x ON CONFLICT DO NOTHING\"\n\
         throttle = { target_chunk_time = \"0s\" }\n",
    );
    db.run(&["run", "gaps"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM g"), 10_000 - 9 - 9 * 9);
}

#[test]
fn sigterm_while_the_database_is_away_exits_130_at_once_and_the_next_run_resumes() {
    use std::io::BufRead;
    // Its own server: it is taken down while the run waits for it.
    let mut cluster = TempCluster::start().expect("a throwaway PostgreSQL");
    let url = cluster.url("postgres");
    let db = TestDb::on(&url, "away");
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT g * 3 FROM generate_series(1, 3000) g;",
    );
    db.write_job("a", &slow_job("0.05", 20, ""));
    // The default --reconnect-for (5 minutes): a stop must not wait for it.
    let mut child = db
        .cmd(&["run", "a"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    db.wait_for(
        "SELECT coalesce((SELECT rows_done >= 200 FROM backfill.progress WHERE job = 'a'), false)",
        Duration::from_secs(60),
    );
    drop(db); // its session would only be cut off
    cluster.shut_down();
    let mut seen = Vec::new();
    let t = Instant::now();
    while !seen
        .iter()
        .any(|l: &String| l.contains("waiting for it to come back"))
    {
        let left = Duration::from_secs(30).saturating_sub(t.elapsed());
        match lines.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("the run never noticed the database was gone: {seen:#?}"),
        }
    }
    signal(&child, libc::SIGTERM);
    let stopped = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if stopped.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            cluster.start_again().unwrap();
            panic!("SIGTERM while the database is away: no exit after 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = stopped.elapsed();
    reader.join().unwrap();
    seen.extend(lines.try_iter());
    let stderr = seen.join("\n");
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(
        took < Duration::from_secs(10),
        "exit took {took:?}: {stderr}"
    );
    assert!(
        stderr.contains("stopped while the database is unreachable")
            && stderr.contains("resumes after key"),
        "{stderr}"
    );
    let after_stop = &stderr[stderr.find("SIGTERM received").expect("logged")..];
    assert!(
        !after_stop.contains("waiting for"),
        "no wait after the stop: {stderr}"
    );
    // Back again: the next run takes over at the last committed key; every row exactly once.
    cluster.start_again().unwrap();
    let db = TestDb::on(&url, "away");
    db.write_job("a", &slow_job("0.05", 20, ""));
    let out = db.run(&["run", "a", "--chunk-rows", "500"]);
    out.expect(0);
    assert!(out.stderr.contains("resuming after key"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0, "{out:?}");
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'a'"),
        3000
    );
    drop(db);
    cluster.stop().unwrap();
}

/// One key whose statement always outlasts `statement_timeout`: the chunk is halved down to that
/// key, which is then tried `--max-attempts` times in a row before the run stops, saying so and
/// where it resumes; every key before it is done exactly once.
#[test]
fn a_key_that_keeps_timing_out_stops_the_run_after_max_attempts() {
    let db = TestDb::new();
    counter_table(&db, 400);
    let stuck = db.i64("SELECT id FROM t ORDER BY id OFFSET 250 LIMIT 1");
    db.write_job(
        "to",
        &format!(
            "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\nstatement_timeout = \"300ms\"\n\
             sql = \"UPDATE t SET n = n + 1 WHERE id BETWEEN :start AND :end AND (id <> {stuck} OR pg_sleep(2) IS NOT NULL)\"\n\
             throttle = {{ target_chunk_time = \"0s\" }}\n"
        ),
    );
    let out = db.run(&["run", "to", "--max-attempts", "2"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("gave up after 2 attempts")
            && out.stderr.contains(&format!("key {stuck}"))
            && out.stderr.contains("57014"),
        "{out:?}"
    );
    // Every key before the stuck one is done once; none after it or at it.
    assert_eq!(
        db.i64(&format!(
            "SELECT count(*) FROM t WHERE id < {stuck} AND n <> 1"
        )),
        0
    );
    assert_eq!(
        db.i64(&format!(
            "SELECT count(*) FROM t WHERE id >= {stuck} AND n <> 0"
        )),
        0
    );
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'to'"),
        250
    );
}

/// The cell under `column` in `line` of a table whose header is `header` (columns line up).
fn cell<'a>(header: &str, line: &'a str, column: &str, next: Option<&str>) -> &'a str {
    let from = header.find(column).unwrap_or_else(|| panic!("{header}"));
    let to = next.map_or(line.len(), |n| header.find(n).unwrap());
    line.get(from..to.min(line.len())).unwrap_or("").trim()
}

#[test]
fn list_history_and_failures_print_header_rows_and_history_keeps_the_error_apart() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    db.exec(BOOM);
    db.write_job("p", &counter_job(""));
    db.write_job("s", &counter_job("on_error = \"skip\"\n"));
    assert_eq!(db.run(&["run", "p"]).code, 1);
    assert_eq!(db.run(&["run", "s"]).code, 1);

    let out = db.run(&["list"]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0]
            .split_whitespace()
            .eq(["JOB", "STATE", "TABLE", "DESCRIPTION"]),
        "{out:?}"
    );
    assert_eq!(cell(lines[0], lines[1], "JOB", Some("STATE")), "p");
    assert_eq!(cell(lines[0], lines[1], "TABLE", Some("DESCRIPTION")), "t");

    let out = db.run(&["history", "p"]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0]
            .split_whitespace()
            .eq(["RUN", "STARTED", "ENDED", "HOST", "PID", "ROWS", "CHUNKS", "OUTCOME", "ERROR"]),
        "{out:?}"
    );
    assert_eq!(lines.len(), 2, "{out:?}");
    assert_eq!(
        cell(lines[0], lines[1], "OUTCOME", Some("ERROR")),
        "failed",
        "{out:?}"
    );
    assert!(
        cell(lines[0], lines[1], "ERROR", None).contains("key 301"),
        "{out:?}"
    );

    let out = db.run(&["failures", "s"]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].split_whitespace().eq([
            "KEY",
            "SQLSTATE",
            "ATTEMPTS",
            "LAST_SEEN",
            "RESOLVED",
            "ERROR"
        ]),
        "{out:?}"
    );
    assert_eq!(lines.len(), 3, "{out:?}");
    assert_eq!(cell(lines[0], lines[1], "KEY", Some("SQLSTATE")), "301");
    assert_eq!(
        cell(lines[0], lines[1], "SQLSTATE", Some("ATTEMPTS")),
        "P0001"
    );
    assert!(cell(lines[0], lines[1], "ERROR", None).contains("bad row 301"));

    // Every --json flag says what it does.
    for command in [
        "status", "list", "gate", "plan", "history", "failures", "run",
    ] {
        let help = db.run(&[command, "--help"]).stdout;
        // The description follows the flag, on its line or the next (a wide help wraps).
        let after = help.split("--json").nth(1).unwrap();
        let described = after.split("\n      -").next().unwrap();
        assert!(described.contains("JSON"), "{command}: {help}");
    }
    let help = db.run(&["failures", "--help"]).stdout;
    assert!(
        help.contains("on_error = \"stop\") records none here"),
        "{help}"
    );
}
