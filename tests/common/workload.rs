//! A reproducible random workload over three tables (a simple key, a composite key, a TOASTed
//! text column), with multi-statement transactions, rollbacks and key updates.

#![allow(clippy::unwrap_used)]

use rand::Rng;

/// The workload's tables.
pub const SCHEMA: &str =
    "CREATE TABLE accounts (id int PRIMARY KEY, balance numeric(20,2) NOT NULL, note text);
     CREATE TABLE lines (a int, b text, qty int NOT NULL, PRIMARY KEY (a, b));
     CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL, rev int NOT NULL);
     ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
";

/// The workload's tables with the columns to compare, ordered by key.
pub const TABLES: &[(&str, &str)] = &[
    ("accounts", "id, balance, note"),
    ("lines", "a, b, qty"),
    ("docs", "id, rev, md5(body)"),
];

pub async fn random_transaction(client: &tokio_postgres::Client, rng: &mut rand::rngs::StdRng) {
    let statements = rng.gen_range(1..=6);
    let mut sql = String::from("BEGIN;");
    for _ in 0..statements {
        let id = rng.gen_range(1..=60);
        let a = rng.gen_range(1..=8);
        let b = ["x", "y", "z"][rng.gen_range(0..3)];
        sql.push_str(&match rng.gen_range(0..10) {
            0 | 1 => format!(
                "INSERT INTO accounts VALUES ({id}, {}.{:02}, {}) ON CONFLICT (id) DO UPDATE SET balance = EXCLUDED.balance;",
                rng.gen_range(0..10_000),
                rng.gen_range(0..100),
                if rng.gen_bool(0.3) { "NULL".to_string() } else { format!("'n{}'", rng.gen_range(0..100)) }
            ),
            2 => format!("DELETE FROM accounts WHERE id = {id};"),
            3 => format!(
                "UPDATE accounts SET id = {} WHERE id = {id} AND NOT EXISTS (SELECT 1 FROM accounts WHERE id = {});",
                id + 100,
                id + 100
            ),
            4 | 5 => format!(
                "INSERT INTO lines VALUES ({a}, '{b}', {}) ON CONFLICT (a, b) DO UPDATE SET qty = lines.qty + 1;",
                rng.gen_range(0..50)
            ),
            6 => format!("DELETE FROM lines WHERE a = {a} AND b = '{b}';"),
            7 => format!(
                "INSERT INTO docs VALUES ({id}, repeat(md5('{}'), 300), 0) ON CONFLICT (id) DO UPDATE SET rev = docs.rev + 1;",
                rng.gen::<u32>()
            ),
            8 => format!("UPDATE docs SET rev = rev + 1 WHERE id = {id};"),
            _ => format!("UPDATE accounts SET note = 'u{}' WHERE id = {id};", rng.gen_range(0..100)),
        });
    }
    sql.push_str(if rng.gen_bool(0.1) {
        "ROLLBACK;"
    } else {
        "COMMIT;"
    });
    client.batch_execute(&sql).await.unwrap();
}

/// One transaction of `statements` single-row changes (a large transaction).
pub async fn large_transaction(
    client: &tokio_postgres::Client,
    rng: &mut rand::rngs::StdRng,
    statements: usize,
) {
    let mut sql = String::from("BEGIN;");
    for _ in 0..statements {
        let id = rng.gen_range(1..=60);
        sql.push_str(&match rng.gen_range(0..3) {
            0 => format!("UPDATE accounts SET balance = balance + 1 WHERE id = {id};"),
            1 => format!(
                "INSERT INTO lines VALUES ({}, 'big', 1) ON CONFLICT (a, b) DO UPDATE SET qty = lines.qty + 1;",
                rng.gen_range(1..=8)
            ),
            _ => format!("UPDATE docs SET rev = rev + 1 WHERE id = {id};"),
        });
    }
    sql.push_str("COMMIT;");
    client.batch_execute(&sql).await.unwrap();
}
