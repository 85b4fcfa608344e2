#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The MySQL / MariaDB source against a real MariaDB: the initial snapshot and the binlog
//! stream into a PostgreSQL merge sink, an SCD2 sink and JSONL, each target equal to its
//! source table, no envelope twice, through SIGKILLs of the agent and schema changes.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::agent::{eventually, every_sink, AgentSetup};
use common::mariadb::{assert_no_envelope_twice, MariaDb};
use common::PgCluster;
use rand::{Rng, SeedableRng};

/// How long a sink may take to apply what was committed before it is declared stuck.
const WAIT: Duration = Duration::from_secs(90);

/// The columns both dumps show alike: MariaDB's and PostgreSQL's text forms agree for them.
const ITEM_COLUMNS: &str = "id, name, price, qty, status, made, day, note";

/// A MariaDB database `db` with the `items` table, and a PostgreSQL `warehouse` for the
/// agent's sinks.
struct Shop {
    my: MariaDb,
    db: String,
    pg: PgCluster,
    warehouse: String,
}

impl Shop {
    fn open(my: MariaDb) -> Shop {
        let db = my.fresh_database("shop");
        create_items(&my, &db);
        let pg = PgCluster::start();
        let warehouse = pg.fresh_database("warehouse");
        Shop {
            my,
            db,
            pg,
            warehouse,
        }
    }

    fn parts(&self) -> (&MariaDb, &str, &PgCluster, &str) {
        (&self.my, &self.db, &self.pg, &self.warehouse)
    }

    /// An agent that captures `tables` (TOML strings) into a sink of each kind.
    fn agent(&self, tables: &str) -> AgentSetup {
        AgentSetup::with_source(
            &self.my.source_toml(&self.db, tables),
            &every_sink(&self.pg.url(&self.warehouse)),
        )
    }
}

fn create_items(my: &MariaDb, db: &str) {
    my.exec(
        db,
        "CREATE TABLE items (
            id INT PRIMARY KEY,
            name VARCHAR(40) NOT NULL,
            price DECIMAL(10,2),
            qty INT UNSIGNED,
            status ENUM('new','paid','sent'),
            made DATETIME,
            day DATE,
            note TEXT
        )",
    );
}

/// Waits until the mirror of `table` equals the source table.
fn assert_mirrored(
    my: &MariaDb,
    db: &str,
    pg: &PgCluster,
    warehouse: &str,
    table: &str,
    columns: &str,
) {
    assert_mirrored_as(my, db, pg, warehouse, table, columns, columns);
}

/// Waits until the mirror of `table` equals the source table, each side read with its own
/// expressions where the two servers print a value differently.
fn assert_mirrored_as(
    my: &MariaDb,
    db: &str,
    pg: &PgCluster,
    warehouse: &str,
    table: &str,
    source_columns: &str,
    mirror_columns: &str,
) {
    let mut last = (String::new(), String::new());
    let same = eventually(WAIT, || {
        last = (
            my.dump(db, table, source_columns),
            pg.dump(warehouse, &format!("replica.{table}"), mirror_columns),
        );
        last.0 == last.1
    });
    assert!(
        same,
        "the mirror of {table} differs from the source\n--- source\n{}\n--- mirror\n{}",
        last.0, last.1
    );
}

/// The current versions in the SCD2 history equal the source table.
fn assert_history_current(
    my: &MariaDb,
    db: &str,
    pg: &PgCluster,
    warehouse: &str,
    table: &str,
    columns: &str,
) {
    let source = my.dump(db, table, columns);
    let mut current = String::new();
    let same = eventually(WAIT, || {
        current = pg
            .try_psql(
                warehouse,
                &format!(
                    "COPY (SELECT {columns} FROM history.{table} WHERE is_current ORDER BY 1, 2) \
                     TO STDOUT"
                ),
            )
            .unwrap_or_default();
        current.trim_end() == source.trim_end()
    });
    assert!(
        same,
        "history.{table}'s current versions differ\n--- source\n{source}\n--- current\n{current}"
    );
}

