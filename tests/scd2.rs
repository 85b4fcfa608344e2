//! The SCD2 sink against real PostgreSQL: one history row per committed version of every
//! source row, with validity intervals (commit times) that chain, and replays that never
//! double a version.
//!
//! The source clusters run with `track_commit_timestamp = on`, so each test reads the commit
//! time of the transactions it made (`pg_xact_commit_timestamp`) and checks `valid_from` and
//! `valid_to` against them exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::agent::{eventually, Agent, AgentSetup};
use common::PgCluster;

/// How long a sink may take to apply what was committed before it is declared stuck.
const WAIT: Duration = Duration::from_secs(60);

/// A cluster whose commit times can be read back with `pg_xact_commit_timestamp`.
fn cluster() -> PgCluster {
    PgCluster::start_with(&[("track_commit_timestamp", "on")])
}

/// A source database holding `tick` (see [`sync`]) and the tables of `schema_sql`, and an
/// empty warehouse.
fn databases(pg: &PgCluster, schema_sql: &str) -> (String, String) {
    let db = pg.fresh_database("source");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        &format!("CREATE TABLE tick (n int PRIMARY KEY);\n{schema_sql}"),
    );
    (db, warehouse)
}

/// An scd2 `[[sink]]` named `name` writing into `schema` of `warehouse`; `extra` is more TOML.
fn scd2_sink(pg: &PgCluster, warehouse: &str, name: &str, schema: &str, extra: &str) -> String {
    format!(
        "[[sink]]\nname = \"{name}\"\ntype = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\n\
         mode = \"scd2\"\n{extra}\n",
        pg.url(warehouse)
    )
}

/// Starts an agent capturing `tables` into `sinks` and waits until it streams.
fn start_agent(pg: &PgCluster, db: &str, tables: &str, sinks: &str) -> (AgentSetup, Agent) {
    let setup = AgentSetup::with_sinks(&pg.url(db), tables, sinks);
    let mut agent = setup.start();
    agent.wait_streaming();
    (setup, agent)
}

/// A cluster, a source database holding the tables of `schema_sql`, a warehouse, and an agent
/// capturing `public.*` into one SCD2 sink `history` (schema `history`, plus `extra`).
struct Scenario {
    pg: PgCluster,
    db: String,
    wh: String,
    setup: AgentSetup,
    agent: Agent,
}

fn start_history(schema_sql: &str, extra: &str) -> Scenario {
    let pg = cluster();
    let (db, wh) = databases(&pg, schema_sql);
    let (setup, agent) = start_agent(
        &pg,
        &db,
        "\"public.*\"",
        &scd2_sink(&pg, &wh, "history", "history", extra),
    );
    Scenario {
        pg,
        db,
        wh,
        setup,
        agent,
    }
}

/// `expr` (a timestamptz) as microseconds since the Unix epoch, in SQL.
fn micros(expr: &str) -> String {
    format!("(extract(epoch FROM {expr}) * 1000000)::bigint")
}

/// A committed source transaction: a name for messages and its commit time (Unix µs).
#[derive(Debug)]
struct Tx {
    name: &'static str,
    at: i64,
}

/// Runs `sql` in one source transaction and returns its commit time.
fn commit(pg: &PgCluster, db: &str, name: &'static str, sql: &str) -> Tx {
    let sql = sql.trim().trim_end_matches(';');
    let out = pg.psql(
        db,
        &format!("BEGIN;\n{sql};\nSELECT txid_current();\nCOMMIT;"),
    );
    let xid = out.lines().last().unwrap().trim().to_string();
    let at = pg.psql(
        db,
        &format!(
            "SELECT {} FROM (SELECT pg_xact_commit_timestamp('{xid}'::xid) AS t) c",
            micros("c.t")
        ),
    );
    Tx {
        name,
        at: at
            .parse()
            .unwrap_or_else(|e| panic!("commit time of {name} ({xid}): {at:?}: {e}")),
    }
}

/// Commits a new row to the source's `tick` table and waits until `schema.tick` in the
/// warehouse holds it. Transactions are applied whole and in commit order, so then every
/// transaction committed before is applied too.
fn sync(
    (source, db): (&PgCluster, &str),
    (target, warehouse): (&PgCluster, &str),
    schema: &str,
    agent: &Agent,
    wait: Duration,
) {
    let n = source.psql(
        db,
        "INSERT INTO tick SELECT coalesce(max(n), 0) + 1 FROM tick RETURNING n",
    );
    let query = format!("SELECT count(*) FROM {schema}.tick WHERE n = {n}");
    let arrived = eventually(wait, || {
        target.try_psql(warehouse, &query).as_deref() == Some("1")
    });
    assert!(
        arrived,
        "sink into schema {schema} did not apply tick {n} within {wait:?}\n--- agent log ---\n{}",
        agent.log()
    );
}

/// Waits until the agent's slot is confirmed up to the source's current WAL position: every
/// transaction committed before is in the agent's log.
fn wait_logged(source: &PgCluster, db: &str, agent: &Agent) {
    let lsn = source.psql(db, "SELECT pg_current_wal_lsn()");
    let query = format!(
        "SELECT confirmed_flush_lsn >= '{lsn}' FROM pg_replication_slots \
         WHERE slot_name = 'tidemark_test'"
    );
    assert!(
        eventually(WAIT, || source.try_psql(db, &query).as_deref() == Some("t")),
        "the slot was not confirmed up to {lsn}\n{}",
        agent.log()
    );
}

/// The names of the history bookkeeping columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Tidemark,
    Dbt,
}

impl Layout {
    fn valid_from(self) -> &'static str {
        match self {
            Layout::Tidemark => "valid_from",
            Layout::Dbt => "dbt_valid_from",
        }
    }

    fn valid_to(self) -> &'static str {
        match self {
            Layout::Tidemark => "valid_to",
            Layout::Dbt => "dbt_valid_to",
        }
    }

    fn is_current(self) -> &'static str {
        match self {
            Layout::Tidemark => "is_current",
            Layout::Dbt => "(dbt_valid_to IS NULL)",
        }
    }
}

/// One history row.
#[derive(Debug, Clone)]
struct Version {
    /// `ROW(key columns)::text`, e.g. `(1)`.
    key: String,
    /// `ROW(compared columns)::text`, e.g. `(1,a)`.
    row: String,
    op: String,
    lsn: u64,
    from: i64,
    to: Option<i64>,
    current: bool,
}

impl Version {
    fn show(&self) -> String {
        format!(
            "{} {} {} lsn={:X}/{:X} {}..{} current={}",
            self.key,
            self.row,
            self.op,
            self.lsn >> 32,
            self.lsn & 0xFFFF_FFFF,
            self.from,
            self.to.map_or("-".to_string(), |t| t.to_string()),
            self.current
        )
    }
}

fn parse_lsn(text: &str) -> u64 {
    let (high, low) = text
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {text:?}"));
    (u64::from_str_radix(high, 16).unwrap() << 32) | u64::from_str_radix(low, 16).unwrap()
}

