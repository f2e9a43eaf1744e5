//! The targets of issue 18 as ratios, each with its target beside it and whether it was met:
//! throughput through the proxy against the engine's own loopback figure and the plpgsql loop's
//! proxied one (from the remote section), throughput at loopback against the loop and the single
//! UPDATE (from the throughput section), and pgbench's latency under the engine at defaults, at
//! loopback and through the proxy (from the live-traffic section).
//!
//! Ratios in the report only: a missed target never fails the bench (timings move with the
//! machine; CI runs the bench to keep it working, not to judge it).

use crate::measured::{Contender, Measured, Scenario};
use crate::network::Route;
use crate::report::{median_time, push_line, Report};
use std::time::Duration;

/// One target: what is compared, the figure, the target and whether it was met.
struct Line {
    what: String,
    value: Option<f64>,
    /// The value is an upper bound (a contender ran out of budget: its time is at least that).
    bound: bool,
    unit: &'static str,
    target: String,
    met: Option<bool>,
}

/// A contender's median time over the rounds, or a lower bound of it (true) when some rounds
/// ran out of budget: those count as the budget.
fn time_at_least(ms: &[Measured], budget: Duration) -> Option<(Duration, bool)> {
    if ms.is_empty() {
        return None;
    }
    if let Some(t) = median_time(ms) {
        return Some((t, false));
    }
    let mut times: Vec<Duration> = ms.iter().map(|m| m.time.unwrap_or(budget)).collect();
    times.sort();
    Some((times[times.len() / 2], true))
}

/// Throughput ratio of `num`'s contender to `den`'s (the inverse of their times); an upper
/// bound (true) when `num` ran out of budget; None when `den` did.
fn ratio(num: Option<(Duration, bool)>, den: Option<(Duration, bool)>) -> Option<(f64, bool)> {
    let (den, den_bound) = den?;
    let (num, bound) = num?;
    (!den_bound).then(|| (den.as_secs_f64() / num.as_secs_f64(), bound))
}

fn at_least(what: &str, value: Option<(f64, bool)>, target: f64) -> Line {
    let bound = value.is_some_and(|(_, b)| b);
    let value = value.map(|(v, _)| v);
    Line {
        what: what.into(),
        value,
        bound,
        unit: "×",
        target: format!("≥ {target:.2}×"),
        // Below an upper bound under the target is a miss; above it, unknown.
        met: value.and_then(|v| match (bound, v >= target) {
            (true, true) => None,
            (_, met) => Some(met),
        }),
    }
}

fn at_most(what: String, value: Option<f64>, unit: &'static str, target: f64) -> Line {
    Line {
        what,
        value,
        bound: false,
        unit,
        target: match unit {
            "" => format!("= {target}"),
            _ => format!("≤ {target}{unit}"),
        },
        met: value.map(|v| v <= target),
    }
}

/// The throughput targets, through the proxy and at loopback.
fn throughput(report: &Report) -> Vec<Line> {
    let mut lines = Vec::new();
    let budget = report.budget;
    if let Ok(r) = &report.remote {
        let t = |c, route| time_at_least(r.of(c, route), budget);
        let e = t(Contender::Engine, Route::Proxy);
        lines.push(at_least(
            "through the proxy: engine (1 worker, defaults) ÷ its own loopback throughput",
            ratio(e, t(Contender::Engine, Route::Loopback)),
            0.8,
        ));
        lines.push(at_least(
            "through the proxy: engine (1 worker, defaults) ÷ (d) plpgsql loop through the proxy",
            ratio(e, t(Contender::PlpgsqlKeyset, Route::Proxy)),
            0.75,
        ));
    }
    let t = |c: Contender| {
        report
            .throughput
            .iter()
            .find(|(x, _)| *x == c)
            .and_then(|(_, m)| time_at_least(m, budget))
    };
    let (e1, e2) = (t(Contender::Engine), t(Contender::Engine2));
    let targets = [
        (
            "at loopback: engine, 1 worker ÷ (d) plpgsql loop",
            e1,
            Contender::PlpgsqlKeyset,
            0.9,
        ),
        (
            "at loopback: engine, 2 workers ÷ (a) single UPDATE",
            e2,
            Contender::SingleUpdate,
            1.4,
        ),
        (
            "at loopback: engine, 2 workers ÷ two (d) loops on halves",
            e2,
            Contender::PlpgsqlKeysetTwice,
            0.85,
        ),
    ];
    for (what, e, base, target) in targets {
        lines.push(at_least(what, ratio(e, t(base)), target));
    }
    lines
}

/// pgbench under the engine at defaults: p99 against the quiet run, worst latency, failures.
fn impact(report: &Report) -> Vec<Line> {
    let row = |s: Scenario| report.impact.iter().find(|r| r.scenario == s);
    let quiet = row(Scenario::NoBackfill).map(|r| r.p99_ms);
    let mut lines = Vec::new();
    for (s, where_) in [
        (Scenario::EngineDefaults, "at loopback"),
        (Scenario::EngineDefaultsProxied, "engine through the proxy"),
    ] {
        let Some(r) = row(s) else { continue };
        let p99 = quiet.filter(|q| *q > 0.0).map(|q| r.p99_ms / q);
        lines.push(at_most(
            format!("pgbench {where_}: p99 ÷ quiet p99"),
            p99,
            "×",
            3.0,
        ));
        lines.push(at_most(
            format!("pgbench {where_}: max latency"),
            Some(r.max_ms),
            " ms",
            100.0,
        ));
        lines.push(at_most(
            format!("pgbench {where_}: failed transactions"),
            Some(r.failed as f64),
            "",
            0.0,
        ));
    }
    lines
}

/// The targets section of the report, appended to its other sections.
pub fn markdown(report: &Report, s: &mut String) {
    let lines: Vec<Line> = throughput(report)
        .into_iter()
        .chain(impact(report))
        .collect();
    if lines.is_empty() {
        return;
    }
    push_line(s, "");
    push_line(
        s,
        "**Targets** (issue 18), medians of the rounds above; throughput ratios are rows/s over rows/s (\"<\": the engine ran out of budget, so at most that):",
    );
    push_line(s, "");
    push_line(s, "| target | value | needed | |");
    push_line(s, "|---|---:|---:|---|");
    for l in &lines {
        let value = match l.value {
            Some(v) if l.bound => format!("< {v:.2}×"),
            Some(v) if l.unit == "×" => format!("{v:.2}×"),
            Some(v) if l.unit.is_empty() => format!("{v:.0}"),
            Some(v) => format!("{v:.1}{}", l.unit),
            None => "–".into(),
        };
        let met = match l.met {
            Some(true) => "✓ met",
            Some(false) => "✗ missed",
            None => "– not measured (over budget)",
        };
        push_line(
            s,
            &format!("| {} | {value} | {} | {met} |", l.what, l.target),
        );
    }
}
