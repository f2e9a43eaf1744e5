//! Fleets (`--fleet FILE`): one job over several databases, each with its own engine schema and
//! checkpoint. The shards here are databases of the shared test cluster, plus one that is not
//! there.

use crate::support::*;
use backfill::pgtemp::TempCluster;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Shards `a` and `b`, each a fresh database with the counter table and job `j`.
struct Shards {
    a: TestDb,
    b: TestDb,
}

impl Shards {
    fn new(rows: i64) -> Shards {
        let (a, b) = (TestDb::new(), TestDb::new());
        for db in [&a, &b] {
            counter_table(db, rows);
        }
        a.write_job("j", &counter_job(""));
        Shards { a, b }
    }

    /// A fleet file in a's jobs directory listing the given `name = "url"` lines.
    fn fleet_file(&self, body: &str) -> PathBuf {
        let path = self.a.jobs.join("fleet.toml.txt");
        std::fs::write(&path, body).unwrap();
        path
    }

    fn two_shards(&self) -> PathBuf {
        self.fleet_file(&format!(
            "max_parallel = 2\n[shards]\nsh_a = \"{}\"\nsh_b = \"{}\"\n",
            self.a.url, self.b.url
        ))
    }

    fn fleet(&self, fleet: &Path, args: &[&str]) -> Out {
        Out::from(fleet_cmd(&self.a.jobs, fleet, args).output().unwrap())
    }
}

/// The binary on a fleet, with the jobs in `jobs` and none of the caller's PG*/DATABASE_URL
/// settings.
fn fleet_cmd(jobs: &Path, fleet: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backfill"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") || k == "DATABASE_URL" || k.starts_with("BACKFILL_") {
            c.env_remove(k);
        }
    }
    c.arg("--jobs").arg(jobs).arg("--fleet").arg(fleet);
    c.args(args).stdin(Stdio::null());
    c
}

