//! End to end: changes committed in a real PostgreSQL come out of the JSONL sink as Debezium
//! envelopes, in commit order, exactly once, across SIGKILLs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::agent::{eventually, mirror_sink, AgentSetup};
use common::{workload, PgCluster};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tidemark::event::Record;

/// Envelopes of `table`, in file order.
fn of_table<'a>(envelopes: &'a [Value], table: &str) -> Vec<&'a Value> {
    envelopes
        .iter()
        .filter(|e| e["source"]["table"] == table)
        .collect()
}

/// Waits until the sink wrote an envelope for the marker row `id` of table `marker`.
fn wait_for_marker(setup: &AgentSetup, id: i64) -> Vec<Value> {
    let mut envelopes = Vec::new();
    let arrived = eventually(Duration::from_secs(60), || {
        envelopes = setup.envelopes();
        envelopes
            .iter()
            .any(|e| e["source"]["table"] == "marker" && e["after"]["id"] == id)
    });
    assert!(
        arrived,
        "marker {id} never arrived; {} envelopes",
        envelopes.len()
    );
    envelopes
}

#[test]
fn every_kind_of_change_arrives_as_its_envelope_in_commit_order() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("kinds");
    pg.psql(
        &db,
        "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(40,8), doc jsonb, \
           tags text[], big text, seen timestamptz, raw bytea);
         CREATE TABLE pairs (a int, b text, v int, PRIMARY KEY (a, b));
         CREATE TABLE marker (id int PRIMARY KEY);
         ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;",
    );
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.*\"");
    let mut agent = setup.start();
    agent.wait_streaming();

    pg.psql(
        &db,
        "INSERT INTO items (id, name, price, doc, tags, seen, raw) VALUES
           (1, 'añejo ☃', 1234567890123456789012.12345678, '{\"a\": [1, 2]}', '{x,\"y z\",NULL}',
            '2024-01-05 12:34:56.5+00', '\\x00ff');
         INSERT INTO items (id, name) VALUES (2, NULL);
         UPDATE items SET name = 'two' WHERE id = 2;
         DELETE FROM items WHERE id = 2;
         BEGIN; INSERT INTO items (id) VALUES (99); ROLLBACK;
         UPDATE items SET id = 3 WHERE id = 1;
         INSERT INTO pairs VALUES (1, 'x', 10), (1, 'y', 20);
         UPDATE pairs SET v = 11 WHERE a = 1 AND b = 'x';
         DELETE FROM pairs WHERE a = 1 AND b = 'y';
         INSERT INTO items (id, big) VALUES (4, repeat('0123456789abcdef', 65536));
         UPDATE items SET name = 'toasted' WHERE id = 4;
         TRUNCATE pairs;
         INSERT INTO marker VALUES (1);",
    );
    let envelopes = wait_for_marker(&setup, 1);
    let summary: Vec<String> = envelopes
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["source"]["table"].as_str().unwrap(),
                e["op"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            "items:c", "items:c", "items:u", "items:d", // insert, insert, update, delete
            "items:d", "items:c", // the key update: old key deleted, new key created
            "pairs:c", "pairs:c", "pairs:u", "pairs:d", "items:c",
            "items:u", // the TOASTed row and the update that left it alone
            "pairs:t", "marker:c",
        ]
    );
    let items = of_table(&envelopes, "items");
    let first = &items[0]["after"];
    assert_eq!(first["id"], 1);
    assert_eq!(first["name"], "añejo ☃");
    assert_eq!(first["price"], "1234567890123456789012.12345678");
    assert_eq!(
        first["doc"]
            .as_str()
            .map(|d| serde_json::from_str::<Value>(d).unwrap()),
        Some(json!({"a": [1, 2]}))
    );
    assert_eq!(first["tags"], json!(["x", "y z", null]));
    assert_eq!(first["seen"], "2024-01-05T12:34:56.5Z");
    assert_eq!(first["raw"], "AP8=");
    assert_eq!(first["big"], Value::Null);
    assert_eq!(items[1]["after"]["name"], Value::Null, "NULL stays null");
    assert_eq!(items[2]["after"]["name"], "two");
    assert_eq!(items[3]["before"]["id"], 2, "a delete carries the old key");
    assert_eq!(items[3]["after"], Value::Null);
    assert_eq!(items[4]["before"]["id"], 1);
    assert_eq!(items[5]["after"]["id"], 3);
    assert_eq!(items[5]["after"]["name"], "añejo ☃");
    assert_eq!(
        items[6]["after"]["big"].as_str().map(str::len),
        Some(1 << 20)
    );
    assert_eq!(items[7]["after"]["big"], "__debezium_unavailable_value");
    assert_eq!(items[7]["after"]["name"], "toasted");
    assert!(
        !items.iter().any(|e| e["after"]["id"] == 99),
        "rolled back insert appeared"
    );

    let pairs = of_table(&envelopes, "pairs");
    assert_eq!(pairs[2]["after"], json!({"a": 1, "b": "x", "v": 11}));
    assert_eq!(pairs[3]["before"]["a"], 1);
    assert_eq!(pairs[3]["before"]["b"], "y");
    assert_eq!(pairs[4]["before"], Value::Null);

    // Commit order: LSN sequences never go backwards, and the two pairs inserted in one
    // statement share a transaction in order.
    let sequences: Vec<(u64, u64)> = envelopes
        .iter()
        .map(|e| {
            let s: Vec<String> =
                serde_json::from_str(e["source"]["sequence"].as_str().unwrap()).unwrap();
            (s[0].parse().unwrap(), s[1].parse().unwrap())
        })
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] <= w[1]), "{sequences:?}");
    assert_eq!(pairs[0]["transaction"]["id"], pairs[1]["transaction"]["id"]);
    assert_eq!(pairs[1]["transaction"]["data_collection_order"], 2);

    assert!(agent.terminate().success(), "SIGTERM must exit 0");
}

