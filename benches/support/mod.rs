//! What the benchmarks share: their settings from the environment, and the statistics they
//! print (median, min and max over the rounds).

// Each bench compiles this module on its own and uses part of it.
#![allow(dead_code)]

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
