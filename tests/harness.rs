//! The test harness against real servers: a PostgreSQL cluster or a MariaDB server starts
//! with the settings the agent needs, hands out databases, applies extra settings, and keeps
//! data across restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::mariadb::MariaDb;
use common::PgCluster;

#[test]
fn cluster_starts_with_logical_wal_level_and_private_socket() {
    let cluster = PgCluster::start();

    assert_eq!(
        cluster.psql("postgres", "SELECT current_setting('wal_level')"),
        "logical"
    );
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT current_setting('max_replication_slots'), current_setting('max_wal_senders'), \
             current_setting('fsync'), current_setting('port')"
        ),
        format!("20|20|off|{}", cluster.port())
    );
    assert!(
        cluster
            .socket_dir()
            .join(format!(".s.PGSQL.{}", cluster.port()))
            .exists(),
        "no Unix socket in {}",
        cluster.socket_dir().display()
    );
    assert!(cluster.bindir().join("initdb").is_file());
}

#[test]
fn extra_settings_override_the_defaults() {
    let cluster = PgCluster::start_with(&[("wal_level", "replica"), ("max_connections", "42")]);

    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT current_setting('wal_level'), current_setting('max_connections')"
        ),
        "replica|42"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fresh_databases_are_distinct_and_accept_connections() -> Result<(), tokio_postgres::Error>
{
    let cluster = PgCluster::start();
    let first = cluster.fresh_database("Harness Test");
    let second = cluster.fresh_database("Harness Test");
    assert_ne!(first, second);

    let client = cluster.connect(&first).await;
    let row = client.query_one("SELECT current_database()", &[]).await?;
    assert_eq!(row.get::<_, String>(0), first);
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);
             INSERT INTO items VALUES (1, 'one'), (2, 'two');",
        )
        .await?;
    let rows: Vec<(i32, String)> = client
        .query("SELECT id, name FROM items ORDER BY id", &[])
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(rows, vec![(1, "one".to_string()), (2, "two".to_string())]);
    assert_eq!(
        cluster.psql(
            &second,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'items'"
        ),
        "0"
    );

    // A role whose name and password need percent-encoding in the URL.
    let password = "p@ss:w/rd %?";
    cluster.psql(
        &first,
        &format!("CREATE ROLE \"Odd User\" LOGIN PASSWORD '{password}'"),
    );
    let odd = cluster.connect_as("Odd User", password, &first).await;
    let row = odd.query_one("SELECT current_user", &[]).await?;
    assert_eq!(row.get::<_, String>(0), "Odd User");
    Ok(())
}

#[test]
fn restart_and_stop_keep_committed_rows() {
    let cluster = PgCluster::start();
    let db = cluster.fresh_database("restart");
    cluster.psql(
        &db,
        "CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items SELECT generate_series(1, 3);",
    );

    cluster.restart();
    assert_eq!(
        cluster.psql(&db, "SELECT id FROM items ORDER BY id"),
        "1\n2\n3"
    );

    cluster.psql(&db, "INSERT INTO items VALUES (4)");
    cluster.stop_immediate();
    cluster.start_again();
    assert_eq!(
        cluster.psql(&db, "SELECT id FROM items ORDER BY id"),
        "1\n2\n3\n4"
    );
    assert!(cluster
        .server_log()
        .contains("database system was interrupted"));

    cluster.stop();
    cluster.start_again();
    assert_eq!(cluster.psql(&db, "SELECT count(*) FROM items"), "4");
}

/// `SHOW VARIABLES LIKE 'name'`'s value.
fn mariadb_variable(server: &MariaDb, name: &str) -> String {
    let row = server.query("", &format!("SHOW VARIABLES LIKE '{name}'"));
    match row.split_once('\t') {
        Some((variable, value)) if variable == name => value.to_string(),
        _ => panic!("no variable {name:?} in SHOW VARIABLES: {row:?}"),
    }
}

