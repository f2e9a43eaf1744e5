//! `backfill plan`: the review before a run, against tables built to trigger each finding, and the
//! sample job, which must raise none. Every plan must leave the data as it found it.

use crate::support::*;
use serde_json::Value;

fn plan_json(db: &TestDb, name: &str, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["plan", name, "--json"];
    args.extend_from_slice(extra);
    let out = db.run(&args);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    (out.code, v)
}

fn codes(plan: &Value) -> Vec<String> {
    plan["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap().to_string())
        .collect()
}

fn finding<'a>(plan: &'a Value, code: &str) -> &'a Value {
    plan["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == code)
        .unwrap_or_else(|| panic!("no {code} finding in {plan:#}"))
}

/// The message of the finding `code` (which must be there).
fn message(plan: &Value, code: &str) -> String {
    finding(plan, code)["message"].as_str().unwrap().to_string()
}

#[test]
fn the_sample_job_plans_cleanly_and_nothing_is_kept() {
    let db = TestDb::new();
    block_on(async {
        let client = db.connect().await;
        backfill::demo::create_orders(&client, 100_000)
            .await
            .unwrap();
    });
    db.write_job(
        "orders_status",
        include_str!("../../jobs/orders_status.toml"),
    );
    let (code, plan) = plan_json(&db, "orders_status", &[]);
    assert_eq!(code, 0, "{plan:#}");
    assert_eq!(codes(&plan), Vec::<String>::new(), "{plan:#}");
    assert_eq!(plan["index"], "orders_pkey");
    assert_eq!(plan["first_chunk"]["keys"], 5000);
    assert_eq!(plan["first_chunk"]["start"][0], "1");
    assert_eq!(plan["estimates"]["rows_to_do"], 100_000);
    assert_eq!(plan["estimates"]["chunks"], 20);
    assert!(plan["estimates"]["sample_chunk_ms"].as_f64().unwrap() > 0.0);
    assert!(plan["estimates"]["expected_seconds"].as_f64().unwrap() > 0.0);
    assert!(
        plan["first_chunk"]["sql"]
            .as_str()
            .unwrap()
            .contains("WHERE id BETWEEN '1'::bigint AND '10000'::bigint"),
        "{plan:#}"
    );
    // Rolled back: no row changed, no engine schema created.
    assert_eq!(
        db.i64("SELECT count(*) FROM orders WHERE status IS NOT NULL"),
        0
    );
    assert_eq!(
        db.i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'backfill'"),
        0
    );

    let out = db.run(&["plan", "orders_status"]);
    out.expect(0);
    for part in [
        "walked by index orders_pkey",
        "first chunk",
        "expected duration",
        "findings\n  none",
    ] {
        assert!(out.stdout.contains(part), "{part}: {out:?}");
    }
}

