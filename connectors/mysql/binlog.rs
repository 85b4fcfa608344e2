//! The binlog stream into the log: each transaction that touches a captured table becomes
//! Begin, its changes, Commit; row images are decoded with the catalog's description of their
//! table, re-read when a DDL statement or a row event with another column count says the
//! table changed (the change is logged as a `SchemaChange` before the rows that follow it).

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use mysql_async::binlog::events::{
    Event, EventData, GtidEvent, QueryEvent, RotateEvent, RowsEventData, TableMapEvent,
};
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, Sid};
use tokio_util::sync::CancellationToken;

use super::catalog::{self, CatalogColumn};
use super::decode::{ColumnDecoder, Origin};
use super::row_image::{Cell, RowImages, RowLayout};
use super::{compressed, table_map};
use super::{file_number, BinlogStart, MySqlSource, Server, SourceError};
use crate::config::TablePattern;
use crate::connectors::backpressure::{self, Backpressure};
use crate::event::{
    ChangeEvent, ColumnChange, ExistingRows, Op, Position, Record, Relation, RelationId, Row,
    SchemaChange, TxBegin, TxCommit, TxOrigin,
};
use crate::log::LogWriter;

// Event types the stream acts on or knows to pass over (MySQL's and MariaDB's numbering).
const QUERY: u8 = 2;
const ROTATE: u8 = 4;
const XID: u8 = 16;
const TABLE_MAP: u8 = 19;
const WRITE_ROWS_V1: u8 = 23;
const UPDATE_ROWS_V1: u8 = 24;
const DELETE_ROWS_V1: u8 = 25;
const WRITE_ROWS: u8 = 30;
const UPDATE_ROWS: u8 = 31;
const DELETE_ROWS: u8 = 32;
const GTID: u8 = 33;
const PARTIAL_UPDATE_ROWS: u8 = 39;
const TRANSACTION_PAYLOAD: u8 = 40;
const MARIADB_GTID: u8 = 162;
/// Events that carry nothing a change needs: format description, heartbeat, previous GTIDs,
/// MariaDB's annotate rows, binlog checkpoint, GTID list, start encryption, and the
/// statement-level context events.
const PASSED_OVER: &[u8] = &[
    3, 5, 13, 14, 15, 27, 28, 29, 34, 35, 36, 38, 160, 161, 163, 164,
];
/// The server's "cannot read from this binlog position" (`ER_MASTER_FATAL_ERROR_READING_BINLOG`):
/// the binlog holding it, or the GTIDs after it, was purged.
const BINLOG_POSITION_UNREADABLE: u16 = 1236;
/// MariaDB's GTID event flag: the transaction is one statement without BEGIN and COMMIT
/// (DDL).
const MARIADB_GTID_STANDALONE: u8 = 1;
/// An event a reader that does not know its type may pass over (`LOG_EVENT_IGNORABLE_F`).
const IGNORABLE_FLAG: u16 = 0x80;

/// A captured table as the stream decodes it.
struct Table {
    id: RelationId,
    relation: Arc<Relation>,
    catalog: Vec<CatalogColumn>,
    decoders: Vec<ColumnDecoder>,
    /// Its row images' layout, from the last table map that described it.
    layout: Option<RowLayout>,
    /// A DDL statement ran in its database since it was described.
    stale: bool,
    /// Columns renamed since it was described, (from, to), as the DDL statements said.
    renames: Vec<(String, String)>,
}

/// The captured tables by (database, table).
pub struct Tables {
    patterns: Vec<TablePattern>,
    require_primary_keys: bool,
    by_name: HashMap<(String, String), Table>,
}

