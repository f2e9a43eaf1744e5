//! `backfill demo`: the whole product on one screen. Starts a throwaway PostgreSQL from the
//! installed binaries (unless a database URL is given), creates and fills `orders`, runs the
//! sample job `orders_status` with progress, prints its status and what to try next, and removes
//! the server again.
//! Touches only the throwaway server or the database it is given, and its own `orders` table.

use crate::db::Target;
use crate::error::{exit, Error, Result};
use crate::executor::{self, Outcome, RunOptions};
use crate::job::{self, JobSpec};
use crate::pgtemp::TempCluster;
use crate::signals::Shutdown;
use crate::store::Store;
use crate::telemetry::Progress;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const SAMPLE_JOB: &str = include_str!("../jobs/orders_status.toml");

/// The sample job: from the jobs directory when it is there, else the copy built into the binary.
fn sample_job(jobs: &Path) -> Result<JobSpec> {
    let path = job::path_for(jobs, "orders_status");
    if path.exists() {
        crate::resolve::load(jobs, "orders_status")
    } else {
        JobSpec::parse(
            "orders_status",
            Path::new("(built-in) jobs/orders_status.toml"),
            SAMPLE_JOB,
        )
    }
}

pub async fn run(url: Option<&str>, store: &Store, jobs: &Path, rows: u64) -> Result<u8> {
    let job = sample_job(jobs)?;
    let mut cluster = None;
    let target = match url {
        Some(u) => Target::resolve(Some(u))?,
        None => {
            eprintln!("demo: no database given; starting a throwaway PostgreSQL from the installed binaries…");
            let c = tokio::task::spawn_blocking(TempCluster::start)
                .await
                .map_err(|e| Error::Runtime(format!("demo: starting PostgreSQL: {e}")))?
                .map_err(|e| Error::Runtime(format!("demo: {e}")))?;
            eprintln!(
                "demo: PostgreSQL running in {} (removed when the demo ends)",
                c.socket_dir().display()
            );
            let t = Target::resolve(Some(&c.url("postgres")))?;
            cluster = Some(c);
            t
        }
    };
    let result = demo(&target, store, &job, rows).await;
    if let Some(mut c) = cluster {
        eprintln!("demo: stopping the throwaway PostgreSQL and removing its files");
        let stopped = tokio::task::spawn_blocking(move || c.stop()).await;
        if let Ok(Err(e)) = stopped {
            eprintln!("warning: demo: {e}");
        }
    }
    if result.is_ok() {
        println!("{}", next_steps(url.is_none()));
    }
    result
}

/// What to try after the demo: the commands an operator uses next, then a job of their own.
fn next_steps(throwaway: bool) -> String {
    let on = if throwaway {
        "  (the throwaway server is gone: run `backfill demo --database-url URL` on a server that stays to look at it)\n"
    } else {
        ""
    };
    format!(
        "next:\n{on}\
         \x20 backfill status orders_status    # progress, rate, chunk size, why it is held, last error\n\
         \x20 backfill plan orders_status      # review a job before it runs: first chunk's SQL, estimates, findings\n\
         \x20 a job of your own: jobs/NAME.toml with table, key, sql (:start/:end) and verify, then\n\
         \x20 backfill plan NAME, backfill run NAME, backfill gate NAME (see \"Quick start\" in the README)"
    )
}

/// The demo's `orders` table: `rows` rows with gaps in the ids, `status` NULL, analyzed.
pub async fn create_orders(client: &tokio_postgres::Client, rows: u64) -> Result<()> {
    client
        .batch_execute(&format!(
            "CREATE TABLE orders (
                 id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 customer_id   bigint NOT NULL,
                 amount_cents  bigint NOT NULL,
                 legacy_status char(1) NOT NULL,
                 status        text,
                 created_at    timestamptz NOT NULL DEFAULT now());
             INSERT INTO orders (id, customer_id, amount_cents, legacy_status, created_at)
             OVERRIDING SYSTEM VALUE
             SELECT g + (g / 1000) * 1000, (g * 7919) % 100000, (g * 104729) % 100000,
                    (ARRAY['P','S','D','C'])[1 + g % 4], now() - g * interval '1 second'
               FROM generate_series(1::bigint, {rows}) g;
             SELECT setval(pg_get_serial_sequence('orders', 'id'), (SELECT coalesce(max(id), 0) + 1 FROM orders));
             ANALYZE orders;"
        ))
        .await
        .map_err(|e| crate::db::error(e, "demo: creating table orders"))
}

async fn demo(target: &Target, store: &Store, job: &JobSpec, rows: u64) -> Result<u8> {
    let client = target.connect().await?;
    let exists: bool = client
        .query_one("SELECT to_regclass('orders') IS NOT NULL", &[])
        .await
        .map_err(|e| crate::db::error(e, "demo: looking for table orders"))?
        .get(0);
    if exists {
        eprintln!(
            "demo: table orders already exists on {}; using it as it is",
            target.describe()
        );
    } else {
        eprintln!("demo: creating table orders with {rows} rows (ids with gaps, status NULL)…");
        let t = Instant::now();
        create_orders(&client, rows).await?;
        eprintln!("demo: table ready in {:.1}s", t.elapsed().as_secs_f64());
    }
    drop(client);

    let progress = Arc::new(Progress::new(&job.name, Default::default()));
    let p = progress.clone();
    let shutdown = Shutdown::install(move |l| p.log(l))
        .map_err(|e| Error::Runtime(format!("cannot install signal handlers: {e}")))?;
    let report = executor::run(
        target,
        store,
        job,
        &RunOptions::default(),
        &shutdown,
        &*progress,
    )
    .await?;
    let rate = report.rows as f64 / report.elapsed_seconds.max(0.001);
    eprintln!(
        "demo: {} rows in {} chunks in {:.1}s ({rate:.0} rows/s)",
        report.rows, report.chunks, report.elapsed_seconds
    );
    let client = target.connect().await?;
    if let Some(c) = store.load(&client, &job.name).await? {
        println!(
            "job {}: state {}, {} rows done in {} chunks, cursor {}, verify {}",
            c.job,
            c.state,
            c.rows_done,
            c.chunks_done,
            c.cursor
                .as_deref()
                .map(crate::keyset::show_key)
                .unwrap_or_else(|| "none".into()),
            c.verify_remaining
                .map(|v| format!("{v} rows to do"))
                .unwrap_or_else(|| "not run".into())
        );
    }
    match report.outcome {
        Outcome::Done { .. } | Outcome::AlreadyDone => Ok(exit::SUCCESS),
        Outcome::Stopped | Outcome::LimitReached { .. } | Outcome::Cancelled => {
            Err(Error::Interrupted("demo: stopped".into()))
        }
        Outcome::Incomplete { why, .. } => Err(Error::Runtime(format!("demo: {why}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's quick start job is a valid job file of five lines (the demo points there).
    #[test]
    fn the_readme_quick_start_job_is_valid() {
        let readme = include_str!("../README.md");
        let start = readme.find("### Quick start").expect("a quick start");
        let toml = readme[start..]
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a job file in the quick start");
        assert_eq!(toml.lines().count(), 5, "{toml}");
        let job = JobSpec::parse("users_email_lower", Path::new("README.md"), toml).unwrap();
        assert_eq!(job.table.to_string(), "users");
    }
}
