//! Initial snapshot of a large table into a merge mirror, against
//! `COPY orders TO STDOUT | COPY orders FROM STDIN` between the same two databases of the same
//! cluster, in one run (issue 6; DESIGN, Performance).
//!
//!   cargo bench --bench snapshot                               # 2,000,000 rows, 3 rounds
//!   TIDEMARK_BENCH_ROWS=5000000 cargo bench --bench snapshot   # 5,000,000 rows
//!   TIDEMARK_BENCH_REPEAT=5 cargo bench --bench snapshot       # 5 rounds instead of 3
//!
//! One cluster and one source database with a table `orders (id bigint primary key, customer
//! int, status text, amount numeric(12,2), note text, created timestamptz)` of
//! TIDEMARK_BENCH_ROWS rows filled with `generate_series` (a tenth of the notes NULL, one in a
//! thousand with a tab, a backslash and a newline), then `VACUUM ANALYZE` so the table's size
//! is known to the planner and to the snapshot's range split. Each round then measures, in an
//! order that rotates between rounds, and with a `CHECKPOINT` before each:
//!
//! - reference: the cluster's `psql -c "COPY orders TO STDOUT"` against the source, piped into
//!   a second `psql -c "COPY orders FROM STDIN"` against a fresh database whose `orders` has
//!   the same DDL, primary key included (the same work a merge target does); from spawning the
//!   two processes until both have exited;
//! - tidemark, one stream: an agent with `snapshot = "initial"`, `snapshot_parallelism = 1` and
//!   a merge sink (schema `replica`) into a fresh database; from starting the agent until the
//!   target holds every row. The snapshot is one source transaction that the sink applies in
//!   chunks, each with its checkpoint: the bench polls the target's checkpoint (cheap) until
//!   its log position reaches the snapshot's last rows, then `count(*)` until it is the
//!   source's (polling `count(*)` of a growing multi-million-row table all along would take a
//!   core from the two being measured);
//! - tidemark, N streams: the same with `snapshot_parallelism` = the number of cores (at
//!   least 2).
//!
//! Every target's `count(*)` and `sum(hashtext(row))` must equal the source's. Each agent has
//! its own name, so its own slot and publication, which are dropped after its run, as is
//! every target database. The agent's own figure (its log's `snapshot done … seconds=…
//! rows_per_second=…`: the copy into its offset log, before the sink applies) is shown next
//! to the end-to-end one. rows/s is source rows ÷ seconds; medians, minima and maxima over
//! the rounds and the ratios of the medians are printed. Nothing is asserted about time.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::{eventually, http_get, Agent, AgentSetup};
use common::PgCluster;
use support::Probe;
use tokio::runtime::Runtime;

const TABLE_DDL: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, customer int NOT NULL, \
                         status text NOT NULL, amount numeric(12,2) NOT NULL, note text, \
                         created timestamptz NOT NULL)";
/// The columns compared, in a fixed order.
const COLUMNS: &str = "id, customer, status, amount, note, created";
const TIMEOUT: Duration = Duration::from_secs(3600);
const POLL: Duration = Duration::from_millis(20);
/// The merge sink's target schema.
const MIRROR_SCHEMA: &str = "replica";

/// Fills `orders` with `rows` rows in one statement.
fn fill_sql(rows: usize) -> String {
    format!(
        "INSERT INTO orders \
         SELECT g, \
                (g * 7919) % 50000, \
                (ARRAY['new', 'paid', 'packed', 'shipped', 'delivered'])[(g % 5)::int + 1], \
                ((g * 7919) % 500000) / 100.0, \
                CASE WHEN g % 10 = 0 THEN NULL \
                     WHEN g % 1000 = 1 THEN E'tab\\there, a backslash \\\\ and a newline\\n' || g \
                     ELSE left(repeat(md5(g::text), 3), 20 + (g % 70)::int) END, \
                timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second' \
         FROM generate_series(1::bigint, {rows}) AS g"
    )
}

/// The log position of the snapshot's last record: the durable position once `/status` says
/// the snapshot is done (its last transaction is flushed before that), the source having no
/// writes meanwhile.
fn snapshot_end(setup: &AgentSetup, started: Instant, agent: &mut Agent, what: &str) -> u64 {
    let (position, _) = poll_until(started, agent, what, || {
        let response = http_get(setup.health_port, "/status")?;
        let (_, body) = response.split_once("\r\n\r\n")?;
        let status: serde_json::Value = serde_json::from_str(body).ok()?;
        (status["source"]["snapshot"]["state"] == "done")
            .then(|| status["log"]["durable_position"].as_u64())
            .flatten()
    });
    position
}

