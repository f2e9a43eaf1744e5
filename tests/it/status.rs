//! `status` while a run is going: the ETA from the recent rate, the time of the last committed
//! chunk, whether the job is paused or held and since when (in the detail and in the overview),
//! and a cancel that no longer shows once it has taken effect.

use crate::support::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// A slow job over `t`: 10 keys a chunk, each chunk sleeping 20 ms, so a run of a few thousand
/// keys lasts long enough to be looked at.
fn slow_job() -> String {
    "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 10\n\
     sql = \"UPDATE t SET n = n + 1 FROM (SELECT pg_sleep(0.02)) s WHERE id BETWEEN :start AND :end\"\n\
     verify = \"SELECT count(*) FROM t WHERE n = 0\"\n\
     [throttle]\ntarget_chunk_time = \"0s\"\n"
        .to_string()
}

fn status_json(db: &TestDb, name: &str) -> Value {
    let out = db.run(&["status", name, "--json"]);
    out.expect(0);
    serde_json::from_str(&out.stdout).unwrap()
}

/// Polls `status NAME --json` until `ok` holds, or panics with the last answer after `limit`.
fn status_until(db: &TestDb, name: &str, limit: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let v = status_json(db, name);
        if ok(&v) {
            return v;
        }
        assert!(
            t.elapsed() < limit,
            "never satisfied within {limit:?}: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The overview's line for job `name`.
fn overview_line(db: &TestDb, name: &str) -> String {
    let out = db.run(&["status"]);
    out.expect(0);
    out.stdout
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no line for {name}: {out:?}"))
        .to_string()
}

#[test]
fn a_running_job_shows_its_eta_and_when_it_last_committed_then_paused_and_held_since() {
    let db = TestDb::new();
    db.run(&["init"]).expect(0);
    counter_table(&db, 20_000);
    db.write_job("s", &slow_job());
    let mut child = db.spawn(&["run", "s"]);
    db.wait_for_child(
        &mut child,
        "SELECT coalesce((SELECT rows_done > 0 FROM backfill.progress WHERE job = 's'), false)",
        Duration::from_secs(30),
    );

    // The recent rate is measured over a few seconds first; then the ETA is a number.
    let v = status_until(&db, "s", Duration::from_secs(30), |v| {
        v["eta_seconds"].is_u64()
    });
    assert!(v["recent_rows_per_second"].as_f64().unwrap() > 0.0, "{v:#}");
    assert_eq!(v["eta_unknown"], Value::Null, "{v:#}");
    assert_eq!(v["paused"], false, "{v:#}");
    assert_eq!(v["hold_reason"], Value::Null, "{v:#}");
    let started = v["checkpoint"]["started_at"].as_str().unwrap().to_string();
    let updated = v["checkpoint"]["updated_at"].as_str().unwrap().to_string();
    assert!(
        updated > started,
        "updated {updated} never past the start {started}"
    );
    // And it keeps advancing while chunks commit (times are shown to the second).
    status_until(&db, "s", Duration::from_secs(10), |v| {
        v["checkpoint"]["updated_at"].as_str().unwrap() > updated.as_str()
    });
    // The engine's view `progress` says the same.
    let seen = db
        .text("SELECT updated_at::text FROM backfill.progress WHERE job = 's'")
        .unwrap();
    db.wait_for(
        &format!(
            "SELECT (SELECT updated_at > '{seen}'::timestamptz FROM backfill.progress WHERE job = 's')"
        ),
        Duration::from_secs(10),
    );
    let detail = db.run(&["status", "s"]);
    assert!(
        detail
            .stdout
            .lines()
            .any(|l| l.starts_with("eta ") && l.contains("rows/s over the last")),
        "{detail:?}"
    );
    let line = overview_line(&db, "s");
    assert!(
        line.contains("running") && !line.contains("unknown"),
        "{line}"
    );

    db.run(&["pause", "s"]).expect(0);
    let v = status_until(&db, "s", Duration::from_secs(30), |v| {
        v["hold_reason"]
            .as_str()
            .is_some_and(|r| r.contains("paused"))
    });
    assert_eq!(v["paused"], true, "{v:#}");
    assert_eq!(v["eta_seconds"], Value::Null, "{v:#}");
    assert_eq!(v["eta_unknown"], "paused", "{v:#}");
    assert!(v["held_since"].is_string(), "{v:#}");
    let detail = db.run(&["status", "s"]);
    assert!(
        detail
            .stdout
            .lines()
            .any(|l| l.starts_with("eta ") && l.contains("unknown")),
        "{detail:?}"
    );
    // The overview says so too, and shows no rate for a job that does nothing on purpose.
    let line = overview_line(&db, "s");
    assert!(
        line.contains("paused since") && line.contains("unknown"),
        "{line}"
    );
    let all: Value = serde_json::from_str(&db.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(all[0]["paused"], true, "{all:#}");
    assert_eq!(all[0]["eta_unknown"], "paused", "{all:#}");

    db.run(&["cancel", "s"]).expect(0);
    let out = wait_out(child, Duration::from_secs(30));
    assert_eq!(out.code, 130, "{out:?}");
}

#[test]
fn a_cancel_that_took_effect_is_no_longer_shown_as_requested() {
    let db = TestDb::new();
    db.run(&["init"]).expect(0);
    counter_table(&db, 20_000);
    db.write_job("c", &slow_job());
    let mut child = db.spawn(&["run", "c"]);
    db.wait_for_child(
        &mut child,
        "SELECT coalesce((SELECT rows_done > 0 FROM backfill.progress WHERE job = 'c'), false)",
        Duration::from_secs(30),
    );
    db.run(&["cancel", "c"]).expect(0);
    let out = wait_out(child, Duration::from_secs(30));
    assert_eq!(out.code, 130, "{out:?}");

    let detail = db.run(&["status", "c"]);
    detail.expect(0);
    assert!(
        detail.stdout.contains("cancelled") && !detail.stdout.contains("requested"),
        "{detail:?}"
    );
    let v = status_json(&db, "c");
    assert_eq!(v["controls"]["cancel"], false, "{v:#}");
    assert_eq!(v["state"], "cancelled", "{v:#}");
    assert_eq!(v["eta_unknown"], "not_running", "{v:#}");
}

#[test]
fn a_run_held_by_a_health_signal_shows_the_reason_and_since_when_instead_of_an_eta() {
    let db = TestDb::new();
    db.run(&["init"]).expect(0);
    counter_table(&db, 20_000);
    db.exec("CREATE TABLE flag (hold boolean NOT NULL); INSERT INTO flag VALUES (false)");
    db.write_job(
        "h",
        &format!(
            "{}throttle_sql = \"SELECT hold FROM flag\"\ncheck_interval = \"100ms\"\n",
            slow_job()
        ),
    );
    let mut child = db.spawn(&["run", "h"]);
    db.wait_for_child(
        &mut child,
        "SELECT coalesce((SELECT rows_done > 0 FROM backfill.progress WHERE job = 'h'), false)",
        Duration::from_secs(30),
    );
    db.exec("UPDATE flag SET hold = true");
    let v = status_until(&db, "h", Duration::from_secs(30), |v| {
        v["hold_reason"] == "throttle_sql returned true"
    });
    assert_eq!(v["paused"], false, "{v:#}");
    assert_eq!(v["eta_seconds"], Value::Null, "{v:#}");
    assert_eq!(v["eta_unknown"], "held", "{v:#}");
    let since = v["held_since"].as_str().unwrap().to_string();
    let detail = db.run(&["status", "h"]);
    assert!(
        detail
            .stdout
            .lines()
            .any(|l| l.starts_with("eta ")
                && l.ends_with("unknown (held: throttle_sql returned true)")),
        "{detail:?}"
    );
    let line = overview_line(&db, "h");
    assert!(
        line.contains(&format!("held since {since}: throttle_sql returned true"))
            && line.contains("unknown"),
        "{line}"
    );
    let all: Value = serde_json::from_str(&db.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(all[0]["job"], "h", "{all:#}");
    assert_eq!(all[0]["eta_unknown"], "held", "{all:#}");
    assert_eq!(all[0]["held_since"], since.as_str(), "{all:#}");

    db.run(&["cancel", "h"]).expect(0);
    let out = wait_out(child, Duration::from_secs(30));
    assert_eq!(out.code, 130, "{out:?}");
}

#[test]
fn the_recent_rate_and_eta_are_summed_over_every_live_run_of_the_job() {
    let db = TestDb::new();
    db.run(&["init"]).expect(0);
    counter_table(&db, 20_000);
    db.write_job("p", &slow_job());
    let mut first = db.spawn(&["run", "p"]);
    db.wait_for_child(
        &mut first,
        "SELECT coalesce((SELECT rows_done > 0 FROM backfill.progress WHERE job = 'p'), false)",
        Duration::from_secs(30),
    );
    let mut second = db.spawn(&["run", "p"]);
    db.wait_for_child(
        &mut second,
        "SELECT count(*) = 2 FROM backfill.runs
          WHERE job = 'p' AND outcome IS NULL AND recent_rows_per_second > 0",
        Duration::from_secs(30),
    );
    // Frozen, both stay alive (their sessions open, their heartbeats young) and their rates
    // stay put, so what status sums can be compared with what each run wrote.
    signal(&first, libc::SIGSTOP);
    signal(&second, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    let each = db
        .text("SELECT string_agg(recent_rows_per_second::text, ' ') FROM backfill.runs WHERE job = 'p' AND outcome IS NULL")
        .unwrap();
    let sum: f64 = each.split(' ').map(|r| r.parse::<f64>().unwrap()).sum();
    let v = status_json(&db, "p");
    let recent = v["recent_rows_per_second"].as_f64().unwrap();
    assert!((recent - sum).abs() < 1e-6, "{recent} vs {each}: {v:#}");
    let to_go = v["rows_to_go"].as_f64().unwrap();
    assert_eq!(v["eta_seconds"], (to_go / sum).ceil() as u64, "{v:#}");
    let detail = db.run(&["status", "p"]);
    assert!(
        detail
            .stdout
            .contains("over the last 30s (now, 2 runs together)"),
        "{detail:?}"
    );
    signal(&first, libc::SIGCONT);
    signal(&second, libc::SIGCONT);
    db.run(&["cancel", "p"]).expect(0);
    for child in [first, second] {
        let out = wait_out(child, Duration::from_secs(30));
        assert_eq!(out.code, 130, "{out:?}");
    }
}
