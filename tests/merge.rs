//! The merge sink against real PostgreSQL: the target mirrors the source row for row.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::agent::{eventually, mirror_sink, AgentSetup};
use common::PgCluster;

fn merge_sink(pg: &PgCluster, warehouse: &str, extra: &str) -> String {
    format!("{}{extra}", mirror_sink(&pg.url(warehouse)))
}

/// Starts an agent with a merge sink into `warehouse` and waits until it streams.
fn start_merge(
    pg: &PgCluster,
    db: &str,
    warehouse: &str,
    tables: &str,
    extra: &str,
) -> (AgentSetup, common::agent::Agent) {
    let setup = AgentSetup::with_sinks(&pg.url(db), tables, &merge_sink(pg, warehouse, extra));
    let mut agent = setup.start();
    agent.wait_streaming();
    (setup, agent)
}

/// Waits until every listed table's dump in the target equals the source's.
fn assert_mirrors(pg: &PgCluster, source: &str, target: &str, tables: &[(&str, &str)]) {
    for (table, columns) in tables {
        let want = pg.dump(source, &format!("public.\"{table}\""), columns);
        let mut got = String::new();
        let same = eventually(Duration::from_secs(60), || {
            got = pg.dump(target, &format!("replica.\"{table}\""), columns);
            got == want
        });
        assert!(same, "{table} differs\nsource:\n{want}\ntarget:\n{got}");
    }
}

#[test]
fn merge_target_mirrors_every_kind_of_change() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("shop");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE TYPE mood AS ENUM ('ok', 'sad');
         CREATE TABLE \"Items\" (id int PRIMARY KEY, name text, price numeric(40,8), doc jsonb,
           tags text[], seen timestamptz, day date, span interval, raw bytea, m mood,
           ratio double precision, flag boolean, u uuid, at time);
         CREATE TABLE pairs (a int, b text, v int, PRIMARY KEY (a, b));",
    );
    let (_setup, agent) = start_merge(&pg, &db, &warehouse, "\"public.*\"", "");
    pg.psql(
        &db,
        "INSERT INTO \"Items\" VALUES
           (1, 'añejo ☃ \t tab', 123456789012345678901234567890.12345678, '{\"a\": [1, 2]}',
            '{x,\"y z\",NULL,\"\"}', '2024-01-05 12:34:56.5+00', '0044-03-15 BC', '-1 mon 2 days -00:00:03.5',
            '\\x00ff5c', 'sad', 0.1, true, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '23:59:59.999999'),
           (2, NULL, 'NaN', NULL, '{}', 'infinity', '-infinity', NULL, NULL, NULL, 'NaN', NULL, NULL, NULL);
         UPDATE \"Items\" SET name = 'two' WHERE id = 2;
         INSERT INTO \"Items\" (id, name) VALUES (3, 'three');
         DELETE FROM \"Items\" WHERE id = 3;
         UPDATE \"Items\" SET id = 10 WHERE id = 1;
         BEGIN; INSERT INTO \"Items\" (id) VALUES (99); ROLLBACK;
         INSERT INTO pairs VALUES (1, 'x', 10), (1, 'y', 20), (2, 'x', 30);
         BEGIN; UPDATE pairs SET v = v + 1; DELETE FROM pairs WHERE b = 'y'; UPDATE pairs SET b = 'z' WHERE a = 2; COMMIT;",
    );
    assert_mirrors(&pg, &db, &warehouse, &[("Items", "*"), ("pairs", "*")]);
    pg.psql(
        &db,
        "TRUNCATE pairs; INSERT INTO pairs VALUES (7, 'after', 1);",
    );
    assert_mirrors(&pg, &db, &warehouse, &[("pairs", "*")]);
    let types = pg.psql(
        &warehouse,
        "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position)
         FROM information_schema.columns WHERE table_schema = 'replica' AND table_name = 'Items'",
    );
    assert!(
        types.contains("price numeric") && types.contains("tags ARRAY") && types.contains("m text"),
        "{types}"
    );
    assert!(agent.terminate().success());
}

