//! What the benchmark measures and what each measurement gave: the contenders of the throughput
//! and scaling sections and the scenarios of the live-traffic section (with the labels the report
//! prints), a contender's timing, and an impact row.
//!
//! Plain data shared by the sections that measure (`contenders`, `impact`) and the one that
//! prints (`report`); it measures and prints nothing itself.

use crate::network::Route;
use std::time::Duration;

/// A way of filling a new column of `orders`, in the throughput and scaling sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contender {
    /// (a) one statement over the whole table.
    SingleUpdate,
    /// (b) `WHERE id IN (SELECT id … WHERE col IS NULL LIMIT 1000)` until nothing changes.
    NullScanLoop,
    /// (c) `ORDER BY id LIMIT 1000 OFFSET k` batches.
    OffsetLoop,
    /// (d) a keyset loop in a plpgsql procedure, COMMIT per batch of 5000.
    PlpgsqlKeyset,
    /// Two (d) loops in parallel, each over half of the ids.
    PlpgsqlKeysetTwice,
    /// `backfill run`: default throttle (adaptive chunks toward 10 ms) starting at 5000 keys a
    /// chunk, like (d); no `verify`.
    Engine,
    /// `backfill run --workers 2`.
    Engine2,
    /// `backfill run --workers 4`.
    Engine4,
}

impl Contender {
    pub fn label(self) -> &'static str {
        match self {
            Contender::SingleUpdate => "(a) single UPDATE",
            Contender::NullScanLoop => "(b) IN (SELECT … IS NULL LIMIT 1000) loop",
            Contender::OffsetLoop => "(c) LIMIT/OFFSET loop, 1000 a batch",
            Contender::PlpgsqlKeyset => "(d) plpgsql keyset loop, COMMIT per 5000",
            Contender::PlpgsqlKeysetTwice => "two (d) loops in parallel, half the ids each",
            Contender::Engine => "backfill run, 1 worker, chunk_rows 5000 to start",
            Contender::Engine2 => "backfill run --workers 2, chunk_rows 5000 to start",
            Contender::Engine4 => "backfill run --workers 4, chunk_rows 5000 to start",
        }
    }

    /// `--workers` for an engine contender; None for the others.
    pub fn workers(self) -> Option<&'static str> {
        match self {
            Contender::Engine => Some("1"),
            Contender::Engine2 => Some("2"),
            Contender::Engine4 => Some("4"),
            _ => None,
        }
    }
}

/// What runs beside pgbench in the live-traffic section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scenario {
    NoBackfill,
    SingleUpdate,
    EngineDefaults,
    /// The engine at defaults through the latency proxy (pgbench stays on loopback).
    EngineDefaultsProxied,
    EngineCeiling(u32),
    EngineTarget(u32),
}

impl Scenario {
    pub fn label(self) -> String {
        match self {
            Scenario::NoBackfill => "(i) no backfill".into(),
            Scenario::SingleUpdate => "(ii) single UPDATE".into(),
            Scenario::EngineDefaults => "(iii) backfill run, default settings".into(),
            Scenario::EngineDefaultsProxied => {
                "(vi) backfill run, default settings, through the proxy".into()
            }
            Scenario::EngineCeiling(r) => format!("(iv) backfill run, rows_per_second = {r}"),
            Scenario::EngineTarget(ms) => {
                format!("(v) backfill run, target_chunk_time = {ms}ms")
            }
        }
    }
}

/// One contender's fill, once.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// None: stopped at the time budget.
    pub time: Option<Duration>,
    /// The engine's own CPU time (user + system) and peak RSS.
    pub cpu: Option<Duration>,
    pub rss_kb: Option<i64>,
    /// The engine's own counters, from its JSON report.
    pub counters: Option<Counters>,
    /// Round trips the proxy counted on the wire during the fill (through the proxy only).
    pub flights: Option<u64>,
}

/// An engine run's own counters (its `--json` report).
#[derive(Debug, Clone, Copy)]
pub struct Counters {
    pub rows: i64,
    pub chunks: i64,
    /// Round trips spent by the run's chunk transactions; None when the engine does not say.
    pub round_trips: Option<i64>,
}

/// Each contender's measurements over the rounds, at one table size.
pub type Results = Vec<(Contender, Vec<Measured>)>;

/// The "remote database" section's measurements: each contender by route, over the rounds.
pub type RouteResults = Vec<((Contender, Route), Vec<Measured>)>;

/// pgbench's figures over the time one scenario's backfill ran (or their medians over rounds).
pub struct ImpactRow {
    pub scenario: Scenario,
    pub tps: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub failed: u64,
    pub backfill_seconds: Option<f64>,
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

impl ImpactRow {
    /// Each figure's median over the rounds of one scenario.
    pub fn median(scenario: Scenario, rows: Vec<ImpactRow>) -> ImpactRow {
        let of = |f: fn(&ImpactRow) -> f64| median_f64(rows.iter().map(f).collect());
        ImpactRow {
            scenario,
            tps: of(|r| r.tps),
            p99_ms: of(|r| r.p99_ms),
            max_ms: of(|r| r.max_ms),
            failed: of(|r| r.failed as f64) as u64,
            backfill_seconds: rows
                .iter()
                .all(|r| r.backfill_seconds.is_some())
                .then(|| of(|r| r.backfill_seconds.unwrap_or(0.0))),
        }
    }
}
