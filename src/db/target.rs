//! Where to connect: a URL or key=value string, else the libpq environment variables, with
//! `.pgpass` for the password, libpq's `sslmode` values, and connect/keepalive defaults.
//! Knows how to describe the target without its password.
//! Never prints or logs a password; opens no connection itself beyond what it is asked to.

use super::tls;
use crate::error::{Error, Result};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::config::Host;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Session settings that make the text form of every key value stable between sessions.
const SESSION_OPTIONS: &str =
    "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3";

/// libpq's sslmode values; tokio-postgres knows only disable/prefer/require.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<SslMode> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::Usage(format!(
                "invalid sslmode `{other}`: use disable, allow, prefer, require, verify-ca or verify-full"
            )))
            }
        })
    }
}

/// A resolved connection target.
#[derive(Clone)]
pub struct Target {
    pub(super) config: tokio_postgres::Config,
    pub(super) tls: tokio_postgres_rustls::MakeRustlsConnect,
    pub(super) ssl_mode: SslMode,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Removes the TLS parameters that tokio-postgres cannot parse from a URL or key=value string,
/// returning them separately.
fn split_tls_params(s: &str) -> (String, Option<String>, Option<String>) {
    let mut mode = None;
    let mut root = None;
    let mut take = |k: &str, v: &str| match k {
        "sslmode" => {
            mode = Some(v.to_string());
            true
        }
        "sslrootcert" => {
            root = Some(v.to_string());
            true
        }
        _ => false,
    };
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        let Some((base, query)) = s.split_once('?') else {
            return (s.to_string(), None, None);
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                !take(k, &percent_decode(v))
            })
            .collect();
        let rebuilt = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rebuilt, mode, root)
    } else {
        let kept: Vec<&str> = s
            .split_whitespace()
            .filter(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                !take(k.trim(), v.trim_matches('\''))
            })
            .collect();
        (kept.join(" "), mode, root)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(Ok(b)) = s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn os_user() -> Option<String> {
    // SAFETY: getpwuid_r writes into the buffers we own and returns a pointer into them.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

fn home() -> Option<PathBuf> {
    env("HOME").map(PathBuf::from)
}

impl Target {
    /// Resolves the target from `--database-url` / `DATABASE_URL` when given, else from the libpq
    /// variables; pieces missing from the URL are filled from the libpq variables, as libpq does.
    pub fn resolve(url: Option<&str>) -> Result<Target> {
        let (mut config, url_mode, url_root) = match url {
            Some(u) => {
                let (clean, mode, root) = split_tls_params(u.trim());
                let config = tokio_postgres::Config::from_str(&clean).map_err(|e| {
                    Error::Usage(format!(
                        "invalid database URL: {e}; expected postgresql://USER@HOST:PORT/DATABASE or key=value pairs (the URL is not shown because it may hold a password)"
                    ))
                })?;
                (config, mode, root)
            }
            None => (tokio_postgres::Config::new(), None, None),
        };

        if config.get_hosts().is_empty() {
            let hosts = env("PGHOST").unwrap_or_else(|| {
                if std::path::Path::new("/var/run/postgresql").is_dir() {
                    "/var/run/postgresql".into()
                } else {
                    "localhost".into()
                }
            });
            for h in hosts.split(',') {
                config.host(h.trim());
            }
        }
        if config.get_ports().is_empty() {
            if let Some(p) = env("PGPORT") {
                for port in p.split(',') {
                    let port = port.trim().parse::<u16>().map_err(|_| {
                        Error::Usage(format!("invalid PGPORT `{p}`: expected a port number"))
                    })?;
                    config.port(port);
                }
            }
        }
        if config.get_user().is_none() {
            let user = env("PGUSER").or_else(os_user).ok_or_else(|| {
                Error::Usage("no database user: put it in the URL or set PGUSER".into())
            })?;
            config.user(&user);
        }
        if config.get_dbname().is_none() {
            let db = env("PGDATABASE")
                .unwrap_or_else(|| config.get_user().unwrap_or_default().to_string());
            config.dbname(&db);
        }
        if config.get_password().is_none() {
            if let Some(p) = env("PGPASSWORD").or_else(|| pgpass_lookup(&config)) {
                config.password(p);
            }
        }
        if config.get_connect_timeout().is_none() {
            let t = env("PGCONNECT_TIMEOUT")
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|&s| s > 0)
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
            config.connect_timeout(t);
        }
        if config.get_application_name().is_none() {
            config.application_name("backfill");
        }
        // Notice a dead peer within about a minute instead of the kernel's two hours.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        let options = match config.get_options() {
            Some(o) if !o.trim().is_empty() => format!("{o} {SESSION_OPTIONS}"),
            _ => SESSION_OPTIONS.to_string(),
        };
        config.options(&options);

        let all_unix = config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, Host::Unix(_)));
        let ssl_mode = match url_mode.or_else(|| env("PGSSLMODE")) {
            Some(m) => m.parse()?,
            // libpq's default is prefer; TLS does not apply to unix sockets.
            None if all_unix => SslMode::Disable,
            None => SslMode::Prefer,
        };
        let root = url_root.or_else(|| env("PGSSLROOTCERT"));
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let tls = tls::connector(ssl_mode, root.as_deref())?;
        Ok(Target {
            config,
            tls,
            ssl_mode,
        })
    }

    /// `user@host:port/database`, never the password.
    pub fn describe(&self) -> String {
        format!(
            "{}@{}",
            self.config.get_user().unwrap_or("?"),
            self.database()
        )
    }

    /// `host:port/database`: which database, whoever connects to it.
    pub fn database(&self) -> String {
        let c = &self.config;
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(h) => h.clone(),
                Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = c.get_ports().iter().map(|p| p.to_string()).collect();
        format!(
            "{}:{}/{}",
            hosts.join(","),
            if ports.is_empty() {
                "5432".into()
            } else {
                ports.join(",")
            },
            c.get_dbname().unwrap_or("?")
        )
    }

    /// Whether both name the same database: the same hosts (a host name in any case; several
    /// hosts in any order) with the same ports, and the same database name, once the libpq
    /// variables have filled what was left out; the user does not matter. Names are not
    /// resolved: `localhost` and `127.0.0.1` are different hosts here.
    pub fn same_database(&self, other: &Target) -> bool {
        let identity = |t: &Target| {
            let c = &t.config;
            let ports = c.get_ports();
            let mut hosts: Vec<(String, u16)> = c
                .get_hosts()
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let host = match h {
                        Host::Tcp(h) => h.to_lowercase(),
                        Host::Unix(p) => p.display().to_string(),
                    };
                    // One port for all hosts, or one each; libpq's default otherwise.
                    let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                    (host, port)
                })
                .collect();
            hosts.sort();
            (hosts, c.get_dbname().map(str::to_string))
        };
        identity(self) == identity(other)
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    pub fn connect_timeout(&self) -> Duration {
        self.config
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT)
    }
}

