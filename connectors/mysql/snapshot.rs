//! The initial snapshot: every captured table as one consistent InnoDB snapshot shows it, and
//! the binlog position of that snapshot. Under a brief global read lock (`FLUSH TABLES WITH
//! READ LOCK`), each reader connection starts its consistent-snapshot transaction and the
//! binlog position is read; then the lock goes and the readers copy while the server writes
//! on. The rows are logged as snapshot transactions just before that position, where
//! streaming starts.
//!
//! Parallelism: tables are split into ranges of their primary key's first column (integer
//! keys), read by `snapshot_parallelism` connections that take the next range from a shared
//! queue. A snapshot cut short is taken again from the start; its first transaction
//! truncates every captured table, so what the first attempt delivered is replaced.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::binlog::Tables;
use super::decode::{ColumnDecoder, Origin};
use super::{
    current_position, file_number, position_below, quote, BinlogStart, MySqlSource, Server,
    SourceError,
};
use crate::connectors::backpressure::{self, Backpressure};
use crate::connectors::snapshot_log::SnapshotTransactions;
use crate::event::{Position, Relation, RelationId, TxOrigin, Value};
use crate::log::{LogWriter, SnapshotState, TableSnapshots};
use crate::pgtext::copy_text::write_row;

/// Rows a reader hands to the log at once.
const ROWS_PER_MESSAGE: u32 = 1000;
/// Ranges per reader a large table is split into, so readers finishing early take over.
const RANGES_PER_READER: u64 = 4;
/// A table with fewer rows than this (by the catalog's estimate) is one range.
const MIN_RANGE_ROWS: u64 = 50_000;

/// One captured table as the readers see it.
struct SnapshotTable {
    id: RelationId,
    relation: Arc<Relation>,
    decoders: Vec<ColumnDecoder>,
}

/// Rows of one table, in COPY text.
struct Chunk {
    table: usize,
    rows: u32,
    text: Bytes,
}

/// A query that reads one range of one table.
struct RangeQuery {
    table: usize,
    sql: String,
}