/// One of the three tables of the randomised workload: key → value.
type Table = BTreeMap<String, String>;

fn source_state(pg: &PgCluster, db: &str) -> BTreeMap<&'static str, Table> {
    let mut state = BTreeMap::new();
    for (table, query) in [
        (
            "accounts",
            "SELECT id::text, balance::text || '|' || coalesce(note, '∅') FROM accounts ORDER BY 1",
        ),
        (
            "lines",
            "SELECT a::text || ',' || b, qty::text FROM lines ORDER BY 1",
        ),
        ("docs", "SELECT id::text, body FROM docs ORDER BY 1"),
    ] {
        let rows = pg.psql(db, &format!("COPY ({query}) TO STDOUT"));
        let map = rows
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        state.insert(table, map);
    }
    state
}

fn key(table: &str, row: &Value) -> String {
    match table {
        "lines" => format!("{},{}", row["a"], row["b"].as_str().unwrap()),
        _ => row["id"].to_string(),
    }
}

/// The row's value as `source_state` renders it; an unchanged TOAST value is the value the
/// key already had.
fn value(table: &str, row: &Value, previous: Option<&String>) -> String {
    match table {
        "accounts" => format!(
            "{}|{}",
            row["balance"].as_str().unwrap(),
            row["note"].as_str().unwrap_or("∅")
        ),
        "lines" => row["qty"].to_string(),
        "docs" if row["body"] == "__debezium_unavailable_value" => previous
            .cloned()
            .expect("unchanged TOAST value of a row never seen"),
        "docs" => row["body"].as_str().unwrap().to_string(),
        other => panic!("unexpected table {other}"),
    }
}

