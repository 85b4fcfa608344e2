//! Peak RSS of the agent while one large transaction passes through capture, the log and the
//! JSONL sink. Memory must not grow with transaction size (DESIGN invariant 8).
//!
//!   cargo bench --bench transaction_memory              # 200,000 rows
//!   TIDEMARK_BENCH_ROWS=1000000 cargo bench --bench transaction_memory
//!
//! Prints the peak RSS (VmHWM from /proc) and, for scale, the rows/s of the whole pass.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::agent::{eventually, AgentSetup};
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
}