#[test]
fn snapshot_then_binlog_reach_every_sink_with_mysql_envelopes() {
    let shop = Shop::open(MariaDb::start());
    let (my, db, pg, warehouse) = shop.parts();
    my.exec(
        db,
        "INSERT INTO items VALUES
            (1, 'pen', 1.50, 10, 'new', '2024-01-02 03:04:05', '2024-01-02', NULL),
            (2, 'ink', 12.00, 4000000000, 'paid', '1999-12-31 23:59:59', '1999-12-31', 'it''s\\ttabbed'),
            (3, 'pad', NULL, NULL, NULL, NULL, NULL, 'ünïcode')",
    );
    let setup = shop.agent(&format!("\"{db}.items\""));
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);
    assert_mirrored(my, db, pg, warehouse, "items", ITEM_COLUMNS);

    my.exec(
        db,
        "START TRANSACTION;
         INSERT INTO items VALUES (4, 'cap', 3.25, 1, 'sent', '2024-06-01 12:00:00', '2024-06-01', 'x');
         UPDATE items SET price = 2.00, status = 'paid' WHERE id = 1;
         COMMIT;
         START TRANSACTION;
         INSERT INTO items VALUES (5, 'gone', 0, 0, 'new', NULL, NULL, NULL);
         ROLLBACK;
         UPDATE items SET id = 20 WHERE id = 2;
         DELETE FROM items WHERE id = 3;",
    );
    assert_mirrored(my, db, pg, warehouse, "items", ITEM_COLUMNS);
    assert_history_current(my, db, pg, warehouse, "items", ITEM_COLUMNS);

    let mut envelopes = Vec::new();
    assert!(eventually(WAIT, || {
        envelopes = setup.envelopes();
        envelopes.len() >= 8
    }));
    let ops: Vec<&str> = envelopes
        .iter()
        .map(|e| e["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["r", "r", "r", "c", "u", "d", "c", "d"]);
    let insert = &envelopes[3];
    assert_eq!(insert["source"]["connector"], "mysql");
    assert_eq!(insert["source"]["db"], db);
    assert_eq!(insert["source"]["table"], "items");
    assert_eq!(insert["source"]["server_id"], my.server_id());
    assert!(insert["source"]["file"]
        .as_str()
        .unwrap()
        .starts_with("binlog."));
    assert!(insert["source"]["gtid"].as_str().unwrap().starts_with("0-"));
    assert_eq!(insert["after"]["qty"], 1);
    assert_eq!(insert["after"]["status"], "sent");
    assert_eq!(envelopes[1]["after"]["qty"], 4_000_000_000u64);
    assert_eq!(envelopes[2]["after"]["note"], "ünïcode");
    // The update's before image is whole (binlog_row_image = FULL).
    assert_eq!(envelopes[4]["before"]["price"], "1.50");
    assert_eq!(envelopes[4]["after"]["price"], "2.00");
    agent.terminate();
}

#[test]
fn sigkills_under_a_random_workload_lose_and_double_nothing() {
    let shop = Shop::open(MariaDb::start());
    let (my, db, pg, warehouse) = shop.parts();
    my.exec(
        db,
        "CREATE TABLE order_lines (
            order_id INT NOT NULL,
            line SMALLINT NOT NULL,
            amount BIGINT UNSIGNED,
            PRIMARY KEY (order_id, line)
        )",
    );
    my.exec(
        db,
        "CREATE TABLE gadgets (
            id INT PRIMARY KEY,
            ratio FLOAT,
            weight DOUBLE,
            flags BIT(5),
            lasts TIME,
            seen TIMESTAMP(6) NULL,
            built YEAR,
            spec JSON,
            parts SET('bolt','nut','gear'),
            blob_data BLOB,
            place POINT
        )",
    );
    let setup = shop.agent(&format!("\"{db}.*\""));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7d3a_2026);
    let mut next_id = 1;
    for round in 0..4 {
        let mut agent = setup.start();
        agent.wait_log("streaming the binlog", WAIT);
        for _ in 0..40 {
            let mut statements = vec!["START TRANSACTION".to_owned()];
            for _ in 0..rng.gen_range(1..6) {
                let id = rng.gen_range(1..next_id + 2);
                statements.push(match rng.gen_range(0..8) {
                    6 => gadget_upsert(&mut rng, id),
                    7 => format!("DELETE FROM gadgets WHERE id = {id}"),
                    0 | 1 => {
                        next_id += 1;
                        format!(
                            "INSERT INTO items VALUES ({next_id}, 'n{next_id}', {}.{:02}, {}, 'new', \
                             '2024-01-01 00:00:00', '2024-01-01', NULL)",
                            rng.gen_range(0..1000),
                            rng.gen_range(0..100),
                            rng.gen_range(0..u32::MAX)
                        )
                    }
                    2 => format!("UPDATE items SET qty = qty + 1, status = 'paid' WHERE id = {id}"),
                    3 => format!("DELETE FROM items WHERE id = {id}"),
                    4 => format!(
                        "INSERT INTO order_lines VALUES ({id}, {}, {}) ON DUPLICATE KEY UPDATE amount = amount + 1",
                        rng.gen_range(0..3),
                        rng.gen_range(0..u64::MAX / 2)
                    ),
                    _ => format!("UPDATE items SET id = {} WHERE id = {id}", id + 100_000 * (round + 1)),
                });
            }
            statements.push(
                if rng.gen_bool(0.1) {
                    "ROLLBACK"
                } else {
                    "COMMIT"
                }
                .to_owned(),
            );
            // A key move may collide with an earlier move: the transaction then fails whole.
            let _ = my.try_exec(db, &statements.join(";\n"));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
        agent.kill();
    }
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);
    assert_mirrored(my, db, pg, warehouse, "items", ITEM_COLUMNS);
    assert_mirrored(
        my,
        db,
        pg,
        warehouse,
        "order_lines",
        "order_id, line, amount",
    );
    assert_history_current(my, db, pg, warehouse, "items", ITEM_COLUMNS);
    assert_mirrored_as(
        my,
        db,
        pg,
        warehouse,
        "gadgets",
        "id, ratio, weight, LPAD(LOWER(HEX(flags)), 2, '0'), lasts, \
         CAST(UNIX_TIMESTAMP(seen) * 1000000 AS SIGNED), built, spec, parts, \
         LOWER(HEX(blob_data)), ST_AsText(place)",
        "id, ratio, weight, encode(flags, 'hex'), lasts, \
         (extract(epoch FROM seen) * 1000000)::bigint, built, spec, parts, \
         encode(blob_data, 'hex'), place",
    );
    agent.terminate();

    assert_no_envelope_twice(&setup.envelopes());
}

