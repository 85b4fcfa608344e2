//! Catch-up of a pre-recorded backlog into a merge mirror, against PostgreSQL's native logical
//! replication (CREATE PUBLICATION / CREATE SUBSCRIPTION into another database of the same
//! cluster) on the same backlog, in one run.
//!
//!   cargo bench --bench merge_apply                              # ~200,000 row changes
//!   TIDEMARK_BENCH_ROWS=1000000 cargo bench --bench merge_apply  # ~1,000,000 row changes
//!   TIDEMARK_BENCH_REPEAT=5 cargo bench --bench merge_apply      # 5 rounds instead of 3
//!
//! Each round starts from the same point on every side: a fresh source database, a publication,
//! and three slots created before the workload (the native subscription's, and those of two
//! agents that were started once with `snapshot = "never"` and stopped). The workload (seeded,
//! identical every round: multi-row inserts, updates of live keys, deletes, a few mixed
//! transactions, and a marker row last) then runs while nothing consumes it, so the backlog
//! sits in the slots' retained WAL. Then, one after the other:
//!
//! - native: `ALTER SUBSCRIPTION … ENABLE` until the marker row is in the target;
//! - tidemark end to end: start the agent (merge sink) until the marker row is in its target
//!   (capture into the offset log and merge apply run concurrently, as in production);
//! - tidemark capture only: start the second agent, whose sink points at a port nothing
//!   listens on, until its slot's `confirmed_flush_lsn` reaches the end of the workload
//!   (everything is durably in the log); stop it;
//! - reference for capture: `pg_recvlogical` draining a fourth slot (pgoutput, the same
//!   publication) to /dev/null with `--endpos` at the end of the workload, from its start
//!   until it exits;
//! - tidemark merge apply alone: point that agent's sink at its real target, and its source at
//!   a port nothing listens on, and start it again until the marker row is in the target (log
//!   → target only). Left at the real source, it would confirm the slot past its log on
//!   keepalives (WAL the targets of the same cluster write), and the SCD2 agent below, whose
//!   log is an older copy, would rightly refuse that slot;
//! - tidemark scd2 apply alone: the same from a copy of that agent's log (taken after the
//!   capture), with an SCD2 sink into a fifth database, until the marker's version is there.
//!   Merge and SCD2 apply alternate in order between rounds.
//!
//! Every target's `count(*)` and `sum(hashtext(row))` (the SCD2 target's current versions)
//! must then equal the source's. The order
//! of native and tidemark alternates between rounds. rows/s is row changes in the backlog ÷
//! seconds; medians, minima and maxima over the rounds and the ratios of the medians are
//! printed. Nothing is asserted about time.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::agent::{eventually, Agent, AgentSetup};
use common::PgCluster;
use support::orders_backlog::{workload, Workload, MARKER_ID, TABLE_DDL};
use support::Probe;
use tokio::runtime::Runtime;

const PUBLICATION: &str = "bench_pub";
const TIMEOUT: Duration = Duration::from_secs(3600);
const POLL: Duration = Duration::from_millis(20);
/// The merge sink's target schema.
const MIRROR_SCHEMA: &str = "replica";
/// The SCD2 sink's target schema.
const HISTORY_SCHEMA: &str = "history";

/// `count:sum(hashtext(row))` of a table, over the columns in a fixed order.
fn checksum_sql(table: &str) -> String {
    format!(
        "SELECT count(*)::text || ':' || coalesce(sum(hashtext(row(id, customer, status, amount, \
         note)::text)), 0)::text FROM {table}"
    )
}

/// Waiting and checking on a target through a probe.
trait Wait {
    fn text(&self, sql: &str) -> Option<String>;