impl Tables {
    /// Describes every captured table that exists now.
    pub async fn load(
        conn: &mut Conn,
        patterns: &[TablePattern],
        require_primary_keys: bool,
        writer: &mut LogWriter,
    ) -> Result<Tables, SourceError> {
        let names = catalog::captured_tables(conn, patterns).await?;
        if names.is_empty() {
            return Err(SourceError::Prerequisite(format!(
                "source.tables ({}) matches no table; create the tables or fix the patterns",
                patterns
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut tables = Tables {
            patterns: patterns.to_vec(),
            require_primary_keys,
            by_name: HashMap::new(),
        };
        for (database, table) in names {
            let columns = catalog::columns(conn, &database, &table).await?;
            let described = tables.describe(&database, &table, columns, writer)?;
            tables.by_name.insert((database, table), described);
        }
        Ok(tables)
    }

    /// The captured tables, as (relation id, description, catalog columns).
    pub fn iter(&self) -> impl Iterator<Item = (RelationId, &Arc<Relation>, &[ColumnDecoder])> {
        self.by_name
            .values()
            .map(|t| (t.id, &t.relation, t.decoders.as_slice()))
    }

    fn describe(
        &self,
        database: &str,
        table: &str,
        columns: Vec<CatalogColumn>,
        writer: &mut LogWriter,
    ) -> Result<Table, SourceError> {
        if self.require_primary_keys && !columns.iter().any(|c| c.primary_key) {
            return Err(SourceError::Prerequisite(format!(
                "table {database}.{table} has no primary key, which a table sink needs to apply \
                 its changes; add one (ALTER TABLE {database}.{table} ADD PRIMARY KEY (…)) or \
                 leave it out of source.tables"
            )));
        }
        let relation = catalog::relation(database, table, &columns);
        let decoders = columns
            .iter()
            .zip(&relation.columns)
            .map(|(c, column)| ColumnDecoder::new(c, column.value_type.clone()))
            .collect();
        let (id, relation) = writer.relation(relation)?;
        Ok(Table {
            id,
            relation,
            catalog: columns,
            decoders,
            layout: None,
            stale: false,
            renames: Vec::new(),
        })
    }
}

/// What a session streams with.
pub struct Stream {
    pub conn: Conn,
    /// A second connection, for the catalog while the first streams.
    pub catalog: Conn,
    pub tables: Tables,
    pub server: Server,
    pub start: BinlogStart,
}

/// The transaction being read.
struct OpenTransaction {
    /// Where it starts in the binlog: its `commit_position`.
    position: Position,
    commit_ts: i64,
    gtid: Option<String>,
    server_id: u32,
    thread: u32,
    /// MariaDB's standalone statement (DDL): it ends with its query.
    standalone: bool,
    /// Its Begin is in the log (it touched a captured table and the log lacks it).
    logging: bool,
    /// The log holds it already (a restart read it again).
    skipping: bool,
    changes: HashMap<String, u64>,
}

struct Reader<'a> {
    source: &'a MySqlSource,
    tables: Tables,
    catalog: Conn,
    server: Server,
    file: String,
    file_number: u32,
    gtid_state: Option<String>,
    open: Option<OpenTransaction>,
    /// The transaction payload being unpacked (MySQL's compressed transactions).
    payload: Option<Payload>,
}

/// A compressed transaction (MySQL's `TRANSACTION_PAYLOAD`): its events follow it with no
/// position of their own.
struct Payload {
    position: Position,
    /// Whether any of its events arrived.
    unpacked: bool,
}

pub async fn stream(
    source: &MySqlSource,
    stream: Stream,
    writer: &mut LogWriter,
    cancel: &CancellationToken,
) -> Result<(), SourceError> {
    let Stream {
        mut conn,
        catalog,
        tables,
        server,
        start,
    } = stream;
    if server.mariadb {
        // GTID events as themselves (not as BEGIN queries), and the GTID list events.
        conn.query_drop("SET @mariadb_slave_capability = 4")
            .await
            .map_err(|e| SourceError::query("announcing the replica's capabilities", e))?;
    }
    let request = BinlogStreamRequest::new(source.config.server_id)
        .with_filename(start.file.as_bytes())
        .with_pos(start.offset);
    // By GTID where the server has them: the position means the same on a server whose
    // binlog files were renamed or rebuilt; file and offset where GTIDs are off, or where
    // none was logged yet (an empty state asks for the server's whole binlog).
    let gtid_state = start
        .gtid_state
        .as_deref()
        .filter(|state| !state.is_empty());
    let request = match (gtid_state, server.mariadb) {
        (Some(state), true) => {
            conn.exec_drop("SET @slave_connect_state = ?", (state,))
                .await
                .map_err(|e| SourceError::query("giving the server the GTID state", e))?;
            request
        }
        (Some(state), false) => request.with_gtid().with_gtid_set(mysql_gtid_set(state)?),
        (None, _) => request,
    };
    let mut events = conn.get_binlog_stream(request).await.map_err(|e| match e {
        mysql_async::Error::Server(error) if error.code == BINLOG_POSITION_UNREADABLE => {
            SourceError::Prerequisite(format!(
                "the server cannot send the binlog from where the log's last transaction \
                     ends ({} offset {}, GTID state {}): {}. Capture again from a new \
                     snapshot: stop the agent, move the data_dir away, and start it (the sinks' \
                     tables are replaced by the snapshot); keep the binlog longer \
                     (binlog_expire_logs_seconds) from then on",
                start.file,
                start.offset,
                start.gtid_state.as_deref().unwrap_or("none"),
                error.message
            ))
        }
        e => SourceError::query("starting the binlog stream", e),
    })?;
    tracing::info!(
        file = %start.file,
        offset = start.offset,
        gtid_state = start.gtid_state.as_deref().unwrap_or(""),
        "streaming the binlog"
    );
    source.telemetry.source_connected();
    let mut reader = Reader {
        source,
        tables,
        catalog,
        file_number: file_number(&start.file)?,
        file: start.file,
        gtid_state: start.gtid_state,
        server,
        open: None,
        payload: None,
    };
    let mut backpressure = Backpressure::new(source.log_max_bytes);
    let mut pressure_timer = tokio::time::interval(backpressure::CHECK_INTERVAL);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = pressure_timer.tick() => backpressure.update(writer.log(), &source.telemetry)?,
            event = events.next(), if !backpressure.paused => match event {
                Some(Ok(event)) => reader.event(&event, &events, writer).await?,
                Some(Err(e)) => return Err(SourceError::query("reading the binlog", e)),
                None => return Err(SourceError::Binlog("the server ended the binlog stream".into())),
            },
        }
    }
    writer.discard_uncommitted()?;
    writer.log().flush().await?;
    Ok(())
}

impl Reader<'_> {
    async fn event(
        &mut self,
        event: &Event,
        events: &mysql_async::BinlogStream,
        writer: &mut LogWriter,
    ) -> Result<(), SourceError> {
        let position = self.position_of(event)?;
        let bad = |e: std::io::Error| {
            SourceError::Binlog(format!(
                "event of type {} at {} offset {}: {e}",
                event.header().event_type_raw(),
                self.file,
                position.binlog_offset()
            ))
        };
        let unwrapped;
        let event = if compressed::is_compressed(event.header().event_type_raw()) {
            unwrapped = compressed::unwrap(event).map_err(bad)?;
            &unwrapped
        } else {
            event
        };
        let header = event.header();
        let event_type = header.event_type_raw();
        match event_type {
            ROTATE => {
                let rotate: RotateEvent<'_> = event.read_event().map_err(bad)?;
                self.file = rotated_file(rotate.name_raw()).ok_or_else(|| {
                    SourceError::Binlog(format!(
                        "a rotate event names binlog file {:?}, not a binlog file name",
                        rotate.name()
                    ))
                })?;
                self.file_number = file_number(&self.file)?;
            }
            MARIADB_GTID => {
                let data = event.data();
                let (Some(seq), Some(domain), Some(&flags)) = (
                    data.get(0..8)
                        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default())),
                    data.get(8..12)
                        .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default())),
                    data.get(12),
                ) else {
                    return Err(SourceError::Binlog(format!(
                        "a MariaDB GTID event at {} offset {} is too short",
                        self.file,
                        position.binlog_offset()
                    )));
                };
                let gtid = format!("{domain}-{}-{seq}", header.server_id());
                self.begin(position, header.timestamp(), Some(gtid), header.server_id());
                if let Some(open) = &mut self.open {
                    open.standalone = flags & MARIADB_GTID_STANDALONE != 0;
                }
            }
            GTID => {
                let gtid: GtidEvent = event.read_event().map_err(bad)?;
                let uuid = uuid_text(&gtid.sid());
                self.begin(
                    position,
                    header.timestamp(),
                    Some(format!("{uuid}:{}", gtid.gno())),
                    header.server_id(),
                );
                if let (Some(open), micros) = (&mut self.open, gtid.original_commit_timestamp()) {
                    if micros > 0 {
                        open.commit_ts = i64::try_from(micros).unwrap_or(open.commit_ts);
                    }
                }
            }
            QUERY => {
                let query: QueryEvent<'_> = event.read_event().map_err(bad)?;
                let text = query.query();
                let statement = text.trim();
                if statement.eq_ignore_ascii_case("BEGIN") {
                    if self.open.is_none() {
                        self.begin(position, header.timestamp(), None, header.server_id());
                    }
                    if let Some(open) = &mut self.open {
                        open.thread = query.thread_id();
                    }
                } else if statement.eq_ignore_ascii_case("COMMIT") {
                    self.commit(header.log_pos(), writer).await?;
                } else if statement.eq_ignore_ascii_case("ROLLBACK") {
                    self.open = None;
                } else {
                    self.ddl(&query.schema(), statement);
                    // A DDL statement is a transaction of its own.
                    if self
                        .open
                        .as_ref()
                        .is_none_or(|open| open.standalone || !open.logging)
                    {
                        self.commit(header.log_pos(), writer).await?;
                    }
                }
            }
            XID => self.commit(header.log_pos(), writer).await?,
            TABLE_MAP => {}
            WRITE_ROWS_V1 | UPDATE_ROWS_V1 | DELETE_ROWS_V1 | WRITE_ROWS | UPDATE_ROWS
            | DELETE_ROWS => {
                let Some(EventData::RowsEvent(rows)) = event.read_data().map_err(bad)? else {
                    return Err(bad(std::io::Error::other("not a rows event")));
                };
                let Some(table_map) = events.get_tme(rows.table_id()) else {
                    return Err(SourceError::Binlog(format!(
                        "a rows event at {} offset {} names table id {}, which no table map \
                         event described",
                        self.file,
                        position.binlog_offset(),
                        rows.table_id()
                    )));
                };
                self.rows(&rows, table_map, position, writer).await?;
            }
            PARTIAL_UPDATE_ROWS => {
                return Err(SourceError::Prerequisite(
                    "the binlog holds a partial JSON update, which carries no whole row; SET \
                     PERSIST binlog_row_value_options = '' on the server"
                        .into(),
                ))
            }
            TRANSACTION_PAYLOAD => {
                self.payload = Some(Payload {
                    position,
                    unpacked: false,
                })
            }
            t if PASSED_OVER.contains(&t) => {}
            t if header.flags().bits() & IGNORABLE_FLAG != 0 => {
                tracing::debug!(event_type = t, "passing over an ignorable binlog event");
            }
            t => {
                return Err(SourceError::Binlog(format!(
                    "unknown event type {t} at {} offset {}; stopping rather than passing over \
                     what may be a change",
                    self.file,
                    position.binlog_offset()
                )))
            }
        }
        Ok(())
    }

    /// Where an event starts: its end (`log_pos`) less its size, or the payload's position
    /// for the events unpacked from a compressed transaction.
    fn position_of(&mut self, event: &Event) -> Result<Position, SourceError> {
        let header = event.header();
        if header.log_pos() == 0 {
            if let Some(payload) = &mut self.payload {
                payload.unpacked = true;
                return Ok(payload.position);
            }
        } else if let Some(payload) = self.payload.take() {
            // mysql_async unpacks a payload it cannot decompress into no events at all.
            if !payload.unpacked {
                return Err(SourceError::Binlog(format!(
                    "the compressed transaction at {} offset {} could not be decompressed; \
                     stopping rather than passing over its changes",
                    self.file,
                    payload.position.binlog_offset()
                )));
            }
        }
        let end = u64::from(header.log_pos());
        Ok(Position::binlog(
            self.file_number,
            end.saturating_sub(u64::from(header.event_size())),
        ))
    }

    fn begin(&mut self, position: Position, timestamp: u32, gtid: Option<String>, server_id: u32) {
        self.open = Some(OpenTransaction {
            position,
            commit_ts: i64::from(timestamp) * 1_000_000,
            gtid,
            server_id,
            thread: 0,
            standalone: false,
            logging: false,
            skipping: false,
            changes: HashMap::new(),
        });
    }

    /// A DDL statement in `database`: its captured tables are described again before their
    /// next rows. (The statement may name tables of other databases; a rename moves tables:
    /// every captured table is checked then.)
    fn ddl(&mut self, database: &str, statement: &str) {
        let renames_tables = statement.to_ascii_uppercase().starts_with("RENAME");
        let altered = alter_table_renames(statement);
        for ((db, name), table) in &mut self.tables.by_name {
            if renames_tables || db == database || statement.contains(db.as_str()) {
                table.stale = true;
            }
            if let Some(altered) = &altered {
                if altered.table == *name && altered.database.as_deref().unwrap_or(database) == db {
                    table.renames.extend(altered.renames.iter().cloned());
                }
            }
        }
    }

    /// The Begin of the open transaction, written before its first captured change.
    fn log_begin(&mut self, writer: &mut LogWriter) -> Result<bool, SourceError> {
        let Some(open) = &mut self.open else {
            return Err(SourceError::Binlog(format!(
                "a row change outside a transaction in {}",
                self.file
            )));
        };
        if open.logging {
            return Ok(true);
        }
        if open.skipping || open.position <= writer.last_appended().commit_position {
            open.skipping = true;
            return Ok(false);
        }
        if let (Some(gtid), Some(state)) = (&open.gtid, &self.gtid_state) {
            self.gtid_state = Some(advance_gtid_state(state, gtid, self.server.mariadb));
        }
        writer.append(&Record::Begin(TxBegin {
            commit_position: open.position,
            commit_ts: open.commit_ts,
            origin: TxOrigin::MySql {
                server_id: open.server_id,
                thread: open.thread,
                file: self.file.clone(),
                gtid: open.gtid.clone(),
                gtid_state: self.gtid_state.clone(),
            },
        }))?;
        open.logging = true;
        Ok(true)
    }

    async fn commit(&mut self, end: u32, writer: &mut LogWriter) -> Result<(), SourceError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        if let (Some(gtid), Some(state)) = (&open.gtid, &self.gtid_state) {
            if !open.logging {
                self.gtid_state = Some(advance_gtid_state(state, gtid, self.server.mariadb));
            }
        }
        if !open.logging {
            return Ok(());
        }
        writer.append(&Record::Commit(TxCommit {
            commit_position: open.position,
            end_position: Position::binlog(self.file_number, u64::from(end)),
            commit_ts: open.commit_ts,
        }))?;
        for (table, changes) in open.changes {
            self.source.telemetry.captured(&table, changes);
        }
        let logged = Position::binlog(self.file_number, u64::from(end));
        self.source
            .telemetry
            .source_positions(logged, logged, writer.log().durable().end_position);
        Ok(())
    }

    async fn rows(
        &mut self,
        rows: &RowsEventData<'_>,
        table_map: &TableMapEvent<'_>,
        position: Position,
        writer: &mut LogWriter,
    ) -> Result<(), SourceError> {
        let database = table_map.database_name().into_owned();
        let table_name = table_map.table_name().into_owned();
        let key = (database.clone(), table_name.clone());
        if !self.tables.by_name.contains_key(&key)
            && !self
                .tables
                .patterns
                .iter()
                .any(|p| p.matches(&database, &table_name))
        {
            return Ok(());
        }
        if !self.log_begin(writer)? {
            return Ok(());
        }
        self.refresh_table(&key, table_map, position, writer)
            .await?;
        let Some(table) = self.tables.by_name.get_mut(&key) else {
            return Ok(());
        };
        let at = |what: String| {
            SourceError::Binlog(format!(
                "a row of {database}.{table_name} at {} offset {}: {what}",
                self.file,
                position.binlog_offset()
            ))
        };
        if !table
            .layout
            .as_ref()
            .is_some_and(|l| l.describes(table_map))
        {
            table.layout = Some(RowLayout::new(table_map).map_err(|e| at(e.to_string()))?);
        }
        let table = &*table;
        let Some(layout) = &table.layout else {
            return Ok(());
        };
        let op = match rows {
            RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => Op::Insert,
            RowsEventData::UpdateRowsEventV1(_) | RowsEventData::UpdateRowsEvent(_) => Op::Update,
            _ => Op::Delete,
        };
        let count_columns = layout.column_count();
        // The columns each image carries, from the event's column bitmaps.
        let before_columns = rows.columns_before_image().map(|bits| {
            bits.iter_ones()
                .take_while(|&i| i < count_columns)
                .collect::<Vec<_>>()
        });
        let after_columns = rows.columns_after_image().map(|bits| {
            bits.iter_ones()
                .take_while(|&i| i < count_columns)
                .collect::<Vec<_>>()
        });
        let mut images = RowImages::new(layout, rows.rows_data());
        let mut cells = Vec::with_capacity(count_columns);
        let mut count = 0;
        while !images.is_empty() {
            let mut image = |columns: &Option<Vec<usize>>| -> Result<Option<Row>, SourceError> {
                let Some(columns) = columns else {
                    return Ok(None);
                };
                images
                    .image(columns, &mut cells)
                    .map_err(|e| at(e.to_string()))?;
                decode_row(table, &mut cells).map(Some)
            };
            let before = image(&before_columns)?;
            let after = image(&after_columns)?;
            writer.append(&Record::Change(ChangeEvent {
                relation: table.id,
                position,
                op,
                before,
                after,
            }))?;
            count += 1;
        }
        if let Some(open) = &mut self.open {
            *open
                .changes
                .entry(table.relation.qualified_name())
                .or_default() += count;
        }
        Ok(())
    }

    /// Describes the table again when it is new, a DDL statement may have changed it, or the
    /// row event's column count differs; logs what changed.
    async fn refresh_table(
        &mut self,
        key: &(String, String),
        table_map: &TableMapEvent<'_>,
        position: Position,
        writer: &mut LogWriter,
    ) -> Result<(), SourceError> {
        let column_count = usize::try_from(table_map.columns_count()).unwrap_or(usize::MAX);
        let current = self.tables.by_name.get(key);
        if current.is_some_and(|t| !t.stale && t.relation.columns.len() == column_count) {
            return Ok(());
        }
        let (database, table_name) = key;
        let now = catalog::columns(&mut self.catalog, database, table_name).await?;
        let columns = match table_map::columns(table_map) {
            // The catalog as it is now, or as it was when last described, where it agrees
            // with the binlog; the binlog's own description where neither does (a column
            // a later statement dropped or changed).
            Some(mapped) => mapped
                .into_iter()
                .map(|mapped| {
                    now.iter()
                        .chain(current.iter().flat_map(|t| &t.catalog))
                        .find(|column| table_map::agrees(column, &mapped))
                        .cloned()
                        .unwrap_or(mapped)
                })
                .collect(),
            None if now.len() == column_count => now,
            None => {
                return Err(SourceError::Binlog(format!(
                    "the binlog's rows of {database}.{table_name} at {} offset {} have \
                     {column_count} columns, the table has another shape now (a later ALTER \
                     TABLE): set binlog_row_metadata = FULL on the server so that the binlog \
                     describes its columns, then capture again from a new snapshot",
                    self.file,
                    position.binlog_offset()
                )))
            }
        };
        let described = self
            .tables
            .describe(database, table_name, columns, writer)?;
        let previous = self.tables.by_name.remove(key);
        if let Some(previous) = previous {
            if previous.relation != described.relation {
                let changes = diff_columns(&previous, &described);
                tracing::info!(
                    table = %described.relation.qualified_name(),
                    ?changes,
                    "schema change"
                );
                writer.append(&Record::Schema(SchemaChange {
                    relation: described.id,
                    position,
                    columns: changes,
                    exact: false,
                }))?;
            }
        }
        self.tables.by_name.insert(key.clone(), described);
        Ok(())
    }
}

