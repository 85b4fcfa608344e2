//! The ClickHouse sink against a real ClickHouse engine (tests/common/clickhouse.rs): what
//! `SELECT … FINAL` reads equals the source, row for row, across SIGKILLs of the agent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::agent::{dlq, eventually, Agent, AgentSetup};
use common::clickhouse::ClickHouse;
use common::PgCluster;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ITEMS: &str = "CREATE TYPE mood AS ENUM ('ok', 'sad');
    CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(12,2), tags int[],
      at timestamptz, day date, u uuid, doc jsonb, flag boolean, m mood, big text);
    CREATE TABLE pairs (a int, b text, v bigint, PRIMARY KEY (a, b));";

/// The columns of `items` as PostgreSQL prints them, and the same in ClickHouse's text.
const ITEMS_PG: &str = "id, name, trim_scale(price), coalesce(array_to_string(tags, ',', 'NULL'), ''), \
    to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), day, u, doc, flag::int, m, md5(big)";
const ITEMS_CH: &str = "id, name, toString(price), \
    arrayStringConcat(arrayMap(x -> ifNull(toString(x), 'NULL'), tags), ','), \
    toString(at), toString(day), toString(u), doc, toUInt8(flag), m, lower(hex(MD5(big)))";
const PAIRS: &str = "a, b, v";

/// Rows of a query's output, sorted: the two servers order text differently.
fn sorted(text: &str) -> Vec<String> {
    let mut rows: Vec<String> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.replace("\\N", "NULL"))
        .collect();
    rows.sort();
    rows
}

/// The rows of `a` that `b` lacks, one a line.
fn only(a: &[String], b: &[String]) -> String {
    a.iter()
        .filter(|row| !b.contains(row))
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_mirrors(pg: &PgCluster, db: &str, ch: &ClickHouse, database: &str) {
    for (table, pg_columns, ch_columns) in [("items", ITEMS_PG, ITEMS_CH), ("pairs", PAIRS, PAIRS)]
    {
        let want = sorted(&pg.psql(
            db,
            &format!("COPY (SELECT {pg_columns} FROM {table}) TO STDOUT"),
        ));
        let mut got = Vec::new();
        let same = eventually(Duration::from_secs(60), || {
            got = ch
                .try_query(&format!(
                    "SELECT {ch_columns} FROM {database}.{table} FINAL"
                ))
                .map(|out| sorted(&out))
                .unwrap_or_default();
            got == want
        });
        assert!(
            same,
            "{table} differs\nonly in the source:\n{}\nonly in ClickHouse:\n{}",
            only(&want, &got),
            only(&got, &want)
        );
    }
}

/// A source cluster with `items` and `pairs` (and what `before` wrote, which the initial
/// snapshot copies), a ClickHouse engine, and an agent setup with a merge sink `warehouse` into
/// database `mirror`; `sink_extra` lines go into the sink's table.
struct Fixture {
    pg: PgCluster,
    ch: ClickHouse,
    db: String,
    setup: AgentSetup,
}

impl Fixture {
    fn new(before: &str, sink_extra: &str) -> Fixture {
        Fixture::with_sinks(before, |_, ch| {
            format!(
                "{}{sink_extra}",
                ch.sink_toml("warehouse", "mirror", "merge")
            )
        })
    }

    /// The same with the sinks `sinks` makes of the source cluster and the engine.
    fn with_sinks(before: &str, sinks: impl FnOnce(&PgCluster, &ClickHouse) -> String) -> Fixture {
        let pg = PgCluster::start();
        let ch = ClickHouse::start();
        let db = pg.fresh_database("shop");
        pg.psql(&db, ITEMS);
        if !before.is_empty() {
            pg.psql(&db, before);
        }
        let setup = AgentSetup::with_sinks(
            &pg.url(&db),
            "\"public.items\", \"public.pairs\"",
            &sinks(&pg, &ch),
        )
        .with_initial_snapshot("1GiB");
        Fixture { pg, ch, db, setup }
    }
}

#[test]
fn merge_mirrors_every_kind_of_change_and_type() {
    let Fixture { pg, ch, db, setup } = Fixture::new(
        "INSERT INTO items VALUES (1, 'before the agent', 1.50, '{1,NULL,3}', '2024-01-05 12:34:56.5+00',
           '1950-03-15', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2]}', true, 'sad',
           (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 300) i))",
        "",
    );
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO items (id, name, price, tags, day) VALUES (2, 'añejo ☃ \t tab\\ and '' quote', -12345678.99, '{}', '2299-12-31');
         UPDATE items SET price = 2.25 WHERE id = 1;
         UPDATE items SET name = 'moved', id = 10 WHERE id = 2;
         INSERT INTO items (id, name) VALUES (3, 'gone');
         DELETE FROM items WHERE id = 3;
         BEGIN; INSERT INTO items (id) VALUES (99); ROLLBACK;
         INSERT INTO pairs VALUES (1, 'x', 10), (1, 'y', 20), (2, 'x', 30);
         BEGIN; UPDATE pairs SET v = v + 1; DELETE FROM pairs WHERE b = 'y'; UPDATE pairs SET b = 'z' WHERE a = 2; COMMIT;",
    );
    assert_mirrors(&pg, &db, &ch, "mirror");
    pg.psql(
        &db,
        "TRUNCATE pairs; INSERT INTO pairs VALUES (7, 'after', 1);",
    );
    assert_mirrors(&pg, &db, &ch, "mirror");
    let types = ch.query(
        "SELECT name || ' ' || type FROM system.columns WHERE database = 'mirror' AND table = 'items' ORDER BY position FORMAT TSVRaw",
    );
    assert_eq!(
        types.lines().collect::<Vec<_>>(),
        [
            "id Int32",
            "name Nullable(String)",
            "price Nullable(Decimal(12, 2))",
            "tags Array(Nullable(Int32))",
            "at Nullable(DateTime64(6, 'UTC'))",
            "day Nullable(Date32)",
            "u Nullable(UUID)",
            "doc Nullable(String)",
            "flag Nullable(Bool)",
            "m LowCardinality(Nullable(String))",
            "big Nullable(String)",
            "_tidemark_version UInt64",
            "_tidemark_is_deleted UInt8",
        ]
    );
    agent.terminate();
}

