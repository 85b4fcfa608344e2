//! The failure catalogue against real servers: each failure gives a clear error, a non-zero
//! exit where it is fatal, retries where it is transient, and loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::agent::{eventually, mirror_sink, AgentSetup};
use common::PgCluster;

#[test]
fn a_read_only_target_is_retried_and_nothing_is_lost() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("src");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v int)");
    let setup = AgentSetup::with_sinks(
        &pg.url(&db),
        "\"public.t\"",
        &mirror_sink(&pg.url(&warehouse)),
    );
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(&db, "INSERT INTO t VALUES (1, 1)");
    let rows = || pg.try_psql(&warehouse, "SELECT count(*) FROM replica.t");
    assert!(eventually(Duration::from_secs(30), || rows().as_deref() == Some("1")));

    // What a standby or a full disk looks like to a writer: every write refused.
    pg.psql(
        "postgres",
        &format!("ALTER DATABASE {warehouse} SET default_transaction_read_only = on"),
    );
    pg.psql(
        "postgres",
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{warehouse}'"
        ),
    );
    pg.psql(
        &db,
        "INSERT INTO t SELECT g, g FROM generate_series(2, 50) g",
    );
    agent.wait_log("read-only transaction", Duration::from_secs(20));
    assert!(agent.is_running(), "{}", agent.log());

    pg.psql(
        "postgres",
        &format!("ALTER DATABASE {warehouse} RESET default_transaction_read_only"),
    );
    let want = pg.dump(&db, "public.t", "*");
    assert!(
        eventually(Duration::from_secs(90), || pg.dump(
            &warehouse,
            "replica.t",
            "*"
        ) == want),
        "{}",
        agent.log()
    );
    assert!(agent.terminate().success());
}

#[test]
fn a_second_agent_on_the_same_data_dir_is_refused() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("src");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY)");
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.t\"");
    let mut first = setup.start();
    first.wait_streaming();
    let second = setup.command("run");
    let error = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{error}");
    assert!(
        error.contains("is in use by another tidemark process"),
        "{error}"
    );
    assert!(first.is_running(), "{}", first.log());
    assert!(first.terminate().success());
}

#[test]
fn a_data_dir_that_cannot_be_used_is_named() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("src");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY)");
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.t\"");
    // A file where the directory should be (root ignores permissions, so this is the case
    // that fails for every user).
    let config = std::fs::read_to_string(&setup.config).unwrap();
    let blocker = setup.config.with_file_name("blocker");
    std::fs::write(&blocker, "not a directory").unwrap();
    std::fs::write(
        &setup.config,
        config.replace("data_dir = \"data\"", "data_dir = \"blocker/data\""),
    )
    .unwrap();
    let output = setup.command("run");
    let error = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{error}");
    assert!(error.contains("cannot use data_dir"), "{error}");
    assert!(error.contains("blocker/data"), "{error}");
    assert!(!error.contains("panicked"), "{error}");
}

#[test]
fn a_log_that_lost_records_stops_the_agent_with_how_to_recover() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("src");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v int)");
    let setup = AgentSetup::with_sinks(
        &pg.url(&db),
        "\"public.t\"",
        &mirror_sink(&pg.url(&warehouse)),
    );
    let rows = || pg.try_psql(&warehouse, "SELECT count(*) FROM replica.t");
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(&db, "INSERT INTO t VALUES (1, 1)");
    assert!(eventually(Duration::from_secs(30), || rows().as_deref() == Some("1")));
    assert!(agent.terminate().success());
    // An older copy of the log, as a restore from backup (or a damaged file) leaves it.
    let older = copy_data_dir(&setup);

    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO t SELECT g, g FROM generate_series(2, 100) g",
    );
    assert!(eventually(Duration::from_secs(30), || rows().as_deref() == Some("100")));
    assert!(agent.terminate().success());

    restore_data_dir(&setup, &older);
    let output = setup.command("run");
    let error = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{error}");
    // The sink (its checkpoint is past the log) and the source (its slot is confirmed past
    // the log) start at once, and either may find the loss first; each says what to do.
    let by_sink =
        error.contains("is damaged") && error.contains("sink \"mirror\" has applied records up to");
    let by_source = error.contains("the log lost transactions it once held");
    assert!(by_sink || by_source, "{error}");
    assert!(
        error.to_lowercase().contains("move agent.data_dir aside"),
        "{error}"
    );
}