/// A MySQL GTID set (`uuid:1-5:7,uuid2:1-9`) as the binlog dump request takes it.
fn mysql_gtid_set(state: &str) -> Result<Vec<Sid<'static>>, SourceError> {
    state
        .split(',')
        .map(str::trim)
        .filter(|sid| !sid.is_empty())
        .map(|sid| {
            sid.parse().map_err(|e| {
                SourceError::Binlog(format!(
                    "the log's GTID state {state:?} does not parse: {e}"
                ))
            })
        })
        .collect()
}

/// The file a rotate event names. The rotate event the server sends first, before the
/// format description that says events carry checksums, is read with its checksum as part of
/// the name: four bytes after `name.000042`.
fn rotated_file(raw: &[u8]) -> Option<String> {
    let is_file = |name: &&str| {
        name.rsplit_once('.').is_some_and(|(base, number)| {
            !base.is_empty() && !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())
        })
    };
    let whole = std::str::from_utf8(raw).ok().filter(is_file);
    let without_checksum = raw
        .len()
        .checked_sub(4)
        .and_then(|end| std::str::from_utf8(&raw[..end]).ok())
        .filter(is_file);
    whole.or(without_checksum).map(str::to_owned)
}

/// What changed between two descriptions of a table: renames as the DDL statements said
/// (`before.renames`), the rest by column name.
fn diff_columns(before: &Table, after: &Table) -> Vec<ColumnChange> {
    let mut changes = Vec::new();
    let has = |relation: &Relation, name: &str| relation.columns.iter().any(|c| c.name == name);
    // A name as the new description has it → the name it had before.
    let mut old_names: HashMap<&str, &str> = HashMap::new();
    for (from, to) in &before.renames {
        let from = old_names.remove(from.as_str()).unwrap_or(from);
        if has(&before.relation, from) && !has(&after.relation, from) && has(&after.relation, to) {
            old_names.insert(to, from);
        }
    }
    for (to, from) in &old_names {
        changes.push(ColumnChange::Renamed {
            from: (*from).to_owned(),
            to: (*to).to_owned(),
        });
    }
    for old in &before.relation.columns {
        if !has(&after.relation, &old.name) && !old_names.values().any(|from| *from == old.name) {
            changes.push(ColumnChange::Dropped {
                name: old.name.clone(),
            });
        }
    }
    for (new, catalog) in after.relation.columns.iter().zip(&after.catalog) {
        let old_name = old_names
            .get(new.name.as_str())
            .copied()
            .unwrap_or(&new.name);
        match before.relation.columns.iter().find(|c| c.name == old_name) {
            Some(old) if (old.type_oid, old.type_modifier) != (new.type_oid, new.type_modifier) => {
                changes.push(ColumnChange::Retyped {
                    name: new.name.clone(),
                    from: old.clone(),
                    time_zone: None,
                })
            }
            Some(_) => {}
            None => changes.push(ColumnChange::Added {
                name: new.name.clone(),
                existing_rows: catalog.existing_rows(),
            }),
        }
    }
    changes
}

