//! Apply of one pre-recorded offset log into ClickHouse (the ClickHouse sink, `mode = "merge"`)
//! against the same log into PostgreSQL (the postgres merge sink), in one run.
//!
//!   cargo bench --bench clickhouse_apply                             # ~200,000 row changes
//!   TIDEMARK_BENCH_ROWS=20000 cargo bench --bench clickhouse_apply   # ~20,000 row changes
//!   TIDEMARK_BENCH_REPEAT=5 cargo bench --bench clickhouse_apply     # 5 rounds instead of 3
//!
//! The workload (seeded, the same every time: multi-row inserts, updates of live keys,
//! deletes, a few mixed transactions, and a marker row last; `merge_apply`'s) runs once on a
//! source database, and an agent captures it into its offset log (capture only: its sink
//! points at a port nothing listens on) until its slot's `confirmed_flush_lsn` reaches the end
//! of the workload. Then each round applies a copy of that log twice, as `merge_apply` times
//! "merge apply alone": an agent whose data dir is the copy, its source at a port nothing
//! listens on, started until the marker row is in its target:
//!
//! - PostgreSQL merge: a postgres sink (`mode = "merge"`) into a fresh database of the same
//!   cluster, until `SELECT … WHERE id = <marker>` finds the row;
//! - ClickHouse merge: a clickhouse sink (`mode = "merge"`) into a fresh database of one
//!   ClickHouse engine, until `SELECT count() FROM db.orders FINAL WHERE id = <marker>` is 1.
//!
//! The order alternates between rounds. After each apply the target must equal the source:
//! the same count and checksum of the rows (`id, customer, status, amount, note` as text,
//! the ClickHouse table read with `FINAL`), computed here from both dumps. rows/s is row
//! changes in the log ÷ seconds from the agent's start; medians, minima and maxima over the
//! rounds and the ratio of the medians (ClickHouse ÷ PostgreSQL merge) are printed. Nothing is
//! asserted about time.
//!
//! The ClickHouse engine here is the one the sink's tests use (tests/common/clickhouse.rs):
//! chdb, ClickHouse 26.9 built as a library and run in-process by a Python HTTP shim
//! (tests/common/clickhouse_http.py) that serves one request at a time. The figure measures
//! the sink plus that shim, not a production clickhouse-server; the PostgreSQL target is a
//! real server on the same two cores.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use common::agent::{eventually, Agent, AgentSetup};
use common::clickhouse::ClickHouse;
use common::PgCluster;
use support::orders_backlog::{workload, Workload, MARKER_ID, TABLE_DDL};
use support::Probe;
use tokio::runtime::Runtime;

const PUBLICATION: &str = "bench_pub";
const TIMEOUT: Duration = Duration::from_secs(3600);
const POLL: Duration = Duration::from_millis(20);
/// The postgres merge sink's target schema.
const MIRROR_SCHEMA: &str = "replica";
/// The agent that captures the log; its copies keep the name.
const AGENT_NAME: &str = "capture";
/// The columns compared, as PostgreSQL prints them and as ClickHouse does (a Decimal without
/// trailing zeros, hence `trim_scale`).
const PG_COLUMNS: &str = "id, customer, status, trim_scale(amount), note";
const CH_COLUMNS: &str = "id, customer, status, toString(amount), note";

/// `count:checksum` of a dump (one row a line, columns tab-separated, `\N` for NULL): the
/// wrapping sum of each line's CRC-32, so the order of the lines does not matter.
fn checksum(dump: &str) -> String {
    let (count, sum) =
        dump.lines()
            .filter(|line| !line.is_empty())
            .fold((0u64, 0u64), |(count, sum), line| {
                (
                    count + 1,
                    sum.wrapping_add(u64::from(crc32fast::hash(line.as_bytes()))),
                )
            });
    format!("{count}:{sum}")
}

fn pg_checksum(pg: &PgCluster, db: &str, table: &str) -> Option<String> {
    pg.try_psql(
        db,
        &format!("COPY (SELECT {PG_COLUMNS} FROM {table}) TO STDOUT"),
    )
    .map(|dump| checksum(&dump))
}

fn ch_checksum(ch: &ClickHouse, database: &str) -> Option<String> {
    ch.try_query(&format!(
        "SELECT {CH_COLUMNS} FROM {database}.orders FINAL FORMAT TabSeparated"
    ))
    .ok()
    .map(|dump| checksum(&dump))
}

