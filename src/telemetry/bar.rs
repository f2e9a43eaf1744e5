//! The text of progress: the bar's one line, fitted to the terminal's width, and the number
//! formats it shares with the plain progress line (a rate reads `12.3k rows/s`, an elapsed time
//! `00:01:05`, an ETA `2m05s`). Owns layout and formats only; it must not touch metrics, events,
//! or the drawing itself (the reporter in `mod.rs` and indicatif do that).
//!
//! A terminal narrower than the full line drops parts rather than wrap, in this order: the
//! workers, the chunk size, the bar itself (it shrinks to 12 columns first), the percent, the rate;
//! what is left — name, elapsed time, done/total, and the ETA or the hold reason — is cut short
//! with `…` (the hold reason first, then the name) if it still does not fit.

use std::time::Duration;

/// What one frame of the bar (and the plain progress line) says.
#[derive(Debug, Clone)]
pub(super) struct Frame<'a> {
    pub job: &'a str,
    /// The fleet's shard the run is on (None: not a fleet run).
    pub shard: Option<&'a str>,
    /// The sweep pass being walked (None: the first pass over the keys).
    pub sweep: Option<i32>,
    /// Keys done in this pass.
    pub done: u64,
    pub total: Option<u64>,
    /// This run's keys per second since it started (held time included).
    pub rate: f64,
    pub eta: Option<f64>,
    /// Why the run is held, if it is: shown instead of the ETA.
    pub held: Option<&'a str>,
    /// The size of the last committed chunk (what `status` shows).
    pub chunk: u64,
    pub workers: u32,
    pub elapsed: Duration,
}

/// The narrowest bar worth drawing, brackets included.
const MIN_BAR: usize = 12;

/// Where each part stands on the line, left to right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Name,
    Elapsed,
    Bar,
    Counts,
    Percent,
    Rate,
    EtaOrHeld,
    Chunk,
    Workers,
}

/// The bar's line for a terminal `width` columns wide: never longer than `width - 1` (a line
/// that reaches the last column makes some terminals wrap).
pub(super) fn render(f: &Frame<'_>, width: usize) -> String {
    let limit = width.max(20) - 1;
    let job = match f.shard {
        Some(shard) => format!("{shard} {}", f.job),
        None => f.job.to_string(),
    };
    let name = match f.sweep {
        Some(pass) => format!("{job} sweep {pass}"),
        None => job,
    };
    let mut parts = vec![
        (Slot::Name, name),
        (Slot::Elapsed, clock(f.elapsed)),
        (Slot::Counts, counts(f)),
        (Slot::EtaOrHeld, eta_or_held(f)),
    ];
    if let Some(p) = percent(f) {
        parts.push((Slot::Percent, format!("{p:>3}%")));
    }
    // Numbers keep their width from frame to frame, so the bar does not jitter.
    parts.push((Slot::Rate, format!("{:>5} rows/s", rate(f.rate))));
    // A fleet's total line has no chunk of its own.
    if f.chunk > 0 {
        parts.push((Slot::Chunk, format!("chunk {}", f.chunk)));
    }
    parts.push((Slot::Workers, workers(f.workers)));
    // Optional parts go, least useful first, until the rest fits; the bar's narrowest form is
    // reserved until its turn comes.
    let mut keep_bar = true;
    let need = |parts: &[(Slot, String)], keep_bar: bool| {
        length(parts) + if keep_bar { MIN_BAR + 1 } else { 0 }
    };
    for drop in [
        Slot::Workers,
        Slot::Chunk,
        Slot::Bar,
        Slot::Percent,
        Slot::Rate,
    ] {
        if need(&parts, keep_bar) <= limit {
            break;
        }
        if drop == Slot::Bar {
            keep_bar = false;
        }
        parts.retain(|(slot, _)| *slot != drop);
    }
    for cut in [Slot::EtaOrHeld, Slot::Name] {
        let over = length(&parts).saturating_sub(limit);
        if over > 0 {
            if let Some((_, text)) = parts.iter_mut().find(|(slot, _)| *slot == cut) {
                *text = shorten(text, text.chars().count().saturating_sub(over).max(4));
            }
        }
    }
    let room = limit.saturating_sub(length(&parts) + 1);
    if room >= MIN_BAR {
        parts.push((Slot::Bar, bar(f, room)));
    }
    parts.sort_by_key(|(slot, _)| *slot);
    let line: Vec<String> = parts.into_iter().map(|(_, text)| text).collect();
    shorten(&line.join(" "), limit)
}

