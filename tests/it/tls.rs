//! TLS against a real server with a certificate made for the test: libpq's sslmode semantics.

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
    db.exec("ALTER SYSTEM SET ssl_cert_file = 'server.crt'");
    db.exec("ALTER SYSTEM SET ssl_key_file = 'server.key'");
    db.exec("ALTER SYSTEM SET ssl = on");
    db.exec("SELECT pg_reload_conf()");
    db.wait_for(
        "SELECT current_setting('ssl') = 'on'",
        std::time::Duration::from_secs(10),
    );

    let port = cluster.port();
    let ca = dir.join("ca.crt").display().to_string();
    let other = dir.join("other-ca.crt").display().to_string();
    let url = |host: &str, params: &str| {
        format!("postgresql://postgres@{host}:{port}/{}?{params}", db.name)
    };

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
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_backfill"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") || k == "DATABASE_URL" {
            c.env_remove(k);
        }
    }
    c.env("PGHOST", "localhost")
        .env("PGPORT", port.to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", &db.name)
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &ca)
        .args(["--jobs"])
        .arg(&db.jobs)
        .args(["run", "j"]);
    Out::from(c.output().unwrap()).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);

    for setting in ["ssl", "ssl_cert_file", "ssl_key_file"] {
        db.exec(&format!("ALTER SYSTEM RESET {setting}"));
    }
    db.exec("SELECT pg_reload_conf()");
    let _ = std::fs::remove_dir_all(&dir);
}
