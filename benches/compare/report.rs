//! The report: the sections' measurements, collected, and their markdown: medians, ratios,
//! growth factors, the engine's own CPU and peak memory, the remote database side by side with
//! loopback, and the machine and server settings (as `SHOW` reports them) it ran on. The
//! targets that follow these sections are `targets`'.
//!
//! Depends only on the measured data (`measured`, `network`'s routes); the sections that measure
//! fill it in, and it never runs anything but the queries for the server's settings.

use crate::measured::{Contender, ImpactRow, Measured, Results, RouteResults};
use crate::network::Route;
use crate::Server;
use std::path::PathBuf;
use std::time::Duration;

pub struct Report {
    machine: String,
    server: String,
    dir: PathBuf,
    pub throughput_rows: u64,
    pub throughput: Results,
    pub scaling: Vec<(u64, Results)>,
    pub pgbench_accounts: u64,
    pub impact_rounds: usize,
    pub impact: Vec<ImpactRow>,
    /// The "remote database" section, or why it did not run.
    pub remote: Result<RemoteReport, String>,
    /// `--budget`: a contender that ran out of it took at least that long.
    pub budget: Duration,
}

/// The "remote database" section's measurements.
pub struct RemoteReport {
    /// The round trip the proxy adds (`--rtt`).
    pub rtt: Duration,
    /// `SELECT 1` straight to the server and through the proxy, as measured.
    pub loopback_rtt: Duration,
    pub proxied_rtt: Duration,
    pub rows: u64,
    pub results: RouteResults,
}

impl RemoteReport {
    /// The measurements of a contender on a route.
    pub fn of(&self, c: Contender, r: Route) -> &[Measured] {
        self.results
            .iter()
            .find(|(x, _)| *x == (c, r))
            .map(|(_, m)| m.as_slice())
            .unwrap_or(&[])
    }
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
}

