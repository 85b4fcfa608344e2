//! What the agent knows about itself while it runs: the Prometheus counters, gauges and
//! histograms of `/metrics`, and where the source and each sink stand for `/status` and
//! `/ready`. The source and the sink tasks update it; the HTTP endpoints only read it.
//!
//! The counters add up per sink: every change a sink has passed is either applied or
//! dead-lettered, so once the sinks have caught up, `captured = applied + dead_lettered` for
//! each sink and table (counted since the process started).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use serde::Serialize;

use crate::event::Position;

pub struct Telemetry {
    registry: Registry,
    captured: IntCounterVec,
    applied: IntCounterVec,
    dead_lettered: IntCounterVec,
    batch_rows: HistogramVec,
    batch_seconds: HistogramVec,
    lag_bytes: IntGaugeVec,
    lag_milliseconds: IntGaugeVec,
    log_bytes: IntGauge,
    slot_retained_bytes: IntGauge,
    reconnects: IntCounter,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    source: SourceStatus,
    sinks: BTreeMap<String, SinkStatus>,
}

/// The source as `/status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    pub connected: bool,
    /// The last WAL position received from the server.
    pub received_lsn: Option<String>,
    /// The end of the last transaction durably in the log.
    pub logged_lsn: Option<String>,
    /// The last position confirmed to the server.
    pub confirmed_lsn: Option<String>,
    /// WAL the slot keeps on the server (`pg_current_wal_lsn() - restart_lsn`).
    pub slot_retained_bytes: Option<i64>,
    pub last_error: Option<String>,
    /// Why the source stopped reading WAL (backpressure), while it has.
    pub paused: Option<String>,
    /// The initial snapshot, once one has started in this process.
    pub snapshot: Option<SnapshotStatus>,
}

/// The initial snapshot as `/status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotStatus {
    /// `running` or `done`.
    pub state: &'static str,
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_second: u64,
    /// `schema.table` → rows copied so far and the catalog's estimate.
    pub tables: BTreeMap<String, TableProgress>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TableProgress {
    pub rows: u64,
    pub estimated: u64,
}

/// One sink as `/status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkStatus {
    /// Whether the sink applied its last batch (false while it retries or before it starts).
    pub applying: bool,
    /// The last log record applied.
    pub applied_position: u64,
    /// The source commit LSN of the last transaction applied.
    pub applied_lsn: Option<String>,
    /// WAL between the last transaction applied and the end of the log.
    pub lag_bytes: u64,
    /// Time from the source commit of the oldest transaction not applied yet (0 when caught
    /// up).
    pub lag_seconds: f64,
    pub batches: u64,
    pub dead_letters: u64,
    /// Batches and changes applied per second over the last `RATE_WINDOW`.
    pub batches_per_second: f64,
    pub changes_per_second: f64,
    pub last_error: Option<String>,
    /// The batches of the last `RATE_WINDOW`: when each was applied and its changes.
    #[serde(skip)]
    recent: VecDeque<(Instant, u64)>,
}

/// How far back `/status` looks for a sink's rates.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl SinkStatus {
    /// Forgets batches older than `RATE_WINDOW` and sets the rates from the rest.
    fn update_rates(&mut self, now: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
        let window = RATE_WINDOW.as_secs_f64();
        self.batches_per_second = self.recent.len() as f64 / window;
        self.changes_per_second = self.recent.iter().map(|(_, n)| n).sum::<u64>() as f64 / window;
    }
}

/// What one applied batch did, for the counters.
pub struct AppliedBatch<'a> {
    pub sink: &'a str,
    /// Changes per table in the batch, and how many of them were dead-lettered.
    pub changes: &'a BTreeMap<String, u64>,
    pub dead_lettered: &'a BTreeMap<String, u64>,
    pub records: usize,
    pub took: Duration,
    pub position: u64,
    pub lsn: Option<Position>,
}