#[test]
fn mariadb_starts_with_row_binlog_full_row_image_and_tcp_account() {
    let server = MariaDb::start();

    for (name, value) in [
        ("log_bin", "ON"),
        ("binlog_format", "ROW"),
        ("binlog_row_image", "FULL"),
        ("binlog_row_metadata", "FULL"),
        ("bind_address", "127.0.0.1"),
        ("character_set_server", "utf8mb4"),
    ] {
        assert_eq!(mariadb_variable(&server, name), value, "{name}");
    }
    assert_eq!(mariadb_variable(&server, "port"), server.port().to_string());
    assert_eq!(
        mariadb_variable(&server, "server_id"),
        server.server_id().to_string()
    );
    assert_eq!(
        mariadb_variable(&server, "log_bin_basename"),
        server.binlog_dir().join("binlog").display().to_string()
    );
    assert!(server.binlog_dir().join("binlog.000001").is_file());
    assert!(server.datadir().join("mysql").is_dir());
    assert!(server.server_log().contains("ready for connections"));

    // The agent's account works over TCP, with the replication privileges.
    assert_eq!(
        server.url("some_db"),
        format!(
            "mysql://tidemark:tidemark@127.0.0.1:{}/some_db",
            server.port()
        )
    );
    let output = Command::new(server.client_program())
        .arg("--no-defaults")
        .args(["--protocol=TCP", "--host=127.0.0.1"])
        .arg(format!("--port={}", server.port()))
        .args(["--user=tidemark", "--password=tidemark", "--batch"])
        .arg("--skip-column-names")
        // SHOW MASTER STATUS needs REPLICATION CLIENT (BINLOG MONITOR).
        .arg("--execute=SELECT CURRENT_USER(); SHOW GRANTS; SHOW MASTER STATUS")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("tidemark@%\n"), "{stdout}");
    assert!(
        stdout.contains("GRANT ALL PRIVILEGES ON *.* TO `tidemark`@`%`")
            && stdout.contains("WITH GRANT OPTION"),
        "{stdout}"
    );
    assert!(stdout.contains("\nbinlog.000001\t"), "{stdout}");
    // The harness's own setup is not in the binary log: a reader starts from the test's
    // first statement.
    let events = server.query("", "SHOW BINLOG EVENTS");
    assert!(!events.contains("tidemark"), "{events}");
}

#[test]
fn mariadb_exec_and_query_round_trip() {
    let server = MariaDb::start();
    let db = server.fresh_database("Round Trip");
    let other = server.fresh_database("Round Trip");
    assert_ne!(db, other);

    server.exec(
        &db,
        "CREATE TABLE items (id int PRIMARY KEY, name varchar(40));
         INSERT INTO items VALUES (1, 'one'), (2, 'tab\there'), (3, NULL);",
    );
    assert_eq!(
        server.query(&db, "SELECT id, name FROM items ORDER BY id"),
        "1\tone\n2\ttab\\there\n3\tNULL"
    );
    assert_eq!(server.query(&db, "SELECT DATABASE()"), db);
    assert_eq!(
        server.query(
            "",
            &format!(
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = '{other}' AND table_name = 'items'"
            )
        ),
        "0"
    );

    let error = server
        .try_exec(&db, "INSERT INTO items VALUES (1, 'again')")
        .unwrap_err();
    assert!(error.contains("Duplicate entry '1'"), "{error}");
    assert_eq!(
        server.try_exec(&db, "DELETE FROM items WHERE id = 3"),
        Ok(())
    );
    assert_eq!(server.query(&db, "SELECT COUNT(*) FROM items"), "2");
}

