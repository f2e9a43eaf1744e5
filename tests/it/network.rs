//! The engine across a network: every test here connects through `LatencyProxy`, which delays
//! each direction like a link inside a cloud region and counts the round trips the client waits
//! for. What holds on loopback must hold here: at most two round trips per chunk, every row once
//! through a kill and a terminated backend, and a chunk size that the network does not shrink.

use crate::latency_proxy::LatencyProxy;
use crate::support::*;
use std::time::Duration;

/// A proxy to the test server with this round trip, and this test's database URL through it
/// (None on an external server, whose address is not ours to proxy).
fn through_proxy(db: &TestDb, rtt: Duration) -> Option<(LatencyProxy, String)> {
    let cluster = temp_cluster()?;
    let proxy = LatencyProxy::start(&format!("127.0.0.1:{}", cluster.port()), rtt);
    let url = format!("postgresql://postgres@{}/{}", proxy.addr(), db.name);
    Some((proxy, url))
}

/// Tables of counters (`id` 1..=rows, `n` 0), by name and row count.
fn counters(db: &TestDb, tables: &[(&str, i64)]) {
    for (t, rows) in tables {
        db.exec(&format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
             INSERT INTO {t} (id) SELECT generate_series(1, {rows});"
        ));
    }
}

/// Runs job `job` to completion through a fresh proxy; returns the client's flights (round trips
/// waited for, on every connection of the run) and the run's report.
fn flights_of_run(db: &TestDb, job: &str, rtt: Duration) -> Option<(u64, serde_json::Value)> {
    let (proxy, url) = through_proxy(db, rtt)?;
    let out = Out::from(db.cmd_at(&url, &["run", job, "--json"]).output().unwrap());
    out.expect(0);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    Some((proxy.flights(), report))
}

/// Steady state: a run of 250 chunks minus a run of 50 (what every run pays once, to start and
/// to finish, cancels out) over the 200 chunks between them, counted by the engine and on the
/// wire by the proxy. Owner check, bounds, statement, blocked-sessions check, checkpoint advance
/// and commit fit in two round trips; the live controls are read on their own timer.
#[test]
fn a_chunk_costs_at_most_two_round_trips() {
    let db = TestDb::new();
    counters(&db, &[("small", 5000), ("big", 25000)]);
    for t in ["small", "big"] {
        db.write_job(
            t,
            &format!(
                "table = \"{t}\"\nkey = [\"id\"]\nchunk_rows = 100\n\
                 sql = \"UPDATE {t} SET n = n + 1 WHERE id BETWEEN :start AND :end\"\n\
                 verify = \"SELECT count(*) FROM {t} WHERE n = 0\"\n\
                 throttle = {{ target_chunk_time = \"0s\" }}\n"
            ),
        );
    }
    db.run(&["init"]).expect(0);
    let rtt = Duration::from_millis(2);
    let Some((small, small_report)) = flights_of_run(&db, "small", rtt) else {
        eprintln!("skipped: an external server is not proxied");
        return;
    };
    let (big, big_report) = flights_of_run(&db, "big", rtt).unwrap();
    let chunks = big_report["chunks"].as_i64().unwrap() - small_report["chunks"].as_i64().unwrap();
    assert_eq!(chunks, 200, "{small_report} {big_report}");
    let per_chunk = (big as f64 - small as f64) / chunks as f64;
    let counted =
        big_report["round_trips"].as_i64().unwrap() - small_report["round_trips"].as_i64().unwrap();
    eprintln!(
        "round trips per chunk on the wire: {per_chunk:.2} ({small} and {big} flights); the engine counted {counted} for {chunks} chunks"
    );
    // The chunks' own: exactly two each (the engine's counter)...
    assert_eq!(counted, 2 * chunks, "{small_report} {big_report}");
    // ...and on the wire, two plus what runs on its own timer (the live controls every 0.2 s,
    // the lease's heartbeat): a fraction of a round trip per chunk, where it was ~11 before.
    assert!(per_chunk <= 2.25, "{per_chunk:.2} round trips per chunk");
    assert_eq!(db.i64("SELECT count(*) FROM big WHERE n <> 1"), 0);
    assert_eq!(db.i64("SELECT count(*) FROM small WHERE n <> 1"), 0);
}