#[test]
fn a_value_clickhouse_cannot_hold_is_dead_lettered_and_the_rest_applied() {
    let Fixture { pg, ch, db, setup } = Fixture::new("", "");
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO items (id, day) VALUES (1, '2024-02-29'), (2, '1800-01-01'), (3, 'infinity');",
    );
    let file = setup.data_dir().join("dead_letters/warehouse.jsonl");
    let letters = eventually(Duration::from_secs(60), || {
        file.exists() && setup.dead_letters("warehouse").len() == 2
    });
    assert!(
        letters,
        "dead letters: {:?}",
        setup.dead_letters("warehouse")
    );
    assert!(setup.dead_letters("warehouse")[0]["reason"]
        .as_str()
        .unwrap()
        .contains("outside ClickHouse's Date32 and DateTime64 range"));
    assert_eq!(
        ch.query("SELECT id, day FROM mirror.items FINAL"),
        "1\t2024-02-29\n"
    );
    agent.terminate();
}

/// A random transaction on the source: inserts, updates (some moving a row to another key,
/// some leaving a TOASTed column unchanged), deletes, sometimes rolled back.
fn random_transaction(rng: &mut StdRng, next_id: &mut i32) -> String {
    let mut sql = String::from("BEGIN;\n");
    for _ in 0..rng.gen_range(1..6) {
        let id = rng.gen_range(1..=(*next_id).max(1));
        let kind = if rng.gen_bool(0.01) {
            7
        } else {
            rng.gen_range(0..7)
        };
        match kind {
            0 | 1 => {
                *next_id += 1;
                let big = if rng.gen_bool(0.3) {
                    format!("(SELECT string_agg(md5(i::text || '{}'), '') FROM generate_series(1, 300) i)", rng.gen::<u32>())
                } else {
                    "NULL".into()
                };
                sql.push_str(&format!(
                    "INSERT INTO items (id, name, price, tags, at, big) VALUES ({}, 'n{}', {}.{:02}, '{{{},{}}}', \
                     '2024-01-01'::timestamptz + interval '{} seconds', {big});\n",
                    next_id,
                    rng.gen::<u16>(),
                    rng.gen_range(-999..999),
                    rng.gen_range(0..100),
                    rng.gen::<i16>(),
                    rng.gen::<i16>(),
                    rng.gen::<u32>(),
                ));
                sql.push_str(&format!(
                    "INSERT INTO pairs VALUES ({}, 'k{}', {}) ON CONFLICT DO NOTHING;\n",
                    rng.gen_range(0..20),
                    rng.gen_range(0..5),
                    rng.gen::<i64>()
                ));
            }
            2 => sql.push_str(&format!("UPDATE items SET price = price + 1 WHERE id = {id};\n")),
            3 => sql.push_str(&format!(
                "UPDATE items SET name = 'u{}', tags = NULL WHERE id = {id};\n",
                rng.gen::<u16>()
            )),
            4 => {
                *next_id += 1;
                sql.push_str(&format!("UPDATE items SET id = {next_id} WHERE id = {id};\n"));
            }
            5 => sql.push_str(&format!(
                "DELETE FROM items WHERE id = {id}; DELETE FROM pairs WHERE a = {};\n",
                rng.gen_range(0..20)
            )),
            6 => sql.push_str(&format!(
                "UPDATE pairs SET v = v + 1 WHERE a = {}; UPDATE pairs SET b = 'm{}' WHERE a = {} AND b = 'k0';\n",
                rng.gen_range(0..20),
                rng.gen::<u16>(),
                rng.gen_range(0..20)
            )),
            _ => sql.push_str("TRUNCATE pairs;\n"),
        }
    }
    sql.push_str(if rng.gen_bool(0.1) {
        "ROLLBACK;\n"
    } else {
        "COMMIT;\n"
    });
    sql
}