/// Applies the envelopes to empty tables.
fn replay(envelopes: &[Value]) -> (BTreeMap<&'static str, Table>, usize) {
    let mut state: BTreeMap<&'static str, Table> = BTreeMap::new();
    let mut changes = 0;
    for e in envelopes {
        let table: &'static str = match e["source"]["table"].as_str().unwrap() {
            "accounts" => "accounts",
            "lines" => "lines",
            "docs" => "docs",
            _ => continue,
        };
        changes += 1;
        let rows = state.entry(table).or_default();
        match e["op"].as_str().unwrap() {
            "c" | "u" => {
                let key = key(table, &e["after"]);
                let value = value(table, &e["after"], rows.get(&key));
                rows.insert(key, value);
            }
            "d" => {
                let key = key(table, &e["before"]);
                assert!(
                    rows.remove(&key).is_some(),
                    "delete of absent key {key} in {table}"
                );
            }
            "t" => rows.clear(),
            op => panic!("unexpected op {op}"),
        }
    }
    (state, changes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomised_workload_survives_sigkills_exactly_once() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("random");
    pg.psql(
        &db,
        &format!(
            "{}CREATE TABLE marker (id int PRIMARY KEY);",
            workload::SCHEMA
        ),
    );
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.*\"");
    let mut agent = Some(setup.start());
    agent.as_mut().unwrap().wait_streaming();

    // The workload runs on its own while the agent is killed at random moments, so kills land
    // mid-transaction, mid-batch and mid-write.
    let client = pg.connect(&db).await;
    let kills_done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workload = tokio::spawn({
        let kills_done = kills_done.clone();
        let client = pg.connect(&db).await;
        async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(0x7e1d_3a4c);
            let mut transactions = 0;
            while transactions < 3_000 || kills_done.load(std::sync::atomic::Ordering::SeqCst) < 4 {
                workload::random_transaction(&client, &mut rng).await;
                transactions += 1;
            }
            transactions
        }
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut kills = 0;
    while !workload.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..700))).await;
        agent.take().unwrap().kill();
        kills += 1;
        kills_done.store(kills, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
        let mut restarted = setup.start();
        tokio::task::block_in_place(|| restarted.wait_streaming());
        agent = Some(restarted);
    }
    let transactions = workload.await.unwrap();
    assert!(kills >= 4, "only {kills} kills");
    client
        .execute("INSERT INTO marker VALUES (1)", &[])
        .await
        .unwrap();
    let envelopes = tokio::task::spawn_blocking({
        let setup_events = setup.events_dir();
        move || {
            let mut envelopes = Vec::new();
            let arrived = eventually(Duration::from_secs(120), || {
                envelopes = common::agent::read_envelopes(&setup_events);
                envelopes.iter().any(|e| e["source"]["table"] == "marker")
            });
            assert!(arrived, "marker never arrived");
            envelopes
        }
    })
    .await
    .unwrap();

    // Exactly once: no (transaction, order) pair twice.
    let mut seen = HashSet::new();
    for e in &envelopes {
        let id = (
            e["transaction"]["id"].to_string(),
            e["transaction"]["total_order"].to_string(),
        );
        assert!(seen.insert(id.clone()), "envelope {id:?} appears twice");
    }
    let (replayed, changes) = replay(&envelopes);
    assert!(changes > transactions, "only {changes} changes replayed");
    let source = source_state(&pg, &db);
    for (table, rows) in &source {
        let empty = Table::new();
        let got = replayed.get(table).unwrap_or(&empty);
        assert_eq!(got.len(), rows.len(), "{table}: row count differs");
        assert_eq!(got, rows, "{table}: rows differ");
    }
    assert!(agent.unwrap().terminate().success());
}

/// Ids of `burst` rows that reached the offset log or the JSONL files.
fn logged_burst_ids(setup: &AgentSetup) -> HashSet<i64> {
    let mut ids: HashSet<i64> = setup
        .envelopes()
        .iter()
        .filter(|e| e["source"]["table"] == "burst")
        .filter_map(|e| e["after"]["id"].as_i64())
        .collect();
    let log = tidemark::log::OffsetLog::open(&setup.data_dir()).unwrap();
    let mut after = 0;
    loop {
        let entries = log.read(after, 10_000).unwrap();
        let Some(last) = entries.last() else { break };
        after = last.seq;
        for entry in entries {
            if let Record::Change(change) = entry.record {
                if let Some(Some(tidemark::event::Value::Int(id))) =
                    change.after.as_ref().map(|row| row.first().cloned())
                {
                    ids.insert(id);
                }
            }
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_is_never_confirmed_past_what_the_log_holds() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("confirm");
    pg.psql(&db, "CREATE TABLE burst (id bigint PRIMARY KEY, pad text)");
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.burst\"");
    let client = pg.connect(&db).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut committed: Vec<(i64, tidemark::event::Position)> = Vec::new();
    let mut confirmed_any = false;
    for round in 0..4i64 {
        let mut agent = setup.start();
        tokio::task::block_in_place(|| agent.wait_streaming());
        // Kill while the burst is running, so the agent dies with changes received but not
        // yet durable.
        let burst = tokio::spawn({
            let client = pg.connect(&db).await;
            async move {
                let mut committed = Vec::new();
                for i in 0..1_500 {
                    let id = round * 1_000_000 + i;
                    client
                        .execute("INSERT INTO burst VALUES ($1, repeat('x', 200))", &[&id])
                        .await
                        .unwrap();
                    let row = client
                        .query_one("SELECT pg_current_wal_lsn()::text", &[])
                        .await
                        .unwrap();
                    committed.push((id, row.get::<_, String>(0).parse().unwrap()));
                }
                committed
            }
        });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..400))).await;
        agent.kill();
        committed.extend(burst.await.unwrap());
        let row = client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'tidemark_test'",
                &[],
            )
            .await
            .unwrap();
        let confirmed: tidemark::event::Position = row.get::<_, String>(0).parse().unwrap();
        let logged = logged_burst_ids(&setup);
        let must_be_logged: Vec<i64> = committed
            .iter()
            .filter(|(_, lsn)| *lsn <= confirmed)
            .map(|(id, _)| *id)
            .collect();
        confirmed_any |= must_be_logged.iter().any(|id| id / 1_000_000 == round);
        let lost: Vec<&i64> = must_be_logged
            .iter()
            .filter(|id| !logged.contains(id))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: slot confirmed {confirmed} but {} committed rows below it are not in the log (first {:?})",
            lost.len(),
            lost.first()
        );
    }
    assert!(
        confirmed_any,
        "the slot never advanced during a burst; the test proved nothing"
    );
}

