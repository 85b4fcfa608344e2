//! Source → log → sinks. One task captures into the log, one makes what it appends durable
//! (group commit), one per sink applies the log from its cursor, one trims what every sink has
//! applied. On shutdown the source stops reading, the log is flushed and confirmed, and each
//! sink finishes the batch in flight.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SinkConfig};
use crate::connectors::{AnySource, SourceError, SourceSettings};
use crate::event::{Record, RelationId};
use crate::health;
use crate::log::{LogEntry, LogError, OffsetLog};
use crate::retry::RetryPolicy;
use crate::sinks::{AnySink, DeadLettered, Planned, SinkError};
use crate::telemetry::{AppliedBatch, Telemetry};

const TRIM_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("setting up the metrics: {0}")]
    Metrics(prometheus::Error),
    #[error(
        "an agent task panicked ({0}): this is a bug in tidemark, please report it; the agent \
         stops, and its next start resumes from the offset log and the sinks' checkpoints"
    )]
    Panicked(String),
    #[error("cannot serve health on {addr}: {source}; choose another agent.health_addr")]
    Health {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl PipelineError {
    /// Whether the operator's setup is at fault (exit code 2) rather than a runtime failure.
    pub fn is_prerequisite(&self) -> bool {
        match self {
            PipelineError::Source(e) => e.is_prerequisite(),
            PipelineError::Sink(SinkError::Unsupported(_)) => true,
            PipelineError::Health { .. } => true,
            _ => false,
        }
    }
}

/// Runs until `shutdown` fires (then exits cleanly) or a component fails for good.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), PipelineError> {
    let log = OffsetLog::open(&config.agent.data_dir)?;
    let telemetry = Arc::new(Telemetry::new().map_err(PipelineError::Metrics)?);
    let table_sinks = config.sinks.iter().any(|s| s.kind.requires_primary_keys());
    let source = AnySource::build(
        &config.source,
        SourceSettings {
            require_primary_keys: table_sinks,
            telemetry: Arc::clone(&telemetry),
            log_max_bytes: config.agent.log_max_bytes,
        },
    );
    let source_info = source.info(&config.agent.name);
    let mut sinks = Vec::new();
    for sink_config in &config.sinks {
        sinks.push((
            sink_config.clone(),
            AnySink::build(
                sink_config,
                &log,
                &source_info,
                &config.agent.data_dir,
                source.snapshot_parallelism(),
            )?,
        ));
    }
    let health = tokio::net::TcpListener::bind(config.agent.health_addr)
        .await
        .map_err(|source| PipelineError::Health {
            addr: config.agent.health_addr,
            source,
        })?;

    let stop = shutdown.child_token();
    let mut tasks: JoinSet<Result<(), PipelineError>> = JoinSet::new();
    tasks.spawn(health::serve(
        health,
        health::Surface {
            telemetry: Arc::clone(&telemetry),
            log: Arc::clone(&log),
            sinks: config.sinks.iter().map(|s| s.name.clone()).collect(),
            ready_max_lag: config.agent.ready_max_lag,
        },
        stop.clone(),
    ));
    {
        let log = Arc::clone(&log);
        let stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                result = log.run_flusher() => result.map_err(PipelineError::from),
                _ = stop.cancelled() => Ok(()),
            }
        });
    }
    for (sink_config, sink) in sinks {
        tasks.spawn(run_sink(
            sink_config,
            sink,
            Arc::clone(&log),
            Arc::clone(&telemetry),
            stop.clone(),
        ));
    }
    {
        let log = Arc::clone(&log);
        let names: Vec<String> = config.sinks.iter().map(|s| s.name.clone()).collect();
        tasks.spawn(run_trimmer(log, names, stop.clone()));
    }
    {
        let mut writer = log.writer()?;
        let stop = stop.clone();
        tasks.spawn(async move {
            let result = source.run(&mut writer, stop.clone()).await;
            if result.is_err() {
                stop.cancel();
            }
            result.map_err(PipelineError::from)
        });
    }

    let first_error = supervise(tasks, &stop).await;
    log.flush().await?;
    match first_error {
        Some(e) => Err(e),
        None => {
            tracing::info!(durable = %log.durable().end_position, "stopped");
            Ok(())
        }
    }
}