/// Polls `done` every [`POLL`] until it holds; the time since `started`.
fn wait(started: Instant, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    loop {
        if done() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "{what}: not done within {TIMEOUT:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// The target's checksum must equal the source's (it already should: the marker is there).
fn check_mirrors(what: &str, want: &str, mut got: impl FnMut() -> Option<String>) {
    let mut last = None;
    let same = eventually(Duration::from_secs(30), || {
        last = got();
        last.as_deref() == Some(want)
    });
    assert!(same, "{what}: target {last:?} differs from source {want:?}");
}

/// An agent named [`AGENT_NAME`] reading `public.orders` from `source_url` into `sink` (a
/// `[[sink]]` table). An apply-alone agent waits for its unreachable source as long as it runs.
fn agent_setup(source_url: &str, sink: &str) -> AgentSetup {
    let setup = AgentSetup::jsonl(source_url, "\"public.orders\"");
    let config = format!(
        "[agent]\nname = \"{AGENT_NAME}\"\ndata_dir = \"data\"\nhealth_addr = \"127.0.0.1:{}\"\n\n\
         [source]\ntype = \"postgres\"\nurl = \"{source_url}\"\ntables = [\"public.orders\"]\n\
         publication = \"{PUBLICATION}\"\nsnapshot = \"never\"\nconnect_timeout = \"1h\"\n\n\
         {sink}",
        setup.health_port
    );
    std::fs::write(&setup.config, config).expect("config");
    setup
}

/// A postgres merge sink `merge` into [`MIRROR_SCHEMA`] of the database at `url`.
fn merge_sink(url: &str) -> String {
    format!(
        "[[sink]]\nname = \"merge\"\ntype = \"postgres\"\nurl = \"{url}\"\n\
         schema = \"{MIRROR_SCHEMA}\"\nmode = \"merge\"\n"
    )
}

/// An apply-alone agent: `sink`, its source unreachable, its data dir a copy of `log`.
fn apply_setup(no_source: &str, sink: &str, log: &Path) -> AgentSetup {
    let setup = agent_setup(no_source, sink);
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(log)
        .arg(setup.data_dir())
        .status()
        .expect("cp");
    assert!(copied.success(), "copying the log");
    setup
}

fn stop(agent: Agent) {
    // An apply-alone agent whose source never answers may exit non-zero; its target is
    // checked either way.
    let _ = agent.terminate();
}

/// The log recorded once: the source's database, what its rows sum to, and the agent whose
/// data dir holds the log.
struct Recorded {
    src: String,
    want: String,
    capture: AgentSetup,
    /// Seconds the workload took on the source, and the capture into the log.
    workload_s: f64,
    capture_s: f64,
    backlog: String,
}

fn record(pg: &PgCluster, rt: &Runtime, w: &Workload) -> Recorded {
    let src = pg.fresh_database("src");
    pg.psql(
        &src,
        &format!("{TABLE_DDL}; CREATE PUBLICATION {PUBLICATION} FOR TABLE orders;"),
    );
    let nowhere = format!(
        "postgres://postgres@127.0.0.1:{}/nowhere",
        common::agent::free_port()
    );
    let capture = agent_setup(&pg.url(&src), &merge_sink(&nowhere));
    // The slot exists before the workload: start the agent until it streams, and stop it.
    let mut agent = capture.start();
    agent.wait_streaming();
    stop(agent);

    let started = Instant::now();
    pg.psql(&src, &w.sql);
    let workload_s = started.elapsed().as_secs_f64();
    let end_lsn = pg.psql(&src, "SELECT pg_current_wal_insert_lsn()");
    let count = pg.psql(&src, "SELECT count(*) FROM orders");
    assert_eq!(count, w.final_rows.to_string(), "the workload's final rows");
    let want = pg_checksum(pg, &src, "orders").expect("the source's checksum");
    let slot = format!("tidemark_{AGENT_NAME}");
    let backlog = pg.psql(
        &src,
        &format!(
            "SELECT pg_size_pretty(pg_wal_lsn_diff('{end_lsn}', restart_lsn)) \
             FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    );

    let src_probe = Probe::new(rt, pg, &src);
    let started = Instant::now();
    let agent = capture.start();
    let confirmed = format!(
        "SELECT (confirmed_flush_lsn >= '{end_lsn}')::text FROM pg_replication_slots \
         WHERE slot_name = '{slot}'"
    );
    let took = wait(started, "tidemark capture", || {
        src_probe.text(&confirmed).as_deref() == Some("true")
    });
    stop(agent);
    drop(src_probe);
    // Nothing reads the source again: quiet it so its autovacuum does not land in a
    // measurement.
    pg.psql(&src, "VACUUM ANALYZE orders; CHECKPOINT;");
    Recorded {
        src,
        want,
        capture,
        workload_s,
        capture_s: took.as_secs_f64(),
        backlog,
    }
}

#[derive(Default)]
struct Figures {
    postgres: Vec<f64>,
    clickhouse: Vec<f64>,
}

fn run_round(
    pg: &PgCluster,
    rt: &Runtime,
    ch: &ClickHouse,
    recorded: &Recorded,
    rows: usize,
    round: usize,
    figures: &mut Figures,
) -> String {
    let no_source = format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        common::agent::free_port(),
        recorded.src
    );
    let log = recorded.capture.data_dir();
    let want = recorded.want.as_str();

    let measure_postgres = |figures: &mut Figures| {
        let db = pg.fresh_database("merge");
        let setup = apply_setup(&no_source, &merge_sink(&pg.url(&db)), &log);
        let table = format!("{MIRROR_SCHEMA}.orders");
        let marker = format!("SELECT count(*)::text FROM {table} WHERE id = {MARKER_ID}");
        // One connection for the polls, as merge_apply's.
        let probe = Probe::new(rt, pg, &db);
        let started = Instant::now();
        let agent = setup.start();
        let took = wait(started, "postgres merge apply", || {
            probe.text(&marker).as_deref() == Some("1")
        });
        check_mirrors("postgres merge apply", want, || {
            pg_checksum(pg, &db, &table)
        });
        stop(agent);
        drop(probe);
        pg.psql("postgres", &format!("DROP DATABASE {db} WITH (FORCE)"));
        figures.postgres.push(took.as_secs_f64());
    };
    let measure_clickhouse = |figures: &mut Figures| {
        let database = format!("apply_r{round}");
        let setup = apply_setup(
            &no_source,
            &ch.sink_toml("clickhouse", &database, "merge"),
            &log,
        );
        let marker = format!("SELECT count() FROM {database}.orders FINAL WHERE id = {MARKER_ID}");
        let started = Instant::now();
        let agent = setup.start();
        let took = wait(started, "clickhouse merge apply", || {
            ch.try_query(&marker).is_ok_and(|out| out.trim() == "1")
        });
        check_mirrors("clickhouse merge apply", want, || {
            ch_checksum(ch, &database)
        });
        stop(agent);
        ch.query(&format!("DROP DATABASE {database}"));
        figures.clickhouse.push(took.as_secs_f64());
    };
    if round % 2 == 1 {
        measure_postgres(figures);
        measure_clickhouse(figures);
    } else {
        measure_clickhouse(figures);
        measure_postgres(figures);
    }
    let last = |v: &[f64]| rows as f64 / v.last().copied().unwrap_or(f64::NAN);
    format!(
        "round {round} ({} first): postgres merge {:.0} rows/s, clickhouse merge {:.0}",
        if round % 2 == 1 {
            "postgres"
        } else {
            "clickhouse"
        },
        last(&figures.postgres),
        last(&figures.clickhouse),
    )
}

fn main() {
    if !support::is_bench_run() {
        return;
    }
    let target: usize = support::setting("TIDEMARK_BENCH_ROWS", 200_000);
    let rounds: usize = support::setting("TIDEMARK_BENCH_REPEAT", 3).max(1);
    let w = workload(target);
    // One worker thread drives the probes' connections, also between polls.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let pg = PgCluster::start();
    let ch = ClickHouse::start();
    let pg_version = pg.psql("postgres", "SHOW server_version");
    let ch_version = ch.query("SELECT version()");
    println!(
        "workload: {} row changes ({} inserts, {} updates, {} deletes) in {} transactions; \
         {} rows at the end",
        w.changes(),
        w.inserts,
        w.updates,
        w.deletes,
        w.transactions,
        w.final_rows
    );
    println!(
        "  PostgreSQL {pg_version}; ClickHouse {} (chdb behind tests/common/clickhouse_http.py)",
        ch_version.trim()
    );
    let recorded = record(&pg, &rt, &w);
    println!(
        "recorded once: workload {:.1} s on the source, backlog {} of WAL, captured into the \
         log in {:.1} s ({:.0} rows/s)",
        recorded.workload_s,
        recorded.backlog,
        recorded.capture_s,
        w.changes() as f64 / recorded.capture_s
    );
    let mut figures = Figures::default();
    for round in 1..=rounds {
        let line = run_round(&pg, &rt, &ch, &recorded, w.changes(), round, &mut figures);
        println!("{line}");
    }

    let changes = w.changes();
    let seconds = |v: &[f64]| support::median(v.to_vec());
    println!();
    println!(
        "{:<38} {:>9} {:>10} {:>10} {:>10}",
        "apply of the log alone (log → db)", "median s", "rows/s", "min", "max"
    );
    let rows = [
        ("tidemark postgres merge apply", &figures.postgres),
        ("tidemark clickhouse merge apply", &figures.clickhouse),
    ];
    for (name, v) in rows {
        let (med, min, max) = support::rates(changes, v);
        println!(
            "{name:<38} {:>9.2} {med:>10.0} {min:>10.0} {max:>10.0}",
            seconds(v)
        );
    }
    let postgres = support::rates(changes, &figures.postgres).0;
    let clickhouse = support::rates(changes, &figures.clickhouse).0;
    println!();
    println!(
        "tidemark clickhouse merge / postgres merge: {:.2}×   (no goal set; ClickHouse is chdb \
         behind a Python HTTP shim here)",
        clickhouse / postgres
    );
}
