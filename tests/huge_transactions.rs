//! Huge transactions (issue 7): PostgreSQL streams a transaction that outgrows
//! `logical_decoding_work_mem` to the agent while it is still in progress (pgoutput protocol
//! v2, `streaming`), and the sinks must still receive it whole, once and in commit order, or
//! not at all when it aborts.
//!
//! The clusters run with `logical_decoding_work_mem = 1MB`, so every big transaction here
//! outgrows it, and each test ends by checking in `pg_stat_replication_slots` that PostgreSQL
//! streamed it: for an agent that does not ask for streaming, PostgreSQL spills the
//! transaction to disk and sends it only after its commit. Tables are compared by digest (the
//! row count and the md5 of the rows in key order, each computed by its own database), so a
//! million rows never pass through psql's output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::agent::{eventually, mirror_sink, Agent, AgentSetup};
use common::PgCluster;
use serde_json::Value;

/// How long a sink may take to apply what was committed before it is declared stuck: a debug
/// build of the agent on a busy machine takes minutes over a million changes.
const WAIT: Duration = Duration::from_secs(600);

/// The agent's slot, `tidemark_<agent.name>`: the harness names every agent `test`.
const SLOT: &str = "tidemark_test";

/// Every source's tables: `tick` marks how far the sinks have applied (see
/// [`Scenario::sync`]); `big` takes the huge transactions.
const SCHEMA: &str = "CREATE TABLE tick (id int PRIMARY KEY);
     CREATE TABLE big (id int PRIMARY KEY, payload text NOT NULL, n int NOT NULL);";

/// The columns of `big` that [`digest`] compares.
const BIG: &str = "id, payload, n";

/// A sink a test runs; each writes into the warehouse database.
#[derive(Debug, Clone, Copy)]
enum Sink {
    /// merge into schema `replica`.
    Mirror,
    /// scd2 into schema `history`.
    History,
    /// jsonl into the directory `events`.
    Events,
}

impl Sink {
    /// The sink's `[[sink]]` table.
    fn config(self, warehouse_url: &str) -> String {
        match self {
            Sink::Mirror => mirror_sink(warehouse_url),
            Sink::History => format!(
                "[[sink]]\nname = \"history\"\ntype = \"postgres\"\nurl = \"{warehouse_url}\"\n\
                 schema = \"history\"\nmode = \"scd2\"\n"
            ),
            Sink::Events => {
                "[[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n".to_string()
            }
        }
    }
}

/// A cluster that streams big transactions, a source database, a warehouse, and an agent
/// capturing `public.*` into `sinks`.
struct Scenario {
    pg: PgCluster,
    db: String,
    wh: String,
    sinks: &'static [Sink],
    setup: AgentSetup,
    agent: Agent,
}

impl Scenario {
    /// Starts it all with [`SCHEMA`] and `more_schema` in the source, and waits until the
    /// agent streams.
    fn start(more_schema: &str, sinks: &'static [Sink]) -> Scenario {
        // A walsender ends a connection silent for longer than its timeout: appending a
        // committed streamed transaction of a million changes takes the agent longer than
        // this, so it must keep telling the server it is alive meanwhile.
        let pg = PgCluster::start_with(&[
            ("logical_decoding_work_mem", "1MB"),
            ("wal_sender_timeout", "2s"),
        ]);
        let db = pg.fresh_database("source");
        let wh = pg.fresh_database("warehouse");
        pg.psql(&db, &format!("{SCHEMA}\n{more_schema}"));
        let config: Vec<String> = sinks.iter().map(|sink| sink.config(&pg.url(&wh))).collect();
        let setup = AgentSetup::with_sinks(&pg.url(&db), "\"public.*\"", &config.join("\n"));
        let mut agent = setup.start();
        agent.wait_streaming();
        Scenario {
            pg,
            db,
            wh,
            sinks,
            setup,
            agent,
        }
    }