/// Inserts or replaces gadget `id` with random values of the types `items` lacks, exact in
/// both servers' text (binary fractions, whole seconds).
fn gadget_upsert(rng: &mut impl Rng, id: u32) -> String {
    let parts = ["", "bolt", "nut", "bolt,gear", "bolt,nut,gear"][rng.gen_range(0..5)];
    let values = [
        format!("{}", f64::from(rng.gen_range(-4000..4000)) / 4.0),
        format!("{}", f64::from(rng.gen_range(-80_000..80_000)) / 64.0),
        format!("b'{:05b}'", rng.gen_range(0..32)),
        format!(
            "'{:02}:{:02}:{:02}'",
            rng.gen_range(0..24),
            rng.gen_range(0..60),
            rng.gen_range(0..60)
        ),
        format!(
            "FROM_UNIXTIME({}.{:06})",
            rng.gen_range(1..2_000_000_000),
            rng.gen_range(0..1_000_000)
        ),
        format!("{}", rng.gen_range(1901..2155)),
        format!(
            "'{{\"size\":{},\"tags\":[\"a\",\"ü\"],\"ok\":true}}'",
            rng.gen_range(0..1000)
        ),
        format!("'{parts}'"),
        format!("x'{:08x}00ff'", rng.gen::<u32>()),
        format!(
            "ST_GeomFromText('POINT({} {})')",
            rng.gen_range(-180..180),
            rng.gen_range(-90..90)
        ),
    ];
    let values: Vec<String> = values
        .into_iter()
        .map(|value| {
            if rng.gen_bool(0.15) {
                "NULL".to_owned()
            } else {
                value
            }
        })
        .collect();
    format!("REPLACE INTO gadgets VALUES ({id}, {})", values.join(", "))
}

