//! Throwaway local PostgreSQL clusters, for `backfill demo`, the tests and the benchmarks.
//!
//! A cluster lives in a short directory under /tmp (unix socket paths are limited to ~107 bytes),
//! is initialised from the installed server binaries and listens on a unix socket there and on a
//! free loopback port. As root, the server runs as `postgres` (or `nobody`), since initdb and
//! postgres refuse to run as root.
//!
//! Nothing may be left behind, even when the owning process is SIGKILLed — and a test binary's
//! statics are never dropped at all. So every cluster has a *watchdog*: a small shell process in
//! its own session whose stdin is a pipe only the owner holds. When the owner exits, however it
//! exits, the pipe closes, and the watchdog stops the server and removes the directory. (A
//! parent-death signal would not do: it is tied to the thread that spawned the child, and a test
//! cluster is started from whichever short-lived test thread comes first.)

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum TempClusterError {
    #[error("no PostgreSQL server binaries (initdb, postgres) found: install them (Debian/Ubuntu: apt-get install postgresql), set BACKFILL_PG_BIN to their directory, or give a database URL to use an existing server")]
    NoBinaries,
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {output}")]
    Command {
        what: String,
        status: String,
        output: String,
    },
    #[error(
        "the throwaway PostgreSQL did not become ready within {secs}s; server log tail:\n{log}"
    )]
    NotReady { secs: u64, log: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TempClusterError {
    let what = what.into();
    move |source| TempClusterError::Io { what, source }
}

/// A running throwaway cluster; stopped and removed by [`TempCluster::stop`] or on drop.
#[derive(Debug)]
pub struct TempCluster {
    root: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    postmaster: Option<Child>,
    watchdog: Option<Child>,
    /// `name=value` settings given to [`TempCluster::start_with`], applied after (so over) the
    /// defaults.
    settings: Vec<String>,
}

/// The directory holding `initdb` and `postgres`: `BACKFILL_PG_BIN`, else a PATH entry that has
/// both (symlinks resolved), else the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Result<PathBuf, TempClusterError> {
    search_bin_dir(
        std::env::var_os("BACKFILL_PG_BIN").map(PathBuf::from),
        std::env::var_os("PATH"),
        Path::new("/usr/lib/postgresql"),
    )
}

fn search_bin_dir(
    explicit: Option<PathBuf>,
    path: Option<std::ffi::OsString>,
    versions_root: &Path,
) -> Result<PathBuf, TempClusterError> {
    let usable = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(dir) = explicit {
        return if usable(&dir) {
            Ok(dir)
        } else {
            Err(TempClusterError::NoBinaries)
        };
    }
    for dir in path.iter().flat_map(std::env::split_paths) {
        if usable(&dir) {
            let real = fs::canonicalize(dir.join("postgres"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf));
            if let Some(real) = real.filter(|r| usable(r)) {
                return Ok(real);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(versions_root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            usable(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .ok_or(TempClusterError::NoBinaries)
}

/// uid and gid of a user, via getpwnam_r.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam_r writes into buffers we own; we read the result only on success.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
    }
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<(), TempClusterError> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(io(format!("chown {}", path.display())))?;
    }
    Ok(())
}

fn free_loopback_port() -> Result<u16, TempClusterError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("find a free loopback port"))?;
    Ok(l.local_addr()
        .map_err(io("find a free loopback port"))?
        .port())
}

