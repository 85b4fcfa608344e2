//! The test harness against a real server: the cluster starts with the settings the agent
//! needs, hands out databases, applies extra settings, and keeps data across restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

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