fn spawn_fleet(jobs: &Path, fleet: &Path, args: &[&str]) -> Child {
    fleet_cmd(jobs, fleet, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Rows of `t` the job has applied on the database at `url`.
fn rows_done(url: &str) -> i64 {
    Session::connect(url).i64("SELECT count(*) FROM t WHERE n > 0")
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Counts every row of `t` on the database at `url` that was not applied exactly once.
fn not_once(url: &str) -> i64 {
    Session::connect(url).i64("SELECT count(*) FROM t WHERE n <> 1")
}

/// A job slow enough to be caught part-way: chunks of 50 keys, each sleeping 10 ms.
fn slow_job() -> String {
    counter_job("")
        .replace("chunk_rows = 100", "chunk_rows = 50")
        .replace(
            "UPDATE t SET n = n + 1 WHERE",
            "UPDATE t SET n = n + 1 FROM (SELECT pg_sleep(0.01)) s WHERE",
        )
}

#[test]
fn the_fleet_gate_passes_only_when_every_shard_is_done_and_names_those_that_are_not() {
    let s = Shards::new(300);
    let fleet = s.two_shards();

    let out = s.fleet(&fleet, &["gate", "j"]);
    out.expect(3);
    assert!(
        out.stdout
            .contains("job j: 2 of 2 shards not ready: sh_a, sh_b"),
        "{out:?}"
    );

    s.a.run(&["run", "j"]).expect(0);
    let out = s.fleet(&fleet, &["gate", "j", "--json"]);
    out.expect(3);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["passed"], false, "{out:?}");
    assert_eq!(report["not_ready"], serde_json::json!(["sh_b"]), "{out:?}");
    assert_eq!(report["shards"][0]["shard"], "sh_a", "{out:?}");
    assert_eq!(report["shards"][0]["passed"], true, "{out:?}");
    assert_eq!(report["shards"][1]["state"], "new", "{out:?}");

    // b's run, on b alone, with the same job file.
    s.a.cmd_at(&s.b.url, &["run", "j"])
        .output()
        .map(Out::from)
        .unwrap()
        .expect(0);
    let out = s.fleet(&fleet, &["gate", "j"]);
    out.expect(0);
    assert!(
        out.stdout.contains("job j: every shard (2) is ready"),
        "{out:?}"
    );
    for db in [&s.a, &s.b] {
        assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    }
}

#[test]
fn an_unreachable_shard_is_an_error_of_its_own_and_never_shows_its_password() {
    let s = Shards::new(50);
    s.a.run(&["run", "j"]).expect(0);
    // Port 9 (discard) on loopback: nothing of PostgreSQL listens there.
    let fleet = s.fleet_file(&format!(
        "[shards]\nsh_a = \"{}\"\ngone = \"postgresql://app:s3cret@127.0.0.1:9/app?connect_timeout=2\"\n",
        s.a.url
    ));
    let out = s.fleet(&fleet, &["gate", "j"]);
    out.expect(1);
    assert!(out.stdout.contains("sh_a"), "{out:?}");
    assert!(out.stdout.contains("ready"), "{out:?}");
    assert!(out.stdout.contains("gone         error"), "{out:?}");
    assert!(
        out.stdout.contains("1 of 2 shards not ready: gone"),
        "{out:?}"
    );
    assert!(!format!("{out:?}").contains("s3cret"), "{out:?}");
}

#[test]
fn a_bad_fleet_file_or_fleet_with_a_database_url_is_a_usage_error() {
    let s = Shards::new(10);
    let fleet = s.fleet_file(&format!(
        "[shards]\nsh_a = \"{}\"\nsh_b = \"${{BACKFILL_TEST_UNSET_SHARD_URL}}\"\n",
        s.a.url
    ));
    let out = s.fleet(&fleet, &["gate", "j"]);
    out.expect(2);
    assert!(
        out.stderr.contains(&format!(
            "invalid fleet file {}:3: key `shards.sh_b`: environment variable BACKFILL_TEST_UNSET_SHARD_URL is not set",
            fleet.display()
        )),
        "{out:?}"
    );

    let fleet = s.two_shards();
    let out = Out::from(
        s.a.cmd(&["--fleet", fleet.to_str().unwrap(), "gate", "j"])
            .output()
            .unwrap(),
    );
    out.expect(2);
    assert!(out.stderr.contains("--fleet"), "{out:?}");

    // Commands with no fleet form are refused, not run on some database.
    for (args, says) in [
        (&["list"][..], "`backfill list` does not take --fleet"),
        (&["status"][..], "name the job"),
        (
            &["plan", "j", "--json"][..],
            "`backfill plan --json` does not take --fleet",
        ),
    ] {
        let out = s.fleet(&fleet, args);
        out.expect(2);
        assert!(out.stderr.contains(says), "{args:?}: {out:?}");
    }
    assert_eq!(s.a.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);

    // The command line wins over the other's variable; both variables alone are ambiguous.
    let with_env = |vars: &[(&str, &str)], args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_backfill"));
        for (k, _) in std::env::vars() {
            if k.starts_with("PG") || k == "DATABASE_URL" || k.starts_with("BACKFILL_") {
                c.env_remove(k);
            }
        }
        c.arg("--jobs")
            .arg(&s.a.jobs)
            .args(args)
            .stdin(Stdio::null());
        c.envs(vars.iter().copied());
        Out::from(c.output().unwrap())
    };
    let fleet_path = fleet.to_str().unwrap();
    let elsewhere = "postgresql://nobody@127.0.0.1:9/none";
    let out = with_env(
        &[("DATABASE_URL", elsewhere)],
        &["--fleet", fleet_path, "gate", "j"],
    );
    out.expect(3);
    assert!(out.stdout.contains("2 of 2 shards not ready"), "{out:?}");
    let out = with_env(&[("BACKFILL_FLEET", fleet_path)], &["gate", "j"]);
    out.expect(3);
    assert!(out.stdout.contains("2 of 2 shards not ready"), "{out:?}");
    let out = with_env(
        &[("BACKFILL_FLEET", fleet_path)],
        &["--database-url", &s.a.url, "gate", "j"],
    );
    out.expect(3);
    assert!(out.stdout.contains("job j has never run"), "{out:?}");
    let out = with_env(
        &[("BACKFILL_FLEET", fleet_path), ("DATABASE_URL", elsewhere)],
        &["gate", "j"],
    );
    out.expect(2);
    assert!(
        out.stderr
            .contains("both BACKFILL_FLEET and DATABASE_URL are set"),
        "{out:?}"
    );

    let out = s.fleet(&fleet, &["check", "j"]);
    out.expect(0);
    assert!(out.stdout.contains("2 shards, max_parallel 2"), "{out:?}");
}

/// Four shards on two clusters: two databases on a cluster of this test's own, two on the shared
/// one. The fleet run is SIGKILLed part-way, run again, and its own cluster is restarted under it;
/// every row of every shard is applied exactly once and the fleet gate passes.
#[test]
fn a_fleet_on_two_clusters_survives_a_kill_and_a_cluster_restart_applying_every_row_once() {
    let mut cluster = TempCluster::start().expect("a throwaway PostgreSQL");
    let mut urls = Vec::new();
    let mut own = Vec::new();
    for name in ["x1", "x2"] {
        cluster
            .psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap();
        let db = TestDb::on(&cluster.url(name), &format!("fleet_{name}"));
        counter_table(&db, 1500);
        urls.push((name, db.url.clone()));
        own.push(db);
    }
    let shared = [TestDb::new(), TestDb::new()];
    for (name, db) in ["y1", "y2"].into_iter().zip(&shared) {
        counter_table(db, 1500);
        urls.push((name, db.url.clone()));
    }
    let jobs = &shared[0].jobs;
    shared[0].write_job("j", &slow_job());
    let body: String = urls
        .iter()
        .map(|(name, url)| format!("{name} = \"{url}\"\n"))
        .collect();
    let fleet = jobs.join("fleet.toml.txt");
    std::fs::write(&fleet, format!("max_parallel = 2\n[shards]\n{body}")).unwrap();

    let mut child = spawn_fleet(jobs, &fleet, &["run", "j"]);
    wait_until("x1 part-way", Duration::from_secs(60), || {
        rows_done(&urls[0].1) > 0
    });
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();

    let child = spawn_fleet(jobs, &fleet, &["run", "j", "--reconnect-for", "60s"]);
    let before = rows_done(&urls[1].1);
    wait_until("x2 moving", Duration::from_secs(60), || {
        rows_done(&urls[1].1) > before
    });
    drop(own);
    cluster.restart(Duration::from_millis(1000)).unwrap();
    let out = wait_out(child, Duration::from_secs(120));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("j: every shard (4) done"), "{out:?}");
    for (name, url) in &urls {
        assert_eq!(not_once(url), 0, "shard {name}: {out:?}");
    }
    let out = Out::from(fleet_cmd(jobs, &fleet, &["gate", "j"]).output().unwrap());
    out.expect(0);
    drop(shared);
    cluster.stop().unwrap();
}

