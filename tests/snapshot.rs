#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The initial snapshot against real PostgreSQL: with `snapshot = "initial"` the rows that
//! exist when the slot is created reach every sink once, as transactions of at most 50,000
//! `op = "r"` changes, and the stream continues exactly where the snapshot ends, however many
//! writes run meanwhile; a snapshot cut short by SIGKILL is taken again from scratch and
//! replaces (truncates) whatever the cut attempt had delivered.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent::{eventually, Agent, AgentSetup};
use common::PgCluster;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// How long a sink may take to apply what was committed before it is declared stuck.
const WAIT: Duration = Duration::from_secs(120);
/// Rows of the table large enough to take a while (seconds) to copy; with `fillfactor = 50`
/// it spans about 4,000 blocks, so the snapshot splits it into block ranges.
const BIG_ROWS: i64 = 200_000;
/// The most changes one logged snapshot transaction holds (README: transactions of 50,000).
const SNAPSHOT_TRANSACTION_ROWS: u64 = 50_000;

// ---------------------------------------------------------------------------------------------
// Setup

/// A merge sink `mirror` (schema `replica`), an SCD2 sink `history` (schema `history`) into
/// `warehouse`, and a JSONL sink `events`.
fn three_sinks(pg: &PgCluster, warehouse: &str) -> String {
    let url = pg.url(warehouse);
    format!(
        "[[sink]]\nname = \"mirror\"\ntype = \"postgres\"\nurl = \"{url}\"\nschema = \"replica\"\n\
         mode = \"merge\"\n\n\
         [[sink]]\nname = \"history\"\ntype = \"postgres\"\nurl = \"{url}\"\nschema = \"history\"\n\
         mode = \"scd2\"\n\n\
         [[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n"
    )
}

/// An agent capturing `tables` into `sinks`, with `snapshot = "initial"` and
/// `snapshot_parallelism = parallelism`.
fn snapshot_setup(
    pg: &PgCluster,
    db: &str,
    tables: &str,
    sinks: &str,
    parallelism: usize,
) -> AgentSetup {
    let setup = AgentSetup::with_sinks(&pg.url(db), tables, sinks);
    let text = std::fs::read_to_string(&setup.config).unwrap();
    assert!(text.contains("snapshot = \"never\""), "{text}");
    let text = text.replacen(
        "snapshot = \"never\"",
        &format!("snapshot = \"initial\"\nsnapshot_parallelism = {parallelism}"),
        1,
    );
    std::fs::write(&setup.config, text).unwrap();
    setup
}

/// The agent log of every run so far.
fn whole_log(setup: &AgentSetup) -> String {
    std::fs::read_to_string(setup.dir.path().join("agent.log")).unwrap_or_default()
}

/// `name=value` of a tracing line (quotes stripped), if it has the field.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let pattern = format!(" {name}=");
    let start = line.find(&pattern)? + pattern.len();
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

/// The source's column list of `table` (as `quote_ident`ed names, in order), to read the
/// same columns from a target that has more.
fn columns_of(pg: &PgCluster, db: &str, table: &str) -> String {
    pg.psql(
        db,
        &format!(
            "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute \
             WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped"
        ),
    )
}

/// Commits a new row to `tick` and waits until the merge sink, the SCD2 sink and the JSONL
/// sink applied it. Transactions are applied whole and in commit order, so then every
/// transaction committed before is applied too.
fn sync(pg: &PgCluster, db: &str, warehouse: &str, setup: &AgentSetup, agent: &Agent) {
    let n = pg.psql(
        db,
        "INSERT INTO tick SELECT coalesce(max(n), 0) + 1 FROM tick RETURNING n",
    );
    for schema in ["replica", "history"] {
        let query = format!("SELECT count(*) FROM {schema}.tick WHERE n = {n}");
        assert!(
            eventually(WAIT, || pg.try_psql(warehouse, &query).as_deref()
                == Some("1")),
            "sink into {schema} did not apply tick {n} within {WAIT:?}\n--- agent log ---\n{}",
            agent.log()
        );
    }
    let needle = format!("\"after\":{{\"n\":{n}}}");
    assert!(
        eventually(WAIT, || jsonl_tail_contains(&setup.events_dir(), &needle)),
        "the JSONL sink did not write tick {n} within {WAIT:?}\n--- agent log ---\n{}",
        agent.log()
    );
}

/// Whether the last 64 KiB of the newest JSONL file contain `needle`.
fn jsonl_tail_contains(dir: &Path, needle: &str) -> bool {
    let Some(last) = jsonl_files(dir).pop() else {
        return false;
    };
    let Ok(mut file) = std::fs::File::open(last) else {
        return false;
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut tail = Vec::new();
    let _ = file.read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).contains(needle)
}

fn jsonl_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Calls `each` with every line the JSONL sink wrote, in file order.
fn for_each_line(dir: &Path, mut each: impl FnMut(&Path, &str)) {
    for file in jsonl_files(dir) {
        let reader = std::io::BufReader::new(std::fs::File::open(&file).unwrap());
        for line in reader.lines() {
            let line = line.unwrap();
            if !line.is_empty() {
                each(&file, &line);
            }
        }
    }
}

/// Calls `each` with every envelope the JSONL sink wrote, in file order, without holding them
/// all in memory.
fn for_each_envelope(dir: &Path, mut each: impl FnMut(&Value)) {
    for_each_line(dir, |file, line| {
        let envelope: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}: bad JSON line {line:?}: {e}", file.display()));
        each(&envelope);
    });
}

/// The parts of an envelope the replay reads (typed, which parses faster than a `Value`).
#[derive(serde::Deserialize)]
struct Envelope {
    op: String,
    before: Option<BTreeMap<String, Value>>,
    after: Option<BTreeMap<String, Value>>,
    source: EnvelopeSource,
    transaction: EnvelopeTransaction,
}

#[derive(serde::Deserialize)]
struct EnvelopeSource {
    table: String,
    snapshot: String,
}

#[derive(serde::Deserialize)]
struct EnvelopeTransaction {
    id: String,
}

/// A row of an envelope (`before` or `after`).
type EnvelopeRow = BTreeMap<String, Value>;

/// Lines only in `want` (`-`) or only in `got` (`+`), at most 20 of each, for messages.
fn difference(want: &str, got: &str) -> String {
    let want: BTreeSet<&str> = want.lines().collect();
    let got: BTreeSet<&str> = got.lines().collect();
    let missing: Vec<String> = want
        .difference(&got)
        .take(20)
        .map(|l| format!("- {l}"))
        .collect();
    let extra: Vec<String> = got
        .difference(&want)
        .take(20)
        .map(|l| format!("+ {l}"))
        .collect();
    format!(
        "{} source rows missing from the target (-), {} target rows not in the source (+):\n{}\n{}",
        want.difference(&got).count(),
        got.difference(&want).count(),
        missing.join("\n"),
        extra.join("\n")
    )
}

