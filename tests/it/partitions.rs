//! A job on a declaratively partitioned table: the key is the partitioned primary key (which
//! holds the partition key), walked and split across partitions like any composite key.

use crate::support::*;

#[test]
fn a_partitioned_table_runs_exactly_once_with_workers_spread_over_its_partitions() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE p (region int NOT NULL, id bigint NOT NULL, n int NOT NULL DEFAULT 0,
                         pid int, PRIMARY KEY (region, id)) PARTITION BY LIST (region);
         CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1);
         CREATE TABLE p2 PARTITION OF p FOR VALUES IN (2);
         CREATE TABLE p3 PARTITION OF p FOR VALUES IN (3);
         CREATE TABLE p4 PARTITION OF p FOR VALUES IN (4);
         INSERT INTO p (region, id) SELECT r, g FROM generate_series(1, 4) r, generate_series(1, 1500) g;
         ANALYZE p;",
    );
    // Workers wait (throttle_sql) until the job has four ranges, so each has one to itself.
    db.write_job(
        "p",
        "table = \"p\"\nkey = [\"region\", \"id\"]\nchunk_rows = 50\n\
         sql = \"UPDATE p SET n = n + 1, pid = pg_backend_pid() FROM (SELECT pg_sleep(0.002)) s WHERE (region, id) BETWEEN :start AND :end\"\n\
         verify = \"SELECT count(*) FROM p WHERE n <> 1\"\n\
         throttle = { target_chunk_time = \"0s\", check_interval = \"100ms\", \
         throttle_sql = \"SELECT count(*) < 4 FROM backfill.ranges WHERE job = 'p'\" }\n",
    );
    db.run(&["plan", "p"]).expect(0);
    let out = db.run(&["run", "p", "--workers", "4", "--json"]);
    out.expect(0);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["rows"], 6000, "{out:?}");
    assert_eq!(db.i64("SELECT count(*) FROM p WHERE n <> 1"), 0);
    assert!(
        db.i64("SELECT count(*) FROM backfill.ranges WHERE job = 'p'") >= 4,
        "{out:?}"
    );
    // Split by rows, the key ranges end in different partitions (the region is the key's first
    // column), and several workers (sessions) did the rows.
    assert!(
        db.i64("SELECT count(DISTINCT upper_bound[1]) FROM backfill.ranges WHERE job = 'p'") >= 3,
        "{out:?}"
    );
    assert!(db.i64("SELECT count(DISTINCT pid) FROM p") >= 3, "{out:?}");
    db.run(&["gate", "p"]).expect(0);
}