/// Calls `poll` every [`POLL`] until it returns a value: that value and the time since
/// `started`. Panics with the agent's log when the agent exits first or [`TIMEOUT`] passes.
fn poll_until<T>(
    started: Instant,
    agent: &mut Agent,
    what: &str,
    mut poll: impl FnMut() -> Option<T>,
) -> (T, Duration) {
    loop {
        if let Some(value) = poll() {
            return (value, started.elapsed());
        }
        assert!(
            agent.is_running(),
            "{what}: the agent exited:\n{}",
            agent.log()
        );
        assert!(
            started.elapsed() < TIMEOUT,
            "{what}: not done within {TIMEOUT:?}:\n{}",
            agent.log()
        );
        std::thread::sleep(POLL);
    }
}

/// `count:sum(hashtext(row))` of a table, over [`COLUMNS`].
fn checksum_sql(table: &str) -> String {
    format!(
        "SELECT count(*)::text || ':' || coalesce(sum(hashtext(row({COLUMNS})::text)), 0)::text \
         FROM {table}"
    )
}

/// Waiting and checking on a target through a probe.
trait Wait {
    fn text(&self, sql: &str) -> Option<String>;

    /// Polls until `sql` returns a row whose text is "true"; the time since `started`. Panics
    /// with the agent's log when the agent exits first.
    fn wait_true(&self, sql: &str, started: Instant, agent: &mut Agent, what: &str) -> Duration {
        let ((), took) = poll_until(started, agent, what, || {
            (self.text(sql).as_deref() == Some("true")).then_some(())
        });
        took
    }

    /// The target's checksum must equal the source's.
    fn check_mirrors(&self, table: &str, want: &str, what: &str) {
        let mut got = None;
        let same = eventually(Duration::from_secs(30), || {
            got = self.text(&checksum_sql(table));
            got.as_deref() == Some(want)
        });
        assert!(same, "{what}: target {got:?} differs from source {want:?}");
    }
}

impl Wait for Probe<'_> {
    fn text(&self, sql: &str) -> Option<String> {
        Probe::text(self, sql)
    }
}

/// The cluster's psql against `db`, without the developer's PG* environment.
fn psql_command(pg: &PgCluster, db: &str) -> Command {
    let mut cmd = Command::new(pg.bindir().join("psql"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PG") {
            cmd.env_remove(name);
        }
    }
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-p", &pg.port().to_string()])
        .args(["-U", "postgres", "-d", db]);
    cmd
}

