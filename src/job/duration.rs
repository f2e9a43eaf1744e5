//! Durations as a job file (or `backfill set`) writes them: `500ms`, `2s`, `1m 30s`, and the
//! limits PostgreSQL puts on a timeout. Pure text to [`Duration`]; callers add file and line.

use std::time::Duration;

/// The longest `lock_timeout`/`statement_timeout` PostgreSQL accepts: INT_MAX milliseconds (about
/// 24.8 days). Anything longer passes a duration parser but makes every chunk's `SET LOCAL` fail
/// with 22023, so it is refused where it is written.
pub const MAX_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// Parses a duration that becomes a server timeout (`lock_timeout`, `statement_timeout`): at
/// least 1 ms and at most [`MAX_TIMEOUT`].
pub fn parse_server_timeout(text: &str) -> std::result::Result<Duration, String> {
    let d = parse_duration(text)?;
    if d > MAX_TIMEOUT {
        return Err(format!(
            "`{text}` is longer than PostgreSQL accepts for a timeout ({}ms, about 24 days): use e.g. \"30s\" or \"24d\"",
            MAX_TIMEOUT.as_millis()
        ));
    }
    Ok(d)
}

/// Limits a duration stored in milliseconds by the engine (`backfill set`) to [`MAX_TIMEOUT`].
pub fn check_stored_duration(text: &str, d: Duration) -> std::result::Result<Duration, String> {
    if d > MAX_TIMEOUT {
        return Err(format!(
            "`{text}` is too long: use at most {}ms (about 24 days)",
            MAX_TIMEOUT.as_millis()
        ));
    }
    Ok(d)
}

/// Parses a human duration (`500ms`, `2s`, `1m 30s`) that must be at least 1 ms.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("`{text}` is not a duration ({e}); write e.g. \"500ms\", \"2s\" or \"1m\"")
    })?;
    if d < Duration::from_millis(1) {
        return Err(format!("`{text}` is too short: use at least 1ms"));
    }
    Ok(d)
}