#[test]
fn sigterm_during_a_batch_exits_0_and_loses_nothing() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("src");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)");
    let setup = AgentSetup::with_sinks(
        &pg.url(&db),
        "\"public.t\"",
        &mirror_sink(&pg.url(&warehouse)),
    );
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 100000) g",
    );
    // Stop while the merge sink is still working through the transaction.
    let rows = || {
        pg.try_psql(&warehouse, "SELECT count(*) FROM replica.t")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        eventually(Duration::from_secs(60), || rows() > 0),
        "{}",
        agent.log()
    );
    assert!(agent.terminate().success());
    let mut agent = setup.start();
    agent.wait_streaming();
    let want = pg.dump(&db, "public.t", "*");
    assert!(
        eventually(Duration::from_secs(90), || pg.dump(
            &warehouse,
            "replica.t",
            "*"
        ) == want),
        "{}",
        agent.log()
    );
    assert!(agent.terminate().success());
}

#[test]
fn a_data_dir_moved_aside_is_recovered_by_a_snapshot_that_replaces_the_targets() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("src");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v int); \
         INSERT INTO t SELECT g, g FROM generate_series(1, 100) g",
    );
    let setup = AgentSetup::with_sinks(
        &pg.url(&db),
        "\"public.t\"",
        &mirror_sink(&pg.url(&warehouse)),
    );
    let config = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("snapshot = \"never\"", "snapshot = \"initial\"");
    std::fs::write(&setup.config, config).unwrap();
    let mirrored = || pg.dump(&warehouse, "replica.t", "*") == pg.dump(&db, "public.t", "*");
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(&db, "INSERT INTO t VALUES (101, 101)");
    assert!(
        eventually(Duration::from_secs(30), mirrored),
        "{}",
        agent.log()
    );
    assert!(agent.terminate().success());

    // The operator's recovery: the data_dir goes; meanwhile the source changed.
    std::fs::rename(setup.data_dir(), setup.config.with_file_name("aside")).unwrap();
    pg.psql(
        &db,
        "DELETE FROM t WHERE id <= 10; INSERT INTO t VALUES (200, 200); \
         UPDATE t SET v = -v WHERE id = 50",
    );
    let mut agent = setup.start();
    agent.wait_streaming();
    assert!(
        eventually(Duration::from_secs(30), mirrored),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert!(log.contains("dropping the slot to snapshot again"), "{log}");
    assert!(log.contains("belongs to another offset log"), "{log}");
    assert!(agent.terminate().success());
}

/// Bytes of the log overwritten on disk (a bad sector, a stray write): the agent refuses to
/// start and says how to recover, whether the log reports the damage or takes it for a torn
/// tail and drops what follows (then the slot, confirmed further than the log reaches, shows
/// it). The log stays where it is for inspection.
#[test]
fn a_corrupt_log_file_is_refused_with_how_to_recover() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("src");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)");
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.t\"");
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g",
    );
    assert!(eventually(Duration::from_secs(60), || setup
        .envelopes()
        .len()
        == 20000));
    assert!(agent.terminate().success());

    let db_file = setup
        .data_dir()
        .join("records")
        .join("00000000000000000001.seg");
    let mut bytes = std::fs::read(&db_file).unwrap();
    for byte in &mut bytes[64 * 1024..] {
        *byte = !*byte;
    }
    std::fs::write(&db_file, &bytes).unwrap();

    let (code, error) = run_for_at_most(&setup, Duration::from_secs(60));
    assert_eq!(code, Some(1), "{error}");
    assert!(!error.contains("panicked"), "{error}");
    assert!(
        error.to_lowercase().contains("move agent.data_dir aside"),
        "{error}"
    );
    assert!(db_file.exists());
}