/// The random seed: `TIDEMARK_TEST_SEED`, or a fresh one (printed, to run it again).
fn seed() -> StdRng {
    let seed: u64 = std::env::var("TIDEMARK_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// 50 random transactions, for the initial snapshot to copy.
fn initial_transactions(rng: &mut StdRng, next_id: &mut i32) -> String {
    (0..50).map(|_| random_transaction(rng, next_id)).collect()
}

/// Four rounds of random transactions on the source, the agent SIGKILLed in each; then an
/// agent that runs on.
fn run_with_sigkills(fixture: &Fixture, rng: &mut StdRng, next_id: &mut i32) -> Agent {
    let Fixture { pg, db, setup, .. } = fixture;
    for round in 0..4 {
        let agent = setup.start();
        let script: String = (0..120).map(|_| random_transaction(rng, next_id)).collect();
        let writer = {
            let url = pg.url(db);
            let psql = pg.bindir().join("psql");
            std::thread::spawn(move || {
                let status = std::process::Command::new(psql)
                    .args(["-X", "-q", "-v", "ON_ERROR_STOP=0", &url])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .and_then(|mut child| {
                        use std::io::Write;
                        child.stdin.take().unwrap().write_all(script.as_bytes())?;
                        child.wait()
                    });
                status.map(|s| s.success())
            })
        };
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
        eprintln!("round {round}: SIGKILL");
        agent.kill();
        assert!(writer.join().unwrap().is_ok());
    }
    let mut agent = setup.start();
    agent.wait_streaming();
    agent
}

#[test]
fn merge_is_exact_across_sigkills() {
    let mut rng = seed();
    let mut next_id = 0;
    let initial = initial_transactions(&mut rng, &mut next_id);
    let fixture = Fixture::new(&initial, "batch_max_rows = 40\n");
    let agent = run_with_sigkills(&fixture, &mut rng, &mut next_id);
    assert_mirrors(&fixture.pg, &fixture.db, &fixture.ch, "mirror");
    agent.terminate();
}

/// SCD2 sinks into PostgreSQL (`pghistory`, schema `history` of database `warehouse`) and
/// into ClickHouse (`chhistory`, database `history`) of the same log, both with `extra`.
fn history_fixture(before: &str, extra: &str) -> (Fixture, String) {
    let mut warehouse = String::new();
    let fixture = Fixture::with_sinks(before, |pg, ch| {
        warehouse = pg.fresh_database("warehouse");
        format!(
            "[[sink]]\nname = \"pghistory\"\ntype = \"postgres\"\nurl = \"{}\"\n\
             schema = \"history\"\nmode = \"scd2\"\n{extra}\n{}{extra}\n",
            pg.url(&warehouse),
            ch.sink_toml("chhistory", "history", "scd2"),
        )
    });
    (fixture, warehouse)
}

/// Every version in both SCD2 targets is the same: the source columns, the layout's
/// (`pg_layout` and `ch_layout`: the same columns as each server prints them), the op and the
/// commit position; and the current versions of `items` are the source's rows.
fn assert_same_history(fixture: &Fixture, warehouse: &str, pg_layout: &str, ch_layout: &str) {
    let Fixture { pg, ch, db, .. } = fixture;
    for (table, pg_columns, ch_columns) in [("items", ITEMS_PG, ITEMS_CH), ("pairs", PAIRS, PAIRS)]
    {
        let source_now = || {
            sorted(&pg.psql(
                db,
                &format!("COPY (SELECT {pg_columns} FROM {table}) TO STDOUT"),
            ))
        };
        let pg_history = || {
            sorted(&pg.psql(
                warehouse,
                &format!(
                    "COPY (SELECT {pg_columns}, {pg_layout}, _tidemark_op, \
                     (_tidemark_lsn - '0/0')::bigint FROM history.{table}) TO STDOUT"
                ),
            ))
        };
        let ch_history = || {
            ch.try_query(&format!(
                "SELECT {ch_columns}, {ch_layout}, _tidemark_op, _tidemark_lsn \
                 FROM history.{table} FINAL"
            ))
            .map(|out| sorted(&out))
            .unwrap_or_default()
        };
        let ch_current = || {
            ch.try_query(&format!(
                "SELECT {ch_columns} FROM history.{table} FINAL WHERE {}",
                if ch_layout.contains("dbt_") {
                    "dbt_valid_to IS NULL AND _tidemark_op <> 'd'"
                } else {
                    "is_current AND _tidemark_op <> 'd'"
                }
            ))
            .map(|out| sorted(&out))
            .unwrap_or_default()
        };
        let (mut want, mut got) = (Vec::new(), Vec::new());
        let same = eventually(Duration::from_secs(90), || {
            want = pg_history();
            got = ch_history();
            want == got && ch_current() == source_now() && !want.is_empty()
        });
        assert!(
            same,
            "history of {table} differs\nonly in PostgreSQL:\n{}\nonly in ClickHouse:\n{}",
            only(&want, &got),
            only(&got, &want)
        );
    }
}

const TIDEMARK_PG: &str = "to_char(valid_from AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), \
    coalesce(to_char(valid_to AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), 'NULL'), is_current::int";
const TIDEMARK_CH: &str =
    "toString(valid_from), ifNull(toString(valid_to), 'NULL'), toUInt8(is_current)";

#[test]
fn scd2_history_equals_the_postgres_sinks_across_sigkills() {
    let mut rng = seed();
    let mut next_id = 0;
    let initial = initial_transactions(&mut rng, &mut next_id);
    let (fixture, warehouse) = history_fixture(&initial, "batch_max_rows = 40\n");
    let agent = run_with_sigkills(&fixture, &mut rng, &mut next_id);
    assert_same_history(&fixture, &warehouse, TIDEMARK_PG, TIDEMARK_CH);
    agent.terminate();
}

#[test]
fn scd2_in_dbts_columns_with_tombstones_equals_the_postgres_sinks() {
    let (fixture, warehouse) = history_fixture(
        "INSERT INTO items (id, name, big) VALUES (1, 'one', repeat('x', 5000)), (2, 'two', NULL);",
        "columns = \"dbt\"\nhistory_deletes = true\nbatch_max_rows = 40\n",
    );
    let mut agent = fixture.setup.start();
    agent.wait_streaming();
    fixture.pg.psql(
        &fixture.db,
        "UPDATE items SET name = 'uno' WHERE id = 1;
         DELETE FROM items WHERE id = 2;
         INSERT INTO items (id, name) VALUES (2, 'two again');
         UPDATE items SET id = 3 WHERE id = 1;
         INSERT INTO pairs VALUES (1, 'a', 1), (2, 'b', 2);
         TRUNCATE pairs;
         INSERT INTO pairs VALUES (1, 'a', 3);
         BEGIN;
         INSERT INTO items (id, name) SELECT i, 'bulk' FROM generate_series(10, 200) i;
         UPDATE items SET name = 'bulk again' WHERE id % 3 = 0;
         DELETE FROM items WHERE id % 7 = 0;
         COMMIT;",
    );
    assert_same_history(
        &fixture,
        &warehouse,
        "dbt_scd_id, to_char(dbt_valid_from AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), \
         coalesce(to_char(dbt_valid_to AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), 'NULL'), \
         to_char(dbt_updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), dbt_is_deleted",
        "dbt_scd_id, toString(dbt_valid_from), ifNull(toString(dbt_valid_to), 'NULL'), \
         toString(dbt_updated_at), dbt_is_deleted",
    );
    agent.terminate();
}

#[test]
fn changelog_keeps_every_change_once_across_sigkills() {
    let mut rng = seed();
    let mut next_id = 0;
    let initial = initial_transactions(&mut rng, &mut next_id);
    let fixture = Fixture::with_sinks(&initial, |_, ch| {
        format!(
            "{}batch_max_rows = 40\n[[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n",
            ch.sink_toml("bronze", "bronze", "changelog")
        )
    });
    let agent = run_with_sigkills(&fixture, &mut rng, &mut next_id);
    // The JSONL sink writes every envelope once: the changelog holds the same, in order.
    let envelope_rows = |table: &str| -> Vec<String> {
        fixture
            .setup
            .envelopes()
            .iter()
            .filter(|e| e["source"]["table"] == table)
            .map(|e| format!("{}\t{}", e["op"].as_str().unwrap(), e["source"]["lsn"]))
            .collect()
    };
    for table in ["items", "pairs"] {
        let mut got = Vec::new();
        let same = eventually(Duration::from_secs(90), || {
            got = fixture
                .ch
                .try_query(&format!(
                    "SELECT _tidemark_op, _tidemark_lsn FROM bronze.{table} \
                     ORDER BY _tidemark_seq, _tidemark_row"
                ))
                .map(|out| out.lines().map(str::to_string).collect())
                .unwrap_or_default();
            got == envelope_rows(table)
        });
        assert!(
            same,
            "changelog of {table}: {} rows, the envelopes: {}",
            got.len(),
            envelope_rows(table).len()
        );
    }
    agent.terminate();
}

#[test]
fn changelog_rows_hold_the_row_the_old_row_and_the_commit() {
    let fixture = Fixture::with_sinks("", |_, ch| ch.sink_toml("bronze", "bronze", "changelog"));
    let mut agent = fixture.setup.start();
    agent.wait_streaming();
    fixture.pg.psql(
        &fixture.db,
        "ALTER TABLE items REPLICA IDENTITY FULL;
         INSERT INTO items (id, name, big) VALUES (1, 'one', repeat('x', 5000));
         UPDATE items SET name = 'uno' WHERE id = 1;
         UPDATE items SET id = 2 WHERE id = 1;
         DELETE FROM items WHERE id = 2;
         INSERT INTO pairs VALUES (1, 'a', 1);
         TRUNCATE pairs;",
    );
    let rows = |table: &str| {
        fixture.ch.try_query(&format!(
            "SELECT _tidemark_op, id, name, JSONExtractString(ifNull(_tidemark_before, '{{}}'), 'name'), \
             length(big), toDate(_tidemark_commit_time) = today() FROM bronze.{table} \
             ORDER BY _tidemark_seq, _tidemark_row"
        ))
    };
    let want = "c\t1\tone\t\t5000\t1\n\
                u\t1\tuno\tone\t5000\t1\n\
                d\t1\tuno\tuno\t5000\t1\n\
                c\t2\tuno\t\t5000\t1\n\
                d\t2\tuno\tuno\t5000\t1\n";
    let mut got = String::new();
    assert!(
        eventually(Duration::from_secs(60), || {
            got = rows("items").unwrap_or_default();
            got == want
        }),
        "items:\n{got}"
    );
    assert!(eventually(Duration::from_secs(60), || {
        fixture
            .ch
            .try_query("SELECT _tidemark_op, a, b FROM bronze.pairs ORDER BY _tidemark_seq")
            .is_ok_and(|out| out == "c\t1\ta\nt\t\\N\t\\N\n")
    }));
    let partition = fixture.ch.query(
        "SELECT partition_key FROM system.tables WHERE database = 'bronze' AND name = 'items'",
    );
    assert_eq!(partition.trim(), "toDate(_tidemark_commit_time)");
    agent.terminate();
}

#[test]
fn a_transaction_larger_than_a_batch_lands_as_its_last_state() {
    let Fixture { pg, ch, db, setup } = Fixture::new("", "batch_max_rows = 40\n");
    let mut agent = setup.start();
    agent.wait_streaming();
    // Each key is written in one chunk and changed again in later ones.
    pg.psql(
        &db,
        "BEGIN;
         INSERT INTO items (id, name, big) SELECT i, 'first',
           (SELECT string_agg(md5(j::text || i::text), '') FROM generate_series(1, 300) j)
           FROM generate_series(1, 150) i;
         UPDATE items SET name = 'second' WHERE id % 2 = 0;
         UPDATE items SET price = id WHERE id % 3 = 0;
         DELETE FROM items WHERE id % 5 = 0;
         INSERT INTO pairs SELECT i, 'p', i FROM generate_series(1, 100) i;
         UPDATE pairs SET v = -v;
         COMMIT;",
    );
    assert_mirrors(&pg, &db, &ch, "mirror");
    agent.terminate();
}

#[test]
fn check_says_what_the_server_is_and_how_to_fix_a_wrong_password() {
    // Every part is held: the source is checked too.
    let Fixture {
        pg: _pg,
        ch: _ch,
        db: _,
        setup,
    } = Fixture::new("", "");
    let check = setup.command("check");
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("ClickHouse 26.")
            && stdout.contains("user \"default\" may create tables in database \"mirror\""),
        "{stdout}"
    );
    let config = std::fs::read_to_string(setup.data_dir().with_file_name("tidemark.toml")).unwrap();
    std::fs::write(
        setup.data_dir().with_file_name("tidemark.toml"),
        config.replace(common::clickhouse::PASSWORD, "wrong"),
    )
    .unwrap();
    let check = setup.command("check");
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("user \"default\" was refused (wrong user or password)")
            && !stdout.contains("wrong@"),
        "{stdout}"
    );
}