/// The merge target `replica.<table>` equals the source table row for row.
fn assert_mirror(pg: &PgCluster, db: &str, warehouse: &str, table: &str) {
    let want = pg.dump(db, &format!("public.{table}"), "*");
    let got = pg.dump(warehouse, &format!("replica.{table}"), "*");
    assert!(
        got == want,
        "merge target replica.{table} differs from the source: {}",
        difference(&want, &got)
    );
}

/// The current SCD2 versions of `history.<table>` equal the source table row for row.
fn assert_current_history(pg: &PgCluster, db: &str, warehouse: &str, table: &str) {
    let columns = columns_of(pg, db, &format!("public.{table}"));
    let want = pg.dump(db, &format!("public.{table}"), &columns);
    let got = pg.dump(
        warehouse,
        &format!("history.{table} WHERE is_current"),
        &columns,
    );
    assert!(
        got == want,
        "current versions of history.{table} differ from the source: {}",
        difference(&want, &got)
    );
}

/// How many snapshot attempts may have reached the sinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempts {
    One,
    /// Earlier attempts were cut short after delivering part of their rows.
    Several,
}

/// Every key's versions in `history.<table>` chain: ordered by `_tidemark_lsn`, a snapshot
/// version (`r`) is preceded only by snapshot versions (of earlier, cut attempts), the first is
/// `r` or `c`, all but the last are closed, `valid_to IS NULL` is `is_current`, an update
/// starts where its predecessor ends and nothing overlaps; the last snapshot's LSN is below
/// every streamed version's and the `r` versions of earlier attempts are all closed (with
/// `Attempts::One` there is one snapshot LSN); and no interval ends before it starts.
fn assert_history_chains(
    pg: &PgCluster,
    warehouse: &str,
    table: &str,
    key: &str,
    attempts: Attempts,
) {
    let broken = pg.psql(
        warehouse,
        &format!(
            "WITH v AS (
               SELECT ROW({key})::text AS k, _tidemark_op AS op, _tidemark_lsn AS lsn,
                      valid_from, valid_to, is_current,
                      row_number() OVER w AS rn, count(*) OVER (PARTITION BY {key}) AS n,
                      count(*) FILTER (WHERE _tidemark_op <> 'r') OVER w AS streamed_so_far,
                      lead(valid_from) OVER w AS next_from, lead(_tidemark_op) OVER w AS next_op
               FROM history.{table} WINDOW w AS (PARTITION BY {key} ORDER BY _tidemark_lsn))
             , bad AS (SELECT DISTINCT k FROM v
               WHERE op NOT IN ('r', 'c', 'u')
                  OR (op = 'r' AND streamed_so_far > 0)
                  OR (rn = 1 AND op NOT IN ('r', 'c'))
                  OR ((valid_to IS NULL) <> is_current)
                  OR (rn < n AND valid_to IS NULL)
                  OR (next_op = 'u' AND valid_to <> next_from)
                  OR valid_to > next_from
               ORDER BY k LIMIT 5)
             SELECT (SELECT count(*) FROM bad), k, rn, op, lsn, valid_from, valid_to, is_current
             FROM v JOIN bad USING (k) ORDER BY k, lsn"
        ),
    );
    assert!(
        broken.is_empty(),
        "history.{table}: keys whose versions break the chain, with all their versions \
         (broken keys shown|key|rn|op|lsn|valid_from|valid_to|is_current):\n{broken}"
    );
    let lsns = pg.psql(
        warehouse,
        &format!(
            "WITH r AS (SELECT max(_tidemark_lsn) AS last FROM history.{table}
                        WHERE _tidemark_op = 'r')
             SELECT count(DISTINCT _tidemark_lsn) FILTER (WHERE _tidemark_op = 'r'),
                    coalesce((SELECT last FROM r)
                             < min(_tidemark_lsn) FILTER (WHERE _tidemark_op <> 'r'), true),
                    count(*) FILTER (WHERE _tidemark_op = 'r' AND is_current
                                     AND _tidemark_lsn <> (SELECT last FROM r)) = 0
             FROM history.{table}"
        ),
    );
    let (snapshot_lsns, rest) = lsns.split_once('|').unwrap();
    let snapshot_lsns: u64 = snapshot_lsns.parse().unwrap();
    assert!(
        rest == "t|t"
            && match attempts {
                Attempts::One => snapshot_lsns == 1,
                Attempts::Several => snapshot_lsns >= 1,
            },
        "history.{table}: {lsns} (snapshot LSNs | the last snapshot's LSN below every streamed \
         one | no current version of an earlier attempt); {attempts:?} attempts reached the sink"
    );
    let inverted = pg.psql(
        warehouse,
        &format!(
            "SELECT count(*) OVER (), ROW({key})::text, _tidemark_op, _tidemark_lsn, valid_from,
                    valid_to, is_current
             FROM history.{table} WHERE valid_to < valid_from ORDER BY {key}, _tidemark_lsn
             LIMIT 20"
        ),
    );
    assert!(
        inverted.is_empty(),
        "history.{table}: versions whose valid_to is before their valid_from \
         (how many|key|op|lsn|valid_from|valid_to|is_current):\n{inverted}"
    );
}

// ---------------------------------------------------------------------------------------------
// The JSONL stream replayed strictly

/// What the JSONL sink wrote, replayed onto an empty table per source table: snapshot reads
/// and creates must find the key absent, updates and deletes present, so a row missed or
/// doubled at the seam between snapshot and stream shows. A truncate (the first thing a
/// repeated snapshot logs) empties its table.
#[derive(Default)]
struct Replay {
    /// table → key → value.
    tables: BTreeMap<String, BTreeMap<String, String>>,
    /// Snapshot reads per table since its last truncate.
    reads: BTreeMap<String, u64>,
    /// Truncates per table.
    truncates: BTreeMap<String, u64>,
    /// Envelopes of streamed changes (`c`, `u`, `d`).
    streamed: u64,
    /// Snapshot transactions (id → envelopes), in order.
    snapshot_transactions: Vec<(String, u64)>,
    /// Violations, for the message (at most 20 kept).
    errors: Vec<String>,
    error_count: u64,
}

