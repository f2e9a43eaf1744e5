//! End to end with real schema migrators: Alembic (with a branch and a merge) and Django run the
//! expand step, `backfill run` follows, and the contract step — which calls the SQL gate — fails
//! before the backfill is complete and succeeds after. The migrators come from the tests' own
//! virtual environment (`tools::python_command`, made on first use).

use crate::support::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `python -m <module> args…` connected to the test's database through libpq's variables.
fn python(db: &TestDb, dir: &Path, module: &str, args: &[&str]) -> Out {
    let config: tokio_postgres::Config = db.url.parse().expect("the test URL parses");
    let mut c = crate::tools::python_command();
    c.current_dir(dir).arg("-m").arg(module).args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") {
            c.env_remove(k);
        }
    }
    match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => c.env("PGHOST", h),
        Some(tokio_postgres::config::Host::Unix(p)) => c.env("PGHOST", p),
        None => &mut c,
    };
    if let Some(p) = config.get_ports().first() {
        c.env("PGPORT", p.to_string());
    }
    if let Some(u) = config.get_user() {
        c.env("PGUSER", u);
    }
    if let Some(p) = config.get_password() {
        c.env("PGPASSWORD", String::from_utf8_lossy(p).into_owned());
    }
    c.env("PGDATABASE", config.get_dbname().unwrap_or(&db.name));
    Out::from(c.output().expect("the venv's python starts"))
}

fn alembic(db: &TestDb, args: &[&str]) -> Out {
    let dir = fixture("alembic");
    let ini = dir.join("alembic.ini");
    let mut all = vec!["-c", ini.to_str().unwrap()];
    all.extend_from_slice(args);
    python(db, &dir, "alembic", &all)
}

const ORDERS_JOB: &str = r#"
table = "orders"
key = "id"
chunk_rows = 200
sql = """
UPDATE orders SET status = CASE legacy_status WHEN 'P' THEN 'pending' WHEN 'S' THEN 'shipped'
                                              WHEN 'D' THEN 'delivered' ELSE 'cancelled' END
 WHERE id BETWEEN :start AND :end AND status IS NULL
"""
verify = "SELECT count(*) FROM orders WHERE status IS NULL"
down_sql = "UPDATE orders SET status = NULL WHERE id BETWEEN :start AND :end AND status IS NOT NULL"
throttle = { target_chunk_time = "0s" }
"#;

#[test]
fn alembic_expand_backfill_contract_with_a_branch_and_a_merge() {
    let db = TestDb::new();
    let versions = fixture("alembic/migrations/versions");
    db.write_job(
        "orders_status",
        &format!(
            "{ORDERS_JOB}\n[migration]\ntool = \"alembic\"\nexpand = \"2e1d0c9b8a7f\"\ncontract = \"5d5d\"\nalembic_dir = \"{}\"\n",
            versions.display()
        ),
    );
    db.run(&["check", "orders_status"]).expect(0);
    db.run(&["init"]).expect(0);

    // Only the other branch is applied: its head does not descend from the expand revision.
    alembic(&db, &["upgrade", "a7a7a7a7a7a7"]).expect(0);
    let out = db.run(&["run", "orders_status"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr
            .contains("expand migration 2e1d0c9b8a7f (alembic) is not applied")
            && out.stderr.contains("a7a7a7a7a7a7"),
        "{out:?}"
    );

    let out = db.run(&["plan", "orders_status"]);
    assert!(
        out.stdout
            .contains("expand alembic 2e1d0c9b8a7f: not applied")
            && out.stdout.contains("a run would exit 3 now"),
        "{out:?}"
    );

    // A deploy starts the runner first; it waits for the expand step, then runs by itself.
    let child = db.spawn(&[
        "run",
        "orders_status",
        "--wait-for-expand",
        "--rows-per-second",
        "600",
    ]);
    db.wait_for(
        "SELECT coalesce(phase = 'waiting for expand', false) FROM backfill.checkpoints WHERE job = 'orders_status'",
        Duration::from_secs(30),
    );
    // Two heads now: the audit branch and the expand branch.
    alembic(&db, &["upgrade", "2e1d0c9b8a7f"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM alembic_version"), 2);
    // The application holds the last row, so the run is still going when the contract step
    // comes too early (the runner notices the expand step within 2 s: it cannot be done yet).
    let last = db.i64("SELECT count(*) FROM orders") - 1;
    let held = hold_row(&db, "orders", "id", last);
    db.wait_for(
        "SELECT rows_done > 0 FROM backfill.progress WHERE job = 'orders_status'",
        Duration::from_secs(30),
    );

    // The contract step, too early: the merge applies, the contract revision's gate raises and
    // rolls it back.
    let out = alembic(&db, &["upgrade", "heads"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("backfill job orders_status is not complete"),
        "{out:?}"
    );
    assert_eq!(
        db.text("SELECT string_agg(version_num, ',') FROM alembic_version")
            .as_deref(),
        Some("4c4c4c4c4c4c")
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM information_schema.columns WHERE table_name = 'orders' AND column_name = 'legacy_status'"),
        1
    );

    assert!(
        db.i64("SELECT count(*) FROM orders WHERE status IS NULL") > 0,
        "the run was still going when the contract step came"
    );
    held.exec("ROLLBACK");
    let out = wait_out(child, Duration::from_secs(120));
    assert_eq!(out.code, 0, "{out:?}");
    db.run(&["gate", "orders_status"]).expect(0);

    // Now the contract step passes its gate.
    alembic(&db, &["upgrade", "heads"]).expect(0);
    assert_eq!(
        db.text("SELECT version_num FROM alembic_version")
            .as_deref(),
        Some("5d5d5d5d5d5d")
    );
    let status = db.run(&["status", "orders_status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["phase"], "contract applied", "{status:?}");
    db.run(&["run", "orders_status"]).expect(0);
    // Past the contract step there is no way back by the backfill alone.
    let out = db.run(&["revert", "orders_status"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr
            .contains("downgrade the contract migration first"),
        "{out:?}"
    );

    // A run after the contract step of an unfinished job is refused.
    db.run(&["reset", "orders_status", "--yes"]).expect(0);
    let out = db.run(&["run", "orders_status"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr.contains("contract migration 5d5d") && out.stderr.contains("already applied"),
        "{out:?}"
    );
}

#[test]
fn django_expand_backfill_contract() {
    let db = TestDb::new();
    let project = fixture("django");
    let manage = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push("--settings=shopsite.settings");
        python(&db, &project, "django", &all)
    };
    db.write_job(
        "shop_status",
        &format!(
            "{}\n[migration]\ntool = \"django\"\nexpand = \"shop.0002_add_status\"\ncontract = \"shop.0003_drop_legacy\"\n",
            ORDERS_JOB.replace("orders", "shop_orders")
        ),
    );
    db.run(&["check", "shop_status"]).expect(0);
    db.run(&["init"]).expect(0);
    manage(&["migrate", "shop", "0001"]).expect(0);
    let out = db.run(&["run", "shop_status"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("shop.0002_add_status"), "{out:?}");
    manage(&["migrate", "shop", "0002"]).expect(0);

    // Too early: the contract migration's gate raises and Django rolls it back.
    let out = manage(&["migrate", "shop", "0003"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("has never run"), "{out:?}");
    assert_eq!(
        db.i64("SELECT count(*) FROM django_migrations WHERE app = 'shop' AND name = '0003_drop_legacy'"),
        0
    );
    db.run(&["run", "shop_status"]).expect(0);
    manage(&["migrate", "shop", "0003"]).expect(0);
    let status = db.run(&["status", "shop_status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["phase"], "contract applied", "{status:?}");
}