/// Columns the parts take, one space between each two.
fn length(parts: &[(Slot, String)]) -> usize {
    let chars: usize = parts.iter().map(|(_, t)| t.chars().count()).sum();
    chars + parts.len().saturating_sub(1)
}

/// `text` in at most `max` columns, its end replaced by `…` when cut.
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut short: String = text.chars().take(max.saturating_sub(1)).collect();
    short.push('…');
    short
}

fn counts(f: &Frame<'_>) -> String {
    match f.total {
        Some(t) => format!("{:>w$}/{t}", f.done, w = t.to_string().len()),
        None => format!("{}/?", f.done),
    }
}

/// Whole percent done, never 100 before the last key.
fn percent(f: &Frame<'_>) -> Option<u64> {
    let t = f.total.filter(|t| *t > 0)?;
    Some((f.done.min(t) * 100 / t).min(if f.done >= t { 100 } else { 99 }))
}

fn eta_or_held(f: &Frame<'_>) -> String {
    match (f.held, f.eta) {
        (Some(h), _) => format!("held: {h}"),
        (None, Some(e)) => format!("eta {}", span(e)),
        (None, None) => "eta ?".into(),
    }
}

fn bar(f: &Frame<'_>, width: usize) -> String {
    let inner = width - 2;
    let filled = match f.total.filter(|t| *t > 0) {
        Some(t) => (f.done.min(t) as u128 * inner as u128 / t as u128) as usize,
        None => 0,
    };
    let head = usize::from(filled < inner && filled > 0);
    format!(
        "[{}{}{}]",
        "=".repeat(filled.saturating_sub(head)),
        ">".repeat(head),
        " ".repeat(inner - filled.max(head))
    )
}

pub(super) fn workers(n: u32) -> String {
    match n {
        1 => "1 worker".into(),
        n => format!("{n} workers"),
    }
}

/// Elapsed time as `HH:MM:SS` (more hour digits past 99 hours).
pub(super) fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// A number of keys per second as people read it: `0.4`, `950`, `12.3k`, `174k`, `1.2M`.
pub(super) fn rate(per_second: f64) -> String {
    let v = per_second.max(0.0);
    if v < 9.95 {
        return format!("{v:.1}");
    }
    if v < 999.5 {
        return format!("{v:.0}");
    }
    for (scale, unit) in [(1e3, "k"), (1e6, "M"), (1e9, "G")] {
        let x = v / scale;
        if x < 99.95 {
            return format!("{x:.1}{unit}");
        }
        if x < 999.5 {
            return format!("{x:.0}{unit}");
        }
    }
    format!("{:.0}T", v / 1e12)
}

/// A time to go, to two units: `45s`, `2m05s`, `1h02m`, `3d04h`.
pub(super) fn span(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86400, s / 3600 % 24),
    }
}

/// The progress line printed when stderr is not a terminal: the bar's facts, as text or as a
/// JSON object. While held, the hold reason takes the ETA's place.
pub(super) fn progress_line(f: &Frame<'_>, json: bool) -> String {
    let eta = f.eta.filter(|_| f.held.is_none());
    let ratio = f
        .total
        .filter(|t| *t > 0)
        .map(|t| (f.done as f64 / t as f64).min(1.0));
    if json {
        let mut line = serde_json::json!({
            "ts": super::now(),
            "level": "info",
            "job": f.job,
            "event": "progress",
            "sweep": f.sweep,
            "rows_done": f.done,
            "rows_total_estimate": f.total,
            "percent": ratio.map(|r| (r * 1000.0).round() / 10.0),
            "rows_per_second": f.rate.round(),
            "elapsed_seconds": f.elapsed.as_secs(),
            "eta_seconds": eta.map(f64::round),
            "chunk_rows": f.chunk,
            "workers": f.workers,
            "held": f.held,
        });
        if let Some(shard) = f.shard {
            line["shard"] = shard.into();
        }
        return line.to_string();
    }
    let sweep = f.sweep.map(|p| format!("sweep {p}: ")).unwrap_or_default();
    let of = f.total.map(|t| format!(" of ~{t}")).unwrap_or_default();
    let pct = ratio
        .map(|r| format!(" ({:.1}%)", r * 100.0))
        .unwrap_or_default();
    let eta = match (f.held, eta) {
        (Some(_), _) => String::new(),
        (None, Some(e)) => format!(", eta {}", span(e)),
        (None, None) => ", eta unknown".into(),
    };
    let held = f.held.map(|h| format!(", held: {h}")).unwrap_or_default();
    let shard = f.shard.map(|s| format!("{s}: ")).unwrap_or_default();
    // A fleet's total line has no chunk of its own.
    let chunk = match f.chunk {
        0 => String::new(),
        n => format!(", chunk {n} rows"),
    };
    format!(
        "{shard}{}: {sweep}{}{of} rows{pct}, {} rows/s{eta}{chunk}, {}, elapsed {}{held}",
        f.job,
        f.done,
        rate(f.rate),
        workers(f.workers),
        clock(f.elapsed)
    )
}

