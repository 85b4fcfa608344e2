//! The backlog `merge_apply` and `clickhouse_apply` record: a seeded workload on
//! `orders (id, customer, status, amount, note)`, the marker row last.

use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::Rng;

pub const TABLE_DDL: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, customer int NOT NULL, \
                             status text NOT NULL, amount numeric(12,2) NOT NULL, note text)";
/// The workload's last transaction inserts this key; once a target has it, it has everything
/// (every side applies whole transactions in commit order).
pub const MARKER_ID: i64 = 0;

/// The pre-recorded workload: one psql script, and what it does.
pub struct Workload {
    pub sql: String,
    pub transactions: usize,
    pub inserts: usize,
    pub updates: usize,
    pub deletes: usize,
    pub final_rows: usize,
}

impl Workload {
    pub fn changes(&self) -> usize {
        self.inserts + self.updates + self.deletes
    }
}

/// `orders (id, customer, status, amount, note)` as the workload fills it.
struct Orders;

impl super::OrderColumns for Orders {
    fn row(&self, rng: &mut StdRng, id: i64) -> String {
        let note = super::text_literal(rng);
        format!(
            "({id},{},'new',{}.{:02},{note})",
            rng.gen_range(1..50_000),
            rng.gen_range(1..5_000),
            rng.gen_range(0..100)
        )
    }

    fn update(&self, rng: &mut StdRng) -> String {
        format!(
            "amount = amount + {}.{:02}",
            rng.gen_range(0..20),
            rng.gen_range(0..100)
        )
    }
}

/// About `target` row changes (`super::OrderWorkload`), the last of them the marker row.
/// Seeded: the same every time.
pub fn workload(target: usize) -> Workload {
    let orders =
        super::OrderWorkload::generate(0x6d65_7267, "orders", target.saturating_sub(1), &Orders);
    let mut sql = orders.sql;
    writeln!(
        sql,
        "INSERT INTO orders VALUES ({MARKER_ID}, 0, 'end', 0, 'end of the workload');"
    )
    .unwrap();
    Workload {
        sql,
        transactions: orders.transactions + 1,
        inserts: orders.inserts + 1,
        updates: orders.updates,
        deletes: orders.deletes,
        final_rows: orders.live.len() + 1,
    }
}