impl Replay {
    /// `key` and `value` render a row (the envelope's `after` or `before`) of a table.
    fn run(
        dir: &Path,
        key: impl Fn(&str, &EnvelopeRow) -> String,
        value: impl Fn(&str, &EnvelopeRow) -> String,
    ) -> Replay {
        let mut replay = Replay::default();
        let no_row = EnvelopeRow::new();
        for_each_line(dir, |file, line| {
            let e: Envelope = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: bad envelope {line:?}: {e}", file.display()));
            let table = e.source.table.as_str();
            let op = e.op.as_str();
            let snapshot = e.source.snapshot.as_str();
            let before = e.before.as_ref().unwrap_or(&no_row);
            let after = e.after.as_ref().unwrap_or(&no_row);
            let rows = replay.tables.entry(table.to_string()).or_default();
            let mut problem = None;
            let in_snapshot = op == "r" || (op == "t" && replay.streamed == 0);
            if in_snapshot {
                match replay.snapshot_transactions.last_mut() {
                    Some((id, count)) if *id == e.transaction.id => *count += 1,
                    _ => {
                        if replay
                            .snapshot_transactions
                            .iter()
                            .any(|(id, _)| *id == e.transaction.id)
                        {
                            problem = Some("snapshot transactions interleave".to_string());
                        }
                        replay
                            .snapshot_transactions
                            .push((e.transaction.id.clone(), 1));
                    }
                }
            }
            if op == "r" {
                if replay.streamed > 0 {
                    problem = Some("snapshot read after a streamed change".to_string());
                }
                if snapshot != "true" || e.before.is_some() {
                    problem = Some(format!("snapshot read with source.snapshot {snapshot:?}"));
                }
                *replay.reads.entry(table.to_string()).or_default() += 1;
            } else if op != "t" {
                replay.streamed += 1;
                if snapshot != "false" {
                    problem = Some(format!("streamed change with source.snapshot {snapshot:?}"));
                }
            }
            match op {
                "r" | "c" => {
                    let k = key(table, after);
                    if rows.insert(k.clone(), value(table, after)).is_some() {
                        problem = Some(format!("{op} of key {k} that is already there (doubled)"));
                    }
                }
                "u" => {
                    let k = key(table, after);
                    if rows.insert(k.clone(), value(table, after)).is_none() {
                        problem = Some(format!("update of key {k} that is not there (missed)"));
                    }
                }
                "d" => {
                    let k = key(table, before);
                    if rows.remove(&k).is_none() {
                        problem = Some(format!("delete of key {k} that is not there (missed)"));
                    }
                }
                "t" => {
                    rows.clear();
                    replay.reads.remove(table);
                    *replay.truncates.entry(table.to_string()).or_default() += 1;
                }
                other => problem = Some(format!("unknown op {other:?}")),
            }
            if let Some(problem) = problem {
                replay.error_count += 1;
                if replay.errors.len() < 20 {
                    replay.errors.push(format!("{table}: {problem}: {line}"));
                }
            }
        });
        replay
    }

    /// No violation, and no snapshot transaction larger than 50,000 changes.
    fn assert_clean(&self) {
        assert!(
            self.errors.is_empty(),
            "{} envelopes break the replay:\n{}",
            self.error_count,
            self.errors.join("\n")
        );
        assert!(
            self.snapshot_transactions
                .iter()
                .all(|(_, n)| *n <= SNAPSHOT_TRANSACTION_ROWS),
            "snapshot transactions larger than {SNAPSHOT_TRANSACTION_ROWS}: {:?}",
            self.snapshot_transactions
        );
    }

    /// The replayed `table` equals `source` (key → value).
    fn assert_table(&self, table: &str, source: &BTreeMap<String, String>) {
        let empty = BTreeMap::new();
        let got = self.tables.get(table).unwrap_or(&empty);
        if got == source {
            return;
        }
        let missing: Vec<_> = source
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .take(10)
            .collect();
        let extra: Vec<_> = got
            .iter()
            .filter(|(k, v)| source.get(*k) != Some(v))
            .take(10)
            .collect();
        panic!(
            "the JSONL replay of {table} ({} rows) differs from the source ({} rows)\n\
             source rows not replayed so: {missing:?}\nreplayed rows not so in the source: {extra:?}",
            got.len(),
            source.len()
        );
    }
}

/// The rows of `sql` (two columns: key and value, as text) as key → value.
fn keyed(pg: &PgCluster, db: &str, sql: &str) -> BTreeMap<String, String> {
    pg.psql(
        db,
        &format!("SELECT json_build_array(k::text, v::text) FROM ({sql}) q(k, v)"),
    )
    .lines()
    .filter(|l| !l.is_empty())
    .map(|l| {
        let [k, v]: [String; 2] = serde_json::from_str(l).unwrap();
        (k, v)
    })
    .collect()
}

/// A row's column as text (`NULL` for null or missing).
fn text(row: &EnvelopeRow, column: &str) -> String {
    row.get(column)
        .map_or_else(|| "NULL".to_string(), json_text)
}

fn json_text(v: &Value) -> String {
    match v {
        Value::Null => "NULL".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// A big table and writes that run while it is copied

/// `big` (BIG_ROWS rows over about 4,000 blocks, analyzed so the snapshot splits it into
/// block ranges), `pairs` (a composite key, 600 rows) and an empty `tick`.
const BIG_SCHEMA: &str = "
CREATE TABLE tick (n int PRIMARY KEY);
CREATE TABLE big (id bigint PRIMARY KEY, grp int NOT NULL, v int NOT NULL, note text)
  WITH (fillfactor = 50);
CREATE TABLE pairs (a int, b text, qty int NOT NULL, PRIMARY KEY (a, b));
INSERT INTO pairs SELECT a, b, a FROM generate_series(1, 200) a, unnest('{x,y,z}'::text[]) b;
";

fn big_databases(pg: &PgCluster) -> (String, String) {
    let db = pg.fresh_database("source");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        &format!(
            "{BIG_SCHEMA}
             INSERT INTO big SELECT g, g % 100, 0, CASE WHEN g % 7 = 0 THEN NULL ELSE md5(g::text) END
               FROM generate_series(1, {BIG_ROWS}) g;
             VACUUM ANALYZE big, pairs;"
        ),
    );
    (db, warehouse)
}

/// Random transactions on `big` and `pairs` on their own thread until stopped: updates of one
/// row and of runs of rows, deletes, inserts of new keys, re-inserts, key moves, composite-key
/// upserts and deletes, some rolled back.
struct Writes {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writes {
    fn start(url: String, seed: u64) -> Writes {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, committed) = (Arc::clone(&stop), Arc::clone(&committed));
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .unwrap();
                    tokio::spawn(connection);
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                    let mut next_id = BIG_ROWS + 1;
                    while !stop.load(Ordering::SeqCst) {
                        let sql = random_transaction(&mut rng, &mut next_id);
                        client
                            .batch_execute(&sql)
                            .await
                            .unwrap_or_else(|e| panic!("{sql}: {e}"));
                        if sql.ends_with("COMMIT;") {
                            committed.fetch_add(1, Ordering::SeqCst);
                        }
                        // A steady rate rather than as fast as the server goes: the backlog
                        // the sinks work through stays in proportion on a loaded machine.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                });
            }
        });
        Writes {
            stop,
            committed,
            thread: Some(thread),
        }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Stops the writes and returns how many transactions committed.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the write thread panicked");
        }
        self.committed()
    }
}

