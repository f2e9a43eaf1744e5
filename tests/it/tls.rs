//! TLS against a real server with a certificate made for the test: libpq's sslmode semantics,
//! a server without TLS, `allow` reaching a server that accepts only TLS, and `sslrootcert=system`.

use crate::support::*;
use backfill::db::Target;
use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new(crate::tools::system_tool("openssl"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl starts");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a CA and a server certificate for DNS name `localhost`; returns the CA file.
fn make_certs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=backfill test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "other-ca.key",
            "-out",
            "other-ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=someone else",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

fn ssl_in_use(url: &str) -> Result<bool, String> {
    block_on(async {
        let client = Target::resolve(Some(url))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get(0))
    })
}

/// The binary run as an operator would, with nothing of the caller's connection settings: only
/// `envs`, and HOME set to `home` (for `~/.postgresql/root.crt`).
fn backfill_env(db: &TestDb, home: &Path, envs: &[(&str, String)], args: &[&str]) -> Out {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backfill"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") || k == "DATABASE_URL" || k.starts_with("SSL_CERT_") {
            c.env_remove(k);
        }
    }
    c.env("HOME", home)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null());
    c.arg("--jobs").arg(&db.jobs).args(args);
    Out::from(c.output().unwrap())
}

#[test]
fn sslmodes_encrypt_and_verify_as_libpq_does() {
    let Some(cluster) = temp_cluster() else {
        eprintln!("skipped: needs the throwaway cluster (BACKFILL_TEST_DATABASE_URL is set)");
        return;
    };
    let db = TestDb::new();
    let dir =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{}", db.name));
    make_certs(&dir);
    let ca = dir.join("ca.crt").display().to_string();
    let other = dir.join("other-ca.crt").display().to_string();
    let data = cluster.data_dir();
    for f in ["server.crt", "server.key"] {
        std::fs::copy(dir.join(f), data.join(f)).unwrap();
        if let Some((uid, gid)) = cluster.server_owner() {
            std::os::unix::fs::chown(data.join(f), Some(uid), Some(gid)).unwrap();
        }
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        data.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let port = cluster.port();
    let url = |host: &str, params: &str| {
        format!("postgresql://postgres@{host}:{port}/{}?{params}", db.name)
    };

    // A server without TLS: prefer and allow connect in plaintext; the modes that require
    // encryption refuse to connect rather than fall back.
    assert_eq!(
        db.text("SELECT current_setting('ssl')").as_deref(),
        Some("off")
    );
    assert_eq!(
        ssl_in_use(&url("127.0.0.1", "application_name=x")),
        Ok(false),
        "prefer falls back to plaintext"
    );
    assert_eq!(ssl_in_use(&url("127.0.0.1", "sslmode=allow")), Ok(false));
    for mode in ["require", "verify-ca", "verify-full"] {
        let r = ssl_in_use(&url(
            "localhost",
            &format!("sslmode={mode}&sslrootcert={ca}"),
        ));
        assert!(r.is_err(), "sslmode={mode} on a server without TLS: {r:?}");
    }
    let empty_home = dir.join("home-empty");
    std::fs::create_dir_all(&empty_home).unwrap();
    let port_s = port.to_string();
    let libpq = |host: &'static str, mode: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("PGHOST", host.into()),
            ("PGPORT", port_s.clone()),
            ("PGUSER", "postgres".into()),
            ("PGDATABASE", db.name.clone()),
            ("PGSSLMODE", mode.into()),
        ]
    };
    for mode in ["prefer", "allow"] {
        backfill_env(&db, &empty_home, &libpq("127.0.0.1", mode), &["status"]).expect(0);
    }
    let out = backfill_env(
        &db,
        &empty_home,
        &libpq("127.0.0.1", "require"),
        &["status"],
    );
    assert_eq!(out.code, 1, "require on a server without TLS: {out:?}");
    assert!(
        out.stderr.contains("cannot connect to postgres@127.0.0.1"),
        "{out:?}"
    );

    db.exec("ALTER SYSTEM SET ssl_cert_file = 'server.crt'");
    db.exec("ALTER SYSTEM SET ssl_key_file = 'server.key'");
    db.exec("ALTER SYSTEM SET ssl = on");
    db.exec("SELECT pg_reload_conf()");
    db.wait_for(
        "SELECT current_setting('ssl') = 'on'",
        std::time::Duration::from_secs(10),
    );

    assert_eq!(ssl_in_use(&url("127.0.0.1", "sslmode=disable")), Ok(false));
    assert_eq!(
        ssl_in_use(&url("127.0.0.1", "application_name=x")),
        Ok(true),
        "prefer is the default over TCP"
    );
    assert_eq!(ssl_in_use(&url("127.0.0.1", "sslmode=require")), Ok(true));
    assert_eq!(
        ssl_in_use(&url(
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={ca}")
        )),
        Ok(true)
    );
    assert_eq!(
        ssl_in_use(&url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}")
        )),
        Ok(true)
    );
    let wrong_name = ssl_in_use(&url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ));
    assert!(
        wrong_name.is_err(),
        "certificate is for localhost, not 127.0.0.1: {wrong_name:?}"
    );
    let wrong_ca = ssl_in_use(&url(
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={other}"),
    ));
    assert!(wrong_ca.is_err(), "signed by another CA: {wrong_ca:?}");

    // The binary, end to end, with the libpq variables instead of a URL.
    db.write_job("j", &counter_job(""));
    counter_table(&db, 100);
    let mut env = libpq("localhost", "verify-full");
    env.push(("PGSSLROOTCERT", ca.clone()));
    backfill_env(&db, &empty_home, &env, &["run", "j"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);

    // sslrootcert=system: the system's trust store, not ~/.postgresql/root.crt. The test's CA is
    // in neither until SSL_CERT_FILE (which the system store honours) or root.crt names it.
    let ca_home = dir.join("home-ca");
    std::fs::create_dir_all(ca_home.join(".postgresql")).unwrap();
    std::fs::copy(&ca, ca_home.join(".postgresql/root.crt")).unwrap();
    let mut system = libpq("localhost", "verify-full");
    system.push(("PGSSLROOTCERT", "system".into()));
    let out = backfill_env(&db, &ca_home, &system, &["status"]);
    assert_eq!(
        out.code, 1,
        "system roots must not include ~/.postgresql/root.crt: {out:?}"
    );
    assert!(
        out.stderr.contains("cannot connect to postgres@localhost")
            && out.stderr.contains("certificate"),
        "{out:?}"
    );
    backfill_env(
        &db,
        &ca_home,
        &libpq("localhost", "verify-full"),
        &["status"],
    )
    .expect(0);
    let mut system_with_ca = system.clone();
    system_with_ca.push(("SSL_CERT_FILE", ca.clone()));
    backfill_env(&db, &empty_home, &system_with_ca, &["status"]).expect(0);
    // In a URL too.
    let out = Out::from(
        db.cmd_at(
            &url("localhost", "sslmode=verify-full&sslrootcert=system"),
            &["status"],
        )
        .env("HOME", &ca_home)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .output()
        .unwrap(),
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("certificate"), "{out:?}");

    // allow reaches a server that accepts this role only over TLS (libpq: plaintext refused,
    // then TLS); and, as prefer does, it tries TLS first when the server offers it.
    db.exec("CREATE ROLE bf_tls_only LOGIN SUPERUSER");
    assert!(hba_first(
        &db,
        &["hostnossl all bf_tls_only 127.0.0.1/32 reject"]
    ));
    let as_tls_only = |mode: &str| {
        format!(
            "postgresql://bf_tls_only@127.0.0.1:{port}/{}?sslmode={mode}",
            db.name
        )
    };
    let t = std::time::Instant::now();
    while ssl_in_use(&as_tls_only("disable")).is_ok() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "the server never started refusing plaintext for bf_tls_only"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(ssl_in_use(&as_tls_only("allow")), Ok(true));
    assert_eq!(ssl_in_use(&as_tls_only("prefer")), Ok(true));
    assert_eq!(ssl_in_use(&url("127.0.0.1", "sslmode=allow")), Ok(true));
    let mut env = libpq("127.0.0.1", "allow");
    env[2] = ("PGUSER", "bf_tls_only".into());
    backfill_env(&db, &empty_home, &env, &["status", "j"]).expect(0);
    db.exec("DROP ROLE bf_tls_only");

    for setting in ["ssl", "ssl_cert_file", "ssl_key_file"] {
        db.exec(&format!("ALTER SYSTEM RESET {setting}"));
    }
    db.exec("SELECT pg_reload_conf()");
    let _ = std::fs::remove_dir_all(&dir);
}
