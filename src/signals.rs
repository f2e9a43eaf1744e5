//! Clean stop on SIGINT/SIGTERM.
//!
//! The first signal asks the run to stop after the in-flight chunk: that chunk either commits with
//! its checkpoint or rolls back, and the process exits 130. If the chunk's statement is still running
//! after a grace period, its query is cancelled on the server (SQLSTATE 57014, recognised as ours
//! by the flag here, not by the message). A second signal cancels at once and exits 130 within a
//! second: the open transaction, if any, is rolled back by the server, so the checkpoint and the
//! data stay consistent either way.
//! Owns only the stop flag and the cancel of the in-flight query; it never commits, rolls back
//! or records anything itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How long the first Ctrl-C lets an in-flight chunk finish before cancelling its statement.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Shutdown {
    stop: AtomicBool,
    cancel: AtomicBool,
    notify: Notify,
}

impl Shutdown {
    /// A handle no signal will trigger (library use, tests).
    pub fn new() -> Arc<Shutdown> {
        Arc::new(Shutdown::default())
    }

    /// Installs the SIGINT/SIGTERM handlers; `log` prints a line for the operator.
    pub fn install(log: impl Fn(&str) + Send + Sync + 'static) -> std::io::Result<Arc<Shutdown>> {
        use tokio::signal::unix::{signal, SignalKind};
        let shutdown = Shutdown::new();
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let s = shutdown.clone();
        tokio::spawn(async move {
            let mut count = 0;
            loop {
                let name = tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                };
                count += 1;
                if count == 1 {
                    log(&format!(
                        "{name} received: stopping after the current chunk (progress is saved); press Ctrl-C again to stop at once"
                    ));
                    s.request_stop();
                    let s2 = s.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(STOP_GRACE).await;
                        s2.request_cancel();
                    });
                } else {
                    log(&format!(
                        "{name} received again: cancelling the in-flight chunk and exiting"
                    ));
                    s.request_cancel();
                    tokio::spawn(async {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        std::process::exit(crate::error::exit::INTERRUPTED as i32);
                    });
                }
            }
        });
        Ok(shutdown)
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn request_cancel(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cancel.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// True once the in-flight statement is to be cancelled; a 57014 after this is ours.
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Resolves when a cancel is requested.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            if self.cancel_requested() {
                return;
            }
            notified.await;
        }
    }

    /// Sleeps, waking early when a stop is requested.
    pub async fn sleep(&self, d: Duration) {
        let notified = self.notify.notified();
        if self.stop_requested() {
            return;
        }
        let _ = tokio::time::timeout(d, notified).await;
    }
}