#[test]
fn mariadb_dump_matches_postgres_dump_of_the_same_rows() {
    let mariadb = MariaDb::start();
    let cluster = PgCluster::start();
    let my_db = mariadb.fresh_database("dump");
    let pg_db = cluster.fresh_database("dump");
    // Upper case sorts before lower case in bytes (PostgreSQL's C collation), after it in
    // MariaDB's utf8mb4_general_ci; NULLs sort last in PostgreSQL, first in MariaDB. The
    // literals hold a tab, a newline and a carriage return as they are; MariaDB reads `\\`
    // in a literal as one backslash, PostgreSQL reads it as two.
    let rows = "(1, 'a', 1.50), (2, 'B', NULL), (3, NULL, -2.00), (4, 'tab\there', 10.00), \
                (5, 'line\nbreak\r', 9.25), (6, 'back\\\\slash', 0.00), (7, 'ü', 3.00), \
                (8, '', 3.00)";
    mariadb.exec(
        &my_db,
        &format!(
            "CREATE TABLE items (id int PRIMARY KEY, name varchar(40), price decimal(10,2));
             INSERT INTO items VALUES {rows};"
        ),
    );
    cluster.psql(
        &pg_db,
        &format!(
            "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2));
             INSERT INTO items VALUES {};",
            rows.replace(r"\\", r"\")
        ),
    );

    for columns in ["id, name, price", "name, id", "price, id, name"] {
        let expected = cluster.dump(&pg_db, "items", columns);
        assert_eq!(expected.lines().count(), 8, "{expected}");
        assert_eq!(
            mariadb.dump(&my_db, "items", columns),
            expected,
            "{columns}"
        );
    }
    assert_eq!(mariadb.dump(&my_db, "missing", "id"), "");
}

#[test]
fn mariadb_extra_options_override_the_defaults() {
    let server = MariaDb::start_with(&[("binlog_row_image", "MINIMAL"), ("max_connections", "42")]);

    assert_eq!(mariadb_variable(&server, "binlog_row_image"), "MINIMAL");
    assert_eq!(mariadb_variable(&server, "max_connections"), "42");
    assert_eq!(mariadb_variable(&server, "binlog_format"), "ROW");
}

#[test]
fn two_mariadb_servers_run_side_by_side() {
    let first = MariaDb::start();
    let second = MariaDb::start();

    assert_ne!(first.port(), second.port());
    assert_ne!(first.server_id(), second.server_id());
    first.create_database("shared_name");
    second.create_database("shared_name");
    first.exec(
        "shared_name",
        "CREATE TABLE t (id int); INSERT INTO t VALUES (1);",
    );
    second.exec(
        "shared_name",
        "CREATE TABLE t (id int); INSERT INTO t VALUES (2), (3);",
    );
    assert_eq!(first.query("shared_name", "SELECT id FROM t"), "1");
    assert_eq!(
        second.query("shared_name", "SELECT id FROM t ORDER BY id"),
        "2\n3"
    );
    assert_eq!(
        mariadb_variable(&second, "server_id"),
        second.server_id().to_string()
    );
}

#[test]
fn mariadb_start_again_keeps_data_after_stop_and_kill() {
    let server = MariaDb::start();
    let port = server.port();
    let db = server.fresh_database("restart");
    server.exec(
        &db,
        "CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items VALUES (1), (2), (3);",
    );

    server.stop();
    assert!(server.try_exec(&db, "SELECT 1").is_err());
    server.start_again();
    assert_eq!(server.port(), port);
    assert_eq!(mariadb_variable(&server, "port"), port.to_string());
    assert_eq!(
        server.query(&db, "SELECT id FROM items ORDER BY id"),
        "1\n2\n3"
    );

    // Committed just before SIGKILL: in the table after crash recovery as in the binlog.
    server.exec(&db, "INSERT INTO items VALUES (4)");
    server.kill();
    server.start_again();
    assert_eq!(
        server.query(&db, "SELECT id FROM items ORDER BY id"),
        "1\n2\n3\n4"
    );
    let binlogs = server.query("", "SHOW BINARY LOGS");
    assert_eq!(
        binlogs.lines().count(),
        3,
        "one binlog per start: {binlogs}"
    );
}

#[test]
fn dropping_mariadb_stops_the_server_and_removes_its_files() {
    let server = MariaDb::start();
    let datadir = server.datadir();
    let pid = server.query("", "SELECT @@pid_file");
    let pid = std::fs::read_to_string(pid).unwrap().trim().to_string();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

    drop(server);
    assert!(!datadir.exists(), "{} is left", datadir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "mariadbd {pid} is still running"
    );
}

#[test]
#[should_panic(expected = "unknown variable 'no-such-option=1'")]
fn mariadb_start_with_a_bad_option_panics_with_the_reason() {
    MariaDb::start_with(&[("no-such-option", "1")]);
}
