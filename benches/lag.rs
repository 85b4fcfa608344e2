//! End-to-end lag at a steady write rate: from a row's source commit to the merge target's
//! transaction that applies it (issue 9; DESIGN, Performance).
//!
//!   cargo bench --bench lag                                   # 2,000 tx/s, 3 rounds of 20 s
//!   TIDEMARK_BENCH_RATE=500 TIDEMARK_BENCH_SECONDS=60 cargo bench --bench lag
//!
//! One cluster, a source database with `events (id bigint primary key, payload text,
//! committed timestamptz)` and a target database whose `replica.events` the bench creates
//! first with one more column, `applied timestamptz DEFAULT clock_timestamp()`: the merge sink
//! writes the source columns and the target stamps each row as the sink's transaction writes
//! it. An agent (merge sink, `snapshot = "never"`) streams; a writer commits one single-row
//! transaction at each tick of a fixed rate (it falls behind the schedule only if the server
//! cannot keep up, which the achieved rate shows), its row's `committed` set to
//! `clock_timestamp()` as the last statement before `COMMIT`. Both stamps come from the same
//! server clock (`applied` is stamped as the row is written, a moment before the sink's
//! transaction commits). Lag is `applied - committed` per row, after a warm-up of one second
//! per round; each of TIDEMARK_BENCH_REPEAT rounds (3) gives p50, p99 and max, and their
//! medians, minima and maxima are printed. Nothing is asserted about time.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::agent::{eventually, mirror_sink, AgentSetup};
use common::PgCluster;

fn main() {
    if !support::is_bench_run() {
        return;
    }
    let rate = support::setting("TIDEMARK_BENCH_RATE", 2_000).max(1);
    let seconds = support::setting("TIDEMARK_BENCH_SECONDS", 20).max(2);
    let pg = PgCluster::start();
    let db = pg.fresh_database("source");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE TABLE events (id bigint PRIMARY KEY, payload text NOT NULL, committed timestamptz)",
    );
    pg.psql(
        &warehouse,
        "CREATE SCHEMA replica; CREATE TABLE replica.events (id bigint PRIMARY KEY, \
         payload text NOT NULL, committed timestamptz, \
         applied timestamptz NOT NULL DEFAULT clock_timestamp())",
    );
    let setup = AgentSetup::with_sinks(
        &pg.url(&db),
        "\"public.events\"",
        &mirror_sink(&pg.url(&warehouse)),
    );
    let mut agent = setup.start();
    agent.wait_streaming();

    let per_round = rate * seconds;
    let rounds = support::setting("TIDEMARK_BENCH_REPEAT", 3).max(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = runtime.block_on(pg.connect(&db));
    let insert = runtime
        .block_on(client.prepare(
            "INSERT INTO events VALUES ($1::bigint, md5($1::bigint::text), clock_timestamp())",
        ))
        .unwrap();
    let (mut p50s, mut p99s, mut maxes, mut achieved) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let first = (round * per_round) as i64 + 1;
        let last = first + per_round as i64 - 1;
        let tick = Duration::from_secs_f64(1.0 / rate as f64);
        let started = Instant::now();
        runtime.block_on(async {
            for (n, id) in (first..=last).enumerate() {
                tokio::time::sleep_until((started + tick * n as u32).into()).await;
                client.execute(&insert, &[&id]).await.unwrap();
            }
        });
        achieved.push(per_round as f64 / started.elapsed().as_secs_f64());
        let count = || {
            pg.psql(
                &warehouse,
                &format!("SELECT count(*) FROM replica.events WHERE id >= {first}"),
            )
        };
        assert!(
            eventually(Duration::from_secs(300), || count()
                == per_round.to_string()),
            "the target holds {} of round {round}'s {per_round} rows\n{}",
            count(),
            agent.log()
        );
        let figures = pg.psql(
            &warehouse,
            &format!(
                "WITH round AS (SELECT * FROM replica.events WHERE id BETWEEN {first} AND {last}), \
                 lag AS (SELECT extract(epoch FROM applied - committed) * 1000 AS ms FROM round \
                   WHERE committed > (SELECT min(committed) + interval '1 second' FROM round)) \
                 SELECT concat_ws(' ', percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), \
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms)) FROM lag"
            ),
        );
        let values: Vec<f64> = figures.split(' ').map(|v| v.parse().unwrap()).collect();
        println!(
            "round {}: {:.0} tx/s achieved; lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            round + 1,
            achieved[round],
            values[0],
            values[1],
            values[2]
        );
        p50s.push(values[0]);
        p99s.push(values[1]);
        maxes.push(values[2]);
    }
    assert!(agent.terminate().success());

    println!();
    println!(
        "steady writes: {rounds} rounds of {per_round} single-row transactions at {rate} tx/s \
         asked ({:.0} achieved, median), into a merge sink; PostgreSQL {}",
        support::median(achieved),
        pg.psql("postgres", "SHOW server_version")
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9}",
        "lag, source commit → target apply", "median", "min", "max"
    );
    for (name, values) in [("p50 ms", p50s), ("p99 ms", p99s), ("max ms", maxes)] {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(0.0, f64::max);
        println!(
            "{name:<40} {:>9.1} {min:>9.1} {max:>9.1}",
            support::median(values.clone())
        );
    }
    println!("goal: p99 < 250 ms at 2,000 tx/s (issue 9)");
}
