//! The progress bar as an operator's terminal shows it: the binary runs under `script`, in a
//! pseudo-terminal of a set width, and the tests read the frames it drew. They assert on facts
//! that cannot flake (widths, the form of numbers, counts, which parts a frame has), never on
//! speed. Also the non-terminal progress line and the JSON log lines.

use crate::support::*;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A run of the binary in a pseudo-terminal `cols` columns wide; what it wrote to the terminal
/// (stdout and stderr together) is collected as it comes, so a long run never fills a pipe.
struct Terminal {
    child: Child,
    seen: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Terminal {
    fn run(db: &TestDb, cols: u16, args: &[&str]) -> Terminal {
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut line = vec![
            env!("CARGO_BIN_EXE_backfill").to_string(),
            "--database-url".into(),
            db.url.clone(),
            "--jobs".into(),
            db.jobs.display().to_string(),
        ];
        line.extend(args.iter().map(|a| a.to_string()));
        let words: Vec<String> = line.iter().map(|w| quote(w)).collect();
        let shell = format!("stty cols {cols} rows 24; exec {}", words.join(" "));
        let mut cmd = Command::new("script");
        for (k, _) in std::env::vars() {
            if k.starts_with("PG") || k == "DATABASE_URL" || k.starts_with("BACKFILL_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .args(["-qfec", &shell, "/dev/null"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script (util-linux) is installed");
        let mut out = child.stdout.take().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let into = seen.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            child,
            seen,
            reader: Some(reader),
        }
    }

    /// What the terminal showed so far, as text.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    /// Waits for the run to end; its exit code and everything it showed.
    fn wait(mut self, limit: Duration) -> (i32, String) {
        let t = std::time::Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!("run did not end within {limit:?}:\n{}", self.screen());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        self.reader.take().unwrap().join().unwrap();
        (code, self.screen())
    }
}

/// The lines a terminal shows: ANSI escape sequences removed, split where the cursor returns or
/// moves down (each redraw of the bar is a line of its own).
fn shown_lines(raw: &str) -> Vec<String> {
    let mut text = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            text.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // Parameters, then one final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
            // A cursor movement starts a new line on screen.
            text.push('\n');
        } else {
            chars.next();
        }
    }
    text.split(['\r', '\n'])
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The frames of job `job`'s bar: lines that start with its name and show `done/total`.
fn frames(lines: &[String], job: &str) -> Vec<Frame> {
    lines
        .iter()
        .filter(|l| l.starts_with(&format!("{job} ")))
        .filter_map(|l| Frame::parse(l))
        .collect()
}

/// What one frame of the bar says.
#[derive(Debug)]
struct Frame {
    line: String,
    elapsed: String,
    done: u64,
    total: u64,
}

impl Frame {
    fn parse(line: &str) -> Option<Frame> {
        // Tolerant of other layouts (`[00:00:01]`, `1,000/3,000`), so that a test fails on
        // what it asserts, not on parsing.
        let plain = line.replace(['[', ']', ','], " ");
        let words: Vec<&str> = plain.split_whitespace().collect();
        let elapsed = words
            .iter()
            .find(|w| w.len() == 8 && w.as_bytes()[2] == b':' && w.as_bytes()[5] == b':')?;
        let counts = words.iter().find(|w| {
            w.split_once('/').is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && a.bytes().all(|c| c.is_ascii_digit())
                    && b.bytes().all(|c| c.is_ascii_digit())
            })
        })?;
        let (done, total) = counts.split_once('/')?;
        Some(Frame {
            line: line.to_string(),
            elapsed: elapsed.to_string(),
            done: done.parse().ok()?,
            total: total.parse().ok()?,
        })
    }

    /// The word after `word` (e.g. the size after "chunk").
    fn after(&self, word: &str) -> Option<&str> {
        let words: Vec<&str> = self.line.split_whitespace().collect();
        let i = words.iter().position(|w| *w == word)?;
        words.get(i + 1).copied()
    }

    /// The word before `unit` (e.g. the rate before "rows/s").
    fn before(&self, unit: &str) -> Option<&str> {
        let words: Vec<&str> = self.line.split_whitespace().collect();
        let i = words.iter().position(|w| *w == unit)?;
        i.checked_sub(1).map(|i| words[i])
    }
}

/// A rate as a person reads it: digits with at most one decimal, then an optional k or M
/// (`12.3k`, `950`, `0.5`) — never `174,206.0333`.
fn readable(rate: &str) -> bool {
    let number = rate.trim_end_matches(['k', 'M']);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    !whole.is_empty()
        && whole.len() <= 3
        && whole.bytes().all(|c| c.is_ascii_digit())
        && fraction.len() <= 1
        && fraction.bytes().all(|c| c.is_ascii_digit())
}

