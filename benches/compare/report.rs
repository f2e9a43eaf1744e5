//! The report: the sections' measurements, collected, and their markdown: medians, ratios,
//! growth factors, the engine's own CPU and peak memory, and the machine it ran on.
//!
//! Depends only on the measured data (`measured`); the sections that measure fill it in, and it
//! never runs anything but the one query for the server's settings.

use crate::measured::{Contender, ImpactRow, Measured, Results};
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
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
}

/// Median time over the rounds; None when any round ran out of budget.
fn median_time(ms: &[Measured]) -> Option<Duration> {
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
        let row = c
            .query_one(
                "SELECT current_setting('server_version'), current_setting('fsync'),
                        current_setting('synchronous_commit'), current_setting('shared_buffers')",
                &[],
            )
            .await
            .unwrap();
        let (v, fsync, sync, sb): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let dir = std::env::temp_dir().join(format!("backfill-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Report {
            machine: format!("{cores} cores ({cpu}), {mem_gib:.0} GiB RAM"),
            server: format!(
                "PostgreSQL {v} on the same machine (fsync={fsync}, synchronous_commit={sync}, shared_buffers={sb})"
            ),
            dir,
            throughput_rows: 0,
            throughput: Vec::new(),
            scaling: Vec::new(),
            pgbench_accounts: 0,
            impact_rounds: 0,
            impact: Vec::new(),
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
                    r.backfill_seconds
                        .map(|t| format!("{t:.1} s"))
                        .unwrap_or_else(|| "–".into()),
                    r.tps,
                    r.p99_ms,
                    r.max_ms,
                    r.failed
                ),
            );
        }
    }
}

/// Appends one line of markdown.
fn push_line(s: &mut String, l: &str) {
    s.push_str(l);
    s.push('\n');
}

impl Drop for Report {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