impl Drop for Writes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn random_transaction(rng: &mut rand::rngs::StdRng, next_id: &mut i64) -> String {
    let mut sql = String::from("BEGIN;");
    for _ in 0..rng.gen_range(1..=4) {
        let id = rng.gen_range(1..=BIG_ROWS);
        let (a, b) = (rng.gen_range(1..=220), ["x", "y", "z"][rng.gen_range(0..3)]);
        sql.push_str(&match rng.gen_range(0..12) {
            0..=2 => format!(
                "UPDATE big SET v = v + 1, note = 'w{}' WHERE id = {id};",
                rng.gen::<u16>()
            ),
            3 => format!(
                "UPDATE big SET v = v + 1 WHERE id BETWEEN {id} AND {};",
                id + 20
            ),
            4 | 5 => format!("DELETE FROM big WHERE id = {id};"),
            6 => {
                *next_id += 1;
                format!("INSERT INTO big VALUES ({}, -1, 0, 'new');", *next_id)
            }
            7 => format!(
                "INSERT INTO big VALUES ({id}, -2, 0, NULL) \
                 ON CONFLICT (id) DO UPDATE SET v = big.v + 100;"
            ),
            8 => format!(
                "UPDATE big SET id = id + 1000000000 WHERE id = {id} \
                 AND NOT EXISTS (SELECT 1 FROM big WHERE id = {id} + 1000000000);"
            ),
            9 | 10 => format!(
                "INSERT INTO pairs VALUES ({a}, '{b}', 1) \
                 ON CONFLICT (a, b) DO UPDATE SET qty = pairs.qty + 1;"
            ),
            _ => format!("DELETE FROM pairs WHERE a = {a} AND b = '{b}';"),
        });
    }
    sql.push_str(if rng.gen_bool(0.1) {
        "ROLLBACK;"
    } else {
        "COMMIT;"
    });
    sql
}