    /// Commits a new `tick` row and waits until every sink holds it. Transactions are
    /// applied whole and in commit order, so then every transaction committed before it is
    /// applied too.
    fn sync(&self) {
        let id: i64 = self
            .pg
            .psql(
                &self.db,
                "INSERT INTO tick SELECT coalesce(max(id), 0) + 1 FROM tick RETURNING id",
            )
            .parse()
            .unwrap();
        for sink in self.sinks {
            let holds_tick = || match sink {
                Sink::Mirror => self.warehouse_counts_one(&format!(
                    "SELECT count(*) FROM replica.tick WHERE id = {id}"
                )),
                Sink::History => self.warehouse_counts_one(&format!(
                    "SELECT count(*) FROM history.tick WHERE id = {id} AND is_current"
                )),
                // The tick commits last, so it is the last envelope.
                Sink::Events => last_envelope(&self.setup.events_dir())
                    .is_some_and(|e| e["source"]["table"] == "tick" && e["after"]["id"] == id),
            };
            assert!(
                eventually(WAIT, holds_tick),
                "sink {sink:?} did not apply tick {id} within {WAIT:?}\n--- agent log ---\n{}",
                self.agent.log()
            );
        }
    }

    /// Whether `count_query` counts exactly one row in the warehouse.
    fn warehouse_counts_one(&self, count_query: &str) -> bool {
        self.pg.try_psql(&self.wh, count_query).as_deref() == Some("1")
    }

    /// Asserts that the mirror's `table` holds exactly the source's rows.
    fn assert_mirrors(&self, table: &str, columns: &str) {
        assert_eq!(
            digest(&self.pg, &self.wh, &format!("replica.{table}"), columns),
            digest(&self.pg, &self.db, &format!("public.{table}"), columns),
            "replica.{table} (left) differs from public.{table} (right)"
        );
    }

    /// The digest of `big`'s rows in the source.
    fn source_big(&self) -> String {
        digest(&self.pg, &self.db, "public.big", BIG)
    }

    /// The digest of the versions in `history.big` that `condition` selects.
    fn history_big(&self, condition: &str) -> String {
        digest(
            &self.pg,
            &self.wh,
            &format!("history.big WHERE {condition}"),
            BIG,
        )
    }

    /// `history.big` in numbers: versions, current versions, keys, commits (distinct
    /// `_tidemark_lsn`) and versions per `_tidemark_op`.
    fn history_shape(&self) -> String {
        self.pg.psql(
            &self.wh,
            "SELECT format('versions %s, current %s, keys %s, commits %s, ops %s',
                count(*), count(*) FILTER (WHERE is_current), count(DISTINCT id),
                count(DISTINCT _tidemark_lsn),
                (SELECT string_agg(_tidemark_op || ':' || n, ' ' ORDER BY _tidemark_op)
                 FROM (SELECT _tidemark_op, count(*) AS n FROM history.big GROUP BY 1) ops))
             FROM history.big",
        )
    }

    /// How many keys of `history.big` have a closed create followed by an update version
    /// that starts where the create ends.
    fn updates_chained_to_their_create(&self) -> String {
        self.pg.psql(
            &self.wh,
            "SELECT count(*) FROM history.big c JOIN history.big u USING (id)
             WHERE c._tidemark_op = 'c' AND u._tidemark_op = 'u' AND NOT c.is_current
               AND c._tidemark_lsn < u._tidemark_lsn AND c.valid_to = u.valid_from",
        )
    }

    /// Asserts that PostgreSQL streamed at least `transactions` transactions to the agent's
    /// slot while they were in progress, rather than holding them back until their commit;
    /// returns `stream_count`, the number of stream blocks it sent. The slot's statistics
    /// trail the stream, so this polls.
    fn assert_streamed(&self, transactions: u64) -> u64 {
        let query = format!(
            "SELECT stream_txns, stream_count, spill_txns FROM pg_stat_replication_slots \
             WHERE slot_name = '{SLOT}'"
        );
        let mut stats: Vec<u64> = Vec::new();
        let streamed = eventually(Duration::from_secs(30), || {
            stats = self
                .pg
                .try_psql(&self.db, &query)
                .unwrap_or_default()
                .split('|')
                .filter_map(|n| n.parse().ok())
                .collect();
            stats.first().is_some_and(|&txns| txns >= transactions)
        });
        assert!(
            streamed,
            "PostgreSQL streamed fewer than {transactions} in-progress transactions to slot \
             {SLOT} ([stream_txns, stream_count, spill_txns] = {stats:?}); it spills a big \
             transaction to disk and sends it after its commit when the agent does not ask \
             for pgoutput streaming"
        );
        stats[1]
    }
}