fn decode_row(table: &Table, cells: &mut Vec<(usize, Cell)>) -> Result<Row, SourceError> {
    if cells.len() != table.decoders.len() {
        return Err(SourceError::Prerequisite(format!(
            "a row image of {} has {} of its {} columns: set binlog_row_image = FULL on the \
             server",
            table.relation.qualified_name(),
            cells.len(),
            table.decoders.len()
        )));
    }
    cells
        .drain(..)
        .zip(&table.decoders)
        .map(|((i, cell), decoder)| match cell {
            Cell::Value(value) => decoder.value(value, Origin::Binlog).map_err(|e| {
                SourceError::Binlog(format!(
                    "column {} of {}: {e}",
                    table.relation.columns[i].name,
                    table.relation.qualified_name()
                ))
            }),
            Cell::Json(text) => Ok(crate::event::Value::Json(text)),
        })
        .collect()
}

/// The table an `ALTER TABLE` statement alters (its database when named) and the columns it
/// renames (`RENAME COLUMN a TO b`, `CHANGE [COLUMN] a b …`), in order; None for other
/// statements.
fn alter_table_renames(statement: &str) -> Option<AlterTable> {
    let tokens = sql_tokens(statement);
    let keyword = |i: usize, word: &str| {
        tokens
            .get(i)
            .is_some_and(|(t, quoted)| !quoted && t.eq_ignore_ascii_case(word))
    };
    let mut i = 0;
    if !keyword(i, "ALTER") {
        return None;
    }
    i += 1;
    while keyword(i, "ONLINE") || keyword(i, "IGNORE") {
        i += 1;
    }
    if !keyword(i, "TABLE") {
        return None;
    }
    i += 1;
    if keyword(i, "IF") && keyword(i + 1, "EXISTS") {
        i += 2;
    }
    let mut name = tokens.get(i)?.0.clone();
    let mut database = None;
    if tokens.get(i + 1).is_some_and(|(t, q)| !q && t == ".") {
        database = Some(name);
        name = tokens.get(i + 2)?.0.clone();
        i += 2;
    }
    i += 1;
    let mut renames = Vec::new();
    let mut depth = 0;
    let mut clause_start = true;
    while i < tokens.len() {
        let (token, quoted) = &tokens[i];
        if !quoted {
            match token.as_str() {
                "(" => depth += 1,
                ")" => depth -= 1,
                "," if depth == 0 => {
                    clause_start = true;
                    i += 1;
                    continue;
                }
                _ => {}
            }
        }
        if clause_start && depth == 0 {
            let column = usize::from(keyword(i + 1, "COLUMN"));
            if keyword(i, "RENAME") && column == 1 && keyword(i + 3, "TO") {
                if let (Some((from, _)), Some((to, _))) = (tokens.get(i + 2), tokens.get(i + 4)) {
                    renames.push((from.clone(), to.clone()));
                }
            } else if keyword(i, "CHANGE") {
                let at = i + 1 + column;
                if let (Some((from, _)), Some((to, _))) = (tokens.get(at), tokens.get(at + 1)) {
                    if from != to {
                        renames.push((from.clone(), to.clone()));
                    }
                }
            }
        }
        clause_start = false;
        i += 1;
    }
    Some(AlterTable {
        database,
        table: name,
        renames,
    })
}

