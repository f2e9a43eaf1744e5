//! The operator's path: run, status, list, gate, reset, init for a least-privilege role, the demo.

use crate::support::*;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn run_status_gate_and_reset() {
    let db = TestDb::new();
    counter_table(&db, 1000);
    db.write_job(
        "j",
        &format!("description = \"count up\"\n{}", counter_job("")),
    );

    let out = db.run(&["gate", "j"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stdout.contains("never run"), "{out:?}");

    let out = db.run(&["run", "j", "--json"]);
    out.expect(0);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "done");
    assert_eq!(report["rows"], 1000);
    assert_eq!(report["chunks"], 10);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);

    // Running a done job again does nothing.
    let out = db.run(&["run", "j"]);
    out.expect(0);
    assert!(out.stderr.contains("already done"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);

    let out = db.run(&["status", "j", "--json"]);
    out.expect(0);
    let s: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(s["state"], "done");
    // Against the table, not the engine's own bookkeeping: every key visited once.
    assert_eq!(
        s["checkpoint"]["rows_done"],
        db.i64("SELECT count(*) FROM t")
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n = 1"), 1000);
    assert_eq!(s["checkpoint"]["chunks_done"], 10);
    assert_eq!(s["checkpoint"]["verify_remaining"], 0);
    let max_id = db.text("SELECT max(id)::text FROM t").unwrap();
    assert_eq!(s["checkpoint"]["cursor"][0], max_id.as_str());
    let out = db.run(&["status"]);
    out.expect(0);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("j ") && l.contains("done")),
        "{out:?}"
    );
    let out = db.run(&["status", "j"]);
    assert!(
        out.stdout.contains("count up")
            && out.stdout.contains(&format!("cursor             {max_id}")),
        "{out:?}"
    );
    let out = db.run(&["list", "--json"]);
    let l: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(l[0]["job"], "j");
    assert_eq!(l[0]["state"], "done");
    assert_eq!(l[0]["valid"], true);

    db.run(&["gate", "j"]).expect(0);
    // A row the pass did not fix (written behind the cursor) fails the gate again.
    db.exec("INSERT INTO t (id, n) VALUES (-5, 0)");
    let out = db.run(&["gate", "j", "--json"]);
    assert_eq!(out.code, 3, "{out:?}");
    let g: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(g["verify_remaining"], 1);
    assert_eq!(g["passed"], false);

    let out = db.run(&["reset", "j"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--yes"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM backfill.checkpoints"), 1);
    db.run(&["reset", "j", "--yes"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM backfill.checkpoints"), 0);
    db.run(&["run", "j"]).expect(0);
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n <> 2 AND id > 0"),
        0,
        "a reset job runs from the start"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.runs WHERE job = 'j'"),
        2,
        "history is kept across resets"
    );
}

