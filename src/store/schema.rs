//! The engine's own schema, versioned: each migration runs once, in order, in one transaction
//! serialised by an advisory lock, so concurrent first runs cannot race. Application tables are
//! never touched here.

use crate::db;
use crate::error::{Error, Result};

/// Migrations of the engine's schema. `{s}` is replaced by the quoted schema name. Append only.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE {s}.checkpoints (
    job                 text PRIMARY KEY,
    state               text NOT NULL DEFAULT 'new'
                        CHECK (state IN ('new', 'running', 'stopped', 'failed', 'done', 'incomplete')),
    fingerprint         text NOT NULL,
    table_name          text NOT NULL,
    key_columns         text[] NOT NULL,
    cursor              text[],
    upper_bound         text[],
    bound_taken         boolean NOT NULL DEFAULT false,
    rows_done           bigint NOT NULL DEFAULT 0,
    rows_affected       bigint NOT NULL DEFAULT 0,
    chunks_done         bigint NOT NULL DEFAULT 0,
    total_estimate      bigint,
    verify_remaining    bigint,
    verified_at         timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    last_error          text,
    owner_run           bigint,
    owner_host          text,
    owner_pid           integer,
    owner_backend_pid   integer,
    owner_backend_start timestamptz,
    heartbeat_at        timestamptz
);
CREATE TABLE {s}.runs (
    id              bigserial PRIMARY KEY,
    job             text NOT NULL,
    host            text NOT NULL,
    pid             integer NOT NULL,
    engine_version  text NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    ended_at        timestamptz,
    start_rows      bigint NOT NULL DEFAULT 0,
    start_chunks    bigint NOT NULL DEFAULT 0,
    start_cursor    text[],
    rows_done       bigint NOT NULL DEFAULT 0,
    chunks_done     bigint NOT NULL DEFAULT 0,
    end_cursor      text[],
    outcome         text,
    last_error      text
);
CREATE INDEX runs_job_idx ON {s}.runs (job, id);
"#,
    ),
    (
        2,
        r#"
CREATE TABLE {s}.failures (
    id          bigserial PRIMARY KEY,
    job         text NOT NULL,
    key         text[] NOT NULL,
    sqlstate    text,
    message     text NOT NULL,
    run_id      bigint,
    attempts    integer NOT NULL DEFAULT 1,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    UNIQUE (job, key)
);
"#,
    ),
    (
        3,
        r#"
ALTER TABLE {s}.checkpoints ADD COLUMN total_exact boolean NOT NULL DEFAULT false;
"#,
    ),
    (
        4,
        r#"
ALTER TABLE {s}.checkpoints DROP CONSTRAINT checkpoints_state_check;
ALTER TABLE {s}.checkpoints ADD CONSTRAINT checkpoints_state_check
    CHECK (state IN ('new', 'running', 'stopped', 'cancelled', 'failed', 'done', 'incomplete'));
ALTER TABLE {s}.checkpoints ADD COLUMN chunk_rows_now integer;
ALTER TABLE {s}.checkpoints ADD COLUMN hold_reason text;
ALTER TABLE {s}.checkpoints ADD COLUMN held_since timestamptz;
CREATE TABLE {s}.controls (
    job                  text PRIMARY KEY,
    paused               boolean NOT NULL DEFAULT false,
    cancel               boolean NOT NULL DEFAULT false,
    rows_per_second      bigint,
    target_chunk_time_ms bigint,
    pause_ms             bigint,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
"#,
    ),
    (
        5,
        r#"
ALTER TABLE {s}.runs ADD COLUMN workers integer NOT NULL DEFAULT 1,
    ADD COLUMN backend_pid integer, ADD COLUMN backend_start timestamptz,
    ADD COLUMN heartbeat_at timestamptz, ADD COLUMN hold_reason text, ADD COLUMN held_since timestamptz;
UPDATE {s}.runs r SET backend_pid = c.owner_backend_pid, backend_start = c.owner_backend_start,
       heartbeat_at = c.heartbeat_at
  FROM {s}.checkpoints c WHERE c.owner_run = r.id;
CREATE TABLE {s}.ranges (
    job            text NOT NULL REFERENCES {s}.checkpoints (job) ON DELETE CASCADE,
    id             integer NOT NULL,
    lower_bound    text[],
    upper_bound    text[] NOT NULL,
    cursor         text[],
    done           boolean NOT NULL DEFAULT false,
    estimate       bigint,
    rows_done      bigint NOT NULL DEFAULT 0,
    rows_affected  bigint NOT NULL DEFAULT 0,
    chunks_done    bigint NOT NULL DEFAULT 0,
    chunk_rows_now integer,
    owner_run      bigint,
    owner_worker   integer,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, id)
);
INSERT INTO {s}.ranges (job, id, upper_bound, cursor, done, estimate, rows_done, rows_affected,
                        chunks_done, chunk_rows_now, owner_run, owner_worker)
SELECT job, 0, upper_bound, cursor, state IN ('done', 'incomplete'), total_estimate, rows_done,
       rows_affected, chunks_done, chunk_rows_now, owner_run, CASE WHEN owner_run IS NOT NULL THEN 0 END
  FROM {s}.checkpoints WHERE bound_taken AND upper_bound IS NOT NULL;
ALTER TABLE {s}.checkpoints DROP COLUMN cursor, DROP COLUMN rows_done, DROP COLUMN rows_affected,
    DROP COLUMN chunks_done, DROP COLUMN chunk_rows_now, DROP COLUMN owner_run, DROP COLUMN owner_host,
    DROP COLUMN owner_pid, DROP COLUMN owner_backend_pid, DROP COLUMN owner_backend_start,
    DROP COLUMN heartbeat_at, DROP COLUMN hold_reason, DROP COLUMN held_since;
CREATE VIEW {s}.progress AS
SELECT c.job, c.state, c.table_name, c.upper_bound, c.total_estimate,
       coalesce(g.rows_done, 0) AS rows_done, coalesce(g.rows_affected, 0) AS rows_affected,
       coalesce(g.chunks_done, 0) AS chunks_done, coalesce(g.ranges, 0) AS ranges,
       coalesce(g.ranges_done, 0) AS ranges_done, g.chunk_rows_now, h.hold_reason, h.held_since,
       c.verify_remaining, c.updated_at
  FROM {s}.checkpoints c
  LEFT JOIN LATERAL (
       SELECT sum(rows_done)::bigint AS rows_done, sum(rows_affected)::bigint AS rows_affected,
              sum(chunks_done)::bigint AS chunks_done, count(*) AS ranges,
              count(*) FILTER (WHERE done) AS ranges_done,
              (SELECT x.chunk_rows_now FROM {s}.ranges x WHERE x.job = c.job
                ORDER BY x.updated_at DESC LIMIT 1) AS chunk_rows_now
         FROM {s}.ranges r WHERE r.job = c.job) g ON true
  LEFT JOIN LATERAL (
       SELECT hold_reason, held_since FROM {s}.runs
        WHERE job = c.job AND outcome IS NULL AND hold_reason IS NOT NULL
        ORDER BY id LIMIT 1) h ON true;
"#,
    ),
    (
        6,
        r#"
ALTER TABLE {s}.checkpoints DROP CONSTRAINT checkpoints_state_check;
ALTER TABLE {s}.checkpoints ADD CONSTRAINT checkpoints_state_check
    CHECK (state IN ('new', 'running', 'stopped', 'cancelled', 'failed', 'done', 'incomplete', 'reverted'));
ALTER TABLE {s}.checkpoints ADD COLUMN verify_sql text, ADD COLUMN phase text,
    ADD COLUMN sweeps integer NOT NULL DEFAULT 0, ADD COLUMN finish_steps integer NOT NULL DEFAULT 0;
CREATE TABLE {s}.finish_steps (
    job        text NOT NULL REFERENCES {s}.checkpoints (job) ON DELETE CASCADE,
    step       integer NOT NULL,
    sql        text NOT NULL,
    sql_hash   text NOT NULL,
    state      text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts   integer NOT NULL DEFAULT 0,
    last_error text,
    started_at timestamptz,
    done_at    timestamptz,
    PRIMARY KEY (job, step)
);
CREATE FUNCTION {s}.assert_done(job_name text) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    c          record;
    failed     bigint;
    finished   bigint;
    remaining  bigint;
    run_hint   text := format('run `backfill run %s` and let it finish; `backfill gate %s` says what is missing', job_name, job_name);
BEGIN
    SELECT state, verify_sql, finish_steps INTO c FROM {s}.checkpoints WHERE job = job_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'backfill job % has never run: the contract step must wait for it', job_name
              USING HINT = run_hint;
    END IF;
    IF c.state <> 'done' THEN
        RAISE EXCEPTION 'backfill job % is not complete (state %): the contract step must wait for it', job_name, c.state
              USING HINT = run_hint;
    END IF;
    SELECT count(*) INTO failed FROM {s}.failures WHERE job = job_name AND resolved_at IS NULL;
    IF failed > 0 THEN
        RAISE EXCEPTION 'backfill job % skipped % keys whose rows made its statement fail', job_name, failed
              USING HINT = format('`backfill failures %s` lists them; `backfill retry-failures %s` once fixed', job_name, job_name);
    END IF;
    SELECT count(*) INTO finished FROM {s}.finish_steps WHERE job = job_name AND state = 'done';
    IF finished < c.finish_steps THEN
        RAISE EXCEPTION 'backfill job %: % of its % finishing steps succeeded', job_name, finished, c.finish_steps
              USING HINT = run_hint;
    END IF;
    IF c.verify_sql IS NOT NULL THEN
        EXECUTE format('SELECT (%s)::bigint', c.verify_sql) INTO remaining;
        IF remaining IS DISTINCT FROM 0 THEN
            RAISE EXCEPTION 'backfill job %: its verify query counts % rows still to do', job_name, coalesce(remaining::text, 'NULL')
                  USING HINT = format('rows were written behind the backfill (old code still deployed?); `backfill run %s` sweeps them once the writers are fixed', job_name);
        END IF;
    END IF;
END
$fn$;
"#,
    ),
    (
        7,
        // The SQL gate no longer executes a query stored in the engine's tables: a role that may
        // write them (the runner) must not be able to run SQL with the rights of whoever calls the
        // gate (a migration, often the owner). The one-argument gate trusts the verify the engine
        // recorded; the two-argument one runs the query the migration itself passes, now. It
        // holds the job's advisory lock shared (see `Store::job_lock_key`).
        r#"
ALTER TABLE {s}.checkpoints DROP COLUMN verify_sql, ADD COLUMN has_verify boolean NOT NULL DEFAULT false;
DROP FUNCTION {s}.assert_done(text);
CREATE FUNCTION {s}.assert_done(job_name text, verify_query text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    c          record;
    failed     bigint;
    finished   bigint;
    remaining  bigint;
    run_hint   text := format('run `backfill run %s` and let it finish; `backfill gate %s` says what is missing', job_name, job_name);
    redo_hint  text := format('rows were written behind the backfill (old code still deployed?); once the writers are fixed: `backfill reset %s --yes` and `backfill run %s`', job_name, job_name);
BEGIN
    -- Held until the caller's transaction ends: a revert or reset of the job waits for the
    -- migration that passed the gate, and the gate waits while a revert runs.
    PERFORM pg_advisory_xact_lock_shared(hashtext('backfill job {s}.' || job_name));
    SELECT state, has_verify, verify_remaining, finish_steps INTO c FROM {s}.checkpoints WHERE job = job_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'backfill job % has never run: the contract step must wait for it', job_name
              USING HINT = run_hint;
    END IF;
    IF c.state <> 'done' THEN
        RAISE EXCEPTION 'backfill job % is not complete (state %): the contract step must wait for it', job_name, c.state
              USING HINT = run_hint;
    END IF;
    SELECT count(*) INTO failed FROM {s}.failures WHERE job = job_name AND resolved_at IS NULL;
    IF failed > 0 THEN
        RAISE EXCEPTION 'backfill job % skipped % keys whose rows made its statement fail', job_name, failed
              USING HINT = format('`backfill failures %s` lists them; `backfill retry-failures %s` once fixed', job_name, job_name);
    END IF;
    SELECT count(*) INTO finished FROM {s}.finish_steps WHERE job = job_name AND state = 'done';
    IF finished < c.finish_steps THEN
        RAISE EXCEPTION 'backfill job %: % of its % finishing steps succeeded', job_name, finished, c.finish_steps
              USING HINT = run_hint;
    END IF;
    IF verify_query IS NOT NULL THEN
        EXECUTE format('SELECT (%s)::bigint', verify_query) INTO remaining;
        IF remaining IS DISTINCT FROM 0 THEN
            RAISE EXCEPTION 'backfill job %: the verify query counts % rows still to do', job_name, coalesce(remaining::text, 'NULL')
                  USING HINT = redo_hint;
        END IF;
    ELSIF c.has_verify AND c.verify_remaining IS DISTINCT FROM 0 THEN
        RAISE EXCEPTION 'backfill job %: its last verify counted % rows still to do', job_name, coalesce(c.verify_remaining::text, 'no result')
              USING HINT = redo_hint;
    END IF;
END
$fn$;
"#,
    ),
    (
        8,
        // What each run did, counted in the transaction of each chunk (see `Store::advance`): a
        // count kept in the runner's memory misses a chunk whose COMMIT succeeded but whose answer
        // was lost with the connection. One row per worker, so workers never wait on each other.
        r#"
CREATE TABLE {s}.run_workers (
    run_id        bigint NOT NULL REFERENCES {s}.runs (id) ON DELETE CASCADE,
    worker        integer NOT NULL,
    rows_done     bigint NOT NULL DEFAULT 0,
    rows_affected bigint NOT NULL DEFAULT 0,
    chunks_done   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, worker)
);
"#,
    ),
    (
        9,
        // Whether a job is complete, its verify aside, is decided once, here: the SQL gate and
        // `backfill gate` both ask `completion_gap` (the texts of `gap` are `state::CompletionGap`'s). It
        // reads only the engine's tables and executes nothing stored in them. `declared` is the
        // number of finishing steps the job's file declares now, which the CLI gate knows; the
        // SQL gate passes none and the count the job's last run recorded is used.
        r#"
CREATE FUNCTION {s}.completion_gap(job_name text, declared integer DEFAULT NULL,
    OUT gap text, OUT job_state text, OUT failed_keys bigint, OUT steps_done bigint,
    OUT steps_declared integer, OUT has_verify boolean, OUT verify_remaining bigint)
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    c record;
BEGIN
    SELECT k.state, k.finish_steps, k.has_verify, k.verify_remaining INTO c
      FROM {s}.checkpoints k WHERE k.job = job_name;
    IF NOT FOUND THEN
        gap := 'never run';
        RETURN;
    END IF;
    job_state := c.state;
    has_verify := c.has_verify;
    verify_remaining := c.verify_remaining;
    IF c.state <> 'done' THEN
        gap := 'not done';
        RETURN;
    END IF;
    SELECT count(*) INTO failed_keys FROM {s}.failures f
     WHERE f.job = job_name AND f.resolved_at IS NULL;
    IF failed_keys > 0 THEN
        gap := 'failed keys';
        RETURN;
    END IF;
    SELECT count(*) INTO steps_done FROM {s}.finish_steps f WHERE f.job = job_name AND f.state = 'done';
    steps_declared := coalesce(declared, c.finish_steps);
    IF steps_done < steps_declared THEN
        gap := 'finishing steps';
    END IF;
END
$fn$;
CREATE OR REPLACE FUNCTION {s}.assert_done(job_name text, verify_query text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    g          record;
    remaining  bigint;
    run_hint   text := format('run `backfill run %s` and let it finish; `backfill gate %s` says what is missing', job_name, job_name);
    redo_hint  text := format('rows were written behind the backfill (old code still deployed?); once the writers are fixed: `backfill reset %s --yes` and `backfill run %s`', job_name, job_name);
BEGIN
    -- Held until the caller's transaction ends: a revert or reset of the job waits for the
    -- migration that passed the gate, and the gate waits while a revert runs.
    PERFORM pg_advisory_xact_lock_shared(hashtext('backfill job {s}.' || job_name));
    SELECT * INTO g FROM {s}.completion_gap(job_name);
    IF g.gap = 'never run' THEN
        RAISE EXCEPTION 'backfill job % has never run: the contract step must wait for it', job_name
              USING HINT = run_hint;
    ELSIF g.gap = 'not done' THEN
        RAISE EXCEPTION 'backfill job % is not complete (state %): the contract step must wait for it', job_name, g.job_state
              USING HINT = run_hint;
    ELSIF g.gap = 'failed keys' THEN
        RAISE EXCEPTION 'backfill job % skipped % keys whose rows made its statement fail', job_name, g.failed_keys
              USING HINT = format('`backfill failures %s` lists them; `backfill retry-failures %s` once fixed', job_name, job_name);
    ELSIF g.gap = 'finishing steps' THEN
        RAISE EXCEPTION 'backfill job %: % of its % finishing steps succeeded', job_name, g.steps_done, g.steps_declared
              USING HINT = run_hint;
    ELSIF g.gap IS NOT NULL THEN
        RAISE EXCEPTION 'backfill job % is not complete (%)', job_name, g.gap USING HINT = run_hint;
    END IF;
    IF verify_query IS NOT NULL THEN
        EXECUTE format('SELECT (%s)::bigint', verify_query) INTO remaining;
        IF remaining IS DISTINCT FROM 0 THEN
            RAISE EXCEPTION 'backfill job %: the verify query counts % rows still to do', job_name, coalesce(remaining::text, 'NULL')
                  USING HINT = redo_hint;
        END IF;
    ELSIF g.has_verify AND g.verify_remaining IS DISTINCT FROM 0 THEN
        RAISE EXCEPTION 'backfill job %: its last verify counted % rows still to do', job_name, coalesce(g.verify_remaining::text, 'no result')
              USING HINT = redo_hint;
    END IF;
END
$fn$;
"#,
    ),
    (
        10,
        r#"
CREATE TABLE {s}.control_events (
    id           bigserial PRIMARY KEY,
    job          text NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    action       text NOT NULL
                 CHECK (action IN ('pause', 'resume', 'cancel', 'set', 'overrides_ended')),
    change       jsonb NOT NULL,
    role         text NOT NULL DEFAULT current_user,
    session_role text NOT NULL DEFAULT session_user,
    client_addr  inet DEFAULT inet_client_addr(),
    host         text NOT NULL,
    pid          integer NOT NULL
);
CREATE INDEX control_events_job ON {s}.control_events (job, id);
ALTER TABLE {s}.runs ADD COLUMN throttle_flags jsonb;
"#,
    ),
    (
        11,
        // The rows per second each live run committed recently, measured by its lease task
        // over its last 30 s and written with its heartbeat (never by a chunk): `status` sums it
        // over the live runs for the job's rate and ETA.
        // And the view's `updated_at`, like `status`'s: the last change to the job's row or to
        // one of its ranges, which each chunk moves (the job's row only at a run's start and end).
        r#"
ALTER TABLE {s}.runs ADD COLUMN recent_rows_per_second float8;
CREATE OR REPLACE VIEW {s}.progress AS
SELECT c.job, c.state, c.table_name, c.upper_bound, c.total_estimate,
       coalesce(g.rows_done, 0) AS rows_done, coalesce(g.rows_affected, 0) AS rows_affected,
       coalesce(g.chunks_done, 0) AS chunks_done, coalesce(g.ranges, 0) AS ranges,
       coalesce(g.ranges_done, 0) AS ranges_done, g.chunk_rows_now, h.hold_reason, h.held_since,
       c.verify_remaining, greatest(c.updated_at, g.updated_at) AS updated_at
  FROM {s}.checkpoints c
  LEFT JOIN LATERAL (
       SELECT sum(rows_done)::bigint AS rows_done, sum(rows_affected)::bigint AS rows_affected,
              sum(chunks_done)::bigint AS chunks_done, count(*) AS ranges,
              count(*) FILTER (WHERE done) AS ranges_done, max(updated_at) AS updated_at,
              (SELECT x.chunk_rows_now FROM {s}.ranges x WHERE x.job = c.job
                ORDER BY x.updated_at DESC LIMIT 1) AS chunk_rows_now
         FROM {s}.ranges r WHERE r.job = c.job) g ON true
  LEFT JOIN LATERAL (
       SELECT hold_reason, held_since FROM {s}.runs
        WHERE job = c.job AND outcome IS NULL AND hold_reason IS NOT NULL
        ORDER BY id LIMIT 1) h ON true;
"#,
    ),
];