/// Every history row of `table` (schema-qualified), ordered by key and `_tidemark_lsn`.
/// `key` and `row` are column lists; `row` must not produce a `|`.
fn versions(
    pg: &PgCluster,
    warehouse: &str,
    table: &str,
    key: &str,
    row: &str,
    layout: Layout,
) -> Vec<Version> {
    let sql = format!(
        "SELECT ROW({key})::text, ROW({row})::text, h._tidemark_op, h._tidemark_lsn::text AS lsn, \
         {}, coalesce({}::text, '-'), {} FROM {table} h ORDER BY {key}, h._tidemark_lsn",
        micros(layout.valid_from()),
        micros(layout.valid_to()),
        layout.is_current()
    );
    pg.psql(warehouse, &sql)
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split('|').collect();
            assert_eq!(f.len(), 7, "unexpected history row {line:?}");
            Version {
                key: f[0].to_string(),
                row: f[1].to_string(),
                op: f[2].to_string(),
                lsn: parse_lsn(f[3]),
                from: f[4].parse().unwrap(),
                to: (f[5] != "-").then(|| f[5].parse().unwrap()),
                current: match f[6] {
                    "t" => true,
                    "f" => false,
                    other => panic!("is_current {other:?} in {line:?}"),
                },
            }
        })
        .collect()
}

/// The name of the transaction committed at `at`, or the raw time.
fn when(at: i64, txs: &[&Tx]) -> String {
    txs.iter()
        .find(|tx| tx.at == at)
        .map_or_else(|| format!("@{at}"), |tx| tx.name.to_string())
}

/// `key row op FROM..TO current|closed`, with transaction names for the times.
fn render(versions: &[Version], txs: &[&Tx]) -> Vec<String> {
    versions
        .iter()
        .map(|v| {
            format!(
                "{} {} {} {}..{} {}",
                v.key,
                v.row,
                v.op,
                when(v.from, txs),
                v.to.map_or_else(|| "-".to_string(), |to| when(to, txs)),
                if v.current { "current" } else { "closed" }
            )
        })
        .collect()
}

/// One expected version, as [`render`] shows it; a version without `to` is current.
fn version(key: &str, row: &str, op: &str, from: &Tx, to: Option<&Tx>) -> String {
    format!(
        "{key} {row} {op} {}..{} {}",
        from.name,
        to.map_or("-", |tx| tx.name),
        if to.is_none() { "current" } else { "closed" }
    )
}

/// Checks the interval rules on every key's versions (ordered by `_tidemark_lsn`):
/// unique LSNs, `valid_from` non-decreasing, all but the last closed, `valid_to(i) <=
/// valid_from(i+1)` with equality exactly when the next version is an update (or always, with
/// tombstones), `valid_to >= valid_from`, `valid_to IS NULL = is_current`, and the first
/// version of a key is a create (the tables start empty).
fn assert_chains(versions: &[Version], tombstones: bool, what: &str) {
    let mut by_key: BTreeMap<&str, Vec<&Version>> = BTreeMap::new();
    for v in versions {
        by_key.entry(&v.key).or_default().push(v);
    }
    for (key, chain) in by_key {
        let shown = || {
            chain
                .iter()
                .map(|v| v.show())
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            chain[0].op,
            "c",
            "{what} key {key}: first version not 'c'\n{}",
            shown()
        );
        for v in &chain {
            assert!(
                matches!(v.op.as_str(), "c" | "u") || (tombstones && v.op == "d"),
                "{what} key {key}: bad _tidemark_op {:?}\n{}",
                v.op,
                shown()
            );
            assert_eq!(
                v.to.is_none(),
                v.current,
                "{what} key {key}: (valid_to IS NULL) <> is_current\n{}",
                shown()
            );
            if let Some(to) = v.to {
                assert!(
                    to >= v.from,
                    "{what} key {key}: valid_to < valid_from\n{}",
                    shown()
                );
            }
        }
        assert!(
            chain.iter().filter(|v| v.current).count() <= 1,
            "{what} key {key}: more than one current version\n{}",
            shown()
        );
        for pair in chain.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                a.lsn < b.lsn,
                "{what} key {key}: duplicate _tidemark_lsn\n{}",
                shown()
            );
            assert!(
                a.from <= b.from,
                "{what} key {key}: valid_from goes back\n{}",
                shown()
            );
            let Some(to) = a.to else {
                panic!(
                    "{what} key {key}: a version before the last is open\n{}",
                    shown()
                );
            };
            assert!(
                to <= b.from,
                "{what} key {key}: intervals overlap\n{}",
                shown()
            );
            if tombstones {
                assert_eq!(
                    to,
                    b.from,
                    "{what} key {key}: with tombstones the intervals are contiguous\n{}",
                    shown()
                );
                assert_eq!(
                    a.op == "d",
                    b.op == "c",
                    "{what} key {key}: only a tombstone is followed by a create\n{}",
                    shown()
                );
                assert!(
                    !(a.op == "d" && b.op == "d"),
                    "{what} key {key}: two tombstones in a row\n{}",
                    shown()
                );
            } else {
                // A re-insert after a delete starts later; one after a truncate in the same
                // transaction starts when the truncate ended the predecessor.
                assert!(
                    if b.op == "u" {
                        to == b.from
                    } else {
                        to <= b.from
                    },
                    "{what} key {key}: an update starts where its predecessor ends, a \
                     re-insert no earlier\n{}",
                    shown()
                );
            }
        }
    }
}

/// Versions opened by one transaction share its commit LSN, and a later commit has a larger
/// one (the workloads here commit one transaction at a time).
fn assert_lsn_follows_commit_order(versions: &[Version], what: &str) {
    let mut lsn_at: BTreeMap<i64, u64> = BTreeMap::new();
    for v in versions {
        let lsn = *lsn_at.entry(v.from).or_insert(v.lsn);
        assert_eq!(
            lsn,
            v.lsn,
            "{what}: versions from one commit have different LSNs: {}",
            v.show()
        );
    }
    let lsns: Vec<u64> = lsn_at.values().copied().collect();
    assert!(
        lsns.windows(2).all(|w| w[0] < w[1]),
        "{what}: _tidemark_lsn does not follow commit order: {lsn_at:?}"
    );
}

/// Reads `table`'s history, compares it with `expected` (see [`version`]) and checks the
/// interval rules; returns the versions.
#[allow(clippy::too_many_arguments)]
fn assert_history(
    pg: &PgCluster,
    warehouse: &str,
    table: &str,
    key: &str,
    row: &str,
    layout: Layout,
    txs: &[&Tx],
    expected: &[String],
    tombstones: bool,
) -> Vec<Version> {
    let got = versions(pg, warehouse, table, key, row, layout);
    let rendered = render(&got, txs);
    assert_eq!(
        rendered,
        expected,
        "history of {table} (left: got, right: expected):\n{}",
        rendered.join("\n")
    );
    assert_chains(&got, tombstones, table);
    assert_lsn_follows_commit_order(&got, table);
    got
}

/// [`assert_history`] of a table `(id, v)` keyed by `id`, in tidemark's layout, without
/// tombstones.
fn assert_plain_history(
    pg: &PgCluster,
    warehouse: &str,
    table: &str,
    txs: &[&Tx],
    expected: &[String],
) -> Vec<Version> {
    assert_history(
        pg,
        warehouse,
        table,
        "id",
        "id, v",
        Layout::Tidemark,
        txs,
        expected,
        false,
    )
}

/// The current versions (not tombstones) of `history` hold exactly the source's rows.
fn assert_current_is_source(
    pg: &PgCluster,
    db: &str,
    warehouse: &str,
    (source, history): (&str, &str),
    columns: &str,
    current: &str,
) {
    let want = pg.dump(db, source, columns);
    let got = pg.dump(warehouse, &format!("{history} WHERE {current}"), columns);
    assert_eq!(
        got, want,
        "current versions of {history} (left) differ from {source} (right)"
    );
}