/// The last complete envelope in the JSONL sink's last file: cheap enough to poll while
/// hundreds of thousands of envelopes precede it, where [`AgentSetup::envelopes`] parses them
/// all.
fn last_envelope(dir: &Path) -> Option<Value> {
    let last_file = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .max()?;
    let text = std::fs::read_to_string(last_file).ok()?;
    // The agent may be writing: a last line without its newline is not complete yet.
    let complete = &text[..text.rfind('\n')?];
    serde_json::from_str(complete.lines().last()?).ok()
}

/// `count|md5` of `relation`'s rows (a table, optionally followed by `WHERE …`), each row its
/// `columns` joined by `:`, in `id` order.
fn digest(pg: &PgCluster, database: &str, relation: &str, columns: &str) -> String {
    pg.psql(
        database,
        &format!(
            "SELECT count(*) || '|' || coalesce(md5(string_agg(concat_ws(':', {columns}), ',' \
             ORDER BY id)), '') FROM {relation}"
        ),
    )
}

#[test]
fn a_million_row_transaction_replicates_exactly_to_merge_and_scd2() {
    let s = Scenario::start("", &[Sink::Mirror, Sink::History]);

    s.pg.psql(
        &s.db,
        "INSERT INTO big SELECT g, md5(g::text), g FROM generate_series(1, 1000000) g",
    );
    s.sync();
    let inserted = s.source_big();
    s.assert_mirrors("big", BIG);
    assert_eq!(
        s.history_shape(),
        "versions 1000000, current 1000000, keys 1000000, commits 1, ops c:1000000"
    );
    assert_eq!(s.history_big("is_current"), inserted);

    s.pg.psql(&s.db, "UPDATE big SET n = n + 1, payload = md5(payload)");
    s.sync();
    let updated = s.source_big();
    s.assert_mirrors("big", BIG);
    assert_eq!(
        s.history_shape(),
        "versions 2000000, current 1000000, keys 1000000, commits 2, ops c:1000000 u:1000000"
    );
    assert_eq!(s.history_big("is_current"), updated);
    assert_eq!(s.history_big("NOT is_current"), inserted);
    assert_eq!(s.updates_chained_to_their_create(), "1000000");

    s.pg.psql(&s.db, "DELETE FROM big");
    s.sync();
    assert_eq!(s.source_big(), "0|");
    s.assert_mirrors("big", BIG);
    assert_eq!(
        s.history_shape(),
        "versions 2000000, current 0, keys 1000000, commits 2, ops c:1000000 u:1000000"
    );
    assert_eq!(s.history_big("_tidemark_op = 'c'"), inserted);
    assert_eq!(s.history_big("_tidemark_op = 'u'"), updated);
    assert_eq!(s.updates_chained_to_their_create(), "1000000");
    // The delete closed every key's last version, all at its one commit time.
    assert_eq!(
        s.pg.psql(
            &s.wh,
            "SELECT count(*) FILTER (WHERE valid_to IS NULL) || '|' ||
                    count(DISTINCT valid_to) FILTER (WHERE _tidemark_op = 'u') || '|' ||
                    bool_and(valid_to > valid_from) FILTER (WHERE _tidemark_op = 'u')
             FROM history.big",
        ),
        "0|1|true"
    );

    s.assert_streamed(3);
    assert!(
        !s.agent.log().contains("source interrupted"),
        "the replication connection was lost:\n{}",
        s.agent.log()
    );
    assert!(s.agent.terminate().success());
}