/// The exactly-once guarantees across a network: through the proxy, with two workers, a run is
/// killed (SIGKILL), the next has its sessions terminated by the server and then every
/// connection cut by the network (I/O errors, perhaps a COMMIT whose answer is lost), and each
/// time the engine goes on from what was committed. Every row is counted up exactly once.
#[test]
fn every_row_once_through_a_network_across_a_kill_a_terminate_and_a_cut() {
    let db = TestDb::new();
    counter_table(&db, 30_000);
    db.write_job("j", &counter_job(""));
    db.run(&["init"]).expect(0);
    let Some((proxy, url)) = through_proxy(&db, Duration::from_millis(2)) else {
        eprintln!("skipped: an external server is not proxied");
        return;
    };
    let spawn = || {
        db.cmd_at(&url, &["run", "j", "--workers", "2"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let done_at_least = |n: i64| {
        format!(
            "SELECT coalesce((SELECT rows_done >= {n} FROM backfill.progress WHERE job = 'j'), false)"
        )
    };
    let mut killed = spawn();
    db.wait_for_child(&mut killed, &done_at_least(4_000), Duration::from_secs(60));
    signal(&killed, libc::SIGKILL);
    let out = wait_out(killed, Duration::from_secs(30));
    assert_eq!(out.code, 128 + libc::SIGKILL, "{out:?}");

    let mut run = spawn();
    db.wait_for_child(&mut run, &done_at_least(12_000), Duration::from_secs(60));
    db.exec(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = 'backfill' AND datname = current_database()
            AND pid <> pg_backend_pid()",
    );
    db.wait_for_child(&mut run, &done_at_least(20_000), Duration::from_secs(60));
    proxy.cut();
    let out = wait_out(run, Duration::from_secs(120));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("57P01"),
        "the terminate was seen: {out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0, "{out:?}");
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'j'"),
        30_000
    );
}

/// The chunk size adapts to the chunk's work as the server timed it, not to the client's wall
/// time: 10 ms target, 8 ms round trips (a chunk's two round trips alone are 16 ms, more than
/// the target, and the old client-timed controller shrank it to its minimum). Fast statements
/// keep their size through the network; a statement that is slow on the server still shrinks.
#[test]
fn a_remote_database_does_not_shrink_the_chunks_and_a_slow_statement_still_does() {
    let db = TestDb::new();
    counters(&db, &[("fast", 20000), ("slow", 3000)]);
    // Both at the defaults: 1,000 keys to start with, a 10 ms target.
    db.write_job(
        "fast",
        "table = \"fast\"\nkey = [\"id\"]\n\
         sql = \"UPDATE fast SET n = n + 1 WHERE id BETWEEN :start AND :end\"\n",
    );
    // 0.1 ms of sleep per row: 100 ms for 1,000 keys on the server.
    db.write_job(
        "slow",
        "table = \"slow\"\nkey = [\"id\"]\n\
         sql = \"UPDATE slow SET n = n + 1 WHERE id BETWEEN :start AND :end AND pg_sleep(0.0001) IS NOT NULL\"\n",
    );
    db.run(&["init"]).expect(0);
    let Some((_proxy, url)) = through_proxy(&db, Duration::from_millis(8)) else {
        eprintln!("skipped: an external server is not proxied");
        return;
    };
    for job in ["fast", "slow"] {
        let out = Out::from(db.cmd_at(&url, &["run", job, "--json"]).output().unwrap());
        out.expect(0);
    }
    let size = |job: &str| {
        db.i64(&format!(
            "SELECT min(chunk_rows_now)::bigint FROM backfill.ranges WHERE job = '{job}'"
        ))
    };
    assert!(
        size("fast") >= 1000,
        "fast: chunks shrank to {}",
        size("fast")
    );
    assert!(
        size("slow") < 500,
        "slow: chunks stayed at {}",
        size("slow")
    );
    assert_eq!(db.i64("SELECT count(*) FROM fast WHERE n <> 1"), 0);
    assert_eq!(db.i64("SELECT count(*) FROM slow WHERE n <> 1"), 0);
}
