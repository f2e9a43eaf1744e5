//! Reading each schema migrator's history table, created with the tool's own DDL and filled with
//! rows as the tool writes them, on a real PostgreSQL.

use crate::support::{block_on, TestDb};
use backfill::migrator::history::{Applied, History, Tool};
use backfill::Error;
use std::path::PathBuf;

fn history(tool: Tool) -> History {
    History {
        tool,
        table: None,
        alembic_dir: None,
        alembic_recursive: false,
    }
}

fn check(db: &TestDb, h: &History, revision: &str) -> Result<Applied, Error> {
    block_on(async {
        let client = db.connect().await;
        h.is_applied(&client, revision).await
    })
}

#[track_caller]
fn applied(db: &TestDb, h: &History, revision: &str) -> Applied {
    let a = check(db, h, revision).unwrap_or_else(|e| panic!("{revision}: {e}"));
    assert!(a.applied, "{revision} should be applied: {}", a.detail);
    a
}

#[track_caller]
fn not_applied(db: &TestDb, h: &History, revision: &str) -> Applied {
    let a = check(db, h, revision).unwrap_or_else(|e| panic!("{revision}: {e}"));
    assert!(!a.applied, "{revision} should not be applied: {}", a.detail);
    a
}

#[track_caller]
fn usage_error(db: &TestDb, h: &History, revision: &str) -> String {
    match check(db, h, revision) {
        Err(e) if e.kind() == backfill::error::ErrorKind::Usage => e.to_string(),
        other => panic!("{revision}: expected a usage error, got {other:?}"),
    }
}

#[track_caller]
fn contains(detail: &str, parts: &[&str]) {
    for p in parts {
        assert!(detail.contains(p), "{detail:?} should mention {p:?}");
    }
}

#[test]
fn sqlx_success_failure_and_missing_rows() {
    let db = TestDb::new();
    let h = history(Tool::Sqlx);
    let a = not_applied(&db, &h, "1");
    contains(
        &a.detail,
        &["_sqlx_migrations does not exist", "sqlx has not run"],
    );

    db.exec(
        "CREATE TABLE _sqlx_migrations (
             version BIGINT PRIMARY KEY,
             description TEXT NOT NULL,
             installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
             success BOOLEAN NOT NULL,
             checksum BYTEA NOT NULL,
             execution_time BIGINT NOT NULL);
         INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES
             (20240101120000, 'init', true, '\\x00', 1000),
             (20240102120000, 'add status', true, '\\x01', 2000),
             (20240103120000, 'backfill helper', false, '\\x02', 3000);",
    );
    applied(&db, &h, "20240101120000");
    let a = applied(&db, &h, "20240102120000_add_status.sql");
    contains(&a.detail, &["20240102120000", "add status", "successfully"]);
    let a = not_applied(&db, &h, "20240103120000");
    contains(&a.detail, &["20240103120000", "failed"]);
    let a = not_applied(&db, &h, "20240104120000");
    contains(
        &a.detail,
        &[
            "no row for version 20240104120000",
            "latest successful: 20240102120000",
        ],
    );
    contains(&usage_error(&db, &h, "add_status"), &["sqlx", "integer"]);
}

#[test]
fn sqlx_table_of_another_shape_is_a_database_error() {
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE _sqlx_migrations (version text, description text, installed_on text, success boolean);
         INSERT INTO _sqlx_migrations VALUES ('1', 'init', 'now', true);",
    );
    match check(&db, &history(Tool::Sqlx), "1") {
        Err(e @ Error::Database(_)) => contains(
            &e.to_string(),
            &["reading sqlx's history in _sqlx_migrations", "SQLSTATE"],
        ),
        other => panic!("expected a runtime error, got {other:?}"),
    }
}

#[test]
fn refinery_versions_and_file_names() {
    let db = TestDb::new();
    let h = history(Tool::Refinery);
    contains(
        &not_applied(&db, &h, "V1").detail,
        &["refinery_schema_history does not exist"],
    );
    db.exec(
        "CREATE TABLE refinery_schema_history (
             version INT4 PRIMARY KEY,
             name VARCHAR(255),
             applied_on VARCHAR(255),
             checksum VARCHAR(255));
         INSERT INTO refinery_schema_history VALUES
             (1, 'initial', '2026-01-02T03:04:05Z', '1234'),
             (2, 'add_status', '2026-01-03T03:04:05Z', '5678');",
    );
    applied(&db, &h, "1");
    let a = applied(&db, &h, "V2__add_status");
    contains(&a.detail, &["version 2", "add_status", "2026-01-03"]);
    applied(&db, &h, "V2");
    let a = not_applied(&db, &h, "V3__drop_legacy");
    contains(&a.detail, &["no row for version 3", "highest applied: 2"]);
    contains(&usage_error(&db, &h, "X3"), &["refinery", "V3__add_status"]);
}