#[test]
fn unchanged_toast_column_keeps_the_target_value() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("toast");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE TABLE docs (id int PRIMARY KEY, rev int, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;",
    );
    let (_setup, agent) = start_merge(&pg, &db, &warehouse, "\"public.docs\"", "");
    pg.psql(
        &db,
        "INSERT INTO docs VALUES (1, 0, repeat('abcdefgh', 100000)), (2, 0, 'short')",
    );
    assert_mirrors(&pg, &db, &warehouse, &[("docs", "id, rev, md5(body)")]);
    // Separate transactions, so the update's unchanged value is not in the same batch.
    std::thread::sleep(Duration::from_millis(500));
    pg.psql(&db, "UPDATE docs SET rev = rev + 1");
    pg.psql(&db, "BEGIN; UPDATE docs SET rev = rev + 1 WHERE id = 1; UPDATE docs SET rev = rev + 1 WHERE id = 1; COMMIT;");
    assert_mirrors(&pg, &db, &warehouse, &[("docs", "id, rev, md5(body)")]);
    // A key update that leaves the TOASTed value alone: the value moves with the row.
    pg.psql(&db, "UPDATE docs SET id = 3 WHERE id = 1");
    pg.psql(&db, "BEGIN; UPDATE docs SET id = 4 WHERE id = 3; UPDATE docs SET id = 5, rev = 9 WHERE id = 4; COMMIT;");
    assert_mirrors(&pg, &db, &warehouse, &[("docs", "id, rev, md5(body)")]);
    let placeholder = pg.psql(
        &warehouse,
        "SELECT count(*) FROM replica.docs WHERE body LIKE '%unavailable%' OR body IS NULL",
    );
    assert_eq!(placeholder, "0");
    assert!(agent.terminate().success());
}

#[test]
fn soft_delete_keeps_the_row_and_a_reinsert_clears_the_flag() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("soft");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)");
    let (_setup, agent) = start_merge(&pg, &db, &warehouse, "\"public.t\"", "soft_delete = true\n");
    pg.psql(
        &db,
        "INSERT INTO t VALUES (1, 'a'), (2, 'b'); DELETE FROM t WHERE id = 1;",
    );
    let flags = || {
        pg.try_psql(&warehouse, "SELECT string_agg(id || ':' || v || ':' || _tidemark_deleted, ' ' ORDER BY id) FROM replica.t")
            .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(30), || flags() == "1:a:true 2:b:false"),
        "{}",
        flags()
    );
    pg.psql(&db, "INSERT INTO t VALUES (1, 'again')");
    assert!(
        eventually(Duration::from_secs(30), || flags()
            == "1:again:false 2:b:false"),
        "{}",
        flags()
    );
    assert!(agent.terminate().success());
}

#[test]
fn checkpoint_is_written_with_the_batch_and_resumed_from() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("ckpt");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v int)");
    let (setup, agent) = start_merge(&pg, &db, &warehouse, "\"public.t\"", "");
    pg.psql(
        &db,
        "INSERT INTO t SELECT g, g FROM generate_series(1, 100) g",
    );
    assert_mirrors(&pg, &db, &warehouse, &[("t", "*")]);
    let checkpoint = pg.psql(
        &warehouse,
        "SELECT sink, log_position > 0, source_lsn > '0/0' FROM replica._tidemark_checkpoint",
    );
    assert_eq!(checkpoint, "mirror|t|t");
    agent.kill();
    // Changes while the agent is down arrive after the restart, once.
    pg.psql(&db, "UPDATE t SET v = v + 1; DELETE FROM t WHERE id > 90;");
    let mut agent = setup.start();
    agent.wait_streaming();
    assert_mirrors(&pg, &db, &warehouse, &[("t", "*")]);
    assert!(agent.terminate().success());
}