/// Takes the snapshot and logs it; returns where streaming starts, or None when cancelled.
pub(super) async fn run(
    source: &MySqlSource,
    conn: &mut Conn,
    writer: &mut LogWriter,
    tables: &Tables,
    server: &Server,
    cancel: &CancellationToken,
) -> Result<Option<BinlogStart>, SourceError> {
    let started = Instant::now();
    let replaces_earlier = writer.log().snapshot_state()? == Some(SnapshotState::Running);
    let described: Vec<SnapshotTable> = tables
        .iter()
        .map(|(id, relation, decoders)| SnapshotTable {
            id,
            relation: Arc::clone(relation),
            decoders: decoders.to_vec(),
        })
        .collect();

    let parallelism = source.config.snapshot_parallelism.max(1);
    conn.query_drop("FLUSH TABLES WITH READ LOCK")
        .await
        .map_err(|e| {
            SourceError::query(
                "locking the tables for the snapshot's position (FLUSH TABLES WITH READ LOCK; \
             the user needs the RELOAD privilege: GRANT RELOAD ON *.* TO …)",
                e,
            )
        })?;
    let readers = open_readers(source, parallelism).await;
    let start = current_position(conn).await;
    conn.query_drop("UNLOCK TABLES")
        .await
        .map_err(|e| SourceError::query("unlocking the tables", e))?;
    let (mut readers, start) = (readers?, start?);
    tracing::info!(
        tables = described.len(),
        file = %start.file,
        offset = start.offset,
        "snapshot started"
    );

    let queue = Arc::new(Mutex::new(
        range_queries(&mut readers[0], &described, parallelism).await?,
    ));
    let described = Arc::new(described);
    let (sender, mut received) = mpsc::channel::<Result<Chunk, SourceError>>(parallelism * 2);
    let mut tasks = tokio::task::JoinSet::new();
    for mut reader in readers {
        let (queue, described, sender) =
            (Arc::clone(&queue), Arc::clone(&described), sender.clone());
        tasks.spawn(async move {
            if let Err(e) = read_ranges(&mut reader, &queue, &described, &sender).await {
                let _ = sender.send(Err(e)).await;
            }
        });
    }
    drop(sender);

    writer
        .log()
        .set_snapshot_state(SnapshotState::Running)
        .await?;
    let position = Position::binlog(file_number(&start.file)?, start.offset);
    let origin = TxOrigin::MySql {
        server_id: server.server_id,
        thread: 0,
        file: start.file.clone(),
        gtid: None,
        gtid_state: start.gtid_state.clone(),
    };
    let mut logged = SnapshotTransactions::new(
        position_below(position),
        position,
        unix_micros_now(),
        Box::new(move |_| origin.clone()),
    );
    logged.begin(writer)?;
    if replaces_earlier {
        for table in described.iter() {
            logged.truncate(writer, table.id)?;
        }
    }
    let mut backpressure = Backpressure::new(source.log_max_bytes);
    let mut rows = 0u64;
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            message = received.recv() => message,
        };
        let Some(message) = message else { break };
        let chunk = message?;
        loop {
            backpressure.update(writer.log(), &source.telemetry)?;
            if !backpressure.paused {
                break;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(backpressure::CHECK_INTERVAL) => {}
            }
        }
        let table = &described[chunk.table];
        logged.rows(writer, table.id, chunk.rows, chunk.text)?;
        source
            .telemetry
            .captured(&table.relation.qualified_name(), u64::from(chunk.rows));
        rows += u64::from(chunk.rows);
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| SourceError::Binlog(format!("a snapshot reader failed: {e}")))?;
    }
    logged.commit(writer)?;
    writer.log().flush().await?;
    writer.log().set_table_snapshots(&TableSnapshots {
        done: described
            .iter()
            .map(|t| t.relation.qualified_name())
            .collect(),
        in_progress: None,
    })?;
    writer.log().set_snapshot_state(SnapshotState::Done).await?;
    tracing::info!(rows, elapsed = ?started.elapsed(), "snapshot done");
    Ok(Some(start))
}

pub(super) fn unix_micros_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Connections in consistent-snapshot transactions, started while the tables are locked.
async fn open_readers(source: &MySqlSource, count: usize) -> Result<Vec<Conn>, SourceError> {
    let mut readers = Vec::with_capacity(count);
    for _ in 0..count {
        let mut reader = source.connect().await?;
        for setting in [
            "SET time_zone = '+00:00'",
            "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        ] {
            reader
                .query_drop(setting)
                .await
                .map_err(|e| SourceError::query("setting up a snapshot reader", e))?;
        }
        reader
            .query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            .await
            .map_err(|e| SourceError::query("starting the snapshot's transaction", e))?;
        readers.push(reader);
    }
    Ok(readers)
}