#[test]
fn source_restart_mid_stream_reconnects_and_loses_nothing() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("restart");
    pg.psql(
        &db,
        "CREATE TABLE seq (id int PRIMARY KEY); CREATE TABLE marker (id int PRIMARY KEY);",
    );
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.*\"");
    let mut agent = setup.start();
    agent.wait_healthy();
    agent.wait_streaming();
    for chunk in 0..3 {
        for i in 0..5 {
            let id = chunk * 100 + i;
            pg.psql(&db, &format!("INSERT INTO seq VALUES ({id})"));
        }
        pg.restart();
    }
    pg.psql(&db, "INSERT INTO marker VALUES (1)");
    let envelopes = wait_for_marker(&setup, 1);
    let ids: Vec<i64> = of_table(&envelopes, "seq")
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap())
        .collect();
    let expected: Vec<i64> = (0..3)
        .flat_map(|c| (0..5).map(move |i| c * 100 + i))
        .collect();
    assert_eq!(ids, expected);
    assert!(agent.is_running());
    assert!(agent.log().contains("reconnecting"), "{}", agent.log());
    assert!(agent.terminate().success());
}

#[test]
fn a_dropped_slot_stops_the_agent_instead_of_resuming_silently() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("dropped");
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

    pg.psql(&db, "SELECT pg_drop_replication_slot('tidemark_test')");
    pg.psql(&db, "INSERT INTO t VALUES (2)");
    let output = setup.command("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("\"tidemark_test\" no longer exists"),
        "{stderr}"
    );
    assert!(stderr.contains("may have been missed"), "{stderr}");
    assert!(stderr.contains("snapshot"), "{stderr}");
    let slots = pg.psql(&db, "SELECT count(*) FROM pg_replication_slots");
    assert_eq!(slots, "0", "a new slot was created silently");
}

#[test]
fn options_in_the_url_cannot_change_the_value_format_capture_reads() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("options");
    pg.psql(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, at timestamptz, span interval, day date)",
    );
    let url = format!(
        "{}?options=-c%20DateStyle%3DSQL%2CDMY%20-c%20IntervalStyle%3Dpostgres_verbose%20-c%20TimeZone%3DAsia%2FKathmandu",
        pg.url(&db)
    );
    let setup = AgentSetup::jsonl(&url, "\"public.t\"");
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO t VALUES (1, '2024-01-05 12:34:56.5+00', '1 day 2 hours', '2024-01-05')",
    );
    assert!(
        eventually(Duration::from_secs(30), || setup.envelopes().len() == 1),
        "{}",
        agent.log()
    );
    let after = &setup.envelopes()[0]["after"];
    assert_eq!(after["at"], "2024-01-05T12:34:56.5Z");
    assert_eq!(after["span"], 93_600_000_000i64);
    assert_eq!(after["day"], 19_727);
    assert!(
        !agent.log().contains("value kept as text"),
        "{}",
        agent.log()
    );
    assert!(agent.terminate().success());
}