#[test]
fn a_least_privilege_role_can_run_after_init() {
    let db = TestDb::new();
    counter_table(&db, 300);
    db.exec("CREATE ROLE bf_app_role LOGIN; GRANT SELECT, UPDATE ON t TO bf_app_role;");
    db.write_job("j", &counter_job(""));
    let app_url = db.url_as("bf_app_role");
    let as_app = |args: &[&str]| Out::from(db.cmd_at(&app_url, args).output().unwrap());
    // Without the engine's schema, the role cannot create it: the error says what to do.
    db.exec(&format!(
        "REVOKE CREATE ON DATABASE {} FROM PUBLIC",
        db.name
    ));
    let out = as_app(&["run", "j"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("backfill init"), "{out:?}");
    db.run(&["init", "--grant-to", "bf_app_role"]).expect(0);
    as_app(&["run", "j"]).expect(0);
    as_app(&["status", "j"]).expect(0);
    as_app(&["gate", "j"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    db.exec("DROP OWNED BY bf_app_role; DROP ROLE bf_app_role");
}

/// Connection strings that never reach a server (nothing listening, a bad port): the errors
/// about them name no password. Against a server that checks passwords: `secrets.rs`.
#[test]
fn passwords_never_appear_in_output() {
    let db = TestDb::new();
    db.write_job("j", &counter_job(""));
    for url in [
        "postgresql://app:s3cr3t-pw@127.0.0.1:1/app?connect_timeout=2",
        "postgresql://app:s3cr3t-pw@127.0.0.1:notaport/app",
        "host=127.0.0.1 port=1 user=app password=s3cr3t-pw connect_timeout=2",
    ] {
        for args in [
            vec!["run", "j"],
            vec!["status"],
            vec!["gate", "j"],
            vec!["list"],
        ] {
            let out = Out::from(db.cmd_at(url, &args).output().unwrap());
            assert!(
                !out.stdout.contains("s3cr3t") && !out.stderr.contains("s3cr3t"),
                "{args:?}: {out:?}"
            );
            if args[0] != "list" {
                assert_ne!(out.code, 0, "{out:?}");
            }
        }
    }
}

#[test]
fn terminates_under_constant_inserts() {
    let db = TestDb::new();
    counter_table(&db, 3000);
    db.write_job(
        "j",
        &counter_job("").replace("chunk_rows = 100", "chunk_rows = 50"),
    );
    let writer = db.session();
    let child = db.spawn(&["run", "j"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut inserted = 0;
        while !s.load(std::sync::atomic::Ordering::SeqCst) {
            writer.exec("INSERT INTO t (id) SELECT coalesce(max(id), 0) + 1 FROM t");
            inserted += 1;
        }
        inserted
    });
    let out = wait_out(child, Duration::from_secs(120));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let inserted = handle.join().unwrap();
    // Rows beyond the bound taken at the start are left to the application, and verify sees them;
    // this statement (n = n + 1) must not be applied twice, so no sweep may run.
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("not swept") && out.stderr.contains("changed"),
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT sweeps::bigint FROM backfill.checkpoints WHERE job = 'j'"),
        0
    );
    assert!(inserted > 0);
    let upper = db
        .text("SELECT upper_bound[1] FROM backfill.checkpoints WHERE job = 'j'")
        .unwrap();
    assert_eq!(
        db.i64(&format!(
            "SELECT count(*) FROM t WHERE id <= {upper} AND n <> 1"
        )),
        0
    );
    assert_eq!(
        db.i64(&format!(
            "SELECT count(*) FROM t WHERE id > {upper} AND n <> 0"
        )),
        0
    );
    assert_eq!(
        db.text("SELECT state FROM backfill.checkpoints WHERE job = 'j'")
            .as_deref(),
        Some("incomplete")
    );
    assert_eq!(db.run(&["gate", "j"]).code, 3);
}

#[test]
fn demo_runs_on_its_own_throwaway_server_and_cleans_up() {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_backfill"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") || k == "DATABASE_URL" || k.starts_with("BACKFILL_") {
            c.env_remove(k);
        }
    }
    let out = Out::from(
        c.args(["--jobs", "/nonexistent-jobs", "demo", "--rows", "20000"])
            .output()
            .unwrap(),
    );
    out.expect(0);
    assert!(
        out.stdout.contains("state done, 20000 rows done"),
        "{out:?}"
    );
    // It ends with what to try next: status, plan, a job of one's own.
    let next = out
        .stdout
        .split("\nnext:\n")
        .nth(1)
        .expect("a `next:` block");
    assert!(
        next.contains("backfill status orders_status")
            && next.contains("backfill plan orders_status")
            && next.contains("a job of your own: jobs/NAME.toml")
            && next.contains("--database-url"),
        "{out:?}"
    );
    let dir = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("demo: PostgreSQL running in "))
        .and_then(|l| l.split(' ').next())
        .expect("demo names its server directory");
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}

#[test]
fn demo_uses_a_given_database() {
    let db = TestDb::new();
    let out = db.run(&["demo", "--rows", "5000"]);
    out.expect(0);
    assert!(out.stderr.contains("creating table orders"), "{out:?}");
    assert_eq!(
        db.i64("SELECT count(*) FROM orders WHERE status IS NULL"),
        0
    );
    assert_eq!(db.i64("SELECT count(*) FROM orders"), 5000);
    assert!(
        out.stdout
            .contains("\nnext:\n  backfill status orders_status")
            && !out.stdout.contains("throwaway server is gone"),
        "{out:?}"
    );
    let out = db.run(&["demo", "--rows", "5000"]);
    out.expect(0);
    assert!(out.stderr.contains("already exists"), "{out:?}");
}

/// Runs the binary with stdout (or stderr) a pipe whose reader is already gone, so that every
/// write to it fails with EPIPE, as for `backfill status | head -1` once `head` has its line.
fn with_closed(db: &TestDb, args: &[&str], close_stderr: bool) -> Out {
    let mut fds = [0; 2];
    // SAFETY: pipe() fills both descriptors, each then owned exactly once.
    let writer = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0, "pipe()");
        libc::close(fds[0]);
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1])
    };
    let mut cmd = db.cmd(args);
    if close_stderr {
        cmd.stdout(Stdio::piped()).stderr(writer);
    } else {
        cmd.stdout(writer).stderr(Stdio::piped());
    }
    let child = cmd.spawn().unwrap();
    drop(cmd);
    wait_out(child, Duration::from_secs(60))
}

