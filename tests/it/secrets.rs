//! Passwords against a server that checks them: a role of the test's own that must authenticate
//! with scram-sha-256 (a `pg_hba.conf` rule for that role only). A password in the URL, in
//! `PGPASSWORD` and in the password file each connect; a wrong one is refused with 28P01; and no
//! output — `run` (text and JSON logs), `status`, `plan`, `history`, the metrics endpoint, the
//! engine's own tables, the server's view of the sessions — ever contains the password.

use crate::observability::{free_port, http_get};
use crate::support::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const ROLE: &str = "bf_scram_role";
/// Distinctive enough that finding it anywhere means it leaked.
const PASSWORD: &str = "Pw-7c41e9-scram";
const WRONG: &str = "Wrong-5d82a0-pw";

/// Whether connecting as ROLE with the wrong password is refused as a wrong password: proof
/// that the server now checks this role's password (before the reload it trusts everyone).
fn wrong_password_refused(url: &str) -> bool {
    block_on(async {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok(_) => false,
            Err(e) => e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        }
    })
}

fn write_private(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[track_caller]
fn assert_no_secret(what: &str, text: &str) {
    for secret in [PASSWORD, WRONG] {
        assert!(!text.contains(secret), "{what} shows a password:\n{text}");
    }
}

#[track_caller]
fn assert_out_clean(what: &str, out: &Out) {
    assert_no_secret(what, &format!("{out:?}"));
}

#[test]
fn passwords_checked_by_the_server_never_appear_in_any_output() {
    let Some(cluster) = temp_cluster() else {
        eprintln!("skipped: needs the throwaway cluster (BACKFILL_TEST_DATABASE_URL is set)");
        return;
    };
    let db = TestDb::new();
    let port = cluster.port();
    db.exec(&format!(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}';
         ALTER DATABASE {} OWNER TO {ROLE};
         GRANT pg_read_all_stats TO {ROLE};",
        db.name
    ));
    counter_table(&db, 600);
    db.exec(&format!("ALTER TABLE t OWNER TO {ROLE}"));
    assert!(hba_first(
        &db,
        &[
            &format!("host all {ROLE} 127.0.0.1/32 scram-sha-256"),
            &format!("local all {ROLE} scram-sha-256"),
        ]
    ));
    let bare = format!("postgresql://{ROLE}@127.0.0.1:{port}/{}", db.name);
    let with_pw = format!(
        "postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{port}/{}",
        db.name
    );
    let with_wrong = format!("postgresql://{ROLE}:{WRONG}@127.0.0.1:{port}/{}", db.name);
    let t = std::time::Instant::now();
    while !wrong_password_refused(&with_wrong) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the server never started checking the password of {ROLE}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // No password file from the machine running the tests.
    let home =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("home-{}", db.name));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let bin = |url: &str, args: &[&str]| -> Command {
        let mut c = db.cmd_at(url, args);
        c.env("HOME", &home);
        c
    };
    // Bounded, so that a run held for a reason the test did not expect fails instead of hanging.
    let out_of = |mut c: Command| {
        let child = c
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_out(child, Duration::from_secs(120))
    };

    db.write_job("j", &counter_job(""));
    db.write_job(
        "k",
        &counter_job("").replace("chunk_rows = 100", "chunk_rows = 50"),
    );

    // A wrong password: refused by the server (28P01), exit 1, neither password shown.
    for args in [
        &["run", "j"][..],
        &["status"],
        &["plan", "j"],
        &["history", "j"],
    ] {
        let out = out_of(bin(&with_wrong, args));
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains("28P01"), "{args:?}: {out:?}");
        assert_out_clean(&format!("{args:?} with a wrong password"), &out);
    }
    // Without any password the server refuses too: the cases below connect because of theirs.
    let out = out_of(bin(&bare, &["status"]));
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        db.i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'backfill'"),
        0
    );

    // The password in the URL: a real run, text logs.
    let out = out_of(bin(&with_pw, &["run", "j"]));
    out.expect(0);
    assert!(
        out.stderr
            .contains(&format!("running on {ROLE}@127.0.0.1:{port}/")),
        "{out:?}"
    );
    assert_out_clean("run (text)", &out);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);

    // PGPASSWORD.
    let mut c = bin(&bare, &["status", "j", "--json"]);
    c.env("PGPASSWORD", PASSWORD);
    let out = out_of(c);
    out.expect(0);
    assert_out_clean("status with PGPASSWORD", &out);

    // The password file: PGPASSFILE, then ~/.pgpass; ignored when others may read it.
    let line = format!("127.0.0.1:{port}:{}:{ROLE}:{PASSWORD}\n", db.name);
    let passfile = home.join("passfile");
    write_private(&passfile, &line, 0o600);
    let mut c = bin(&bare, &["history", "j"]);
    c.env("PGPASSFILE", &passfile);
    let out = out_of(c);
    out.expect(0);
    assert_out_clean("history with PGPASSFILE", &out);
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut c = bin(&bare, &["history", "j"]);
    c.env("PGPASSFILE", &passfile);
    let out = out_of(c);
    assert_eq!(
        out.code, 1,
        "a password file others can read is ignored: {out:?}"
    );
    assert!(out.stderr.contains("0600"), "{out:?}");
    assert_out_clean("history with an open PGPASSFILE", &out);
    write_private(&home.join(".pgpass"), &line, 0o600);
    let out = out_of(bin(&bare, &["status", "j"]));
    out.expect(0);
    assert_out_clean("status with ~/.pgpass", &out);

    // A run held part-way by a row lock, with JSON logs and the metrics endpoint: everything an
    // operator looks at meanwhile is read while its sessions are open.
    let app = db.session();
    app.exec("BEGIN; SELECT n FROM t WHERE id = 400 FOR UPDATE");
    let mport = free_port();
    let mut c = bin(
        &with_pw,
        &[
            "--log-format",
            "json",
            "run",
            "k",
            "--metrics-addr",
            &mport.to_string(),
        ],
    );
    let mut child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    db.wait_for_child(
        &mut child,
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                         WHERE NOT l.granted AND a.usename = 'bf_scram_role'
                           AND a.datname = current_database())",
        Duration::from_secs(60),
    );
    let metrics = http_get(mport, "/metrics").expect("the metrics endpoint answers");
    assert!(
        metrics.contains("backfill_rows_done{backfill_job=\"k\"}"),
        "{metrics}"
    );
    assert_no_secret("the metrics endpoint", &metrics);
    // The server's view of the engine's sessions.
    let activity = db
        .text(&format!(
            "SELECT string_agg(concat_ws(' ', usename, application_name, client_addr, query), E'\\n')
               FROM pg_stat_activity WHERE usename = '{ROLE}'"
        ))
        .unwrap();
    assert!(activity.contains("backfill"), "{activity}");
    assert_no_secret("pg_stat_activity", &activity);
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["status", "k"],
        &["status", "k", "--json"],
        &["plan", "j"],
        &["plan", "k", "--json"],
        &["history", "k"],
        &["history", "k", "--json"],
        &["list"],
        &["gate", "k"],
    ] {
        let out = out_of(bin(&with_pw, args));
        // plan may flag the job mid-run (exit 2) and the gate is shut (exit 3): what matters is
        // that each connected and answered.
        let expected: &[i32] = match args[0] {
            "plan" => &[0, 2],
            "gate" => &[3],
            _ => &[0],
        };
        assert!(expected.contains(&out.code), "{args:?}: {out:?}");
        assert!(!out.stdout.is_empty(), "{args:?}: {out:?}");
        assert_out_clean(&format!("{args:?} during a run"), &out);
    }
    app.exec("COMMIT");
    let out = wait_out(child, Duration::from_secs(120));
    out.expect(0);
    let mut logged = 0;
    for l in out.stderr.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        logged += v["msg"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("running on {ROLE}@"))) as usize;
    }
    assert_eq!(logged, 1, "{out:?}");
    assert_out_clean("run --log-format json", &out);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 2"), 0);

    // Nothing the engine keeps in its own tables holds the password either.
    let tables: Vec<String> = db
        .text(
            "SELECT string_agg(format('%I.%I', schemaname, relname), ',')
               FROM pg_stat_user_tables WHERE schemaname = 'backfill'",
        )
        .unwrap()
        .split(',')
        .map(String::from)
        .collect();
    assert!(tables.len() >= 3, "{tables:?}");
    for table in tables {
        assert_eq!(
            db.i64(&format!(
                "SELECT count(*) FROM {table} x WHERE x::text LIKE '%{PASSWORD}%'
                                                 OR x::text LIKE '%{WRONG}%'"
            )),
            0,
            "{table}"
        );
    }

    let _ = std::fs::remove_dir_all(&home);
    db.exec(&format!(
        "ALTER DATABASE {} OWNER TO postgres; REASSIGN OWNED BY {ROLE} TO postgres;
         DROP OWNED BY {ROLE}; DROP ROLE {ROLE};",
        db.name
    ));
}