fn median_f64(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Median time over the rounds; None when any round ran out of budget.
pub fn median_time(ms: &[Measured]) -> Option<Duration> {
    let times: Option<Vec<Duration>> = ms.iter().map(|m| m.time).collect();
    median(times?)
}

fn secs(d: Option<Duration>, budget_note: &str) -> String {
    d.map(|d| format!("{:.2} s", d.as_secs_f64()))
        .unwrap_or_else(|| format!("> {budget_note}"))
}

impl Report {
    pub async fn new(server: &Server) -> Report {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let mem_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0 / 1024.0)
            .unwrap_or(0.0);
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let c = crate::connect(&server.url).await;
        let mut shown = Vec::new();
        for name in [
            "server_version",
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "shared_buffers",
        ] {
            let rows = c.simple_query(&format!("SHOW {name}")).await.unwrap();
            let value = rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            });
            shown.push(value.unwrap_or_default());
        }
        let [v, fsync, sync, fpw, sb] = <[String; 5]>::try_from(shown).unwrap();
        let place = if server.is_external() {
            "at BACKFILL_BENCH_DATABASE_URL"
        } else {
            "on the same machine, a throwaway cluster"
        };
        let dir = std::env::temp_dir().join(format!("backfill-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Report {
            machine: format!("{cores} cores ({cpu}), {mem_gib:.0} GiB RAM"),
            server: format!(
                "PostgreSQL {v} {place}, settings as SHOW reports them: fsync={fsync}, synchronous_commit={sync}, full_page_writes={fpw}, shared_buffers={sb}"
            ),
            dir,
            throughput_rows: 0,
            throughput: Vec::new(),
            scaling: Vec::new(),
            pgbench_accounts: 0,
            impact_rounds: 0,
            impact: Vec::new(),
            remote: Err("not run (--impact-only)".into()),
            budget: Duration::ZERO,
        }
    }

    /// A directory for job files and pgbench logs, removed when the report is dropped.
    pub fn jobs_dir(&self) -> PathBuf {
        self.dir.clone()
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        self.machine_md(&mut s);
        self.throughput_md(&mut s);
        self.scaling_md(&mut s);
        self.overhead_md(&mut s);
        self.remote_md(&mut s);
        self.impact_md(&mut s);
        s
    }

    /// The machine and the server the figures come from.
    fn machine_md(&self, s: &mut String) {
        push_line(s, &format!("Machine: {}. {}.", self.machine, self.server));
        push_line(s, "");
    }

    /// Each contender at `--rows`: time, rows/s, and throughput relative to (a) and to (d).
    fn throughput_md(&self, s: &mut String) {
        push_line(s, &format!("**Throughput**, {} rows, median of the rounds; throughput relative to (a) and to (d):", self.throughput_rows));
        push_line(s, "");
        push_line(s, "| contender | time | rows/s | × (a) | × (d) |");
        push_line(s, "|---|---:|---:|---:|---:|");
        let med = |c: Contender| {
            self.throughput
                .iter()
                .find(|(x, _)| *x == c)
                .and_then(|(_, m)| median_time(m))
        };
        let a = med(Contender::SingleUpdate);
        let d = med(Contender::PlpgsqlKeyset);
        for (c, ms) in &self.throughput {
            let t = median_time(ms);
            let ratio = |base: Option<Duration>| match (base, t) {
                (Some(b), Some(t)) => format!("{:.2}", b.as_secs_f64() / t.as_secs_f64()),
                _ => "–".into(),
            };
            push_line(
                s,
                &format!(
                    "| {} | {} | {} | {} | {} |",
                    c.label(),
                    secs(t, "budget"),
                    t.map(|t| format!("{:.0}", self.throughput_rows as f64 / t.as_secs_f64()))
                        .unwrap_or_else(|| "–".into()),
                    ratio(a),
                    ratio(d)
                ),
            );
        }
        push_line(s, "");
    }

    /// Median time by table size for the engine and the two loops that slow down with it, and
    /// the growth from the previous size.
    fn scaling_md(&self, s: &mut String) {
        push_line(
            s,
            "**Scaling**, median time by table size, and growth from the previous size:",
        );
        push_line(s, "");
        let who = [
            Contender::Engine,
            Contender::NullScanLoop,
            Contender::OffsetLoop,
        ];
        let mut header = "| rows |".to_string();
        let mut rule = "|---:|".to_string();
        for c in who {
            header.push_str(&format!(" {} | growth |", c.label()));
            rule.push_str("---:|---:|");
        }
        push_line(s, &header);
        push_line(s, &rule);
        let mut prev: Vec<Option<Duration>> = vec![None; who.len()];
        let mut prev_rows = 0u64;
        for (rows, results) in &self.scaling {
            let mut line = format!("| {rows} |");
            for (i, c) in who.iter().enumerate() {
                let t = results
                    .iter()
                    .find(|(x, _)| x == c)
                    .and_then(|(_, m)| median_time(m));
                let growth = match (prev[i], t) {
                    (Some(p), Some(t)) => format!(
                        "{:.1}× for {:.0}× rows",
                        t.as_secs_f64() / p.as_secs_f64(),
                        *rows as f64 / prev_rows as f64
                    ),
                    _ => "–".into(),
                };
                line.push_str(&format!(" {} | {} |", secs(t, "budget"), growth));
                prev[i] = t;
            }
            prev_rows = *rows;
            push_line(s, &line);
        }
        push_line(s, "");
    }

    /// The engine process's own CPU per million rows and peak memory, by table size.
    fn overhead_md(&self, s: &mut String) {
        push_line(
            s,
            "**Engine overhead** (the `backfill` process itself, from wait4's rusage):",
        );
        push_line(s, "");
        push_line(s, "| rows | CPU s per million rows | peak RSS |");
        push_line(s, "|---:|---:|---:|");
        for (rows, results) in &self.scaling {
            if let Some((_, ms)) = results.iter().find(|(c, _)| *c == Contender::Engine) {
                let cpu = median(ms.iter().filter_map(|m| m.cpu).collect());
                let rss = ms.iter().filter_map(|m| m.rss_kb).max();
                push_line(
                    s,
                    &format!(
                        "| {rows} | {} | {} |",
                        cpu.map(|c| format!("{:.2}", c.as_secs_f64() * 1e6 / *rows as f64))
                            .unwrap_or_else(|| "–".into()),
                        rss.map(|k| format!("{:.1} MB", k as f64 / 1024.0))
                            .unwrap_or_else(|| "–".into())
                    ),
                );
            }
        }
        push_line(s, "");
    }

    /// pgbench's throughput, latency and failures while each scenario ran, p99 relative to no
    /// backfill.
    fn impact_md(&self, s: &mut String) {
        push_line(
            s,
            &format!(
                "**Impact on live traffic**: pgbench TPC-B-like, 4 clients, {} accounts, fresh tables for every measurement, scenarios alternating, median of {} round(s); figures over the time the backfill ran (for no backfill, the whole run):",
                self.pgbench_accounts, self.impact_rounds
            ),
        );
        push_line(s, "");
        push_line(
            s,
            "| scenario | backfill took | tps | p99 latency | max latency | failed tx |",
        );
        push_line(s, "|---|---:|---:|---:|---:|---:|");
        let base_p99 = self.impact.first().map(|r| r.p99_ms);
        for r in &self.impact {
            let rel = match base_p99 {
                Some(b) if b > 0.0 => format!(" ({:.1}×)", r.p99_ms / b),
                _ => String::new(),
            };
            push_line(
                s,
                &format!(
                    "| {} | {} | {:.0} | {:.1} ms{rel} | {:.1} ms | {} |",
                    r.scenario.label(),
                    match r.backfill_seconds {
                        Some(t) if t.is_infinite() => "> budget".into(),
                        Some(t) => format!("{t:.1} s"),
                        None => "–".into(),
                    },
                    r.tps,
                    r.p99_ms,
                    r.max_ms,
                    r.failed
                ),
            );
        }
    }
}

