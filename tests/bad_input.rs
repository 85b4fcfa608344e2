//! Bad input gets one clear line that names the fix, a non-zero exit, no panic and no secret.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Output;

use common::agent::{run_tidemark, AgentSetup};
use common::PgCluster;

const SECRET: &str = "s3cr3t-Pa55";

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The failure is reported, nothing panicked, and the password never shows.
fn assert_clean_failure(output: &Output, code: i32, expect: &[&str]) {
    let text = format!("{}{}", stdout(output), stderr(output));
    assert_eq!(
        output.status.code(),
        Some(code),
        "exit code; output:\n{text}"
    );
    assert!(!text.contains("panicked"), "panic:\n{text}");
    assert!(!text.contains(SECRET), "secret printed:\n{text}");
    for needle in expect {
        assert!(text.contains(needle), "expected {needle:?} in:\n{text}");
    }
}

fn write_config(dir: &std::path::Path, source_url: &str) -> std::path::PathBuf {
    let path = dir.join("tidemark.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nname = \"bad\"\ndata_dir = \"data\"\nhealth_addr = \"127.0.0.1:{}\"\n\
             [source]\ntype = \"postgres\"\nurl = \"{source_url}\"\ntables = [\"public.t\"]\n\
             snapshot = \"never\"\nconnect_timeout = \"1s\"\n\
             [[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n",
            common::agent::free_port()
        ),
    )
    .unwrap();
    path
}

#[test]
fn unknown_config_key_names_file_line_and_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidemark.toml");
    std::fs::write(
        &path,
        "[agent]\nname = \"x\"\n[source]\ntype = \"postgres\"\nurl = \"postgres://u@h/db\"\n\
         tables = [\"public.t\"]\n[[sink]]\nname = \"e\"\ntype = \"jsonl\"\npath = \"e\"\n\
         batch_max_row = 5\n",
    )
    .unwrap();
    for subcommand in ["run", "check"] {
        let output = run_tidemark(subcommand, &path);
        assert_clean_failure(
            &output,
            2,
            &[
                "tidemark.toml:11:1",
                "batch_max_row",
                "did you mean \"batch_max_rows\"",
            ],
        );
    }
}

#[test]
fn missing_environment_variable_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "postgres://u:${TIDEMARK_TEST_UNSET_PASSWORD}@h/db",
    );
    let output = run_tidemark("run", &path);
    assert_clean_failure(&output, 2, &["TIDEMARK_TEST_UNSET_PASSWORD"]);
}

#[test]
fn unreachable_host_says_where_and_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::agent::free_port();
    let path = write_config(
        dir.path(),
        &format!("postgres://u:{SECRET}@127.0.0.1:{port}/db"),
    );
    let output = run_tidemark("run", &path);
    assert_clean_failure(
        &output,
        1,
        &[&format!("127.0.0.1:{port}"), "check the host and port"],
    );
    let output = run_tidemark("check", &path);
    assert_clean_failure(&output, 2, &["FAIL", "check the host and port"]);
}

#[test]
fn wrong_password_user_without_replication_and_wal_level_replica() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("auth");
    pg.psql(
        &db,
        &format!(
            "CREATE TABLE t (id int PRIMARY KEY);
             CREATE ROLE plain LOGIN PASSWORD '{SECRET}';
             GRANT SELECT ON t TO plain;
             ALTER SYSTEM SET password_encryption = 'scram-sha-256';"
        ),
    );
    // Password authentication for TCP connections, so a wrong password is refused.
    let hba = pg.data_dir().join("pg_hba.conf");
    let original = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all plain 127.0.0.1/32 scram-sha-256\nhost replication plain 127.0.0.1/32 scram-sha-256\n{original}"),
    )
    .unwrap();
    pg.psql(&db, "SELECT pg_reload_conf()");

    let dir = tempfile::tempdir().unwrap();
    let wrong = write_config(
        dir.path(),
        &format!(
            "postgres://plain:{SECRET}-wrong@127.0.0.1:{}/{db}",
            pg.port()
        ),
    );
    let output = run_tidemark("run", &wrong);
    assert_clean_failure(
        &output,
        2,
        &[
            "password authentication failed",
            "check the user and password",
        ],
    );

    let right = write_config(
        dir.path(),
        &format!("postgres://plain:{SECRET}@127.0.0.1:{}/{db}", pg.port()),
    );
    let output = run_tidemark("run", &right);
    assert_clean_failure(
        &output,
        2,
        &["REPLICATION", "ALTER ROLE \"plain\" REPLICATION"],
    );
    let output = run_tidemark("check", &right);
    assert_clean_failure(&output, 2, &["FAIL", "ALTER ROLE \"plain\" REPLICATION"]);
}

