//! The contenders, each filling a fresh column of `orders` from `legacy_status` (the sample job's
//! change): one UPDATE, the loops migration guides show, the best hand-written loop, and the
//! engine itself (the real binary, so its start-up, catalog checks and checkpoints are counted).
//!
//! Each contender reaches the database on a route: straight, or through the latency proxy (the
//! "remote database" section); the table is prepared and checked straight.
//!
//! Measures; never prints the report (that is `report`) and never asserts a speed.

use crate::engine::{self, EngineRun};
use crate::measured::{Contender, Measured, RouteResults};
use crate::network::Route;
use crate::report::Report;
use crate::{connect, Args, Server};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const EXPR: &str = "CASE legacy_status WHEN 'P' THEN 'pending' WHEN 'S' THEN 'shipped' \
                    WHEN 'D' THEN 'delivered' ELSE 'cancelled' END";

const ALL: [Contender; 8] = [
    Contender::SingleUpdate,
    Contender::NullScanLoop,
    Contender::OffsetLoop,
    Contender::PlpgsqlKeyset,
    Contender::PlpgsqlKeysetTwice,
    Contender::Engine,
    Contender::Engine2,
    Contender::Engine4,
];

const KEYSET_PROCEDURE: &str = "
CREATE OR REPLACE PROCEDURE bench_keyset(col text, batch int, lo bigint, last bigint) LANGUAGE plpgsql AS $$
DECLARE hi bigint;
BEGIN
  LOOP
    SELECT max(id) INTO hi FROM (SELECT id FROM orders WHERE id > lo AND id <= last ORDER BY id LIMIT batch) s;
    EXIT WHEN hi IS NULL;
    EXECUTE format('UPDATE orders SET %I = CASE legacy_status WHEN ''P'' THEN ''pending'' '
                   'WHEN ''S'' THEN ''shipped'' WHEN ''D'' THEN ''delivered'' ELSE ''cancelled'' END '
                   'WHERE id > $1 AND id <= $2', col) USING lo, hi;
    lo := hi;
    COMMIT;
  END LOOP;
END $$";

/// A fresh `orders` table of `rows` rows, brought to the steady state every contender meets
/// (one full rewrite behind it, vacuumed), with the keyset procedure in place.
pub async fn fresh_orders(server: &Server, rows: u64) {
    let c = connect(&server.url).await;
    c.batch_execute("DROP TABLE IF EXISTS orders")
        .await
        .unwrap();
    backfill::demo::create_orders(&c, rows).await.unwrap();
    c.batch_execute(KEYSET_PROCEDURE).await.unwrap();
    c.batch_execute(&format!(
        "ALTER TABLE orders ADD COLUMN warm text; UPDATE orders SET warm = {EXPR}; ALTER TABLE orders DROP COLUMN warm"
    ))
    .await
    .unwrap();
    c.batch_execute("VACUUM orders").await.unwrap();
}

/// Whether a statement finished (true) or was stopped by the budget's statement_timeout
/// (false); any other error fails the bench: a contender that breaks is not "slow".
fn within_budget<T>(r: Result<T, tokio_postgres::Error>) -> bool {
    match r {
        Ok(_) => true,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => false,
        Err(e) => panic!("a contender failed: {}", backfill::db::describe(&e)),
    }
}

async fn max_id(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT max(id) FROM orders", &[])
        .await
        .unwrap()
        .get(0)
}