#[test]
fn a_target_that_is_down_at_start_catches_up_when_it_returns() {
    let source = PgCluster::start();
    let target = PgCluster::start();
    let db = source.fresh_database("src");
    let warehouse = target.fresh_database("warehouse");
    source.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v int)");
    target.stop();
    let sink = mirror_sink(&target.url(&warehouse));
    let setup = AgentSetup::with_sinks(&source.url(&db), "\"public.t\"", &sink);
    let mut agent = setup.start();
    agent.wait_streaming();
    source.psql(
        &db,
        "INSERT INTO t SELECT g, g FROM generate_series(1, 50) g",
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent.is_running(), "{}", agent.log());
    assert!(
        agent.log().contains("sink cannot start; retrying"),
        "{}",
        agent.log()
    );
    target.start_again();
    let want = source.dump(&db, "public.t", "*");
    let arrived = eventually(Duration::from_secs(60), || {
        target.dump(&warehouse, "replica.t", "*") == want
    });
    assert!(arrived, "{}", agent.log());
    assert!(agent.terminate().success());
}

/// Applying a batch, then any suffix of it again, leaves the target as one application did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_an_applied_suffix_changes_nothing() {
    use tidemark::config::{ColumnNaming, DroppedColumns, PostgresSinkConfig, SinkMode};
    use tidemark::event::{
        ChangeEvent, Column, Op, Position, Record, Relation, TxBegin, TxCommit, TxOrigin, Value,
        ValueType,
    };
    use tidemark::log::OffsetLog;
    use tidemark::sinks::postgres::PostgresSink;
    use tidemark::sinks::Sink;

    let pg = PgCluster::start();
    let warehouse = pg.fresh_database("warehouse");
    let dir = tempfile::tempdir().unwrap();
    let log = OffsetLog::open(dir.path()).unwrap();
    let mut writer = log.writer().unwrap();
    let column = |name: &str, pk: bool| Column {
        name: name.into(),
        type_oid: 20,
        type_modifier: -1,
        type_name: "bigint".into(),
        value_type: ValueType::Int8,
        primary_key: pk,
        replica_identity: pk,
    };
    let (relation, _) = writer
        .relation(Relation {
            oid: 1,
            schema: "public".into(),
            table: "t".into(),
            columns: vec![column("id", true), column("v", false)],
        })
        .unwrap();
    let row = |id: i64, v: i64| Some(vec![Value::Int(id), Value::Int(v)]);
    let mut lsn = 100;
    type Change = (Op, Option<Vec<Value>>, Option<Vec<Value>>);
    let mut tx = |writer: &mut tidemark::log::LogWriter, changes: Vec<Change>| {
        lsn += 100;
        writer
            .append(&Record::Begin(TxBegin {
                origin: TxOrigin::Postgres { xid: lsn as u32 },
                commit_position: Position(lsn),
                commit_ts: 0,
            }))
            .unwrap();
        for (op, before, after) in changes {
            writer
                .append(&Record::Change(ChangeEvent {
                    relation,
                    position: Position(lsn - 50),
                    op,
                    before,
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
    };
    tx(
        &mut writer,
        (1..=5).map(|i| (Op::Insert, None, row(i, i))).collect(),
    );
    tx(
        &mut writer,
        vec![
            (Op::Update, None, row(1, 10)),
            (Op::Delete, row(2, 2), None),
        ],
    );
    tx(
        &mut writer,
        vec![
            (Op::Update, row(3, 3), row(30, 3)),
            (Op::Insert, None, row(2, 20)),
        ],
    );
    tx(
        &mut writer,
        vec![
            (Op::Truncate, None, None),
            (Op::Insert, None, row(7, 7)),
            (Op::Insert, None, row(8, 8)),
        ],
    );
    tx(
        &mut writer,
        vec![
            (Op::Update, None, row(7, 70)),
            (Op::Delete, row(8, 8), None),
        ],
    );
    log.flush().await.unwrap();
    let entries = log.read(0, 1000).unwrap();

    let config = PostgresSinkConfig {
        url: pg.url(&warehouse).parse().unwrap(),
        schema: "replica".into(),
        mode: SinkMode::Merge,
        soft_delete: false,
        columns: ColumnNaming::Tidemark,
        history_deletes: false,
        dropped_columns: DroppedColumns::Keep,
        tables: vec![],
    };
    let target = || {
        pg.psql(
            &warehouse,
            "SELECT string_agg(id || ':' || v, ' ' ORDER BY id) FROM replica.t",
        )
    };
    // Transaction by transaction, as batches; after each, replay every suffix of what was applied.
    let ends: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.record, Record::Commit(_)))
        .map(|(i, _)| i + 1)
        .collect();
    let mut sink = PostgresSink::new("mirror", &config, log.clone(), dir.path()).unwrap();
    let mut start = sink.open().await.unwrap() as usize;
    assert_eq!(start, 0);
    for end in ends {
        sink.apply(&entries[start..end]).await.unwrap();
        let once = target();
        for replay_from in (0..end).filter(|i| matches!(entries[*i].record, Record::Begin(_))) {
            sink.apply(&entries[replay_from..end]).await.unwrap();
            assert_eq!(
                target(),
                once,
                "replaying from record {replay_from} changed the target"
            );
        }
        start = end;
    }
    assert_eq!(target(), "7:70");
    let mut reopened = PostgresSink::new("mirror", &config, log.clone(), dir.path()).unwrap();
    assert_eq!(reopened.open().await.unwrap(), entries.last().unwrap().seq);
}

#[test]
fn a_row_the_target_refuses_is_dead_lettered_and_the_rest_applied() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("dlq");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v int)");
    let (setup, mut agent) = start_merge(&pg, &db, &warehouse, "\"public.t\"", "");
    pg.psql(&db, "INSERT INTO t VALUES (1, 1)");
    assert_mirrors(&pg, &db, &warehouse, &[("t", "*")]);
    // A constraint the target has and the source has not.
    pg.psql(
        &warehouse,
        "ALTER TABLE replica.t ADD CONSTRAINT v_small CHECK (v < 100)",
    );
    pg.psql(
        &db,
        "INSERT INTO t VALUES (2, 5), (3, 500), (4, 7); UPDATE t SET v = 2 WHERE id = 1;",
    );
    let rows = || {
        pg.try_psql(
            &warehouse,
            "SELECT string_agg(id || ':' || v, ' ' ORDER BY id) FROM replica.t",
        )
        .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(30), || rows() == "1:2 2:5 4:7"),
        "{}\n{}",
        rows(),
        agent.log()
    );
    let letter = setup.only_dead_letter("mirror", "v_small");
    assert_eq!(letter["row"], serde_json::json!({"id": 3, "v": 500}));
    assert_eq!(letter["table"], "public.t");
    assert_eq!(letter["action"], "upsert");
    // The sink goes on applying.
    pg.psql(&db, "INSERT INTO t VALUES (5, 9)");
    assert!(
        eventually(Duration::from_secs(30), || rows() == "1:2 2:5 4:7 5:9"),
        "{}",
        rows()
    );
    assert!(agent.is_running());
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_target_equals_the_source_after_sigkills_under_a_random_workload() {
    use common::workload;
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let pg = PgCluster::start();
    let db = pg.fresh_database("random");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, workload::SCHEMA);
    // Small batches, so the 2,000-statement transactions are applied in chunks.
    let setup = AgentSetup::with_sinks(
        &pg.url(&db),
        "\"public.*\"",
        &merge_sink(&pg, &warehouse, "batch_max_rows = 500\n"),
    );
    let mut agent = Some(setup.start());
    tokio::task::block_in_place(|| agent.as_mut().unwrap().wait_streaming());

    let kills_done = std::sync::Arc::new(AtomicUsize::new(0));
    let workload = tokio::spawn({
        let kills_done = kills_done.clone();
        let client = pg.connect(&db).await;
        async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(0x3e4e);
            let mut transactions = 0;
            while transactions < 3_000 || kills_done.load(Ordering::SeqCst) < 4 {
                if transactions % 500 == 250 {
                    workload::large_transaction(&client, &mut rng, 2_000).await;
                } else {
                    workload::random_transaction(&client, &mut rng).await;
                }
                transactions += 1;
            }
        }
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xdead);
    let mut kills = 0;
    while !workload.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..700))).await;
        agent.take().unwrap().kill();
        kills += 1;
        kills_done.store(kills, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
        let mut restarted = setup.start();
        tokio::task::block_in_place(|| restarted.wait_streaming());
        agent = Some(restarted);
    }
    workload.await.unwrap();
    assert!(kills >= 4);
    tokio::task::block_in_place(|| {
        let tables: Vec<(&str, &str)> = workload::TABLES.to_vec();
        assert_mirrors(&pg, &db, &warehouse, &tables);
    });
    assert!(agent.unwrap().terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_of_the_target_never_sees_half_a_transaction() {
    use rand::{Rng, SeedableRng};

    let pg = PgCluster::start();
    let db = pg.fresh_database("bank");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE TABLE bank (id int PRIMARY KEY, amount int NOT NULL)",
    );
    let setup = AgentSetup::with_sinks(
        &pg.url(&db),
        "\"public.bank\"",
        &merge_sink(&pg, &warehouse, ""),
    );
    let mut agent = setup.start();
    tokio::task::block_in_place(|| agent.wait_streaming());
    let source = pg.connect(&db).await;
    source
        .batch_execute("INSERT INTO bank VALUES (1, 1000), (2, 1000)")
        .await
        .unwrap();
    tokio::task::block_in_place(|| assert_mirrors(&pg, &db, &warehouse, &[("bank", "*")]));

    let transfers = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..1_000 {
            let amount = rng.gen_range(1..50);
            let (from, to) = if rng.gen_bool(0.5) { (1, 2) } else { (2, 1) };
            source
                .batch_execute(&format!(
                    "BEGIN; UPDATE bank SET amount = amount - {amount} WHERE id = {from}; \
                     UPDATE bank SET amount = amount + {amount} WHERE id = {to}; COMMIT;"
                ))
                .await
                .unwrap();
        }
    });
    let reader = pg.connect(&warehouse).await;
    let mut reads = 0;
    while !transfers.is_finished() {
        let row = reader
            .query_one(
                "SELECT sum(amount)::int, count(*)::int FROM replica.bank",
                &[],
            )
            .await
            .unwrap();
        let (sum, count): (i32, i32) = (row.get(0), row.get(1));
        assert_eq!((sum, count), (2000, 2), "a reader saw half a transaction");
        reads += 1;
    }
    transfers.await.unwrap();
    assert!(reads > 10, "only {reads} reads overlapped the transfers");
    tokio::task::block_in_place(|| assert_mirrors(&pg, &db, &warehouse, &[("bank", "*")]));
    assert!(agent.terminate().success());
}