impl Telemetry {
    pub fn new() -> Result<Telemetry, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(metric.clone()))?;
            Ok::<_, prometheus::Error>(metric)
        };
        let captured = counter(
            "tidemark_events_captured_total",
            "Changes written to the offset log, per source table.",
            &["table"],
        )?;
        let applied = counter(
            "tidemark_events_applied_total",
            "Changes applied by a sink, per sink and table.",
            &["sink", "table"],
        )?;
        let dead_lettered = counter(
            "tidemark_events_dead_lettered_total",
            "Changes a sink's target refused, written to its dead-letter queue.",
            &["sink", "table"],
        )?;
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let metric =
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["sink"])?;
            registry.register(Box::new(metric.clone()))?;
            Ok::<_, prometheus::Error>(metric)
        };
        let batch_rows = histogram(
            "tidemark_batch_records",
            "Log records per applied batch.",
            prometheus::exponential_buckets(1.0, 4.0, 9)?,
        )?;
        let batch_seconds = histogram(
            "tidemark_batch_seconds",
            "Time to apply a batch.",
            prometheus::exponential_buckets(0.001, 4.0, 9)?,
        )?;
        let gauge_vec = |name: &str, help: &str| {
            let metric = IntGaugeVec::new(Opts::new(name, help), &["sink"])?;
            registry.register(Box::new(metric.clone()))?;
            Ok::<_, prometheus::Error>(metric)
        };
        let lag_bytes = gauge_vec(
            "tidemark_sink_lag_bytes",
            "WAL between a sink's last applied transaction and the end of the log.",
        )?;
        let lag_milliseconds = gauge_vec(
            "tidemark_sink_lag_milliseconds",
            "Time since the source commit of the oldest transaction a sink has not applied.",
        )?;
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok::<_, prometheus::Error>(metric)
        };
        let log_bytes = gauge(
            "tidemark_log_bytes",
            "Bytes the offset log occupies on disk.",
        )?;
        let slot_retained_bytes = gauge(
            "tidemark_slot_retained_wal_bytes",
            "WAL the replication slot keeps on the source server.",
        )?;
        let reconnects = IntCounter::new(
            "tidemark_source_reconnects_total",
            "Times the source connection was lost and opened again.",
        )?;
        registry.register(Box::new(reconnects.clone()))?;
        Ok(Telemetry {
            registry,
            captured,
            applied,
            dead_lettered,
            batch_rows,
            batch_seconds,
            lag_bytes,
            lag_milliseconds,
            log_bytes,
            slot_retained_bytes,
            reconnects,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn captured(&self, table: &str, changes: u64) {
        self.captured.with_label_values(&[table]).inc_by(changes);
    }

    pub fn reconnected(&self, error: &str) {
        self.reconnects.inc();
        let mut state = self.state();
        state.source.connected = false;
        state.source.last_error = Some(error.to_string());
    }

    pub fn source_connected(&self) {
        let mut state = self.state();
        state.source.connected = true;
        state.source.last_error = None;
    }

    /// The source stopped reading WAL for `reason`, or (None) reads again.
    pub fn source_paused(&self, reason: Option<String>) {
        self.state().source.paused = reason;
    }

    pub fn source_positions(&self, received: Position, logged: Position, confirmed: Position) {
        let mut state = self.state();
        state.source.received_lsn = Some(received.to_string());
        state.source.logged_lsn = Some(logged.to_string());
        state.source.confirmed_lsn = Some(confirmed.to_string());
    }

    pub fn snapshot_progress(&self, snapshot: SnapshotStatus) {
        self.state().source.snapshot = Some(snapshot);
    }

    pub fn slot_retained(&self, bytes: i64) {
        self.slot_retained_bytes.set(bytes);
        self.state().source.slot_retained_bytes = Some(bytes);
    }

    pub fn sink_started(&self, sink: &str, position: u64) {
        let mut state = self.state();
        let status = state.sinks.entry(sink.to_string()).or_default();
        status.applying = true;
        status.applied_position = position;
        status.last_error = None;
    }

    pub fn sink_failed(&self, sink: &str, error: &str) {
        let mut state = self.state();
        let status = state.sinks.entry(sink.to_string()).or_default();
        status.applying = false;
        status.last_error = Some(error.to_string());
    }

    pub fn batch_applied(&self, batch: &AppliedBatch<'_>) {
        for (table, changes) in batch.changes {
            let refused = batch
                .dead_lettered
                .get(table)
                .copied()
                .unwrap_or(0)
                .min(*changes);
            self.applied
                .with_label_values(&[batch.sink, table])
                .inc_by(changes - refused);
            if refused > 0 {
                self.dead_lettered
                    .with_label_values(&[batch.sink, table])
                    .inc_by(refused);
            }
        }
        self.batch_rows
            .with_label_values(&[batch.sink])
            .observe(batch.records as f64);
        self.batch_seconds
            .with_label_values(&[batch.sink])
            .observe(batch.took.as_secs_f64());
        let mut state = self.state();
        let status = state.sinks.entry(batch.sink.to_string()).or_default();
        status.applying = true;
        status.last_error = None;
        status.applied_position = batch.position;
        if let Some(lsn) = batch.lsn {
            status.applied_lsn = Some(lsn.to_string());
        }
        status.batches += 1;
        status.dead_letters += batch.dead_lettered.values().sum::<u64>();
        let now = Instant::now();
        status.recent.push_back((now, batch.changes.values().sum()));
        status.update_rates(now);
    }

    /// A sink's lag behind the log: WAL bytes, and the age of the oldest transaction it has
    /// not applied (commit time in Unix microseconds; None when it has applied everything).
    pub fn sink_lag(&self, sink: &str, bytes: u64, oldest_pending_commit: Option<i64>) {
        let seconds = oldest_pending_commit.map_or(0.0, |commit| {
            (now_micros().saturating_sub(commit)).max(0) as f64 / 1e6
        });
        self.lag_bytes
            .with_label_values(&[sink])
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.lag_milliseconds
            .with_label_values(&[sink])
            .set((seconds * 1000.0) as i64);
        let mut state = self.state();
        let status = state.sinks.entry(sink.to_string()).or_default();
        status.lag_bytes = bytes;
        status.lag_seconds = seconds;
    }

    /// `/metrics`: every metric in Prometheus' text format.
    pub fn render_metrics(&self, log_bytes: u64) -> String {
        self.log_bytes
            .set(i64::try_from(log_bytes).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn source(&self) -> SourceStatus {
        self.state().source.clone()
    }

    pub fn sinks(&self) -> BTreeMap<String, SinkStatus> {
        let now = Instant::now();
        let mut state = self.state();
        for status in state.sinks.values_mut() {
            status.update_rates(now);
        }
        state.sinks.clone()
    }

    /// Why the agent is not ready, empty when it is: the source is connected, every sink
    /// applies, and none lags more than `max_lag`.
    pub fn not_ready(&self, sinks: &[String], max_lag: Duration) -> Vec<String> {
        let state = self.state();
        let mut reasons = Vec::new();
        if !state.source.connected {
            reasons.push(match &state.source.last_error {
                Some(e) => format!("source not connected: {e}"),
                None => "source not connected yet".to_string(),
            });
        }
        if let Some(reason) = &state.source.paused {
            reasons.push(format!("source paused: {reason}"));
        }
        for name in sinks {
            match state.sinks.get(name) {
                None => reasons.push(format!("sink {name:?} has not started")),
                Some(s) if !s.applying => reasons.push(format!(
                    "sink {name:?} is not applying: {}",
                    s.last_error.as_deref().unwrap_or("starting")
                )),
                Some(s) if s.lag_seconds > max_lag.as_secs_f64() => reasons.push(format!(
                    "sink {name:?} lags {:.1} s behind the source (ready_max_lag is {:?})",
                    s.lag_seconds, max_lag
                )),
                Some(_) => {}
            }
        }
        reasons
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_and_render_as_prometheus_text() {
        let telemetry = Telemetry::new().unwrap();
        telemetry.captured("public.t", 5);
        let changes = BTreeMap::from([("public.t".to_string(), 5)]);
        let refused = BTreeMap::from([("public.t".to_string(), 2)]);
        telemetry.batch_applied(&AppliedBatch {
            sink: "mirror",
            changes: &changes,
            dead_lettered: &refused,
            records: 7,
            took: Duration::from_millis(3),
            position: 7,
            lsn: Some(Position(42)),
        });
        let text = telemetry.render_metrics(1024);
        assert!(text.contains("tidemark_events_captured_total{table=\"public.t\"} 5"));
        assert!(
            text.contains("tidemark_events_applied_total{sink=\"mirror\",table=\"public.t\"} 3")
        );
        assert!(text
            .contains("tidemark_events_dead_lettered_total{sink=\"mirror\",table=\"public.t\"} 2"));
        assert!(text.contains("tidemark_log_bytes 1024"));
        assert!(text.contains("tidemark_batch_seconds_count{sink=\"mirror\"} 1"));
        let mirror = &telemetry.sinks()["mirror"];
        assert_eq!(mirror.dead_letters, 2);
        assert_eq!(mirror.batches_per_second, 0.1);
        assert_eq!(mirror.changes_per_second, 0.5);
    }

    #[test]
    fn not_ready_says_why() {
        let telemetry = Telemetry::new().unwrap();
        let sinks = vec!["mirror".to_string()];
        let reasons = telemetry.not_ready(&sinks, Duration::from_secs(30));
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        telemetry.source_connected();
        telemetry.sink_started("mirror", 0);
        assert!(telemetry
            .not_ready(&sinks, Duration::from_secs(30))
            .is_empty());
        telemetry.sink_lag("mirror", 100, Some(now_micros() - 60_000_000));
        let reasons = telemetry.not_ready(&sinks, Duration::from_secs(30));
        assert!(reasons[0].contains("lags"), "{reasons:?}");
        telemetry.sink_failed("mirror", "connection refused");
        let reasons = telemetry.not_ready(&sinks, Duration::from_secs(30));
        assert!(reasons[0].contains("connection refused"), "{reasons:?}");
    }
}