/// After the writes stopped and every sink caught up: the merge mirror and the current SCD2
/// versions equal the source, the SCD2 versions chain, and the JSONL stream replays onto the
/// source with nothing missed or doubled. Returns the replay.
fn assert_big_outcome(
    pg: &PgCluster,
    db: &str,
    warehouse: &str,
    setup: &AgentSetup,
    attempts: Attempts,
) -> Replay {
    for table in ["big", "pairs"] {
        assert_mirror(pg, db, warehouse, table);
    }
    for table in ["big", "pairs"] {
        assert_current_history(pg, db, warehouse, table);
    }
    let replay = Replay::run(
        &setup.events_dir(),
        |table, row| match table {
            "pairs" => format!("{}|{}", text(row, "a"), text(row, "b")),
            "tick" => text(row, "n"),
            _ => text(row, "id"),
        },
        |table, row| match table {
            "pairs" => text(row, "qty"),
            "big" => format!(
                "{}|{}|{}",
                text(row, "grp"),
                text(row, "v"),
                text(row, "note")
            ),
            _ => String::new(),
        },
    );
    replay.assert_clean();
    replay.assert_table(
        "big",
        &keyed(
            pg,
            db,
            "SELECT id, grp || '|' || v || '|' || coalesce(note, 'NULL') FROM big",
        ),
    );
    replay.assert_table(
        "pairs",
        &keyed(pg, db, "SELECT a || '|' || b, qty FROM pairs"),
    );
    let log = whole_log(setup);
    let snapshotted = log
        .lines()
        .filter(|l| l.contains("table snapshotted") && field(l, "table") == Some("public.big"))
        .filter_map(|l| field(l, "rows"))
        .next_back()
        .unwrap_or_else(|| panic!("no \"table snapshotted\" line for public.big:\n{log}"))
        .parse::<u64>()
        .unwrap();
    assert_eq!(
        replay.reads.get("big").copied().unwrap_or(0),
        snapshotted,
        "snapshot reads of big in the JSONL (since its last truncate) vs the log's \
         \"table snapshotted\" count"
    );
    assert_eq!(
        pg.psql(
            warehouse,
            "SELECT count(*) FROM history.big WHERE _tidemark_op = 'r' AND _tidemark_lsn = \
             (SELECT max(_tidemark_lsn) FROM history.big WHERE _tidemark_op = 'r')"
        ),
        snapshotted.to_string(),
        "'r' versions of the last snapshot in history.big vs the log's \"table snapshotted\" count"
    );
    assert_history_chains(pg, warehouse, "big", "id", attempts);
    assert_history_chains(pg, warehouse, "pairs", "a, b", attempts);
    replay
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Every row of every captured table, whatever its types, reaches the merge mirror as it is,
/// the SCD2 history as one current 'r' version, and the JSONL file as one `r` envelope before
/// any streamed change.
#[test]
fn snapshot_copies_every_row_and_type_into_every_sink() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("source");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        r#"
        CREATE TABLE tick (n int PRIMARY KEY);
        CREATE TYPE mood AS ENUM ('ok', 'sad');
        CREATE TABLE "Items" (id int PRIMARY KEY, name text, gone int, price numeric(40,8),
          amount numeric, doc jsonb, tags text[], nums int[], seen timestamptz, at timestamp,
          day date, span interval, raw bytea, m mood, ratio double precision, small real,
          flag boolean, u uuid, t time, big text, "Order" int);
        ALTER TABLE "Items" ALTER COLUMN big SET STORAGE EXTERNAL;
        ALTER TABLE "Items" DROP COLUMN gone;
        CREATE TABLE pairs (a int, b text, v int, note text, PRIMARY KEY (a, b));
        CREATE TABLE empty (id int PRIMARY KEY, v text);
        INSERT INTO "Items" VALUES
          (1, E'tab\there\nnew line\\back\\slash\rcr ☃ añejo', 123456789012345678901234567890.12345678,
           0.000000000000000000001, '{"a": [1, 2.5, null], "b": "\\t\n"}',
           '{x,"y z",NULL,"","a\\b","c\"d","tab	in"}', '{1,NULL,-3}',
           '2024-01-05 12:34:56.123456+05:30', '1999-12-31 23:59:59.999999', '0044-03-15 BC',
           '-1 mon 2 days -00:00:03.5', '\x00ff5c0a095c', 'sad', 0.1, 1.5e-7, true,
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '23:59:59.999999', 'short', 7),
          (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL),
          (3, '', 'NaN', 'NaN', 'null', '{}', '{}', 'infinity', '-infinity', 'infinity',
           '0', '\x', 'ok', 'NaN', 'Infinity', false, NULL, '00:00', '', NULL),
          (4, '\N', -0.5, '-Infinity', '[]', '{NULL}', '{{1,2},{3,4}}', '-infinity', 'infinity',
           '-infinity', '178000000 years', NULL, NULL, '-Infinity', '-0', NULL, NULL, NULL,
           NULL, -1),
          (5, 'toasted', 1, 1e100, '{"deep": {"x": [[]]}}', NULL, NULL, '1970-01-01 00:00:00+00',
           '2000-01-01', '2000-02-29', '1 year', '\x00', NULL, 1.7976931348623157e308, NULL,
           NULL, NULL, NULL,
           (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 3200) g), NULL);
        INSERT INTO pairs SELECT a, b, a * 10, CASE WHEN a % 3 = 0 THEN NULL ELSE E'n\t' || a || E'\\' END
          FROM generate_series(1, 700) a, unnest('{x,"y z",Ω}'::text[]) b;
        "#,
    );
    let setup = snapshot_setup(&pg, &db, "\"public.*\"", &three_sinks(&pg, &warehouse), 2);
    let mut agent = setup.start();
    agent.wait_log("streaming changes", WAIT);
    sync(&pg, &db, &warehouse, &setup, &agent);

    // The snapshot alone (tick 1 is streamed).
    for table in ["\"Items\"", "pairs"] {
        assert_mirror(&pg, &db, &warehouse, table);
        assert_current_history(&pg, &db, &warehouse, table);
        let rows = pg.psql(&db, &format!("SELECT count(*) FROM public.{table}"));
        assert_eq!(
            pg.psql(
                &warehouse,
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE _tidemark_op = 'r' AND is_current \
                     AND valid_to IS NULL), count(DISTINCT _tidemark_lsn) FROM history.{table}"
                )
            ),
            format!("{rows}|{rows}|1"),
            "history.{table}: versions | current 'r' versions | distinct LSNs"
        );
    }
    assert_eq!(
        pg.psql(
            &warehouse,
            "SELECT md5(big) FROM replica.\"Items\" WHERE id = 5"
        ),
        pg.psql(&db, "SELECT md5(big) FROM public.\"Items\" WHERE id = 5"),
    );

    // Streamed changes follow the snapshot.
    pg.psql(
        &db,
        "UPDATE \"Items\" SET name = 'streamed' WHERE id = 2;
         UPDATE \"Items\" SET \"Order\" = 8 WHERE id = 5;
         DELETE FROM pairs WHERE a = 1;
         INSERT INTO empty VALUES (1, 'first');",
    );
    sync(&pg, &db, &warehouse, &setup, &agent);
    for table in ["\"Items\"", "pairs", "empty"] {
        assert_mirror(&pg, &db, &warehouse, table);
        assert_current_history(&pg, &db, &warehouse, table);
    }
    assert_eq!(
        pg.psql(
            &warehouse,
            "SELECT md5(big) FROM history.\"Items\" WHERE id = 5 AND is_current"
        ),
        pg.psql(&db, "SELECT md5(big) FROM public.\"Items\" WHERE id = 5"),
        "the TOASTed value the update left alone is carried from the 'r' version"
    );
    assert_history_chains(&pg, &warehouse, "\"Items\"", "id", Attempts::One);
    assert_history_chains(&pg, &warehouse, "pairs", "a, b", Attempts::One);

    // JSONL: one `r` envelope per row, in one transaction, before every streamed one.
    let replay = Replay::run(
        &setup.events_dir(),
        |table, row| match table {
            "pairs" => format!("{}|{}", text(row, "a"), text(row, "b")),
            "tick" => text(row, "n"),
            _ => text(row, "id"),
        },
        |table, row| match table {
            "pairs" => format!("{}|{}", text(row, "v"), text(row, "note")),
            "Items" => text(row, "name"),
            _ => String::new(),
        },
    );
    replay.assert_clean();
    assert_eq!(
        replay.snapshot_transactions.len(),
        1,
        "2,105 rows are one snapshot transaction: {:?}",
        replay.snapshot_transactions
    );
    assert!(replay.truncates.is_empty(), "{:?}", replay.truncates);
    assert_eq!(
        format!("{:?}", replay.reads),
        r#"{"Items": 5, "pairs": 2100}"#,
        "snapshot reads per table"
    );
    assert_eq!(replay.streamed, 2 + 1 + 3 + 1 + 1, "streamed envelopes");
    replay.assert_table(
        "Items",
        &keyed(&pg, &db, "SELECT id, coalesce(name, 'NULL') FROM \"Items\""),
    );
    replay.assert_table(
        "pairs",
        &keyed(
            &pg,
            &db,
            "SELECT a || '|' || b, coalesce(v::text, 'NULL') || '|' || coalesce(note, 'NULL') FROM pairs",
        ),
    );
    let mut first = Vec::new();
    for_each_envelope(&setup.events_dir(), |e| {
        if e["op"] == "r" && e["source"]["table"] == "Items" {
            first.push(e["after"].clone());
        }
    });
    first.sort_by_key(|row| row["id"].as_i64());
    assert_eq!(
        first[0]["name"],
        "tab\there\nnew line\\back\\slash\rcr ☃ añejo"
    );
    assert_eq!(first[0]["price"], "123456789012345678901234567890.12345678");
    assert_eq!(
        first[0]["tags"],
        serde_json::json!(["x", "y z", null, "", "a\\b", "c\"d", "tab\tin"])
    );
    assert_eq!(first[0]["raw"], "AP9cCglc");
    assert_eq!(first[1]["name"], Value::Null);
    assert_eq!(first[3]["name"], "\\N");
    assert_eq!(first[4]["big"].as_str().map(str::len), Some(3200 * 32));

    // The log counts what was copied.
    let log = agent.log();
    let counts: BTreeMap<String, String> = log
        .lines()
        .filter(|l| l.contains("table snapshotted"))
        .map(|l| {
            (
                field(l, "table").unwrap_or("?").to_string(),
                field(l, "rows").unwrap_or("?").to_string(),
            )
        })
        .collect();
    assert_eq!(
        format!("{counts:?}"),
        r#"{"public.Items": "5", "public.empty": "0", "public.pairs": "2100", "public.tick": "0"}"#,
        "\"table snapshotted\" lines:\n{log}"
    );
    let done = log
        .lines()
        .find(|l| l.contains("snapshot done"))
        .unwrap_or_else(|| panic!("no \"snapshot done\" line:\n{log}"));
    assert_eq!(field(done, "rows"), Some("2105"), "{done}");
    assert!(field(done, "seconds").is_some(), "{done}");
    assert!(field(done, "rows_per_second").is_some(), "{done}");
    assert!(agent.terminate().success());
}