pub const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The schema version installed, or None when the engine's schema does not exist yet.
pub async fn installed_version(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
) -> Result<Option<i32>> {
    let exists: bool = client
        .query_one(
            // A plain catalog query, not to_regclass: it reads with the statement's snapshot, so
            // a run that waited on the migration lock sees the schema the other one just made.
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = $1 AND c.relname = 'schema_version')",
            &[&schema],
        )
        .await
        .map_err(|e| db::error(e, "reading the engine's schema version"))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let sql = format!(
        "SELECT max(version) FROM {}.schema_version",
        crate::sql::quote_ident(schema)
    );
    let v: Option<i32> = client
        .query_one(&sql, &[])
        .await
        .map_err(|e| db::error(e, "reading the engine's schema version"))?
        .get(0);
    Ok(Some(v.unwrap_or(0)))
}

/// Creates or upgrades the engine's schema. Returns (version before, version after).
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> Result<(Option<i32>, i32)> {
    migrate_up_to(client, schema, LATEST).await
}

/// Creates or upgrades the engine's schema up to version `last` only (tests of upgrades start
/// from an older version this way).
pub async fn migrate_up_to(
    client: &mut tokio_postgres::Client,
    schema: &str,
    last: i32,
) -> Result<(Option<i32>, i32)> {
    let quoted = crate::sql::quote_ident(schema);
    let fail = |e: tokio_postgres::Error| {
        if db::sqlstate(&e) == Some("42501") {
            Error::Runtime(format!(
                "cannot create or upgrade the engine's schema `{schema}`: {}; run `backfill init` once as a role that may create schemas in this database (for example the database owner), and grant this role access (see `backfill init --grant-to ROLE`)",
                db::describe(&e)
            ))
        } else {
            db::error(
                e,
                format!("creating or upgrading the engine's schema `{schema}`"),
            )
        }
    };
    let tx = client.transaction().await.map_err(fail)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('backfill schema ' || $1::text))",
        &[&schema],
    )
    .await
    .map_err(fail)?;
    let before = installed_version(&tx, schema).await?;
    if let Some(v) = before {
        if v > LATEST {
            return Err(Error::Runtime(format!(
                "the engine's schema `{schema}` is at version {v}, newer than this backfill ({}) understands (version {LATEST}); upgrade the backfill binary",
                env!("CARGO_PKG_VERSION")
            )));
        }
        if v >= last {
            return Ok((before, v));
        }
    } else {
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {quoted};
             CREATE TABLE {quoted}.schema_version (
                 version        integer PRIMARY KEY,
                 applied_at     timestamptz NOT NULL DEFAULT now(),
                 engine_version text NOT NULL)"
        ))
        .await
        .map_err(fail)?;
    }
    let from = before.unwrap_or(0);
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > from && *v <= last) {
        tx.batch_execute(&sql.replace("{s}", &quoted))
            .await
            .map_err(fail)?;
        tx.execute(
            &format!(
                "INSERT INTO {quoted}.schema_version (version, engine_version) VALUES ($1, $2)"
            ),
            &[version, &env!("CARGO_PKG_VERSION")],
        )
        .await
        .map_err(fail)?;
    }
    tx.commit().await.map_err(fail)?;
    Ok((before, last.min(LATEST)))
}

