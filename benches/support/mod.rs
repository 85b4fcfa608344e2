//! What the benchmarks share: their settings from the environment, the statistics they
//! print (median, min and max over the rounds), and the pieces of their seeded workloads.

// Each bench compiles this module on its own and uses part of it.
#![allow(dead_code)]

pub mod orders_backlog;

use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `cargo bench` passes `--bench`; `cargo test` and nextest build and list benches too, and
/// a benchmark is not a test.
pub fn is_bench_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The environment variable `name` as a count, `default` when unset or unreadable.
pub fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Rates of `count` items over each run's seconds: median, min, max.
pub fn rates(count: usize, seconds: &[f64]) -> (f64, f64, f64) {
    let rates: Vec<f64> = seconds.iter().map(|s| count as f64 / s).collect();
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rates.iter().copied().fold(0.0, f64::max);
    (median(rates), min, max)
}

/// One persistent connection to a database, for cheap polling from a bench's thread.
pub struct Probe<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl<'a> Probe<'a> {
    pub fn new(
        rt: &'a tokio::runtime::Runtime,
        pg: &crate::common::PgCluster,
        db: &str,
    ) -> Probe<'a> {
        Probe {
            rt,
            client: rt.block_on(pg.connect(db)),
        }
    }

    /// The first column of the first row as text; None when the query fails or has no row.
    pub fn text(&self, sql: &str) -> Option<String> {
        self.rt
            .block_on(self.client.query_opt(sql, &[]))
            .ok()
            .flatten()
            .and_then(|row| row.get::<_, Option<String>>(0))
    }
}

/// The statuses a workload's updates move an order through (inserted orders are `'new'`).
pub const STATUSES: &[&str] = &["paid", "packed", "shipped", "delivered", "returned"];

/// A SQL literal for a nullable text column: `NULL` one time in ten, otherwise a quoted
/// string of 10–89 lowercase letters and spaces (nothing to escape, in any SQL dialect).
pub fn text_literal(rng: &mut StdRng) -> String {
    if rng.gen_ratio(1, 10) {
        return "NULL".into();
    }
    let len = rng.gen_range(10..90);
    let text: String = (0..len)
        .map(|_| {
            let c = rng.gen_range(0..27u8);
            if c == 26 {
                ' '
            } else {
                char::from(b'a' + c)
            }
        })
        .collect();
    format!("'{text}'")
}

/// Rows per statement: three in four statements touch a handful of rows, one in four is bulk.
pub fn statement_rows(rng: &mut StdRng, bulk_max: usize) -> usize {
    if rng.gen_bool(0.75) {
        rng.gen_range(1..=5)
    } else {
        rng.gen_range(20..=bulk_max)
    }
}

/// Picks up to `n` distinct live keys, in ascending order.
pub fn pick_keys(rng: &mut StdRng, live: &[i64], n: usize) -> Vec<i64> {
    let mut keys: Vec<i64> = (0..n).map(|_| live[rng.gen_range(0..live.len())]).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// `1,2,3`: keys for a SQL `IN (…)` list.
pub fn key_list(keys: &[i64]) -> String {
    let mut out = String::new();
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write!(out, "{key}").expect("writing to a String");
    }
    out
}

/// A seeded mix of row changes into an `orders` table with an `id` key and `status` and
/// `note` columns: ~55 % inserts, ~35 % updates of live keys, ~10 % deletes, in
/// transactions of one to three statements, three in four of 1–5 rows, the rest of 20–200.
pub struct OrderWorkload {
    pub sql: String,
    pub transactions: usize,
    pub inserts: usize,
    pub updates: usize,
    pub deletes: usize,
    /// The keys that exist after it.
    pub live: Vec<i64>,
}

/// What a bench's `orders` table adds to the mix: each inserted row's values, and what an
/// update sets beside `status` and `note`.
pub trait OrderColumns {
    /// `(id, …)`.
    fn row(&self, rng: &mut StdRng, id: i64) -> String;
    /// `column = …, …`.
    fn update(&self, rng: &mut StdRng) -> String;
}

impl OrderWorkload {
    pub fn changes(&self) -> usize {
        self.inserts + self.updates + self.deletes
    }

    /// Changes into `table` until there are at least `target`; the same for the same seed.
    pub fn generate(seed: u64, table: &str, target: usize, columns: &impl OrderColumns) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut next_id: i64 = 1;
        let mut w = OrderWorkload {
            sql: String::new(),
            transactions: 0,
            inserts: 0,
            updates: 0,
            deletes: 0,
            live: Vec::new(),
        };
        while w.changes() < target {
            let statements = if rng.gen_ratio(1, 5) {
                rng.gen_range(2..=3)
            } else {
                1
            };
            w.sql.push_str("BEGIN;\n");
            for _ in 0..statements {
                let roll: f64 = rng.gen();
                if w.live.len() < 1000 || roll < 0.55 {
                    let n = statement_rows(&mut rng, 200);
                    write!(w.sql, "INSERT INTO {table} VALUES ").expect("writing to a String");
                    for i in 0..n {
                        if i > 0 {
                            w.sql.push(',');
                        }
                        w.sql.push_str(&columns.row(&mut rng, next_id));
                        w.live.push(next_id);
                        next_id += 1;
                    }
                    w.sql.push_str(";\n");
                    w.inserts += n;
                } else if roll < 0.90 {
                    let n = statement_rows(&mut rng, 200);
                    let keys = pick_keys(&mut rng, &w.live, n);
                    let status = STATUSES[rng.gen_range(0..STATUSES.len())];
                    let set_note = if rng.gen_bool(0.3) {
                        format!(", note = {}", text_literal(&mut rng))
                    } else {
                        String::new()
                    };
                    writeln!(
                        w.sql,
                        "UPDATE {table} SET status = '{status}', {}{set_note} WHERE id IN ({});",
                        columns.update(&mut rng),
                        key_list(&keys)
                    )
                    .expect("writing to a String");
                    w.updates += keys.len();
                } else {
                    let n = statement_rows(&mut rng, 60);
                    let keys = pick_keys(&mut rng, &w.live, n);
                    writeln!(
                        w.sql,
                        "DELETE FROM {table} WHERE id IN ({});",
                        key_list(&keys)
                    )
                    .expect("writing to a String");
                    w.live.retain(|k| keys.binary_search(k).is_err());
                    w.deletes += keys.len();
                }
            }
            w.sql.push_str("COMMIT;\n");
            w.transactions += 1;
        }
        w
    }
}