/// A shard whose precondition is not met is reported (exit 3) while the others finish; the next
/// run does only that shard.
#[test]
fn a_shard_not_ready_does_not_stop_the_others_and_the_next_run_does_only_it() {
    let s = Shards::new(400);
    s.a.write_job(
        "j",
        &counter_job("requires_sql = \"SELECT to_regclass('ready') IS NOT NULL\"\n"),
    );
    s.a.exec("CREATE TABLE ready ()");
    let fleet = s.two_shards();
    let out = s.fleet(&fleet, &["run", "j"]);
    out.expect(3);
    assert!(
        out.stderr.contains("requires_sql returned false"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("j: 1 of 2 shards not done: sh_b"),
        "{out:?}"
    );
    assert_eq!(not_once(&s.a.url), 0);
    assert_eq!(s.b.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);

    s.b.exec("CREATE TABLE ready ()");
    // b's own settings: two workers and a rate ceiling in place of the run's flags.
    let fleet = s.fleet_file(&format!(
        "[shards]\nsh_a = \"{}\"\nsh_b = \"{}\"\n[shard_settings.sh_b]\nworkers = 2\nrows_per_second = 100000\n",
        s.a.url, s.b.url
    ));
    let out = s.fleet(&fleet, &["run", "j", "--json"]);
    out.expect(0);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["exit_code"], 0, "{out:?}");
    assert_eq!(report["shards"][0]["shard"], "sh_a", "{out:?}");
    assert_eq!(
        report["shards"][0]["report"]["outcome"], "already_done",
        "{out:?}"
    );
    assert_eq!(report["shards"][1]["report"]["outcome"], "done", "{out:?}");
    assert_eq!(report["shards"][1]["report"]["rows"], 400, "{out:?}");
    assert_eq!(report["shards"][1]["report"]["workers"], 2, "{out:?}");
    assert_eq!(
        s.b.i64("SELECT (throttle_flags->>'rows_per_second')::bigint FROM backfill.runs ORDER BY id DESC LIMIT 1"),
        100000,
        "{out:?}"
    );
    for url in [&s.a.url, &s.b.url] {
        assert_eq!(not_once(url), 0);
    }
}

