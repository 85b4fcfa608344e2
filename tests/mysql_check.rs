#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `tidemark check` and `tidemark run` against MariaDB servers set up wrong, one way each: the
//! binary log off, in STATEMENT format or with MINIMAL row images, a user without the
//! replication privileges, a captured table without a primary key, a binlog purged after an
//! hour. Each FAIL or warn line names the problem and the statement that fixes it; where the
//! statement can be run against a live server, the test runs exactly the printed statement and
//! the next `check` passes, so a fix that does not fix is caught. `run` refuses the same setups
//! with exit code 2 (the operator's setup at fault) before it writes anything.

mod common;

use std::process::Output;
use std::time::Duration;

use common::agent::{eventually, mirror_sink, AgentSetup};
use common::mariadb::MariaDb;
use common::PgCluster;

/// How long the agent may take to snapshot and stream a handful of rows.
const WAIT: Duration = Duration::from_secs(90);

const JSONL_SINK: &str = "[[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n";

/// `[source]` keys capturing `tables` (a TOML array body) of `db` at `url`.
fn mysql_source(url: &str, tables: &str, snapshot: &str) -> String {
    format!(
        "type = \"mysql\"\nurl = \"{url}\"\ntables = [{tables}]\nsnapshot = \"{snapshot}\"\n\
         connect_timeout = \"20s\"\n"
    )
}

/// An agent capturing `db.t` as the harness's all-privileges `tidemark` user, into JSONL.
fn jsonl_agent(my: &MariaDb, db: &str, table: &str) -> AgentSetup {
    AgentSetup::with_source(
        &mysql_source(&my.url(db), &format!("\"{db}.{table}\""), "never"),
        JSONL_SINK,
    )
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `check`'s lines (stdout), after asserting its exit code and that nothing panicked.
fn check_lines(setup: &AgentSetup, code: i32) -> Vec<String> {
    let output = setup.command("check");
    let all = text(&output);
    assert_eq!(
        output.status.code(),
        Some(code),
        "check's exit code:\n{all}"
    );
    assert!(!all.contains("panicked"), "check panicked:\n{all}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The one line about `subject`, e.g. `FAIL  binlog: …`; panics with every line when there is
/// none or more than one.
fn line<'a>(lines: &'a [String], subject: &str) -> &'a str {
    // Every line is a status padded to six characters, the subject, a colon.
    let prefix = format!("{subject}: ");
    let matching: Vec<&String> = lines
        .iter()
        .filter(|l| l.get(6..).is_some_and(|rest| rest.starts_with(&prefix)))
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "expected one line about {subject:?}:\n{}",
        lines.join("\n")
    );
    matching[0]
}

/// Asserts the line about `subject` has `status` (`ok`, `warn`, `FAIL`) and says each of
/// `expect`, and that every other line is ok.
fn assert_only(lines: &[String], subject: &str, status: &str, expect: &[&str]) {
    let found = line(lines, subject);
    assert!(
        found.starts_with(&format!("{status:<6}{subject}: ")),
        "expected {status} for {subject}:\n{}",
        lines.join("\n")
    );
    for needle in expect {
        assert!(
            found.contains(needle),
            "the {subject} line does not say {needle:?}:\n{found}"
        );
    }
    for other in lines.iter().filter(|l| l.as_str() != found) {
        assert!(
            other.starts_with("ok    "),
            "only {subject} should be wrong, but:\n{}",
            lines.join("\n")
        );
    }
}

fn assert_all_ok(lines: &[String]) {
    assert!(
        !lines.is_empty() && lines.iter().all(|l| l.starts_with("ok    ")),
        "expected every check ok:\n{}",
        lines.join("\n")
    );
}

/// `run` stops at once with exit code 2 and an error saying each of `expect`.
fn assert_run_refused(setup: &AgentSetup, expect: &[&str]) {
    let output = setup.command("run");
    let all = text(&output);
    assert_eq!(output.status.code(), Some(2), "run's exit code:\n{all}");
    assert!(!all.contains("panicked"), "run panicked:\n{all}");
    for needle in expect {
        assert!(
            all.contains(needle),
            "run's error does not say {needle:?}:\n{all}"
        );
    }
}