fn percent_encode_path(p: &Path) -> String {
    p.to_string_lossy()
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl TempCluster {
    /// Initialises and starts a fresh cluster, waiting until it accepts connections.
    pub fn start() -> Result<TempCluster, TempClusterError> {
        TempCluster::start_with(&[])
    }

    /// Like [`TempCluster::start`], with `name=value` server settings that override the
    /// defaults, which favour speed over durability (`fsync=off`, `synchronous_commit=off`,
    /// `full_page_writes=off`, `shared_buffers=128MB`): the benchmark passes production-like ones.
    /// They stay in force across restarts.
    pub fn start_with(settings: &[String]) -> Result<TempCluster, TempClusterError> {
        let mut cluster = TempCluster::prepare()?;
        cluster.settings = settings.to_vec();
        cluster.initdb()?;
        cluster.port = free_loopback_port()?;
        cluster.spawn_postmaster()?;
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// A streaming hot standby of this cluster (pg_basebackup -R), started and accepting reads.
    pub fn start_standby(&self) -> Result<TempCluster, TempClusterError> {
        let mut standby = TempCluster::prepare()?;
        let out = standby
            .command("pg_basebackup")
            .args(["-D", "data", "-R", "-X", "stream", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg("-h")
            .arg(&self.root)
            .output()
            .map_err(io("run pg_basebackup"))?;
        if !out.status.success() {
            return Err(TempClusterError::Command {
                what: "pg_basebackup".into(),
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        standby.port = free_loopback_port()?;
        standby.spawn_postmaster()?;
        standby.wait_ready()?;
        Ok(standby)
    }

    /// A directory with its watchdog, owned by the server user; no cluster in it yet.
    fn prepare() -> Result<TempCluster, TempClusterError> {
        let bin = find_bin_dir()?;
        // SAFETY: geteuid has no preconditions.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(
                lookup_user("postgres")
                    .or_else(|| lookup_user("nobody"))
                    .ok_or_else(|| TempClusterError::Io {
                        what: "find an unprivileged user (postgres or nobody) to run PostgreSQL as"
                            .into(),
                        source: std::io::Error::from(std::io::ErrorKind::NotFound),
                    })?,
            )
        } else {
            None
        };
        let root = loop {
            let dir = PathBuf::from(format!("/tmp/bfpg-{}", fastrand::u32(..)));
            match fs::create_dir(&dir) {
                Ok(()) => break dir,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io("create a directory under /tmp")(e)),
            }
        };
        let mut cluster = TempCluster {
            root,
            bin,
            port: 0,
            run_as,
            postmaster: None,
            watchdog: None,
            settings: Vec::new(),
        };
        // From here on, Drop cleans up whatever start() leaves half-done.
        fs::set_permissions(&cluster.root, fs::Permissions::from_mode(0o700))
            .map_err(io("set permissions"))?;
        chown(&cluster.root, run_as)?;
        cluster.spawn_watchdog()?;
        Ok(cluster)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c.env("LC_ALL", "C")
            .current_dir(&self.root)
            .stdin(Stdio::null());
        c
    }

    fn spawn_watchdog(&mut self) -> Result<(), TempClusterError> {
        // Blocks on stdin until the owner is gone, then stops the server (pid read from the data
        // directory, as the server may have been started after the watchdog) and removes the files.
        let script = r#"
            cat >/dev/null
            pid=$(head -n 1 "$DIR/data/postmaster.pid" 2>/dev/null)
            if [ -n "$pid" ]; then
                kill -INT "$pid" 2>/dev/null
                i=0
                while kill -0 "$pid" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
                kill -KILL "$pid" 2>/dev/null
                sleep 0.3
            fi
            rm -rf "$DIR"
        "#;
        let mut c = Command::new("/bin/sh");
        c.arg("-c")
            .arg(script)
            .env("DIR", &self.root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe; a new session keeps the watchdog alive when the
        // owner's process group is killed.
        unsafe {
            c.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        self.watchdog = Some(
            c.spawn()
                .map_err(io("start the cleanup watchdog (/bin/sh)"))?,
        );
        Ok(())
    }

    fn initdb(&self) -> Result<(), TempClusterError> {
        let out = self
            .command("initdb")
            .args([
                "-D",
                "data",
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .output()
            .map_err(io("run initdb"))?;
        if !out.status.success() {
            return Err(TempClusterError::Command {
                what: format!("initdb in {}", self.root.display()),
                status: out.status.to_string(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(())
    }

    fn spawn_postmaster(&mut self) -> Result<(), TempClusterError> {
        let log_path = self.root.join("server.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("open the server log"))?;
        chown(&log_path, self.run_as)?;
        let log2 = log.try_clone().map_err(io("open the server log"))?;
        let settings = [
            "listen_addresses=127.0.0.1".to_string(),
            format!("port={}", self.port),
            format!("unix_socket_directories={}", self.root.display()),
            "fsync=off".into(),
            "synchronous_commit=off".into(),
            "full_page_writes=off".into(),
            "max_connections=200".into(),
            "shared_buffers=128MB".into(),
            "wal_level=replica".into(),
            "max_wal_senders=10".into(),
            "logging_collector=off".into(),
        ];
        let mut c = self.command("postgres");
        c.arg("-D").arg("data");
        for s in settings.iter().chain(&self.settings) {
            c.arg("-c").arg(s);
        }
        c.stdout(log).stderr(log2);
        // SAFETY: setsid is async-signal-safe; the server must not get the terminal's Ctrl-C
        // before the engine under test has reacted to it.
        unsafe {
            c.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        self.postmaster = Some(c.spawn().map_err(io("start postgres"))?);
        Ok(())
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.root.join("server.log")) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn wait_ready(&mut self) -> Result<(), TempClusterError> {
        let t = Instant::now();
        let pid_file = self.root.join("data/postmaster.pid");
        while t.elapsed() < READY_TIMEOUT {
            if let Some(pm) = self.postmaster.as_mut() {
                if let Ok(Some(status)) = pm.try_wait() {
                    return Err(TempClusterError::Command {
                        what: "postgres".into(),
                        status: status.to_string(),
                        output: self.log_tail(),
                    });
                }
            }
            // The 8th line of postmaster.pid says "ready" once connections are accepted.
            let ready = fs::read_to_string(&pid_file)
                .map(|s| {
                    s.lines()
                        .nth(7)
                        .is_some_and(|l| matches!(l.trim(), "ready" | "standby"))
                })
                .unwrap_or(false);
            if ready && std::os::unix::net::UnixStream::connect(self.socket_file()).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(TempClusterError::NotReady {
            secs: READY_TIMEOUT.as_secs(),
            log: self.log_tail(),
        })
    }

    fn socket_file(&self) -> PathBuf {
        self.root.join(format!(".s.PGSQL.{}", self.port))
    }

    /// The directory holding the socket, the data and the server log.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The port: of the loopback listener, and in the socket file's name.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn superuser(&self) -> &str {
        "postgres"
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// uid and gid the server runs as, when it is not the current user.
    pub fn server_owner(&self) -> Option<(u32, u32)> {
        self.run_as
    }

    /// URL of `dbname` over the unix socket (trust authentication, no password).
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgresql://postgres@{}:{}/{dbname}",
            percent_encode_path(&self.root),
            self.port
        )
    }

    /// URL of `dbname` over TCP on 127.0.0.1.
    pub fn tcp_url(&self, dbname: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Runs `sql` with the cluster's psql and returns its unaligned output.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, TempClusterError> {
        let out = self
            .command("psql")
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-p",
            ])
            .arg(self.port.to_string())
            .arg("-h")
            .arg(&self.root)
            .args(["-d", dbname, "-c", sql])
            .output()
            .map_err(io("run psql"))?;
        if !out.status.success() {
            return Err(TempClusterError::Command {
                what: format!("psql -c {sql:?}"),
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the server (fast shutdown: sessions are terminated, as in a failover or a restart by
    /// an operator), keeps it down for `down`, then starts it again on the same socket and port.
    pub fn restart(&mut self, down: Duration) -> Result<(), TempClusterError> {
        self.shut_down();
        std::thread::sleep(down);
        self.start_again()
    }

    /// Stops the server (fast shutdown, as in `restart`) and leaves it down until
    /// [`TempCluster::start_again`]: for tests of what happens while the database is away.
    pub fn shut_down(&mut self) {
        self.shutdown_postmaster();
    }

    /// Starts a server stopped by [`TempCluster::shut_down`] again, on the same socket and port.
    pub fn start_again(&mut self) -> Result<(), TempClusterError> {
        self.spawn_postmaster()?;
        self.wait_ready()
    }

    fn shutdown_postmaster(&mut self) {
        if let Some(mut pm) = self.postmaster.take() {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(pm.id() as i32, libc::SIGINT);
            }
            let t = Instant::now();
            while pm.try_wait().ok().flatten().is_none() {
                if t.elapsed() > STOP_TIMEOUT {
                    let _ = pm.kill();
                    let _ = pm.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Fast shutdown, then removes the directory. Idempotent.
    pub fn stop(&mut self) -> Result<(), TempClusterError> {
        self.shutdown_postmaster();
        let removed = match fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("remove {}", self.root.display()))(e))
            }
            _ => Ok(()),
        };
        if let Some(mut w) = self.watchdog.take() {
            drop(w.stdin.take());
            let _ = w.wait();
        }
        removed
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Running (a zombie waiting to be reaped counts as gone).
    fn alive(pid: i32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    }

    #[test]
    fn missing_binaries_say_what_to_install() {
        let empty = std::env::temp_dir().join(format!("bf-nobin-{}", std::process::id()));
        fs::create_dir_all(&empty).unwrap();
        let e = search_bin_dir(None, Some(empty.clone().into_os_string()), &empty).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("apt-get install postgresql") && m.contains("BACKFILL_PG_BIN"),
            "{m}"
        );
        assert!(search_bin_dir(Some(empty.clone()), None, &empty).is_err());
        // The newest version directory wins.
        for v in ["9", "15", "13"] {
            let bin = empty.join(v).join("bin");
            fs::create_dir_all(&bin).unwrap();
            fs::write(bin.join("initdb"), "").unwrap();
            fs::write(bin.join("postgres"), "").unwrap();
        }
        assert_eq!(
            search_bin_dir(None, None, &empty).unwrap(),
            empty.join("15/bin")
        );
        fs::remove_dir_all(&empty).unwrap();
    }

    #[test]
    fn starts_answers_and_leaves_nothing_behind() {
        let mut c = TempCluster::start().unwrap();
        assert_eq!(c.psql("postgres", "SELECT 40 + 2").unwrap().trim(), "42");
        assert!(c
            .url("x")
            .starts_with("postgresql://postgres@%2Ftmp%2Fbfpg-"));
        let pid = c.postmaster.as_ref().unwrap().id() as i32;
        let dir = c.socket_dir().to_path_buf();
        assert!(dir.join("data/PG_VERSION").exists());
        c.stop().unwrap();
        c.stop().unwrap();
        assert!(!dir.exists());
        assert!(!alive(pid));
    }

    /// Helper for the next test: run in a child process, which is then SIGKILLed.
    #[test]
    #[ignore]
    fn hold_a_cluster_until_killed() {
        if std::env::var_os("BACKFILL_PGTEMP_CHILD").is_none() {
            return;
        }
        let c = TempCluster::start().unwrap();
        let pid = fs::read_to_string(c.data_dir().join("postmaster.pid")).unwrap();
        println!(
            "CLUSTER {} {}",
            c.socket_dir().display(),
            pid.lines().next().unwrap()
        );
        std::thread::sleep(Duration::from_secs(120));
    }

    #[test]
    fn a_killed_owner_leaves_nothing_behind() {
        use std::io::BufRead;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "pgtemp::tests::hold_a_cluster_until_killed",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BACKFILL_PGTEMP_CHILD", "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // libtest may print "test … ... " before our line: look for the marker anywhere.
        let line = lines
            .find_map(|l| {
                l.ok()
                    .and_then(|l| l.find("CLUSTER ").map(|i| l[i..].to_string()))
            })
            .expect("child reports its cluster");
        let mut parts = line.split_whitespace().skip(1);
        let dir = PathBuf::from(parts.next().unwrap());
        let pid: i32 = parts.next().unwrap().parse().unwrap();
        assert!(dir.exists() && alive(pid));
        child.kill().unwrap();
        child.wait().unwrap();
        let t = Instant::now();
        while (dir.exists() || alive(pid)) && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert!(!alive(pid), "postgres {pid} left running");
    }
}