#[test]
fn schema_changes_reach_every_mode_at_their_place_in_the_stream() {
    let fixture = Fixture::with_sinks("", |_, ch| {
        format!(
            "{}{}{}",
            ch.sink_toml("warehouse", "mirror", "merge"),
            ch.sink_toml("chhistory", "history", "scd2"),
            ch.sink_toml("bronze", "bronze", "changelog")
        )
    });
    let mut agent = fixture.setup.start();
    agent.wait_streaming();
    fixture.pg.psql(
        &fixture.db,
        "INSERT INTO items (id, name, price) VALUES (1, 'a', 1.5), (2, 'b', 2.5), (5, 'kept', 5);
         ALTER TABLE items ADD COLUMN qty int DEFAULT 7;
         INSERT INTO items (id, name, qty) VALUES (3, 'c', 9);
         BEGIN;
         UPDATE items SET name = 'a2' WHERE id = 1;
         ALTER TABLE items RENAME COLUMN name TO label;
         UPDATE items SET label = 'b2' WHERE id = 2;
         COMMIT;
         ALTER TABLE items ALTER COLUMN qty TYPE bigint;
         UPDATE items SET qty = 5000000000 WHERE id = 3;
         ALTER TABLE items DROP COLUMN tags;
         INSERT INTO items (id, label) VALUES (4, 'd');",
    );
    let columns = "id, label, qty, toString(price)";
    let want = sorted(&fixture.pg.psql(
        &fixture.db,
        "COPY (SELECT id, label, qty, trim_scale(price) FROM items) TO STDOUT",
    ));
    for (table, filter) in [("mirror.items", ""), ("history.items", " WHERE is_current")] {
        let mut got = Vec::new();
        let same = eventually(Duration::from_secs(60), || {
            got = fixture
                .ch
                .try_query(&format!("SELECT {columns} FROM {table} FINAL{filter}"))
                .map(|out| sorted(&out))
                .unwrap_or_default();
            got == want
        });
        assert!(
            same,
            "{table}: {got:?}, the source: {want:?}\n{}",
            agent.log()
        );
    }
    let changes = fixture.ch.query(
        "SELECT _tidemark_op, id, label, qty FROM bronze.items ORDER BY _tidemark_seq, _tidemark_row",
    );
    assert_eq!(
        changes,
        "c\t1\ta\t\\N\nc\t2\tb\t\\N\nc\t5\tkept\t\\N\nc\t3\tc\t9\nu\t1\ta2\t7\nu\t2\tb2\t7\n\
         u\t3\tc\t5000000000\nc\t4\td\t7\n"
    );
    for database in ["mirror", "history", "bronze"] {
        let types = fixture.ch.query(&format!(
            "SELECT name, type FROM system.columns WHERE database = '{database}' \
             AND table = 'items' AND name IN ('name', 'label', 'qty', 'tags') ORDER BY name"
        ));
        assert_eq!(
            types, "label\tNullable(String)\nqty\tNullable(Int64)\ntags\tArray(Nullable(Int32))\n",
            "{database}"
        );
    }
    agent.terminate();
}