const FLYWAY_DDL: &str = "(
    installed_rank INT NOT NULL PRIMARY KEY,
    version VARCHAR(50),
    description VARCHAR(200) NOT NULL,
    type VARCHAR(20) NOT NULL,
    script VARCHAR(1000) NOT NULL,
    checksum INT,
    installed_by VARCHAR(100) NOT NULL,
    installed_on TIMESTAMP NOT NULL DEFAULT now(),
    execution_time INT NOT NULL,
    success BOOLEAN NOT NULL)";

#[test]
fn flyway_latest_row_decides_in_a_schema_qualified_table() {
    let db = TestDb::new();
    db.exec(&format!(
        "CREATE SCHEMA flyway;
         CREATE TABLE flyway.flyway_schema_history {FLYWAY_DDL};
         INSERT INTO flyway.flyway_schema_history
             (installed_rank, version, description, type, script, checksum, installed_by, execution_time, success) VALUES
             (1, '1', 'init', 'SQL', 'V1__init.sql', 1, 'app', 10, true),
             (2, '1.1', 'add status', 'SQL', 'V1_1__add_status.sql', 2, 'app', 10, true),
             (3, '2', 'broken', 'SQL', 'V2__broken.sql', 3, 'app', 10, false),
             (4, '3', 'undone', 'SQL', 'V3__undone.sql', 4, 'app', 10, true),
             (5, '3', 'undone', 'UNDO_SQL', 'U3__undone.sql', 5, 'app', 10, true),
             (6, '4', 'retried', 'SQL', 'V4__retried.sql', 6, 'app', 10, false),
             (7, '4', 'retried', 'SQL', 'V4__retried.sql', 6, 'app', 10, true),
             (8, NULL, 'views', 'SQL', 'R__views.sql', 7, 'app', 10, true),
             (9, '5', 'removed', 'SQL', 'V5__removed.sql', 8, 'app', 10, true),
             (10, '5', 'removed', 'DELETE', 'V5__removed.sql', 8, 'app', 0, true);"
    ));
    // The default name resolves through search_path, which does not include schema flyway.
    let a = not_applied(&db, &history(Tool::Flyway), "1");
    contains(&a.detail, &["flyway_schema_history does not exist"]);

    let h = History {
        table: Some("flyway.flyway_schema_history".into()),
        ..history(Tool::Flyway)
    };
    applied(&db, &h, "1");
    applied(&db, &h, "V1");
    let a = applied(&db, &h, "V1_1__add_status");
    contains(&a.detail, &["version 1.1", "V1_1__add_status.sql"]);
    applied(&db, &h, "1.1.0");
    let a = not_applied(&db, &h, "2");
    contains(&a.detail, &["no successful row for version 2", "failed at"]);
    let a = not_applied(&db, &h, "3");
    contains(&a.detail, &["undone", "U3__undone.sql"]);
    applied(&db, &h, "4");
    contains(&not_applied(&db, &h, "5").detail, &["deleted"]);
    let a = not_applied(&db, &h, "6");
    contains(&a.detail, &["no row for version 6", "highest applied: 4"]);
    contains(&usage_error(&db, &h, "R__views"), &["repeatable"]);
}

#[test]
fn flyway_versions_below_the_baseline_are_applied() {
    let db = TestDb::new();
    db.exec(&format!(
        "CREATE TABLE baselined {FLYWAY_DDL};
         INSERT INTO baselined
             (installed_rank, version, description, type, script, checksum, installed_by, execution_time, success) VALUES
             (1, '5', '<< Flyway Baseline >>', 'BASELINE', '<< Flyway Baseline >>', NULL, 'app', 0, true),
             (2, '6', 'next', 'SQL', 'V6__next.sql', 1, 'app', 10, true);"
    ));
    let h = History {
        table: Some("public.baselined".into()),
        ..history(Tool::Flyway)
    };
    contains(
        &applied(&db, &h, "3").detail,
        &["below flyway's baseline 5"],
    );
    contains(&applied(&db, &h, "5").detail, &["baseline"]);
    applied(&db, &h, "6");
    not_applied(&db, &h, "7");
}