/// `name type, …` of a table's columns in order, from information_schema; with
/// `nullability`, `name type YES|NO, …`.
fn columns_of(
    pg: &PgCluster,
    warehouse: &str,
    (schema, table): (&str, &str),
    nullability: bool,
) -> String {
    let nullable = if nullability {
        " || ' ' || is_nullable"
    } else {
        ""
    };
    pg.psql(
        warehouse,
        &format!(
            "SELECT string_agg(column_name || ' ' || udt_name{nullable}, ', ' \
             ORDER BY ordinal_position) FROM information_schema.columns \
             WHERE table_schema = '{schema}' AND table_name = '{table}'"
        ),
    )
}

/// The primary key's columns, in order.
fn primary_key_of(pg: &PgCluster, warehouse: &str, table: &str) -> String {
    pg.psql(
        warehouse,
        &format!(
            "SELECT string_agg(a.attname, ',' ORDER BY k.ord) FROM pg_index i \
             CROSS JOIN unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = '{table}'::regclass AND i.indisprimary"
        ),
    )
}

#[test]
fn each_committed_transaction_is_one_version_of_each_key_it_changed() {
    let Scenario {
        pg,
        db,
        wh,
        setup: _setup,
        agent,
    } = start_history(
        "CREATE TABLE t (id int PRIMARY KEY, v text, body text);",
        "",
    );
    let big = |seed: &str| {
        format!("(SELECT string_agg(md5((g {seed})::text), '') FROM generate_series(1, 20000) g)")
    };
    let t1 = commit(
        &pg,
        &db,
        "T1",
        "INSERT INTO t (id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c')",
    );
    let t2 = commit(&pg, &db, "T2", "UPDATE t SET v = 'a2' WHERE id = 1");
    let t3 = commit(&pg, &db, "T3", "DELETE FROM t WHERE id = 2");
    let t4 = commit(
        &pg,
        &db,
        "T4",
        "UPDATE t SET v = 'c2' WHERE id = 3; UPDATE t SET v = 'c3' WHERE id = 3",
    );
    pg.psql(
        &db,
        "BEGIN; INSERT INTO t (id, v) VALUES (4, 'd'); ROLLBACK;",
    );
    let t5 = commit(
        &pg,
        &db,
        "T5",
        &format!(
            "INSERT INTO t VALUES (5, 'e', {}), (6, 'f', {})",
            big("+ 0"),
            big("* -1")
        ),
    );
    // The big values are in the target before the updates that leave them out arrive.
    sync((&pg, &db), (&pg, &wh), "history", &agent, WAIT);
    let t6 = commit(&pg, &db, "T6", "UPDATE t SET v = 'e2' WHERE id = 5");
    let t7 = commit(&pg, &db, "T7", "UPDATE t SET v = 'f2' WHERE id = 6");
    let t8 = commit(&pg, &db, "T8", "UPDATE t SET v = 'f3' WHERE id = 6");
    sync((&pg, &db), (&pg, &wh), "history", &agent, WAIT);

    let md5 = |id: i32| pg.psql(&db, &format!("SELECT md5(body) FROM t WHERE id = {id}"));
    let (big5, big6) = (md5(5), md5(6));
    assert_eq!(big5.len(), 32);
    let txs = [&t1, &t2, &t3, &t4, &t5, &t6, &t7, &t8];
    let expected = vec![
        version("(1)", "(1,a,)", "c", &t1, Some(&t2)),
        version("(1)", "(1,a2,)", "u", &t2, None),
        version("(2)", "(2,b,)", "c", &t1, Some(&t3)),
        version("(3)", "(3,c,)", "c", &t1, Some(&t4)),
        version("(3)", "(3,c3,)", "u", &t4, None),
        version("(5)", &format!("(5,e,{big5})"), "c", &t5, Some(&t6)),
        version("(5)", &format!("(5,e2,{big5})"), "u", &t6, None),
        version("(6)", &format!("(6,f,{big6})"), "c", &t5, Some(&t7)),
        version("(6)", &format!("(6,f2,{big6})"), "u", &t7, Some(&t8)),
        version("(6)", &format!("(6,f3,{big6})"), "u", &t8, None),
    ];
    assert_history(
        &pg,
        &wh,
        "history.t",
        "id",
        "id, v, md5(body)",
        Layout::Tidemark,
        &txs,
        &expected,
        false,
    );
    assert_eq!(
        pg.psql(
            &wh,
            "SELECT string_agg(id || ':' || n, ' ' ORDER BY id) \
             FROM (SELECT id, count(*) AS n FROM history.t GROUP BY id) c"
        ),
        "1:2 2:1 3:2 5:2 6:3"
    );
    assert_current_is_source(
        &pg,
        &db,
        &wh,
        ("public.t", "history.t"),
        "id, v, md5(body)",
        "is_current",
    );
    assert_eq!(
        columns_of(&pg, &wh, ("history", "t"), true),
        "id int4 NO, v text YES, body text YES, valid_from timestamptz NO, \
         valid_to timestamptz YES, is_current bool NO, _tidemark_op text NO, \
         _tidemark_lsn pg_lsn NO"
    );
    assert_eq!(primary_key_of(&pg, &wh, "history.t"), "id,_tidemark_lsn");
    assert!(agent.terminate().success());
}

#[test]
fn a_deleted_key_is_closed_and_a_reinsert_opens_a_new_version() {
    let Scenario {
        pg,
        db,
        wh,
        setup: _setup,
        agent,
    } = start_history("CREATE TABLE t (id int PRIMARY KEY, v text);", "");
    let t1 = commit(&pg, &db, "T1", "INSERT INTO t VALUES (1, 'a'), (2, 'b')");
    let t2 = commit(&pg, &db, "T2", "DELETE FROM t WHERE id = 1");
    let t3 = commit(&pg, &db, "T3", "INSERT INTO t VALUES (1, 'a2')");
    // Delete and insert of a key in one transaction: one version, an update.
    let t4 = commit(
        &pg,
        &db,
        "T4",
        "DELETE FROM t WHERE id = 2; INSERT INTO t VALUES (2, 'b2')",
    );
    // A key that is born and dies in one transaction leaves no version.
    let t5 = commit(
        &pg,
        &db,
        "T5",
        "INSERT INTO t VALUES (3, 'x'); DELETE FROM t WHERE id = 3",
    );
    let t6 = commit(
        &pg,
        &db,
        "T6",
        "UPDATE t SET v = 'a3' WHERE id = 1; DELETE FROM t WHERE id = 1; \
         INSERT INTO t VALUES (1, 'a4')",
    );
    sync((&pg, &db), (&pg, &wh), "history", &agent, WAIT);
    let expected = vec![
        version("(1)", "(1,a)", "c", &t1, Some(&t2)),
        version("(1)", "(1,a2)", "c", &t3, Some(&t6)),
        version("(1)", "(1,a4)", "u", &t6, None),
        version("(2)", "(2,b)", "c", &t1, Some(&t4)),
        version("(2)", "(2,b2)", "u", &t4, None),
    ];
    assert_plain_history(
        &pg,
        &wh,
        "history.t",
        &[&t1, &t2, &t3, &t4, &t5, &t6],
        &expected,
    );
    assert_current_is_source(
        &pg,
        &db,
        &wh,
        ("public.t", "history.t"),
        "id, v",
        "is_current",
    );
    assert!(agent.terminate().success());
}

