//! The plan as an operator reads it in a terminal or a review. Prints only what the `Plan`
//! holds: it never reaches the database or decides a finding.

use super::{Plan, Severity};
use crate::keyset::show_key;
use std::time::Duration;

pub fn print_text(p: &Plan) {
    line("job", &format!("{} ({})", p.job, p.file));
    line(
        "table",
        &format!(
            "{}, key ({}), walked by {}",
            p.table,
            p.key.join(", "),
            match p.walk {
                "pages" => "its pages (TID range scans)".to_string(),
                _ => format!("index {}", p.index),
            }
        ),
    );
    line("chunk size", &format!("{} keys to start", p.chunk_rows));
    line(
        "timeouts",
        &format!(
            "lock_timeout {}, statement_timeout {}",
            ms(p.lock_timeout_ms),
            ms(p.statement_timeout_ms)
        ),
    );
    for (i, t) in p.throttle.iter().enumerate() {
        line(if i == 0 { "throttle" } else { "" }, t);
    }
    for (i, t) in p.phases.iter().enumerate() {
        line(if i == 0 { "phases" } else { "" }, t);
    }
    print_first_chunk(p);
    print_estimates(p);
    print_findings(p);
}

/// One labelled line, the values aligned.
fn line(k: &str, v: &str) {
    println!("{k:<20} {v}");
}

fn print_first_chunk(p: &Plan) {
    match &p.first_chunk {
        Some(c) => {
            line(
                if c.resumes {
                    "next chunk"
                } else {
                    "first chunk"
                },
                &format!(
                    "keys {} .. {} ({} keys{})",
                    show_key(&c.start),
                    show_key(&c.end),
                    c.keys,
                    if c.resumes {
                        ", after the saved cursor"
                    } else if c.sweep {
                        ", of the sweep: every key was processed, verify decides"
                    } else {
                        ""
                    }
                ),
            );
            println!();
            for l in c.sql.trim().lines() {
                println!("    {l}");
            }
            println!();
        }
        None => line("first chunk", "none: no key left to process"),
    }
}

fn print_estimates(p: &Plan) {
    let e = &p.estimates;
    println!("estimates");
    line(
        "  rows in table",
        &e.table_rows
            .map(|n| format!("~{n} (planner's statistics)"))
            .unwrap_or_else(|| "unknown (never analyzed: run ANALYZE)".into()),
    );
    line(
        "  rows to do",
        &match (e.rows_to_do, &e.rows_to_do_note) {
            (Some(n), _) => format!("{n} (verify, now)"),
            (None, Some(note)) => note.clone(),
            (None, None) => "unknown".into(),
        },
    );
    if let Some(c) = e.chunks {
        line("  chunks", &format!("{c} of {} keys", p.chunk_rows));
    }
    if let Some(s) = e.sample_chunk_ms {
        line(
            "  sample chunk",
            &format!("{s:.1} ms (executed, then rolled back)"),
        );
    }
    if let Some(s) = e.expected_seconds {
        line(
            "  expected duration",
            &format!(
                "{} at the starting chunk size and the rate ceiling",
                if s < 60.0 {
                    format!("{s:.1}s")
                } else {
                    humantime::format_duration(Duration::from_secs(s.round() as u64)).to_string()
                }
            ),
        );
    }
}

fn print_findings(p: &Plan) {
    println!("findings");
    if p.findings.is_empty() {
        println!("  none");
    }
    for f in &p.findings {
        let sev = match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        println!("  {sev} [{}]: {}", f.code, f.message);
        println!("      fix: {}", f.fix);
    }
    if p.has_errors() {
        println!("the job should not run as it is (exit 2)");
    } else {
        println!("no errors (exit 0); everything above was rolled back");
    }
}

fn ms(n: u64) -> String {
    humantime::format_duration(Duration::from_millis(n)).to_string()
}
