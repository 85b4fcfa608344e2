//! The HTTP operating surface against real servers: `/status`, `/metrics` (whose counters add
//! up after a randomised workload) and `/ready` (503 with the reason while a target is down,
//! 200 again once it is back).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::agent::{dlq, eventually, held_back_snapshot, http_get, mirror_sink, AgentSetup};
use common::{workload, PgCluster};
use rand::SeedableRng;

/// Status code and body of a GET on the agent's HTTP port.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let response = http_get(port, path)?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

/// The samples of a Prometheus text exposition: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            (series.to_string(), value.parse().expect("sample value"))
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_add_up_after_a_random_workload() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("src");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, workload::SCHEMA);
    let sinks = format!(
        "[[sink]]\nname = \"mirror\"\ntype = \"postgres\"\nurl = \"{}\"\nschema = \"replica\"\n\n\
         [[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n",
        pg.url(&warehouse)
    );
    let setup = AgentSetup::with_sinks(
        &pg.url(&db),
        "\"public.accounts\", \"public.lines\", \"public.docs\"",
        &sinks,
    );
    let mut agent = setup.start();
    agent.wait_streaming();
    let client = pg.connect(&db).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    for _ in 0..300 {
        workload::random_transaction(&client, &mut rng).await;
    }
    let port = setup.health_port;
    let caught_up = eventually(Duration::from_secs(60), || {
        let Some((200, body)) = get(port, "/status") else {
            return false;
        };
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        let durable = &status["log"]["durable_position"];
        ["mirror", "events"]
            .iter()
            .all(|sink| &status["sinks"][sink]["applied_position"] == durable)
            && status["sinks"]["mirror"]["lag_bytes"] == 0
    });
    assert!(caught_up, "{}", agent.log());

    let (code, body) = get(port, "/status").unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["source"]["connected"], true, "{status}");
    assert!(status["log"]["bytes"].as_u64().unwrap() > 0, "{status}");
    assert!(
        status["sinks"]["mirror"]["batches"].as_u64().unwrap() > 0,
        "{status}"
    );

    // The source counts a transaction as captured when it appends it, a moment before it is
    // durable and the sinks can see it: the counters add up once the sinks have applied it.
    let add_up = || -> Result<(String, f64), String> {
        let (code, metrics) = get(port, "/metrics").ok_or("no /metrics")?;
        assert_eq!(code, 200);
        let samples = samples(&metrics);
        let mut captured_total = 0.0;
        for table in ["public.accounts", "public.lines", "public.docs"] {
            let captured = sample(
                &samples,
                &format!("tidemark_events_captured_total{{table=\"{table}\"}}"),
            );
            captured_total += captured;
            for sink in ["mirror", "events"] {
                let applied = sample(
                    &samples,
                    &format!("tidemark_events_applied_total{{sink=\"{sink}\",table=\"{table}\"}}"),
                );
                let dead = sample(
                    &samples,
                    &format!(
                        "tidemark_events_dead_lettered_total{{sink=\"{sink}\",table=\"{table}\"}}"
                    ),
                );
                if captured != applied + dead {
                    return Err(format!(
                        "{sink} {table}: captured {captured}, applied {applied}, dead-lettered {dead}\n{metrics}"
                    ));
                }
            }
        }
        Ok((metrics, captured_total))
    };
    assert!(
        eventually(Duration::from_secs(30), || add_up().is_ok()),
        "{}",
        add_up().err().unwrap_or_default()
    );
    let (metrics, captured_total) = add_up().unwrap();
    let samples = samples(&metrics);
    assert!(captured_total > 300.0, "{metrics}");
    let envelopes = setup.envelopes().len() as f64;
    assert!(
        envelopes >= captured_total,
        "{envelopes} envelopes, {captured_total} captured"
    );
    assert!(sample(&samples, "tidemark_log_bytes") > 0.0);
    assert!(sample(&samples, "tidemark_batch_seconds_count{sink=\"mirror\"}") > 0.0);
    assert!(samples.contains_key("tidemark_slot_retained_wal_bytes"));

    let (code, body) = get(port, "/ready").unwrap();
    assert_eq!(code, 200, "{body}");

    let shown = setup.command("status");
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert!(text.contains("source  connected"), "{text}");
    assert!(text.contains("sink    mirror: applying"), "{text}");
    assert!(text.contains("sink    events: applying"), "{text}");
    assert!(text.contains("ready   yes"), "{text}");
    assert!(agent.terminate().success());

    let shown = setup.command("status");
    let error = String::from_utf8_lossy(&shown.stderr);
    assert_eq!(shown.status.code(), Some(1), "{error}");
    assert!(error.contains("cannot reach the agent"), "{error}");
}