#[test]
fn a_primary_key_update_closes_the_old_key_and_creates_the_new_one() {
    let Scenario {
        pg,
        db,
        wh,
        setup: _setup,
        agent,
    } = start_history("CREATE TABLE t (id int PRIMARY KEY, v text);", "");
    let t1 = commit(&pg, &db, "T1", "INSERT INTO t VALUES (1, 'a'), (2, 'b')");
    let t2 = commit(&pg, &db, "T2", "UPDATE t SET id = 9 WHERE id = 1");
    // 2 -> 10 -> 11 in one transaction: key 10 never has a committed version.
    let t3 = commit(
        &pg,
        &db,
        "T3",
        "UPDATE t SET id = 10 WHERE id = 2; UPDATE t SET id = 11 WHERE id = 10",
    );
    let t4 = commit(
        &pg,
        &db,
        "T4",
        "UPDATE t SET id = 1, v = 'back' WHERE id = 9",
    );
    // Keys 1 and 11 swap their rows: both existed before, so both get an update.
    let t5 = commit(
        &pg,
        &db,
        "T5",
        "UPDATE t SET id = 100 WHERE id = 1; UPDATE t SET id = 1 WHERE id = 11; \
         UPDATE t SET id = 11 WHERE id = 100",
    );
    sync((&pg, &db), (&pg, &wh), "history", &agent, WAIT);
    let expected = vec![
        version("(1)", "(1,a)", "c", &t1, Some(&t2)),
        version("(1)", "(1,back)", "c", &t4, Some(&t5)),
        version("(1)", "(1,b)", "u", &t5, None),
        version("(2)", "(2,b)", "c", &t1, Some(&t3)),
        version("(9)", "(9,a)", "c", &t2, Some(&t4)),
        version("(11)", "(11,b)", "c", &t3, Some(&t5)),
        version("(11)", "(11,back)", "u", &t5, None),
    ];
    assert_plain_history(&pg, &wh, "history.t", &[&t1, &t2, &t3, &t4, &t5], &expected);
    assert_current_is_source(
        &pg,
        &db,
        &wh,
        ("public.t", "history.t"),
        "id, v",
        "is_current",
    );
    assert!(agent.terminate().success());
}

#[test]
fn a_truncate_closes_every_current_version() {
    let Scenario {
        pg,
        db,
        wh,
        setup: _setup,
        agent,
    } = start_history(
        "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE u (id int PRIMARY KEY, v text);",
        "",
    );
    let t1 = commit(
        &pg,
        &db,
        "T1",
        "INSERT INTO t VALUES (1, 'a'), (2, 'b'); INSERT INTO u VALUES (1, 'x')",
    );
    let t2 = commit(&pg, &db, "T2", "UPDATE t SET v = 'b2' WHERE id = 2");
    let t3 = commit(&pg, &db, "T3", "TRUNCATE t");
    let t4 = commit(&pg, &db, "T4", "INSERT INTO t VALUES (1, 'a2'), (3, 'c')");
    // Truncate and insert in one transaction: the truncate ended every key, so the rows
    // inserted after it are new (`c`), key 3 included.
    let t5 = commit(
        &pg,
        &db,
        "T5",
        "TRUNCATE t; INSERT INTO t VALUES (3, 'c2'), (4, 'd')",
    );
    sync((&pg, &db), (&pg, &wh), "history", &agent, WAIT);
    let txs = [&t1, &t2, &t3, &t4, &t5];
    let expected = vec![
        version("(1)", "(1,a)", "c", &t1, Some(&t3)),
        version("(1)", "(1,a2)", "c", &t4, Some(&t5)),
        version("(2)", "(2,b)", "c", &t1, Some(&t2)),
        version("(2)", "(2,b2)", "u", &t2, Some(&t3)),
        version("(3)", "(3,c)", "c", &t4, Some(&t5)),
        version("(3)", "(3,c2)", "c", &t5, None),
        version("(4)", "(4,d)", "c", &t5, None),
    ];
    assert_plain_history(&pg, &wh, "history.t", &txs, &expected);
    // The other table is not touched by the truncate.
    assert_plain_history(
        &pg,
        &wh,
        "history.u",
        &txs,
        &[version("(1)", "(1,x)", "c", &t1, None)],
    );
    assert_current_is_source(
        &pg,
        &db,
        &wh,
        ("public.t", "history.t"),
        "id, v",
        "is_current",
    );
    assert!(agent.terminate().success());
}

#[test]
fn a_version_the_target_refuses_is_dead_lettered_and_the_next_one_closes_its_predecessor() {
    let Scenario {
        pg,
        db,
        wh,
        setup,
        agent,
    } = start_history("CREATE TABLE t (id int PRIMARY KEY, v int);", "");
    let t1 = commit(&pg, &db, "T1", "INSERT INTO t VALUES (1, 1), (2, 2)");
    sync((&pg, &db), (&pg, &wh), "history", &agent, WAIT);
    assert!(agent.terminate().success());
    // A constraint the target has and the source has not.
    pg.psql(
        &wh,
        "ALTER TABLE history.t ADD CONSTRAINT v_small CHECK (v < 100)",
    );
    // Both transactions wait for the agent, which then applies them in one batch: the
    // refused version is the one the next event of its key follows in the batch.
    let t2 = commit(
        &pg,
        &db,
        "T2",
        "UPDATE t SET v = 500 WHERE id = 1; UPDATE t SET v = 3 WHERE id = 2",
    );
    // The refused version never became current, so this one ends T1's.
    let t3 = commit(&pg, &db, "T3", "UPDATE t SET v = 4 WHERE id = 1");
    let mut agent = setup.start();
    agent.wait_streaming();
    sync((&pg, &db), (&pg, &wh), "history", &agent, WAIT);
    let expected = vec![
        version("(1)", "(1,1)", "c", &t1, Some(&t3)),
        version("(1)", "(1,4)", "u", &t3, None),
        version("(2)", "(2,2)", "c", &t1, Some(&t2)),
        version("(2)", "(2,3)", "u", &t2, None),
    ];
    assert_plain_history(&pg, &wh, "history.t", &[&t1, &t2, &t3], &expected);
    let letter = setup.only_dead_letter("history", "v_small");
    assert_eq!(letter["row"], serde_json::json!({"id": 1, "v": 500}));
    assert_eq!(letter["table"], "public.t");
    assert!(agent.terminate().success());
}