#[test]
fn golang_migrate_current_version_and_dirty_flag() {
    let db = TestDb::new();
    let h = history(Tool::GolangMigrate);
    contains(
        &not_applied(&db, &h, "1").detail,
        &["schema_migrations does not exist"],
    );
    db.exec("CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL)");
    contains(&not_applied(&db, &h, "1").detail, &["empty"]);

    db.exec("INSERT INTO schema_migrations VALUES (5, false)");
    applied(&db, &h, "000004_add_status.up.sql");
    contains(&applied(&db, &h, "5").detail, &["version 5", "clean"]);
    contains(
        &not_applied(&db, &h, "6").detail,
        &["at version 5", "before 6"],
    );

    // A migration that failed part-way leaves its version dirty.
    db.exec("TRUNCATE schema_migrations; INSERT INTO schema_migrations VALUES (5, true)");
    let a = not_applied(&db, &h, "5");
    contains(&a.detail, &["dirty", "migrate force"]);
    applied(&db, &h, "4");

    db.exec("INSERT INTO schema_migrations VALUES (6, false)");
    contains(&usage_error(&db, &h, "5"), &["2 rows", "exactly one"]);
}

#[test]
fn rails_lists_every_applied_version() {
    let db = TestDb::new();
    let h = history(Tool::Rails);
    db.exec(
        "CREATE TABLE schema_migrations (version character varying NOT NULL PRIMARY KEY);
         CREATE TABLE ar_internal_metadata (key character varying NOT NULL PRIMARY KEY, value character varying,
             created_at timestamp(6) NOT NULL, updated_at timestamp(6) NOT NULL);
         INSERT INTO ar_internal_metadata VALUES ('environment', 'production', now(), now());
         INSERT INTO schema_migrations VALUES ('20240101120000'), ('20240103120000');",
    );
    applied(&db, &h, "20240101120000");
    let a = applied(&db, &h, "20240103120000_add_status.rb");
    contains(&a.detail, &["20240103120000"]);
    // Versions are listed, not ordered: a gap is a migration not run yet.
    let a = not_applied(&db, &h, "20240102120000");
    contains(
        &a.detail,
        &[
            "does not list version 20240102120000",
            "latest: 20240103120000",
        ],
    );

    // golang-migrate uses the same table name with another shape.
    let m = usage_error(&db, &history(Tool::GolangMigrate), "20240101120000");
    contains(
        &m,
        &[
            "no column dirty",
            "not golang-migrate's history table",
            "rails",
        ],
    );
}

#[test]
fn diesel_versions_from_directory_names() {
    let db = TestDb::new();
    let h = history(Tool::Diesel);
    contains(
        &not_applied(&db, &h, "20240101120000").detail,
        &["__diesel_schema_migrations does not exist"],
    );
    db.exec(
        "CREATE TABLE __diesel_schema_migrations (
             version VARCHAR(50) PRIMARY KEY NOT NULL,
             run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP);
         INSERT INTO __diesel_schema_migrations (version) VALUES ('00000000000000'), ('20240101120000');",
    );
    applied(&db, &h, "00000000000000_diesel_initial_setup");
    let a = applied(&db, &h, "2024-01-01-120000_add_status");
    contains(&a.detail, &["20240101120000", "run on"]);
    let a = not_applied(&db, &h, "2024-02-01-000000_drop_legacy");
    contains(
        &a.detail,
        &[
            "no row for version 20240201000000",
            "latest: 20240101120000",
        ],
    );
}

#[test]
fn django_app_and_migration_name() {
    let db = TestDb::new();
    let h = history(Tool::Django);
    db.exec(
        "CREATE TABLE django_migrations (
             id bigint NOT NULL PRIMARY KEY GENERATED BY DEFAULT AS IDENTITY,
             app varchar(255) NOT NULL,
             name varchar(255) NOT NULL,
             applied timestamp with time zone NOT NULL);
         INSERT INTO django_migrations (app, name, applied) VALUES
             ('contenttypes', '0001_initial', now()),
             ('orders', '0001_initial', now()),
             ('orders', '0002_add_status', now());",
    );
    let a = applied(&db, &h, "orders.0002_add_status");
    contains(&a.detail, &["orders.0002_add_status", "applied at"]);
    let a = not_applied(&db, &h, "orders.0003_drop_legacy");
    contains(
        &a.detail,
        &[
            "no row for orders.0003_drop_legacy",
            "latest for orders: 0002_add_status",
        ],
    );
    let a = not_applied(&db, &h, "orders.0002");
    contains(&a.detail, &["0002_add_status", "full name"]);
    not_applied(&db, &h, "contenttypes.0002_add_status");
    contains(
        &not_applied(&db, &h, "billing.0001_initial").detail,
        &["no migration of app billing"],
    );
    contains(
        &usage_error(&db, &h, "0002_add_status"),
        &["django", "orders.0002_add_status"],
    );
}

