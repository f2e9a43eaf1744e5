//! Recovering from what goes wrong around the chunks rather than inside them: the connection lost
//! (or the server restarted) while a run starts, a statement whose saved plan went stale after an
//! `ALTER TABLE`, and a COMMIT that took effect but whose answer never reached the runner. Jobs
//! are non-idempotent (n = n + 1), so a chunk applied twice or skipped shows.

use crate::support::*;
use backfill::pgtemp::TempCluster;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Sessions of the engine in this test's database, but not `except` (a test's own session).
fn engine_sessions(except: i64) -> String {
    format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = 'backfill' AND datname = current_database()
            AND pid <> pg_backend_pid() AND pid <> {except}"
    )
}

#[test]
fn a_session_lost_while_the_run_starts_is_reopened_and_the_run_finishes() {
    let db = TestDb::new();
    counter_table(&db, 1000);
    db.exec("ANALYZE t");
    db.write_job("s", &counter_job(""));
    // The start-up reads the table's last key: it waits for this lock, deterministically.
    let holder = db.session();
    let holder_pid = holder.i64("SELECT pg_backend_pid()::bigint");
    holder.exec("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE");
    let child = db.spawn(&["run", "s"]);
    db.wait_for(&engine_lock_waits(1), Duration::from_secs(30));
    db.exec(&engine_sessions(holder_pid));
    holder.exec("COMMIT");
    let out = wait_out(child, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("lost the database while starting the run")
            && out.stderr.contains("57P01"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("never analyzed"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0, "{out:?}");
    // The run joined once and was re-attached to its new session, not joined twice.
    assert_eq!(
        db.text("SELECT string_agg(outcome, ',' ORDER BY id) FROM backfill.runs WHERE job = 's'")
            .as_deref(),
        Some("done"),
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.runs WHERE job = 's'"),
        1000
    );
}

#[test]
fn the_run_waits_through_a_server_restart_while_it_starts() {
    // Its own server: restarting the shared one would disturb the other tests.
    let mut cluster = TempCluster::start().expect("a throwaway PostgreSQL");
    let url = cluster.url("postgres");
    let db = TestDb::on(&url, "restart_start");
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT g * 3 FROM generate_series(1, 2000) g;
         ANALYZE t;",
    );
    db.write_job("r", &counter_job(""));
    let holder = db.session();
    holder.exec("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE");
    let child = db.spawn(&["run", "r", "--reconnect-for", "60s"]);
    db.wait_for(&engine_lock_waits(1), Duration::from_secs(30));
    // Down for a while: connecting is refused until it is back (the holder's lock goes too).
    cluster.restart(Duration::from_millis(1500)).unwrap();
    let out = wait_out(child, Duration::from_secs(90));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("lost the database while starting the run")
            && out.stderr.contains("database is back"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("never analyzed"), "{out:?}");
    let check = Session::connect(&url);
    assert_eq!(check.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    assert_eq!(
        check.i64("SELECT rows_done FROM backfill.progress WHERE job = 'r'"),
        2000
    );
    drop(check);
    drop(holder);
    drop(db);
    cluster.stop().unwrap();
}

/// A lost connection during the row estimate is an error to wait out, not a table "never
/// analyzed" (which the run used to report before failing on the dead session).
#[test]
fn a_lost_connection_is_not_taken_for_a_table_never_analyzed() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE fresh (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0) WITH (autovacuum_enabled = false);
         INSERT INTO fresh (id) SELECT generate_series(1, 1000);",
    );
    db.write_job(
        "fresh",
        "table = \"fresh\"\nkey = [\"id\"]\nsql = \"UPDATE fresh SET n = n + 1 WHERE id BETWEEN :start AND :end\"\n",
    );
    let job = backfill::job::load(&db.jobs, "fresh").unwrap();
    block_on(async {
        let mut client = db.connect().await;
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let tx = client.transaction().await.unwrap();
        let killer = db.connect().await;
        killer
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
        let gone = "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)";
        while !killer
            .query_one(gone, &[&pid])
            .await
            .unwrap()
            .get::<_, bool>(0)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let estimate = backfill::executor::estimate_rows(&tx, &job, Duration::from_secs(30)).await;
        match estimate {
            Err(e) => assert_eq!(
                backfill::db::classify(&e),
                backfill::db::ErrorClass::Connection,
                "{e}"
            ),
            Ok(r) => panic!("a dead session gave an estimate: {r:?}"),
        }
    });
}