#[test]
fn history_deletes_add_a_current_tombstone_that_a_reinsert_closes() {
    let Scenario {
        pg,
        db,
        wh,
        setup: _setup,
        agent,
    } = start_history(
        "CREATE TABLE t (id int PRIMARY KEY, v text);",
        "history_deletes = true",
    );
    let t1 = commit(
        &pg,
        &db,
        "T1",
        "INSERT INTO t VALUES (1, 'a'), (2, 'b'), (4, 'd')",
    );
    let t2 = commit(&pg, &db, "T2", "DELETE FROM t WHERE id = 1");
    let t3 = commit(&pg, &db, "T3", "INSERT INTO t VALUES (1, 'a2')");
    let t4 = commit(&pg, &db, "T4", "DELETE FROM t WHERE id = 2");
    // Born and dead in one transaction: no version, no tombstone.
    let t5 = commit(
        &pg,
        &db,
        "T5",
        "INSERT INTO t VALUES (3, 'x'); DELETE FROM t WHERE id = 3",
    );
    let t6 = commit(&pg, &db, "T6", "DELETE FROM t WHERE id = 1");
    // Delete and insert in one transaction: one update, no tombstone.
    let t7 = commit(
        &pg,
        &db,
        "T7",
        "DELETE FROM t WHERE id = 4; INSERT INTO t VALUES (4, 'd2')",
    );
    sync((&pg, &db), (&pg, &wh), "history", &agent, WAIT);
    let expected = vec![
        version("(1)", "(1,a)", "c", &t1, Some(&t2)),
        version("(1)", "(1,a)", "d", &t2, Some(&t3)),
        version("(1)", "(1,a2)", "c", &t3, Some(&t6)),
        version("(1)", "(1,a2)", "d", &t6, None),
        version("(2)", "(2,b)", "c", &t1, Some(&t4)),
        version("(2)", "(2,b)", "d", &t4, None),
        version("(4)", "(4,d)", "c", &t1, Some(&t7)),
        version("(4)", "(4,d2)", "u", &t7, None),
    ];
    assert_history(
        &pg,
        &wh,
        "history.t",
        "id",
        "id, v",
        Layout::Tidemark,
        &[&t1, &t2, &t3, &t4, &t5, &t6, &t7],
        &expected,
        true,
    );
    assert_current_is_source(
        &pg,
        &db,
        &wh,
        ("public.t", "history.t"),
        "id, v",
        "is_current AND _tidemark_op <> 'd'",
    );
    assert!(agent.terminate().success());
}

#[test]
fn dbt_columns_name_the_history_as_dbt_snapshots_do() {
    let pg = cluster();
    let (db, wh) = databases(&pg, "CREATE TABLE t (id int PRIMARY KEY, v text);");
    let sinks = format!(
        "{}{}",
        scd2_sink(&pg, &wh, "plain", "dbt_plain", "columns = \"dbt\""),
        scd2_sink(
            &pg,
            &wh,
            "deletes",
            "dbt_deletes",
            "columns = \"dbt\"\nhistory_deletes = true"
        )
    );
    let (_setup, agent) = start_agent(&pg, &db, "\"public.*\"", &sinks);
    let t1 = commit(&pg, &db, "T1", "INSERT INTO t VALUES (1, 'a'), (2, 'b')");
    let t2 = commit(&pg, &db, "T2", "UPDATE t SET v = 'a2' WHERE id = 1");
    let t3 = commit(&pg, &db, "T3", "DELETE FROM t WHERE id = 2");
    let t4 = commit(&pg, &db, "T4", "INSERT INTO t VALUES (2, 'b2')");
    sync((&pg, &db), (&pg, &wh), "dbt_plain", &agent, WAIT);
    sync((&pg, &db), (&pg, &wh), "dbt_deletes", &agent, WAIT);
    let txs = [&t1, &t2, &t3, &t4];

    assert_eq!(
        columns_of(&pg, &wh, ("dbt_plain", "t"), false),
        "id int4, v text, dbt_scd_id text, dbt_updated_at timestamptz, \
         dbt_valid_from timestamptz, dbt_valid_to timestamptz, _tidemark_op text, \
         _tidemark_lsn pg_lsn"
    );
    assert_history(
        &pg,
        &wh,
        "dbt_plain.t",
        "id",
        "id, v",
        Layout::Dbt,
        &txs,
        &[
            version("(1)", "(1,a)", "c", &t1, Some(&t2)),
            version("(1)", "(1,a2)", "u", &t2, None),
            version("(2)", "(2,b)", "c", &t1, Some(&t3)),
            version("(2)", "(2,b2)", "c", &t4, None),
        ],
        false,
    );
    assert_eq!(
        columns_of(&pg, &wh, ("dbt_deletes", "t"), false),
        "id int4, v text, dbt_scd_id text, dbt_updated_at timestamptz, \
         dbt_valid_from timestamptz, dbt_valid_to timestamptz, dbt_is_deleted text, \
         _tidemark_op text, _tidemark_lsn pg_lsn"
    );
    assert_history(
        &pg,
        &wh,
        "dbt_deletes.t",
        "id",
        "id, v",
        Layout::Dbt,
        &txs,
        &[
            version("(1)", "(1,a)", "c", &t1, Some(&t2)),
            version("(1)", "(1,a2)", "u", &t2, None),
            version("(2)", "(2,b)", "c", &t1, Some(&t3)),
            version("(2)", "(2,b)", "d", &t3, Some(&t4)),
            version("(2)", "(2,b2)", "c", &t4, None),
        ],
        true,
    );
    assert_eq!(
        pg.psql(
            &wh,
            "SELECT string_agg(id || ':' || _tidemark_op || ':' || dbt_is_deleted, ' ' \
             ORDER BY id, _tidemark_lsn) FROM dbt_deletes.t"
        ),
        "1:c:False 1:u:False 2:c:False 2:d:True 2:c:False"
    );
    for schema in ["dbt_plain", "dbt_deletes"] {
        assert_eq!(
            pg.psql(
                &wh,
                &format!(
                    "SELECT count(*) FILTER (WHERE dbt_updated_at IS DISTINCT FROM dbt_valid_from), \
                     count(dbt_scd_id) = count(*), count(DISTINCT dbt_scd_id) = count(*) \
                     FROM {schema}.t"
                )
            ),
            "0|t|t",
            "{schema}.t: dbt_updated_at = dbt_valid_from, and dbt_scd_id is set and unique"
        );
    }
    assert_current_is_source(
        &pg,
        &db,
        &wh,
        ("public.t", "dbt_plain.t"),
        "id, v",
        "dbt_valid_to IS NULL",
    );
    assert_current_is_source(
        &pg,
        &db,
        &wh,
        ("public.t", "dbt_deletes.t"),
        "id, v",
        "dbt_valid_to IS NULL AND dbt_is_deleted = 'False'",
    );
    assert!(agent.terminate().success());
}