#[test]
fn dlq_retry_applies_refused_rows_and_keeps_a_later_state_of_their_key() {
    let Fixture { pg, ch, db, setup } = Fixture::new("", "");
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(&db, "INSERT INTO items (id, name) VALUES (1, 'one');");
    assert!(eventually(Duration::from_secs(60), || {
        ch.try_query("SELECT count() FROM mirror.items FINAL")
            .is_ok_and(|out| out == "1\n")
    }));
    // A constraint of the warehouse's own refuses keys from 100 on.
    ch.query("ALTER TABLE mirror.items ADD CONSTRAINT small CHECK id < 100");
    pg.psql(
        &db,
        "INSERT INTO items (id, name) VALUES (2, 'two'), (100, 'first'), (101, 'other');",
    );
    let file = setup.data_dir().join("dead_letters/warehouse.jsonl");
    assert!(
        eventually(Duration::from_secs(60), || file.exists()
            && setup.dead_letters("warehouse").len() == 2),
        "{}",
        agent.log()
    );
    ch.query("ALTER TABLE mirror.items DROP CONSTRAINT small");
    pg.psql(&db, "UPDATE items SET name = 'second' WHERE id = 100;");
    assert!(eventually(Duration::from_secs(60), || {
        ch.try_query("SELECT name FROM mirror.items FINAL WHERE id = 100")
            .is_ok_and(|out| out == "second\n")
    }));
    assert!(agent.terminate().success());
    let (code, out, error) = dlq(&setup, &["retry", "--sink", "warehouse", "--all"]);
    assert_eq!(code, Some(0), "{out}{error}");
    assert!(
        out.contains("2 applied, 0 refused again, 0 dead letters left"),
        "{out}"
    );
    // 101 is back; 100 keeps its later state, whose version is higher than the letter's.
    assert_eq!(
        ch.query("SELECT id, name FROM mirror.items FINAL ORDER BY id"),
        "1\tone\n2\ttwo\n100\tsecond\n101\tother\n"
    );
    assert_eq!(
        sorted(&pg.psql(&db, "COPY (SELECT id, name FROM items) TO STDOUT")),
        sorted(&ch.query("SELECT id, name FROM mirror.items FINAL"))
    );
}

