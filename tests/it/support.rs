//! Test support: one throwaway PostgreSQL per test binary (or the server named by
//! `BACKFILL_TEST_DATABASE_URL`), a fresh database per test, job files in a per-test directory,
//! and helpers that drive the built `backfill` binary as an operator would.

use backfill::db::Target;
use backfill::pgtemp::TempCluster;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

enum Server {
    Temp(TempCluster),
    External(String),
}

static SERVER: OnceLock<Server> = OnceLock::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        if let Err(e) = crate::tools::preflight() {
            panic!("{e}");
        }
        if let Ok(url) = std::env::var("BACKFILL_TEST_DATABASE_URL") {
            if !url.trim().is_empty() {
                return Server::External(url);
            }
        }
        match TempCluster::start() {
            Ok(c) => Server::Temp(c),
            Err(e) => panic!(
                "the tests need PostgreSQL and none could be started: {e}\n\
                 install the PostgreSQL server binaries (Debian/Ubuntu: apt-get install postgresql), \
                 or set BACKFILL_TEST_DATABASE_URL to a server where this role may create databases"
            ),
        }
    })
}

/// The throwaway cluster, when the tests run on one (not with BACKFILL_TEST_DATABASE_URL).
pub fn temp_cluster() -> Option<&'static TempCluster> {
    match server() {
        Server::Temp(c) => Some(c),
        Server::External(_) => None,
    }
}

/// The URL of database `db` on the test server.
pub fn url_for(db: &str) -> String {
    match server() {
        Server::Temp(c) => c.url(db),
        Server::External(url) => with_dbname(url, db),
    }
}

