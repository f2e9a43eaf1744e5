//! The job file exactly as written: a serde struct that rejects unknown keys and keeps the span of
//! every value, so that validation errors can name the file, the line and the key.
//! Shape only: no validation beyond what serde does (that is `spec`), no defaults.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    pub description: Option<Spanned<String>>,
    pub table: Spanned<String>,
    /// A column name, or a list of them (`"ctid"` for the heap walk).
    pub key: Spanned<toml::Value>,
    pub sql: Spanned<String>,
    pub chunk_rows: Option<Spanned<i64>>,
    pub verify: Option<Spanned<String>>,
    pub lock_timeout: Option<Spanned<String>>,
    pub statement_timeout: Option<Spanned<String>>,
    pub contention_budget: Option<Spanned<String>>,
    pub on_error: Option<Spanned<String>>,
    pub throttle: Option<Spanned<RawThrottle>>,
    pub requires_sql: Option<Spanned<String>>,
    pub max_sweeps: Option<Spanned<i64>>,
    pub finish_sql: Option<Spanned<Vec<String>>>,
    pub down_sql: Option<Spanned<String>>,
    pub undo: Option<Spanned<Vec<String>>>,
    pub migration: Option<Spanned<RawMigration>>,
}

/// The `[migration]` table: where the schema migrator keeps its history.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMigration {
    pub tool: Spanned<String>,
    pub expand: Option<Spanned<String>>,
    pub contract: Option<Spanned<String>>,
    pub alembic_dir: Option<Spanned<String>>,
    pub recursive_version_locations: Option<Spanned<bool>>,
    pub history_table: Option<Spanned<String>>,
}

/// The `[throttle]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawThrottle {
    pub rows_per_second: Option<Spanned<i64>>,
    pub target_chunk_time: Option<Spanned<String>>,
    pub min_chunk_rows: Option<Spanned<i64>>,
    pub max_chunk_rows: Option<Spanned<i64>>,
    pub pause: Option<Spanned<String>>,
    pub nice_ratio: Option<Spanned<f64>>,
    pub max_replication_lag: Option<Spanned<String>>,
    pub max_wal_rate: Option<Spanned<String>>,
    pub hold_during_autovacuum: Option<Spanned<bool>>,
    pub throttle_sql: Option<Spanned<String>>,
    pub on_signal_error: Option<Spanned<String>>,
    pub check_interval: Option<Spanned<String>>,
}