/// A log restored from an older copy while no sink had applied past its end: the slot,
/// confirmed further than the log reaches, stops the agent before it skips anything.
#[test]
fn a_log_older_than_the_slot_stops_the_agent_with_how_to_recover() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("src");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY)");
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.t\"");
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(&db, "INSERT INTO t VALUES (1)");
    assert!(eventually(Duration::from_secs(30), || setup
        .envelopes()
        .len()
        == 1));
    assert!(agent.terminate().success());
    let older = copy_data_dir(&setup);

    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(&db, "INSERT INTO t VALUES (2)");
    assert!(eventually(Duration::from_secs(30), || setup
        .envelopes()
        .len()
        == 2));
    assert!(agent.terminate().success());

    restore_data_dir(&setup, &older);
    let (code, error) = run_for_at_most(&setup, Duration::from_secs(60));
    assert_eq!(code, Some(1), "{error}");
    assert!(
        error.contains("the log lost transactions it once held"),
        "{error}"
    );
    assert!(
        error.contains("pg_drop_replication_slot('tidemark_test')"),
        "{error}"
    );

    // Started over: an idle stream confirms keepalive positions past its last commit (WAL
    // of tables it does not capture), and that alone is no loss.
    pg.psql(
        &db,
        "SELECT pg_drop_replication_slot('tidemark_test'); CREATE TABLE other (n int); \
         ALTER SYSTEM SET wal_sender_timeout = '1s'; SELECT pg_reload_conf();",
    );
    std::fs::remove_dir_all(setup.data_dir()).unwrap();
    let mut agent = setup.start();
    agent.wait_streaming();
    let confirmed = || {
        pg.psql(
            &db,
            "SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots",
        )
        .parse::<u64>()
        .unwrap()
    };
    let created_at = confirmed();
    let moved_on = eventually(Duration::from_secs(30), || {
        pg.psql(&db, "INSERT INTO other VALUES (1)");
        confirmed() > created_at
    });
    assert!(moved_on, "{}", agent.log());
    assert!(agent.terminate().success());
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(&db, "INSERT INTO t VALUES (3)");
    assert!(eventually(Duration::from_secs(30), || setup
        .envelopes()
        .iter()
        .any(|e| e["after"]["id"] == 3)));
    assert!(agent.terminate().success());
}

/// Runs the agent until it exits, or kills it after `limit`: exit code and stderr.
fn run_for_at_most(setup: &AgentSetup, limit: Duration) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(common::agent::binary())
        .args(["run", "-c"])
        .arg(&setup.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = eventually(limit, || child.try_wait().unwrap().is_some());
    if !exited {
        child.kill().unwrap();
    }
    let output = child.wait_with_output().unwrap();
    let error = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(exited, "the agent did not stop within {limit:?}:\n{error}");
    (output.status.code(), error)
}

/// A copy of the agent's data_dir as it is now, as a backup would keep it.
fn copy_data_dir(setup: &AgentSetup) -> std::path::PathBuf {
    let older = setup.config.with_file_name("older");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(setup.data_dir())
        .arg(&older)
        .status()
        .unwrap();
    assert!(copied.success());
    older
}

/// Puts the copy back in place of the data_dir, as a restore from that backup would.
fn restore_data_dir(setup: &AgentSetup, older: &std::path::Path) {
    std::fs::remove_dir_all(setup.data_dir()).unwrap();
    std::fs::rename(older, setup.data_dir()).unwrap();
}