#[test]
fn columns_added_renamed_and_dropped_mid_stream_reach_the_mirror() {
    let shop = Shop::open(MariaDb::start());
    let (my, db, pg, warehouse) = shop.parts();
    my.exec(
        db,
        "INSERT INTO items (id, name) VALUES (1, 'pen'), (2, 'ink')",
    );
    let setup = shop.agent(&format!("\"{db}.items\""));
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);
    my.exec(
        db,
        "ALTER TABLE items ADD COLUMN color VARCHAR(10) NOT NULL DEFAULT 'red';
         INSERT INTO items (id, name, color) VALUES (3, 'cap', 'blue');
         ALTER TABLE items DROP COLUMN note;
         UPDATE items SET name = 'pencil' WHERE id = 1;
         ALTER TABLE items RENAME COLUMN name TO title, CHANGE COLUMN qty quantity BIGINT UNSIGNED;
         UPDATE items SET quantity = 7 WHERE id = 2;",
    );
    assert_mirrored(my, db, pg, warehouse, "items", "id, title, quantity, color");
    agent.terminate();
}

#[test]
fn compressed_binlog_events_are_read_not_skipped() {
    let shop = Shop::open(MariaDb::start_with(&[
        ("log_bin_compress", "ON"),
        ("log_bin_compress_min_len", "10"),
    ]));
    let (my, db, pg, warehouse) = shop.parts();
    let setup = shop.agent(&format!("\"{db}.items\""));
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);
    let long_note = "compressible ".repeat(400);
    my.exec(
        db,
        &format!(
            "START TRANSACTION;
             INSERT INTO items VALUES
                (1, 'pen', 1.50, 10, 'new', '2024-01-02 03:04:05', '2024-01-02', '{long_note}'),
                (2, 'ink', 12.00, 4000000000, 'paid', NULL, NULL, 'short');
             UPDATE items SET note = CONCAT(note, 'more'), qty = 11 WHERE id = 1;
             COMMIT;
             DELETE FROM items WHERE id = 2;
             ALTER TABLE items ADD COLUMN color VARCHAR(10) NOT NULL DEFAULT 'red' COMMENT 'a \
             comment long enough that the statement is compressed';
             INSERT INTO items (id, name, color, note) VALUES (3, 'cap', 'blue', '{long_note}');"
        ),
    );
    let status = my.query(db, "SHOW MASTER STATUS");
    let file = status.split_whitespace().next().unwrap();
    let events = my.query(db, &format!("SHOW BINLOG EVENTS IN '{file}'"));
    for compressed in [
        "Write_rows_compressed",
        "Update_rows_compressed",
        "Delete_rows_compressed",
        "Query_compressed",
    ] {
        assert!(
            events.contains(compressed),
            "the server wrote no {compressed} event, so this test would prove nothing:\n{events}"
        );
    }
    assert_mirrored(
        my,
        db,
        pg,
        warehouse,
        "items",
        "id, name, price, qty, status, made, day, note, color",
    );
    assert_history_current(my, db, pg, warehouse, "items", "id, name, note, color");
    let ops: Vec<String> = setup
        .envelopes()
        .iter()
        .map(|e| e["op"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ops, ["c", "c", "u", "d", "c"]);
    agent.terminate();
}

#[test]
fn without_a_snapshot_capture_starts_with_the_next_transaction() {
    let shop = Shop::open(MariaDb::start());
    let (my, db, pg, warehouse) = shop.parts();
    my.exec(
        db,
        "INSERT INTO items (id, name) VALUES (1, 'before the start')",
    );
    let setup = AgentSetup::with_source(
        &format!(
            "{}snapshot = \"never\"\n",
            my.source_toml(db, &format!("\"{db}.items\""))
        ),
        &every_sink(&pg.url(warehouse)),
    );
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);
    // The first transaction the server writes starts exactly where capture started.
    my.exec(
        db,
        "INSERT INTO items (id, name) VALUES (2, 'first'), (3, 'first')",
    );
    my.exec(db, "UPDATE items SET name = 'second' WHERE id = 3");
    let mut ops = Vec::new();
    assert!(
        eventually(WAIT, || {
            ops = setup
                .envelopes()
                .iter()
                .map(|e| {
                    (
                        e["op"].as_str().unwrap().to_owned(),
                        e["after"]["id"].as_i64(),
                    )
                })
                .collect();
            ops.len() >= 3
        }),
        "envelopes: {ops:?}"
    );
    let expected = [("c", 2), ("c", 3), ("u", 3)].map(|(op, id)| (op.to_owned(), Some(id)));
    assert_eq!(ops, expected);
    agent.terminate();
}

