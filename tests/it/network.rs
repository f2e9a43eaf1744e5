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

/// Runs job `job` to completion through a fresh proxy; returns the client's flights (round trips
/// waited for, on every connection of the run) and the run's report.
fn flights_of_run(db: &TestDb, job: &str, rtt: Duration) -> Option<(u64, serde_json::Value)> {
    let (proxy, url) = through_proxy(db, rtt)?;
    let out = Out::from(db.cmd_at(&url, &["run", job, "--json"]).output().unwrap());
    out.expect(0);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    Some((proxy.flights(), report))
}

/// Steady state, counted by the proxy rather than by the engine: a run of 250 chunks minus a run
/// of 50 (what every run pays once, to start and to finish, cancels out) over the 200 chunks
/// between them. Owner check, bounds, statement, blocked-sessions check, checkpoint advance and
/// commit fit in two round trips; the live controls are read on their own timer.
#[test]
fn a_chunk_costs_at_most_two_round_trips() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE small (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         CREATE TABLE big (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO small (id) SELECT generate_series(1, 5000);
         INSERT INTO big (id) SELECT generate_series(1, 25000);",
    );
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
    eprintln!("round trips per chunk through the proxy: {per_chunk:.2} ({small} and {big} flights)");
    assert!(per_chunk <= 2.1, "{per_chunk:.2} round trips per chunk");
    assert_eq!(db.i64("SELECT count(*) FROM big WHERE n <> 1"), 0);
    assert_eq!(db.i64("SELECT count(*) FROM small WHERE n <> 1"), 0);
}