#[test]
fn a_statement_that_cannot_use_the_key_index_is_an_error() {
    let db = TestDb::new();
    counter_table(&db, 2000);
    db.write_job(
        "scan",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"UPDATE t SET n = 1 WHERE id + 0 BETWEEN :start AND :end AND n = 0\"\n",
    );
    let (code, plan) = plan_json(&db, "scan", &[]);
    assert_eq!(code, 2, "{plan:#}");
    let f = finding(&plan, "full_scan");
    assert_eq!(f["severity"], "error");
    assert!(f["message"].as_str().unwrap().contains("quadratic"), "{f}");
    let out = db.run(&["plan", "scan"]);
    assert_eq!(out.code, 2);
    assert!(out.stdout.contains("error [full_scan]"), "{out:?}");

    // A statement that fails on the first chunk is an error too, naming the SQLSTATE.
    db.write_job(
        "boom",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"UPDATE t SET n = 1 / (n - n) WHERE id BETWEEN :start AND :end\"\n",
    );
    let (code, plan) = plan_json(&db, "boom", &[]);
    assert_eq!(code, 2, "{plan:#}");
    assert!(
        message(&plan, "statement_fails").contains("22012"),
        "{plan:#}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);
}

#[test]
fn indexed_columns_triggers_foreign_keys_and_repeated_changes_are_reported() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE customers (id bigint PRIMARY KEY);
         INSERT INTO customers SELECT generate_series(1, 10);
         CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, label text,
                         customer_id bigint REFERENCES customers, note text);
         INSERT INTO t (id) SELECT generate_series(1, 3000);
         CREATE INDEX t_label_lower ON t (lower(label));
         CREATE TABLE audit (id bigint);
         CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO audit VALUES (NEW.id); RETURN NEW; END $$;
         CREATE TRIGGER t_audit AFTER UPDATE ON t FOR EACH ROW EXECUTE FUNCTION audit();
         ANALYZE t;",
    );
    db.write_job(
        "all",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"UPDATE t SET n = n + 1, label = 'x' || id, customer_id = 1 + id % 10, note = 'y' WHERE id BETWEEN :start AND :end\"\n\
         verify = \"SELECT count(*) FROM t, pg_sleep(1) WHERE n = 0\"\n",
    );
    let (code, plan) = plan_json(&db, "all", &["--verify-timeout", "200ms"]);
    assert_eq!(code, 0, "warnings only: {plan:#}");
    let indexed = message(&plan, "writes_indexed_column");
    assert!(indexed.contains("label (in t_label_lower)"), "{indexed}");
    assert!(!indexed.contains("note"), "note is not indexed: {indexed}");
    let again = message(&plan, "not_idempotent");
    assert!(again.contains("changed 100 of its rows again"), "{again}");
    assert!(
        message(&plan, "row_triggers").contains("t_audit"),
        "{plan:#}"
    );
    assert!(
        message(&plan, "foreign_keys").contains("t_customer_id_fkey → customers"),
        "{plan:#}"
    );
    assert!(plan["estimates"]["rows_to_do"].is_null());
    assert!(
        plan["estimates"]["rows_to_do_note"]
            .as_str()
            .unwrap()
            .contains("longer than 200ms"),
        "{plan:#}"
    );
    // Everything rolled back: the trigger's audit rows and the updates alike.
    assert_eq!(
        db.i64("SELECT count(*) FROM t WHERE n <> 0 OR label IS NOT NULL"),
        0
    );
    assert_eq!(db.i64("SELECT count(*) FROM audit"), 0);

    // A guarded, idempotent statement on unindexed columns raises none of these.
    db.write_job(
        "calm",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"UPDATE t SET note = 'y' WHERE id BETWEEN :start AND :end AND note IS NULL\"\n",
    );
    db.exec("DROP TRIGGER t_audit ON t");
    let (code, plan) = plan_json(&db, "calm", &[]);
    assert_eq!(code, 0);
    assert_eq!(codes(&plan), Vec::<String>::new(), "{plan:#}");
}

#[test]
fn a_long_open_transaction_and_a_large_unthrottled_table_are_reported() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 1000000);
         ANALYZE t;",
    );
    let idle = db.session();
    idle.exec("BEGIN; SELECT txid_current();");
    let pid = idle.i64("SELECT pg_backend_pid()::bigint");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    db.write_job(
        "big",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 1000\n\
         sql = \"UPDATE t SET n = 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n",
    );
    let (code, plan) = plan_json(&db, "big", &["--long-transaction", "1s"]);
    assert_eq!(code, 0, "{plan:#}");
    assert!(
        message(&plan, "long_transaction").contains(&format!("pid {pid}")),
        "{plan:#}"
    );
    finding(&plan, "unthrottled_large_table");
    idle.exec("COMMIT");

    // A health signal is enough of a brake.
    db.write_job(
        "big",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 1000\n\
         sql = \"UPDATE t SET n = 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n\
         [throttle]\nmax_replication_lag = \"10s\"\n",
    );
    let (_, plan) = plan_json(&db, "big", &[]);
    assert_eq!(codes(&plan), Vec::<String>::new(), "{plan:#}");
}