#[test]
fn one_version_per_key_when_a_transaction_spans_many_batches() {
    let s = Scenario::start("", &[Sink::Mirror, Sink::History]);

    // 440,000 changes in one transaction; a sink's batch holds at most 10,000 by default.
    s.pg.psql(
        &s.db,
        "BEGIN;
         INSERT INTO big SELECT g, md5(g::text), g FROM generate_series(1, 200000) g;
         UPDATE big SET n = n + 1, payload = md5(payload);
         DELETE FROM big WHERE id % 10 = 0;
         UPDATE big SET n = -n WHERE id % 10 = 1;
         COMMIT;",
    );
    s.sync();
    s.assert_mirrors("big", BIG);
    assert_eq!(
        s.history_shape(),
        "versions 180000, current 180000, keys 180000, commits 1, ops c:180000"
    );
    assert_eq!(s.history_big("true"), s.source_big());
    assert_eq!(
        s.pg.psql(&s.wh, "SELECT count(*) FROM history.big WHERE id % 10 = 0"),
        "0",
        "a key deleted in the transaction that created it has a version"
    );
    assert!(
        s.agent.log().contains("splitting it by key"),
        "{}",
        s.agent.log()
    );

    s.assert_streamed(1);
    assert!(s.agent.terminate().success());
}

#[test]
fn a_large_transaction_that_truncates_or_moves_keys_is_one_version_per_key() {
    let s = Scenario::start("ALTER TABLE big ADD COLUMN doc text;", &[Sink::History]);
    s.pg.psql(
        &s.db,
        "INSERT INTO big SELECT g, md5(g::text), g FROM generate_series(1, 30000) g",
    );
    // Every row updated, the table truncated, rows written again (some under old keys): split
    // by key, each partition ends the versions before the truncate.
    s.pg.psql(
        &s.db,
        "BEGIN;
         UPDATE big SET n = n + 1;
         TRUNCATE big;
         INSERT INTO big SELECT g, md5(g::text), -g FROM generate_series(1, 40000) g;
         COMMIT;",
    );
    s.sync();
    assert_eq!(
        s.history_shape(),
        "versions 70000, current 40000, keys 40000, commits 2, ops c:70000"
    );
    assert_eq!(s.history_big("is_current"), s.source_big());
    assert_eq!(
        s.pg.psql(
            &s.wh,
            "SELECT count(DISTINCT valid_to) FROM history.big WHERE NOT is_current"
        ),
        "1",
        "the truncate ends every earlier version at its commit"
    );
    assert!(
        s.agent.log().contains("splitting it by key"),
        "{}",
        s.agent.log()
    );

    // Half the rows move to new keys, most in another partition: split as well.
    s.pg.psql(&s.db, "UPDATE big SET id = id + 1000000 WHERE id % 2 = 0");
    s.sync();
    assert_eq!(
        s.history_shape(),
        "versions 90000, current 40000, keys 60000, commits 3, ops c:90000"
    );
    assert_eq!(s.history_big("is_current"), s.source_big());
    assert!(
        !s.agent.log().contains("applying it whole"),
        "{}",
        s.agent.log()
    );

    // Some rows get a TOASTed value, then every old key moves: the moves leave it unchanged,
    // so that transaction is applied whole, and the value is carried to the new keys.
    s.pg.psql(
        &s.db,
        "UPDATE big SET doc = (SELECT string_agg(md5(random()::text), '')
                               FROM generate_series(1, 300)) WHERE id <= 100",
    );
    s.pg.psql(&s.db, "UPDATE big SET id = id + 2000000 WHERE id < 1000000");
    s.sync();
    assert_eq!(
        s.history_shape(),
        "versions 110050, current 40000, keys 80000, commits 5, ops c:110000 u:50"
    );
    assert_eq!(s.history_big("is_current"), s.source_big());
    let docs = "SELECT count(doc) || '|' || md5(string_agg(md5(doc), ',' ORDER BY id))";
    assert_eq!(
        s.pg.psql(&s.wh, &format!("{docs} FROM history.big WHERE is_current")),
        s.pg.psql(&s.db, &format!("{docs} FROM big")),
    );
    assert!(
        s.agent.log().contains("applying it whole"),
        "{}",
        s.agent.log()
    );
    let partitions = s
        .setup
        .data_dir()
        .join("large_transactions")
        .join("history");
    assert_eq!(
        std::fs::read_dir(&partitions).unwrap().count(),
        0,
        "partition files left in {}",
        partitions.display()
    );
    assert!(s.agent.terminate().success());
}