#[test]
fn ready_says_503_while_a_target_is_down_and_200_when_it_is_back() {
    let source = PgCluster::start();
    let target = PgCluster::start();
    let db = source.fresh_database("src");
    let warehouse = target.fresh_database("warehouse");
    source.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v int)");
    let sink = mirror_sink(&target.url(&warehouse));
    let setup = AgentSetup::with_sinks(&source.url(&db), "\"public.t\"", &sink);
    let mut agent = setup.start();
    agent.wait_streaming();
    let port = setup.health_port;
    source.psql(&db, "INSERT INTO t VALUES (1, 1)");
    assert!(
        eventually(Duration::from_secs(30), || get(port, "/ready")
            .is_some_and(|(code, _)| code == 200)),
        "{:?}\n{}",
        get(port, "/ready"),
        agent.log()
    );

    target.stop();
    source.psql(&db, "INSERT INTO t VALUES (2, 2)");
    let mut last = None;
    let refused = eventually(Duration::from_secs(15), || {
        last = get(port, "/ready");
        last.as_ref().is_some_and(|(code, body)| {
            *code == 503 && body.contains("\"ready\":false") && body.contains("mirror")
        })
    });
    assert!(refused, "{last:?}\n{}", agent.log());

    target.start_again();
    let back = eventually(Duration::from_secs(60), || {
        get(port, "/ready").is_some_and(|(code, _)| code == 200)
    });
    assert!(back, "{:?}\n{}", get(port, "/ready"), agent.log());
    assert_eq!(
        target.psql(&warehouse, "SELECT count(*) FROM replica.t"),
        "2"
    );
    assert!(agent.terminate().success());
}

#[test]
fn heartbeat_runs_its_query_and_retained_wal_over_the_limit_is_warned() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("src");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE beats (at timestamptz)",
    );
    let sink = mirror_sink(&pg.url(&warehouse));
    let setup = AgentSetup::with_sinks(&pg.url(&db), "\"public.t\"", &sink);
    let config = std::fs::read_to_string(&setup.config).unwrap().replace(
        "snapshot = \"never\"",
        "snapshot = \"never\"\nheartbeat_interval = \"200ms\"\n\
         heartbeat_query = \"INSERT INTO beats VALUES (now())\"\n\
         slot_max_retained_bytes = 1\nstatus_interval = \"1s\"",
    );
    std::fs::write(&setup.config, config).unwrap();
    let mut agent = setup.start();
    agent.wait_streaming();
    let beats = || {
        pg.psql(&db, "SELECT count(*) FROM beats")
            .parse::<u32>()
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(10), || beats() >= 3),
        "{} beats\n{}",
        beats(),
        agent.log()
    );
    agent.wait_log(
        "keeps more WAL than source.slot_max_retained_bytes",
        Duration::from_secs(10),
    );
    let (_, metrics) = get(setup.health_port, "/metrics").unwrap();
    assert!(
        sample(&samples(&metrics), "tidemark_slot_retained_wal_bytes") > 1.0,
        "{metrics}"
    );
    assert!(agent.terminate().success());
}

