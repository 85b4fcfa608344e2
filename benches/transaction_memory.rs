//! Peak RSS of the agent while one large transaction passes through capture, the log and the
//! JSONL sink, the same transaction into a merge and an SCD2 sink, and while it catches up on
//! a backlog of WAL written while it was stopped. Memory must not grow with transaction size
//! or backlog (DESIGN invariant 8).
//!
//!   cargo bench --bench transaction_memory              # 200,000 rows, 200 MiB of WAL
//!   TIDEMARK_BENCH_ROWS=1000000 TIDEMARK_BENCH_BACKLOG_MIB=2048 cargo bench --bench transaction_memory
//!
//! Prints the peak RSS (VmHWM from /proc) of each and, for scale, the rows/s of each pass.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::agent::{eventually, http_get, mirror_sink, AgentSetup};
use common::PgCluster;

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Lines in the sink's files, counted without parsing them.
fn envelope_count(setup: &AgentSetup) -> usize {
    std::fs::read_dir(setup.events_dir())
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| std::fs::read(e.path()).ok())
                .map(|bytes| bytes.iter().filter(|&&b| b == b'\n').count())
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    if !support::is_bench_run() {
        return;
    }
    let rows: usize = support::setting("TIDEMARK_BENCH_ROWS", 200_000);
    let pg = PgCluster::start();
    let db = pg.fresh_database("bench");
    pg.psql(
        &db,
        "CREATE TABLE big (id int PRIMARY KEY, payload text NOT NULL)",
    );
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.big\"");
    let mut agent = setup.start();
    agent.wait_streaming();
    let baseline = status_kib(agent.pid(), "VmRSS:").unwrap_or(0);

    let started = Instant::now();
    pg.psql(
        &db,
        &format!(
            "INSERT INTO big SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, {rows}) g"
        ),
    );
    let committed = started.elapsed();
    let done = eventually(Duration::from_secs(1800), || envelope_count(&setup) >= rows);
    assert!(
        done,
        "only {} of {rows} envelopes arrived",
        envelope_count(&setup)
    );
    let elapsed = started.elapsed();
    let peak = status_kib(agent.pid(), "VmHWM:").expect("agent's /proc status");
    println!("one transaction of {rows} rows through capture → log → JSONL");
    println!(
        "  agent RSS before:        {:>8.1} MiB",
        baseline as f64 / 1024.0
    );
    println!(
        "  agent peak RSS (VmHWM):  {:>8.1} MiB   (goal: < 100 MiB issue 3, < 64 MiB DESIGN)",
        peak as f64 / 1024.0
    );
    println!(
        "  source commit took:      {:>8.2} s",
        committed.as_secs_f64()
    );
    println!(
        "  commit start → all envelopes written: {:.2} s ({:.0} rows/s)",
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64()
    );
    assert!(agent.terminate().success());
    // The next agent has the same name, so the same slot name, in another database.
    pg.psql(&db, "SELECT pg_drop_replication_slot('tidemark_test')");

    into_tables(&pg, rows);
    backlog(
        &pg,
        support::setting("TIDEMARK_BENCH_BACKLOG_MIB", 200) as u64 * 1024 * 1024,
    );
}

/// One transaction of `rows` rows into a merge and an SCD2 sink (in a warehouse database of
/// the same cluster): the SCD2 sink splits it by key instead of holding it.
fn into_tables(pg: &PgCluster, rows: usize) {
    let db = pg.fresh_database("tables");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE TABLE big (id int PRIMARY KEY, payload text NOT NULL)",
    );
    let sinks = format!(
        "{}
[[sink]]
name = \"history\"
type = \"postgres\"
url = \"{}\"
\
         schema = \"history\"
mode = \"scd2\"
",
        mirror_sink(&pg.url(&warehouse)),
        pg.url(&warehouse)
    );
    let setup = AgentSetup::with_sinks(&pg.url(&db), "\"public.big\"", &sinks);
    let mut agent = setup.start();
    agent.wait_streaming();
    let started = Instant::now();
    pg.psql(
        &db,
        &format!(
            "INSERT INTO big SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, {rows}) g"
        ),
    );
    // Zero until the sink has created the table.
    let count = |table: &str| {
        pg.try_psql(&warehouse, &format!("SELECT count(*) FROM {table}"))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
    };
    let done = eventually(Duration::from_secs(3600), || {
        count("replica.big") == rows && count("history.big") == rows
    });
    assert!(
        done,
        "the sinks did not apply the transaction\n{}",
        agent.log()
    );
    let elapsed = started.elapsed();
    let peak = status_kib(agent.pid(), "VmHWM:").expect("agent's /proc status");
    println!("one transaction of {rows} rows through capture → log → merge and SCD2 sinks");
    println!(
        "  agent peak RSS (VmHWM):  {:>8.1} MiB   (goal: < 64 MiB DESIGN)",
        peak as f64 / 1024.0
    );
    println!(
        "  commit start → both sinks applied: {:.2} s ({:.0} rows/s)",
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64()
    );
    assert!(agent.terminate().success());
    pg.psql(&db, "SELECT pg_drop_replication_slot('tidemark_test')");
}

/// Stops the agent, writes `bytes` of WAL in transactions of 10,000 rows, starts the agent
/// again and reports its peak RSS until the JSONL sink has applied all of it.
fn backlog(pg: &PgCluster, bytes: u64) {
    let db = pg.fresh_database("backlog");
    pg.psql(
        &db,
        "CREATE TABLE backlog (id bigint PRIMARY KEY, payload text NOT NULL)",
    );
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.backlog\"");
    let mut agent = setup.start();
    agent.wait_streaming();
    assert!(agent.terminate().success());
    let start = pg.psql(&db, "SELECT pg_current_wal_lsn()");
    let mut rows = 0;
    loop {
        let written: u64 = pg
            .psql(
                &db,
                &format!("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{start}')::bigint"),
            )
            .parse()
            .expect("a WAL distance");
        if written >= bytes {
            break;
        }
        pg.psql(
            &db,
            &format!(
                "INSERT INTO backlog SELECT g, repeat(md5(g::text), 3) \
                 FROM generate_series({}, {}) g",
                rows + 1,
                rows + 10_000
            ),
        );
        rows += 10_000;
    }
    let started = Instant::now();
    let agent = setup.start();
    let applied =
        format!("tidemark_events_applied_total{{sink=\"events\",table=\"public.backlog\"}} {rows}");
    let caught_up = eventually(Duration::from_secs(3600), || {
        http_get(setup.health_port, "/metrics").is_some_and(|metrics| metrics.contains(&applied))
    });
    assert!(caught_up, "the agent did not catch up on the backlog");
    let elapsed = started.elapsed();
    let peak = status_kib(agent.pid(), "VmHWM:").expect("agent's /proc status");
    println!(
        "catching up on a backlog of {} MiB of WAL ({rows} rows in transactions of 10,000)",
        bytes / 1024 / 1024
    );
    println!(
        "  agent peak RSS (VmHWM):  {:>8.1} MiB   (goal: < 64 MiB DESIGN)",
        peak as f64 / 1024.0
    );
    println!(
        "  start → caught up: {:.2} s ({:.0} rows/s)",
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64()
    );
    assert!(agent.terminate().success());
}