#[test]
fn an_aborted_transaction_leaves_no_trace() {
    let s = Scenario::start("", &[Sink::Mirror, Sink::History, Sink::Events]);

    s.pg.psql(
        &s.db,
        "BEGIN;
         INSERT INTO big SELECT g, 'aborted', g FROM generate_series(1000001, 1500000) g;
         ROLLBACK;",
    );
    s.pg.psql(
        &s.db,
        "BEGIN;
         INSERT INTO big SELECT g, 'kept', g FROM generate_series(1, 100) g;
         SAVEPOINT s;
         INSERT INTO big SELECT g, 'rolled back', g FROM generate_series(100001, 400000) g;
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO big SELECT g, 'kept', g FROM generate_series(101, 110) g;
         COMMIT;",
    );
    s.sync();
    assert!(s.source_big().starts_with("110|"), "{}", s.source_big());
    s.assert_mirrors("big", BIG);
    assert_eq!(
        s.history_shape(),
        "versions 110, current 110, keys 110, commits 1, ops c:110"
    );
    assert_eq!(s.history_big("true"), s.source_big());

    let envelopes = s.setup.envelopes();
    let big: Vec<&Value> = envelopes
        .iter()
        .filter(|e| e["source"]["table"] == "big")
        .collect();
    let aborted: Vec<&Value> = big
        .iter()
        .copied()
        .filter(|e| e["after"]["payload"] != "kept")
        .collect();
    assert!(
        aborted.is_empty(),
        "{} envelopes of aborted rows, the first: {}",
        aborted.len(),
        aborted[0]
    );
    let ids: Vec<i64> = big
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=110).collect::<Vec<i64>>());
    assert!(
        big.iter()
            .all(|e| e["op"] == "c" && e["transaction"]["id"] == big[0]["transaction"]["id"]),
        "the committed rows are not the creates of one transaction"
    );
    assert_eq!(
        envelopes.len(),
        big.len() + 1,
        "more than big's rows and the tick"
    );

    // Both big transactions reached the agent before their rollback, in many blocks.
    let stream_count = s.assert_streamed(2);
    assert!(stream_count > 2, "stream_count {stream_count}");
    assert!(s.agent.terminate().success());
}

/// One transaction as the JSONL sink wrote it: a run of consecutive envelopes with one
/// `transaction.id` (`xid:commit_position`).
struct Written<'a> {
    id: &'a str,
    commit_position: u64,
    envelopes: &'a [Value],
}

fn written_transactions(envelopes: &[Value]) -> Vec<Written<'_>> {
    envelopes
        .chunk_by(|a, b| a["transaction"]["id"] == b["transaction"]["id"])
        .map(|run| {
            let id = run[0]["transaction"]["id"].as_str().unwrap();
            let (_, commit_position) = id.split_once(':').unwrap();
            Written {
                id,
                commit_position: commit_position.parse().unwrap(),
                envelopes: run,
            }
        })
        .collect()
}