#[test]
fn rows_written_before_later_ddl_decode_as_the_binlog_describes_them() {
    let shop = Shop::open(MariaDb::start());
    let (my, db, pg, warehouse) = shop.parts();
    my.exec(db, "INSERT INTO items (id, name) VALUES (1, 'pen')");
    let setup = shop.agent(&format!("\"{db}.items\""));
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);
    assert_mirrored(my, db, pg, warehouse, "items", ITEM_COLUMNS);
    agent.terminate();

    // While the agent is stopped, columns come and go: when it reads these rows, the
    // catalog no longer has the columns they were written with.
    my.exec(
        db,
        "ALTER TABLE items ADD COLUMN grade ENUM('low','mid','high') NOT NULL DEFAULT 'low', \
            ADD COLUMN weight INT UNSIGNED, ADD COLUMN tag VARBINARY(4);
         INSERT INTO items (id, name, grade, weight, tag) VALUES (2, 'ink', 'high', 4000000000, x'00ff');
         ALTER TABLE items DROP COLUMN grade, DROP COLUMN weight, DROP COLUMN tag;
         INSERT INTO items (id, name) VALUES (3, 'cap');
         ALTER TABLE items RENAME COLUMN name TO title;
         INSERT INTO items (id, title) VALUES (4, 'mug');",
    );
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);
    assert_mirrored(
        my,
        db,
        pg,
        warehouse,
        "items",
        "id, title, price, qty, status, made, day, note",
    );
    let envelopes = setup.envelopes();
    let inserted = |id: i64| {
        envelopes
            .iter()
            .find(|e| e["op"] == "c" && e["after"]["id"] == id)
            .unwrap_or_else(|| panic!("no insert of {id} in {envelopes:?}"))
    };
    let ink = &inserted(2)["after"];
    assert_eq!(ink["name"], "ink");
    assert_eq!(ink["grade"], "high");
    assert_eq!(ink["weight"], 4_000_000_000u64);
    assert_eq!(ink["tag"], "AP8=");
    assert!(inserted(3)["after"].get("grade").is_none());
    assert_eq!(inserted(4)["after"]["title"], "mug");
    agent.terminate();
}

#[test]
fn restarts_resume_by_gtid_and_stop_when_the_binlog_was_purged() {
    let shop = Shop::open(MariaDb::start());
    let (my, db, pg, warehouse) = shop.parts();
    let setup = shop.agent(&format!("\"{db}.items\""));
    let insert = |ids: std::ops::Range<u32>| {
        for id in ids {
            my.exec(
                db,
                &format!("INSERT INTO items (id, name) VALUES ({id}, 'n{id}')"),
            );
        }
    };
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);
    insert(1..5);
    assert_mirrored(my, db, pg, warehouse, "items", ITEM_COLUMNS);
    agent.terminate();

    // Changes while the agent is down span a new binlog file.
    insert(5..8);
    my.exec(db, "FLUSH BINARY LOGS");
    insert(8..11);
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);
    let resumed_from = agent
        .log()
        .lines()
        .find(|line| line.contains("streaming the binlog"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        resumed_from.contains("gtid_state=\"0-"),
        "the restart did not resume by GTID: {resumed_from}"
    );
    assert_mirrored(my, db, pg, warehouse, "items", ITEM_COLUMNS);
    agent.terminate();
    let mut seen = BTreeMap::new();
    for envelope in setup.envelopes() {
        *seen.entry(envelope["after"]["id"].as_u64()).or_insert(0) += 1;
    }
    assert!(
        seen.values().all(|n| *n == 1) && seen.len() == 10,
        "each insert once: {seen:?}"
    );

    // The binlog after the log's last transaction is purged while the agent is down.
    insert(11..12);
    my.exec(db, "FLUSH BINARY LOGS");
    let status = my.query(db, "SHOW MASTER STATUS");
    let newest = status.split_whitespace().next().unwrap().to_owned();
    // The server keeps a file a replica still reads: the stopped agent's dump thread may
    // not be gone yet.
    assert!(eventually(WAIT, || {
        my.exec(db, &format!("PURGE BINARY LOGS TO '{newest}'"));
        my.query(db, "SHOW BINARY LOGS").lines().count() == 1
    }));
    let mut agent = setup.start();
    assert!(
        eventually(WAIT, || !agent.is_running()),
        "the agent went on without the binlog it needs:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("Capture again from a new snapshot"),
        "the agent stopped without the recovery command:\n{log}"
    );
}