#[test]
fn a_stale_plan_after_alter_table_is_prepared_again_and_the_run_goes_on() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    // RETURNING * changes its result type when a column is added.
    db.write_job(
        "ret",
        &counter_job("lock_timeout = \"30s\"\n").replace(":end\"", ":end RETURNING *\""),
    );
    // Hold a row in the middle: the run stops there, with its statement cached.
    let holder = db.session();
    holder.exec("BEGIN; SELECT 1 FROM t WHERE id = (SELECT id FROM t ORDER BY id OFFSET 1000 LIMIT 1) FOR UPDATE");
    let child = db.spawn(&["run", "ret"]);
    db.wait_for(&engine_lock_waits(1), Duration::from_secs(30));
    assert!(db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'ret'") > 0);
    // The ALTER queues behind the chunk in flight and runs before the next one.
    let url = db.url.clone();
    let alter = std::thread::spawn(move || {
        Session::connect(&url).exec("ALTER TABLE t ADD COLUMN note text");
    });
    db.wait_for(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database()
                         AND query LIKE 'ALTER TABLE t ADD COLUMN%' AND wait_event_type = 'Lock')",
        Duration::from_secs(30),
    );
    holder.exec("COMMIT");
    alter.join().unwrap();
    let out = wait_out(child, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("0A000") && out.stderr.contains("prepared again"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0, "{out:?}");
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'ret'"),
        2000
    );
}

/// Where the upstream server listens.
enum Upstream {
    Tcp(String),
    Unix(std::path::PathBuf),
}

enum Stream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Stream {
    fn connect(to: &Upstream) -> std::io::Result<Stream> {
        Ok(match to {
            Upstream::Tcp(a) => Stream::Tcp(std::net::TcpStream::connect(a)?),
            Upstream::Unix(p) => Stream::Unix(std::os::unix::net::UnixStream::connect(p)?),
        })
    }
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    fn close(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A TCP proxy in front of the test server that loses COMMIT answers: on a session that parsed
/// a statement containing `marker`, it passes the next COMMIT to the server, waits for the
/// server's answer (so the commit took effect) and then closes both ends without passing the
/// answer on — `times` times in all. The runner sees its connection break during COMMIT.
struct LosingProxy {
    port: u16,
    lost: Arc<AtomicUsize>,
}

impl LosingProxy {
    fn start(server_url: &str, marker: &'static str, times: usize) -> LosingProxy {
        use std::str::FromStr;
        let config = tokio_postgres::Config::from_str(server_url).unwrap();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let upstream = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => Upstream::Tcp(format!("{h}:{port}")),
            tokio_postgres::config::Host::Unix(p) => {
                Upstream::Unix(p.join(format!(".s.PGSQL.{port}")))
            }
        };
        let upstream = Arc::new(upstream);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let lost = Arc::new(AtomicUsize::new(0));
        let proxy = LosingProxy {
            port: listener.local_addr().unwrap().port(),
            lost: lost.clone(),
        };
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = Stream::connect(&upstream) else {
                    continue;
                };
                let client = Stream::Tcp(client);
                let lost = lost.clone();
                std::thread::spawn(move || relay(client, server, marker, times, lost));
            }
        });
        proxy
    }

    /// The URL of `db`, through the proxy (plain text, so it can read the protocol).
    fn url(&self, server_url: &str) -> String {
        use std::str::FromStr;
        let config = tokio_postgres::Config::from_str(server_url).unwrap();
        let mut url = format!(
            "postgresql://{}@127.0.0.1:{}/{}?sslmode=disable",
            config.get_user().unwrap(),
            self.port,
            config.get_dbname().unwrap()
        );
        if let Some(p) = config.get_password() {
            let encoded: String = p
                .iter()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (*b as char).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect();
            url.push_str(&format!("&password={encoded}"));
        }
        url
    }
}

/// Relays one session, reading the client's messages to spot the COMMIT to lose.
fn relay(mut client: Stream, server: Stream, marker: &str, times: usize, lost: Arc<AtomicUsize>) {
    let cut = Arc::new(AtomicBool::new(false));
    let (mut from_server, mut to_client) =
        (server.try_clone().unwrap(), client.try_clone().unwrap());
    let (server_end, client_end) = (server.try_clone().unwrap(), client.try_clone().unwrap());
    let cutting = cut.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        loop {
            let n = match from_server.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Everything before the COMMIT was answered already (the client waited for it):
            // what comes now is the COMMIT's answer. Drop it and both connections.
            if cutting.load(Ordering::SeqCst) {
                break;
            }
            if to_client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        server_end.close();
        client_end.close();
    });
    let mut to_server = server;
    let read_exact = |s: &mut Stream, n: usize| -> Option<Vec<u8>> {
        let mut v = vec![0u8; n];
        s.read_exact(&mut v).ok().map(|_| v)
    };
    // Untyped start-up messages (an SSL or GSS request first, then the startup packet).
    loop {
        let Some(len) = read_exact(&mut client, 4) else {
            return;
        };
        let n = u32::from_be_bytes(len.clone().try_into().unwrap()) as usize;
        let Some(body) = read_exact(&mut client, n - 4) else {
            return;
        };
        if to_server.write_all(&len).is_err() || to_server.write_all(&body).is_err() {
            return;
        }
        let code = u32::from_be_bytes(body[..4].try_into().unwrap());
        if code != 80877103 && code != 80877104 {
            break;
        }
    }
    let mut armed = false;
    loop {
        let Some(head) = read_exact(&mut client, 5) else {
            return;
        };
        let n = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let Some(body) = read_exact(&mut client, n - 4) else {
            return;
        };
        match head[0] {
            b'P' if String::from_utf8_lossy(&body).contains(marker) => armed = true,
            b'Q' if armed && body.starts_with(b"COMMIT") => {
                armed = false;
                if lost.fetch_add(1, Ordering::SeqCst) < times {
                    cut.store(true, Ordering::SeqCst);
                } else {
                    lost.fetch_sub(1, Ordering::SeqCst);
                }
            }
            _ => {}
        }
        if to_server.write_all(&head).is_err() || to_server.write_all(&body).is_err() {
            return;
        }
    }
}