/// A transaction's changes as `table op id` items, consecutive ids of one table and op as one
/// `table op first..=last` range, e.g. `small c 7, small u 3` or `big c 1..=300000`.
fn render(envelopes: &[Value]) -> String {
    let mut ranges: Vec<(&str, &str, i64, i64)> = Vec::new();
    for e in envelopes {
        let (table, op) = (
            e["source"]["table"].as_str().unwrap(),
            e["op"].as_str().unwrap(),
        );
        let row = if op == "d" { &e["before"] } else { &e["after"] };
        let id = row["id"].as_i64().unwrap();
        match ranges.last_mut() {
            Some((t, o, _, last)) if *t == table && *o == op && *last + 1 == id => *last = id,
            _ => ranges.push((table, op, id, id)),
        }
    }
    ranges
        .iter()
        .map(|(table, op, first, last)| {
            if first == last {
                format!("{table} {op} {first}")
            } else {
                format!("{table} {op} {first}..={last}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Small transaction `k`: creates row `k` of `small` and updates row `k / 2`.
async fn small_transaction(client: &tokio_postgres::Client, k: i32) {
    client
        .batch_execute(&format!(
            "BEGIN; INSERT INTO small VALUES ({k}, 0); UPDATE small SET v = v + 1 WHERE id = {};
             COMMIT;",
            k / 2
        ))
        .await
        .unwrap();
}

/// [`render`] of small transaction `k`.
fn small_rendered(k: i32) -> String {
    format!("small c {k}, small u {}", k / 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_big_and_small_transactions_keep_commit_order() {
    const STATEMENTS: i32 = 6;
    const ROWS_PER_STATEMENT: i32 = 50_000;
    const SMALL_PER_STATEMENT: i32 = 30;
    const SMALL_AFTER: i32 = 20;
    let s = tokio::task::block_in_place(|| {
        Scenario::start(
            "CREATE TABLE small (id int PRIMARY KEY, v int NOT NULL);",
            &[Sink::Mirror, Sink::Events],
        )
    });

    // The big transaction stays open while small ones commit between its statements, and a
    // few more commit after it.
    let big = s.pg.connect(&s.db).await;
    let small = s.pg.connect(&s.db).await;
    big.batch_execute("BEGIN").await.unwrap();
    for statement in 0..STATEMENTS {
        let first = statement * ROWS_PER_STATEMENT + 1;
        let last = first + ROWS_PER_STATEMENT - 1;
        big.execute(
            "INSERT INTO big SELECT g, md5(g::text), g FROM generate_series($1::int, $2::int) g",
            &[&first, &last],
        )
        .await
        .unwrap();
        for k in statement * SMALL_PER_STATEMENT..(statement + 1) * SMALL_PER_STATEMENT {
            small_transaction(&small, k).await;
        }
    }
    big.batch_execute("COMMIT").await.unwrap();
    let small_before = STATEMENTS * SMALL_PER_STATEMENT;
    for k in small_before..small_before + SMALL_AFTER {
        small_transaction(&small, k).await;
    }

    tokio::task::block_in_place(|| {
        s.sync();
        s.assert_mirrors("big", BIG);
        s.assert_mirrors("small", "id, v");

        let envelopes = s.setup.envelopes();
        let written = written_transactions(&envelopes);
        let distinct: HashSet<&str> = written.iter().map(|t| t.id).collect();
        assert_eq!(
            distinct.len(),
            written.len(),
            "a transaction's envelopes are split by another's"
        );
        let lsns: Vec<u64> = written.iter().map(|t| t.commit_position).collect();
        assert!(
            lsns.windows(2).all(|w| w[0] < w[1]),
            "transactions out of commit-LSN order: {lsns:?}"
        );
        for t in &written {
            let orders = t
                .envelopes
                .iter()
                .map(|e| e["transaction"]["total_order"].as_u64().unwrap());
            assert!(
                orders.eq(1..=t.envelopes.len() as u64),
                "transaction {}: total_order is not 1, 2, … {}",
                t.id,
                t.envelopes.len()
            );
        }
        let mut expected: Vec<String> = (0..small_before).map(small_rendered).collect();
        expected.push(format!("big c 1..={}", STATEMENTS * ROWS_PER_STATEMENT));
        expected.extend((small_before..small_before + SMALL_AFTER).map(small_rendered));
        expected.push("tick c 1".to_string());
        let got: Vec<String> = written.iter().map(|t| render(t.envelopes)).collect();
        assert_eq!(
            got, expected,
            "the transactions as the JSONL sink wrote them"
        );

        s.assert_streamed(1);
    });
    assert!(s.agent.terminate().success());
}