#[test]
fn dlq_lists_shows_and_drops_dead_letters_only_while_the_agent_is_stopped() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("src");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v int)");
    pg.psql(
        &warehouse,
        "CREATE SCHEMA replica; CREATE TABLE replica.t (id int PRIMARY KEY, v int CHECK (v < 100))",
    );
    let sink = mirror_sink(&pg.url(&warehouse));
    let setup = AgentSetup::with_sinks(&pg.url(&db), "\"public.t\"", &sink);
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(
        &db,
        "INSERT INTO t VALUES (1, 1), (2, 500), (3, 600), (4, 4)",
    );
    let listed = || dlq(&setup, &["list"]).1;
    assert!(
        eventually(Duration::from_secs(30), || listed().lines().count() == 2),
        "{}\n{}",
        listed(),
        agent.log()
    );
    let list = listed();
    assert!(list.starts_with("mirror #1 "), "{list}");
    assert!(list.contains("public.t upsert: "), "{list}");
    assert!(list.contains("violates check constraint"), "{list}");

    let (code, shown, _) = dlq(&setup, &["show", "--sink", "mirror", "2"]);
    assert_eq!(code, Some(0));
    let letter: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(letter["row"]["id"], 3, "{shown}");
    assert_eq!(letter["sink"], "mirror");

    let (code, _, error) = dlq(&setup, &["drop", "--sink", "mirror", "1"]);
    assert_eq!(code, Some(1), "{error}");
    assert!(error.contains("stop the agent"), "{error}");
    assert_eq!(listed().lines().count(), 2);

    assert!(agent.terminate().success());
    let (code, out, error) = dlq(&setup, &["drop", "--sink", "mirror", "1"]);
    assert_eq!(code, Some(0), "{error}");
    assert!(out.contains("1 dead letters left"), "{out}");
    let list = listed();
    assert!(
        list.starts_with("mirror #1 ") && list.lines().count() == 1,
        "{list}"
    );
    let (_, shown, _) = dlq(&setup, &["show", "--sink", "mirror", "1"]);
    assert!(shown.contains("\"id\": 3"), "{shown}");
    let (code, _, error) = dlq(&setup, &["show", "--sink", "mirror", "5"]);
    assert_eq!(code, Some(1));
    assert!(error.contains("has 1 dead letters, no #5"), "{error}");
    dlq(&setup, &["drop", "--sink", "mirror", "--all"]);
    assert_eq!(listed().trim(), "no dead letters");
}

