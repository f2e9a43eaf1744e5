//! Writing to stdout and stderr without ever panicking.
//!
//! Rust ignores SIGPIPE, so a write to a pipe whose reader has gone (`backfill status | head -1`)
//! fails with EPIPE, and `println!` turns that failure into a panic (exit 101). A reader that
//! stops reading is a normal end for a command line tool: the rest of the output is dropped
//! without a word and the command finishes with its own exit code (a `gate` that fails still
//! exits 3). The crate's `println!`/`print!`/`eprintln!`/`eprint!` are redefined in `lib.rs` to
//! come here, so every command and every module is covered, including code written later.
//!
//! Any other failure to write stdout (a full disk behind a redirect) means data was lost: it is
//! remembered and `main` reports it and exits 1. A failure to write stderr has nowhere to be
//! reported and is ignored.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Set once a write to stdout failed: later writes are skipped.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
/// The first stdout failure that was not the reader going away.
static STDOUT_ERROR: Mutex<Option<io::Error>> = Mutex::new(None);

/// Writes to stdout; after the reader has gone, does nothing.
pub fn stdout(args: fmt::Arguments<'_>) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = io::stdout().lock();
    // Stdout is line buffered: flushing here surfaces the error of this very line.
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != io::ErrorKind::BrokenPipe {
            let mut first = STDOUT_ERROR.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert(e);
        }
    }
}

/// Writes to stderr, ignoring failures (there is nowhere left to report them).
pub fn stderr(args: fmt::Arguments<'_>) {
    let _ = io::stderr().lock().write_fmt(args);
}

/// The first failure to write stdout other than its reader going away, if any.
pub fn stdout_error() -> Option<io::Error> {
    STDOUT_ERROR
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
}