/// An unreachable shard fails on its own (exit 1) once --reconnect-for has passed; the others
/// are done. A Ctrl-C stops every running shard cleanly (exit 130), and the next run finishes.
#[test]
fn an_unreachable_shard_fails_alone_and_a_signal_stops_every_shard_cleanly() {
    let s = Shards::new(600);
    s.a.write_job("j", &slow_job());
    let fleet = s.fleet_file(&format!(
        "[shards]\nsh_a = \"{}\"\ngone = \"postgresql://app:s3cret@127.0.0.1:9/app?connect_timeout=1\"\nsh_b = \"{}\"\n",
        s.a.url, s.b.url
    ));
    let out = s.fleet(&fleet, &["run", "j", "--reconnect-for", "1s"]);
    out.expect(1);
    assert!(
        out.stderr.contains("j: 1 of 3 shards not done: gone"),
        "{out:?}"
    );
    assert!(!format!("{out:?}").contains("s3cret"), "{out:?}");
    for url in [&s.a.url, &s.b.url] {
        assert_eq!(not_once(url), 0);
    }

    s.a.run(&["reset", "j", "--yes"]).expect(0);
    s.a.cmd_at(&s.b.url, &["reset", "j", "--yes"])
        .output()
        .unwrap();
    s.a.exec("UPDATE t SET n = 0");
    s.b.exec("UPDATE t SET n = 0");
    let fleet = s.two_shards();
    let child = spawn_fleet(&s.a.jobs, &fleet, &["run", "j"]);
    wait_until("both shards part-way", Duration::from_secs(60), || {
        rows_done(&s.a.url) > 0 && rows_done(&s.b.url) > 0
    });
    signal(&child, libc::SIGINT);
    let out = wait_out(child, Duration::from_secs(60));
    assert_eq!(out.code, 130, "{out:?}");
    assert!(!out.stderr.contains("error:"), "{out:?}");
    assert!(out.stderr.contains("j: 2 of 2 shards not done"), "{out:?}");
    s.fleet(&fleet, &["run", "j"]).expect(0);
    for url in [&s.a.url, &s.b.url] {
        assert_eq!(not_once(url), 0);
    }
}

