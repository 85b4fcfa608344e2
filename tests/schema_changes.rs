//! Schema changes on a running source: every table sink follows `ALTER TABLE` at its place in
//! the stream (old rows included), across a SIGKILL between the change and the batch after
//! it; a change the target cannot take blocks the sink until the operator alters the target;
//! without the event trigger the changes are inferred.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::agent::{eventually, held_back_snapshot, mirror_sink, Agent, AgentSetup};
use common::PgCluster;

/// A merge sink `mirror` (schema `replica`), an SCD2 sink `history` (schema `history`) and a
/// JSONL sink `events`.
fn sinks(warehouse_url: &str, extra: &str) -> String {
    format!(
        "{}{extra}\n[[sink]]\nname = \"history\"\ntype = \"postgres\"\nurl = \"{warehouse_url}\"\n\
         schema = \"history\"\nmode = \"scd2\"\n{extra}\n\
         [[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n",
        mirror_sink(warehouse_url)
    )
}

/// Waits until the merge target and the SCD2 history's current versions hold what the source
/// holds in `columns`.
fn assert_followed(pg: &PgCluster, source: &str, warehouse: &str, columns: &str) {
    let want = pg.dump(source, "public.t", columns);
    let mut mirror = String::new();
    let same = eventually(Duration::from_secs(60), || {
        mirror = pg.dump(warehouse, "replica.t", columns);
        mirror == want
    });
    assert!(same, "mirror differs\nsource:\n{want}\ntarget:\n{mirror}");
    let current = "(SELECT * FROM history.t WHERE is_current) AS current";
    let mut history = String::new();
    let same = eventually(Duration::from_secs(60), || {
        history = pg.dump(warehouse, current, columns);
        history == want
    });
    assert!(
        same,
        "history differs\nsource:\n{want}\ncurrent versions:\n{history}"
    );
}

fn assert_no_dead_letters(setup: &AgentSetup) {
    for sink in ["mirror", "history"] {
        let path = setup.data_dir().join(format!("dead_letters/{sink}.jsonl"));
        let letters = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(letters.is_empty(), "{sink}: {letters}");
    }
}

fn target_columns(pg: &PgCluster, db: &str, schema: &str) -> String {
    pg.psql(
        db,
        &format!(
            "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position) \
             FROM information_schema.columns WHERE table_schema = '{schema}' AND table_name = 't'"
        ),
    )
}

const CREATE_TABLE: &str = "CREATE TABLE t (id int PRIMARY KEY, a text, n int, v varchar(10), \
                            p numeric(6,2), at timestamp, c text)";

const INSERT_ROWS: &str = "INSERT INTO t SELECT i, 'a' || i, i, 'v' || i, i + 0.25, \
     '2026-03-29 00:30'::timestamp + i * interval '17 minutes', 'c' || i \
     FROM generate_series(1, 50) i";

/// Starts an agent with [`sinks`] on table `t` of a new database and waits until its 50 rows
/// are in every table sink. Returns the source and target databases.
fn start_followed(pg: &PgCluster, extra: &str) -> (String, String, AgentSetup, Agent) {
    let db = pg.fresh_database("shop");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, CREATE_TABLE);
    let setup = AgentSetup::with_sinks(
        &pg.url(&db),
        "\"public.t\"",
        &sinks(&pg.url(&warehouse), extra),
    );
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(&db, INSERT_ROWS);
    assert_followed(pg, &db, &warehouse, "id, a, n, v, p, at, c");
    (db, warehouse, setup, agent)
}

