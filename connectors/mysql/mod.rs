//! The MySQL / MariaDB source: the server's binlog, read as a replica does (a binlog dump
//! under the configured `server_id`), its row events decoded into the log's transactions.
//!
//! Positions: a binlog position (file number and offset, see `Position::binlog`). A
//! transaction's `commit_position` is where it starts in the binlog (its GTID or BEGIN
//! event): the server writes each transaction whole when it commits, so that order is commit
//! order. Its `end_position` is just past its commit event, where a restart resumes.
//! The server keeps its binlog for its own retention time, not for us: nothing is confirmed
//! to it, and a restart whose position was purged stops with the recovery command.

pub mod check;

mod binlog;
mod catalog;
mod compressed;
mod decode;
mod row_image;
mod snapshot;
mod table_map;

use std::sync::Arc;
use std::time::Instant;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{MySqlSourceConfig, SnapshotMode};
use crate::envelope::SourceInfo;
use crate::event::{Position, Record, TxBegin, TxCommit, TxOrigin};
use crate::log::{LogError, LogWriter, SnapshotState};
use crate::retry::RetryPolicy;
use crate::telemetry::Telemetry;

/// Why the MySQL source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to MySQL at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("MySQL, {doing}: {message}")]
    Query {
        doing: String,
        message: String,
        /// The server's error code, when the server answered.
        code: Option<u16>,
    },
    /// The server's setup or the agent's config is wrong; says the fix.
    #[error("{0}")]
    Prerequisite(String),
    #[error("the binlog stream: {0}")]
    Binlog(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Server errors worth a reconnect: the server going away or restarting, lock waits and
/// deadlocks, too many connections.
const TRANSIENT_CODES: &[u16] = &[1040, 1053, 1205, 1213, 2002, 2003, 2006, 2013];

impl SourceError {
    fn query(doing: &str, e: mysql_async::Error) -> SourceError {
        let code = match &e {
            mysql_async::Error::Server(server) => Some(server.code),
            _ => None,
        };
        SourceError::Query {
            doing: doing.to_owned(),
            message: e.to_string(),
            code,
        }
    }

    /// Worth reconnecting: the connection broke, or the server said so.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Connect { .. } | SourceError::Binlog(_) => true,
            SourceError::Query { code, .. } => code.is_none_or(|c| TRANSIENT_CODES.contains(&c)),
            SourceError::Prerequisite(_) | SourceError::Log(_) => false,
        }
    }

    /// Whether the operator's setup is at fault (exit code 2).
    pub fn is_prerequisite(&self) -> bool {
        match self {
            SourceError::Prerequisite(_) => true,
            // Access denied, unknown database.
            SourceError::Query { code, .. } => matches!(code, Some(1044 | 1045 | 1049 | 1227)),
            _ => false,
        }
    }
}

/// Which server the log was captured from: a restart against another stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SourceIdentity {
    /// `@@server_uuid` on MySQL; MariaDB has none.
    server_uuid: Option<String>,
    server_id: u32,
    database: String,
}

/// What the session learns of the server when it connects.
#[derive(Debug, Clone)]
struct Server {
    mariadb: bool,
    server_id: u32,
    server_uuid: Option<String>,
}

/// Where the binlog is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinlogStart {
    pub file: String,
    pub offset: u64,
    /// The GTID state at that point (none where GTIDs are off).
    pub gtid_state: Option<String>,
}

/// A MySQL identifier in backquotes.
fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// The binlog file's number (`binlog.000042` is 42), which orders positions across files.
fn file_number(file: &str) -> Result<u32, SourceError> {
    file.rsplit_once('.')
        .and_then(|(_, n)| n.parse().ok())
        .ok_or_else(|| SourceError::Binlog(format!("binlog file name {file:?} has no number")))
}

/// Captures the configured tables of one MySQL or MariaDB server.
pub struct MySqlSource {
    config: MySqlSourceConfig,
    require_primary_keys: bool,
    telemetry: Arc<Telemetry>,
    log_max_bytes: u64,
}

impl MySqlSource {
    pub fn new(
        config: MySqlSourceConfig,
        require_primary_keys: bool,
        telemetry: Arc<Telemetry>,
        log_max_bytes: u64,
    ) -> MySqlSource {
        MySqlSource {
            config,
            require_primary_keys,
            telemetry,
            log_max_bytes,
        }
    }