/// `id >= :start AND :end IS NOT NULL` reaches every row after the chunk: the plan counts the
/// rows of the job's table the statement wrote against the rows in the chunk, and says so
/// (not "ANALYZE": the full scan it may cause is the symptom).
#[test]
fn a_statement_that_ignores_end_is_an_error() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 3000);
         ANALYZE t;",
    );
    db.write_job(
        "runaway",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"UPDATE t SET n = 1 WHERE id >= :start AND :end IS NOT NULL AND n = 0\"\n",
    );
    let (code, plan) = plan_json(&db, "runaway", &[]);
    assert_eq!(code, 2, "{plan:#}");
    let f = finding(&plan, "writes_outside_chunk");
    assert_eq!(f["severity"], "error");
    let m = f["message"].as_str().unwrap();
    assert!(
        m.contains("(100 rows of t)") && m.contains("wrote 3000 rows"),
        "{m}"
    );
    assert!(
        !codes(&plan).contains(&"planner_prefers_full_scan".to_string()),
        "{plan:#}"
    );
    let out = db.run(&["plan", "runaway"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stdout.contains("error [writes_outside_chunk]"),
        "{out:?}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);

    // Writing more rows than the chunk holds to another table is not this.
    db.exec("CREATE TABLE audit (id bigint, copy int)");
    db.write_job(
        "fanout",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"INSERT INTO audit SELECT id, c FROM t, generate_series(1, 2) c WHERE id BETWEEN :start AND :end\"\n",
    );
    let (_, plan) = plan_json(&db, "fanout", &[]);
    assert!(
        !codes(&plan).contains(&"writes_outside_chunk".to_string()),
        "{plan:#}"
    );
    // Nor is writing more rows than keys inside the chunk's bounds (filling gaps of the key).
    db.exec("CREATE TABLE g (id bigint PRIMARY KEY); INSERT INTO g SELECT 10 * x FROM generate_series(1, 1000) x;");
    db.write_job(
        "gaps",
        "table = \"g\"\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = \"INSERT INTO g SELECT x FROM generate_series(:start, :end) x ON CONFLICT DO NOTHING\"\n",
    );
    let (_, plan) = plan_json(&db, "gaps", &[]);
    assert!(
        !codes(&plan).contains(&"writes_outside_chunk".to_string()),
        "{plan:#}"
    );
}

/// A planner that prefers to read the whole table although the key's index would serve (here:
/// random page reads priced out for this database) is a warning naming ANALYZE, not an error;
/// on a table of under ten chunks it is not reported at all.
#[test]
fn a_planner_that_prefers_a_full_scan_is_a_warning() {
    let db = TestDb::new();
    counter_table(&db, 20_000);
    db.exec(&format!(
        "ANALYZE t; ALTER DATABASE {} SET random_page_cost = 100000",
        db.name
    ));
    db.write_job(
        "fs",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 1000\n\
         sql = \"UPDATE t SET n = n + 1 WHERE id BETWEEN :start AND :end\"\n",
    );
    let (code, plan) = plan_json(&db, "fs", &[]);
    assert_eq!(code, 0, "{plan:#}");
    let f = finding(&plan, "planner_prefers_full_scan");
    assert_eq!(f["severity"], "warning", "{plan:#}");
    assert!(f["fix"].as_str().unwrap().contains("ANALYZE"), "{plan:#}");
    assert!(!codes(&plan).contains(&"full_scan".to_string()), "{plan:#}");
    // Under ten chunks: nothing to report.
    db.write_job(
        "fs_small",
        "table = \"t\"\nkey = [\"id\"]\nchunk_rows = 5000\n\
         sql = \"UPDATE t SET n = n + 1 WHERE id BETWEEN :start AND :end\"\n",
    );
    let (_, plan) = plan_json(&db, "fs_small", &[]);
    assert!(
        !codes(&plan).contains(&"planner_prefers_full_scan".to_string()),
        "{plan:#}"
    );
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 0"), 0);
}

/// A contract migration already applied to an unfinished job is reported by `plan`.
#[test]
fn a_contract_already_applied_is_reported() {
    let db = TestDb::new();
    counter_table(&db, 500);
    db.exec(
        "CREATE TABLE _sqlx_migrations (version bigint PRIMARY KEY, description text NOT NULL,
             installed_on timestamptz NOT NULL DEFAULT now(), success boolean NOT NULL,
             checksum bytea NOT NULL, execution_time bigint NOT NULL);
         INSERT INTO _sqlx_migrations VALUES (1, 'expand', now(), true, '\\x00', 1), (2, 'contract', now(), true, '\\x00', 1);",
    );
    db.write_job(
        "ca",
        "table = \"t\"\nkey = [\"id\"]\n\
         sql = \"UPDATE t SET n = n + 1 WHERE id BETWEEN :start AND :end AND n = 0\"\n\
         [migration]\ntool = \"sqlx\"\nexpand = \"1\"\ncontract = \"2\"\n",
    );
    let (_, plan) = plan_json(&db, "ca", &[]);
    let m = message(&plan, "contract_applied");
    assert!(m.contains("refused"), "{m}");
    // Not before the contract step.
    db.exec("DELETE FROM _sqlx_migrations WHERE version = 2");
    let (_, plan) = plan_json(&db, "ca", &[]);
    assert!(
        !codes(&plan).contains(&"contract_applied".to_string()),
        "{plan:#}"
    );
}