#[test]
fn each_column_change_reaches_every_sink_at_its_place_in_the_stream() {
    let pg = PgCluster::start();
    let (db, warehouse, setup, agent) = start_followed(&pg, "");

    pg.psql(
        &db,
        "ALTER TABLE t ADD COLUMN d text DEFAULT 'x';
         ALTER TABLE t ADD COLUMN e int NOT NULL DEFAULT 7;
         SET DateStyle = 'SQL, DMY';
         ALTER TABLE t ADD COLUMN f timestamptz DEFAULT now();
         RESET DateStyle;
         ALTER TABLE t RENAME COLUMN a TO b;
         ALTER TABLE t ALTER COLUMN n TYPE bigint, ALTER COLUMN v TYPE text;
         ALTER TABLE t ALTER COLUMN p TYPE numeric(12,4);
         SET TimeZone = 'America/New_York';
         ALTER TABLE t ALTER COLUMN at TYPE timestamptz;
         RESET TimeZone;
         ALTER TABLE t DROP COLUMN c;",
    );
    // Old rows that are never written again carry the new shape too.
    assert_followed(&pg, &db, &warehouse, "id, b, n, v, p, at, d, e, f");

    // Values only the new types hold, and changes on both sides of a change in one
    // transaction.
    pg.psql(
        &db,
        "UPDATE t SET n = 5000000000, v = repeat('y', 30), p = 12345678.1234 WHERE id <= 5;
         INSERT INTO t (id, b, n, v, p, at) VALUES (51, 'new', 6000000000, 'long value here', 1.2345, now());
         BEGIN;
           UPDATE t SET b = 'before' WHERE id = 10;
           INSERT INTO t (id, b, n) VALUES (60, 'inserted before', 1);
           ALTER TABLE t ADD COLUMN g int DEFAULT 3;
           ALTER TABLE t RENAME COLUMN b TO label;
           UPDATE t SET label = label || ' and after', g = 4 WHERE id IN (10, 11);
         COMMIT;",
    );
    assert_followed(&pg, &db, &warehouse, "id, label, n, v, p, at, d, e, f, g");

    // The mirror keeps the dropped column (dropped_columns = "keep"), with the types widened.
    assert_eq!(
        target_columns(&pg, &warehouse, "replica"),
        "id integer, label text, n bigint, v text, p numeric, at timestamp with time zone, \
         c text, d text, e integer, f timestamp with time zone, g integer"
    );
    let kept = pg.psql(&warehouse, "SELECT c FROM replica.t WHERE id = 1");
    assert_eq!(kept, "c1");
    assert_no_dead_letters(&setup);
    // Every change was read from the trigger's messages, none inferred.
    let log = agent.log();
    assert!(!log.contains("schema change inferred"), "{log}");
    assert!(!log.contains("inferred=true"), "{log}");

    // The envelopes follow the new shape.
    let last = setup
        .envelopes()
        .into_iter()
        .rev()
        .find(|e| e["after"]["id"] == 11)
        .expect("an envelope of row 11");
    let after = last["after"].as_object().unwrap();
    let names: Vec<&str> = after.keys().map(String::as_str).collect();
    for name in ["label", "d", "e", "g"] {
        assert!(names.contains(&name), "{names:?}");
    }
    for gone in ["a", "b", "c"] {
        assert!(!names.contains(&gone), "{names:?}");
    }
    assert!(agent.terminate().success());
}

#[test]
fn a_schema_change_survives_a_sigkill_before_the_batch_after_it() {
    let pg = PgCluster::start();
    let (db, warehouse, setup, agent) = start_followed(&pg, "");

    // Both table sinks are held back by locks on their target tables, so the schema change is
    // in the offset log, and neither has applied it, when the agent is killed.
    let locks = pg.lock_tables(&warehouse, &["replica.t", "history.t"]);
    pg.psql(
        &db,
        "ALTER TABLE t ADD COLUMN d int NOT NULL DEFAULT 7;
         ALTER TABLE t ADD COLUMN x text DEFAULT 'x';
         ALTER TABLE t RENAME COLUMN a TO b;
         ALTER TABLE t ALTER COLUMN n TYPE bigint;
         ALTER TABLE t ALTER COLUMN v TYPE text;
         ALTER TABLE t ALTER COLUMN p TYPE numeric(12,4);
         ALTER TABLE t DROP COLUMN c;
         UPDATE t SET b = 'renamed', n = 7000000000, v = repeat('v', 20), p = 1234567.8912
           WHERE id = 3;",
    );
    let waiting = eventually(Duration::from_secs(60), || {
        pg.psql(
            &warehouse,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
        ) == "2"
    });
    assert!(
        waiting,
        "both sinks should wait on the locks\n{}",
        agent.log()
    );
    agent.kill();
    locks.release();
    pg.psql(
        &db,
        "UPDATE t SET b = b || '!', d = 8 WHERE id BETWEEN 10 AND 12",
    );

    let agent = setup.start();
    assert_followed(&pg, &db, &warehouse, "id, b, n, v, p, at, d, x");
    assert_no_dead_letters(&setup);
    assert!(agent.terminate().success());
}

#[test]
fn a_migration_in_a_transaction_larger_than_a_batch_is_followed() {
    let pg = PgCluster::start();
    let (db, warehouse, setup, agent) = start_followed(&pg, "batch_max_rows = 20\n");

    // A backfill: rows changed before and after the columns change, many batches' worth.
    pg.psql(
        &db,
        "BEGIN;
           UPDATE t SET a = a || '-before' WHERE id <= 30;
           ALTER TABLE t ADD COLUMN score int DEFAULT 0;
           ALTER TABLE t RENAME COLUMN a TO label;
           UPDATE t SET score = id * 2 WHERE id > 10;
           INSERT INTO t (id, label) SELECT i, 'late ' || i FROM generate_series(100, 140) i;
         COMMIT;",
    );
    assert_followed(&pg, &db, &warehouse, "id, label, n, v, p, at, c, score");
    assert_no_dead_letters(&setup);
    assert!(agent.terminate().success());
}