#[test]
fn good_setup_with_least_privileged_user_passes_every_check() {
    let my = MariaDb::start();
    let db = my.fresh_database("good");
    my.exec(&db, "CREATE TABLE t (id INT PRIMARY KEY, v TEXT)");
    // The privileges the README lists, and no more.
    my.exec(
        "",
        &format!(
            "CREATE USER 'capture'@'%' IDENTIFIED BY 'pw';
             GRANT REPLICATION SLAVE, REPLICATION CLIENT, RELOAD ON *.* TO 'capture'@'%';
             GRANT SELECT ON `{db}`.* TO 'capture'@'%';"
        ),
    );
    let pg = PgCluster::start();
    let warehouse = pg.fresh_database("warehouse");
    let setup = AgentSetup::with_source(
        &mysql_source(
            &my.url_as("capture", "pw", &db),
            &format!("\"{db}.t\""),
            "initial",
        ),
        &format!("{}\n{JSONL_SINK}", mirror_sink(&pg.url(&warehouse))),
    );
    let lines = check_lines(&setup, 0);
    assert_all_ok(&lines);
    for (subject, says) in [
        (
            "binlog",
            "log_bin = ON, binlog_format = ROW, binlog_row_image = FULL",
        ),
        (
            "privileges",
            "REPLICATION SLAVE, REPLICATION CLIENT, RELOAD",
        ),
        ("source.tables", &format!("{db}.t")),
        ("primary keys", "every table has one"),
    ] {
        let found = line(&lines, subject);
        assert!(found.contains(says), "{found}");
    }
    line(&lines, "binlog retention");
    line(&lines, "sink \"mirror\"");
    line(&lines, "sink \"events\"");
}

#[test]
fn statement_binlog_format_fails_check_and_run_with_the_fix() {
    let my = MariaDb::start_with(&[("binlog_format", "STATEMENT")]);
    let db = my.fresh_database("stmt");
    my.exec(&db, "CREATE TABLE t (id INT PRIMARY KEY)");
    let setup = jsonl_agent(&my, &db, "t");
    let fix = "SET GLOBAL binlog_format = 'ROW'";
    let lines = check_lines(&setup, 2);
    assert_only(
        &lines,
        "binlog",
        "FAIL",
        &["binlog_format is STATEMENT", "needs ROW", fix],
    );
    assert_run_refused(&setup, &["binlog_format is STATEMENT", fix]);

    // The printed statement is the fix: new sessions see ROW.
    my.exec("", fix);
    assert_all_ok(&check_lines(&setup, 0));
}

#[test]
fn minimal_row_image_fails_check_and_run_with_the_fix() {
    let my = MariaDb::start_with(&[("binlog_row_image", "MINIMAL")]);
    let db = my.fresh_database("minimal");
    my.exec(&db, "CREATE TABLE t (id INT PRIMARY KEY)");
    let setup = jsonl_agent(&my, &db, "t");
    let fix = "SET GLOBAL binlog_row_image = 'FULL'";
    let lines = check_lines(&setup, 2);
    assert_only(
        &lines,
        "binlog",
        "FAIL",
        &["binlog_row_image is MINIMAL", "needs FULL", fix],
    );
    assert_run_refused(&setup, &["binlog_row_image is MINIMAL", fix]);

    my.exec("", fix);
    assert_all_ok(&check_lines(&setup, 0));
}

#[test]
fn binary_log_off_fails_check_and_run_with_the_server_option() {
    let my = MariaDb::start_with(&[("skip-log-bin", "")]);
    let db = my.fresh_database("nobinlog");
    my.exec(&db, "CREATE TABLE t (id INT PRIMARY KEY)");
    let setup = jsonl_agent(&my, &db, "t");
    let lines = check_lines(&setup, 2);
    assert_only(
        &lines,
        "binlog",
        "FAIL",
        &["the binary log is off", "start the server with --log-bin"],
    );
    assert_run_refused(
        &setup,
        &["the binary log is off", "start the server with --log-bin"],
    );
}