/// One batch can hold a key's versions under two descriptions of its table: the source
/// describes the table again after an agent restart, and differently after ALTER TABLE. An
/// unchanged TOAST value still comes from the key's previous version.
#[test]
fn unchanged_toast_is_carried_when_one_batch_spans_a_restart_or_an_added_column() {
    let source = cluster();
    let target = PgCluster::start();
    let db = source.fresh_database("source");
    let wh = target.fresh_database("warehouse");
    source.psql(
        &db,
        "CREATE TABLE tick (n int PRIMARY KEY);
         CREATE TABLE docs (id int PRIMARY KEY, rev int NOT NULL, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;",
    );
    let setup = AgentSetup::with_sinks(
        &source.url(&db),
        "\"public.*\"",
        &scd2_sink(&target, &wh, "history", "history", ""),
    );
    let mut agent = setup.start();
    agent.wait_streaming();
    let t1 = commit(
        &source,
        &db,
        "T1",
        "INSERT INTO docs SELECT id, 0, \
           (SELECT string_agg(md5((g * id)::text), '') FROM generate_series(1, 20000) g) \
         FROM generate_series(1, 2) id",
    );
    sync((&source, &db), (&target, &wh), "history", &agent, WAIT);
    // What follows waits in the agent's log until the target is back, then goes out in one
    // batch.
    target.stop();
    let t2 = commit(&source, &db, "T2", "UPDATE docs SET rev = 1 WHERE id = 1");
    wait_logged(&source, &db, &agent);
    agent.kill();
    let mut agent = setup.start();
    agent.wait_streaming();
    // Key 1's versions are described before and after the restart, key 2's (below) before and
    // after the added column.
    let t3 = commit(&source, &db, "T3", "UPDATE docs SET rev = rev + 1");
    source.psql(&db, "ALTER TABLE docs ADD COLUMN note text");
    let t4 = commit(&source, &db, "T4", "UPDATE docs SET rev = 3 WHERE id = 2");
    wait_logged(&source, &db, &agent);
    target.start_again();
    sync((&source, &db), (&target, &wh), "history", &agent, WAIT);

    let md5 = |id: i32| source.psql(&db, &format!("SELECT md5(body) FROM docs WHERE id = {id}"));
    let (m1, m2) = (md5(1), md5(2));
    assert_history(
        &target,
        &wh,
        "history.docs",
        "id",
        "id, rev, md5(body)",
        Layout::Tidemark,
        &[&t1, &t2, &t3, &t4],
        &[
            version("(1)", &format!("(1,0,{m1})"), "c", &t1, Some(&t2)),
            version("(1)", &format!("(1,1,{m1})"), "u", &t2, Some(&t3)),
            version("(1)", &format!("(1,2,{m1})"), "u", &t3, None),
            version("(2)", &format!("(2,0,{m2})"), "c", &t1, Some(&t3)),
            version("(2)", &format!("(2,1,{m2})"), "u", &t3, Some(&t4)),
            version("(2)", &format!("(2,3,{m2})"), "u", &t4, None),
        ],
        false,
    );
    let columns = "id, rev, md5(body), note";
    assert_eq!(
        target.dump(&wh, "history.docs WHERE is_current", columns),
        source.dump(&db, "public.docs", columns)
    );
    assert!(agent.terminate().success());
}

/// Applying the log transaction by transaction, and any already-applied suffix again, leaves
/// the history byte for byte as one application did; one batch of everything too.
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

    /// Commit times: transaction `lsn` commits at BASE + lsn seconds.
    const BASE: i64 = 1_700_000_000_000_000;

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
    // What a delete or key update carries under the default replica identity.
    let key = |id: i64| Some(vec![Value::Int(id), Value::Null]);
    let mut lsn: u64 = 100;
    type Change = (Op, Option<Vec<Value>>, Option<Vec<Value>>);
    let mut tx = |writer: &mut tidemark::log::LogWriter, changes: Vec<Change>| {
        lsn += 100;
        let commit_ts = BASE + lsn as i64 * 1_000_000;
        writer
            .append(&Record::Begin(TxBegin {
                origin: TxOrigin::Postgres { xid: lsn as u32 },
                commit_position: Position(lsn),
                commit_ts,
            }))
            .unwrap();
        for (offset, (op, before, after)) in changes.into_iter().enumerate() {
            writer
                .append(&Record::Change(ChangeEvent {
                    relation,
                    position: Position(lsn - 50 + offset as u64),
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
                commit_ts,
            }))
            .unwrap();
    };
    // 200
    tx(
        &mut writer,
        (1..=5).map(|i| (Op::Insert, None, row(i, i))).collect(),
    );
    // 300
    tx(
        &mut writer,
        vec![(Op::Update, None, row(1, 10)), (Op::Delete, key(2), None)],
    );
    // 400
    tx(
        &mut writer,
        vec![
            (Op::Update, key(3), row(30, 3)),
            (Op::Insert, None, row(2, 20)),
        ],
    );
    // 500
    tx(
        &mut writer,
        vec![
            (Op::Truncate, None, None),
            (Op::Insert, None, row(7, 7)),
            (Op::Insert, None, row(8, 8)),
        ],
    );
    // 600
    tx(
        &mut writer,
        vec![(Op::Update, None, row(7, 70)), (Op::Delete, key(8), None)],
    );
    // 700
    tx(
        &mut writer,
        vec![
            (Op::Insert, None, row(9, 9)),
            (Op::Update, None, row(9, 90)),
            (Op::Delete, key(7), None),
            (Op::Insert, None, row(7, 71)),
        ],
    );
    log.flush().await.unwrap();
    let entries = log.read(0, 1000).unwrap();
    let ends: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.record, Record::Commit(_)))
        .map(|(i, _)| i + 1)
        .collect();

    // `id v op lsn from..to current` per version, with the LSNs and times as numbers.
    let expected_without_tombstones = "\
        1 1 c 200 200..300 f\n\
        1 10 u 300 300..500 f\n\
        2 2 c 200 200..300 f\n\
        2 20 c 400 400..500 f\n\
        3 3 c 200 200..400 f\n\
        4 4 c 200 200..500 f\n\
        5 5 c 200 200..500 f\n\
        7 7 c 500 500..600 f\n\
        7 70 u 600 600..700 f\n\
        7 71 u 700 700..- t\n\
        8 8 c 500 500..600 f\n\
        9 90 c 700 700..- t\n\
        30 3 c 400 400..500 f";
    let configs = [
        ("tm", ColumnNaming::Tidemark, Layout::Tidemark, false),
        ("tm_deletes", ColumnNaming::Tidemark, Layout::Tidemark, true),
        ("dbt", ColumnNaming::Dbt, Layout::Dbt, false),
        ("dbt_deletes", ColumnNaming::Dbt, Layout::Dbt, true),
    ];
    for (schema, columns, layout, history_deletes) in configs {
        let config = |schema: &str| PostgresSinkConfig {
            url: pg.url(&warehouse).parse().unwrap(),
            schema: schema.into(),
            mode: SinkMode::Scd2,
            soft_delete: false,
            columns,
            history_deletes,
            dropped_columns: DroppedColumns::Keep,
            tables: vec![],
        };
        let table = format!("{schema}.t");
        let history = || {
            pg.psql(
                &warehouse,
                &format!("COPY (SELECT * FROM {table} ORDER BY id, _tidemark_lsn) TO STDOUT"),
            )
        };
        let mut sink = PostgresSink::new(schema, &config(schema), log.clone(), dir.path())
            .unwrap_or_else(|e| panic!("{schema}: {e}"));
        let mut start = sink.open().await.unwrap() as usize;
        assert_eq!(start, 0);
        for &end in &ends {
            sink.apply(&entries[start..end]).await.unwrap();
            let once = history();
            for replay_from in (0..end).filter(|i| matches!(entries[*i].record, Record::Begin(_))) {
                sink.apply(&entries[replay_from..end]).await.unwrap();
                assert_eq!(
                    history(),
                    once,
                    "{schema}: replaying from record {replay_from} to {end} changed the history"
                );
            }
            start = end;
        }
        let mut reopened =
            PostgresSink::new(schema, &config(schema), log.clone(), dir.path()).unwrap();
        assert_eq!(reopened.open().await.unwrap(), entries.last().unwrap().seq);

        let numbers = pg.psql(
            &warehouse,
            &format!(
                "SELECT id, v, _tidemark_op, _tidemark_lsn - '0/0', \
                 ({} - {BASE}) / 1000000 || '..' || coalesce((({} - {BASE}) / 1000000)::text, '-'), \
                 {} FROM {table} ORDER BY id, _tidemark_lsn",
                micros(layout.valid_from()),
                micros(layout.valid_to()),
                layout.is_current()
            ),
        )
        .replace('|', " ");
        if history_deletes {
            let got = versions(&pg, &warehouse, &table, "id", "id, v", layout);
            assert_chains(&got, true, &table);
            assert_eq!(
                pg.psql(
                    &warehouse,
                    &format!(
                        "SELECT string_agg(id || ':' || v, ' ' ORDER BY id) FROM {table} \
                         WHERE {} AND _tidemark_op <> 'd'",
                        layout.is_current()
                    )
                ),
                "7:71 9:90",
                "{table}:\n{numbers}"
            );
            // The deletes of key 2 (at 300) and of key 8 (at 600) left tombstones.
            assert_eq!(
                pg.psql(
                    &warehouse,
                    &format!(
                        "SELECT string_agg(id || ':' || v || '@' || (_tidemark_lsn - '0/0'), ' ' \
                         ORDER BY id, _tidemark_lsn) FROM {table} \
                         WHERE _tidemark_op = 'd' AND _tidemark_lsn - '0/0' IN (300, 600)"
                    )
                ),
                "2:2@300 8:8@600",
                "{table}:\n{numbers}"
            );
        } else {
            assert_eq!(numbers, expected_without_tombstones, "{table}");
        }

        // The same log in one batch gives the same history.
        let whole = format!("{schema}_whole");
        let mut sink = PostgresSink::new(&whole, &config(&whole), log.clone(), dir.path()).unwrap();
        assert_eq!(sink.open().await.unwrap(), 0);
        sink.apply(&entries).await.unwrap();
        let all_at_once = pg.psql(
            &warehouse,
            &format!("COPY (SELECT * FROM {whole}.t ORDER BY id, _tidemark_lsn) TO STDOUT"),
        );
        assert_eq!(
            all_at_once,
            history(),
            "{schema}: one batch (left) and a batch per transaction (right) differ"
        );
    }
}