#[test]
fn several_sinks_apply_side_by_side_from_their_own_cursors() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("multi");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)");
    let sinks = format!(
        "{}\n[[sink]]\nname = \"second\"\ntype = \"postgres\"\nurl = \"{}\"\nschema = \"second\"\n\
         [[sink.table]]\nsource = \"public.t\"\ntarget = \"second.renamed\"\n\n\
         [[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n",
        merge_sink(&pg, &warehouse, ""),
        pg.url(&warehouse)
    );
    let setup = AgentSetup::with_sinks(&pg.url(&db), "\"public.t\"", &sinks);
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(&db, "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 300) g; DELETE FROM t WHERE id % 3 = 0;");
    assert_mirrors(&pg, &db, &warehouse, &[("t", "*")]);
    let want = pg.dump(&db, "public.t", "*");
    assert!(eventually(Duration::from_secs(30), || pg.dump(
        &warehouse,
        "second.renamed",
        "*"
    ) == want));
    assert!(eventually(Duration::from_secs(30), || setup
        .envelopes()
        .len()
        == 400));
    let positions = pg.psql(&warehouse, "SELECT (SELECT log_position FROM replica._tidemark_checkpoint) = (SELECT log_position FROM second._tidemark_checkpoint)");
    assert_eq!(positions, "t");
    assert!(agent.terminate().success());
}