#[test]
fn wal_level_replica_is_refused_with_the_setting_to_change() {
    let pg = PgCluster::start_with(&[("wal_level", "replica")]);
    let db = pg.fresh_database("walrep");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY)");
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.t\"");
    let output = setup.command("run");
    assert_clean_failure(
        &output,
        2,
        &[
            "wal_level = replica",
            "ALTER SYSTEM SET wal_level = logical",
        ],
    );
    let output = setup.command("check");
    assert_clean_failure(&output, 2, &["FAIL", "wal_level = logical"]);
}

#[test]
fn table_without_primary_key_is_refused_with_the_fix() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("nopk");
    pg.psql(&db, "CREATE TABLE loose (id int, note text)");
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.loose\"");
    let output = setup.command("run");
    assert_clean_failure(
        &output,
        2,
        &["public.loose", "PRIMARY KEY", "REPLICA IDENTITY FULL"],
    );
}

#[test]
fn check_passes_on_a_good_setup() {
    let pg = PgCluster::start();
    let db = pg.fresh_database("good");
    pg.psql(&db, "CREATE TABLE t (id int PRIMARY KEY)");
    let setup = AgentSetup::jsonl(&pg.url(&db), "\"public.t\"");
    let output = setup.command("check");
    let text = stdout(&output);
    assert!(
        output.status.success(),
        "check failed:\n{text}{}",
        stderr(&output)
    );
    assert!(!text.contains("FAIL"), "{text}");
    assert!(text.contains("ok    source.tables: public.t"), "{text}");
}

#[test]
fn json_log_format_writes_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::agent::free_port();
    let path = write_config(
        dir.path(),
        &format!("postgres://u:{SECRET}@127.0.0.1:{port}/db"),
    );
    let output = std::process::Command::new(common::agent::binary())
        .args(["--log-format", "json", "run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr(&output);
    let json_lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        json_lines.iter().any(|l| l["level"] == "WARN"
            && l["fields"]["message"] == "source interrupted; reconnecting"),
        "{stderr}"
    );
    assert!(!stderr.contains(SECRET));
}

#[test]
fn check_names_a_missing_select_grant_a_foreign_publication_and_a_full_slot_table() {
    let pg = PgCluster::start_with(&[("max_replication_slots", "2")]);
    let db = pg.fresh_database("grants");
    pg.psql(
        &db,
        &format!(
            "CREATE TABLE t (id int PRIMARY KEY);
             CREATE ROLE reader LOGIN REPLICATION PASSWORD '{SECRET}';
             CREATE PUBLICATION tidemark_bad;"
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("postgres://reader:{SECRET}@127.0.0.1:{}/{db}", pg.port()),
    );
    let output = run_tidemark("check", &path);
    assert_clean_failure(
        &output,
        2,
        &[
            "FAIL  table privileges",
            "GRANT SELECT ON \"public\".\"t\" TO \"reader\";",
            "FAIL  publication",
            "ALTER PUBLICATION \"tidemark_bad\" ADD TABLE \"public\".\"t\";",
            "ok    replication headroom: 0 of 2 replication slots used",
        ],
    );

    // Every slot taken by others: the agent could not create its own.
    pg.psql(
        &db,
        "SELECT pg_create_logical_replication_slot('other_1', 'pgoutput'); \
         SELECT pg_create_logical_replication_slot('other_2', 'pgoutput');",
    );
    let output = run_tidemark("check", &path);
    assert_clean_failure(
        &output,
        2,
        &[
            "FAIL  replication headroom",
            "ALTER SYSTEM SET max_replication_slots = 3;",
        ],
    );
}
