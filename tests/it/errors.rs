//! How a failure of the database is classified and carried, on a real server: by SQLSTATE when
//! the server sent one; without one, only a failure of the connection itself is `Connection`
//! (waited out with `--reconnect-for`), and an error of the client's own is `Fatal`.

use crate::support::{block_on, TestDb};
use backfill::db::{self, ErrorClass, Target};
use backfill::Error;
use tokio_postgres::error::SqlState;

#[test]
fn a_parameter_the_driver_cannot_encode_is_fatal_not_a_lost_connection() {
    let db = TestDb::new();
    block_on(async {
        let client = db.connect().await;
        // An i64 cannot be sent as int4: the driver refuses before the server sees it.
        let e = client
            .query_one("SELECT $1::int4", &[&1i64])
            .await
            .expect_err("an i64 bound to an int4 parameter");
        assert_eq!(e.code(), None, "a client-side error: {e}");
        assert_eq!(db::classify(&e), ErrorClass::Fatal, "{e}");
        let err = db::error(e, "job j: encoding");
        assert!(matches!(err, Error::Database(_)), "{err:?}");
        assert!(!client.is_closed(), "the connection is still usable");
    });
}

#[test]
fn a_killed_session_is_a_lost_connection() {
    let db = TestDb::new();
    block_on(async {
        let client = db.connect().await;
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        db.connect()
            .await
            .batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
            .await
            .unwrap();
        // The server says 57P01 as it goes; once the socket is gone, the driver's own error has
        // no SQLSTATE. Both are a lost connection.
        let mut seen_without_sqlstate = false;
        for _ in 0..50 {
            match client.simple_query("SELECT 1").await {
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                Err(e) => {
                    assert_eq!(db::classify(&e), ErrorClass::Connection, "{e}");
                    let err = db::error(e, "job j: after the kill");
                    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
                    if err.database().and_then(|d| d.sqlstate.as_ref()).is_none() {
                        seen_without_sqlstate = true;
                        break;
                    }
                }
            }
        }
        assert!(seen_without_sqlstate, "the closed connection was reported");
    });
}

#[test]
fn a_refused_connection_is_unavailable() {
    let e = block_on(async {
        Target::resolve(Some(
            "postgresql://backfill@127.0.0.1:1/none?connect_timeout=5",
        ))
        .unwrap()
        .connect()
        .await
        .expect_err("nothing listens on port 1")
    });
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    assert_eq!(e.database().map(|d| d.class), Some(ErrorClass::Connection));
    let text = e.to_string();
    assert!(
        text.starts_with("cannot connect to ") && text.ends_with("and that the server is up"),
        "{text}"
    );
}

#[test]
fn a_server_error_keeps_its_sqlstate_class_and_context() {
    let db = TestDb::new();
    block_on(async {
        let client = db.connect().await;
        let e = client.query_one("SELECT 1 / 0", &[]).await.unwrap_err();
        let err = db::error(e, "job j: dividing").context("reviewing");
        let d = err.database().expect("a database error");
        assert_eq!(d.class, ErrorClass::Data);
        assert_eq!(d.sqlstate, Some(SqlState::DIVISION_BY_ZERO));
        assert_eq!(d.context, ["reviewing", "job j: dividing"]);
        assert!(
            std::error::Error::source(d).is_some(),
            "the driver's error is kept"
        );
        assert_eq!(err.exit_code(), 1);
        assert_eq!(
            err.to_string(),
            "reviewing: job j: dividing: SQLSTATE 22012: division by zero"
        );
        let missing = client
            .query_one("SELECT * FROM nowhere", &[])
            .await
            .unwrap_err();
        let text = db::error(missing, "job j").to_string();
        assert!(text.starts_with("job j: SQLSTATE 42P01: "), "{text}");
        assert!(
            text.ends_with(db::advice(Some("42P01"))),
            "a fatal error says what to do: {text}"
        );
    });
}
