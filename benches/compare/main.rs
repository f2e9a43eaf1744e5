//! `cargo bench`: the engine against the alternatives, measured in one run on one database,
//! alternating the contenders, median of several rounds. Prints a markdown report and writes it
//! to `target/bench/report.md`.
//!
//! Sections: throughput against a single UPDATE and the usual hand-written loops; scaling with
//! table size; impact on live traffic (the real pgbench); the engine's own CPU and memory.
//!
//! Options (after `cargo bench --bench compare --`): `--rows N` (default 1,000,000), `--rounds N`
//! (3), `--scale N,N,…` (sizes for the scaling section, default 100000 and --rows), `--budget S`
//! (seconds a slow contender may take before it is stopped, 120), `--pgbench-scale N` (10),
//! `--pgbench-seconds N` (15), `--impact-only` (just the live-traffic section), `--quick` (small
//! sizes, one round: CI keeps the bench working).
//! `BACKFILL_BENCH_DATABASE_URL` benchmarks an existing (scratch) database instead of a throwaway
//! one; it refuses to replace existing `orders` or pgbench tables unless
//! `BACKFILL_BENCH_OVERWRITE=yes`.
//!
//! Modules, each importing only those before it: `measured` (the contenders, scenarios and
//! measurements: plain data), `engine` (runs the `backfill` binary and reads its rusage),
//! `report` (collects the measurements and writes the markdown), then the sections that measure,
//! `contenders` and `impact`.

mod contenders;
mod engine;
mod impact;
mod measured;
mod report;

use backfill::db::Target;
use backfill::pgtemp::TempCluster;
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
    _cluster: Option<TempCluster>,
}

fn server() -> Server {
    if let Ok(url) = std::env::var("BACKFILL_BENCH_DATABASE_URL") {
        if !url.trim().is_empty() {
            return Server {
                pgbench_url: url.clone(),
                url,
                bin_dir: backfill::pgtemp::find_bin_dir().expect("PostgreSQL binaries (pgbench)"),
                _cluster: None,
            };
        }
    }
    let c = TempCluster::start().expect("a throwaway PostgreSQL (install the server binaries)");
    Server {
        url: c.url("postgres"),
        pgbench_url: c.tcp_url("postgres"),
        bin_dir: c.bin_dir().to_path_buf(),
        _cluster: Some(c),
    }
}

impl Server {
    fn is_external(&self) -> bool {
        self._cluster.is_none()
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
    let server = server();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if server.is_external() {
        rt.block_on(refuse_to_overwrite(&server));
    }
    let mut report = rt.block_on(report::Report::new(&server));
    eprintln!(
        "bench: throughput at {} rows, {} round(s)",
        args.rows, args.rounds
    );
    rt.block_on(contenders::throughput(&server, &args, &mut report));
    eprintln!("bench: scaling at {:?} rows", args.scale);
    rt.block_on(contenders::scaling(&server, &args, &mut report));
    eprintln!(
        "bench: impact on pgbench (scale {}, {} s per scenario)",
        args.pgbench_scale, args.pgbench_seconds
    );
    rt.block_on(impact::impact(&server, &args, &mut report));
    let md = report.markdown();
    println!("{md}");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("report.md"), &md).unwrap();
    eprintln!(
        "bench: report written to {}",
        dir.join("report.md").display()
    );
}
