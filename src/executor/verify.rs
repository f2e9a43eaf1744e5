//! After a pass over every key: `verify`, and — while it still counts rows written behind the
//! cursor — a sweep pass over every key again, when the statement is safe to apply twice. Must
//! not walk keys itself (the workers do) or record the run's outcome (the run does).

use super::start::connect_patiently;
use super::Shared;
use crate::error::Result;
use crate::events::Event;
use crate::state::Phase;
use crate::store::Sweep;

impl Shared<'_> {
    /// Runs `verify` after a pass; when it still counts rows, starts (or joins) a sweep pass —
    /// only when the statement is harmless to apply twice (a sweep revisits keys already done).
    pub(super) async fn verify_and_sweep(&self) -> Result<AfterPass> {
        let (job, store) = (self.job, self.store);
        let name = job.name.as_str();
        let mut client = connect_patiently(
            self.target,
            self.opts.reconnect_for,
            self.events,
            self.shutdown,
        )
        .await?;
        store.set_phase(&client, name, Phase::Verifying).await?;
        let seen = store.sweeps(&client, name).await?;
        let n = crate::migrator::verify(&client, job, self.opts.verify_timeout).await?;
        if n == 0 {
            return Ok(AfterPass::Verified);
        }
        let incomplete = |why: String, not_swept| {
            self.emit(Event::Incomplete { why: &why });
            Ok(AfterPass::Incomplete {
                remaining: n,
                why,
                not_swept,
            })
        };
        if job.max_sweeps == 0 {
            return incomplete(
                format!("verify counts {n} rows still to do; not swept (max_sweeps = 0)"),
                NotSwept::Disabled,
            );
        }
        if let Some(why) = self.unsafe_to_sweep().await? {
            return incomplete(
                format!("verify counts {n} rows still to do; not swept: {why}"),
                NotSwept::Unsafe,
            );
        }
        let sweep = store
            .start_sweep(&mut client, job, seen, &self.keyset.last_key_sql())
            .await?;
        match sweep {
            Sweep::Ready { pass } => {
                self.emit(Event::Sweeping {
                    remaining: n,
                    pass,
                    max: job.max_sweeps,
                });
                Ok(AfterPass::Sweep)
            }
            Sweep::Done => {
                self.emit(Event::CompletedElsewhere);
                Ok(AfterPass::Verified)
            }
            Sweep::Exhausted { passes } => incomplete(
                format!(
                    "verify still counts {n} rows to do after {passes} sweeps (max_sweeps = {})",
                    job.max_sweeps
                ),
                NotSwept::Exhausted,
            ),
        }
    }

    /// Why applying the statement again to keys already done would be wrong, if it would (see
    /// `plan::unsafe_to_sweep`).
    pub(super) async fn unsafe_to_sweep(&self) -> Result<Option<String>> {
        let plan = crate::plan::probe_first_chunk(self.target, self.job).await?;
        Ok(crate::plan::unsafe_to_sweep(&plan))
    }
}

/// What verify said after a pass.
pub(super) enum AfterPass {
    /// Verify returned 0.
    Verified,
    /// A sweep pass is ready to walk.
    Sweep,
    /// Rows remain and no (further) sweep will run.
    Incomplete {
        remaining: i64,
        why: String,
        not_swept: NotSwept,
    },
}

/// Why rows that verify still counts were not swept: what will help differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotSwept {
    /// `max_sweeps = 0`: raising it (not part of the job's fingerprint) lets a run sweep.
    Disabled,
    /// The statement is not safe to apply again to keys already done (no guard, not idempotent,
    /// fails, or could not be checked): every new run refuses to sweep too, until it is.
    Unsafe,
    /// `max_sweeps` passes ran and verify still counts rows: a new run sweeps again.
    Exhausted,
}