/// `dlq retry` applies the refused changes once the targets take them, to the mirror and the
/// history alike, and skips a letter whose key a later change has reached: applying it would
/// put the older value back.
#[test]
fn dlq_retry_applies_refused_changes_once_the_target_takes_them() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("src");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v int)");
    pg.psql(
        &warehouse,
        "CREATE SCHEMA replica; \
         CREATE TABLE replica.t (id int PRIMARY KEY, v int CONSTRAINT small CHECK (v < 100))",
    );
    let url = pg.url(&warehouse);
    let sinks = format!(
        "{}\n[[sink]]\nname = \"history\"\ntype = \"postgres\"\nurl = \"{url}\"\n\
         schema = \"history\"\nmode = \"scd2\"\n",
        mirror_sink(&url)
    );
    let setup = AgentSetup::with_sinks(&pg.url(&db), "\"public.t\"", &sinks);
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(&db, "INSERT INTO t VALUES (1, 1), (2, 2), (3, 3)");
    let count = |sql: &str| pg.try_psql(&warehouse, sql).unwrap_or_default();
    assert!(eventually(Duration::from_secs(30), || count(
        "SELECT count(*) FROM history.t"
    ) == "3"));
    pg.psql(
        &warehouse,
        "ALTER TABLE history.t ADD CONSTRAINT small CHECK (v < 100)",
    );
    pg.psql(
        &db,
        "UPDATE t SET v = 500 WHERE id = 1; UPDATE t SET v = 600 WHERE id = 2; \
         INSERT INTO t VALUES (4, 700)",
    );
    let listed = || dlq(&setup, &["list"]).1;
    assert!(
        eventually(Duration::from_secs(30), || listed().lines().count() == 6),
        "{}\n{}",
        listed(),
        agent.log()
    );
    // Key 2 changes again, to a value both targets take: its letters are out of date.
    pg.psql(&db, "UPDATE t SET v = 20 WHERE id = 2");
    assert!(eventually(Duration::from_secs(30), || {
        count("SELECT v FROM replica.t WHERE id = 2") == "20"
            && count("SELECT v FROM history.t WHERE id = 2 AND is_current") == "20"
    }));

    let (code, _, error) = dlq(&setup, &["retry", "--sink", "mirror", "--all"]);
    assert_eq!(code, Some(1), "{error}");
    assert!(error.contains("stop the agent"), "{error}");
    assert!(agent.terminate().success());

    // The constraints still hold: refused again, kept with the new reason.
    let (code, out, error) = dlq(&setup, &["retry", "--sink", "mirror", "--all"]);
    assert_eq!(code, Some(1), "{out}{error}");
    assert!(out.contains("#2: skipped, a later change"), "{out}");
    assert!(
        out.contains("0 applied, 2 refused again, 3 dead letters left"),
        "{out}"
    );
    assert!(error.contains("refused again"), "{error}");
    assert_eq!(listed().lines().count(), 6, "{}", listed());

    pg.psql(
        &warehouse,
        "ALTER TABLE replica.t DROP CONSTRAINT small; ALTER TABLE history.t DROP CONSTRAINT small",
    );
    for sink in ["mirror", "history"] {
        let (code, out, error) = dlq(&setup, &["retry", "--sink", sink, "--all"]);
        assert_eq!(code, Some(0), "{sink}: {out}{error}");
        assert!(
            out.contains("2 applied, 0 refused again, 1 dead letters left"),
            "{sink}: {out}"
        );
    }
    let source = pg.psql(
        &db,
        "SELECT string_agg(id || ':' || v, ' ' ORDER BY id) FROM t",
    );
    assert_eq!(source, "1:500 2:20 3:3 4:700");
    assert_eq!(
        pg.psql(
            &warehouse,
            "SELECT string_agg(id || ':' || v, ' ' ORDER BY id) FROM replica.t"
        ),
        source
    );
    assert_eq!(
        pg.psql(
            &warehouse,
            "SELECT string_agg(id || ':' || v, ' ' ORDER BY id) FROM history.t WHERE is_current"
        ),
        source
    );
    // Each retried version starts where the one it replaced ends: at the source's commit.
    assert_eq!(
        pg.psql(
            &warehouse,
            "SELECT string_agg(id || ':' || v || ':' || _tidemark_op || ':' || \
                 (valid_to IS NULL) || ':' || coalesce((valid_to = next)::text, '-'), \
                 ' ' ORDER BY id, valid_from) \
             FROM (SELECT *, lead(valid_from) OVER (PARTITION BY id ORDER BY valid_from) \
                   AS next FROM history.t) h"
        ),
        "1:1:c:false:true 1:500:u:true:- 2:2:c:false:true 2:20:u:true:- 3:3:c:true:- 4:700:c:true:-"
    );
    let list = listed();
    assert_eq!(list.lines().count(), 2, "{list}");

    // The agent goes on from where it was.
    let mut agent = setup.start();
    agent.wait_streaming();
    pg.psql(&db, "UPDATE t SET v = 800 WHERE id = 4");
    assert!(eventually(Duration::from_secs(30), || count(
        "SELECT v FROM replica.t WHERE id = 4"
    ) == "800"));
    assert!(agent.terminate().success());
}