/// Looks the password up in `PGPASSFILE` or `~/.pgpass`, as libpq does (first matching line;
/// `*` matches anything; `\` escapes `:` and `\`). The file must not be readable by others.
fn pgpass_lookup(config: &tokio_postgres::Config) -> Option<String> {
    let path = env("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".pgpass")))?;
    let meta = std::fs::metadata(&path).ok()?;
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o077 != 0 {
        eprintln!(
            "warning: password file {} has group or world access; permissions should be u=rw (0600) or less; ignoring it",
            path.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let host = match config.get_hosts().first()? {
        Host::Tcp(h) => h.clone(),
        Host::Unix(_) => "localhost".into(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let db = config.get_dbname().unwrap_or_default();
    let user = config.get_user().unwrap_or_default();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        if fields.len() != 5 {
            continue;
        }
        let m = |pat: &str, v: &str| pat == "*" || pat == v;
        if m(&fields[0], &host) && m(&fields[1], &port) && m(&fields[2], db) && m(&fields[3], user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().unwrap().push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_params_are_split_from_urls_and_conninfo() {
        let (u, m, r) = split_tls_params("postgresql://a:secret@h/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fca.pem");
        assert_eq!(u, "postgresql://a:secret@h/db?application_name=x");
        assert_eq!(m.as_deref(), Some("verify-full"));
        assert_eq!(r.as_deref(), Some("/ca.pem"));
        let (u, m, _) = split_tls_params("host=h user=a sslmode=require");
        assert_eq!(u, "host=h user=a");
        assert_eq!(m.as_deref(), Some("require"));
    }

    #[test]
    fn description_never_shows_the_password() {
        let t = Target::resolve(Some(
            "postgresql://app:hunter2@db.internal:6543/app?sslmode=disable",
        ))
        .unwrap();
        let d = t.describe();
        assert_eq!(d, "app@db.internal:6543/app");
        assert!(!format!("{t:?}").contains("hunter2"));
        let e =
            Target::resolve(Some("postgresql://app:hunter2@db.internal:notaport/app")).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn bad_sslmode_is_a_usage_error() {
        let e = Target::resolve(Some("postgresql://a@h/db?sslmode=sometimes")).unwrap_err();
        assert!(e.to_string().contains("sslmode"), "{e}");
    }

    #[test]
    fn pgpass_lines_split_with_escapes() {
        assert_eq!(
            split_pgpass_line(r"h:5432:db:u:pa\:ss:word"),
            vec!["h", "5432", "db", "u", "pa:ss:word"]
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("%2Ftmp%2Fx"), "/tmp/x");
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