#[test]
fn a_closed_stdout_is_a_normal_end_for_every_command() {
    let db = TestDb::new();
    counter_table(&db, 300);
    for name in ["a", "b", "c", "j"] {
        db.write_job(name, &counter_job(""));
    }
    db.run(&["run", "j"]).expect(0);
    let commands: &[&[&str]] = &[
        &["status"],
        &["status", "--json"],
        &["status", "j"],
        &["status", "j", "--json"],
        &["list"],
        &["list", "--json"],
        &["check"],
        &["check", "j"],
        &["history", "j"],
        &["history", "j", "--json"],
        &["failures", "j", "--all"],
        &["failures", "j", "--json"],
        &["gate", "j"],
        &["gate", "j", "--json"],
        &["gate", "a"],
        &["plan", "a"],
        &["plan", "a", "--json"],
        &["run", "j", "--json"],
        &["pause", "a"],
        &["resume", "a"],
        &["set", "a", "--rows-per-second", "5"],
        &["set", "a", "--clear"],
        &["init"],
    ];
    for args in commands {
        // The same command with stdout open gives the exit code to expect.
        let normal = db.run(args);
        assert!(
            !normal.stderr.contains("panicked") && normal.code != 101,
            "{args:?}: {normal:?}"
        );
        let closed = with_closed(&db, args, false);
        assert_eq!(
            closed.code, normal.code,
            "{args:?} with stdout closed: {closed:?}"
        );
        assert!(
            !closed.stderr.contains("panicked") && !closed.stderr.contains("Broken pipe"),
            "{args:?} with stdout closed: {closed:?}"
        );
    }
    // Logs and errors go to stderr; a closed stderr ends them quietly too.
    db.write_job("bad", "table = \n");
    for (args, code) in [(&["run", "b"][..], 0), (&["check", "bad"][..], 2)] {
        let out = with_closed(&db, args, true);
        assert_eq!(out.code, code, "{args:?} with stderr closed: {out:?}");
    }
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n <> 2"),
        0,
        "job b ran in full"
    );

    // `status | head -1`: the reader takes the first line and goes away while lines remain.
    for _ in 0..5 {
        let mut child = db.spawn(&["status"]);
        let mut first = String::new();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
        assert!(first.starts_with("JOB"), "{first}");
        drop(stdout);
        let out = wait_out(child, Duration::from_secs(60));
        assert_eq!(out.code, 0, "{out:?}");
        assert!(out.stderr.is_empty(), "{out:?}");
    }
}

#[test]
fn live_controls_refuse_a_job_that_does_not_exist_and_write_nothing() {
    let db = TestDb::new();
    counter_table(&db, 300);
    db.write_job("orders", &counter_job(""));
    let schema_exists = || db.i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'backfill'");
    let typo: &[&[&str]] = &[
        &["pause", "ordres"],
        &["resume", "ordres"],
        &["cancel", "ordres"],
        &["set", "ordres", "--rows-per-second", "10"],
        &["set", "ordres", "--clear"],
    ];
    // Before anything ran: refused, and not even the engine's schema is created.
    for args in typo {
        let out = db.run(args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("job `ordres` not found")
                && out.stderr.contains("ordres.toml")
                && out.stderr.contains(": orders"),
            "{args:?}: {out:?}"
        );
    }
    assert_eq!(schema_exists(), 0, "a refused control wrote the schema");
    // Once the engine's tables exist: still refused, and no controls row.
    db.run(&["run", "orders"]).expect(0);
    for args in typo {
        db.run(args).expect(2);
    }
    assert_eq!(db.i64("SELECT count(*) FROM backfill.controls"), 0);

    // A job with progress in the engine's schema is known without a file here (it was run from
    // another host's jobs directory), and so is a job's revert.
    std::fs::remove_file(db.jobs.join("orders.toml")).unwrap();
    let out = db.run(&["pause", "orders"]);
    out.expect(0);
    assert!(out.stdout.contains("job orders: paused"), "{out:?}");
    let out = db.run(&["resume", "orders"]);
    assert_eq!(out.code, 3, "no runner: {out:?}");
    db.write_job("orders", &counter_job(""));
    db.run(&["set", "orders:revert", "--pause", "1ms"])
        .expect(0);
    assert_eq!(
        db.text("SELECT string_agg(job, ',' ORDER BY job) FROM backfill.controls")
            .as_deref(),
        Some("orders,orders:revert")
    );
}

/// The database away for longer than `--reconnect-for`: the run gives up with exit 1 and says
/// where the next run resumes — after the last committed key, where it does resume.
#[test]
fn a_database_away_longer_than_reconnect_for_ends_the_run_saying_where_it_resumes() {
    // Its own server: it is taken down while the run waits for a row.
    let mut cluster = backfill::pgtemp::TempCluster::start().expect("a throwaway PostgreSQL");
    let url = cluster.url("postgres");
    let db = TestDb::on(&url, "reconnect");
    counter_table(&db, 2000);
    let job = counter_job("lock_timeout = \"60s\"\n");
    db.write_job("r", &job);
    let app = hold_row(&db, "t", "id", 1000);
    let child = spawn_part_way(
        &db,
        &["run", "r", "--reconnect-for", "2s"],
        "r",
        Duration::from_secs(60),
    );
    let cursor = db
        .text("SELECT cursor[1] FROM backfill.ranges WHERE job = 'r'")
        .unwrap();
    // Down while the row is still held: the run cannot have gone past it.
    cluster.shut_down();
    drop(app);
    drop(db);
    let out = wait_out(child, Duration::from_secs(60));
    cluster.start_again().unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("gave up (--reconnect-for)")
            && out
                .stderr
                .contains(&format!("it resumes after key {cursor}")),
        "{out:?}"
    );
    let db = TestDb::on(&url, "reconnect");
    db.write_job("r", &job);
    let out = db.run(&["run", "r"]);
    out.expect(0);
    assert!(
        out.stderr.contains(&format!("resuming after key {cursor}")),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0, "{out:?}");
    drop(db);
    cluster.stop().unwrap();
}