    /// The envelopes' `source` block: Debezium's MySQL connector.
    pub fn info(&self, name: &str) -> SourceInfo {
        SourceInfo {
            connector: "mysql",
            name: name.to_owned(),
            database: self.config.url.database().to_owned(),
        }
    }

    pub fn snapshot_parallelism(&self) -> usize {
        self.config.snapshot_parallelism
    }

    /// Streams into the log until `cancel` fires. Transient failures reconnect with backoff;
    /// before the first successful start they are retried for `connect_timeout` only.
    pub async fn run(
        &self,
        writer: &mut LogWriter,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut policy = RetryPolicy::new();
        let started = Instant::now();
        let mut streamed = false;
        loop {
            match self.session(writer, &cancel, &mut streamed).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.is_transient()
                        && (streamed || started.elapsed() < self.config.connect_timeout) =>
                {
                    writer.discard_uncommitted()?;
                    let delay = policy.next_delay();
                    self.telemetry.reconnected(&e.to_string());
                    tracing::warn!(error = %e, retry_in = ?delay, "source interrupted; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn connect(&self) -> Result<Conn, SourceError> {
        connect(&self.config).await
    }

    async fn session(
        &self,
        writer: &mut LogWriter,
        cancel: &CancellationToken,
        streamed: &mut bool,
    ) -> Result<(), SourceError> {
        let mut conn = self.connect().await?;
        let server = check::prerequisites(&mut conn).await?;
        self.check_identity(writer, &server).await?;
        let tables = binlog::Tables::load(
            &mut conn,
            &self.config.tables,
            self.require_primary_keys,
            writer,
        )
        .await?;

        let log = writer.log().clone();
        let snapshot_due = self.config.snapshot == SnapshotMode::Initial
            && log.snapshot_state()? != Some(SnapshotState::Done);
        let start = if snapshot_due {
            let start = snapshot::run(self, &mut conn, writer, &tables, &server, cancel).await?;
            let Some(start) = start else {
                // Cancelled.
                return Ok(());
            };
            start
        } else if let Some(start) = resume_point(writer)? {
            start
        } else {
            let start = current_position(&mut conn).await?;
            log_starting_point(writer, &server, &start).await?;
            start
        };
        check::position_available(&mut conn, &start).await?;
        drop(conn);
        *streamed = true;
        let catalog = self.connect().await?;
        let stream_conn = self.connect().await?;
        binlog::stream(
            self,
            binlog::Stream {
                conn: stream_conn,
                catalog,
                tables,
                server,
                start,
            },
            writer,
            cancel,
        )
        .await
    }

    /// Stops when the log was captured from another server (or another database name).
    async fn check_identity(&self, writer: &LogWriter, server: &Server) -> Result<(), SourceError> {
        let ours = SourceIdentity {
            server_uuid: server.server_uuid.clone(),
            server_id: server.server_id,
            database: self.config.url.database().to_owned(),
        };
        let log = writer.log();
        match log.source_identity()? {
            None => {
                let bytes = postcard::to_allocvec(&ours).map_err(|e| {
                    SourceError::Binlog(format!("encoding the source identity: {e}"))
                })?;
                log.set_source_identity(&bytes).await?;
                Ok(())
            }
            Some(bytes) => {
                match postcard::from_bytes::<SourceIdentity>(&bytes) {
                    Ok(theirs) if theirs == ours => Ok(()),
                    Ok(theirs) => Err(SourceError::Prerequisite(format!(
                    "the offset log in {} was captured from MySQL server id {}{} (database {}), \
                     but {} is server id {}{} (database {}): its positions mean nothing there. \
                     To capture this server from scratch, stop the agent and move the data_dir \
                     away (its log and sink cursors), then start again",
                    log.path().display(),
                    theirs.server_id,
                    theirs.server_uuid.map(|u| format!(", uuid {u}")).unwrap_or_default(),
                    theirs.database,
                    self.config.url.redacted(),
                    ours.server_id,
                    ours.server_uuid.map(|u| format!(", uuid {u}")).unwrap_or_default(),
                    ours.database,
                ))),
                    Err(_) => Err(SourceError::Prerequisite(format!(
                        "the offset log in {} was captured from another kind of source; point \
                     data_dir at a new directory to capture MySQL",
                        log.path().display()
                    ))),
                }
            }
        }
    }
}

/// A connection to the configured server, within `connect_timeout`.
async fn connect(config: &MySqlSourceConfig) -> Result<Conn, SourceError> {
    let connect = Conn::new(config.url.opts());
    let conn = tokio::time::timeout(config.connect_timeout, connect)
        .await
        .map_err(|_| SourceError::Connect {
            url: config.url.redacted(),
            message: format!("no answer within {:?}", config.connect_timeout),
        })?;
    conn.map_err(|e| match e {
        mysql_async::Error::Server(server) => SourceError::Query {
            doing: format!("connecting to {}", config.url.redacted()),
            message: server.message.clone(),
            code: Some(server.code),
        },
        other => SourceError::Connect {
            url: config.url.redacted(),
            message: other.to_string(),
        },
    })
}

/// Where the last transaction the log holds ends, to resume there.
fn resume_point(writer: &LogWriter) -> Result<Option<BinlogStart>, SourceError> {
    let log = writer.log();
    let durable = log.durable();
    if durable.seq == 0 {
        return Ok(None);
    }
    let Some((_, begin)) = log.transaction_of(durable.seq)? else {
        return Ok(None);
    };
    match begin.origin {
        TxOrigin::MySql {
            file, gtid_state, ..
        } => Ok(Some(BinlogStart {
            file,
            offset: durable.end_position.binlog_offset(),
            gtid_state,
        })),
        TxOrigin::Postgres { .. } => Err(SourceError::Prerequisite(format!(
            "the offset log in {} holds PostgreSQL transactions; point data_dir at a new \
             directory to capture MySQL",
            log.path().display()
        ))),
    }
}

/// The server's binlog position now (`SHOW MASTER STATUS`) and its GTID state, read until
/// the state is the same before and after the position (a commit between the two reads
/// would put a transaction in the state that the position has not passed).
async fn current_position(conn: &mut Conn) -> Result<BinlogStart, SourceError> {
    let mut before = check::gtid_state(conn).await?;
    loop {
        let row: Option<mysql_async::Row> =
            conn.query_first("SHOW MASTER STATUS").await.map_err(|e| {
                SourceError::query("reading the binlog position (SHOW MASTER STATUS)", e)
            })?;
        let row = row.ok_or_else(|| {
            SourceError::Prerequisite(
                "the server's binary log is off; start it with --log-bin (and \
                 --binlog-format=ROW --binlog-row-image=FULL)"
                    .into(),
            )
        })?;
        let after = check::gtid_state(conn).await?;
        if after == before {
            return Ok(BinlogStart {
                file: row.get(0).unwrap_or_default(),
                offset: row.get(1).unwrap_or_default(),
                gtid_state: after,
            });
        }
        before = after;
    }
}

/// Logs an empty transaction at `start`, so that a restart resumes there (and not at the
/// position of its own start, skipping what committed meanwhile).
async fn log_starting_point(
    writer: &mut LogWriter,
    server: &Server,
    start: &BinlogStart,
) -> Result<(), SourceError> {
    let position = Position::binlog(file_number(&start.file)?, start.offset);
    let now = snapshot::unix_micros_now();
    writer.append(&Record::Begin(TxBegin {
        commit_position: position_below(position),
        commit_ts: now,
        origin: TxOrigin::MySql {
            server_id: server.server_id,
            thread: 0,
            file: start.file.clone(),
            gtid: None,
            gtid_state: start.gtid_state.clone(),
        },
    }))?;
    writer.append(&Record::Commit(TxCommit {
        commit_position: position_below(position),
        end_position: position,
        commit_ts: now,
    }))?;
    writer.log().flush().await?;
    Ok(())
}

/// The position a transaction logged for the start of capture takes: strictly below the
/// binlog position the stream starts at, whose first transaction is not in the log yet and
/// must not be taken for one it holds.
fn position_below(start: Position) -> Position {
    Position(start.0.saturating_sub(1))
}