#[test]
fn user_without_replication_privileges_fails_with_the_grant() {
    let my = MariaDb::start();
    let db = my.fresh_database("grants");
    my.exec(&db, "CREATE TABLE t (id INT PRIMARY KEY)");
    // A host other than '%', so a GRANT naming the wrong account would fail to run below.
    my.exec(
        "",
        &format!(
            "CREATE USER 'reader'@'127.0.0.1' IDENTIFIED BY 'pw';
             GRANT SELECT ON `{db}`.* TO 'reader'@'127.0.0.1';"
        ),
    );
    let setup = AgentSetup::with_source(
        &mysql_source(
            &my.url_as("reader", "pw", &db),
            &format!("\"{db}.t\""),
            "never",
        ),
        JSONL_SINK,
    );
    let grant = "GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'reader'@'127.0.0.1'";
    let lines = check_lines(&setup, 2);
    assert_only(
        &lines,
        "privileges",
        "FAIL",
        &["REPLICATION SLAVE and REPLICATION CLIENT", grant],
    );
    assert_run_refused(&setup, &["REPLICATION SLAVE", grant]);

    my.exec("", grant);
    assert_all_ok(&check_lines(&setup, 0));
}

#[test]
fn replication_slave_admin_is_not_taken_for_replication_slave() {
    // MariaDB's REPLICATION SLAVE ADMIN (start and stop replicas) does not allow reading the
    // binlog; its name contains REPLICATION SLAVE's.
    let my = MariaDb::start();
    let db = my.fresh_database("admin");
    my.exec(&db, "CREATE TABLE t (id INT PRIMARY KEY)");
    my.exec(
        "",
        &format!(
            "CREATE USER 'admin'@'%' IDENTIFIED BY 'pw';
             GRANT REPLICATION SLAVE ADMIN, BINLOG MONITOR ON *.* TO 'admin'@'%';
             GRANT SELECT ON `{db}`.* TO 'admin'@'%';"
        ),
    );
    let setup = AgentSetup::with_source(
        &mysql_source(
            &my.url_as("admin", "pw", &db),
            &format!("\"{db}.t\""),
            "never",
        ),
        JSONL_SINK,
    );
    let lines = check_lines(&setup, 2);
    let found = line(&lines, "privileges");
    assert!(
        found.starts_with("FAIL  privileges: the user lacks REPLICATION SLAVE:"),
        "{}",
        lines.join("\n")
    );
    let grant = "GRANT REPLICATION SLAVE ON *.* TO 'admin'@'%'";
    assert!(found.contains(grant), "{found}");
    assert_run_refused(&setup, &["the user lacks REPLICATION SLAVE", grant]);
}

#[test]
fn table_without_primary_key_fails_with_a_table_sink_and_warns_with_jsonl_only() {
    let my = MariaDb::start();
    let db = my.fresh_database("nopk");
    my.exec(&db, "CREATE TABLE loose (id INT NOT NULL, note TEXT)");
    let pg = PgCluster::start();
    let warehouse = pg.fresh_database("warehouse");
    let source = mysql_source(&my.url(&db), &format!("\"{db}.loose\""), "never");
    let with_table_sink = AgentSetup::with_source(&source, &mirror_sink(&pg.url(&warehouse)));
    let alter = format!("ALTER TABLE `{db}`.`loose` ADD PRIMARY KEY (…)");
    let lines = check_lines(&with_table_sink, 2);
    assert_only(
        &lines,
        "primary keys",
        "FAIL",
        &[&format!("{db}.loose without a primary key"), &alter],
    );
    assert_run_refused(
        &with_table_sink,
        &[&format!("{db}.loose has no primary key"), "ADD PRIMARY KEY"],
    );

    // Envelopes carry whole rows: an append-only JSONL sink needs no key.
    let jsonl_only = AgentSetup::with_source(&source, JSONL_SINK);
    let lines = check_lines(&jsonl_only, 0);
    assert_only(
        &lines,
        "primary keys",
        "warn",
        &[
            &format!("{db}.loose without a primary key"),
            "fine for append sinks",
        ],
    );

    // The printed statement with the key's column filled in.
    my.exec(&db, &alter.replace('…', "id"));
    assert_all_ok(&check_lines(&with_table_sink, 0));
}