#[test]
fn the_source_pauses_while_the_log_is_full_and_resumes_when_the_sinks_catch_up() {
    let source = PgCluster::start();
    let target = PgCluster::start();
    let db = source.fresh_database("src");
    let warehouse = target.fresh_database("warehouse");
    source.psql(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)");
    let sink = mirror_sink(&target.url(&warehouse));
    let setup = AgentSetup::with_sinks(&source.url(&db), "\"public.t\"", &sink);
    let config = std::fs::read_to_string(&setup.config).unwrap().replace(
        "data_dir = \"data\"",
        "data_dir = \"data\"\nlog_max_bytes = \"4KiB\"",
    );
    std::fs::write(&setup.config, config).unwrap();
    let mut agent = setup.start();
    agent.wait_streaming();
    target.stop();
    for i in 0..200 {
        source.psql(&db, &format!("INSERT INTO t VALUES ({i}, repeat('x', 50))"));
    }
    let port = setup.health_port;
    let mut last = None;
    let paused = eventually(Duration::from_secs(20), || {
        last = get(port, "/ready");
        last.as_ref()
            .is_some_and(|(code, body)| *code == 503 && body.contains("source paused"))
    });
    assert!(paused, "{last:?}\n{}", agent.log());
    assert!(agent.log().contains("capture paused"), "{}", agent.log());
    // Paused: the log stops growing although WAL keeps coming.
    let (_, status) = get(port, "/status").unwrap();
    let held: serde_json::Value = serde_json::from_str(&status).unwrap();
    let position = held["log"]["durable_position"].as_u64().unwrap();
    source.psql(
        &db,
        "INSERT INTO t SELECT g, 'y' FROM generate_series(1000, 1100) g",
    );
    std::thread::sleep(Duration::from_secs(2));
    let (_, status) = get(port, "/status").unwrap();
    let later: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(later["log"]["durable_position"].as_u64().unwrap(), position);

    target.start_again();
    let want = source.dump(&db, "public.t", "*");
    let caught_up = eventually(Duration::from_secs(90), || {
        target.dump(&warehouse, "replica.t", "*") == want
    });
    assert!(caught_up, "{}", agent.log());
    assert!(
        eventually(Duration::from_secs(30), || get(port, "/ready")
            .is_some_and(|(code, _)| code == 200)),
        "{:?}\n{}",
        get(port, "/ready"),
        agent.log()
    );
    assert!(agent.log().contains("capture goes on"), "{}", agent.log());
    assert!(agent.terminate().success());
}

#[test]
fn a_snapshot_pauses_while_the_log_is_full_and_completes() {
    let pg = PgCluster::start();
    // The sink is held back until the snapshot has filled the log: it cannot catch up, so
    // the snapshot must pause midway.
    let (db, warehouse, locks, setup) = held_back_snapshot(&pg);
    let mut agent = setup.start();
    let snapshot = || {
        get(setup.health_port, "/status")
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .map(|status| status["source"]["snapshot"].clone())
            .unwrap_or_default()
    };
    let running = eventually(Duration::from_secs(60), || {
        let snapshot = snapshot();
        snapshot["state"] == "running" && snapshot["tables"]["public.t"]["rows"].as_u64() > Some(0)
    });
    assert!(running, "{}\n{}", snapshot(), agent.log());
    agent.wait_log("capture paused", Duration::from_secs(60));
    locks.release();
    let want = pg.dump(&db, "public.t", "*");
    let copied = eventually(Duration::from_secs(120), || {
        pg.dump(&warehouse, "replica.t", "*") == want
    });
    assert!(copied, "{}", agent.log());
    let done = snapshot();
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["rows"], 120_000, "{done}");
    assert_eq!(done["tables"]["public.t"]["rows"], 120_000, "{done}");
    // Paused between the snapshot's transactions (50,000 rows each), not only afterwards.
    let log = agent.log();
    let paused = log.find("capture paused").expect("paused");
    let done = log.find("snapshot done rows=120000").expect("done");
    assert!(paused < done, "{log}");
    assert!(agent.terminate().success());
}