#[test]
fn a_column_added_while_the_initial_snapshot_runs_is_followed() {
    let pg = PgCluster::start();
    // The sink is held back, so the log fills and the snapshot pauses: the ALTER TABLE
    // commits while the snapshot is still being logged.
    let (db, warehouse, locks, setup) = held_back_snapshot(&pg);
    let mut agent = setup.start();
    agent.wait_log("capture paused", Duration::from_secs(60));
    // psql may wait for a snapshot reader's COPY to end, which waits for the sink.
    std::thread::scope(|scope| {
        let alter = scope.spawn(|| {
            pg.psql(
                &db,
                "ALTER TABLE t ADD COLUMN d int DEFAULT 5; UPDATE t SET d = 6 WHERE id = 1",
            )
        });
        // Committed, or waiting for the snapshot's reader: either way while the snapshot is
        // still being logged.
        let under_way = eventually(Duration::from_secs(30), || {
            alter.is_finished()
                || pg.psql(
                    &db,
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND datname = current_database()",
                ) == "1"
        });
        assert!(under_way, "the ALTER TABLE neither ran nor waited");
        locks.release();
        alter.join().expect("the ALTER TABLE")
    });
    let want = pg.dump(&db, "public.t", "id, v, d");
    let mut got = String::new();
    let same = eventually(Duration::from_secs(120), || {
        got = pg.dump(&warehouse, "replica.t", "id, v, d");
        got == want
    });
    assert!(
        same,
        "the mirror differs (first lines: {:?})\n{}",
        got.lines().take(3).collect::<Vec<_>>(),
        agent.log()
    );
    assert!(agent.terminate().success());
}

#[test]
fn a_narrowing_change_blocks_the_sink_until_the_target_column_is_altered() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("shop");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, p numeric(12,4))");
    let sink = mirror_sink(&pg.url(&warehouse));
    let setup = AgentSetup::with_sinks(&pg.url(&db), "\"public.t\"", &sink);
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO t SELECT i, i + 0.5 FROM generate_series(1, 10) i",
    );
    let want = pg.dump(&db, "public.t", "*");
    assert!(eventually(Duration::from_secs(60), || pg.dump(
        &warehouse,
        "replica.t",
        "*"
    ) == want));

    pg.psql(
        &db,
        "ALTER TABLE t ALTER COLUMN p TYPE numeric(6,2); UPDATE t SET p = 99.99 WHERE id = 1",
    );
    agent.wait_log("cannot take without losing values", Duration::from_secs(60));
    let log = agent.log();
    assert!(
        log.contains(
            "ALTER TABLE \\\"replica\\\".\\\"t\\\" ALTER COLUMN \\\"p\\\" TYPE numeric(6,2)"
        ) || log.contains("ALTER TABLE \"replica\".\"t\" ALTER COLUMN \"p\" TYPE numeric(6,2)"),
        "the error names the fix\n{log}"
    );
    // Blocked, not dead-lettered row by row: the target keeps the last state before it.
    assert_eq!(
        pg.psql(&warehouse, "SELECT p FROM replica.t WHERE id = 1"),
        "1.5000"
    );
    assert!(!setup.data_dir().join("dead_letters/mirror.jsonl").exists());

    // The operator decides, alters the target column, and the sink goes on by itself.
    pg.psql(
        &warehouse,
        "ALTER TABLE replica.t ALTER COLUMN p TYPE numeric(6,2)",
    );
    let want = pg.dump(&db, "public.t", "*");
    let caught_up = eventually(Duration::from_secs(90), || {
        pg.dump(&warehouse, "replica.t", "*") == want
    });
    assert!(caught_up, "{}", agent.log());
    assert!(agent.terminate().success());
}

#[test]
fn without_the_trigger_changes_are_inferred_from_the_stream() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("shop");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        &format!(
            "CREATE ROLE capture LOGIN REPLICATION PASSWORD 'secret';
             GRANT CREATE ON DATABASE \"{db}\" TO capture;
             CREATE TABLE t (id int PRIMARY KEY, a text, n int);
             ALTER TABLE t OWNER TO capture;"
        ),
    );
    let source = pg.url_as("capture", "secret", &db);
    let setup = AgentSetup::with_sinks(&source, "\"public.t\"", &sinks(&pg.url(&warehouse), ""));
    let check = setup.command("check");
    let printed = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        printed.contains("warn  schema changes: the role may not create the event trigger"),
        "{printed}"
    );
    assert!(check.status.success(), "{printed}");
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO t SELECT i, 'a' || i, i FROM generate_series(1, 20) i",
    );
    assert_followed(&pg, &db, &warehouse, "id, a, n");

    // Known when the table next changes: the value existing rows hold is read then.
    pg.psql(
        &db,
        "ALTER TABLE t ALTER COLUMN n TYPE bigint;
         ALTER TABLE t ADD COLUMN d text DEFAULT 'x';
         UPDATE t SET n = 9000000000 WHERE id = 1;",
    );
    assert_followed(&pg, &db, &warehouse, "id, a, n, d");
    agent.wait_log("schema change inferred", Duration::from_secs(10));
    assert!(agent.terminate().success());
}