/// `COPY orders TO STDOUT | COPY orders FROM STDIN` into a fresh database with the same DDL;
/// its seconds. The target is checked against the source and dropped.
fn copy_reference(bench: &Bench) -> f64 {
    let Bench {
        pg, rt, src, want, ..
    } = bench;
    let db = pg.fresh_database("copy");
    pg.psql(&db, TABLE_DDL);
    pg.psql("postgres", "CHECKPOINT");

    let started = Instant::now();
    let mut out = psql_command(pg, src)
        .args(["-c", "COPY orders TO STDOUT"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn psql COPY TO STDOUT");
    let pipe = out.stdout.take().expect("psql stdout");
    let mut input = psql_command(pg, &db)
        .args(["-c", "COPY orders FROM STDIN"])
        .stdin(Stdio::from(pipe))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn psql COPY FROM STDIN");
    let read = out.wait().expect("psql COPY TO STDOUT");
    let written = input.wait().expect("psql COPY FROM STDIN");
    let took = started.elapsed().as_secs_f64();
    assert!(read.success(), "COPY orders TO STDOUT: {read}");
    assert!(written.success(), "COPY orders FROM STDIN: {written}");

    let probe = Probe::new(rt, pg, &db);
    probe.check_mirrors("public.orders", want, "COPY | COPY");
    drop(probe);
    pg.psql("postgres", &format!("DROP DATABASE {db} WITH (FORCE)"));
    took
}

/// An agent named `name` that snapshots `public.orders` with `parallelism` connections into a
/// merge mirror at `sink_url`.
fn agent_setup(name: &str, source_url: &str, sink_url: &str, parallelism: usize) -> AgentSetup {
    let setup = AgentSetup::jsonl(source_url, "\"public.orders\"");
    let config = format!(
        "[agent]\nname = \"{name}\"\ndata_dir = \"data\"\nhealth_addr = \"127.0.0.1:{}\"\n\n\
         [source]\ntype = \"postgres\"\nurl = \"{source_url}\"\ntables = [\"public.orders\"]\n\
         snapshot = \"initial\"\nsnapshot_parallelism = {parallelism}\n\
         connect_timeout = \"5s\"\n\n\
         [[sink]]\nname = \"mirror\"\ntype = \"postgres\"\nurl = \"{sink_url}\"\n\
         schema = \"{MIRROR_SCHEMA}\"\nmode = \"merge\"\n",
        setup.health_port
    );
    std::fs::write(&setup.config, config).expect("config");
    setup
}

/// One tidemark run: end-to-end seconds, and the agent's own `snapshot done` figures.
struct Run {
    seconds: f64,
    /// `seconds=` of the agent's `snapshot done` line: the copy into its offset log.
    logged_seconds: Option<f64>,
    /// `rows_per_second=` of that line.
    logged_rate: Option<f64>,
    /// The agent's WARN and ERROR lines.
    complaints: Vec<String>,
}

/// The value of `key=` in a log line, without quotes.
fn field(line: &str, key: &str) -> Option<f64> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let value: String = line[start..]
        .trim_start_matches('"')
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    value.parse().ok()
}

fn tidemark_snapshot(bench: &Bench, name: &str, parallelism: usize) -> Run {
    let Bench {
        pg,
        rt,
        src,
        want,
        rows,
        ..
    } = bench;
    let db = pg.fresh_database(name);
    let setup = agent_setup(name, &pg.url(src), &pg.url(&db), parallelism);
    let probe = Probe::new(rt, pg, &db);
    let mirror = format!("{MIRROR_SCHEMA}.orders");
    let what = format!("tidemark snapshot, {parallelism} stream(s)");
    pg.psql("postgres", "CHECKPOINT");

    let started = Instant::now();
    let mut agent = setup.start();
    // Each applied chunk stores the log position of its last record in the checkpoint.
    let end = snapshot_end(&setup, started, &mut agent, &what);
    probe.wait_true(
        &format!(
            "SELECT (max(log_position) >= {end})::text FROM {MIRROR_SCHEMA}._tidemark_checkpoint"
        ),
        started,
        &mut agent,
        &what,
    );
    let took = probe.wait_true(
        &format!("SELECT (count(*) >= {rows})::text FROM {mirror}"),
        started,
        &mut agent,
        &what,
    );
    probe.check_mirrors(&mirror, want, &what);
    let log = agent.log();
    // A sink that fails on the way out makes the agent exit non-zero; the target is checked.
    let _ = agent.terminate();

    let done = log.lines().find(|l| l.contains("snapshot done"));
    let complaints = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(str::to_string)
        .collect();
    drop(probe);
    let slot = format!("tidemark_{name}");
    let dropped = eventually(Duration::from_secs(30), || {
        pg.try_psql(
            src,
            &format!(
                "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots \
                 WHERE slot_name = '{slot}'"
            ),
        )
        .is_some()
    });
    assert!(dropped, "dropping slot {slot}");
    pg.psql(src, &format!("DROP PUBLICATION IF EXISTS {slot}"));
    pg.psql("postgres", &format!("DROP DATABASE {db} WITH (FORCE)"));
    Run {
        seconds: took.as_secs_f64(),
        logged_seconds: done.and_then(|l| field(l, "seconds")),
        logged_rate: done.and_then(|l| field(l, "rows_per_second")),
        complaints,
    }
}

#[derive(Default)]
struct Figures {
    reference: Vec<f64>,
    single: Vec<f64>,
    parallel: Vec<f64>,
    /// The agents' own `snapshot done` seconds.
    single_logged: Vec<f64>,
    parallel_logged: Vec<f64>,
}

#[derive(Clone, Copy)]
enum Side {
    Reference,
    Single,
    Parallel,
}

/// What every run of the bench shares.
struct Bench<'a> {
    pg: &'a PgCluster,
    rt: &'a Runtime,
    /// The source database.
    src: &'a str,
    /// The source's checksum.
    want: &'a str,
    rows: usize,
    /// Streams of the parallel snapshot.
    parallelism: usize,
}

fn run_round(bench: &Bench, round: usize, figures: &mut Figures) -> Vec<String> {
    let rows = bench.rows;
    let mut order = [Side::Reference, Side::Single, Side::Parallel];
    order.rotate_left((round - 1) % 3);
    let mut lines = Vec::new();
    for side in order {
        let rate = |seconds: f64| rows as f64 / seconds;
        match side {
            Side::Reference => {
                let took = copy_reference(bench);
                figures.reference.push(took);
                lines.push(format!(
                    "round {round}: COPY | COPY {took:.2} s, {:.0} rows/s",
                    rate(took)
                ));
            }
            Side::Single | Side::Parallel => {
                let streams = if matches!(side, Side::Single) {
                    1
                } else {
                    bench.parallelism
                };
                let run = tidemark_snapshot(bench, &format!("snap{streams}_r{round}"), streams);
                let (seconds, logged) = if matches!(side, Side::Single) {
                    (&mut figures.single, &mut figures.single_logged)
                } else {
                    (&mut figures.parallel, &mut figures.parallel_logged)
                };
                seconds.push(run.seconds);
                // The agent's rate is exact where its seconds are rounded to a tenth.
                if let Some(s) = run
                    .logged_rate
                    .map(|r| rows as f64 / r)
                    .or(run.logged_seconds)
                {
                    logged.push(s);
                }
                lines.push(format!(
                    "round {round}: tidemark {streams} stream(s) {:.2} s, {:.0} rows/s end to end; \
                     agent's snapshot done: {} s, {} rows/s into its log; the rest (start-up, apply) {} s",
                    run.seconds,
                    rate(run.seconds),
                    run.logged_seconds
                        .map_or("?".to_string(), |s| format!("{s:.1}")),
                    run.logged_rate.map_or("?".to_string(), |r| format!("{r:.0}")),
                    run.logged_seconds
                        .map_or("?".to_string(), |s| format!("{:.1}", run.seconds - s)),
                ));
                for complaint in run.complaints {
                    lines.push(format!("  agent log: {complaint}"));
                }
            }
        }
    }
    lines
}