/// Inserts, updates, deletes and key moves run on the rows while they are copied (over several
/// connections, in block ranges): afterwards every sink equals the source, nothing missed or
/// doubled where the snapshot ends and the stream begins.
#[test]
fn writes_during_the_snapshot_are_neither_missed_nor_doubled() {
    let pg = PgCluster::start();
    let (db, warehouse) = big_databases(&pg);
    let writes = Writes::start(pg.url(&db), 0x5a4b_0001);
    // Let the writes get going before the slot is created.
    assert!(eventually(Duration::from_secs(10), || writes.committed() > 20));
    let setup = snapshot_setup(&pg, &db, "\"public.*\"", &three_sinks(&pg, &warehouse), 3);
    let mut agent = setup.start();
    agent.wait_log("snapshot started", WAIT);
    let at_start = writes.committed();
    agent.wait_log("snapshot done", WAIT);
    let at_done = writes.committed();
    agent.wait_log("streaming changes", WAIT);
    let log = agent.log();
    let started = log
        .lines()
        .find(|l| l.contains("snapshot started"))
        .unwrap();
    let ranges: usize = field(started, "ranges").unwrap().parse().unwrap();
    assert!(
        ranges > 3,
        "big was not split into block ranges (3 tables): {started}"
    );
    assert!(
        at_done > at_start + 10,
        "only {} transactions committed while the snapshot ran",
        at_done - at_start
    );
    assert_snapshot_log(&log);
    // More writes on the stream, then stop and let every sink catch up.
    let streamed_from = writes.committed();
    assert!(eventually(Duration::from_secs(30), || writes.committed()
        > streamed_from + 300));
    writes.finish();
    sync(&pg, &db, &warehouse, &setup, &agent);
    // The merge sink copied the snapshot over 3 connections and streams over one; the SCD2
    // sink always uses one.
    // Read now: the sink may apply its first batch after the log above was read.
    let log = agent.log();
    assert!(
        log.contains("copying snapshot rows over several target connections"),
        "{log}"
    );
    let connections = || {
        pg.try_psql(
            &warehouse,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
        .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(10), || connections() == "2"),
        "the sinks hold {} connections to the warehouse after the snapshot",
        connections()
    );
    let replay = assert_big_outcome(&pg, &db, &warehouse, &setup, Attempts::One);
    assert!(replay.truncates.is_empty(), "{:?}", replay.truncates);
    assert!(
        replay.snapshot_transactions.len() as u64 >= BIG_ROWS as u64 / SNAPSHOT_TRANSACTION_ROWS,
        "{:?}",
        replay.snapshot_transactions
    );
    assert!(agent.terminate().success());
}

/// The snapshot's log lines of one run add up: "table snapshotted" rows sum to "snapshot
/// done" rows; every "snapshot progress" line of big counts no more than were copied in the end
/// and carries the planner's estimate (big was analyzed); and a snapshot that took 12 s or
/// more logged progress (every 10 s).
fn assert_snapshot_log(log: &str) {
    let number = |line: &str, name: &str| -> f64 {
        field(line, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number {name}= in {line:?}"))
    };
    let done = log
        .lines()
        .find(|l| l.contains("snapshot done"))
        .unwrap_or_else(|| panic!("no \"snapshot done\" line:\n{log}"));
    let tables: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("table snapshotted"))
        .collect();
    let sum: f64 = tables.iter().map(|l| number(l, "rows")).sum();
    assert_eq!(sum, number(done, "rows"), "{done}\n{}", tables.join("\n"));
    let big = tables
        .iter()
        .find(|l| field(l, "table") == Some("public.big"))
        .map(|l| number(l, "rows"))
        .unwrap_or_else(|| panic!("no \"table snapshotted\" line for big:\n{log}"));
    let progress: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("snapshot progress") && field(l, "table") == Some("public.big"))
        .collect();
    for line in &progress {
        assert!(
            number(line, "rows") <= big,
            "{line} (copied in the end: {big})"
        );
        let estimated = number(line, "estimated");
        let expected = BIG_ROWS as f64;
        assert!(
            (expected * 0.9..=expected * 1.1).contains(&estimated),
            "{line}: the estimate is not big's {BIG_ROWS} rows"
        );
    }
    assert!(
        number(done, "seconds") < 12.0 || !progress.is_empty(),
        "a snapshot of {} s logged no progress for big:\n{log}",
        number(done, "seconds")
    );
    assert!(number(done, "rows_per_second") > 0.0, "{done}");
}

