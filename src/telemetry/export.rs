//! What Prometheus scrapes, as declared: every metric's name, type and help (the README's metric
//! table lists the same), the label values registered at zero, and the exporter's endpoint. Owns
//! the names; must not set any value (the run's reporter in `telemetry` does).

use crate::state::JobState;
use std::net::SocketAddr;

/// Buckets of the chunk duration histogram, in seconds (a chunk aims well under a second).
pub const CHUNK_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Every metric the engine exports: name, type, help. The README's metric table lists the same.
pub const METRICS: &[(&str, &str, &str)] = &[
    (
        "backfill_rows_processed_total",
        "counter",
        "Keys processed (committed chunks, and skipped poison keys)",
    ),
    (
        "backfill_rows_changed_total",
        "counter",
        "Rows the job's statement reported changing",
    ),
    (
        "backfill_chunks_total",
        "counter",
        "Chunk attempts by outcome: committed, failed, skipped",
    ),
    (
        "backfill_chunk_duration_seconds",
        "histogram",
        "Duration of committed chunks",
    ),
    (
        "backfill_round_trips_total",
        "counter",
        "Round trips to the database that committed chunks waited for (two per chunk in the steady state)",
    ),
    (
        "backfill_chunk_size_rows",
        "gauge",
        "Keys per chunk right now",
    ),
    (
        "backfill_rate_limit_rows_per_second",
        "gauge",
        "Rate ceiling in force (0: none)",
    ),
    (
        "backfill_held_seconds_total",
        "counter",
        "Seconds the run was held, by reason",
    ),
    (
        "backfill_retries_total",
        "counter",
        "Chunk retries by error class",
    ),
    (
        "backfill_replication_lag_seconds",
        "gauge",
        "Largest replay lag of the streaming standbys (0 without standbys)",
    ),
    (
        "backfill_progress_ratio",
        "gauge",
        "Keys done over the estimated total, 0..1",
    ),
    (
        "backfill_eta_seconds",
        "gauge",
        "Estimated seconds to completion at the rate of all runs together",
    ),
    (
        "backfill_rows_done",
        "gauge",
        "Keys done by all runs of the job (read from the database every second while several run)",
    ),
    (
        "backfill_rows_total_estimate",
        "gauge",
        "Estimated keys in the job's range",
    ),
    (
        "backfill_active_workers",
        "gauge",
        "Workers of this process (`--workers`); sum over instances for the job's total",
    ),
    (
        "backfill_state",
        "gauge",
        "1 for the job's current state (paused: running but held by `backfill pause`), 0 for the others",
    ),
    (
        "backfill_held",
        "gauge",
        "1 while the run is held, for the reason it is held; 0 for the other reasons",
    ),
    (
        "backfill_failing_keys",
        "gauge",
        "Keys recorded as failing for the job and not resolved",
    ),
];

pub const ERROR_CLASSES: &[&str] = &["contention", "timeout", "connection", "data"];
pub const CHUNK_OUTCOMES: &[&str] = &["committed", "failed", "skipped"];
/// The job states the `backfill_state` gauge reports (a run's own: running, then how it ended).
pub const STATES: &[JobState] = &[
    JobState::Running,
    JobState::Stopped,
    JobState::Cancelled,
    JobState::Failed,
    JobState::Done,
    JobState::Incomplete,
];
/// The `backfill_state` series that is 1 instead of `running` while `backfill pause` holds the
/// run: a pause is a hold of a running job, not a state the checkpoint stores.
pub const PAUSED_STATE: &str = "paused";

/// Serves Prometheus metrics on `addr` until the process exits. Call before creating a
/// [`Progress`]. A bare port binds 127.0.0.1.
pub fn serve_metrics(addr: &str) -> Result<SocketAddr, String> {
    let addr = parse_metrics_addr(addr)?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("backfill_chunk_duration_seconds".into()),
            CHUNK_DURATION_BUCKETS,
        )
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    for (name, kind, help) in METRICS {
        match *kind {
            "counter" => metrics::describe_counter!(*name, *help),
            "histogram" => metrics::describe_histogram!(*name, metrics::Unit::Seconds, *help),
            _ => metrics::describe_gauge!(*name, *help),
        }
    }
    Ok(addr)
}

/// `9187` → 127.0.0.1:9187; `HOST:PORT` as given.
pub fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("invalid --metrics-addr `{s}`: give a port (binds 127.0.0.1) or HOST:PORT")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_binds_loopback_for_a_bare_port() {
        assert_eq!(
            parse_metrics_addr("9187").unwrap().to_string(),
            "127.0.0.1:9187"
        );
        assert_eq!(
            parse_metrics_addr("0.0.0.0:9187").unwrap().to_string(),
            "0.0.0.0:9187"
        );
        assert!(parse_metrics_addr("localhost").is_err());
    }
}
