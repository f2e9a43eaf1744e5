//! Every kind of key the engine walks: gaps, empty and one-row tables, composite, text, uuid,
//! timestamps, numeric. Each job increments a counter, so a key visited twice or never shows.

use crate::support::*;

fn run_counter(db: &TestDb, table: &str, key: &str, range: &str, chunk: u32) {
    let name = format!("j_{table}");
    db.write_job(
        &name,
        &format!(
            "table = \"{table}\"\nkey = {key}\nchunk_rows = {chunk}\n\
             sql = \"UPDATE {table} SET n = n + 1 WHERE {range} BETWEEN :start AND :end\"\n\
             verify = \"SELECT count(*) FROM {table} WHERE n <> 1\"\n"
        ),
    );
    db.run(&["run", &name]).expect(0);
    assert_eq!(
        db.i64(&format!("SELECT count(*) FROM {table} WHERE n <> 1")),
        0,
        "{table}: every row exactly once"
    );
    db.run(&["gate", &name]).expect(0);
}

#[test]
fn gaps_give_full_chunks_not_id_arithmetic() {
    let db = TestDb::new();
    counter_table(&db, 2500);
    db.write_job("g", &counter_job(""));
    db.run(&["run", "g"]).expect(0);
    assert_eq!(db.i64("SELECT count(*) FROM t WHERE n <> 1"), 0);
    // 2500 keys in chunks of 100, whatever the holes between them.
    assert_eq!(
        db.i64("SELECT chunks_done FROM backfill.progress WHERE job = 'g'"),
        25
    );
    assert_eq!(
        db.i64("SELECT rows_done FROM backfill.progress WHERE job = 'g'"),
        2500
    );
}

#[test]
fn empty_and_one_row_tables() {
    let db = TestDb::new();
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0)");
    db.write_job("e", &counter_job(""));
    let out = db.run(&["run", "e"]);
    out.expect(0);
    assert!(out.stderr.contains("empty"), "{out:?}");
    db.run(&["gate", "e"]).expect(0);
    db.exec("CREATE TABLE one (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0); INSERT INTO one VALUES (42, 0)");
    run_counter(&db, "one", "[\"id\"]", "id", 100);
}

#[test]
fn composite_key() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE comp (tenant_id int NOT NULL, id bigint NOT NULL, n int NOT NULL DEFAULT 0, PRIMARY KEY (tenant_id, id));
         INSERT INTO comp (tenant_id, id) SELECT t, i * 3 FROM generate_series(1, 7) t, generate_series(1, 150) i;
         INSERT INTO comp (tenant_id, id) SELECT 1000, i FROM generate_series(1, 500) i;",
    );
    run_counter(
        &db,
        "comp",
        "[\"tenant_id\", \"id\"]",
        "(tenant_id, id)",
        64,
    );
}

#[test]
fn text_key_in_collation_order() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE words (w text COLLATE \"C\" PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO words (w) SELECT md5(g::text) || CASE WHEN g % 3 = 0 THEN ' x' ELSE 'Ä' END FROM generate_series(1, 1000) g;
         INSERT INTO words (w) VALUES (''), (' '), ('z'), ('Z'), ('a''quote'), ('back\\slash');",
    );
    run_counter(&db, "words", "[\"w\"]", "w", 37);
    db.exec(
        "CREATE TABLE vc (code varchar(40) NOT NULL UNIQUE, n int NOT NULL DEFAULT 0);
             INSERT INTO vc (code) SELECT 'code-' || g FROM generate_series(1, 300) g;",
    );
    run_counter(&db, "vc", "[\"code\"]", "code", 50);
}

#[test]
fn uuid_timestamp_numeric_date_smallint_keys() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE u (id uuid PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO u (id) SELECT md5(g::text)::uuid FROM generate_series(1, 700) g;
         CREATE TABLE ts (at timestamptz PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO ts (at) SELECT '2024-03-31 00:00:00.000001+02'::timestamptz + g * interval '17 minutes 0.123457 seconds' FROM generate_series(1, 500) g;
         CREATE TABLE tsl (at timestamp PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO tsl (at) SELECT '2024-01-01'::timestamp + g * interval '1.5 seconds' FROM generate_series(1, 300) g;
         CREATE TABLE num (v numeric PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO num (v) SELECT g / 7.0 + 1e20 FROM generate_series(-300, 300) g;
         CREATE TABLE d (day date NOT NULL, shop smallint NOT NULL, n int NOT NULL DEFAULT 0, PRIMARY KEY (day, shop));
         INSERT INTO d SELECT '2020-01-01'::date + g, s, 0 FROM generate_series(1, 60) g, generate_series(1, 5) s;",
    );
    // Session time zone must not matter: the engine pins UTC for its own sessions.
    db.exec(&format!(
        "ALTER DATABASE {} SET timezone = 'America/St_Johns'",
        db.name
    ));
    run_counter(&db, "u", "[\"id\"]", "id", 64);
    run_counter(&db, "ts", "[\"at\"]", "at", 33);
    run_counter(&db, "tsl", "[\"at\"]", "at", 33);
    run_counter(&db, "num", "[\"v\"]", "v", 50);
    run_counter(&db, "d", "[\"day\", \"shop\"]", "(day, shop)", 41);
}

#[test]
fn identity_key_and_schema_qualified_table() {
    let db = TestDb::new();
    db.exec(
        "CREATE SCHEMA app;
         CREATE TABLE app.\"Orders\" (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO app.\"Orders\" (n) SELECT 0 FROM generate_series(1, 450);",
    );
    db.write_job(
        "ident",
        "table = 'app.\"Orders\"'\nkey = [\"id\"]\nchunk_rows = 100\n\
         sql = 'UPDATE app.\"Orders\" SET n = n + 1 WHERE id BETWEEN :start AND :end'\n",
    );
    db.run(&["run", "ident"]).expect(0);
    assert_eq!(
        db.i64("SELECT count(*) FROM app.\"Orders\" WHERE n <> 1"),
        0
    );
}
