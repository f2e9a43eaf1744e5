//! Impact on live traffic: the real pgbench runs its TPC-B-like load (4 clients) while a new
//! column of `pgbench_accounts` is backfilled, and its per-transaction log gives throughput, p99
//! and max latency, and failed transactions over the time the backfill ran. Every measurement
//! starts from freshly initialised pgbench tables (the same state for every scenario); the
//! scenarios alternate over the rounds and each figure is the median of its rounds. With a
//! latency proxy (`--rtt`), the engine at defaults runs once more through it, pgbench staying on
//! loopback: the application is near its database, the backfill is not.
//!
//! Measures; never prints the report (that is `report`) and never asserts a speed.

use crate::engine;
use crate::engine::EngineRun;
use crate::measured::{ImpactRow, Scenario};
use crate::network::Route;
use crate::report::Report;
use crate::{connect, Args, Server};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

pub async fn impact(server: &Server, args: &Args, report: &mut Report) {
    let accounts = args.pgbench_scale as u64 * 100_000;
    report.pgbench_accounts = accounts;
    // The ceiling spreads the backfill over about 60 % of the pgbench run.
    let ceiling = ((accounts as f64 / (args.pgbench_seconds as f64 * 0.6)) as u32).max(1000);
    let mut scenarios = vec![
        Scenario::NoBackfill,
        Scenario::SingleUpdate,
        Scenario::EngineDefaults,
        Scenario::EngineCeiling(ceiling),
        Scenario::EngineTarget(50),
    ];
    if server.remote.is_ok() {
        scenarios.push(Scenario::EngineDefaultsProxied);
    }
    let mut rows: Vec<Vec<ImpactRow>> = scenarios.iter().map(|_| Vec::new()).collect();
    let mut n = 0;
    for round in 0..args.rounds {
        for i in 0..scenarios.len() {
            let k = (i + round) % scenarios.len();
            let row = measure(server, args, scenarios[k], n, &report.jobs_dir()).await;
            n += 1;
            rows[k].push(row);
        }
    }
    report.impact_rounds = args.rounds;
    report.impact = scenarios
        .into_iter()
        .zip(rows)
        .map(|(s, rows)| ImpactRow::median(s, rows))
        .collect();
}

/// Fresh pgbench tables: every scenario meets the same table (no dead rows or extra columns
/// left by the one before).
fn init_pgbench(server: &Server, args: &Args) {
    let init = Command::new(server.bin_dir.join("pgbench"))
        .args(["-i", "-q", "-s", &args.pgbench_scale.to_string()])
        .arg(&server.pgbench_url)
        .output()
        .expect("pgbench (shipped with PostgreSQL)");
    assert!(init.status.success(), "pgbench -i: {init:?}");
}