/// Waits for every task; the first that fails, or panics, stops the others. Returns the
/// first failure.
async fn supervise(
    mut tasks: JoinSet<Result<(), PipelineError>>,
    stop: &CancellationToken,
) -> Option<PipelineError> {
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined
            .map_err(|e| match e.try_into_panic() {
                Ok(panic) => PipelineError::Panicked(panic_message(panic.as_ref())),
                Err(e) => PipelineError::Panicked(e.to_string()),
            })
            .and_then(|finished| finished);
        if let Err(e) = result {
            stop.cancel();
            first_error.get_or_insert(e);
        }
    }
    first_error
}

/// What a panic said, when it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(ToString::to_string)
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

/// Applies the log to one sink from its checkpoint, batch by batch. A batch is whatever has
/// become durable since the last one, up to `batch_max_rows` records, cut after its last
/// Commit (a transaction larger than a batch goes in chunks). Failing batches are retried
/// with backoff; the log keeps everything meanwhile.
async fn run_sink(
    config: SinkConfig,
    mut sink: AnySink,
    log: Arc<OffsetLog>,
    telemetry: Arc<Telemetry>,
    stop: CancellationToken,
) -> Result<(), PipelineError> {
    let mut applied = open_sink(&config, &mut sink, &telemetry, &stop).await?;
    let durable = log.durable().seq;
    if applied > durable {
        // The sink's own checkpoint is ahead of the log: the log lost records it once held.
        return Err(LogError::Damaged {
            path: log.path().to_path_buf(),
            reason: format!(
                "sink {:?} has applied records up to {applied}, but the log ends at {durable}: \
                 it lost records (damaged, or restored from an older copy)",
                config.name
            ),
        }
        .into());
    }
    tracing::info!(sink = %config.name, from = applied, "sink started");
    let mut policy = RetryPolicy::new();
    let planner = sink.planner();
    // The next batch, read from the log (and planned) while the current one is applied.
    let mut ahead: Option<tokio::task::JoinHandle<Result<ReadAhead, LogError>>> = None;
    loop {
        let (batch, planned) = match ahead.take() {
            Some(read) => read
                .await
                .map_err(|e| LogError::Background(e.to_string()))??,
            None => {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(()),
                    _ = log.wait_beyond(applied) => {}
                }
                if !config.batch_max_wait.is_zero() {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(config.batch_max_wait) => {}
                    }
                }
                (read_batch(&log, applied, config.batch_max_rows)?, None)
            }
        };
        let Some(last) = batch.last().map(|e| e.seq) else {
            continue;
        };
        if log.durable().seq > last {
            let log = Arc::clone(&log);
            let max = config.batch_max_rows;
            let planner = planner.clone();
            ahead = Some(tokio::task::spawn_blocking(move || {
                let batch = read_batch(&log, last, max)?;
                let planned = planner.and_then(|p| p.plan(&batch));
                Ok((batch, planned))
            }));
        }
        let started = Instant::now();
        match sink.apply(&batch, planned).await {
            Ok(dead_lettered) => report_batch(
                &config.name,
                &batch,
                &dead_lettered,
                started,
                &log,
                &telemetry,
            )?,
            Err(e) if e.is_transient() => {
                let delay = policy.next_delay();
                telemetry.sink_failed(&config.name, &e.to_string());
                tracing::warn!(sink = %config.name, error = %e, retry_in = ?delay, "batch failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                // The failed attempt may have left part of the batch, and the sink may hold
                // records of earlier batches: start over from the checkpoint, which the
                // sink's open() restores.
                if let Some(read) = ahead.take() {
                    read.abort();
                }
                applied = open_sink(&config, &mut sink, &telemetry, &stop).await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        policy.reset();
        tracing::debug!(sink = %config.name, records = batch.len(), through = last, "batch applied");
        applied = last;
    }
}

/// A batch read from the log ahead of its turn, and what the sink's planner made of it.
type ReadAhead = (Vec<LogEntry>, Option<Planned>);

/// Counts what a batch did and how far its sink still lags.
fn report_batch(
    sink: &str,
    batch: &[LogEntry],
    dead_lettered: &DeadLettered,
    started: Instant,
    log: &OffsetLog,
    telemetry: &Telemetry,
) -> Result<(), LogError> {
    let mut per_relation: HashMap<RelationId, u64> = HashMap::new();
    let mut last_commit = None;
    for entry in batch {
        match &entry.record {
            Record::Change(change) => *per_relation.entry(change.relation).or_default() += 1,
            Record::SnapshotRows(rows) => {
                *per_relation.entry(rows.relation).or_default() += u64::from(rows.rows)
            }
            Record::Commit(commit) => last_commit = Some(*commit),
            Record::Begin(_) | Record::Schema(_) => {}
        }
    }
    let mut changes = BTreeMap::new();
    for (relation, count) in per_relation {
        *changes
            .entry(log.relation(relation)?.qualified_name())
            .or_default() += count;
    }
    let position = batch.last().map_or(0, |e| e.seq);
    telemetry.batch_applied(&AppliedBatch {
        sink,
        changes: &changes,
        dead_lettered,
        records: batch.len(),
        took: started.elapsed(),
        position,
        lsn: last_commit.map(|c| c.commit_position),
    });
    let durable = log.durable();
    let oldest_pending = match durable.seq > position {
        true => log
            .transaction_of(position + 1)?
            .map(|(_, begin)| begin.commit_ts),
        false => None,
    };
    let behind = last_commit.map_or(0, |c| {
        durable.end_position.0.saturating_sub(c.end_position.0)
    });
    telemetry.sink_lag(sink, behind, oldest_pending);
    Ok(())
}

/// Opens a sink, retrying while its destination is unreachable: a sink that is down holds
/// nothing up but itself, and the log keeps what it has not applied.
async fn open_sink(
    config: &SinkConfig,
    sink: &mut AnySink,
    telemetry: &Telemetry,
    stop: &CancellationToken,
) -> Result<u64, PipelineError> {
    let mut policy = RetryPolicy::new();
    loop {
        match sink.open().await {
            Ok(applied) => {
                telemetry.sink_started(&config.name, applied);
                return Ok(applied);
            }
            Err(e) if e.is_transient() => {
                telemetry.sink_failed(&config.name, &e.to_string());
                let delay = policy.next_delay();
                tracing::warn!(sink = %config.name, error = %e, retry_in = ?delay, "sink cannot start; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Err(e.into()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Up to `max` durable records (counting the rows of a snapshot record) after `after`, ending
/// at the last Commit among them, unless there is none (one transaction larger than a batch,
/// applied in chunks).
fn read_batch(log: &OffsetLog, after: u64, max: usize) -> Result<Vec<LogEntry>, LogError> {
    let mut batch = log.read(after, max)?;
    if let Some(end) = batch
        .iter()
        .rposition(|e| matches!(e.record, crate::event::Record::Commit(_)))
    {
        batch.truncate(end + 1);
    }
    Ok(batch)
}

async fn run_trimmer(
    log: Arc<OffsetLog>,
    sinks: Vec<String>,
    stop: CancellationToken,
) -> Result<(), PipelineError> {
    let names: Vec<&str> = sinks.iter().map(String::as_str).collect();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(TRIM_INTERVAL) => {}
            _ = log.trim_wanted() => {}
        }
        let trimmed = log.trim(&names)?;
        if trimmed > 0 {
            tracing::debug!(trimmed, "log trimmed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicked_task_stops_the_others_and_is_the_error() {
        let stop = CancellationToken::new();
        let mut tasks: JoinSet<Result<(), PipelineError>> = JoinSet::new();
        let waiting = stop.clone();
        tasks.spawn(async move {
            waiting.cancelled().await;
            Ok(())
        });
        tasks.spawn(async {
            let decoded: Option<u8> = None;
            match decoded {
                Some(_) => Ok(()),
                None => panic!("decoder invariant broken"),
            }
        });
        let error = supervise(tasks, &stop).await;
        assert!(stop.is_cancelled());
        match error {
            Some(PipelineError::Panicked(message)) => {
                assert_eq!(message, "decoder invariant broken")
            }
            other => panic!("expected the panic, got {other:?}"),
        }
    }
}