/// Every series of a fleet run carries its shard; every log line names its shard (JSON: a
/// `shard` field), and the fleet's total is a progress line of its own (`shard` "all").
#[test]
fn a_fleet_runs_metrics_and_log_lines_name_the_shard() {
    let s = Shards::new(300);
    s.a.write_job("j", &slow_job());
    let fleet = s.two_shards();
    let port = crate::observability::free_port();
    let child = spawn_fleet(
        &s.a.jobs,
        &fleet,
        &[
            "--log-format",
            "json",
            "run",
            "j",
            "--metrics-addr",
            &port.to_string(),
            "--metrics-linger",
            "60s",
            "--progress-interval",
            "50ms",
        ],
    );
    // Done (not only every row: a stop during the verify would still be a stop).
    let done_on = |metrics: &str, shard: &str| {
        let rows = metrics.lines().any(|l| {
            l.starts_with("backfill_rows_done{")
                && l.contains("backfill_job=\"j\"")
                && l.contains(&format!("shard=\"{shard}\""))
                && l.ends_with(" 300")
        });
        let state = metrics.lines().any(|l| {
            l.starts_with("backfill_state{")
                && l.contains(&format!("shard=\"{shard}\""))
                && l.contains("state=\"done\"")
                && l.ends_with(" 1")
        });
        rows && state
    };
    wait_until(
        "both shards' rows in the metrics",
        Duration::from_secs(60),
        || {
            crate::observability::http_get(port, "/metrics")
                .is_some_and(|m| done_on(&m, "sh_a") && done_on(&m, "sh_b"))
        },
    );
    signal(&child, libc::SIGTERM);
    let out = wait_out(child, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for l in &lines {
        assert!(l["ts"].is_string() && l["level"].is_string(), "{l}");
        assert_eq!(l["job"], "j", "{l}");
    }
    let named = |shard: &str| lines.iter().filter(|l| l["shard"] == shard).count();
    assert!(named("sh_a") >= 2 && named("sh_b") >= 2, "{out:?}");
    assert!(
        lines
            .iter()
            .any(|l| l["shard"] == "all" && l["event"] == "progress"),
        "{out:?}"
    );
    assert!(
        lines.iter().any(|l| l["msg"] == "j: every shard (2) done"),
        "{out:?}"
    );
}

/// `status --fleet` is a line per shard and a total (or JSON); the other commands run on each
/// shard in turn under a line naming it, and say on which they did not succeed.
#[test]
fn status_and_the_other_commands_work_on_every_shard() {
    let s = Shards::new(200);
    let fleet = s.two_shards();
    s.a.run(&["run", "j"]).expect(0);

    let out = s.fleet(&fleet, &["status", "j"]);
    out.expect(0);
    let line = |shard: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(shard))
            .unwrap_or_else(|| panic!("no line for {shard}: {out:?}"))
            .to_string()
    };
    assert!(line("sh_a ").contains(" done "), "{out:?}");
    assert!(line("sh_a ").contains("200/200 100.0%"), "{out:?}");
    assert!(line("sh_b ").contains(" new "), "{out:?}");
    assert!(
        out.stdout.contains("j: 1 of 2 shards done; 200 rows;"),
        "{out:?}"
    );
    let out = s.fleet(&fleet, &["status", "j", "--json"]);
    out.expect(0);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["shards"][0]["shard"], "sh_a", "{out:?}");
    assert_eq!(v["shards"][0]["state"], "done", "{out:?}");
    assert_eq!(v["shards"][0]["checkpoint"]["rows_done"], 200, "{out:?}");
    assert_eq!(v["shards"][1]["state"], "new", "{out:?}");
    assert_eq!(v["total"]["shards_done"], 1, "{out:?}");
    assert_eq!(v["total"]["rows_done"], 200, "{out:?}");

    let out = s.fleet(&fleet, &["plan", "j"]);
    out.expect(0);
    assert!(
        out.stdout.contains("== shard sh_b (") && out.stdout.contains("first chunk"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("`plan` succeeded on every shard (2)"),
        "{out:?}"
    );

    let out = s.fleet(&fleet, &["pause", "j"]);
    out.expect(0);
    assert!(
        out.stdout.contains("== shard sh_a (") && out.stdout.contains("== shard sh_b ("),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("`pause` succeeded on every shard (2)"),
        "{out:?}"
    );
    for db in [&s.a, &s.b] {
        assert_eq!(
            db.i64(
                "SELECT count(*) FROM backfill.control_events WHERE job = 'j' AND action = 'pause'"
            ),
            1
        );
    }
    // resume with no runner: exit 3 on each shard, each named.
    let out = s.fleet(&fleet, &["resume", "j"]);
    out.expect(3);
    assert!(
        out.stdout
            .contains("`resume` did not succeed on 2 of 2 shards: sh_a (exit 3), sh_b (exit 3)"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("sh_b: error: job j: no runner"),
        "{out:?}"
    );

    let out = s.fleet(&fleet, &["status", "nosuch"]);
    out.expect(2);
    assert!(
        out.stderr
            .contains("job `nosuch`: no checkpoint on any shard"),
        "{out:?}"
    );

    s.fleet(&fleet, &["reset", "j", "--yes"]).expect(0);
    // A canary on every shard: exit 0, and the job is not called done.
    let out = s.fleet(&fleet, &["run", "j", "--limit", "100"]);
    out.expect(0);
    assert!(
        out.stderr.contains("j: 2 of 2 shards not done: sh_a, sh_b"),
        "{out:?}"
    );
    assert!(out.stderr.contains("canary"), "{out:?}");
    let out = s.fleet(&fleet, &["status", "j", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["total"]["rows_done"], 200, "{out:?}");
    assert_eq!(v["shards"][1]["job"], "j", "{out:?}");
    assert_eq!(v["shards"][1]["phase"], "stopped", "{out:?}");
}

/// Two processes run the same fleet at once: on each shard they share the work as two runners
/// share one database, and every row of every shard is applied exactly once. The first process
/// waits at a row the test holds on each shard, so the second surely joins it there.
#[test]
fn two_processes_running_one_fleet_share_each_shards_work() {
    let s = Shards::new(1500);
    s.a.write_job("j", &counter_job("lock_timeout = \"60s\"\n"));
    let fleet = s.two_shards();
    let holders = [
        hold_row(&s.a, "t", "id", 200),
        hold_row(&s.b, "t", "id", 200),
    ];
    let first = spawn_fleet(&s.a.jobs, &fleet, &["run", "j"]);
    for db in [&s.a, &s.b] {
        db.wait_for(&engine_lock_waits(1), Duration::from_secs(60));
    }
    let second = spawn_fleet(&s.a.jobs, &fleet, &["run", "j"]);
    for db in [&s.a, &s.b] {
        db.wait_for(
            "SELECT count(*) = 2 FROM backfill.runs WHERE job = 'j'",
            Duration::from_secs(60),
        );
    }
    for h in &holders {
        h.exec("COMMIT");
    }
    let (one, two) = (
        wait_out(first, Duration::from_secs(120)),
        wait_out(second, Duration::from_secs(120)),
    );
    assert_eq!(one.code, 0, "{one:?}");
    assert_eq!(two.code, 0, "{two:?}");
    // Both joined every shard (waited for above); how the rest was split between them depends on
    // when each chunk's range lock let the second in, so only exactly-once is asserted.
    for db in [&s.a, &s.b] {
        assert_eq!(not_once(&db.url), 0);
        assert_eq!(
            db.i64("SELECT count(*) FROM backfill.runs WHERE job = 'j' AND outcome = 'done'"),
            2
        );
    }
    s.fleet(&fleet, &["gate", "j"]).expect(0);
}

/// The fleet as a least-privileged role: `init --grant-to ROLE --fleet` grants it on every shard
/// (as the owner), then the role runs, watches and gates the fleet with no other privilege than
/// its table's.
#[test]
fn a_role_granted_by_init_on_every_shard_runs_and_gates_the_fleet() {
    let s = Shards::new(300);
    let runner = format!("fleet_runner_{}", s.a.name);
    s.a.exec(&format!("CREATE ROLE {runner} LOGIN"));
    for db in [&s.a, &s.b] {
        db.exec(&format!("GRANT SELECT, UPDATE ON t TO {runner}"));
    }
    let owner_fleet = s.two_shards();
    let out = s.fleet(&owner_fleet, &["init", "--grant-to", &runner]);
    out.expect(0);
    assert!(
        out.stdout.contains("`init` succeeded on every shard (2)"),
        "{out:?}"
    );
    let fleet = s.fleet_file(&format!(
        "[shards]\nsh_a = \"{}\"\nsh_b = \"{}\"\n",
        s.a.url_as(&runner),
        s.b.url_as(&runner)
    ));
    let out = s.fleet(&fleet, &["run", "j"]);
    out.expect(0);
    assert!(out.stderr.contains("j: every shard (2) done"), "{out:?}");
    s.fleet(&fleet, &["status", "j"]).expect(0);
    s.fleet(&fleet, &["gate", "j"]).expect(0);
    for db in [&s.a, &s.b] {
        assert_eq!(not_once(&db.url), 0);
        assert_eq!(
            db.i64(&format!(
                "SELECT count(*) FROM pg_roles WHERE rolname = '{runner}' AND (rolsuper OR rolcreatedb)"
            )),
            0
        );
    }
}