/// Times one contender filling a new column on `route`; the column is checked complete, then
/// dropped.
async fn measure(
    server: &Server,
    (who, route): (Contender, Route),
    col: &str,
    budget: Duration,
    jobs: &Path,
) -> Measured {
    let admin = connect(&server.url).await;
    admin
        .batch_execute(&format!("ALTER TABLE orders ADD COLUMN {col} text"))
        .await
        .unwrap();
    admin.batch_execute("VACUUM orders").await.unwrap();
    admin.batch_execute("CHECKPOINT").await.unwrap();
    let url = server.url_for(route);
    let c = connect(url).await;
    let fill = Fill {
        server,
        url,
        c: &c,
        col,
        budget,
        jobs,
        started: Instant::now(),
    };
    let mut m = Measured::default();
    let finished = match who {
        Contender::SingleUpdate => fill.single_update().await,
        Contender::NullScanLoop => fill.null_scan_loop().await,
        Contender::OffsetLoop => fill.offset_loop().await,
        Contender::PlpgsqlKeyset => fill.plpgsql_keyset().await,
        Contender::PlpgsqlKeysetTwice => fill.plpgsql_keyset_twice().await,
        Contender::Engine | Contender::Engine2 | Contender::Engine4 => {
            fill.engine(who, &mut m).await
        }
    };
    if finished {
        m.time = Some(fill.started.elapsed());
        let left: i64 = admin
            .query_one(
                &format!("SELECT count(*) FROM orders WHERE {col} IS NULL"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "{} left {left} rows undone", who.label());
    }
    drop(c);
    admin
        .batch_execute(&format!("ALTER TABLE orders DROP COLUMN {col}"))
        .await
        .unwrap();
    m
}

/// One contender's fill of the new column `col`, timed from `started`. Each way returns whether
/// it finished within the budget.
struct Fill<'a> {
    server: &'a Server,
    /// The database URL on the contender's route.
    url: &'a str,
    c: &'a tokio_postgres::Client,
    col: &'a str,
    budget: Duration,
    jobs: &'a Path,
    started: Instant,
}

impl Fill<'_> {
    fn over(&self) -> bool {
        self.started.elapsed() > self.budget
    }

    /// Statements that run on the server alone are stopped at the budget by statement_timeout.
    async fn bounded(&self, c: &tokio_postgres::Client) {
        c.batch_execute(&format!(
            "SET statement_timeout = {}",
            self.budget.as_millis()
        ))
        .await
        .unwrap();
    }

    async fn single_update(&self) -> bool {
        let (c, col) = (self.c, self.col);
        self.bounded(c).await;
        within_budget(
            c.execute(&format!("UPDATE orders SET {col} = {EXPR}"), &[])
                .await,
        )
    }

    async fn null_scan_loop(&self) -> bool {
        let (c, col) = (self.c, self.col);
        let sql = format!(
            "UPDATE orders SET {col} = {EXPR} WHERE id IN (SELECT id FROM orders WHERE {col} IS NULL LIMIT 1000)"
        );
        loop {
            if c.execute(&sql, &[]).await.unwrap() == 0 {
                break true;
            }
            if self.over() {
                break false;
            }
        }
    }

    async fn offset_loop(&self) -> bool {
        let (c, col) = (self.c, self.col);
        let sql = format!(
            "UPDATE orders SET {col} = {EXPR} WHERE id IN (SELECT id FROM orders ORDER BY id LIMIT 1000 OFFSET $1)"
        );
        let mut offset: i64 = 0;
        loop {
            if c.execute(&sql, &[&offset]).await.unwrap() == 0 {
                break true;
            }
            offset += 1000;
            if self.over() {
                break false;
            }
        }
    }

    async fn plpgsql_keyset(&self) -> bool {
        let (c, col) = (self.c, self.col);
        self.bounded(c).await;
        let last = max_id(c).await;
        within_budget(
            c.batch_execute(&format!("CALL bench_keyset('{col}', 5000, 0, {last})"))
                .await,
        )
    }

    async fn plpgsql_keyset_twice(&self) -> bool {
        let (c, col) = (self.c, self.col);
        let last = max_id(c).await;
        let half = last / 2;
        let other = connect(self.url).await;
        for s in [c, &other] {
            self.bounded(s).await;
        }
        let low = format!("CALL bench_keyset('{col}', 5000, 0, {half})");
        let high = format!("CALL bench_keyset('{col}', 5000, {half}, {last})");
        let (a, b) = tokio::join!(c.batch_execute(&low), other.batch_execute(&high));
        within_budget(a) & within_budget(b)
    }

    /// `backfill run` on a job for the column; its own CPU and memory go into `m`.
    async fn engine(&self, who: Contender, m: &mut Measured) -> bool {
        let (col, jobs) = (self.col, self.jobs);
        let job = format!(
            "table = \"orders\"\nkey = [\"id\"]\nchunk_rows = 5000\n\
             sql = \"UPDATE orders SET {col} = {EXPR} WHERE id BETWEEN :start AND :end AND {col} IS NULL\"\n"
        );
        std::fs::write(jobs.join(format!("{col}.toml")), job).unwrap();
        let workers = who.workers().expect("an engine contender");
        let cmd = engine::command(
            self.url,
            jobs,
            &["run", col, "--workers", workers, "--json"],
        );
        let flights = self.server.flights();
        let run = engine::run_measured(cmd, self.budget);
        if self.url != self.server.url {
            m.flights = Some(self.server.flights() - flights);
        }
        match run {
            Ok(usage) => {
                m.cpu = Some(usage.cpu);
                m.rss_kb = Some(usage.max_rss_kb);
                m.counters = usage.counters;
                true
            }
            Err(EngineRun::OverBudget(counters)) => {
                m.counters = counters;
                false
            }
            Err(EngineRun::Failed(status)) => {
                panic!(
                    "{} failed (exit status {status}): the bench measures only runs that succeed",
                    who.label()
                )
            }
        }
    }
}