/// The statements that let `role` (a migration's) call the SQL gate and run `backfill gate`, and
/// nothing more: read the engine's bookkeeping (the CLI gate reads a job's checkpoint as `status`
/// does, with its ranges and runs, after checking the schema's version) and record the count its
/// verify query just returned — two columns, so the one-argument SQL gate, which trusts the last
/// recorded count, stays shut after a CLI gate that found rows left. No other write.
pub fn gate_grants(schema: &str, role: &str) -> String {
    let s = crate::sql::quote_ident(schema);
    let r = crate::sql::quote_ident(role);
    format!(
        "GRANT USAGE ON SCHEMA {s} TO {r};
         GRANT SELECT ON {s}.schema_version, {s}.checkpoints, {s}.failures, {s}.finish_steps, {s}.ranges, {s}.runs TO {r};
         GRANT UPDATE (verify_remaining, verified_at) ON {s}.checkpoints TO {r};
         GRANT EXECUTE ON FUNCTION {s}.assert_done(text, text) TO {r};
         GRANT EXECUTE ON FUNCTION {s}.completion_gap(text, integer) TO {r};"
    )
}

/// What the session's role lacks of what `backfill gate` reads and writes (the grants of
/// [`gate_grants`]), e.g. for a migration role granted by an older `init`. Empty when nothing is
/// missing, and when the schema does not exist (the gate then finds the job never ran).
pub async fn gate_privileges_missing(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
) -> Result<Vec<String>> {
    // By oid, never by name: a name lookup in a schema without USAGE fails instead of answering.
    let rows = client
        .query(
            "WITH ns AS (SELECT oid FROM pg_namespace WHERE nspname = $1)
             SELECT 'USAGE on schema ' || quote_ident($1) FROM ns
              WHERE NOT has_schema_privilege(ns.oid, 'USAGE')
             UNION ALL
             SELECT w.priv || coalesce(' (' || w.col || ')', '') || ' on ' || quote_ident($1) || '.' || w.rel
               FROM ns CROSS JOIN (VALUES
                      ('schema_version'::text, 'SELECT'::text, NULL::text), ('checkpoints', 'SELECT', NULL),
                      ('failures', 'SELECT', NULL), ('finish_steps', 'SELECT', NULL),
                      ('ranges', 'SELECT', NULL), ('runs', 'SELECT', NULL),
                      ('checkpoints', 'UPDATE', 'verify_remaining'), ('checkpoints', 'UPDATE', 'verified_at')
                    ) w (rel, priv, col)
               JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = w.rel
              WHERE CASE WHEN w.col IS NULL THEN NOT has_table_privilege(c.oid, w.priv)
                         ELSE NOT has_column_privilege(c.oid, w.col, w.priv) END
             UNION ALL
             SELECT 'EXECUTE on function ' || quote_ident($1) || '.completion_gap(text, integer)'
               FROM ns JOIN pg_proc p ON p.pronamespace = ns.oid AND p.proname = 'completion_gap'
              WHERE NOT has_function_privilege(p.oid, 'EXECUTE')",
            &[&schema],
        )
        .await
        .map_err(|e| db::error(e, format!("checking access to the engine's schema `{schema}`")))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The statements that give `role` what a run needs, and nothing more.
pub fn grants(schema: &str, role: &str) -> String {
    let s = crate::sql::quote_ident(schema);
    let r = crate::sql::quote_ident(role);
    format!(
        "GRANT USAGE, CREATE ON SCHEMA {s} TO {r};
         GRANT SELECT ON {s}.schema_version TO {r};
         GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.checkpoints, {s}.runs, {s}.failures, {s}.controls, {s}.ranges, {s}.finish_steps, {s}.run_workers TO {r};
         GRANT SELECT ON {s}.progress TO {r};
         GRANT SELECT, INSERT ON {s}.control_events TO {r};
         GRANT USAGE ON SEQUENCE {s}.runs_id_seq, {s}.failures_id_seq, {s}.control_events_id_seq TO {r};"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{CompletionGap, JobState, StepState};

    /// The texts the last CHECK constraint on `table.state` allows, from the migrations.
    fn checked_states(table: &str) -> Vec<String> {
        let constraint = MIGRATIONS
            .iter()
            .flat_map(|(_, sql)| {
                // A CHECK is either added to the table by name or written in its CREATE TABLE.
                sql.match_indices("CHECK (state IN (")
                    .filter_map(move |(at, m)| {
                        let before = &sql[..at];
                        let owner = before
                            .rfind(&format!("ALTER TABLE {{s}}.{table} "))
                            .max(before.rfind(&format!("CREATE TABLE {{s}}.{table} ")));
                        let other = before
                            .rfind("ALTER TABLE ")
                            .max(before.rfind("CREATE TABLE "));
                        (owner.is_some() && owner == other).then(|| {
                            let list = &sql[at + m.len()..];
                            list[..list.find("))").expect("a closed list")].to_string()
                        })
                    })
            })
            .last()
            .unwrap_or_else(|| panic!("no CHECK on {table}.state"));
        constraint
            .split(',')
            .map(|t| t.trim().trim_matches('\'').to_string())
            .collect()
    }

    #[test]
    fn the_schema_allows_exactly_the_states_the_engine_knows() {
        let job: Vec<String> = JobState::ALL.iter().map(|s| s.as_sql().into()).collect();
        assert_eq!(checked_states("checkpoints"), job);
        let step: Vec<String> = StepState::ALL.iter().map(|s| s.as_sql().into()).collect();
        assert_eq!(checked_states("finish_steps"), step);
    }

    #[test]
    fn completion_gap_answers_with_the_texts_the_engine_parses() {
        let (_, sql) = MIGRATIONS
            .iter()
            .rfind(|(_, sql)| sql.contains("FUNCTION {s}.completion_gap("))
            .expect("completion_gap is defined");
        let answered: Vec<&str> = sql
            .match_indices("gap := '")
            .map(|(at, m)| {
                let text = &sql[at + m.len()..];
                &text[..text.find('\'').expect("a closed literal")]
            })
            .collect();
        let known: Vec<&str> = CompletionGap::ALL.iter().map(|g| g.as_sql()).collect();
        assert_eq!(answered, known);
        for gap in known {
            assert!(
                sql.contains(&format!("g.gap = '{gap}'")),
                "assert_done names {gap}"
            );
        }
    }

    #[test]
    fn the_schema_allows_exactly_the_control_actions_the_engine_records() {
        let sql = MIGRATIONS
            .iter()
            .map(|(_, sql)| *sql)
            .rfind(|sql| sql.contains("CHECK (action IN ("))
            .expect("control_events.action is checked");
        let list = &sql[sql.find("CHECK (action IN (").unwrap() + "CHECK (action IN (".len()..];
        let allowed: Vec<&str> = list[..list.find("))").unwrap()]
            .split(',')
            .map(|t| t.trim().trim_matches('\''))
            .collect();
        let known: Vec<&str> = crate::store::ControlAction::ALL
            .iter()
            .map(|a| a.literal())
            .collect();
        assert_eq!(allowed, known);
    }
}