/// What an `ALTER TABLE` statement says of renamed columns.
#[derive(Debug, PartialEq, Eq)]
struct AlterTable {
    database: Option<String>,
    table: String,
    /// (from, to), in order.
    renames: Vec<(String, String)>,
}

/// Words, backquoted names (unquoted, flagged) and single punctuation of an SQL statement;
/// string literals are skipped.
fn sql_tokens(statement: &str) -> Vec<(String, bool)> {
    let mut tokens = Vec::new();
    let mut chars = statement.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '`' => {
                let mut name = String::new();
                while let Some(c) = chars.next() {
                    if c == '`' {
                        if chars.peek() == Some(&'`') {
                            chars.next();
                            name.push('`');
                        } else {
                            break;
                        }
                    } else {
                        name.push(c);
                    }
                }
                tokens.push((name, true));
            }
            '\'' | '"' => {
                while let Some(inner) = chars.next() {
                    if inner == '\\' {
                        chars.next();
                    } else if inner == c {
                        break;
                    }
                }
                tokens.push((String::new(), true));
            }
            c if c.is_alphanumeric() || c == '_' || c == '$' => {
                let mut word = c.to_string();
                while let Some(&next) = chars.peek() {
                    if next.is_alphanumeric() || next == '_' || next == '$' {
                        word.push(next);
                        chars.next();
                    } else {
                        break;
                    }
                }
                tokens.push((word, false));
            }
            c if c.is_whitespace() => {}
            c => tokens.push((c.to_string(), false)),
        }
    }
    tokens
}