/// Every contender straight to the database, `rounds` times at `rows`, in a rotating order.
async fn rounds_at(
    server: &Server,
    rows: u64,
    who: &[Contender],
    args: &Args,
    jobs: &Path,
) -> Vec<(Contender, Vec<Measured>)> {
    fresh_orders(server, rows).await;
    let who: Vec<_> = who.iter().map(|c| (*c, Route::Loopback)).collect();
    rounds_on_routes(server, rows, &who, args, jobs)
        .await
        .into_iter()
        .map(|((c, _), ms)| (c, ms))
        .collect()
}

/// Every (contender, route), `rounds` times on the `orders` table in place (of `rows` rows), in
/// a rotating order.
pub async fn rounds_on_routes(
    server: &Server,
    rows: u64,
    who: &[(Contender, Route)],
    args: &Args,
    jobs: &Path,
) -> RouteResults {
    // Column names (and the engine's job names) are unique over the whole bench run: a job
    // name already done would not run again.
    static FILLS: AtomicUsize = AtomicUsize::new(0);
    let mut out: RouteResults = who.iter().map(|c| (*c, Vec::new())).collect();
    for round in 0..args.rounds {
        for i in 0..who.len() {
            let k = (i + round) % who.len();
            let n = FILLS.fetch_add(1, Ordering::Relaxed) + 1;
            let col = format!("c{rows}_{n}");
            let m = measure(server, who[k], &col, args.budget, jobs).await;
            eprintln!(
                "bench: {rows} rows, round {}: {} ({:?}) {:?}",
                round + 1,
                who[k].0.label(),
                who[k].1,
                m.time
            );
            out[k].1.push(m);
        }
    }
    out
}

pub async fn throughput(server: &Server, args: &Args, report: &mut Report) {
    let jobs = report.jobs_dir();
    // The engine's own schema exists before the first measured run, so no run pays for it.
    engine::init(&server.url, &jobs);
    let results = rounds_at(server, args.rows, &ALL, args, &jobs).await;
    report.throughput_rows = args.rows;
    report.throughput = results;
}

pub async fn scaling(server: &Server, args: &Args, report: &mut Report) {
    let jobs = report.jobs_dir();
    let who = [
        Contender::Engine,
        Contender::NullScanLoop,
        Contender::OffsetLoop,
    ];
    for &rows in &args.scale {
        let results = if rows == report.throughput_rows {
            report
                .throughput
                .iter()
                .filter(|(c, _)| who.contains(c))
                .cloned()
                .collect()
        } else {
            rounds_at(server, rows, &who, args, &jobs).await
        };
        report.scaling.push((rows, results));
    }
}