/// base → a → (left | right) → merge → after, and a second branch `other` from a.
fn alembic_versions(db: &TestDb) -> PathBuf {
    let dir = db.jobs.join("alembic").join("versions");
    std::fs::create_dir_all(&dir).unwrap();
    let files: &[(&str, &str, &str)] = &[
        ("1000base", "None", ""),
        ("2000aaaa", "'1000base'", ""),
        ("3000left", "'2000aaaa'", ""),
        ("3000right", "'2000aaaa'", ""),
        ("4000merge", "('3000left', '3000right')", ""),
        ("5000after", "'4000merge'", ""),
        ("6000other", "'2000aaaa'", "('other',)"),
    ];
    for (id, down, labels) in files {
        let labels = if labels.is_empty() { "None" } else { labels };
        std::fs::write(
            dir.join(format!("{id}_step.py")),
            format!(
                "\"\"\"step\n\nRevision ID: {id}\nRevises: {down}\n\"\"\"\nfrom typing import Sequence, Union\n\n\
                 revision: str = \"{id}\"\ndown_revision: Union[str, Sequence[str], None] = {down}\n\
                 branch_labels = {labels}\ndepends_on = None\n\n\ndef upgrade() -> None:\n    pass\n"
            ),
        )
        .unwrap();
    }
    std::fs::write(dir.join("__init__.py"), "").unwrap();
    std::fs::write(
        dir.parent().unwrap().join("env.py"),
        "from alembic import context\n",
    )
    .unwrap();
    dir
}

#[test]
fn alembic_heads_decide_through_the_revision_graph() {
    let db = TestDb::new();
    let dir = alembic_versions(&db);
    let h = History {
        alembic_dir: Some(dir.clone()),
        alembic_recursive: false,
        ..history(Tool::Alembic)
    };
    contains(
        &not_applied(&db, &h, "1000base").detail,
        &["alembic_version does not exist"],
    );
    db.exec(
        "CREATE TABLE alembic_version (
             version_num VARCHAR(32) NOT NULL,
             CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num));",
    );
    contains(&not_applied(&db, &h, "1000base").detail, &["empty"]);

    // One head, past the merge.
    db.exec("INSERT INTO alembic_version VALUES ('4000merge')");
    let a = applied(&db, &h, "3000left");
    contains(
        &a.detail,
        &[
            "alembic head 4000merge",
            "descends from 3000left",
            &dir.display().to_string(),
        ],
    );
    applied(&db, &h, "3000right");
    applied(&db, &h, "2000"); // a unique prefix
    contains(&applied(&db, &h, "4000merge").detail, &["itself"]);
    let a = not_applied(&db, &h, "5000after");
    contains(
        &a.detail,
        &["no alembic head descends from 5000after", "4000merge"],
    );
    not_applied(&db, &h, "6000other");

    // Two heads, one on each unmerged branch.
    db.exec("DELETE FROM alembic_version; INSERT INTO alembic_version VALUES ('3000left'), ('6000other')");
    applied(&db, &h, "3000left");
    applied(&db, &h, "6000other");
    applied(&db, &h, "1000base");
    let a = not_applied(&db, &h, "3000right");
    contains(&a.detail, &["3000left", "6000other"]);
    not_applied(&db, &h, "4000merge");

    // Ambiguous and unknown revisions are refused before the database is read.
    contains(
        &usage_error(&db, &h, "3000"),
        &["ambiguous", "3000left", "3000right"],
    );
    contains(
        &usage_error(&db, &h, "9999abcd"),
        &["no alembic revision or branch label 9999abcd"],
    );

    // A head the directory does not know: the checkout is older than the database.
    db.exec("INSERT INTO alembic_version VALUES ('7000newer')");
    let m = usage_error(&db, &h, "1000base");
    contains(
        &m,
        &["7000newer", "out of date", &dir.display().to_string()],
    );

    contains(
        &usage_error(&db, &history(Tool::Alembic), "1000base"),
        &["alembic_dir"],
    );
}

#[test]
fn every_tool_without_its_table_has_not_run() {
    let db = TestDb::new();
    let dir = alembic_versions(&db);
    let revisions = [
        (Tool::Alembic, "1000base"),
        (Tool::Sqlx, "1"),
        (Tool::Refinery, "1"),
        (Tool::Flyway, "1"),
        (Tool::GolangMigrate, "1"),
        (Tool::Diesel, "20240101120000"),
        (Tool::Rails, "20240101120000"),
        (Tool::Django, "orders.0001_initial"),
    ];
    assert_eq!(revisions.len(), Tool::NAMES.len());
    for (tool, revision) in revisions {
        let h = History {
            tool,
            table: None,
            alembic_dir: Some(dir.clone()),
            alembic_recursive: false,
        };
        let a = not_applied(&db, &h, revision);
        contains(
            &a.detail,
            &[
                &format!("{} does not exist", tool.default_table()),
                &format!("{} has not run", tool.name()),
                "history_table",
            ],
        );
        // A qualified override into a schema that does not exist is the same answer, not an error.
        let h = History {
            table: Some("nowhere.history".into()),
            ..h
        };
        contains(
            &not_applied(&db, &h, revision).detail,
            &["nowhere.history does not exist"],
        );
    }
}
