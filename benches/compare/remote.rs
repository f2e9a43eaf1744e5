//! The "remote database" section: the server-side contenders ((a) one UPDATE, (d) the plpgsql
//! loop: one round trip in all) and the engine at defaults with 1 and 2 workers, each straight to
//! the database and through the latency proxy (`--rtt`), alternating in the same rounds on the
//! same table. The engine's chunk size and round trips per chunk come from its own counters; the
//! proxy's count of round trips on the wire is kept beside them.
//!
//! Measures; never prints the report (that is `report`) and never asserts a speed.

use crate::contenders;
use crate::measured::Contender;
use crate::network::{self, Route};
use crate::report::{RemoteReport, Report};
use crate::{Args, Server};

const WHO: [Contender; 4] = [
    Contender::SingleUpdate,
    Contender::PlpgsqlKeyset,
    Contender::Engine,
    Contender::Engine2,
];

pub async fn remote(server: &Server, args: &Args, report: &mut Report) {
    let remote = match &server.remote {
        Ok(r) => r,
        Err(why) => {
            eprintln!("bench: remote database: skipped ({why})");
            report.remote = Err(why.clone());
            return;
        }
    };
    let jobs = report.jobs_dir();
    contenders::fresh_orders(server, args.rows).await;
    let who: Vec<(Contender, Route)> = WHO
        .iter()
        .flat_map(|&c| [(c, Route::Loopback), (c, Route::Proxy)])
        .collect();
    let results = contenders::rounds_on_routes(server, args.rows, &who, args, &jobs).await;
    report.remote = Ok(RemoteReport {
        rtt: remote.rtt,
        loopback_rtt: network::measured_rtt(&server.url).await,
        proxied_rtt: network::measured_rtt(&remote.url).await,
        rows: args.rows,
        results,
    });
}