#[test]
fn update_of_a_table_without_a_primary_key_is_one_update_envelope() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("nokey");
    pg.psql(
        &db,
        "CREATE TABLE nokey (id int, note text);
         ALTER TABLE nokey REPLICA IDENTITY FULL;
         CREATE TABLE keyed (id int PRIMARY KEY, note text);
         ALTER TABLE keyed REPLICA IDENTITY FULL;
         CREATE TABLE marker (id int PRIMARY KEY);",
    );
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.*\"");
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO nokey VALUES (1, 'a');
         UPDATE nokey SET id = 2, note = 'b';
         UPDATE nokey SET note = 'c';
         DELETE FROM nokey;
         INSERT INTO keyed VALUES (1, 'k');
         UPDATE keyed SET id = 2;
         INSERT INTO marker VALUES (1);",
    );
    let envelopes = wait_for_marker(&setup, 1);
    let nokey = of_table(&envelopes, "nokey");
    let ops: Vec<&str> = nokey.iter().map(|e| e["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["c", "u", "u", "d"]);
    assert_eq!(nokey[1]["before"], json!({"id": 1, "note": "a"}));
    assert_eq!(nokey[1]["after"], json!({"id": 2, "note": "b"}));
    assert_eq!(nokey[2]["before"], json!({"id": 2, "note": "b"}));
    assert_eq!(nokey[2]["after"], json!({"id": 2, "note": "c"}));
    assert_eq!(nokey[3]["before"], json!({"id": 2, "note": "c"}));
    // A table with a primary key still splits a key update, as Debezium does.
    let keyed = of_table(&envelopes, "keyed");
    let ops: Vec<&str> = keyed.iter().map(|e| e["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["c", "d", "c"]);
    assert_eq!(keyed[1]["before"], json!({"id": 1, "note": "k"}));
    assert_eq!(keyed[2]["after"], json!({"id": 2, "note": "k"}));
    assert!(agent.terminate().success());
}

#[test]
fn envelopes_carry_commit_and_processing_times_in_ms_us_and_ns() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("times");
    pg.psql(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, started timestamptz)",
    );
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.t\"");
    let mut agent = setup.start();
    agent.wait_streaming();
    // now() is the start of the transaction: the commit comes at or after it.
    pg.psql(&db, "INSERT INTO t VALUES (1, now())");
    let started: i64 = pg
        .psql(
            &db,
            "SELECT (extract(epoch FROM started) * 1000000)::bigint FROM t",
        )
        .parse()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || setup.envelopes().len() == 1),
        "{}",
        agent.log()
    );
    let envelope = &setup.envelopes()[0];
    let times = |block: &Value| {
        (
            block["ts_ms"].as_i64().unwrap(),
            block["ts_us"].as_i64().unwrap(),
            block["ts_ns"].as_i64().unwrap(),
        )
    };
    let (commit_ms, commit_us, commit_ns) = times(&envelope["source"]);
    assert_eq!(commit_ms, commit_us.div_euclid(1000));
    assert_eq!(commit_ns, commit_us * 1000);
    assert!(
        commit_us >= started,
        "commit {commit_us} before start {started}"
    );
    let (now_ms, now_us, now_ns) = times(envelope);
    assert_eq!(now_ms, now_us.div_euclid(1000));
    assert_eq!(now_us, now_ns.div_euclid(1000));
    assert!(
        now_us >= commit_us,
        "processed {now_us} before commit {commit_us}"
    );
    assert!(agent.terminate().success());
}