#[test]
fn a_target_table_dropped_while_running_is_created_again() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("dropped");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)");
    let (_setup, mut agent) = start_merge(&pg, &db, &warehouse, "\"public.t\"", "");
    pg.psql(&db, "INSERT INTO t VALUES (1, 'a')");
    assert_mirrors(&pg, &db, &warehouse, &[("t", "*")]);
    pg.psql(&warehouse, "DROP TABLE replica.t");
    pg.psql(
        &db,
        "INSERT INTO t VALUES (2, 'b'); UPDATE t SET v = 'c' WHERE id = 2;",
    );
    let rows = || {
        pg.try_psql(
            &warehouse,
            "SELECT string_agg(id || ':' || v, ' ') FROM replica.t",
        )
        .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(30), || rows() == "2:c"),
        "{}\n{}",
        rows(),
        agent.log()
    );
    assert!(agent.log().contains("creating it again"), "{}", agent.log());
    // Dropped and recreated by hand with the rows restored: the sink goes on into it.
    pg.psql(&warehouse, "DROP TABLE replica.t; CREATE TABLE replica.t (id int PRIMARY KEY, v text); INSERT INTO replica.t VALUES (1, 'a'), (2, 'c');");
    pg.psql(&db, "UPDATE t SET v = 'd'");
    assert_mirrors(&pg, &db, &warehouse, &[("t", "*")]);
    assert!(agent.is_running());
    assert!(agent.terminate().success());
}

