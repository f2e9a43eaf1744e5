//! A canary run (`run --limit ROWS`) and the refusal of a second job on a table that another
//! job's live run is walking (`--allow-shared-table`).

use crate::support::*;
use std::time::Duration;

#[test]
fn a_canary_stops_after_its_rows_and_the_next_run_finishes_exactly_once() {
    let db = TestDb::new();
    counter_table(&db, 1000);
    db.write_job("j", &counter_job(""));

    let out = db.run(&["run", "j", "--limit", "250", "--json"]);
    out.expect(0);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    // Whole chunks of 100: the third chunk takes the run past 250.
    assert_eq!(report["outcome"], "stopped", "{out:?}");
    assert_eq!(report["limit"], 250, "{out:?}");
    assert_eq!(report["rows"], 300, "{out:?}");
    // The 300th key in key order.
    let cursor = db
        .text("SELECT t.id::text FROM t ORDER BY t.id OFFSET 299 LIMIT 1")
        .unwrap();
    assert_eq!(report["cursor"][0], cursor.as_str(), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "j: canary: 300 rows done (--limit 250), next run resumes after key {cursor}"
        )),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n = 1"), 300);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n = 0"), 700);
    let out = db.run(&["status", "j", "--json"]);
    let s: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(s["state"], "stopped", "{out:?}");
    // The canary did not verify: verify would count the 700 rows still to do.
    assert!(s["checkpoint"]["verify_remaining"].is_null(), "{out:?}");

    let out = db.run(&["run", "j", "--json"]);
    out.expect(0);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "done", "{out:?}");
    assert!(report.get("limit").is_none(), "{out:?}");
    assert_eq!(report["rows"], 700, "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn a_canary_with_several_workers_counts_the_rows_of_all_of_them() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    db.write_job("j", &counter_job(""));

    let out = db.run(&["run", "j", "--limit", "500", "--workers", "3", "--json"]);
    out.expect(0);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "stopped", "{out:?}");
    let rows = report["rows"].as_i64().unwrap();
    // Each worker finishes the chunk it has in flight when the total reaches the limit.
    assert!((500..500 + 3 * 100).contains(&rows), "{out:?}");
    assert!(out.stderr.contains("j: canary: "), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n = 1"), rows);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n > 1"), 0);

    db.run(&["run", "j", "--workers", "3"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn a_canary_of_zero_rows_is_a_usage_error() {
    let db = TestDb::new();
    counter_table(&db, 10);
    db.write_job("j", &counter_job(""));
    let out = db.run(&["run", "j", "--limit", "0"]);
    out.expect(2);
    assert!(out.stderr.contains("--limit"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);
}

#[test]
fn a_second_job_on_a_table_another_job_is_walking_is_refused_unless_allowed() {
    let db = TestDb::new();
    counter_table(&db, 1000);
    db.write_job("a", &counter_job("lock_timeout = \"60s\""));
    db.write_job("b", &counter_job("lock_timeout = \"60s\""));
    let held = hold_row(&db, "t", "id", 500);
    let a = spawn_part_way(&db, &["run", "a"], "a", Duration::from_secs(30));

    let out = db.run(&["run", "b"]);
    out.expect(3);
    let host = db
        .text("SELECT host FROM backfill.runs WHERE job = 'a'")
        .unwrap();
    assert!(
        out.stderr.contains(&format!(
            "job b not started: job a is running on the same table t (runner on host {host}, pid {})",
            a.id()
        )) && out.stderr.contains("--allow-shared-table"),
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.runs WHERE job = 'b'"),
        0
    );

    // The same job in a second process joins it: that is how workers are added.
    let mut a2 = db.spawn(&["run", "a"]);
    db.wait_for_child(
        &mut a2,
        "SELECT count(*) = 2 FROM backfill.runs WHERE job = 'a' AND outcome IS NULL",
        Duration::from_secs(30),
    );
    // Told to, the second job runs alongside.
    let b = spawn_part_way(
        &db,
        &["run", "b", "--allow-shared-table"],
        "b",
        Duration::from_secs(30),
    );

    held.exec("COMMIT");
    for child in [a, a2, b] {
        wait_out(child, Duration::from_secs(60)).expect(0);
    }
    // Both jobs touched every row exactly once.
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 2"), 0);
}