#[test]
fn merge_scd2_and_jsonl_sinks_apply_side_by_side() {
    let pg = cluster();
    let (db, wh) = databases(&pg, "CREATE TABLE t (id int PRIMARY KEY, v text);");
    let sinks = format!(
        "[[sink]]\nname = \"mirror\"\ntype = \"postgres\"\nurl = \"{}\"\nschema = \"replica\"\n\
         mode = \"merge\"\n\n{}\n[[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n",
        pg.url(&wh),
        scd2_sink(&pg, &wh, "history", "history", "")
    );
    let (setup, agent) = start_agent(&pg, &db, "\"public.t\"", &sinks);
    pg.psql(
        &db,
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 300) g",
    );
    pg.psql(&db, "DELETE FROM t WHERE id % 3 = 0");
    pg.psql(&db, "UPDATE t SET v = v || '!' WHERE id % 5 = 0");
    // 300 inserts, 100 deletes, 40 updates (multiples of 5 but not of 3).
    let want = pg.dump(&db, "public.t", "*");
    let mut mirror = String::new();
    let same = eventually(WAIT, || {
        mirror = pg.dump(&wh, "replica.t", "*");
        mirror == want
    });
    assert!(same, "mirror differs\nsource:\n{want}\nmirror:\n{mirror}");
    let counts = || {
        pg.try_psql(
            &wh,
            "SELECT count(*), count(*) FILTER (WHERE is_current) FROM history.t",
        )
        .unwrap_or_default()
    };
    assert!(
        eventually(WAIT, || counts() == "340|200"),
        "history.t: {} versions|current, expected 340|200\n{}",
        counts(),
        agent.log()
    );
    assert_current_is_source(
        &pg,
        &db,
        &wh,
        ("public.t", "history.t"),
        "id, v",
        "is_current",
    );
    let got = versions(&pg, &wh, "history.t", "id", "id, v", Layout::Tidemark);
    assert_chains(&got, false, "history.t");
    assert_lsn_follows_commit_order(&got, "history.t");
    assert_eq!(
        pg.psql(
            &wh,
            "SELECT string_agg(_tidemark_op || ':' || n, ' ' ORDER BY _tidemark_op) \
             FROM (SELECT _tidemark_op, count(*) AS n FROM history.t GROUP BY 1) c"
        ),
        "c:300 u:40"
    );
    assert!(
        eventually(WAIT, || setup.envelopes().len() >= 440),
        "{} envelopes",
        setup.envelopes().len()
    );
    let envelopes = setup.envelopes();
    let mut ops: BTreeMap<String, usize> = BTreeMap::new();
    for e in &envelopes {
        *ops.entry(e["op"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    assert_eq!(
        format!("{ops:?}"),
        r#"{"c": 300, "d": 100, "u": 40}"#,
        "JSONL envelopes by op"
    );
    let positions = || {
        pg.try_psql(
            &wh,
            "SELECT (SELECT log_position FROM replica._tidemark_checkpoint) \
             = (SELECT log_position FROM history._tidemark_checkpoint)",
        )
        .unwrap_or_default()
    };
    assert!(
        eventually(WAIT, || positions() == "t"),
        "the mirror's and the history's checkpoints differ"
    );
    assert!(agent.terminate().success());
}

/// An audit of every row change in the source, written by triggers in the changing
/// transaction: per (table, key, transaction) whether the key is present afterwards and the
/// row then (the TOASTed `body` as its md5). Rolled-back transactions leave nothing. The
/// agent does not capture it.
const AUDIT: &str = r#"
CREATE TABLE audit (id bigserial PRIMARY KEY, tbl text NOT NULL, k text NOT NULL,
                    xid bigint NOT NULL, present boolean NOT NULL, val text);
CREATE FUNCTION audit_key(r jsonb, cols text[]) RETURNS text LANGUAGE sql IMMUTABLE AS
  $$ SELECT jsonb_agg(r -> c ORDER BY o)::text FROM unnest(cols) WITH ORDINALITY AS u(c, o) $$;
CREATE FUNCTION audit_val(r jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS
  $$ SELECT (CASE WHEN r ? 'body' THEN jsonb_set(r, '{body}', to_jsonb(md5(r ->> 'body')))
                  ELSE r END)::text $$;
CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  old_k text;
  new_k text;
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') THEN old_k := audit_key(to_jsonb(OLD), TG_ARGV); END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') THEN new_k := audit_key(to_jsonb(NEW), TG_ARGV); END IF;
  IF old_k IS NOT NULL AND old_k IS DISTINCT FROM new_k THEN
    INSERT INTO audit (tbl, k, xid, present) VALUES (TG_TABLE_NAME, old_k, txid_current(), false);
  END IF;
  IF new_k IS NOT NULL THEN
    INSERT INTO audit (tbl, k, xid, present, val)
      VALUES (TG_TABLE_NAME, new_k, txid_current(), true, audit_val(to_jsonb(NEW)));
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON accounts
  FOR EACH ROW EXECUTE FUNCTION audit_row('id');
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON lines
  FOR EACH ROW EXECUTE FUNCTION audit_row('a', 'b');
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON docs
  FOR EACH ROW EXECUTE FUNCTION audit_row('id');
"#;

/// The workload's tables with their key columns.
const KEYS: &[(&str, &str)] = &[("accounts", "id"), ("lines", "a, b"), ("docs", "id")];

/// Lines `table<TAB>key<TAB>count`: per key, the number of transactions after which the key was
/// present, from the audit (the expected number of versions).
fn audited_version_counts(pg: &PgCluster, db: &str) -> BTreeSet<String> {
    pg.psql(
        db,
        "SELECT tbl, k, count(*) FROM (
           SELECT DISTINCT ON (tbl, k, xid) tbl, k, xid, present
           FROM audit ORDER BY tbl, k, xid, id DESC) last
         WHERE present GROUP BY tbl, k",
    )
    .lines()
    .map(|l| l.replace('|', "\t"))
    .collect()
}

/// Lines `table<TAB>key<TAB>op<TAB>row<TAB>from..to` of every version the audit says must exist: one per
/// (key, transaction after which the key was present), op 'u' when the key was present before
/// the transaction, from its commit time to the commit time of the key's next transaction.
/// The workload commits one transaction at a time, so audit order is commit order.
fn audited_versions(pg: &PgCluster, db: &str) -> BTreeSet<String> {
    let sql = format!(
        "WITH last AS (
           SELECT DISTINCT ON (tbl, k, xid) tbl, k, xid, present, val, id
           FROM audit ORDER BY tbl, k, xid, id DESC
         ), chained AS (
           SELECT tbl, k, present, val, {} AS at,
                  coalesce(lag(present) OVER w, false) AS existed,
                  {} AS next_at
           FROM last WINDOW w AS (PARTITION BY tbl, k ORDER BY id)
         )
         SELECT tbl, k, CASE WHEN existed THEN 'u' ELSE 'c' END, val,
                at || '..' || coalesce(next_at::text, '-')
         FROM chained WHERE present",
        micros("pg_xact_commit_timestamp(xid::text::xid)"),
        micros("pg_xact_commit_timestamp((lead(xid) OVER w)::text::xid)"),
    );
    pg.psql(db, &sql)
        .lines()
        .map(|l| l.replace('|', "\t"))
        .collect()
}