/// A MySQL server uuid in its text form.
fn uuid_text(sid: &[u8; 16]) -> String {
    let hex: String = sid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The GTID state once `gtid` is applied: MariaDB's `domain-server-seq` list (one per
/// domain), or MySQL's executed set (`uuid:1-42`, intervals per uuid).
pub fn advance_gtid_state(state: &str, gtid: &str, mariadb: bool) -> String {
    let entries = state
        .split(',')
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty());
    if mariadb {
        let domain = gtid.split('-').next().unwrap_or_default();
        let mut out: Vec<String> = entries
            .filter(|e| e.split('-').next() != Some(domain))
            .collect();
        out.push(gtid.to_owned());
        out.sort_by_key(|e| e.split('-').next().and_then(|d| d.parse::<u32>().ok()));
        return out.join(",");
    }
    let Some((uuid, gno)) = gtid.split_once(':') else {
        return state.to_owned();
    };
    let Ok(gno) = gno.parse::<u64>() else {
        return state.to_owned();
    };
    let mut found = false;
    let mut out: Vec<String> = entries
        .map(|entry| {
            let Some((entry_uuid, intervals)) = entry.split_once(':') else {
                return entry;
            };
            if !entry_uuid.eq_ignore_ascii_case(uuid) {
                return entry;
            }
            found = true;
            let mut parts: Vec<(u64, u64)> = intervals
                .split(':')
                .filter_map(|i| match i.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => i.parse().ok().map(|n| (n, n)),
                })
                .collect();
            if !parts.iter().any(|(a, b)| (*a..=*b).contains(&gno)) {
                match parts.iter_mut().find(|(_, b)| *b + 1 == gno) {
                    Some(part) => part.1 = gno,
                    None => parts.push((gno, gno)),
                }
                parts.sort_unstable();
            }
            let intervals: Vec<String> = parts
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            format!("{entry_uuid}:{}", intervals.join(":"))
        })
        .collect();
    if !found {
        out.push(format!("{uuid}:{gno}"));
    }
    out.join(",")
}