/// A value the target's column type cannot hold (a MySQL TIME of 838 hours for a `time`)
/// fails in the COPY that stages the batch, before any statement runs: row by row, the merge
/// and the history sink dead-letter that row with the target's error and apply every other
/// row of the batch, where the new rows of a first batch and the updates of a second are
/// both refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_target_type_cannot_hold_is_dead_lettered_and_the_rest_applied() {
    use tidemark::config::{ColumnNaming, DroppedColumns, PostgresSinkConfig, SinkMode};
    use tidemark::event::{
        ChangeEvent, Column, Op, Position, Record, Relation, TxBegin, TxCommit, TxOrigin, Value,
        ValueType,
    };
    use tidemark::log::OffsetLog;
    use tidemark::sinks::postgres::PostgresSink;
    use tidemark::sinks::Sink;

    const HOUR: i64 = 3_600_000_000;
    let pg = PgCluster::start();
    let warehouse = pg.fresh_database("warehouse");
    let dir = tempfile::tempdir().unwrap();
    let log = OffsetLog::open(dir.path()).unwrap();
    let mut writer = log.writer().unwrap();
    let (relation, _) = writer
        .relation(Relation {
            oid: 1,
            schema: "public".into(),
            table: "t".into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                    type_name: "bigint".into(),
                    value_type: ValueType::Int8,
                    primary_key: true,
                    replica_identity: true,
                },
                Column {
                    name: "at".into(),
                    type_oid: 1083,
                    type_modifier: 6,
                    type_name: "time(6) without time zone".into(),
                    value_type: ValueType::Time,
                    primary_key: false,
                    replica_identity: false,
                },
            ],
        })
        .unwrap();
    let row = |id: i64, micros: i64| Some(vec![Value::Int(id), Value::Time(micros)]);
    for (lsn, changes) in [
        (
            200,
            vec![
                (Op::Insert, row(1, 12 * HOUR)),
                (Op::Insert, row(2, 838 * HOUR)),
                (Op::Insert, row(3, 13 * HOUR)),
            ],
        ),
        (
            300,
            vec![
                (Op::Update, row(1, 14 * HOUR)),
                (Op::Update, row(3, -HOUR / 2)),
            ],
        ),
    ] {
        writer
            .append(&Record::Begin(TxBegin {
                origin: TxOrigin::Postgres { xid: lsn as u32 },
                commit_position: Position(lsn),
                commit_ts: 0,
            }))
            .unwrap();
        for (op, after) in changes {
            writer
                .append(&Record::Change(ChangeEvent {
                    relation,
                    position: Position(lsn - 50),
                    op,
                    before: None,
                    after,
                }))
                .unwrap();
        }
        writer
            .append(&Record::Commit(TxCommit {
                commit_position: Position(lsn),
                end_position: Position(lsn + 8),
                commit_ts: 0,
            }))
            .unwrap();
    }
    log.flush().await.unwrap();
    let entries = log.read(0, 1000).unwrap();
    let first_end = 1 + entries
        .iter()
        .position(|e| matches!(e.record, Record::Commit(_)))
        .unwrap();

    // (sink, mode, the target's rows after both batches)
    let sinks = [
        ("mirror", SinkMode::Merge, "1 14:00:00, 3 13:00:00"),
        (
            "history",
            SinkMode::Scd2,
            "1 12:00:00 false, 1 14:00:00 true, 3 13:00:00 true",
        ),
    ];
    for (name, mode, expected) in sinks {
        let config = PostgresSinkConfig {
            url: pg.url(&warehouse).parse().unwrap(),
            schema: name.into(),
            mode,
            soft_delete: false,
            columns: ColumnNaming::Tidemark,
            history_deletes: false,
            dropped_columns: DroppedColumns::Keep,
            tables: vec![],
        };
        let mut sink = PostgresSink::new(name, &config, log.clone(), dir.path()).unwrap();
        assert_eq!(sink.open().await.unwrap(), 0);
        for batch in [&entries[..first_end], &entries[first_end..]] {
            let refused = sink
                .apply(batch)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(refused.get("public.t"), Some(&1), "{name}");
        }
        let rows = pg.psql(
            &warehouse,
            &match mode {
                SinkMode::Merge => {
                    format!("SELECT string_agg(id || ' ' || at, ', ' ORDER BY id) FROM {name}.t")
                }
                _ => format!(
                    "SELECT string_agg(id || ' ' || at || ' ' || is_current, ', ' \
                     ORDER BY id, _tidemark_lsn) FROM {name}.t"
                ),
            },
        );
        assert_eq!(rows, expected, "{name}");
        let letters: Vec<serde_json::Value> =
            std::fs::read_to_string(dir.path().join(format!("dead_letters/{name}.jsonl")))
                .unwrap()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect();
        let refused: Vec<(&serde_json::Value, &serde_json::Value)> = letters
            .iter()
            .map(|letter| (&letter["row"]["id"], &letter["row"]["at"]))
            .collect();
        assert_eq!(
            refused,
            [
                (&serde_json::json!(2), &serde_json::json!(838 * HOUR)),
                (&serde_json::json!(3), &serde_json::json!(-HOUR / 2)),
            ],
            "{name}: {letters:?}"
        );
        for letter in &letters {
            let reason = letter["reason"].as_str().unwrap_or_default();
            assert!(
                reason.contains(&format!("staging changes for {name}.t"))
                    && reason.contains("SQLSTATE 22"),
                "{name}: {reason}"
            );
        }
    }
}
