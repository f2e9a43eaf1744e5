//! `cargo bench`: the engine against the alternatives, measured in one run on one database,
//! alternating the contenders, median of several rounds. Prints a markdown report and writes it
//! to `target/bench/report.md`.
//!
//! Sections: throughput against a single UPDATE and the usual hand-written loops; scaling with
//! table size; the engine's own CPU and memory; the remote database (the server-side contenders
//! and the engine, straight and through a latency proxy, side by side, with the engine's chunk
//! size and round trips per chunk); impact on live traffic (the real pgbench, with the engine
//! also through the proxy); the targets of issue 18 as ratios, each with its target and whether
//! it was met (never an assertion: a missed target does not fail the bench).
//!
//! The throwaway cluster runs with production-like durability (fsync, synchronous_commit and
//! full_page_writes on, shared_buffers a quarter of RAM capped at 4 GB); the report states the
//! settings as the server reports them (`SHOW`), so also for an external database.
//!
//! Options (after `cargo bench --bench compare --`): `--rows N` (default 1,000,000), `--rounds N`
//! (3), `--scale N,N,…` (sizes for the scaling section, default 100000 and --rows), `--budget S`
//! (seconds a slow contender may take before it is stopped, 120), `--pgbench-scale N` (10),
//! `--pgbench-seconds N` (15), `--rtt D` (the round trip the latency proxy adds: `1ms` by
//! default, `250us`, `2ms`…; `0`: no proxy, the proxied half is skipped), `--impact-only` (just
//! the live-traffic section), `--quick` (small sizes, one round: CI keeps the bench working).
//! `BACKFILL_BENCH_DATABASE_URL` benchmarks an existing (scratch) database instead of a throwaway
//! one; it refuses to replace existing `orders` or pgbench tables unless
//! `BACKFILL_BENCH_OVERWRITE=yes`. The proxy then forwards to the URL's host and port (a URL
//! without a single TCP host skips the proxied half, and the report says why).
//!
//! Modules, each importing only those before it: `latency_proxy` (the integration tests'
//! proxy, included by path: one implementation for both), `network` (the proxy in front of the
//! server, the routes, the measured round trip), `measured` (the contenders, scenarios and
//! measurements: plain data), `engine` (runs the `backfill` binary, reads its rusage and its
//! JSON counters), `report` (collects the measurements and writes the markdown), `targets` (the
//! ratios against issue 18's targets), then the sections that measure, `contenders`, `remote`
//! and `impact`.

mod contenders;
mod engine;
mod impact;
#[path = "../../tests/it/latency_proxy.rs"]
mod latency_proxy;
mod measured;
mod network;
mod remote;
mod report;
mod targets;

use backfill::db::Target;
use backfill::pgtemp::TempCluster;
use network::{Remote, Route};
use std::path::PathBuf;
use std::time::Duration;

pub struct Args {
    rows: u64,
    rounds: usize,
    scale: Vec<u64>,
    budget: Duration,
    pgbench_scale: u32,
    pgbench_seconds: u64,
    /// Only the live-traffic section (`--impact-only`).
    impact_only: bool,
    /// The round trip the latency proxy adds (`--rtt`); zero: no proxy.
    rtt: Duration,
}