/// A log line as printed: `line` itself (after `SHARD: ` on a fleet's shard), or a JSON object
/// with `ts`, `level`, `job`, `msg` (and `shard`).
pub(super) fn log_line(job: &str, shard: Option<&str>, json: bool, line: &str) -> String {
    if json {
        let level = if line.starts_with("warning") {
            "warn"
        } else {
            "info"
        };
        let mut json =
            serde_json::json!({ "ts": super::now(), "level": level, "job": job, "msg": line });
        if let Some(shard) = shard {
            json["shard"] = shard.into();
        }
        json.to_string()
    } else {
        match shard {
            Some(shard) => format!("{shard}: {line}"),
            None => line.to_string(),
        }
    }
}

/// The terminal's width in columns (80 when it cannot be read).
pub(super) fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ only writes a `winsize` into the struct it is given.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        80
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(held: Option<&'static str>) -> Frame<'static> {
        Frame {
            job: "orders_status",
            shard: None,
            sweep: None,
            done: 174_206,
            total: Some(300_000),
            rate: 174_206.033_3,
            eta: Some(125.0),
            held,
            chunk: 5000,
            workers: 4,
            elapsed: Duration::from_secs(3725),
        }
    }

    #[test]
    fn rates_read_as_people_write_them() {
        assert_eq!(rate(174_206.033_3), "174k");
        assert_eq!(rate(12_345.0), "12.3k");
        assert_eq!(rate(999.7), "1.0k");
        assert_eq!(rate(950.2), "950");
        assert_eq!(rate(0.44), "0.4");
        assert_eq!(rate(999_700.0), "1.0M");
    }

    #[test]
    fn times_read_in_two_units() {
        assert_eq!(span(45.0), "45s");
        assert_eq!(span(125.0), "2m05s");
        assert_eq!(span(3720.0), "1h02m");
        assert_eq!(clock(Duration::from_secs(3725)), "01:02:05");
    }

    #[test]
    fn a_wide_line_has_every_part() {
        let line = render(&frame(None), 120);
        assert!(line.chars().count() < 120, "{line}");
        for part in [
            "orders_status 01:02:05 [",
            "] 174206/300000  58%  174k rows/s eta 2m05s chunk 5000 4 workers",
        ] {
            assert!(line.contains(part), "{line}");
        }
    }

    #[test]
    fn narrow_lines_drop_parts_in_order_and_never_overflow() {
        let held = "lock contention on keys 250001..=255000 since 2026-12-01T08:07:51Z";
        for width in [20, 30, 40, 50, 60, 80, 100] {
            for f in [frame(None), frame(Some(held))] {
                let line = render(&f, width);
                assert!(line.chars().count() < width, "{width}: {line}");
                if width >= 40 {
                    assert!(line.contains("174206/300000"), "{width}: {line}");
                }
            }
        }
        let at_80 = render(&frame(None), 80);
        assert!(at_80.contains('[') && !at_80.contains("worker"), "{at_80}");
        let at_50 = render(&frame(None), 50);
        assert!(!at_50.contains('[') && !at_50.contains("chunk"), "{at_50}");
        let held_at_50 = render(&frame(Some(held)), 50);
        assert!(
            held_at_50.contains("held: lock") && held_at_50.ends_with('…'),
            "{held_at_50}"
        );
        assert!(!held_at_50.contains("eta"), "{held_at_50}");
    }
}