/// Replaces the database of a URL or key=value connection string.
fn with_dbname(url: &str, db: &str) -> String {
    if let Some(rest) = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
    {
        let scheme = &url[..url.len() - rest.len()];
        let (main, query) = match rest.split_once('?') {
            Some((m, q)) => (m, format!("?{q}")),
            None => (rest, String::new()),
        };
        let authority = main.split('/').next().unwrap_or("");
        format!("{scheme}{authority}/{db}{query}")
    } else {
        format!("{url} dbname={db}")
    }
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A fresh database and jobs directory for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub jobs: PathBuf,
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl TestDb {
    pub fn new() -> TestDb {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("bft_{}_{n}", std::process::id());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let admin_url = match server() {
            Server::Temp(_) => url_for("postgres"),
            Server::External(url) => url.clone(),
        };
        rt.block_on(async {
            let admin = Target::resolve(Some(&admin_url))
                .unwrap()
                .connect()
                .await
                .unwrap();
            admin
                .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE template0"))
                .await
                .unwrap();
        });
        TestDb::at(&url_for(&name), &name, rt)
    }

    /// An existing database at `url` (e.g. on a test's private cluster), with its own jobs
    /// directory named after `name`.
    pub fn on(url: &str, name: &str) -> TestDb {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        TestDb::at(url, &format!("{name}_{}", std::process::id()), rt)
    }

    fn at(url: &str, name: &str, rt: tokio::runtime::Runtime) -> TestDb {
        let (url, name) = (url.to_string(), name.to_string());
        let client = rt.block_on(async {
            Target::resolve(Some(&url))
                .unwrap()
                .connect()
                .await
                .unwrap()
        });
        let jobs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("jobs-{name}"));
        let _ = std::fs::remove_dir_all(&jobs);
        std::fs::create_dir_all(&jobs).unwrap();
        TestDb {
            name,
            url,
            jobs,
            rt,
            client,
        }
    }

    pub fn exec(&self, sql: &str) {
        self.rt
            .block_on(self.client.batch_execute(sql))
            .unwrap_or_else(|e| panic!("{sql}: {}", backfill::db::describe(&e)));
    }

    pub fn i64(&self, sql: &str) -> i64 {
        self.rt
            .block_on(self.client.query_one(sql, &[]))
            .unwrap_or_else(|e| panic!("{sql}: {}", backfill::db::describe(&e)))
            .get(0)
    }

    pub fn text(&self, sql: &str) -> Option<String> {
        self.rt
            .block_on(self.client.query_one(sql, &[]))
            .unwrap_or_else(|e| panic!("{sql}: {}", backfill::db::describe(&e)))
            .get(0)
    }

    /// Another session, e.g. to hold a lock while the engine runs.
    /// A client of this test's database, for tests that call the library directly.
    pub async fn connect(&self) -> tokio_postgres::Client {
        Target::resolve(Some(&self.url))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub fn session(&self) -> Session {
        Session::connect(&self.url)
    }

    pub fn write_job(&self, name: &str, toml: &str) {
        std::fs::write(self.jobs.join(format!("{name}.toml")), toml).unwrap();
    }

    /// The binary with this test's database and jobs, and none of the caller's PG* settings.
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_at(&self.url, args)
    }

    /// The binary with this test's jobs, connecting to `url`.
    pub fn cmd_at(&self, url: &str, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_backfill"));
        for (k, _) in std::env::vars() {
            if k.starts_with("PG") || k == "DATABASE_URL" || k.starts_with("BACKFILL_") {
                c.env_remove(k);
            }
        }
        c.arg("--database-url")
            .arg(url)
            .arg("--jobs")
            .arg(&self.jobs)
            .args(args);
        c.stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Out {
        Out::from(self.cmd(args).output().unwrap())
    }

    /// This test's database URL, connecting as `user`.
    pub fn url_as(&self, user: &str) -> String {
        if self.url.contains("://") {
            let sep = if self.url.contains('?') { '&' } else { '?' };
            format!("{}{sep}user={user}", self.url)
        } else {
            format!("{} user={user}", self.url)
        }
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits until `sql` returns true, or panics after `limit`.
    pub fn wait_for(&self, sql: &str, limit: Duration) {
        self.poll(sql, limit, None)
    }

    /// Like `wait_for`, for a condition a running child brings about: if the child exits first,
    /// panics with its output (instead of waiting out the limit).
    pub fn wait_for_child(&self, child: &mut Child, sql: &str, limit: Duration) {
        self.poll(sql, limit, Some(child))
    }

    fn poll(&self, sql: &str, limit: Duration, mut child: Option<&mut Child>) {
        let t = Instant::now();
        while t.elapsed() < limit {
            let ok: bool = self
                .rt
                .block_on(self.client.query_one(sql, &[]))
                .map(|r| r.get(0))
                .unwrap_or(false);
            if ok {
                return;
            }
            if let Some(child) = child.as_deref_mut() {
                if child.try_wait().unwrap().is_some() {
                    let mut stderr = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut stderr);
                    }
                    panic!("the child exited before: {sql}\n--- its stderr\n{stderr}");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("timed out after {limit:?} waiting for: {sql}");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.jobs);
        if let Server::External(url) = server() {
            let name = self.name.clone();
            let url = url.clone();
            let _ = std::thread::spawn(move || {
                block_on(async {
                    if let Ok(t) = Target::resolve(Some(&url)) {
                        if let Ok(c) = t.connect().await {
                            let _ = c
                                .batch_execute(&format!(
                                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                                ))
                                .await;
                        }
                    }
                })
            })
            .join();
        }
    }
}

pub struct Session {
    rt: tokio::runtime::Runtime,
    pub client: tokio_postgres::Client,
}

impl Session {
    /// A session on `url` (e.g. as another role: `TestDb::url_as`).
    pub fn connect(url: &str) -> Session {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client =
            rt.block_on(async { Target::resolve(Some(url)).unwrap().connect().await.unwrap() });
        Session { rt, client }
    }

    pub fn exec(&self, sql: &str) {
        self.try_exec(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Runs a future over this session's client (whose connection lives on the session's runtime).
    pub fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Like `exec`, for a statement expected to fail (e.g. one the test cancels).
    pub fn try_exec(&self, sql: &str) -> Result<(), String> {
        self.rt
            .block_on(self.client.batch_execute(sql))
            .map_err(|e| backfill::db::describe(&e))
    }

    pub fn i64(&self, sql: &str) -> i64 {
        self.rt
            .block_on(self.client.query_one(sql, &[]))
            .unwrap_or_else(|e| panic!("{sql}: {}", backfill::db::describe(&e)))
            .get(0)
    }
}

/// A finished command: exit code and output as text.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Out {
    fn from(o: Output) -> Out {
        use std::os::unix::process::ExitStatusExt;
        Out {
            code: o
                .status
                .code()
                .unwrap_or_else(|| 128 + o.status.signal().unwrap_or(0)),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Out {
    #[track_caller]
    pub fn expect(&self, code: i32) -> &Out {
        assert_eq!(self.code, code, "{self:?}");
        self
    }
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Waits for a child with a deadline, killing it if the deadline passes.
pub fn wait_out(mut child: Child, limit: Duration) -> Out {
    let t = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return Out::from(child.wait_with_output().unwrap());
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let out = Out::from(child.wait_with_output().unwrap());
            panic!("child did not exit within {limit:?}: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A job over table `t` (id bigint key) incrementing `n`: applying a chunk twice would show.
pub fn counter_job(extra: &str) -> String {
    format!(
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"UPDATE t SET n = n + 1 WHERE id BETWEEN :start AND :end\"\n\
         verify = \"SELECT count(*) FROM t WHERE n = 0\"\n\
         throttle = {{ target_chunk_time = \"0s\" }}\n{extra}"
    )
}

/// Table `t` with `rows` rows, ids with gaps (every third id missing, and a hole of a million).
pub fn counter_table(db: &TestDb, rows: i64) {
    db.exec(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT g + (g / 2) + CASE WHEN g > {half} THEN 1000000 ELSE 0 END
           FROM generate_series(1, {rows}) g;",
        half = rows / 2
    ));
}

/// Holds a row lock on the row at `offset` (in key order) of `table`, from a session of its own
/// (named `the_application`, not `backfill`),
/// so that a run's chunk reaching that row waits there (give the job a long `lock_timeout`): a
/// point part-way through a run that a test can act at. `COMMIT` on the session lets it go.
/// (Only that row: `ORDER BY … OFFSET … FOR UPDATE` would lock every row it skips.)
pub fn hold_row(db: &TestDb, table: &str, key: &str, offset: i64) -> Session {
    let s = db.session();
    s.exec(&format!(
        "SET application_name = 'the_application'; BEGIN; SELECT 1 FROM {table} WHERE {key} = (SELECT {key} FROM {table} ORDER BY {key} OFFSET {offset} LIMIT 1) FOR UPDATE"
    ));
    s
}

/// SQL that is true once `n` sessions of the engine (or more) in this test's database wait
/// for a lock.
pub fn engine_lock_waits(n: i64) -> String {
    format!(
        "SELECT count(*) >= {n} FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()
            AND application_name = 'backfill' AND wait_event_type = 'Lock'"
    )
}

/// Serialises edits of the throwaway cluster's pg_hba.conf, which all tests share.
static HBA: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Puts `lines` at the top of the throwaway cluster's pg_hba.conf (before its trust lines) and
/// asks the server to reload it. The lines stay for the cluster's life, so they must name only
/// a role of the caller's own. The reload is asynchronous: the caller waits for its effect.
/// Returns false on an external server (`BACKFILL_TEST_DATABASE_URL`), whose file is not ours.
pub fn hba_first(db: &TestDb, lines: &[&str]) -> bool {
    let Some(cluster) = temp_cluster() else {
        return false;
    };
    let _guard = HBA.lock().unwrap_or_else(|e| e.into_inner());
    let path = cluster.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&path).unwrap();
    let new = format!("{}\n{old}", lines.join("\n"));
    // Written in place, so the file keeps the owner the server needs.
    std::fs::write(&path, new).unwrap();
    db.exec("SELECT pg_reload_conf()");
    true
}

/// Spawns `args` and waits until job `job` has made progress and the engine waits for a lock
/// (a row the test holds, see `hold_row`): the command is part-way, by construction. Fails early
/// with the child's stderr if it exits first.
pub fn spawn_part_way(db: &TestDb, args: &[&str], job: &str, limit: Duration) -> Child {
    let mut child = db.spawn(args);
    db.wait_for_child(
        &mut child,
        &format!(
            "{} AND coalesce((SELECT rows_done > 0 FROM backfill.progress WHERE job = '{job}'), false)",
            engine_lock_waits(1)
        ),
        limit,
    );
    child
}