#[test]
fn short_binlog_retention_warns_with_the_setting() {
    let my = MariaDb::start_with(&[("binlog_expire_logs_seconds", "3600")]);
    let db = my.fresh_database("retention");
    my.exec(&db, "CREATE TABLE t (id INT PRIMARY KEY)");
    let setup = jsonl_agent(&my, &db, "t");
    let fix = "SET GLOBAL binlog_expire_logs_seconds = 604800";
    // A warning, not a failure: the agent runs, but an outage longer than an hour loses its
    // place.
    let lines = check_lines(&setup, 0);
    assert_only(
        &lines,
        "binlog retention",
        "warn",
        &[
            "purges its binlog after 3600 s",
            fix,
            // SET GLOBAL is forgotten at the server's restart.
            "binlog_expire_logs_seconds = 604800 in the server's config",
        ],
    );

    // The older setting, in days, is read as well (MariaDB keeps the two in step).
    my.exec("", "SET GLOBAL expire_logs_days = 0.5");
    let lines = check_lines(&setup, 0);
    assert_only(
        &lines,
        "binlog retention",
        "warn",
        &["purges its binlog after 43200 s", fix],
    );

    my.exec("", fix);
    let lines = check_lines(&setup, 0);
    assert_all_ok(&lines);
    assert!(
        line(&lines, "binlog retention").ends_with(": 604800 s"),
        "{}",
        lines.join("\n")
    );
}

#[test]
fn run_refused_for_statement_binlog_writes_nothing_and_a_fixed_server_is_captured_whole() {
    let my = MariaDb::start_with(&[("binlog_format", "STATEMENT")]);
    let db = my.fresh_database("refused");
    my.exec(
        &db,
        "CREATE TABLE t (id INT PRIMARY KEY, v TEXT);
         INSERT INTO t VALUES (1, 'one'), (2, 'two');",
    );
    let setup = AgentSetup::with_source(
        &mysql_source(&my.url(&db), &format!("\"{db}.t\""), "initial"),
        JSONL_SINK,
    );
    let fix = "SET GLOBAL binlog_format = 'ROW'";
    assert_run_refused(&setup, &["binlog_format is STATEMENT", fix]);
    assert!(
        setup.envelopes().is_empty(),
        "a refused start wrote envelopes: {:?}",
        setup.envelopes()
    );

    // A write while the agent is down, and the server fixed: the next start has lost nothing
    // to the refused one (no snapshot marked done, no position taken), so the snapshot holds
    // every row and the binlog what follows.
    my.exec(&db, "INSERT INTO t VALUES (3, 'three')");
    my.exec("", fix);
    let mut agent = setup.start();
    agent.wait_log("streaming the binlog", WAIT);
    my.exec(&db, "INSERT INTO t VALUES (4, 'four')");
    let seen = |setup: &AgentSetup| -> Vec<(String, i64)> {
        setup
            .envelopes()
            .iter()
            .map(|e| {
                (
                    e["op"].as_str().unwrap().to_owned(),
                    e["after"]["id"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let expected: Vec<(String, i64)> = vec![
        ("r".into(), 1),
        ("r".into(), 2),
        ("r".into(), 3),
        ("c".into(), 4),
    ];
    assert!(
        eventually(WAIT, || seen(&setup).len() >= expected.len()),
        "envelopes: {:?}\n{}",
        seen(&setup),
        agent.log()
    );
    assert_eq!(seen(&setup), expected, "{}", agent.log());
}

#[test]
fn minimal_row_metadata_warns_with_the_setting() {
    let my = MariaDb::start_with(&[("binlog_row_metadata", "MINIMAL")]);
    let db = my.fresh_database("metadata");
    my.exec(&db, "CREATE TABLE t (id INT PRIMARY KEY)");
    let setup = jsonl_agent(&my, &db, "t");
    // A warning: the agent runs, but rows it reads behind a later ALTER TABLE stop it.
    let lines = check_lines(&setup, 0);
    assert_only(
        &lines,
        "binlog_row_metadata",
        "warn",
        &["MINIMAL", "SET GLOBAL binlog_row_metadata = 'FULL'"],
    );
    my.exec("", "SET GLOBAL binlog_row_metadata = 'FULL'");
    assert_all_ok(&check_lines(&setup, 0));
}
