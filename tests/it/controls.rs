//! Live controls that are hard to misuse: `set` clears one override at a time, accepts `0s` for
//! a fixed chunk size, and says which value is now in effect and where it comes from; overrides
//! end with the job's completion; every pause/resume/set/cancel is recorded (role, host, pid,
//! when, what) and `history` shows it.

use crate::support::*;
use std::time::Duration;

fn controls_json(db: &TestDb, name: &str) -> serde_json::Value {
    let out = db.run(&["status", name, "--json"]);
    out.expect(0);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    json["controls"].clone()
}

#[test]
fn set_target_chunk_time_0s_keeps_the_chunk_size_fixed() {
    let db = TestDb::new();
    counter_table(&db, 1000);
    // The file's 1 s target lets 100-key chunks grow by 1.5 each chunk (they take far less).
    db.write_job(
        "j",
        &counter_job("").replace("target_chunk_time = \"0s\"", "target_chunk_time = \"1s\""),
    );
    let out = db.run(&["set", "j", "--target-chunk-time", "0s"]);
    out.expect(0);
    assert!(
        out.stdout
            .contains("target_chunk_time off (chunk size fixed): live override (job file: 1s;"),
        "{out:?}"
    );
    db.run(&["run", "j"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    // Fixed at chunk_rows: 1000 keys in 10 chunks (a growing size would need fewer).
    assert_eq!(
        db.i64("SELECT sum(chunks_done)::bigint FROM backfill.runs WHERE job = 'j'"),
        10
    );
}

#[test]
fn set_clears_one_override_and_says_what_is_in_effect_and_from_where() {
    let db = TestDb::new();
    counter_table(&db, 100);
    db.write_job(
        "j",
        &counter_job("").replace(
            "throttle = { target_chunk_time = \"0s\" }",
            "throttle = { target_chunk_time = \"0s\", rows_per_second = 2000 }",
        ),
    );
    let out = db.run(&["set", "j", "--rows-per-second", "500", "--pause", "5ms"]);
    out.expect(0);
    assert!(
        out.stdout.contains("rows_per_second 500: live override (job file: 2000; a run flag, if any, is overridden)")
            && out.stdout.contains("pause 5ms: live override (job file: 0s")
            && out.stdout.contains("target_chunk_time off (chunk size fixed): job file"),
        "{out:?}"
    );
    let out = db.run(&["set", "j", "--rows-per-second", "none"]);
    out.expect(0);
    assert!(
        out.stdout.contains(
            "rows_per_second 2000: job file (override cleared; a run flag, if any, applies)"
        ) && out.stdout.contains("pause 5ms: live override"),
        "{out:?}"
    );
    let c = controls_json(&db, "j");
    assert_eq!(c["rows_per_second"], serde_json::Value::Null, "{c}");
    assert_eq!(c["pause_ms"], 5, "{c}");
    // A job that is not running is named in the confirmation too.
    assert!(
        out.stdout.contains("apply when the job next runs"),
        "{out:?}"
    );
    let out = db.run(&["set", "j", "--pause", "nonsense"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("none"), "{out:?}");
}

#[test]
fn set_names_the_run_flag_a_live_runner_was_given() {
    let db = TestDb::new();
    counter_table(&db, 1000);
    db.write_job("j", &counter_job(""));
    let mut child = db.spawn(&["run", "j", "--rows-per-second", "20"]);
    db.wait_for_child(
        &mut child,
        "SELECT coalesce((SELECT rows_done > 0 FROM backfill.progress WHERE job = 'j'), false)",
        Duration::from_secs(30),
    );
    let pid = child.id();
    let out = db.run(&["set", "j", "--pause", "1ms"]);
    out.expect(0);
    assert!(
        out.stdout.contains(&format!(
            "rows_per_second 20 of the runner on host {host} (pid {pid}): run flag (job file: none (no ceiling))",
            host = runner_host(&db)
        )) && out.stdout.contains("pause 1ms: live override (job file: 0s; no run flag)"),
        "{out:?}"
    );
    let out = db.run(&["set", "j", "--rows-per-second", "500"]);
    out.expect(0);
    assert!(
        out.stdout.contains(&format!(
            "rows_per_second 500: live override (job file: none (no ceiling); overrides the run flag 20 of the runner on host {host} (pid {pid}))",
            host = runner_host(&db)
        )),
        "{out:?}"
    );
    db.run(&["cancel", "j"]).expect(0);
    assert_eq!(wait_out(child, Duration::from_secs(30)).code, 130);
}

fn runner_host(db: &TestDb) -> String {
    db.text("SELECT host FROM backfill.runs ORDER BY id DESC LIMIT 1")
        .unwrap()
}

#[test]
fn overrides_end_with_the_jobs_completion() {
    let db = TestDb::new();
    counter_table(&db, 300);
    db.write_job("j", &counter_job(""));
    db.run(&["set", "j", "--rows-per-second", "100000", "--pause", "1ms"])
        .expect(0);
    let out = db.run(&["run", "j"]);
    out.expect(0);
    assert!(
        out.stderr.contains(
            "j: live overrides ended with the job's completion (rows_per_second 100000, pause 1ms)"
        ),
        "{out:?}"
    );
    let c = controls_json(&db, "j");
    assert_eq!(c["rows_per_second"], serde_json::Value::Null, "{c}");
    assert_eq!(c["pause_ms"], serde_json::Value::Null, "{c}");
    let status = db.run(&["status", "j"]);
    assert!(!status.stdout.contains("overrides"), "{status:?}");
}

#[test]
fn every_control_is_recorded_and_history_shows_it() {
    let db = TestDb::new();
    counter_table(&db, 400);
    db.write_job("j", &counter_job(""));
    db.run(&["pause", "j"]).expect(0);
    db.run(&["set", "j", "--pause", "2ms"]).expect(0);
    db.run(&["set", "j", "--pause", "none"]).expect(0);
    // The run starts held by the pause; the cancel stops it before its first chunk.
    let mut child = db.spawn(&["run", "j"]);
    db.wait_for_child(
        &mut child,
        "SELECT coalesce((SELECT hold_reason LIKE 'paused%' FROM backfill.progress WHERE job = 'j'), false)",
        Duration::from_secs(30),
    );
    db.run(&["cancel", "j"]).expect(0);
    assert_eq!(wait_out(child, Duration::from_secs(30)).code, 130);
    // A cancel refused (nothing running) changes nothing and is not recorded; a resume without
    // a runner clears the pause flag, and is.
    assert_eq!(db.run(&["cancel", "j"]).code, 3);
    assert_eq!(db.run(&["resume", "j"]).code, 3);

    let me = db.text("SELECT current_user::text").unwrap();
    assert_eq!(
        db.text(
            "SELECT string_agg(action || ' ' || change::text, '; ' ORDER BY id) FROM backfill.control_events WHERE job = 'j'"
        )
        .as_deref(),
        Some(
            "pause {\"paused\": true}; set {\"pause_ms\": 2}; set {\"pause_ms\": null}; cancel {\"cancel\": true}; resume {\"paused\": false}"
        )
    );
    assert_eq!(
        db.i64(&format!(
            "SELECT count(*) FROM backfill.control_events WHERE job = 'j' AND role = '{me}'
                AND session_role = '{me}' AND host <> '' AND pid > 0 AND at > now() - interval '5 min'"
        )),
        5
    );

    let out = db.run(&["history", "j"]);
    out.expect(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("RUN"), "{out:?}");
    let controls = lines
        .iter()
        .position(|l| l.starts_with("AT") && l.contains("ACTION") && l.contains("ROLE"))
        .unwrap_or_else(|| panic!("no control table: {out:?}"));
    let events = &lines[controls + 1..];
    assert_eq!(events.len(), 5, "{out:?}");
    assert!(
        events[0].contains(" pause ") && events[0].contains(&me),
        "{out:?}"
    );
    assert!(events[2].ends_with("pause=none"), "{out:?}");
    assert!(events[3].contains(" cancel "), "{out:?}");
    assert!(events[4].ends_with("paused=false"), "{out:?}");

    // --json keeps its runs and adds each run's control events.
    let json: serde_json::Value =
        serde_json::from_str(&db.run(&["history", "j", "--json"]).stdout).unwrap();
    let run = &json[0];
    assert_eq!(run["outcome"], "cancelled", "{json}");
    assert_eq!(run["controls"].as_array().map(Vec::len), Some(5), "{json}");
    assert_eq!(run["controls"][3]["action"], "cancel", "{json}");
    assert_eq!(run["controls"][3]["role"], me.as_str(), "{json}");

    // `reset` forgets progress, not the record of who did what.
    db.run(&["reset", "j", "--yes"]).expect(0);
    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.control_events WHERE job = 'j'"),
        5
    );
}

#[test]
fn a_runner_role_granted_by_init_can_use_and_see_the_controls() {
    let db = TestDb::new();
    let runner = format!("runner_{}", db.name);
    counter_table(&db, 200);
    db.exec(&format!(
        "CREATE ROLE {runner} LOGIN; GRANT SELECT, UPDATE ON t TO {runner};"
    ));
    db.write_job("j", &counter_job(""));
    db.run(&["init", "--grant-to", &runner]).expect(0);
    let url = db.url_as(&runner);
    let as_runner = |args: &[&str]| Out::from(db.cmd_at(&url, args).output().unwrap());
    as_runner(&["set", "j", "--rows-per-second", "100000"]).expect(0);
    as_runner(&["run", "j"]).expect(0);
    let out = as_runner(&["history", "j"]);
    out.expect(0);
    assert!(out.stdout.contains(&runner), "{out:?}");
    assert_eq!(
        db.i64(&format!(
            "SELECT count(*) FROM backfill.control_events WHERE job = 'j' AND role = '{runner}'"
        )),
        2,
        "a set, and the end of its override at completion"
    );
    // A role granted by an init older than the record: its change is refused whole.
    db.exec(&format!(
        "REVOKE INSERT ON backfill.control_events FROM {runner}"
    ));
    let out = as_runner(&["pause", "j"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("42501") && out.stderr.contains("control_events"),
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.controls WHERE paused"),
        0
    );
    db.exec(&format!("DROP OWNED BY {runner}; DROP ROLE {runner}"));
}