impl Report {
    /// The remote database section: each contender straight and through the proxy, then the
    /// engine's chunk size and round trips per chunk on each route.
    fn remote_md(&self, s: &mut String) {
        let r = match &self.remote {
            Ok(r) => r,
            Err(why) => {
                push_line(s, &format!("**Remote database**: not measured: {why}."));
                push_line(s, "");
                return;
            }
        };
        let rounds = r.results.first().map(|(_, m)| m.len()).unwrap_or(0);
        push_line(s, &format!(
            "**Remote database**: a latency proxy on loopback adds {} per round trip (`SELECT 1`: {} straight, {} through the proxy); {} rows, straight and through the proxy alternating, median of {rounds} round(s):",
            ms(r.rtt), ms(r.loopback_rtt), ms(r.proxied_rtt), r.rows
        ));
        push_line(s, "");
        push_line(
            s,
            "| contender | straight | rows/s | through the proxy | rows/s | proxy ÷ straight |",
        );
        push_line(s, "|---|---:|---:|---:|---:|---:|");
        let rate = |t: Option<Duration>| {
            t.map(|t| format!("{:.0}", r.rows as f64 / t.as_secs_f64()))
                .unwrap_or_else(|| "–".into())
        };
        let mut seen = Vec::new();
        for ((c, _), _) in &r.results {
            if seen.contains(c) {
                continue;
            }
            seen.push(*c);
            let (l, p) = (
                median_time(r.of(*c, Route::Loopback)),
                median_time(r.of(*c, Route::Proxy)),
            );
            let ratio = match (l, p) {
                (Some(l), Some(p)) => format!("{:.2}", l.as_secs_f64() / p.as_secs_f64()),
                _ => "–".into(),
            };
            push_line(
                s,
                &format!(
                    "| {} | {} | {} | {} | {} | {ratio} |",
                    c.label(),
                    secs(l, "budget"),
                    rate(l),
                    secs(p, "budget"),
                    rate(p)
                ),
            );
        }
        push_line(s, "");
        self.chunks_md(r, &seen, s);
    }

    /// The engine's average chunk and round trips per chunk, by route, from its own counters;
    /// the proxy's count on the wire beside them.
    fn chunks_md(&self, r: &RemoteReport, who: &[Contender], s: &mut String) {
        push_line(s, "The engine's chunks, from its own counters (`--json`: rows, chunks, round_trips), median of the rounds; on the wire: the proxy's count of round trips the client waited for, over the whole run (start-up and the lease connection included) divided by its chunks; a run stopped at the budget (SIGINT) counts up to its stop:");
        push_line(s, "");
        push_line(s, "| engine | route | average chunk (rows) | round trips per chunk | on the wire, per chunk |");
        push_line(s, "|---|---|---:|---:|---:|");
        for c in who.iter().filter(|c| c.workers().is_some()) {
            for (route, name) in [(Route::Loopback, "straight"), (Route::Proxy, "proxy")] {
                let runs = r.of(*c, route);
                let per_chunk = |f: &dyn Fn(&Measured) -> Option<f64>| {
                    median_f64(runs.iter().filter_map(f).collect())
                };
                let chunks = |m: &Measured| m.counters.filter(|k| k.chunks > 0);
                let avg = per_chunk(&|m| chunks(m).map(|k| k.rows as f64 / k.chunks as f64));
                let trips = per_chunk(&|m| {
                    chunks(m).and_then(|k| Some(k.round_trips? as f64 / k.chunks as f64))
                });
                let wire = per_chunk(&|m| Some(m.flights? as f64 / chunks(m)?.chunks as f64));
                let show = |v: Option<f64>, none: &str| {
                    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| none.into())
                };
                push_line(
                    s,
                    &format!(
                        "| {} | {name} | {} | {} | {} |",
                        c.label(),
                        show(avg, "–"),
                        show(trips, "n/a"),
                        show(wire, "–")
                    ),
                );
            }
        }
        push_line(s, "");
    }
}

/// Appends one line of markdown.
pub fn push_line(s: &mut String, l: &str) {
    s.push_str(l);
    s.push('\n');
}

impl Drop for Report {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