#[test]
fn unchanged_toast_under_identity_full_carries_the_old_rows_value() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("toastfull");
    pg.psql(
        &db,
        "CREATE TABLE docs (id int PRIMARY KEY, rev int, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         ALTER TABLE docs REPLICA IDENTITY FULL;
         CREATE TABLE plain (id int PRIMARY KEY, rev int, body text);
         ALTER TABLE plain ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE TABLE marker (id int PRIMARY KEY);",
    );
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.*\"");
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO docs VALUES (1, 1, repeat('0123456789abcdef', 4096));
         UPDATE docs SET rev = 2;
         UPDATE docs SET id = 2, rev = 3;
         INSERT INTO plain VALUES (1, 1, repeat('x', 100000));
         UPDATE plain SET rev = 2;
         INSERT INTO marker VALUES (1);",
    );
    let envelopes = wait_for_marker(&setup, 1);
    let body = "0123456789abcdef".repeat(4096);
    let docs = of_table(&envelopes, "docs");
    let ops: Vec<&str> = docs.iter().map(|e| e["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["c", "u", "d", "c"]);
    let update = docs[1];
    assert_eq!(update["before"]["rev"], 1);
    assert_eq!(
        update["before"]["body"],
        body.as_str(),
        "the old row is whole"
    );
    assert_eq!(update["after"]["rev"], 2);
    assert_eq!(update["after"]["body"], body.as_str());
    // A key update under FULL: the created row carries the value too.
    assert_eq!(docs[3]["after"]["id"], 2);
    assert_eq!(docs[3]["after"]["body"], body.as_str());
    // Without FULL the server sends no old row: the placeholder stays.
    let plain = of_table(&envelopes, "plain");
    assert_eq!(plain[1]["op"], "u");
    assert_eq!(plain[1]["after"]["body"], "__debezium_unavailable_value");
    assert!(agent.terminate().success());
}

/// Under `lc_monetary = 'de_DE.UTF-8'` money prints as `1.234,56 €` and reads `1234.56` as
/// 123456 euros: capture and the target must not depend on the server's setting.
#[test]
fn money_is_a_decimal_string_whatever_the_servers_lc_monetary() {
    let pg = PgCluster::start_with_locale("de_DE.UTF-8", &[("lc_monetary", "de_DE.UTF-8")]);
    let db = pg.fresh_database("money");
    let warehouse = pg.fresh_database("warehouse");
    assert_eq!(
        pg.psql(&db, "SELECT 1234.56::numeric::money"),
        "1.234,56 €",
        "the server's money format is not de_DE's: the test would prove nothing"
    );
    // Amounts are written as numeric casts, which read the same under every lc_monetary.
    pg.psql(
        &db,
        "CREATE TABLE wallet (id int PRIMARY KEY, amount money, history money[]);
         CREATE TABLE marker (id int PRIMARY KEY);
         INSERT INTO wallet VALUES
           (1, 1234.56::numeric::money, ARRAY[1.5, -2, 1000]::numeric[]::money[]),
           (2, (-1234.56)::numeric::money, NULL),
           (3, 0::numeric::money, '{}');",
    );
    let sinks = format!(
        "[[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n\n{}",
        mirror_sink(&pg.url(&warehouse))
    );
    let setup = AgentSetup::with_sinks(&pg.url(&db), "\"public.*\"", &sinks);
    let config = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("snapshot = \"never\"", "snapshot = \"initial\"");
    std::fs::write(&setup.config, config).unwrap();
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO wallet VALUES
           (4, 92233720368547758.07::numeric::money, ARRAY[0.05]::numeric[]::money[]),
           (5, (-92233720368547758.08)::numeric::money, NULL);
         UPDATE wallet SET amount = amount + 0.01::numeric::money WHERE id = 1;
         INSERT INTO marker VALUES (1);",
    );
    let envelopes = wait_for_marker(&setup, 1);
    let wallet: Vec<(String, Value, Value)> = of_table(&envelopes, "wallet")
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap().to_string(),
                e["after"]["amount"].clone(),
                e["after"]["history"].clone(),
            )
        })
        .collect();
    let row = |op: &str, amount: Value, history: Value| (op.to_string(), amount, history);
    assert_eq!(
        wallet,
        [
            row("r", json!("1234.56"), json!(["1.50", "-2.00", "1000.00"])),
            row("r", json!("-1234.56"), Value::Null),
            row("r", json!("0.00"), json!([])),
            row("c", json!("92233720368547758.07"), json!(["0.05"])),
            row("c", json!("-92233720368547758.08"), Value::Null),
            row("u", json!("1234.57"), json!(["1.50", "-2.00", "1000.00"])),
        ],
        "{}",
        agent.log()
    );
    // The target, under de_DE too, holds the amounts the snapshot copied and the stream wrote.
    let want = pg.dump(&db, "public.wallet", "*");
    let mut got = String::new();
    assert!(
        eventually(Duration::from_secs(60), || {
            got = pg.dump(&warehouse, "replica.wallet", "*");
            got == want
        }),
        "source:\n{want}\ntarget:\n{got}\n{}",
        agent.log()
    );
    assert!(
        !agent.log().contains("value kept as text"),
        "{}",
        agent.log()
    );
    assert!(agent.terminate().success());
}