impl CatalogColumn {
    /// What the rows that existed before this column was added hold in it: its default when
    /// that is a constant (MySQL fills existing rows with it without logging them).
    fn existing_rows(&self) -> ExistingRows {
        match self.default.as_deref() {
            None | Some("NULL") => ExistingRows::Null,
            Some(text) => {
                if let Some(quoted) = text.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
                    ExistingRows::Value(quoted.replace("''", "'"))
                } else if text.parse::<f64>().is_ok() {
                    ExistingRows::Value(text.to_owned())
                } else {
                    ExistingRows::Unknown
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_file_name_loses_the_checksum_read_with_it() {
        assert_eq!(
            rotated_file(b"binlog.000001").as_deref(),
            Some("binlog.000001")
        );
        assert_eq!(
            rotated_file(b"binlog.000001f\x0f.\xee").as_deref(),
            Some("binlog.000001")
        );
        assert_eq!(
            rotated_file(b"mysql-bin.log.000123").as_deref(),
            Some("mysql-bin.log.000123")
        );
        assert_eq!(rotated_file(b"garbage"), None);
    }

    #[test]
    fn alter_table_statements_say_their_renames() {
        assert_eq!(
            alter_table_renames(
                "ALTER TABLE items RENAME COLUMN name TO title, CHANGE COLUMN qty quantity \
                 BIGINT UNSIGNED, ADD COLUMN c DECIMAL(10,2) DEFAULT 'a,b', CHANGE x x INT"
            ),
            Some(AlterTable {
                database: None,
                table: "items".to_owned(),
                renames: vec![
                    ("name".into(), "title".into()),
                    ("qty".into(), "quantity".into())
                ]
            })
        );
        assert_eq!(
            alter_table_renames("alter table `shop`.`my items` change `a``b` c int"),
            Some(AlterTable {
                database: Some("shop".into()),
                table: "my items".into(),
                renames: vec![("a`b".into(), "c".into())]
            })
        );
        assert_eq!(alter_table_renames("CREATE TABLE t (a INT)"), None);
    }

    #[test]
    fn a_mysql_gtid_set_parses_into_the_dump_request_sids() {
        use mysql_async::GnoInterval;
        let sids = mysql_gtid_set(
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7, 4e11fa47-71ca-11e1-9e33-c80aa9429562:9",
        )
        .unwrap();
        assert_eq!(sids.len(), 2);
        // A dump request's interval ends after its last GTID.
        assert_eq!(
            sids[0].intervals(),
            [GnoInterval::new(1, 6), GnoInterval::new(7, 8)]
        );
        assert_eq!(sids[1].intervals(), [GnoInterval::new(9, 10)]);
        assert_eq!(sids[1].uuid()[0], 0x4e);
        assert!(mysql_gtid_set("").unwrap().is_empty());
        assert!(mysql_gtid_set("not-a-uuid:1").is_err());
    }

    #[test]
    fn mariadb_gtid_state_keeps_one_entry_per_domain() {
        assert_eq!(
            advance_gtid_state("0-1-5,1-2-9", "0-1-6", true),
            "0-1-6,1-2-9"
        );
        assert_eq!(advance_gtid_state("", "3-7-1", true), "3-7-1");
        assert_eq!(advance_gtid_state("0-1-5", "2-1-1", true), "0-1-5,2-1-1");
    }

    #[test]
    fn mysql_gtid_state_extends_the_uuids_interval() {
        let uuid = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        assert_eq!(
            advance_gtid_state(&format!("{uuid}:1-5"), &format!("{uuid}:6"), false),
            format!("{uuid}:1-6")
        );
        assert_eq!(
            advance_gtid_state(&format!("{uuid}:1-5"), &format!("{uuid}:9"), false),
            format!("{uuid}:1-5:9")
        );
        assert_eq!(
            advance_gtid_state("", &format!("{uuid}:1"), false),
            format!("{uuid}:1")
        );
    }
}