#[test]
fn dlq_retry_of_scd2_versions_skips_a_key_with_a_later_version() {
    let Fixture { pg, ch, db, setup } =
        Fixture::with_sinks("", |_, ch| ch.sink_toml("chhistory", "history", "scd2"));
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(&db, "INSERT INTO items (id, name) VALUES (1, 'one');");
    assert!(eventually(Duration::from_secs(60), || {
        ch.try_query("SELECT count() FROM history.items FINAL")
            .is_ok_and(|out| out == "1\n")
    }));
    ch.query("ALTER TABLE history.items ADD CONSTRAINT small CHECK id < 100");
    pg.psql(
        &db,
        "INSERT INTO items (id, name) VALUES (100, 'first'), (101, 'other');",
    );
    let file = setup.data_dir().join("dead_letters/chhistory.jsonl");
    assert!(
        eventually(Duration::from_secs(60), || file.exists()
            && setup.dead_letters("chhistory").len() == 2),
        "{}",
        agent.log()
    );
    ch.query("ALTER TABLE history.items DROP CONSTRAINT small");
    pg.psql(&db, "UPDATE items SET name = 'second' WHERE id = 100;");
    assert!(eventually(Duration::from_secs(60), || {
        ch.try_query("SELECT name FROM history.items FINAL WHERE id = 100")
            .is_ok_and(|out| out == "second\n")
    }));
    assert!(agent.terminate().success());
    let (code, out, error) = dlq(&setup, &["retry", "--sink", "chhistory", "--all"]);
    assert_eq!(code, Some(0), "{out}{error}");
    assert!(
        out.contains("skipped, the target holds a later version of its key")
            && out.contains("1 applied, 0 refused again, 1 dead letters left"),
        "{out}"
    );
    assert_eq!(
        ch.query(
            "SELECT id, name, toUInt8(is_current), _tidemark_op FROM history.items FINAL ORDER BY id"
        ),
        "1\tone\t1\tc\n100\tsecond\t1\tu\n101\tother\t1\tc\n"
    );
    assert_eq!(setup.dead_letters("chhistory").len(), 1);
}