#[test]
fn replica_identity_full_tables_mirror_too() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("full");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v text); ALTER TABLE t REPLICA IDENTITY FULL;",
    );
    let (_setup, agent) = start_merge(&pg, &db, &warehouse, "\"public.t\"", "");
    pg.psql(&db, "INSERT INTO t VALUES (1, 'a'), (2, 'b'); UPDATE t SET v = 'z' WHERE id = 1; UPDATE t SET id = 3 WHERE id = 2; DELETE FROM t WHERE id = 1;");
    pg.psql(&db, "INSERT INTO t VALUES (4, 'x')");
    assert_mirrors(&pg, &db, &warehouse, &[("t", "*")]);
    assert!(agent.terminate().success());
}

#[test]
fn unchanged_toast_under_identity_full_completes_a_row_the_target_never_had() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("fulltoast");
    let warehouse = pg.fresh_database("warehouse");
    // The row is older than the agent (no snapshot): the target learns it from the update,
    // whose TOASTed body only the old row under REPLICA IDENTITY FULL carries.
    pg.psql(
        &db,
        "CREATE TABLE docs (id int PRIMARY KEY, rev int, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         ALTER TABLE docs REPLICA IDENTITY FULL;
         INSERT INTO docs VALUES (1, 1, repeat('0123456789abcdef', 4096));",
    );
    let (_setup, agent) = start_merge(&pg, &db, &warehouse, "\"public.docs\"", "");
    pg.psql(&db, "UPDATE docs SET rev = 2");
    assert_mirrors(&pg, &db, &warehouse, &[("docs", "id, rev, md5(body)")]);
    assert!(agent.terminate().success());
}

#[test]
fn a_table_without_primary_key_is_refused_at_start_with_the_fix() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("nopk");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE TABLE loose (id int, v text); ALTER TABLE loose REPLICA IDENTITY FULL;",
    );
    let setup = AgentSetup::with_sinks(
        &pg.url(&db),
        "\"public.loose\"",
        &merge_sink(&pg, &warehouse, ""),
    );
    let output = setup.command("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("public.loose") && stderr.contains("ADD PRIMARY KEY"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let check = setup.command("check");
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("FAIL  primary keys: table(s) without a primary key: public.loose"),
        "{stdout}"
    );
    // The same table is fine for a jsonl sink.
    let jsonl = AgentSetup::jsonl(&pg.url(&db), "\"public.loose\"");
    let mut agent = jsonl.start();
    agent.wait_streaming();
    assert!(agent.terminate().success());
}