fn parse_args() -> Args {
    let mut a = Args {
        rows: 1_000_000,
        rounds: 3,
        scale: Vec::new(),
        budget: Duration::from_secs(120),
        pgbench_scale: 10,
        pgbench_seconds: 15,
        impact_only: false,
        rtt: Duration::from_millis(1),
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> u64 {
        v.and_then(|s| s.replace('_', "").parse().ok())
            .unwrap_or_else(|| panic!("{what} needs a number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--rows" => a.rows = num(it.next(), "--rows"),
            "--rounds" => a.rounds = num(it.next(), "--rounds").max(1) as usize,
            "--budget" => a.budget = Duration::from_secs(num(it.next(), "--budget")),
            "--pgbench-scale" => a.pgbench_scale = num(it.next(), "--pgbench-scale") as u32,
            "--pgbench-seconds" => a.pgbench_seconds = num(it.next(), "--pgbench-seconds"),
            "--scale" => {
                a.scale = it
                    .next()
                    .expect("--scale needs sizes")
                    .split(',')
                    .map(|s| num(Some(s.to_string()), "--scale"))
                    .collect()
            }
            "--impact-only" => a.impact_only = true,
            "--rtt" => a.rtt = network::parse_rtt(&it.next().expect("--rtt needs a duration")),
            "--quick" => {
                a.rows = 20_000;
                a.rounds = 1;
                a.scale = vec![5_000, 20_000];
                a.budget = Duration::from_secs(30);
                a.pgbench_scale = 1;
                a.pgbench_seconds = 4;
            }
            // cargo passes --bench; anything else is a filter we do not use.
            _ => {}
        }
    }
    if a.scale.is_empty() {
        a.scale = vec![100_000, a.rows];
    }
    a
}

/// Where the benchmark runs: a throwaway cluster, or the database the user named.
pub struct Server {
    pub url: String,
    /// For pgbench: a URL it can use (TCP for the throwaway cluster).
    pub pgbench_url: String,
    pub bin_dir: PathBuf,
    /// The latency proxy in front of the server, or why there is none.
    pub remote: Result<Remote, String>,
    _cluster: Option<TempCluster>,
}

/// Production-like durability for the throwaway cluster: every commit flushed to disk, full
/// page images, and shared_buffers a quarter of RAM capped at 4 GB.
fn durable_settings() -> Vec<String> {
    let ram_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("MemTotal"))?;
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .unwrap_or(512 * 1024);
    let buffers_mb = (ram_kb / 4 / 1024).clamp(128, 4096);
    vec![
        "fsync=on".into(),
        "synchronous_commit=on".into(),
        "full_page_writes=on".into(),
        format!("shared_buffers={buffers_mb}MB"),
    ]
}

fn server(rtt: Duration) -> Server {
    if let Ok(url) = std::env::var("BACKFILL_BENCH_DATABASE_URL") {
        if !url.trim().is_empty() {
            return Server {
                pgbench_url: url.clone(),
                remote: network::remote(&url, rtt),
                url,
                bin_dir: backfill::pgtemp::find_bin_dir().expect("PostgreSQL binaries (pgbench)"),
                _cluster: None,
            };
        }
    }
    let c = TempCluster::start_with(&durable_settings())
        .expect("a throwaway PostgreSQL (install the server binaries)");
    Server {
        url: c.url("postgres"),
        pgbench_url: c.tcp_url("postgres"),
        bin_dir: c.bin_dir().to_path_buf(),
        remote: network::remote(&c.tcp_url("postgres"), rtt),
        _cluster: Some(c),
    }
}

impl Server {
    fn is_external(&self) -> bool {
        self._cluster.is_none()
    }

    /// The URL a contender uses on `route` (the proxy's: only when there is one).
    pub fn url_for(&self, route: Route) -> &str {
        match (route, &self.remote) {
            (Route::Proxy, Ok(r)) => &r.url,
            (Route::Proxy, Err(why)) => panic!("no proxy ({why})"),
            (Route::Loopback, _) => &self.url,
        }
    }

    /// Round trips the proxy has counted so far (0 without a proxy).
    pub fn flights(&self) -> u64 {
        self.remote.as_ref().map(|r| r.proxy.flights()).unwrap_or(0)
    }
}

/// The benchmark drops and recreates `orders` and the pgbench tables: on a database the user
/// named, it refuses to replace existing ones unless told to.
async fn refuse_to_overwrite(server: &Server) {
    let c = connect(&server.url).await;
    let existing: Vec<String> = c
        .query(
            "SELECT t FROM unnest(ARRAY['orders', 'pgbench_accounts', 'pgbench_branches', 'pgbench_tellers', 'pgbench_history']) t
              WHERE to_regclass(t) IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !existing.is_empty() && std::env::var("BACKFILL_BENCH_OVERWRITE").as_deref() != Ok("yes") {
        eprintln!(
            "bench: the database of BACKFILL_BENCH_DATABASE_URL has table(s) {}; the benchmark drops and recreates them. Use a scratch database, or set BACKFILL_BENCH_OVERWRITE=yes",
            existing.join(", ")
        );
        std::process::exit(2);
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    Target::resolve(Some(url))
        .expect("a valid URL")
        .connect()
        .await
        .expect("a connection to the benchmark database")
}

fn main() {
    let args = parse_args();
    let server = server(args.rtt);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if server.is_external() {
        rt.block_on(refuse_to_overwrite(&server));
    }
    let mut report = rt.block_on(report::Report::new(&server));
    report.budget = args.budget;
    if !args.impact_only {
        eprintln!(
            "bench: throughput at {} rows, {} round(s)",
            args.rows, args.rounds
        );
        rt.block_on(contenders::throughput(&server, &args, &mut report));
        eprintln!("bench: scaling at {:?} rows", args.scale);
        rt.block_on(contenders::scaling(&server, &args, &mut report));
        eprintln!("bench: remote database at {} rows", args.rows);
        rt.block_on(remote::remote(&server, &args, &mut report));
    }
    eprintln!(
        "bench: impact on pgbench (scale {}, {} s per scenario)",
        args.pgbench_scale, args.pgbench_seconds
    );
    rt.block_on(impact::impact(&server, &args, &mut report));
    let mut md = report.markdown();
    targets::markdown(&report, &mut md);
    println!("{md}");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("report.md"), &md).unwrap();
    eprintln!(
        "bench: report written to {}",
        dir.join("report.md").display()
    );
}