/// Every line of job `j`'s bar fits in `cols` columns (log lines are the terminal's to wrap).
#[track_caller]
fn assert_fits(lines: &[String], cols: usize, raw: &str) {
    for l in lines.iter().filter(|l| l.starts_with("j ")) {
        assert!(
            l.chars().count() <= cols,
            "a line of {} columns on a {cols}-column terminal: {l:?}\n{raw}",
            l.chars().count()
        );
    }
}

fn wait_until_held(db: &TestDb, run: &mut Terminal) {
    db.wait_for_child(
        &mut run.child,
        "SELECT EXISTS (SELECT 1 FROM backfill.runs WHERE job = 'j' AND hold_reason IS NOT NULL)",
        Duration::from_secs(60),
    );
}

#[test]
fn an_80_column_bar_fits_shows_readable_rates_and_the_chunk_size_status_shows() {
    let db = TestDb::new();
    counter_table(&db, 20_000);
    // The chunk size adapts (the default target chunk time), so it moves away from 100.
    db.write_job(
        "j",
        &counter_job("lock_timeout = \"60s\"\n").replace(
            "throttle = { target_chunk_time = \"0s\" }",
            "throttle = { target_chunk_time = \"200ms\" }",
        ),
    );
    let held = hold_row(&db, "t", "id", 15_000);
    let mut run = Terminal::run(&db, 80, &["run", "j"]);
    db.wait_for_child(
        &mut run.child,
        &format!(
            "{} AND EXISTS (SELECT 1 FROM backfill.ranges WHERE job = 'j' AND rows_done > 0)",
            engine_lock_waits(1)
        ),
        Duration::from_secs(60),
    );
    // Waiting at the row, it commits nothing: the bar is redrawn meanwhile (its timer runs).
    std::thread::sleep(Duration::from_millis(2500));
    let before_commit = run.screen();
    let status_chunk = db.i64(
        "SELECT chunk_rows_now::bigint FROM backfill.ranges WHERE job = 'j' ORDER BY updated_at DESC LIMIT 1",
    );
    held.exec("COMMIT");
    let (code, raw) = run.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{raw}");
    let lines = shown_lines(&raw);
    assert_fits(&lines, 80, &raw);
    let all = frames(&lines, "j");
    assert!(all.len() >= 2, "no bar frames:\n{raw}");
    for f in &all {
        let rate = f
            .before("rows/s")
            .unwrap_or_else(|| panic!("no rate: {f:?}"));
        assert!(readable(rate), "rate {rate:?} in {f:?}");
        assert!(f.done <= f.total, "{f:?}");
    }
    let last = frames(&shown_lines(&before_commit), "j")
        .pop()
        .expect("a frame before the commit");
    assert_ne!(status_chunk, 100, "the chunk size never adapted");
    assert_eq!(
        last.after("chunk").and_then(|n| n.parse::<i64>().ok()),
        Some(status_chunk),
        "the bar's chunk size is not the one status shows ({status_chunk}): {last:?}"
    );
}

#[test]
fn a_narrow_terminal_drops_parts_and_a_held_run_shows_why_while_its_timer_runs() {
    let db = TestDb::new();
    counter_table(&db, 3000);
    db.write_job("j", &counter_job("lock_timeout = \"100ms\"\n"));
    let held = hold_row(&db, "t", "id", 1000);
    let mut run = Terminal::run(&db, 50, &["run", "j"]);
    wait_until_held(&db, &mut run);
    std::thread::sleep(Duration::from_millis(3500));
    held.exec("COMMIT");
    let (code, raw) = run.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "{raw}");
    let lines = shown_lines(&raw);
    assert_fits(&lines, 50, &raw);
    let held_frames: Vec<Frame> = frames(&lines, "j")
        .into_iter()
        .filter(|f| f.line.contains("held: lock"))
        .collect();
    assert!(!held_frames.is_empty(), "no frame says why:\n{raw}");
    assert!(
        held_frames.iter().all(|f| !f.line.contains("eta")),
        "the ETA did not give way to the hold: {held_frames:?}"
    );
    let first = &held_frames[0];
    assert!(
        held_frames
            .iter()
            .any(|f| f.done == first.done && f.elapsed != first.elapsed),
        "the timer stood still while held: {held_frames:?}"
    );
}

/// Job `j` over 300 rows whose statement cannot fix one of them, so that verify keeps counting
/// it and the run sweeps (once) over every key again.
fn job_that_sweeps(db: &TestDb) {
    counter_table(db, 300);
    db.exec("CREATE TABLE blocked (id bigint); INSERT INTO blocked SELECT min(id) FROM t;");
    db.write_job(
        "j",
        "table = \"t\"\nkey = \"id\"\nchunk_rows = 20\nmax_sweeps = 1\n\
         sql = \"UPDATE t SET n = 1 WHERE id BETWEEN :start AND :end AND n = 0 \
                AND NOT EXISTS (SELECT 1 FROM blocked b WHERE b.id = t.id)\"\n\
         verify = \"SELECT count(*) FROM t WHERE n = 0\"\n\
         throttle = { target_chunk_time = \"0s\", rows_per_second = 200 }\n",
    );
}