/// One scenario once: pgbench for `--pgbench-seconds`, the backfill (if any) started 1.5 s in.
async fn measure(
    server: &Server,
    args: &Args,
    s: Scenario,
    i: usize,
    dir: &std::path::Path,
) -> ImpactRow {
    init_pgbench(server, args);
    let col = format!("bf{i}");
    let c = connect(&server.url).await;
    c.batch_execute(&format!(
        "ALTER TABLE pgbench_accounts ADD COLUMN {col} int"
    ))
    .await
    .unwrap();
    c.batch_execute("VACUUM pgbench_accounts").await.unwrap();
    // Every scenario starts right after a checkpoint: the WAL of the fresh pgbench tables would
    // otherwise request one at a random point of some scenarios, and its burst of full-page
    // writes stalls every client for ~0.4 s (reproduced by forcing a CHECKPOINT mid-run: the
    // four clients' worst transactions all end at its moment, with no lock wait on the
    // backfill's rows), which would be booked on the scenario it fell into.
    c.batch_execute("CHECKPOINT").await.unwrap();
    let load_ends = now_us() + args.pgbench_seconds as u128 * 1_000_000;
    let load = start_load(server, args, &dir.join(format!("pgbench{i}")));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let start = now_us();
    let t = Instant::now();
    let finished = backfill(server, args, s, &c, &col, dir).await;
    // A run stopped at the budget took "more than the budget": shown as such.
    let took = (s != Scenario::NoBackfill).then(|| match finished {
        true => t.elapsed().as_secs_f64(),
        false => f64::INFINITY,
    });
    let end = if s == Scenario::NoBackfill {
        load_ends
    } else {
        now_us().min(load_ends)
    }
    .max(start + 1);
    let out = load.wait_with_output().unwrap();
    assert!(out.status.success(), "pgbench: {out:?}");
    let mut tally = read_logs(dir, i, start, end);
    tally.lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let lat = &tally.lat;
    let window = ((end - start) as f64) / 1e6;
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    eprintln!(
        "bench: pgbench during {}: {} tx in {window:.1}s",
        s.label(),
        lat.len()
    );
    ImpactRow {
        scenario: s,
        tps: tally.completed as f64 / window,
        p99_ms: pct(0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
        failed: tally.failed,
        backfill_seconds: took,
    }
}

/// pgbench's load (4 clients, 2 threads) for `--pgbench-seconds`, logging every transaction
/// under `prefix`.
fn start_load(server: &Server, args: &Args, prefix: &std::path::Path) -> Child {
    Command::new(server.bin_dir.join("pgbench"))
        .args([
            "-c",
            "4",
            "-j",
            "2",
            "-l",
            "-T",
            &args.pgbench_seconds.to_string(),
        ])
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg(&server.pgbench_url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench")
}

/// The scenario's backfill of `col`, run to its end; false: the engine was stopped at the
/// budget (`--pgbench-seconds` × 10).
async fn backfill(
    server: &Server,
    args: &Args,
    s: Scenario,
    c: &tokio_postgres::Client,
    col: &str,
    dir: &std::path::Path,
) -> bool {
    let throttle = match s {
        Scenario::NoBackfill => return true,
        Scenario::SingleUpdate => {
            c.execute(
                &format!("UPDATE pgbench_accounts SET {col} = abalance"),
                &[],
            )
            .await
            .unwrap();
            return true;
        }
        Scenario::EngineDefaults | Scenario::EngineDefaultsProxied => String::new(),
        Scenario::EngineCeiling(r) => format!("[throttle]\nrows_per_second = {r}\n"),
        Scenario::EngineTarget(ms) => format!("[throttle]\ntarget_chunk_time = \"{ms}ms\"\n"),
    };
    std::fs::write(
        dir.join(format!("{col}.toml")),
        format!(
            "table = \"pgbench_accounts\"\nkey = [\"aid\"]\n\
             sql = \"UPDATE pgbench_accounts SET {col} = abalance WHERE aid BETWEEN :start AND :end AND {col} IS NULL\"\n{throttle}"
        ),
    )
    .unwrap();
    let route = match s {
        Scenario::EngineDefaultsProxied => Route::Proxy,
        _ => Route::Loopback,
    };
    let cmd = engine::command(server.url_for(route), dir, &["run", col]);
    let budget = Duration::from_secs(args.pgbench_seconds * 10);
    let run = tokio::task::spawn_blocking(move || engine::run_measured(cmd, budget));
    match run.await.unwrap() {
        Ok(_) => true,
        Err(EngineRun::OverBudget(_)) => false,
        Err(e) => panic!("{}: the engine run failed: {e:?}", s.label()),
    }
}

/// What pgbench's logs say about a window of time.
struct Tally {
    /// Latency (ms) of each transaction that overlapped the window, unsorted.
    lat: Vec<f64>,
    /// Transactions that completed inside the window.
    completed: u64,
    /// Transactions that overlapped the window and failed.
    failed: u64,
}

/// Reads the per-transaction logs of measurement `i` for the window `start..=end` (µs since
/// the epoch).
fn read_logs(dir: &std::path::Path, i: usize, start: u128, end: u128) -> Tally {
    // Latency and failures count every transaction that overlapped the window (those the
    // backfill blocked finish after it); throughput counts those that completed inside it.
    let mut tally = Tally {
        lat: Vec::new(),
        completed: 0,
        failed: 0,
    };
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with(&format!("pgbench{i}.")) {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            // client_id transaction_no time script_no time_epoch time_us …
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 {
                continue;
            }
            let at =
                f[4].parse::<u128>().unwrap_or(0) * 1_000_000 + f[5].parse::<u128>().unwrap_or(0);
            let us = f[2].parse::<f64>().ok();
            let began = at.saturating_sub(us.unwrap_or(0.0) as u128);
            if at < start || began > end {
                continue;
            }
            if at <= end {
                tally.completed += 1;
            }
            match us {
                Some(us) => tally.lat.push(us / 1000.0),
                None => tally.failed += 1,
            }
        }
    }
    tally
}