/// The history's versions in the format of [`audited_versions`].
fn history_versions(pg: &PgCluster, warehouse: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (table, key) in KEYS {
        let sql = format!(
            "SELECT '{table}', jsonb_build_array({key})::text, _tidemark_op,
                    (CASE WHEN r ? 'body'
                          THEN jsonb_set(r, '{{body}}', coalesce(to_jsonb(md5(r ->> 'body')), 'null'))
                          ELSE r END)::text,
                    {} || '..' || coalesce({}::text, '-')
             FROM history.{table} h,
                  LATERAL (SELECT to_jsonb(h) - ARRAY['valid_from', 'valid_to', 'is_current',
                                                      '_tidemark_op', '_tidemark_lsn'] AS r) x",
            micros("h.valid_from"),
            micros("h.valid_to"),
        );
        out.extend(
            pg.psql(warehouse, &sql)
                .lines()
                .map(|l| l.replace('|', "\t")),
        );
    }
    out
}

fn history_version_counts(pg: &PgCluster, warehouse: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (table, key) in KEYS {
        let sql = format!(
            "SELECT '{table}', jsonb_build_array({key})::text, count(*) FROM history.{table} \
             GROUP BY 2"
        );
        out.extend(
            pg.psql(warehouse, &sql)
                .lines()
                .map(|l| l.replace('|', "\t")),
        );
    }
    out
}

/// `what` equal sets, or a panic listing (some of) the differences.
fn assert_same_lines(got: &BTreeSet<String>, want: &BTreeSet<String>, what: &str) {
    if got == want {
        return;
    }
    let missing: Vec<&String> = want.difference(got).take(25).collect();
    let extra: Vec<&String> = got.difference(want).take(25).collect();
    panic!(
        "{what}: {} expected, {} in the history; {} expected lines missing, {} unexpected\n\
         --- missing (first 25) ---\n{}\n--- unexpected (first 25) ---\n{}",
        want.len(),
        got.len(),
        want.difference(got).count(),
        got.difference(want).count(),
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        extra
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_matches_the_audited_versions_after_sigkills_under_a_random_workload() {
    use common::workload;
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let pg = cluster();
    let (db, wh) = databases(&pg, workload::SCHEMA);
    pg.psql(&db, AUDIT);
    // Small batches, so the 2,000-statement transactions are applied in chunks.
    let setup = AgentSetup::with_sinks(
        &pg.url(&db),
        "\"public.accounts\", \"public.lines\", \"public.docs\", \"public.tick\"",
        &scd2_sink(&pg, &wh, "history", "history", "batch_max_rows = 500"),
    );
    let mut agent = Some(setup.start());
    tokio::task::block_in_place(|| agent.as_mut().unwrap().wait_streaming());

    let kills_done = std::sync::Arc::new(AtomicUsize::new(0));
    let workload = tokio::spawn({
        let kills_done = kills_done.clone();
        let client = pg.connect(&db).await;
        async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(0x5cd2);
            let mut transactions = 0;
            while transactions < 4_000 || kills_done.load(Ordering::SeqCst) < 3 {
                if transactions % 500 == 250 {
                    workload::large_transaction(&client, &mut rng, 2_000).await;
                } else {
                    workload::random_transaction(&client, &mut rng).await;
                }
                transactions += 1;
            }
            transactions
        }
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x51c4);
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
    let transactions = workload.await.unwrap();
    assert!(kills >= 3);
    let agent = agent.unwrap();
    tokio::task::block_in_place(|| {
        sync(
            (&pg, &db),
            (&pg, &wh),
            "history",
            &agent,
            Duration::from_secs(120),
        );

        // The oracle itself: its current versions are the source's rows.
        let audited = audited_versions(&pg, &db);
        let audited_current: BTreeSet<String> = audited
            .iter()
            .filter(|l| l.ends_with("..-"))
            .map(|l| {
                let mut f = l.split('\t');
                let (table, key) = (f.next().unwrap(), f.next().unwrap());
                format!("{table}\t{key}")
            })
            .collect();
        let mut source_keys = BTreeSet::new();
        for (table, key) in KEYS {
            source_keys.extend(
                pg.psql(
                    &db,
                    &format!("SELECT jsonb_build_array({key})::text FROM {table}"),
                )
                .lines()
                .map(|k| format!("{table}\t{k}")),
            );
        }
        assert_eq!(
            audited_current, source_keys,
            "the audit does not describe the source"
        );
        eprintln!(
            "{transactions} transactions, {kills} SIGKILLs, {} audited versions",
            audited.len()
        );

        // Every check runs, so a failure report shows all that differs; each failure's
        // message is printed above the final panic.
        let mut failed: Vec<&str> = Vec::new();
        let mut check = |name: &'static str, f: &dyn Fn()| {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                failed.push(name);
            }
        };
        check("version count per key", &|| {
            assert_same_lines(
                &history_version_counts(&pg, &wh),
                &audited_version_counts(&pg, &db),
                "versions per key (table, key, count)",
            );
        });
        check("intervals chain", &|| {
            for (table, key) in KEYS {
                let history = format!("history.{table}");
                let got = versions(&pg, &wh, &history, key, key, Layout::Tidemark);
                assert_chains(&got, false, &history);
                assert_lsn_follows_commit_order(&got, &history);
            }
        });
        check("current versions equal the source", &|| {
            for (table, columns) in workload::TABLES {
                assert_current_is_source(
                    &pg,
                    &db,
                    &wh,
                    (&format!("public.{table}"), &format!("history.{table}")),
                    columns,
                    "is_current",
                );
            }
        });
        check("every version's row, op and interval", &|| {
            assert_same_lines(
                &history_versions(&pg, &wh),
                &audited,
                "versions (table, key, op, row, from..to)",
            );
        });
        check("primary key", &|| {
            assert_eq!(
                primary_key_of(&pg, &wh, "history.lines"),
                "a,b,_tidemark_lsn"
            );
        });
        assert!(
            failed.is_empty(),
            "failed checks: {failed:?} (see the messages above)"
        );
    });
    assert!(agent.terminate().success());
}
