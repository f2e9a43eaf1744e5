//! Every kind of key the engine walks: gaps, empty and one-row tables, composite, text, uuid,
//! timestamps, numeric. Each job increments a counter, so a key visited twice or never shows.

use crate::support::*;
use std::time::Duration;

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

/// Key types whose values carry a type modifier, a collation or an odd text form. Each table's
/// job adds 1 to a counter; the run is killed (SIGKILL) while a lock the test holds stops it in
/// the middle of the table, then run again: every row must end at exactly 1.
#[test]
fn odd_key_types_survive_a_kill_and_touch_every_row_once() {
    let db = TestDb::new();
    db.exec(
        "CREATE EXTENSION IF NOT EXISTS citext;
         CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'ecstatic');
         CREATE DOMAIN code4 AS char(4) CHECK (VALUE <> 'zzzz');
         CREATE TABLE k_char3 (k char(3) PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_char3 SELECT chr(65 + g / 26 % 26) || chr(65 + g % 26) || CASE WHEN g % 5 = 0 THEN '' ELSE chr(97 + g % 7) END FROM generate_series(0, 199) g ON CONFLICT DO NOTHING;
         CREATE TABLE k_char12 (k char(12) PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_char12 SELECT 'acct-' || lpad(g::text, 6, '0') FROM generate_series(1, 150) g;
         CREATE TABLE k_varchar (k varchar(5) PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_varchar SELECT left(md5(g::text), 1 + g % 5) FROM generate_series(1, 150) g ON CONFLICT DO NOTHING;
         CREATE TABLE k_bit (k bit(6) PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_bit SELECT g::bit(6) FROM generate_series(0, 63) g;
         CREATE TABLE k_varbit (k varbit PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_varbit SELECT substring(g::bit(10) from 1 for 1 + g % 10) FROM generate_series(0, 300) g ON CONFLICT DO NOTHING;
         CREATE TABLE k_numeric (k numeric(8,3) PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_numeric SELECT g / 7.0 FROM generate_series(-100, 100) g;
         CREATE TABLE k_ts (k timestamp(0) PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_ts SELECT '2024-02-28 23:00'::timestamp + g * interval '37 minutes 0.4 seconds' FROM generate_series(1, 150) g;
         CREATE TABLE k_tstz (k timestamptz(3) PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_tstz SELECT '2024-10-27 00:30+02'::timestamptz + g * interval '7 minutes 0.0004 seconds' FROM generate_series(1, 150) g;
         CREATE TABLE k_time (k time PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_time SELECT '00:00'::time + g * interval '9 minutes 0.000001 seconds' FROM generate_series(0, 150) g;
         CREATE TABLE k_interval (k interval PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_interval SELECT make_interval(months => g % 13, days => g, secs => g / 3.0) FROM generate_series(-75, 75) g ON CONFLICT DO NOTHING;
         CREATE TABLE k_bytea (k bytea PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_bytea SELECT decode(lpad(to_hex(g * 7919), 2 * (1 + g % 3), '0'), 'hex') FROM generate_series(0, 150) g ON CONFLICT DO NOTHING;
         CREATE TABLE k_inet (k inet PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_inet SELECT ('10.' || g % 3 || '.' || g || '.1/' || (24 + g % 9))::inet FROM generate_series(0, 150) g ON CONFLICT DO NOTHING;
         INSERT INTO k_inet VALUES ('::1'), ('2001:db8::/32'), ('10.0.0.1/32');
         CREATE TABLE k_citext (k citext PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_citext SELECT CASE WHEN g % 2 = 0 THEN upper(md5(g::text)) ELSE md5(g::text) END FROM generate_series(1, 150) g;
         CREATE TABLE k_enum (k mood NOT NULL, j int NOT NULL, n int NOT NULL DEFAULT 0, PRIMARY KEY (k, j));
         INSERT INTO k_enum SELECT m, g FROM unnest(enum_range(NULL::mood)) m, generate_series(1, 40) g;
         CREATE TABLE k_domain (k code4 PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO k_domain SELECT left(md5(g::text), 1 + g % 4) FROM generate_series(1, 150) g ON CONFLICT DO NOTHING;",
    );
    let app = db.session();
    for (table, key, expr) in [
        ("k_char3", "[\"k\"]", "k"),
        ("k_char12", "[\"k\"]", "k"),
        ("k_varchar", "[\"k\"]", "k"),
        ("k_bit", "[\"k\"]", "k"),
        ("k_varbit", "[\"k\"]", "k"),
        ("k_numeric", "[\"k\"]", "k"),
        ("k_ts", "[\"k\"]", "k"),
        ("k_tstz", "[\"k\"]", "k"),
        ("k_time", "[\"k\"]", "k"),
        ("k_interval", "[\"k\"]", "k"),
        ("k_bytea", "[\"k\"]", "k"),
        ("k_inet", "[\"k\"]", "k"),
        ("k_citext", "[\"k\"]", "k"),
        ("k_enum", "[\"k\", \"j\"]", "(k, j)"),
        ("k_domain", "[\"k\"]", "k"),
    ] {
        let total = db.i64(&format!("SELECT count(*) FROM {table}"));
        assert!(total > 40, "{table}: {total} rows");
        db.write_job(
            table,
            &format!(
                "table = \"{table}\"\nkey = {key}\nchunk_rows = 7\nlock_timeout = \"60s\"\n\
                 sql = \"UPDATE {table} SET n = n + 1 WHERE {expr} BETWEEN :start AND :end\"\n\
                 throttle = {{ target_chunk_time = \"0s\" }}\n"
            ),
        );
        // Hold a row in the middle of the table, so the run stops there, part-way.
        app.exec("BEGIN");
        // (Not `OFFSET … FOR UPDATE`, which locks every row it skips as well.)
        let columns = expr.trim_matches(|c| c == '(' || c == ')');
        app.exec(&format!(
            "SELECT 1 FROM {table} WHERE {expr} = (SELECT {columns} FROM {table} ORDER BY {expr} OFFSET {} LIMIT 1) FOR UPDATE",
            total / 2
        ));
        let child = spawn_part_way(&db, &["run", table], table, Duration::from_secs(60));
        signal(&child, libc::SIGKILL);
        let killed = wait_out(child, Duration::from_secs(30));
        assert_eq!(killed.code, 128 + libc::SIGKILL, "{table}: {killed:?}");
        app.exec("ROLLBACK");
        let done = db.i64(&format!("SELECT count(*) FROM {table} WHERE n = 1"));
        assert!(
            done > 0 && done < total,
            "{table}: the kill hit a run part-way ({done} of {total} rows)"
        );
        db.run(&["run", table]).expect(0);
        assert_eq!(
            db.i64(&format!("SELECT count(*) FROM {table} WHERE n <> 1")),
            0,
            "{table}: every row exactly once"
        );
        assert_eq!(
            db.i64(&format!(
                "SELECT rows_done FROM backfill.progress WHERE job = '{table}'"
            )),
            total,
            "{table}: every key counted once"
        );
    }
}

/// The chunk guard: bounds that do not read back as themselves (a lossy cast) or a cursor that
/// does not move forward are refused, never walked again.
#[test]
fn a_chunk_that_would_not_move_forward_is_refused() {
    use backfill::keyset::{KeyColumn, Keyset, NextChunkError, Stall, Walk};
    use backfill::sql::TableName;
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE cur (code char(3) PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO cur (code) VALUES ('USD'), ('EUR'), ('GBP'), ('JPY'), ('CHF');",
    );
    let s = db.session();
    let keyset = |sql_type: &str| Keyset {
        table: TableName {
            schema: None,
            name: "cur".into(),
        },
        columns: vec![KeyColumn {
            name: "code".into(),
            sql_type: sql_type.into(),
        }],
        index: "cur_pkey".into(),
        walk: Walk::Index,
    };
    let bounds = |k: &Keyset, cursor: &str| {
        let (cursor, upper, limit) = (vec![cursor.to_string()], vec!["USD".to_string()], 2i64);
        s.block(k.next_chunk(
            &s.client,
            &k.next_chunk_sql(true),
            Some(&cursor),
            &upper,
            limit,
        ))
    };
    // In the column's exact type the walk moves on: CHF -> EUR, GBP.
    let exact = bounds(&keyset("character(3)"), "CHF").unwrap().unwrap();
    assert_eq!(
        (exact.first, exact.last),
        (vec!["EUR".into()], vec!["GBP".into()])
    );
    // Cast to `character` (one character) the bounds would be cut: refused.
    match bounds(&keyset("character"), "CHF") {
        Err(NextChunkError::Stalled(Stall::Lossy { first, .. })) => {
            assert_eq!(first, vec!["CHF".to_string()])
        }
        other => panic!("a lossy cast must be refused: {other:?}"),
    }
    // A row whose last key is not past the cursor (as a broken comparison would give).
    let k = keyset("character(3)");
    let row = s
        .block(s.client.query_one(
            "SELECT 2::bigint, ARRAY['EUR'], ARRAY['GBP'], true, false",
            &[],
        ))
        .unwrap();
    assert!(matches!(
        k.read_bounds(&row, Some(&vec!["JPY".into()])),
        Err(Stall::NoAdvance { .. })
    ));
    let same = s
        .block(s.client.query_one(
            "SELECT 1::bigint, ARRAY['GBP'], ARRAY['GBP'], true, true",
            &[],
        ))
        .unwrap();
    let err = k.read_bounds(&same, Some(&vec!["GBP".into()])).unwrap_err();
    assert!(err.to_string().contains("would not move forward"), "{err}");
}

#[test]
fn an_index_with_another_collation_or_operator_class_is_refused() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE coll (k text NOT NULL, n int NOT NULL DEFAULT 0);
         CREATE UNIQUE INDEX coll_k ON coll (k COLLATE \"POSIX\");
         INSERT INTO coll (k) SELECT md5(g::text) FROM generate_series(1, 20) g;
         CREATE TABLE pat (k text NOT NULL, n int NOT NULL DEFAULT 0);
         CREATE UNIQUE INDEX pat_k ON pat (k text_pattern_ops);
         INSERT INTO pat (k) SELECT md5(g::text) FROM generate_series(1, 20) g;",
    );
    for (table, what) in [("coll", "collation"), ("pat", "text_pattern_ops")] {
        db.write_job(
            table,
            &format!(
                "table = \"{table}\"\nkey = [\"k\"]\n\
                 sql = \"UPDATE {table} SET n = n + 1 WHERE k BETWEEN :start AND :end\"\n"
            ),
        );
        let out = db.run(&["run", table]);
        out.expect(2);
        assert!(out.stderr.contains(what), "{table}: {out:?}");
        assert_eq!(
            db.i64(&format!("SELECT count(*) FROM {table} WHERE n <> 0")),
            0
        );
    }
}

/// Text keys under linguistic collations (ICU German, and a nondeterministic case-insensitive
/// one), walked and split between two workers: every row exactly once, in the collation's order.
#[test]
fn text_keys_under_linguistic_collations_are_walked_and_split_exactly_once() {
    let db = TestDb::new();
    db.exec(
        "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TABLE de (w text COLLATE \"de-x-icu\" PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO de (w) SELECT (ARRAY['Äpfel', 'apfel', 'Zebra', 'zebra', 'éclair', 'Eclair', 'straße', 'strasse', 'ß'])[1 + g % 9] || ' ' || g
           FROM generate_series(1, 3000) g;
         CREATE TABLE nd (w text COLLATE ci NOT NULL, n int NOT NULL DEFAULT 0);
         CREATE UNIQUE INDEX nd_w ON nd (w);
         INSERT INTO nd (w) SELECT CASE WHEN g % 2 = 0 THEN upper(left(md5(g::text), 3)) || substr(md5(g::text), 4) ELSE md5(g::text) END
           FROM generate_series(1, 3000) g;
         ANALYZE de; ANALYZE nd;",
    );
    // The collations really differ from byte order here (else the test would prove nothing).
    assert!(db.i64("SELECT count(*) FROM de a JOIN de b ON a.w < b.w AND a.w COLLATE \"C\" > b.w COLLATE \"C\"") > 0);
    assert_eq!(db.i64("SELECT count(*) FROM nd WHERE w = upper(w)"), 3000);
    assert!(db.i64("SELECT count(*) FROM nd WHERE w COLLATE \"C\" = upper(w) COLLATE \"C\"") < 100);
    for table in ["de", "nd"] {
        db.write_job(
            table,
            &format!(
                "table = \"{table}\"\nkey = [\"w\"]\nchunk_rows = 50\n\
                 sql = \"UPDATE {table} SET n = n + 1 WHERE w BETWEEN :start AND :end\"\n\
                 throttle = {{ target_chunk_time = \"0s\", \
                 throttle_sql = \"SELECT count(*) < 2 FROM backfill.ranges WHERE job = '{table}'\" }}\n"
            ),
        );
        // The workers hold (throttle_sql) until the second has split the first's range, so the
        // split happens whatever the machine's load.
        db.run(&["run", table, "--workers", "2"]).expect(0);
        assert_eq!(
            db.i64(&format!("SELECT count(*) FROM {table} WHERE n <> 1")),
            0,
            "{table}: every row exactly once"
        );
        assert!(
            db.i64(&format!(
                "SELECT count(*) FROM backfill.ranges WHERE job = '{table}'"
            )) > 1,
            "{table}: the key range was split between the workers"
        );
    }
}

/// The bounds query itself, on a real composite key: the next `limit` keys after the cursor and
/// at most the upper bound, in index order; the last chunk short; nothing past the upper bound.
#[test]
fn the_bounds_query_returns_the_next_keys_after_the_cursor_up_to_the_upper_bound() {
    use backfill::keyset::{ChunkBounds, KeyColumn, Keyset, Walk};
    use backfill::sql::TableName;
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE c (a int NOT NULL, b bigint NOT NULL, PRIMARY KEY (a, b));
         INSERT INTO c SELECT a, b * 10 FROM generate_series(1, 3) a, generate_series(1, 5) b;",
    );
    let s = db.session();
    let keyset = Keyset {
        table: TableName {
            schema: None,
            name: "c".into(),
        },
        columns: vec![
            KeyColumn {
                name: "a".into(),
                sql_type: "integer".into(),
            },
            KeyColumn {
                name: "b".into(),
                sql_type: "bigint".into(),
            },
        ],
        index: "c_pkey".into(),
        walk: Walk::Index,
    };
    let key = |a: i32, b: i64| vec![a.to_string(), b.to_string()];
    // Through the one function runs and plans find chunks with.
    let next = |cursor: Option<Vec<String>>, upper: Vec<String>, limit: i64| {
        let sql = keyset.next_chunk_sql(cursor.is_some());
        s.block(keyset.next_chunk(&s.client, &sql, cursor.as_ref(), &upper, limit))
            .unwrap()
    };
    let chunk =
        |keys: i64, first: Vec<String>, last: Vec<String>| Some(ChunkBounds { keys, first, last });
    // From the start: the first four keys in (a, b) order.
    assert_eq!(next(None, key(3, 50), 4), chunk(4, key(1, 10), key(1, 40)));
    // After a cursor, across the first column's boundary.
    assert_eq!(
        next(Some(key(1, 40)), key(3, 50), 4),
        chunk(4, key(1, 50), key(2, 30))
    );
    // The upper bound cuts the chunk short, and is included.
    assert_eq!(
        next(Some(key(2, 30)), key(2, 50), 4),
        chunk(2, key(2, 40), key(2, 50))
    );
    // A cursor between keys (a key deleted since) and an upper bound that is not a key.
    assert_eq!(
        next(Some(key(2, 35)), key(3, 15), 10),
        chunk(3, key(2, 40), key(3, 10))
    );
    // Nothing after the upper bound.
    assert_eq!(next(Some(key(3, 50)), key(3, 50), 4), None);
    assert_eq!(next(Some(key(2, 50)), key(2, 50), 4), None);
}
