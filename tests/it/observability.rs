//! What operators watch: the metrics endpoint (every metric the README names, histograms with
//! buckets), a real Prometheus scraping a real run with every dashboard query returning data, the
//! non-terminal progress lines, status --json and history against the table they describe.

use crate::support::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP GET on loopback; returns the body, or None if nothing answers.
pub(crate) fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Metric names in the README's metric table.
fn readme_metrics() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("## Metrics")
        .nth(1)
        .expect("README has a Metrics section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `backfill_"))
        .map(|rest| format!("backfill_{}", rest.split('`').next().unwrap()))
        .collect()
}

fn dashboard_queries() -> Vec<String> {
    let d: serde_json::Value =
        serde_json::from_str(include_str!("../../grafana/backfill.json")).unwrap();
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(
        vars.contains(&"datasource") && vars.contains(&"backfill_job"),
        "dashboard variables: {vars:?}"
    );
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_string())
        })
        .collect()
}

struct Prometheus {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_prometheus(target_port: u16) -> Prometheus {
    let port = free_port();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("prom-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: backfill\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        ),
    )
    .unwrap();
    let child = Command::new(crate::tools::system_tool("prometheus"))
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    let p = Prometheus { child, dir, port };
    let t = Instant::now();
    while http_get(port, "/-/ready").is_none_or(|b| !b.contains("Ready")) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "prometheus did not become ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p
}

fn prom_query(p: &Prometheus, expr: &str) -> serde_json::Value {
    let body = http_get(p.port, &format!("/api/v1/query?query={}", url_encode(expr)))
        .expect("prometheus answers");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v["data"]["result"].clone()
}

#[test]
fn prometheus_scrapes_a_real_run_and_every_dashboard_query_returns_data() {
    let db = TestDb::new();
    counter_table(&db, 3000);
    db.write_job(
        "obs",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 25\nlock_timeout = \"100ms\"\n\
         sql = \"UPDATE t SET n = n + 1 FROM (SELECT pg_sleep(0.02)) s WHERE id BETWEEN :start AND :end\"\n\
         verify = \"SELECT count(*) FROM t WHERE n = 0\"\n",
    );
    let mport = free_port();
    let prom = start_prometheus(mport);
    // A held row lock makes some chunk retry, so the retry series carry real counts.
    let app = db.session();
    app.exec("BEGIN; SELECT * FROM t WHERE id = 1200 FOR UPDATE");
    let child = db.spawn(&[
        "run",
        "obs",
        "--metrics-addr",
        &mport.to_string(),
        "--metrics-linger",
        "6s",
        "--max-attempts",
        "100",
    ]);
    // Hold the run there until Prometheus scrapes it, so the series cover the whole run.
    let t = Instant::now();
    while prom_query(&prom, "backfill_rows_done{backfill_job=\"obs\"}")
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "prometheus never scraped the run"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    app.exec("COMMIT");

    // The endpoint renders every metric of the README's table, and the histogram has buckets.
    db.wait_for("SELECT coalesce((SELECT state = 'done' FROM backfill.checkpoints WHERE job = 'obs'), false)", Duration::from_secs(60));
    let rendered = http_get(mport, "/metrics").expect("metrics endpoint lingers after the run");
    let names = readme_metrics();
    assert!(names.len() >= 15, "{names:?}");
    let exported: Vec<&str> = backfill::telemetry::METRICS.iter().map(|m| m.0).collect();
    assert_eq!(
        names, exported,
        "README metric table and exported metrics differ"
    );
    for n in &names {
        assert!(
            rendered.contains(&format!("# TYPE {n} ")),
            "{n} missing from /metrics:\n{rendered}"
        );
    }
    assert!(
        rendered.contains("# TYPE backfill_chunk_duration_seconds histogram"),
        "{rendered}"
    );
    assert!(
        rendered
            .contains("backfill_chunk_duration_seconds_bucket{backfill_job=\"obs\",le=\"0.05\"}"),
        "{rendered}"
    );
    assert!(
        rendered.contains("backfill_state{backfill_job=\"obs\",state=\"done\"} 1"),
        "{rendered}"
    );
    let retries: f64 = rendered
        .lines()
        .find(|l| {
            l.starts_with("backfill_retries_total{backfill_job=\"obs\",class=\"contention\"}")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(retries >= 1.0, "{rendered}");
    assert!(
        rendered.contains("backfill_rows_processed_total{backfill_job=\"obs\"} 3000"),
        "{rendered}"
    );

    // Prometheus saw the final values, and every dashboard query has data.
    let t = Instant::now();
    while prom_query(
        &prom,
        "backfill_state{backfill_job=\"obs\",state=\"done\"} == 1",
    )
    .as_array()
    .unwrap()
    .is_empty()
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "prometheus never scraped the final state"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The engine's label survives a scrape without `honor_labels`, next to the scrape job's own.
    let series = prom_query(&prom, "backfill_rows_processed_total");
    assert_eq!(series[0]["metric"]["backfill_job"], "obs", "{series}");
    assert_eq!(series[0]["metric"]["job"], "backfill", "{series}");
    assert!(
        series[0]["metric"].get("exported_job").is_none(),
        "{series}"
    );
    // Never held at the end, no failing key, not paused.
    for line in [
        "backfill_held{backfill_job=\"obs\",reason=\"paused\"} 0",
        "backfill_held{backfill_job=\"obs\",reason=\"replication_lag\"} 0",
        "backfill_failing_keys{backfill_job=\"obs\"} 0",
        "backfill_state{backfill_job=\"obs\",state=\"paused\"} 0",
    ] {
        assert!(rendered.contains(line), "{line} missing:\n{rendered}");
    }
    let queries = dashboard_queries();
    assert!(queries.len() >= 12);
    for q in &queries {
        let expr = q
            .replace("$backfill_job", "obs")
            .replace("$shard", ".*")
            .replace("$__rate_interval", "1m");
        let result = prom_query(&prom, &expr);
        let raw = prom_query(&prom, "{__name__=~\"backfill_rows.*\"}[1m]");
        assert!(
            !result.as_array().unwrap().is_empty(),
            "no data for dashboard query {expr}; raw: {raw}"
        );
    }
    let out = wait_out(child, Duration::from_secs(60));
    out.expect(0);
    assert!(
        out.stderr.contains("serving metrics on http://127.0.0.1:"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
}

#[test]
fn progress_lines_when_stderr_is_not_a_terminal() {
    let db = TestDb::new();
    counter_table(&db, 600);
    db.write_job(
        "p",
        &counter_job("").replace("chunk_rows = 100", "chunk_rows = 50"),
    );
    let out = db.run(&["run", "p", "--progress-interval", "1ms"]);
    out.expect(0);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("p: ") && l.contains(" of ~"))
        .collect();
    assert!(lines.len() >= 5, "{out:?}");
    for l in &lines {
        // p: 150 of ~600 rows (25.0%), 5.0k rows/s, eta 0s, chunk 50 rows, 1 worker, elapsed 00:00:00
        let rest = l.strip_prefix("p: ").unwrap();
        let (done, rest) = rest
            .split_once(" of ~600 rows (")
            .unwrap_or_else(|| panic!("{l}"));
        done.parse::<u64>().unwrap();
        let (pct, rest) = rest.split_once("%), ").unwrap();
        assert!(pct.parse::<f64>().unwrap() <= 100.0, "{l}");
        assert!(
            rest.contains(" rows/s, eta ") && rest.contains(", chunk 50 rows, 1 worker, elapsed "),
            "{l}"
        );
    }

    db.exec("UPDATE t SET n = 0");
    db.run(&["reset", "p", "--yes"]).expect(0);
    let out = db.run(&[
        "--log-format",
        "json",
        "run",
        "p",
        "--progress-interval",
        "1ms",
    ]);
    out.expect(0);
    let mut progress = 0;
    for l in out.stderr.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert_eq!(v["job"], "p");
        assert!(v["ts"].is_string(), "{l}");
        if v["event"] == "progress" {
            progress += 1;
            assert!(v["rows_done"].as_u64().unwrap() <= 600);
            assert_eq!(v["chunk_rows"], 50);
            assert_eq!(v["rows_total_estimate"], 600);
        }
    }
    assert!(progress >= 5, "{out:?}");
}

#[test]
fn status_json_and_history_match_the_table() {
    let db = TestDb::new();
    counter_table(&db, 400);
    // A quarter of the rows is filled already and the statement skips them, so keys done and
    // rows changed differ; both are checked against the table itself, not the engine's tables.
    db.exec("UPDATE t SET n = 7 WHERE id % 4 = 0");
    db.write_job(
        "h",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"UPDATE t SET n = 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n\
         verify = \"SELECT count(*) FROM t WHERE n = 0\"\n\
         throttle = { target_chunk_time = \"0s\" }\n",
    );
    let keys = db.i64("SELECT count(*) FROM t");
    let to_fill = db.i64("SELECT count(*) FROM t WHERE n = 0");
    assert!(to_fill < keys && to_fill > 0);
    db.run(&["run", "h"]).expect(0);
    db.exec("UPDATE t SET n = 0 WHERE n = 1");
    db.run(&["reset", "h", "--yes"]).expect(0);
    db.run(&["run", "h", "--chunk-rows", "50"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n = 0"), 0);
    let filled = db.i64("SELECT count(*) FROM t WHERE n = 1");
    assert_eq!(filled, to_fill);
    let s: serde_json::Value =
        serde_json::from_str(&db.run(&["status", "h", "--json"]).stdout).unwrap();
    let c = &s["checkpoint"];
    assert_eq!(s["state"], "done");
    assert_eq!(c["rows_done"], keys, "every key visited once");
    assert_eq!(c["rows_affected"], filled, "rows the statement changed");
    assert_eq!(c["chunks_done"], (keys + 49) / 50, "chunks of 50 keys");
    assert_eq!(c["total_estimate"], keys);
    assert_eq!(c["total_exact"], true);
    assert_eq!(c["verify_remaining"], 0);
    assert_eq!(
        c["cursor"][0],
        db.text("SELECT max(id)::text FROM t").unwrap().as_str()
    );
    let out = db.run(&["history", "h", "--json"]);
    let h: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let runs = h.as_array().unwrap();
    assert_eq!(runs.len(), 2, "{out:?}");
    for (run, chunk_rows) in runs.iter().zip([100, 50]) {
        assert_eq!(run["outcome"], "done", "{run}");
        assert_eq!(run["rows_done"], keys, "{run}");
        assert_eq!(
            run["chunks_done"],
            (keys + chunk_rows - 1) / chunk_rows,
            "{run}"
        );
        assert_eq!(run["engine_version"], env!("CARGO_PKG_VERSION"));
    }
    let out = db.run(&["history", "h"]);
    assert!(
        out.stdout.lines().count() == 3 && out.stdout.contains("done"),
        "{out:?}"
    );
}

/// The shipped alert rules are valid, and their unit tests (grafana/alerts_test.yml: each rule
/// firing for the jobs it must, and not for a held, paused or progressing one) pass.
#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let grafana = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana");
    let promtool = crate::tools::system_tool("promtool");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&grafana)
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = std::fs::read_to_string(grafana.join("alerts.yml")).unwrap();
    for alert in [
        "BackfillStalled",
        "BackfillHeldTooLong",
        "BackfillFailingKeys",
        "BackfillFailed",
    ] {
        assert!(rules.contains(&format!("- alert: {alert}\n")), "{alert}");
    }
}

/// The value of one rendered series (`name{labels}`), if the endpoint has it.
fn series_value(rendered: &str, series: &str) -> Option<f64> {
    rendered
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls the metrics endpoint until `series` has `value`; returns the page.
fn wait_for_series(port: u16, series: &str, value: f64) -> String {
    let t = Instant::now();
    loop {
        let page = http_get(port, "/metrics").unwrap_or_default();
        if series_value(&page, series) == Some(value) {
            return page;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{series} never became {value}:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_paused_run_and_the_jobs_failing_keys_show_in_its_metrics() {
    let db = TestDb::new();
    counter_table(&db, 600);
    // Key 301 fails with a data error (division by zero) and is skipped.
    db.write_job(
        "m",
        &counter_job("on_error = \"skip\"\n").replace("n = n + 1", "n = n + 1 + 0 / (id - 301)"),
    );
    assert_eq!(db.run(&["run", "m"]).code, 1, "verify still counts key 301");
    db.exec("UPDATE t SET n = 0");
    db.run(&["reset", "m", "--yes"]).expect(0);
    db.run(&["pause", "m"]).expect(0);
    let port = free_port();
    let child = db.spawn(&[
        "run",
        "m",
        "--metrics-addr",
        &port.to_string(),
        "--metrics-linger",
        "5s",
    ]);
    let paused = "backfill_state{backfill_job=\"m\",state=\"paused\"}";
    let page = wait_for_series(port, paused, 1.0);
    for (series, value) in [
        ("backfill_state{backfill_job=\"m\",state=\"running\"}", 0.0),
        ("backfill_held{backfill_job=\"m\",reason=\"paused\"}", 1.0),
        (
            "backfill_held{backfill_job=\"m\",reason=\"replication_lag\"}",
            0.0,
        ),
        // The key the first run recorded, counted from the store at the start.
        ("backfill_failing_keys{backfill_job=\"m\"}", 1.0),
    ] {
        assert_eq!(
            series_value(&page, series),
            Some(value),
            "{series}:\n{page}"
        );
    }
    db.run(&["resume", "m"]).expect(0);
    let page = wait_for_series(
        port,
        "backfill_state{backfill_job=\"m\",state=\"incomplete\"}",
        1.0,
    );
    for (series, value) in [
        (paused, 0.0),
        ("backfill_state{backfill_job=\"m\",state=\"running\"}", 0.0),
        ("backfill_held{backfill_job=\"m\",reason=\"paused\"}", 0.0),
        // Key 301 failed again: still one failing key, not two.
        ("backfill_failing_keys{backfill_job=\"m\"}", 1.0),
    ] {
        assert_eq!(
            series_value(&page, series),
            Some(value),
            "{series}:\n{page}"
        );
    }
    assert_eq!(wait_out(child, Duration::from_secs(60)).code, 1);
    assert_eq!(
        db.i64("SELECT count(*) FROM backfill.failures WHERE job = 'm'"),
        1
    );
}