#[test]
fn the_history_counts_chunks_whose_commit_answer_was_lost() {
    let db = TestDb::new();
    counter_table(&db, 3000);
    db.write_job("h", &counter_job(""));
    let proxy = LosingProxy::start(&db.url, "UPDATE t SET n = n + 1", 3);
    let out = Out::from(
        db.cmd_at(&proxy.url(&db.url), &["run", "h"])
            .output()
            .unwrap(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(proxy.lost.load(Ordering::SeqCst), 3, "{out:?}");
    assert!(out.stderr.contains("committing"), "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0, "{out:?}");
    // The run's history holds what its chunks committed, as the checkpoint does.
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.runs WHERE job = 'h'"),
        db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'h'"),
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT chunks_done FROM backfill.runs WHERE job = 'h'"),
        db.i64("SELECT chunks_done FROM backfill.progress WHERE job = 'h'"),
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.runs WHERE job = 'h'"),
        3000
    );
    assert!(out.stderr.contains("3000 rows in 30 chunks"), "{out:?}");
}

/// The same with two workers, each on its own connection and range: the lost answers land on
/// both, and the run's history still adds up to the checkpoint.
#[test]
fn the_history_of_several_workers_counts_chunks_whose_commit_answer_was_lost() {
    let db = TestDb::new();
    counter_table(&db, 3000);
    db.write_job("w", &counter_job(""));
    let proxy = LosingProxy::start(&db.url, "UPDATE t SET n = n + 1", 4);
    let out = Out::from(
        db.cmd_at(&proxy.url(&db.url), &["run", "w", "--workers", "2"])
            .output()
            .unwrap(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(proxy.lost.load(Ordering::SeqCst), 4, "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0, "{out:?}");
    assert_eq!(
        db.i64("SELECT count(DISTINCT worker) FROM backfill.run_workers"),
        2,
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.runs WHERE job = 'w'"),
        3000,
        "{out:?}"
    );
    assert_eq!(
        db.i64("SELECT chunks_done FROM backfill.runs WHERE job = 'w'"),
        db.i64("SELECT chunks_done FROM backfill.progress WHERE job = 'w'"),
        "{out:?}"
    );
}

/// A killed run's history row, closed as abandoned by the next run, holds what it committed:
/// the runs of a job add up to its checkpoint.
#[test]
fn an_abandoned_run_keeps_what_it_committed_in_the_history() {
    let db = TestDb::new();
    counter_table(&db, 3000);
    db.write_job(
        "k",
        &counter_job("").replace(
            "n = n + 1 WHERE",
            "n = n + 1 FROM (SELECT pg_sleep(0.01)) s WHERE",
        ),
    );
    let mut child = db.spawn(&["run", "k"]);
    db.wait_for(
        "SELECT coalesce((SELECT rows_done >= 500 FROM backfill.progress WHERE job = 'k'), false)",
        Duration::from_secs(60),
    );
    signal(&child, libc::SIGKILL);
    let _ = child.wait();
    db.run(&["run", "k"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    assert_eq!(
        db.text("SELECT string_agg(outcome, ',' ORDER BY id) FROM backfill.runs WHERE job = 'k'")
            .as_deref(),
        Some("abandoned,done")
    );
    assert!(
        db.i64("SELECT rows_done FROM backfill.runs WHERE job = 'k' AND outcome = 'abandoned'")
            >= 500
    );
    assert_eq!(
        db.i64("SELECT sum(rows_done)::bigint FROM backfill.runs WHERE job = 'k'"),
        3000
    );
    assert_eq!(
        db.i64("SELECT sum(chunks_done)::bigint FROM backfill.runs WHERE job = 'k'"),
        db.i64("SELECT chunks_done FROM backfill.progress WHERE job = 'k'")
    );
}
