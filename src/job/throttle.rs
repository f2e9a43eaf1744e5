//! The `[throttle]` table of a job: how fast, in what chunk sizes, and on which health signals a
//! run holds. Validated offline, with file, line and key in every error.

use super::duration::parse_duration;
use super::locate::Locator;
use super::raw::RawThrottle;
use crate::error::Result;
use std::time::Duration;
use toml::Spanned;

/// Chunks aim at this duration: it bounds how long an application session can wait for a row
/// the backfill has locked, so it is kept well under typical request timeouts.
pub const DEFAULT_TARGET_CHUNK_TIME: Duration = Duration::from_millis(10);
pub const DEFAULT_MIN_CHUNK_ROWS: u32 = 10;
pub const DEFAULT_MAX_CHUNK_ROWS: u32 = 50_000;
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What a run does when a health signal cannot be read (permissions, no such view).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSignalError {
    /// Fail closed: hold, with the reason saying the signal is unreadable.
    Hold,
    /// Fail open: treat the signal as healthy.
    Ignore,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ThrottleSpec {
    pub rows_per_second: Option<u32>,
    /// None: fixed chunk size (`chunk_rows`), no adaptation.
    pub target_chunk_time: Option<Duration>,
    pub min_chunk_rows: u32,
    pub max_chunk_rows: u32,
    pub pause: Duration,
    pub nice_ratio: f64,
    pub max_replication_lag: Option<Duration>,
    /// Bytes of WAL per second, for the whole server.
    pub max_wal_rate: Option<u64>,
    pub hold_during_autovacuum: bool,
    pub throttle_sql: Option<String>,
    pub on_signal_error: OnSignalError,
    pub check_interval: Duration,
}

impl Default for ThrottleSpec {
    fn default() -> Self {
        ThrottleSpec {
            rows_per_second: None,
            target_chunk_time: Some(DEFAULT_TARGET_CHUNK_TIME),
            min_chunk_rows: DEFAULT_MIN_CHUNK_ROWS,
            max_chunk_rows: DEFAULT_MAX_CHUNK_ROWS,
            pause: Duration::ZERO,
            nice_ratio: 0.0,
            max_replication_lag: None,
            max_wal_rate: None,
            hold_during_autovacuum: false,
            throttle_sql: None,
            on_signal_error: OnSignalError::Hold,
            check_interval: DEFAULT_CHECK_INTERVAL,
        }
    }
}

/// `0`, `0s` or `off` disable; otherwise a duration.
fn duration_or_off(text: &str) -> std::result::Result<Option<Duration>, String> {
    match text.trim() {
        "0" | "0s" | "off" => Ok(None),
        t => parse_duration(t).map(Some),
    }
}

/// `64MB`, `16MiB`, `500kB`, `1GB` or a plain number of bytes (per second).
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim().trim_end_matches("/s");
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size; write e.g. \"64MB\""))?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown unit `{u}` in `{text}`: use B, kB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    Ok((n * mult) as u64)
}

impl ThrottleSpec {
    pub(super) fn parse(
        at: &Locator<'_>,
        raw: Option<&Spanned<RawThrottle>>,
    ) -> Result<ThrottleSpec> {
        let mut t = ThrottleSpec::default();
        let Some(raw) = raw.map(Spanned::get_ref) else {
            return Ok(t);
        };
        t.parse_pace(at, raw)?;
        t.parse_signals(at, raw)?;
        Ok(t)
    }