fn main() {
    if !support::is_bench_run() {
        return;
    }
    let rows: usize = support::setting("TIDEMARK_BENCH_ROWS", 2_000_000).max(1);
    let rounds: usize = support::setting("TIDEMARK_BENCH_REPEAT", 3).max(1);
    let parallelism = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    // One worker thread drives the probes' connections, also between polls.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Room for several copies of the table in WAL without a checkpoint in the middle of a
    // measurement; each run starts after an explicit CHECKPOINT.
    let pg = PgCluster::start_with(&[("max_wal_size", "8GB"), ("checkpoint_timeout", "1h")]);
    let version = pg.psql("postgres", "SHOW server_version");

    let src = pg.fresh_database("src");
    let started = Instant::now();
    pg.psql(&src, &format!("{TABLE_DDL}; {}", fill_sql(rows)));
    pg.psql(&src, "VACUUM ANALYZE orders");
    let filled = started.elapsed();
    let size = pg.psql(
        &src,
        "SELECT pg_size_pretty(pg_table_size('orders')) || ' heap+toast, ' || \
         pg_size_pretty(pg_indexes_size('orders')) || ' index, ' || relpages || ' pages' \
         FROM pg_class WHERE oid = 'orders'::regclass",
    );
    let src_probe = Probe::new(&rt, &pg, &src);
    let want = src_probe
        .text(&checksum_sql("public.orders"))
        .expect("source checksum");
    drop(src_probe);
    assert!(
        want.starts_with(&format!("{rows}:")),
        "the source holds {want}, not {rows} rows"
    );
    println!(
        "source: {rows} rows in orders ({size}), filled in {:.1} s; PostgreSQL {version}; \
         {parallelism} streams for the parallel snapshot; {rounds} round(s)",
        filled.as_secs_f64()
    );

    let bench = Bench {
        pg: &pg,
        rt: &rt,
        src: &src,
        want: &want,
        rows,
        parallelism,
    };
    let mut figures = Figures::default();
    for round in 1..=rounds {
        for line in run_round(&bench, round, &mut figures) {
            println!("{line}");
        }
    }

    println!();
    println!(
        "{:<46} {:>9} {:>10} {:>10} {:>10}",
        format!("snapshot of {rows} rows"),
        "median s",
        "rows/s",
        "min",
        "max"
    );
    let single_name = "tidemark snapshot, 1 stream (end to end)".to_string();
    let parallel_name = format!("tidemark snapshot, {parallelism} streams (end to end)");
    let table = [
        (
            "COPY TO STDOUT | COPY FROM STDIN".to_string(),
            &figures.reference,
        ),
        (single_name, &figures.single),
        (parallel_name, &figures.parallel),
        (
            "  of which 1 stream into the log (agent's)".to_string(),
            &figures.single_logged,
        ),
        (
            format!("  of which {parallelism} streams into the log (agent's)"),
            &figures.parallel_logged,
        ),
    ];
    for (name, v) in table {
        let (med, min, max) = support::rates(rows, v);
        println!(
            "{name:<46} {:>9.2} {med:>10.0} {min:>10.0} {max:>10.0}",
            support::median(v.to_vec())
        );
    }
    let reference = support::rates(rows, &figures.reference).0;
    let single = support::rates(rows, &figures.single).0;
    let parallel = support::rates(rows, &figures.parallel).0;
    println!();
    println!(
        "tidemark 1 stream / COPY | COPY:   {:.2}×   (goal ≥ 0.8×, issue 6; ≥ 1.0×, DESIGN)",
        single / reference
    );
    println!(
        "tidemark {parallelism} streams / COPY | COPY: {:.2}×   (goal ≥ 1.5×, issue 6)",
        parallel / reference
    );
}