/// Waits until the log of this run says the snapshot started, then until `ready` holds, and
/// kills the agent with SIGKILL; panics when the snapshot finished first (the kill would not
/// land in it).
fn kill_during_snapshot(setup: &AgentSetup, mut agent: Agent, mut ready: impl FnMut() -> bool) {
    agent.wait_log("snapshot started", WAIT);
    let deadline = Instant::now() + WAIT;
    while !ready() {
        assert!(
            Instant::now() < deadline && !agent.log().contains("snapshot done"),
            "the snapshot finished (or {WAIT:?} passed) before the moment to kill it:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.kill();
    let log = whole_log(setup);
    let this_run = &log[log.rfind("snapshot started").unwrap()..];
    assert!(
        !this_run.contains("snapshot done"),
        "the snapshot finished before the kill landed:\n{log}"
    );
}

/// SIGKILL twice while the snapshot is being copied, with writes running: once right after it
/// started, once after the sinks applied part of it. Each start drops the slot and snapshots
/// again, truncating first what an earlier attempt delivered; rows deleted since are gone, and
/// the sinks end up equal to the source.
#[test]
fn a_snapshot_killed_midway_is_taken_again_and_replaces_what_it_delivered() {
    let pg = PgCluster::start();
    let (db, warehouse) = big_databases(&pg);
    let writes = Writes::start(pg.url(&db), 0x5a4b_0002);
    assert!(eventually(Duration::from_secs(10), || writes.committed() > 20));
    let setup = snapshot_setup(&pg, &db, "\"public.*\"", &three_sinks(&pg, &warehouse), 2);
    // The copy into the log outruns the sinks by far: a log of a few snapshot transactions
    // keeps the snapshot going until the sinks have applied most of it, so the kills land
    // in it.
    let config = std::fs::read_to_string(&setup.config).unwrap();
    let config = config.replacen("[agent]\n", "[agent]\nlog_max_bytes = \"4MiB\"\n", 1);
    std::fs::write(&setup.config, config).unwrap();

    // First attempt: killed as soon as the copy started.
    kill_during_snapshot(&setup, setup.start(), || true);
    let slot = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'tidemark_test'";
    assert_eq!(pg.psql(&db, slot), "1", "the first attempt's slot");

    // Second attempt, started at once: killed once the mirror holds part of big.
    let mirrored = || {
        pg.try_psql(&warehouse, "SELECT count(*) FROM replica.big")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let agent = setup.start();
    kill_during_snapshot(&setup, agent, || mirrored() > 0);
    let log = whole_log(&setup);
    assert_eq!(
        log.matches("dropping the slot to snapshot again").count(),
        1,
        "the second attempt did not say it snapshots again:\n{log}"
    );
    let partial = mirrored();
    assert!(
        partial > 0 && partial < BIG_ROWS as u64,
        "replica.big holds {partial} rows after the cut attempt"
    );
    // Rows the cut attempt delivered that the source then deletes must not survive.
    let delivered = pg.psql(
        &warehouse,
        "SELECT string_agg(id::text, ',') FROM (SELECT id FROM replica.big ORDER BY id LIMIT 500) d",
    );
    pg.psql(&db, &format!("DELETE FROM big WHERE id IN ({delivered})"));

    // Third attempt: runs to the end.
    let mut agent = setup.start();
    agent.wait_log("streaming changes", WAIT);
    let log = agent.log();
    assert!(
        log.contains("dropping the slot to snapshot again"),
        "the third attempt did not say it snapshots again:\n{log}"
    );
    let streamed_from = writes.committed();
    assert!(eventually(Duration::from_secs(30), || writes.committed()
        > streamed_from + 300));
    writes.finish();
    sync(&pg, &db, &warehouse, &setup, &agent);
    assert_eq!(
        pg.psql(
            &warehouse,
            &format!("SELECT count(*) FROM replica.big WHERE id IN ({delivered})")
        ),
        pg.psql(
            &db,
            &format!("SELECT count(*) FROM big WHERE id IN ({delivered})")
        ),
        "rows the cut attempt delivered and the source deleted since"
    );
    let replay = assert_big_outcome(&pg, &db, &warehouse, &setup, Attempts::Several);
    // The attempts that found a slot truncated every captured table first.
    let truncated: Vec<&String> = replay.truncates.keys().collect();
    assert_eq!(
        truncated,
        ["big", "pairs", "tick"],
        "{:?}",
        replay.truncates
    );
    assert_eq!(
        pg.psql(&db, "SELECT count(*) FROM pg_replication_slots"),
        "1"
    );
    assert!(agent.terminate().success());
}

/// Runs the agent until it streams (its initial snapshot done) and stops it, then adds
/// `table` to its `source.tables`.
fn start_then_add_table(setup: &AgentSetup, table: &str) {
    let mut agent = setup.start();
    agent.wait_log("streaming changes", WAIT);
    assert!(agent.terminate().success());
    let config = std::fs::read_to_string(&setup.config).unwrap();
    let (before, rest) = config.split_once("tables = [").unwrap();
    let (list, after) = rest.split_once(']').unwrap();
    let added = format!("{before}tables = [{list}, \"{table}\"]{after}");
    std::fs::write(&setup.config, added).unwrap();
}

/// A table added to `source.tables` after the initial snapshot is snapshotted alone, in key
/// chunks merged into the stream by watermarks: the other tables keep streaming meanwhile,
/// writes on the new table land in commit order, a SIGKILL mid-way resumes after the last
/// chunk logged, and every sink ends equal to the source.
#[test]
fn a_table_added_later_is_snapshotted_while_the_stream_goes_on() {
    let pg = PgCluster::start();
    let (db, warehouse) = big_databases(&pg);
    let setup = snapshot_setup(
        &pg,
        &db,
        "\"public.pairs\", \"public.tick\"",
        &three_sinks(&pg, &warehouse),
        2,
    );
    start_then_add_table(&setup, "public.big");

    let writes = Writes::start(pg.url(&db), 0x5a4b_0003);
    let mut agent = setup.start();
    agent.wait_log("incremental snapshot of tables added", WAIT);
    let mirrored = || {
        pg.try_psql(&warehouse, "SELECT count(*) FROM replica.big")
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or(0)
    };
    assert!(eventually(WAIT, || mirrored() > 20_000), "{}", agent.log());
    let log = agent.log();
    agent.kill();
    assert!(
        !log.contains("table snapshotted (incremental)"),
        "the incremental snapshot finished before the kill:\n{log}"
    );
    assert!(mirrored() < BIG_ROWS, "{}", mirrored());

    // Chunks reach the log as the stream reaches their watermarks: the writes stop so that
    // the stream (and the snapshot with it) catches up.
    let mut agent = setup.start();
    let resumed = writes.committed();
    assert!(eventually(WAIT, || writes.committed() > resumed + 100));
    writes.finish();
    agent.wait_log("table snapshotted (incremental)", WAIT);
    let log = agent.log();
    assert!(
        !log.contains("snapshot started"),
        "no initial snapshot again:\n{log}"
    );
    sync(&pg, &db, &warehouse, &setup, &agent);
    for table in ["big", "pairs"] {
        assert_mirror(&pg, &db, &warehouse, table);
        assert_current_history(&pg, &db, &warehouse, table);
    }

    // The JSONL stream, applied in order (a change may precede its row's read), ends equal to
    // the source; `pairs` changes were streamed between `big`'s chunks.
    let mut tables: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let (mut first_read, mut last_read, mut pairs_streamed) = (None, None, Vec::new());
    let mut position = 0u64;
    for_each_line(&setup.events_dir(), |file, line| {
        let e: Envelope = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}: bad envelope {line:?}: {e}", file.display()));
        position += 1;
        let table = e.source.table.as_str();
        let key = |row: &EnvelopeRow| match table {
            "pairs" => format!("{}|{}", text(row, "a"), text(row, "b")),
            "tick" => text(row, "n"),
            _ => text(row, "id"),
        };
        let rows = tables.entry(table.to_string()).or_default();
        match (e.op.as_str(), &e.after, &e.before) {
            ("r" | "c" | "u", Some(after), _) => {
                let value = match table {
                    "pairs" => text(after, "qty"),
                    "big" => format!(
                        "{}|{}|{}",
                        text(after, "grp"),
                        text(after, "v"),
                        text(after, "note")
                    ),
                    _ => String::new(),
                };
                rows.insert(key(after), value);
            }
            ("d", _, Some(before)) => {
                rows.remove(&key(before));
            }
            (op, _, _) => panic!("unexpected {op} envelope: {line}"),
        }
        if table == "big" && e.op == "r" {
            first_read.get_or_insert(position);
            last_read = Some(position);
            assert_eq!(e.source.snapshot, "incremental", "{line}");
        }
        if table == "pairs" && e.op != "r" {
            pairs_streamed.push(position);
        }
    });
    let (first_read, last_read) = (first_read.unwrap(), last_read.unwrap());
    let pairs_between = pairs_streamed
        .iter()
        .filter(|&&p| first_read < p && p < last_read)
        .count();
    assert_eq!(
        tables.get("big").cloned().unwrap_or_default(),
        keyed(
            &pg,
            &db,
            "SELECT id, grp || '|' || v || '|' || coalesce(note, 'NULL') FROM big"
        )
    );
    assert_eq!(
        tables.get("pairs").cloned().unwrap_or_default(),
        keyed(&pg, &db, "SELECT a || '|' || b, qty FROM pairs")
    );
    assert!(pairs_between > 0, "no pairs change between big's reads");
    assert!(agent.terminate().success());
}

/// A table added later without a primary key cannot be read in key order beside the stream:
/// the agent stops and says what to do, before any of its rows are logged.
#[test]
fn a_table_added_later_without_a_primary_key_is_refused_with_the_fix() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("source");
    pg.psql(
        &db,
        "CREATE TABLE tick (n int PRIMARY KEY);
         CREATE TABLE loose (v text); ALTER TABLE loose REPLICA IDENTITY FULL;
         INSERT INTO loose VALUES ('a'), ('b');",
    );
    let events = "[[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n";
    let setup = snapshot_setup(&pg, &db, "\"public.tick\"", events, 1);
    start_then_add_table(&setup, "public.loose");

    let output = setup.command("run");
    let error = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{error}");
    assert!(
        error.contains("table public.loose was added to source.tables after the initial snapshot")
            && error.contains("add a primary key"),
        "{error}"
    );
    assert!(!error.contains("panicked"), "{error}");
    assert!(!setup
        .envelopes()
        .iter()
        .any(|e| e["source"]["table"] == "loose"));
}

/// With `snapshot = "never"` the rows that exist at the first start are not copied: only the
/// changes committed after it arrive.
#[test]
fn snapshot_never_streams_only_later_changes() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("source");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE TABLE tick (n int PRIMARY KEY);
         CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'old' FROM generate_series(1, 100) g;",
    );
    let setup = AgentSetup::with_sinks(&pg.url(&db), "\"public.*\"", &three_sinks(&pg, &warehouse));
    assert!(std::fs::read_to_string(&setup.config)
        .unwrap()
        .contains("snapshot = \"never\""));
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO t VALUES (1000, 'new'); UPDATE t SET v = 'changed' WHERE id = 7;",
    );
    sync(&pg, &db, &warehouse, &setup, &agent);
    assert_eq!(
        pg.psql(
            &warehouse,
            "SELECT string_agg(id || ':' || v, ' ' ORDER BY id) FROM replica.t"
        ),
        "7:changed 1000:new"
    );
    assert_eq!(
        pg.psql(
            &warehouse,
            "SELECT string_agg(id || ':' || v || ':' || _tidemark_op, ' ' ORDER BY id) \
             FROM history.t"
        ),
        "7:changed:u 1000:new:c"
    );
    let mut ops = Vec::new();
    for_each_envelope(&setup.events_dir(), |e| {
        ops.push(format!(
            "{}:{}:{}",
            e["source"]["table"].as_str().unwrap(),
            e["op"].as_str().unwrap(),
            e["source"]["snapshot"].as_str().unwrap()
        ));
    });
    assert_eq!(ops, ["t:c:false", "t:u:false", "tick:c:false"]);
    let log = agent.log();
    assert!(
        !log.contains("snapshot started"),
        "snapshot = \"never\" started a snapshot:\n{log}"
    );
    assert!(agent.terminate().success());
}