    /// How fast a run may go: rate, chunk size bounds and target, pauses between chunks.
    fn parse_pace(&mut self, at: &Locator<'_>, raw: &RawThrottle) -> Result<()> {
        let t = self;
        if let Some(v) = &raw.rows_per_second {
            let n = *v.get_ref();
            if !(1..=u32::MAX as i64).contains(&n) {
                return Err(at.err(
                    "throttle.rows_per_second",
                    v,
                    format!("{n} is out of range: use a positive number"),
                ));
            }
            t.rows_per_second = Some(n as u32);
        }
        if let Some(v) = &raw.target_chunk_time {
            t.target_chunk_time = duration_or_off(v.get_ref())
                .map_err(|m| at.err("throttle.target_chunk_time", v, m))?;
        }
        for (key, field, slot) in [
            (
                "throttle.min_chunk_rows",
                &raw.min_chunk_rows,
                &mut t.min_chunk_rows,
            ),
            (
                "throttle.max_chunk_rows",
                &raw.max_chunk_rows,
                &mut t.max_chunk_rows,
            ),
        ] {
            if let Some(v) = field {
                let n = *v.get_ref();
                if !(1..=10_000_000).contains(&n) {
                    return Err(at.err(key, v, format!("{n} is out of range: use 1 to 10000000")));
                }
                *slot = n as u32;
            }
        }
        if t.min_chunk_rows > t.max_chunk_rows {
            let v = raw
                .min_chunk_rows
                .as_ref()
                .or(raw.max_chunk_rows.as_ref())
                .expect("one was set");
            return Err(at.err(
                "throttle.min_chunk_rows",
                v,
                format!(
                    "min_chunk_rows ({}) is above max_chunk_rows ({})",
                    t.min_chunk_rows, t.max_chunk_rows
                ),
            ));
        }
        if let Some(v) = &raw.pause {
            t.pause = duration_or_off(v.get_ref())
                .map_err(|m| at.err("throttle.pause", v, m))?
                .unwrap_or_default();
        }
        if let Some(v) = &raw.nice_ratio {
            let r = *v.get_ref();
            if !(0.0..=100.0).contains(&r) {
                return Err(at.err(
                    "throttle.nice_ratio",
                    v,
                    format!(
                        "{r} is out of range: use 0 to 100 (sleep = ratio × the last chunk's time)"
                    ),
                ));
            }
            t.nice_ratio = r;
        }
        Ok(())
    }

    /// What the run watches and holds for: replication lag, WAL rate, autovacuum, `throttle_sql`.
    fn parse_signals(&mut self, at: &Locator<'_>, raw: &RawThrottle) -> Result<()> {
        let t = self;
        if let Some(v) = &raw.max_replication_lag {
            t.max_replication_lag = duration_or_off(v.get_ref())
                .map_err(|m| at.err("throttle.max_replication_lag", v, m))?;
        }
        if let Some(v) = &raw.max_wal_rate {
            t.max_wal_rate =
                Some(parse_bytes(v.get_ref()).map_err(|m| at.err("throttle.max_wal_rate", v, m))?);
        }
        if let Some(v) = &raw.hold_during_autovacuum {
            t.hold_during_autovacuum = *v.get_ref();
        }
        if let Some(v) = &raw.throttle_sql {
            let q = v.get_ref().trim().trim_end_matches(';');
            if q.is_empty() {
                return Err(at.err(
                    "throttle.throttle_sql",
                    v,
                    "empty query: give a query returning true while the run should hold",
                ));
            }
            t.throttle_sql = Some(q.to_string());
        }
        if let Some(v) = &raw.on_signal_error {
            t.on_signal_error = match v.get_ref().as_str() {
                "hold" => OnSignalError::Hold,
                "ignore" => OnSignalError::Ignore,
                o => {
                    return Err(at.err(
                        "throttle.on_signal_error",
                        v,
                        format!("`{o}` is not one of \"hold\", \"ignore\""),
                    ))
                }
            };
        }
        if let Some(v) = &raw.check_interval {
            t.check_interval =
                parse_duration(v.get_ref()).map_err(|m| at.err("throttle.check_interval", v, m))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("64MB").unwrap(), 64_000_000);
        assert_eq!(parse_bytes("16MiB/s").unwrap(), 16 * 1024 * 1024);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
    }
}