#[test]
fn after_a_sweep_the_total_does_not_double() {
    let db = TestDb::new();
    job_that_sweeps(&db);
    let run = Terminal::run(&db, 80, &["run", "j"]);
    let (code, raw) = run.wait(Duration::from_secs(120));
    assert_eq!(code, 1, "verify still counts the blocked row:\n{raw}");
    let all = frames(&shown_lines(&raw), "j");
    assert!(
        all.iter().any(|f| f.line.contains("sweep 1")),
        "no frame of the sweep:\n{raw}"
    );
    for f in &all {
        assert_eq!(f.total, 300, "{f:?}");
        assert!(f.done <= 300, "{f:?}");
    }
}

#[test]
fn progress_lines_carry_the_bars_facts_and_every_json_line_has_ts_level_and_job() {
    let db = TestDb::new();
    job_that_sweeps(&db);
    let out = db.run(&[
        "--log-format",
        "json",
        "run",
        "j",
        "--progress-interval",
        "500ms",
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    let mut progress = 0;
    for line in out.stderr.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        for key in ["ts", "level", "job"] {
            assert!(!v[key].is_null(), "no {key}: {line}");
        }
        if v["event"] == "progress" {
            progress += 1;
            assert!(v["elapsed_seconds"].is_number(), "{line}");
            assert!(v["rows_done"].as_u64().unwrap() <= 300, "{line}");
        }
    }
    assert!(progress > 0, "{out:?}");
    assert!(
        out.stderr.contains("\"sweep\":1"),
        "no progress line of the sweep: {out:?}"
    );
    // The text line says the same.
    let out = {
        let db = TestDb::new();
        job_that_sweeps(&db);
        db.run(&["run", "j", "--progress-interval", "500ms"])
    };
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("j: ") && l.contains(" of ~") && l.contains("rows/s"))
        .unwrap_or_else(|| panic!("no progress line: {out:?}"));
    let rate = line
        .split(", ")
        .find_map(|p| p.strip_suffix(" rows/s"))
        .unwrap_or_else(|| panic!("{line}"));
    assert!(readable(rate), "{line}");
    assert!(line.contains("elapsed "), "{line}");
}

/// Every line `retry-failures` logs with `--log-format json` is a JSON object with `ts`, `level`
/// and `job`, like a run's.
#[test]
fn retry_failures_logs_json_lines_when_asked() {
    let db = TestDb::new();
    counter_table(&db, 300);
    db.exec(
        "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.id = 31 THEN RAISE EXCEPTION 'bad row %', NEW.id; END IF; RETURN NEW; END $$;
         CREATE TRIGGER boom BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION boom();",
    );
    db.write_job("s", &counter_job("on_error = \"skip\"\n"));
    assert_eq!(db.run(&["run", "s"]).code, 1);
    db.exec("DROP TRIGGER boom ON t");
    let out = db.run(&["--log-format", "json", "retry-failures", "s"]);
    out.expect(0);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert!(lines.iter().any(|l| l.contains("now succeeds")), "{out:?}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        for key in ["ts", "level", "job"] {
            assert!(!v[key].is_null(), "no {key}: {line}");
        }
    }
}

/// A run stopped part-way through a sweep, then run again: the new run's bar counts the sweep's
/// own pass (not the keys of every pass so far) against the table's rows.
#[test]
fn a_run_resuming_a_sweep_shows_the_sweeps_own_pass() {
    let db = TestDb::new();
    job_that_sweeps(&db);
    let mut child = db.spawn(&["run", "j"]);
    db.wait_for_child(
        &mut child,
        "SELECT phase = 'sweeping' AND rows_done >= 360 FROM backfill.checkpoints c
           JOIN backfill.progress p USING (job) WHERE job = 'j'",
        Duration::from_secs(60),
    );
    signal(&child, libc::SIGINT);
    let out = wait_out(child, Duration::from_secs(60));
    assert_eq!(out.code, 130, "{out:?}");
    let run = Terminal::run(&db, 80, &["run", "j"]);
    let (code, raw) = run.wait(Duration::from_secs(120));
    assert_eq!(code, 1, "verify still counts the blocked row:\n{raw}");
    let all = frames(&shown_lines(&raw), "j");
    assert!(!all.is_empty(), "no frames:\n{raw}");
    assert!(all[0].line.contains("sweep 1"), "{:?}\n{raw}", all[0]);
    for f in &all {
        assert_eq!(f.total, 300, "{f:?}\n{raw}");
        assert!(f.done <= 300 && f.done >= 60, "{f:?}\n{raw}");
    }
}