/// Snapshot rows reach a merge target as the COPY text the source sent, over two target
/// connections (`snapshot_parallelism = 2`), unless the target holds some of their keys
/// already (they are then upserted) or refuses one (it goes to the dead-letter queue and the
/// others are applied). Here the second connection's share (rows 1001..2000) commits while
/// the first one's fails, as a crash between the two commits would leave it: the batch's
/// replay takes those rows as they are.
#[test]
fn snapshot_rows_the_target_holds_or_refuses_are_upserted_or_dead_lettered() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("source");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v int, note text);
         INSERT INTO t SELECT g, CASE WHEN g = 500 THEN 50000 ELSE g * 10 END, 'tab\there'
           FROM generate_series(1, 2000) g;",
    );
    // The target holds a key of the snapshot with other values, and refuses large values.
    pg.psql(
        &warehouse,
        "CREATE SCHEMA replica;
         CREATE TABLE replica.t (id int PRIMARY KEY, v int CONSTRAINT v_small CHECK (v < 30000),
           note text);
         INSERT INTO replica.t VALUES (7, -1, 'stale');",
    );
    let setup = snapshot_setup(
        &pg,
        &db,
        "\"public.t\"",
        &common::agent::mirror_sink(&pg.url(&warehouse)),
        2,
    );
    let agent = setup.start();
    let mirrored = || {
        pg.try_psql(
            &warehouse,
            "SELECT count(*) || ':' || sum(v) || ':' || count(*) FILTER (WHERE note = E'tab\\there') \
             || ':' || (SELECT v FROM replica.t WHERE id = 7) FROM replica.t",
        )
        .unwrap_or_default()
    };
    // 1..2000 but 500, whose 50000 the target refuses; 7 replaced by the source's row.
    let want_sum: i64 = (1..=2000).map(|g| g * 10).sum::<i64>() - 5_000;
    let want = format!("1999:{want_sum}:1999:70");
    assert!(
        eventually(WAIT, || mirrored() == want),
        "{} (want {want})\n{}",
        mirrored(),
        agent.log()
    );
    let letter = setup.only_dead_letter("mirror", "v_small");
    assert_eq!(letter["row"]["id"], 500, "{letter}");
    assert!(
        agent
            .log()
            .contains("copying snapshot rows over several target connections"),
        "{}",
        agent.log()
    );
    // The stream goes on after the snapshot.
    pg.psql(&db, "UPDATE t SET v = 1 WHERE id = 2");
    assert!(
        eventually(WAIT, || pg
            .try_psql(&warehouse, "SELECT v FROM replica.t WHERE id = 2")
            .is_some_and(|v| v == "1")),
        "{}",
        agent.log()
    );
    assert!(agent.terminate().success());
}