#[test]
fn every_type_of_the_readme_table_arrives_unchanged() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("types");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE DOMAIN positive AS numeric(10,2) CHECK (VALUE > 0);
         CREATE TYPE color AS ENUM ('red', 'green');
         CREATE TABLE kinds (id int PRIMARY KEY, b boolean, s smallint, i integer, l bigint, o oid,
           r real, d double precision, n numeric, c char(3), vc varchar(10), nm name, x xml,
           by bytea, dt date, t time, tz timetz, ts timestamp, tstz timestamptz, iv interval,
           u uuid, j json, jb jsonb, ia int[], ta text[][], tsa timestamptz[], e color, ea color[],
           p positive, m money, pt point, inet inet);",
    );
    let (_setup, agent) = start_merge(&pg, &db, &warehouse, "\"public.kinds\"", "");
    pg.psql(
        &db,
        r#"INSERT INTO kinds VALUES
          (1, true, -32768, 2147483647, -9223372036854775808, 4294967295, 3.4028235e38, 1e-300,
           -0.000000000000000000000000000001, 'ab', 'tab	x', 'nm', '<a>b</a>', '\x00010203ff',
           '4713-01-01 BC', '24:00:00', '23:59:59.999999-14:59', '294276-12-31 23:59:59.999999',
           '1970-01-01 00:00:00.000001+05:45', '-178000000 years -1 mon +3 days -04:05:06.000001',
           'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '{"a": [1, "two"]}', '{"z": null, "a": 1}',
           '{1,NULL,-3}', '{{"a b","c,d"},{"\"q\"","back\\slash"}}', '{infinity,"2000-01-01 00:00+00"}',
           'green', '{red,green}', 12.5, '$1,234.56', '(1.5,-2)', '192.168.0.1/24'),
          (2, NULL, NULL, NULL, NULL, NULL, 'NaN', '-Infinity', 'NaN', NULL, '', NULL, NULL, '\x',
           'infinity', '00:00', NULL, '-infinity', 'infinity', '0', NULL, 'null', '[]', '{}', '{}',
           NULL, NULL, '{}', NULL, NULL, NULL, NULL)"#,
    );
    assert_mirrors(&pg, &db, &warehouse, &[("kinds", "*")]);
    assert!(agent.terminate().success());
}

#[test]
fn a_target_restart_mid_stream_is_retried_and_nothing_is_lost() {
    let source = PgCluster::start();
    let target = PgCluster::start();
    let db = source.fresh_database("src");
    let warehouse = target.fresh_database("warehouse");
    source.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v int)");
    let sink = mirror_sink(&target.url(&warehouse));
    let setup = AgentSetup::with_sinks(&source.url(&db), "\"public.t\"", &sink);
    let mut agent = setup.start();
    agent.wait_streaming();
    for round in 0..3 {
        source.psql(&db, &format!("INSERT INTO t SELECT g, {round} FROM generate_series({round} * 100, {round} * 100 + 99) g"));
        target.restart();
        source.psql(
            &db,
            &format!("UPDATE t SET v = v + 10 WHERE id % 7 = {round}"),
        );
    }
    let want = source.dump(&db, "public.t", "*");
    assert!(
        eventually(Duration::from_secs(60), || target.dump(
            &warehouse,
            "replica.t",
            "*"
        ) == want),
        "{}",
        agent.log()
    );
    assert!(agent.is_running());
    assert!(agent.terminate().success());
}

#[test]
fn a_column_added_to_the_source_is_added_to_the_target_without_a_restart() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("addcol");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)");
    let (_setup, mut agent) = start_merge(&pg, &db, &warehouse, "\"public.t\"", "");
    pg.psql(&db, "INSERT INTO t VALUES (1, 'a')");
    assert_mirrors(&pg, &db, &warehouse, &[("t", "*")]);
    pg.psql(&db, "ALTER TABLE t ADD COLUMN amount numeric(8,2), ADD COLUMN \"Tag\" varchar(5); INSERT INTO t VALUES (2, 'b', 9.5, 'x'); UPDATE t SET amount = 1 WHERE id = 1;");
    assert_mirrors(&pg, &db, &warehouse, &[("t", "id, v, amount, \"Tag\"")]);
    let types = pg.psql(&warehouse, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'replica.t'::regclass AND attname IN ('amount', 'Tag') ORDER BY attname");
    assert_eq!(types, "character varying(5)\nnumeric(8,2)");
    assert!(agent.pid() > 0 && agent.is_running());
    assert!(agent.terminate().success());
}