/// The queries that read each table: ranges of its integer primary key's first column for
/// a large table, the whole table otherwise.
async fn range_queries(
    conn: &mut Conn,
    tables: &[SnapshotTable],
    parallelism: usize,
) -> Result<VecDeque<RangeQuery>, SourceError> {
    let mut queries = VecDeque::new();
    for (index, table) in tables.iter().enumerate() {
        let relation = &table.relation;
        let columns: Vec<String> = relation.columns.iter().map(|c| quote(&c.name)).collect();
        let from = format!("{}.{}", quote(&relation.schema), quote(&relation.table));
        let select = format!("SELECT {} FROM {from}", columns.join(", "));
        let key = relation.columns.iter().find(|c| c.primary_key).filter(|c| {
            matches!(
                c.value_type,
                crate::event::ValueType::Int2
                    | crate::event::ValueType::Int4
                    | crate::event::ValueType::Int8
            )
        });
        let estimated: u64 = conn
            .exec_first(
                "SELECT TABLE_ROWS FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (&relation.schema, &relation.table),
            )
            .await
            .map_err(|e| SourceError::query("estimating the tables' sizes", e))?
            .flatten()
            .unwrap_or(0);
        let wanted = (parallelism as u64 * RANGES_PER_READER).max(1);
        let Some(key) = key.filter(|_| estimated >= MIN_RANGE_ROWS && wanted > 1) else {
            queries.push_back(RangeQuery {
                table: index,
                sql: select,
            });
            continue;
        };
        let key = quote(&key.name);
        let bounds: Option<(Option<i64>, Option<i64>)> = conn
            .query_first(format!("SELECT MIN({key}), MAX({key}) FROM {from}"))
            .await
            .map_err(|e| SourceError::query("reading a table's key range", e))?;
        let Some((Some(low), Some(high))) = bounds else {
            queries.push_back(RangeQuery {
                table: index,
                sql: select,
            });
            continue;
        };
        tracing::info!(
            table = %relation.qualified_name(),
            ranges = wanted,
            "snapshot reads the table in key ranges"
        );
        let step = ((i128::from(high) - i128::from(low)) / i128::from(wanted)).max(1);
        let mut lower: Option<i128> = None;
        let mut bound = i128::from(low) + step;
        while bound <= i128::from(high) {
            let filter = match lower {
                None => format!(" WHERE {key} < {bound}"),
                Some(lower) => format!(" WHERE {key} >= {lower} AND {key} < {bound}"),
            };
            queries.push_back(RangeQuery {
                table: index,
                sql: format!("{select}{filter}"),
            });
            lower = Some(bound);
            bound += step;
        }
        // The last range is open-ended: rows beyond the maximum seen are in it too.
        let filter = lower.map_or(String::new(), |l| format!(" WHERE {key} >= {l}"));
        queries.push_back(RangeQuery {
            table: index,
            sql: format!("{select}{filter}"),
        });
    }
    Ok(queries)
}

/// Reads ranges from the queue until it is empty, sending their rows as COPY text.
async fn read_ranges(
    conn: &mut Conn,
    queue: &Mutex<VecDeque<RangeQuery>>,
    tables: &[SnapshotTable],
    sender: &mpsc::Sender<Result<Chunk, SourceError>>,
) -> Result<(), SourceError> {
    loop {
        let next = queue
            .lock()
            .map_err(|_| SourceError::Binlog("a snapshot reader panicked".into()))?
            .pop_front();
        let Some(query) = next else {
            return Ok(());
        };
        let table = &tables[query.table];
        let mut result = conn.exec_iter(query.sql.as_str(), ()).await.map_err(|e| {
            SourceError::query(&format!("reading {}", table.relation.qualified_name()), e)
        })?;
        let mut text = Vec::new();
        let mut rows = 0u32;
        while let Some(mut row) = result.next().await.map_err(|e| {
            SourceError::query(&format!("reading {}", table.relation.qualified_name()), e)
        })? {
            let values = table
                .decoders
                .iter()
                .enumerate()
                .map(|(i, decoder)| {
                    let value = row
                        .take::<mysql_async::Value, _>(i)
                        .unwrap_or(mysql_async::Value::NULL);
                    decoder.value(value, Origin::Query).map_err(|e| {
                        SourceError::Binlog(format!(
                            "column {} of {}: {e}",
                            table.relation.columns[i].name,
                            table.relation.qualified_name()
                        ))
                    })
                })
                .collect::<Result<Vec<Value>, SourceError>>()?;
            write_row(
                &mut text,
                table
                    .relation
                    .columns
                    .iter()
                    .map(|c| &c.value_type)
                    .zip(&values),
            );
            rows += 1;
            if rows == ROWS_PER_MESSAGE {
                let chunk = Chunk {
                    table: query.table,
                    rows,
                    text: Bytes::from(std::mem::take(&mut text)),
                };
                if sender.send(Ok(chunk)).await.is_err() {
                    return Ok(());
                }
                rows = 0;
            }
        }
        if rows > 0 {
            let chunk = Chunk {
                table: query.table,
                rows,
                text: Bytes::from(text),
            };
            if sender.send(Ok(chunk)).await.is_err() {
                return Ok(());
            }
        }
    }
}