    /// Polls until `sql` returns a row whose text is "true"; the time since `started`.
    fn wait_true(&self, sql: &str, started: Instant, what: &str) -> Duration {
        loop {
            if self.text(sql).as_deref() == Some("true") {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < TIMEOUT,
                "{what}: not done within {TIMEOUT:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    fn wait_marker(&self, table: &str, started: Instant, what: &str) -> Duration {
        self.wait_true(
            &format!("SELECT (count(*) > 0)::text FROM {table} WHERE id = {MARKER_ID}"),
            started,
            what,
        )
    }

    /// The target's checksum must equal the source's (it already should: the marker is there).
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

/// The agent's config with one postgres sink, `mode` merge or scd2.
fn agent_config(name: &str, source_url: &str, sink_url: &str, mode: &str) -> String {
    let schema = if mode == "scd2" {
        HISTORY_SCHEMA
    } else {
        MIRROR_SCHEMA
    };
    // An apply-alone agent waits for its unreachable source as long as it runs.
    format!(
        "[agent]\nname = \"{name}\"\ndata_dir = \"data\"\nhealth_addr = \"127.0.0.1:{}\"\n\n\
         [source]\ntype = \"postgres\"\nurl = \"{source_url}\"\ntables = [\"public.orders\"]\n\
         publication = \"{PUBLICATION}\"\nsnapshot = \"never\"\nconnect_timeout = \"1h\"\n\n\
         [[sink]]\nname = \"{mode}\"\ntype = \"postgres\"\nurl = \"{sink_url}\"\n\
         schema = \"{schema}\"\nmode = \"{mode}\"\n",
        common::agent::free_port()
    )
}

/// An agent whose config is ours (name, slot, shared publication, one postgres sink).
fn agent_setup(name: &str, source_url: &str, sink_url: &str, mode: &str) -> AgentSetup {
    let setup = AgentSetup::jsonl(source_url, "\"public.orders\"");
    std::fs::write(
        &setup.config,
        agent_config(name, source_url, sink_url, mode),
    )
    .expect("config");
    setup
}

/// Starts the agent, waits until it streams (its slot exists), and stops it.
fn create_slot_with(setup: &AgentSetup) {
    let mut agent = setup.start();
    agent.wait_streaming();
    stop(agent);
}

fn stop(agent: Agent) {
    // A sink that never reached its target makes the agent exit non-zero; the log is flushed
    // and the slot confirmed either way.
    let _ = agent.terminate();
}

#[derive(Default)]
struct Figures {
    native: Vec<f64>,
    end_to_end: Vec<f64>,
    capture: Vec<f64>,
    recvlogical: Vec<f64>,
    apply: Vec<f64>,
    scd2: Vec<f64>,
    /// Versions in the SCD2 target after a round (the same every round).
    versions: usize,
}

fn run_round(
    pg: &PgCluster,
    rt: &Runtime,
    w: &Workload,
    round: usize,
    figures: &mut Figures,
) -> String {
    let src = pg.fresh_database("src");
    let native_db = pg.fresh_database("native");
    let e2e_db = pg.fresh_database("e2e");
    let apply_db = pg.fresh_database("apply");
    let history_db = pg.fresh_database("history");
    pg.psql(
        &src,
        &format!("{TABLE_DDL}; CREATE PUBLICATION {PUBLICATION} FOR TABLE orders;"),
    );
    pg.psql(&native_db, TABLE_DDL);

    // Every slot exists before the workload.
    let native = format!("native_r{round}");
    pg.psql(
        &src,
        &format!("SELECT pg_create_logical_replication_slot('{native}', 'pgoutput')"),
    );
    pg.psql(
        &native_db,
        &format!(
            "CREATE SUBSCRIPTION {native} CONNECTION 'host=127.0.0.1 port={} user=postgres \
             dbname={src}' PUBLICATION {PUBLICATION} WITH (create_slot = false, \
             slot_name = '{native}', copy_data = false, enabled = false)",
            pg.port()
        ),
    );
    let source_url = pg.url(&src);
    let e2e = agent_setup(
        &format!("e2e_r{round}"),
        &source_url,
        &pg.url(&e2e_db),
        "merge",
    );
    create_slot_with(&e2e);
    let nowhere = format!(
        "postgres://postgres@127.0.0.1:{}/nowhere",
        common::agent::free_port()
    );
    let no_source = format!(
        "postgres://postgres@127.0.0.1:{}/{src}",
        common::agent::free_port()
    );
    let apply_name = format!("apply_r{round}");
    let apply = agent_setup(&apply_name, &source_url, &nowhere, "merge");
    create_slot_with(&apply);
    let recv_slot = format!("recv_r{round}");
    pg.psql(
        &src,
        &format!("SELECT pg_create_logical_replication_slot('{recv_slot}', 'pgoutput')"),
    );

    let started = Instant::now();
    pg.psql(&src, &w.sql);
    let recorded = started.elapsed();
    let end_lsn = pg.psql(&src, "SELECT pg_current_wal_insert_lsn()");
    let count = pg.psql(&src, "SELECT count(*) FROM orders");
    assert_eq!(count, w.final_rows.to_string(), "the workload's final rows");
    let want = pg.psql(&src, &checksum_sql("orders"));
    // Quiet the source so its autovacuum does not land in a measurement.
    pg.psql(&src, "VACUUM ANALYZE orders; CHECKPOINT;");
    let backlog = pg.psql(
        &src,
        &format!(
            "SELECT pg_size_pretty(pg_wal_lsn_diff('{end_lsn}', restart_lsn)) \
             FROM pg_replication_slots WHERE slot_name = '{native}'"
        ),
    );

    let native_probe = Probe::new(rt, pg, &native_db);
    let e2e_probe = Probe::new(rt, pg, &e2e_db);
    let apply_probe = Probe::new(rt, pg, &apply_db);
    let history_probe = Probe::new(rt, pg, &history_db);
    let src_probe = Probe::new(rt, pg, &src);
    let mirror_table = format!("{MIRROR_SCHEMA}.orders");
    let history_table = format!("{HISTORY_SCHEMA}.orders");
    let current_versions = format!(
        "(SELECT id, customer, status, amount, note FROM {history_table} WHERE is_current) AS v"
    );

    let measure_native = |figures: &mut Figures| {
        let started = Instant::now();
        pg.psql(&native_db, &format!("ALTER SUBSCRIPTION {native} ENABLE"));
        let took = native_probe.wait_marker("public.orders", started, "native");
        native_probe.check_mirrors("public.orders", &want, "native");
        pg.psql(
            &native_db,
            &format!("ALTER SUBSCRIPTION {native} DISABLE; DROP SUBSCRIPTION {native};"),
        );
        figures.native.push(took.as_secs_f64());
    };
    let measure_tidemark = |figures: &mut Figures| {
        let started = Instant::now();
        let agent = e2e.start();
        let took = e2e_probe.wait_marker(&mirror_table, started, "tidemark end to end");
        e2e_probe.check_mirrors(&mirror_table, &want, "tidemark end to end");
        stop(agent);
        figures.end_to_end.push(took.as_secs_f64());

        let started = Instant::now();
        let agent = apply.start();
        let took = src_probe.wait_true(
            &format!(
                "SELECT (confirmed_flush_lsn >= '{end_lsn}')::text FROM pg_replication_slots \
                 WHERE slot_name = 'tidemark_{apply_name}'"
            ),
            started,
            "tidemark capture",
        );
        stop(agent);
        figures.capture.push(took.as_secs_f64());

        let started = Instant::now();
        let drained = std::process::Command::new(pg.bindir().join("pg_recvlogical"))
            .args(["-h", "127.0.0.1", "-U", "postgres", "--no-loop", "--start"])
            .args([
                "-p",
                &pg.port().to_string(),
                "-d",
                &src,
                "--slot",
                &recv_slot,
            ])
            .args(["--endpos", &end_lsn, "-f", "/dev/null"])
            .args(["-o", "proto_version=1", "-o"])
            .arg(format!("publication_names={PUBLICATION}"))
            .status()
            .expect("pg_recvlogical");
        assert!(drained.success(), "pg_recvlogical failed");
        figures.recvlogical.push(started.elapsed().as_secs_f64());

        // The SCD2 agent reads a copy of the captured log, so both sinks apply the same
        // records from the same starting point.
        let history = agent_setup(&apply_name, &no_source, &pg.url(&history_db), "scd2");
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(apply.data_dir())
            .arg(history.data_dir())
            .status()
            .expect("cp");
        assert!(copied.success(), "copying the log");
        std::fs::write(
            &apply.config,
            agent_config(&apply_name, &no_source, &pg.url(&apply_db), "merge"),
        )
        .expect("config");
        let measure_merge = |figures: &mut Figures| {
            let started = Instant::now();
            let agent = apply.start();
            let took = apply_probe.wait_marker(&mirror_table, started, "tidemark merge apply");
            apply_probe.check_mirrors(&mirror_table, &want, "tidemark merge apply");
            stop(agent);
            figures.apply.push(took.as_secs_f64());
        };
        let measure_scd2 = |figures: &mut Figures| {
            let started = Instant::now();
            let agent = history.start();
            let took = history_probe.wait_marker(&history_table, started, "tidemark scd2 apply");
            history_probe.check_mirrors(&current_versions, &want, "tidemark scd2 apply");
            stop(agent);
            figures.scd2.push(took.as_secs_f64());
            figures.versions = history_probe
                .text(&format!("SELECT count(*)::text FROM {history_table}"))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        };
        if round % 2 == 1 {
            measure_merge(figures);
            measure_scd2(figures);
        } else {
            measure_scd2(figures);
            measure_merge(figures);
        }
    };
    if round % 2 == 1 {
        measure_native(figures);
        measure_tidemark(figures);
    } else {
        measure_tidemark(figures);
        measure_native(figures);
    }

    drop((
        native_probe,
        e2e_probe,
        apply_probe,
        history_probe,
        src_probe,
    ));
    pg.psql(
        &src,
        &format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name IN ('tidemark_e2e_r{round}', 'tidemark_{apply_name}', '{recv_slot}')"
        ),
    );
    for db in [&src, &native_db, &e2e_db, &apply_db, &history_db] {
        pg.psql("postgres", &format!("DROP DATABASE {db} WITH (FORCE)"));
    }
    let rows = w.changes() as f64;
    let last = |v: &[f64]| rows / v.last().copied().unwrap_or(f64::NAN);
    format!(
        "round {round} ({} first): workload recorded in {:.1} s, backlog {backlog} of WAL; \
         native {:.0} rows/s, tidemark end to end {:.0}, capture {:.0}, merge apply {:.0}, \
         scd2 apply {:.0}",
        if round % 2 == 1 { "native" } else { "tidemark" },
        recorded.as_secs_f64(),
        last(&figures.native),
        last(&figures.end_to_end),
        last(&figures.capture),
        last(&figures.apply),
        last(&figures.scd2),
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
    // The launcher starts a subscription's apply worker at most once per
    // wal_retrieve_retry_interval (5 s by default): without this, a round's ENABLE can wait
    // seconds behind the previous round's worker start, which is not apply speed.
    let pg = PgCluster::start_with(&[("wal_retrieve_retry_interval", "100ms")]);
    let version = pg.psql("postgres", "SHOW server_version");
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
        "  1-3 statements a transaction, 3/4 of them of 1-5 rows, 1/4 of 20-200; \
         PostgreSQL {version}"
    );
    let mut figures = Figures::default();
    for round in 1..=rounds {
        let line = run_round(&pg, &rt, &w, round, &mut figures);
        println!("{line}");
    }

    let changes = w.changes();
    let seconds = |v: &[f64]| support::median(v.to_vec());
    println!();
    println!(
        "{:<38} {:>9} {:>10} {:>10} {:>10}",
        "catch-up of the backlog", "median s", "rows/s", "min", "max"
    );
    let rows = [
        ("native logical replication", &figures.native),
        ("tidemark end to end (capture + merge)", &figures.end_to_end),
        ("tidemark capture only (slot → log)", &figures.capture),
        ("pg_recvlogical (slot → /dev/null)", &figures.recvlogical),
        ("tidemark merge apply alone (log → db)", &figures.apply),
        ("tidemark scd2 apply alone (log → db)", &figures.scd2),
    ];
    for (name, v) in rows {
        let (med, min, max) = support::rates(changes, v);
        println!(
            "{name:<38} {:>9.2} {med:>10.0} {min:>10.0} {max:>10.0}",
            seconds(v)
        );
    }
    let native = support::rates(changes, &figures.native).0;
    let end_to_end = support::rates(changes, &figures.end_to_end).0;
    let apply = support::rates(changes, &figures.apply).0;
    let scd2 = support::rates(changes, &figures.scd2).0;
    let capture = support::rates(changes, &figures.capture).0;
    let recvlogical = support::rates(changes, &figures.recvlogical).0;
    println!();
    println!(
        "tidemark capture / pg_recvlogical: {:.2}×   (goal ≥ 0.9×, issue 9)",
        capture / recvlogical
    );
    println!(
        "tidemark end to end / native:      {:.2}×   (goal ≥ 2.0×, DESIGN)",
        end_to_end / native
    );
    println!(
        "tidemark merge apply / native:     {:.2}×   (goal ≥ 3×, DESIGN and issue 4)",
        apply / native
    );
    println!(
        "tidemark scd2 apply / merge apply: {:.2}×   (goal ≥ 0.7×, DESIGN); {} versions, \
         {:.0} versions/s",
        scd2 / apply,
        figures.versions,
        figures.versions as f64 / support::median(figures.scd2.clone())
    );
}
