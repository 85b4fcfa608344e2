//! The change model every part of tidemark speaks: positions (`Position`), values, rows, the
//! relations they belong to, and the records a source appends to the offset log. It is
//! source-agnostic: a connector converts its wire values into `Value`s once, at capture, and
//! every sink reads the same model back from the log.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A position in a source's change stream, ordered within that source: PostgreSQL's WAL LSN;
/// for MySQL and MariaDB, the binlog file's number in the high 24 bits and the offset in that
/// file in the low 40 (see `connectors::mysql`). Shown in PostgreSQL's LSN notation, which
/// every target that orders by it (`pg_lsn`) reads.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Position(pub u64);

/// Bits of a binlog position that hold the offset in its file.
const BINLOG_OFFSET_BITS: u32 = 40;

impl Position {
    /// The position of `offset` in the binlog file numbered `file_number` (`binlog.000042` is
    /// 42): ordered as the server writes its binlog.
    pub fn binlog(file_number: u32, offset: u64) -> Position {
        Position((u64::from(file_number) << BINLOG_OFFSET_BITS) | offset)
    }

    /// The offset in its binlog file of a [`Position::binlog`] position.
    pub fn binlog_offset(self) -> u64 {
        self.0 & ((1 << BINLOG_OFFSET_BITS) - 1)
    }

    /// The binlog file number of a [`Position::binlog`] position.
    pub fn binlog_file_number(self) -> u32 {
        (self.0 >> BINLOG_OFFSET_BITS) as u32
    }
}

impl fmt::Display for Position {
    /// PostgreSQL's LSN notation, `16/B374D848`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (high, low) = s
            .split_once('/')
            .ok_or_else(|| format!("position {s:?} is not of the form X/X"))?;
        let high = u32::from_str_radix(high, 16).map_err(|e| format!("position {s:?}: {e}"))?;
        let low = u32::from_str_radix(low, 16).map_err(|e| format!("position {s:?}: {e}"))?;
        Ok(Position((u64::from(high) << 32) | u64::from(low)))
    }
}

/// How a column's values are represented, resolved once per column from the source's type
/// (domains resolved to their base type, enums to text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Text,
    Bytea,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
    Interval,
    Uuid,
    Json,
    Jsonb,
    Array(Box<ValueType>),
    /// Any other type (enums, geometric, network, ranges …): kept as its text form.
    Other,
}

impl ValueType {
    /// Every type but arrays, for tests and tables that go over all of them.
    pub const SCALARS: &'static [ValueType] = &[
        ValueType::Bool,
        ValueType::Int2,
        ValueType::Int4,
        ValueType::Int8,
        ValueType::Float4,
        ValueType::Float8,
        ValueType::Numeric,
        ValueType::Text,
        ValueType::Bytea,
        ValueType::Date,
        ValueType::Time,
        ValueType::TimeTz,
        ValueType::Timestamp,
        ValueType::TimestampTz,
        ValueType::Interval,
        ValueType::Uuid,
        ValueType::Json,
        ValueType::Jsonb,
        ValueType::Other,
    ];
}

/// One column value, converted from the source's representation at capture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    /// A TOASTed value the change did not touch: the source did not send it. Table sinks keep
    /// the value they hold; envelopes carry Debezium's placeholder.
    UnchangedToast,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Exact decimal text (also `NaN`, `Infinity`, `-Infinity`).
    Numeric(String),
    Text(String),
    Bytes(Vec<u8>),
    /// Days since 1970-01-01.
    Date(i32),
    /// Microseconds since midnight.
    Time(i64),
    /// Time of day with zone, as PostgreSQL's timetz keeps it: the local time of day and its
    /// zone, not normalised (`12:00:00+01` and `11:00:00+00` are different values).
    TimeTz {
        /// Local time of day in microseconds since midnight, `0..=86_400_000_000`
        /// (`24:00:00` is a valid time of day).
        micros: i64,
        /// UTC offset in seconds, east of Greenwich positive, as PostgreSQL prints it
        /// (`+05:30` is 19_800). PostgreSQL's internal `zone` field has the opposite sign.
        offset_secs: i32,
    },
    /// Microseconds since 1970-01-01 00:00, no zone; `i64::MAX`/`MIN` for ±infinity.
    Timestamp(i64),
    /// Microseconds since 1970-01-01 00:00 UTC; `i64::MAX`/`MIN` for ±infinity.
    TimestampTz(i64),
    Interval {
        months: i32,
        days: i32,
        micros: i64,
    },
    Uuid(String),
    /// JSON document text (json or jsonb).
    Json(String),
    Array(Vec<Value>),
}

/// The values of one row, in the relation's column order.
pub type Row = Vec<Value>;

/// A column of a source relation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// The source's spelling of the type, e.g. `numeric(12,2)` or `text[]`.
    pub type_name: String,
    pub value_type: ValueType,
    /// Part of the relation's primary key (from the catalog).
    pub primary_key: bool,
    /// Part of the replica identity the source sends for old rows.
    pub replica_identity: bool,
}

/// A source table as the change stream described it when the change was captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub table: String,
    pub columns: Vec<Column>,
}

impl Relation {
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    pub fn primary_key_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.primary_key)
            .map(|(i, _)| i)
    }
}

/// Identifies one version of a relation's description in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RelationId(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A row as the initial snapshot read it: the first of its key.
    Read,
    /// A row as an incremental snapshot read it, alongside the stream: changes of its key
    /// may come before it (Debezium's `snapshot = "incremental"`).
    IncrementalRead,
}

/// One captured row change (or the truncation of one table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    pub relation: RelationId,
    /// Position of the change in the source's log.
    pub position: Position,
    pub op: Op,
    /// Update: the old key (or old row, under REPLICA IDENTITY FULL) when the source sent it.
    /// Delete: the old key or old row. Insert and truncate: none.
    pub before: Option<Row>,
    /// Insert and update: the new row. Delete and truncate: none.
    pub after: Option<Row>,
}

/// The start of a committed source transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxBegin {
    /// Position of the transaction's commit record.
    pub commit_position: Position,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts: i64,
    pub origin: TxOrigin,
}

/// What the source database says a transaction is, in its own terms: the envelopes' `source`
/// block, and what a source resumes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxOrigin {
    Postgres {
        xid: u32,
    },
    MySql {
        server_id: u32,
        /// The connection (thread) id that ran the transaction.
        thread: u32,
        /// The binlog file the transaction is in.
        file: String,
        /// The transaction's GTID (`domain-server-seq` on MariaDB, `uuid:seq` on MySQL); none
        /// where GTIDs are off.
        gtid: Option<String>,
        /// The server's GTID state once this transaction is applied, which a restart resumes
        /// from; none where GTIDs are off (it resumes from the file and offset).
        gtid_state: Option<String>,
    },
}

/// The end of a committed source transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxCommit {
    pub commit_position: Position,
    /// The position just past the commit record: what the slot may be confirmed up to once
    /// this transaction is durable.
    pub end_position: Position,
    pub commit_ts: i64,
}

/// Rows of one table as a PostgreSQL source's initial snapshot read them (each a `Read`
/// change), kept in the COPY text format the source sent: a table sink whose target has the
/// source's column types loads them as they are, other sinks decode them ([`Self::changes`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRows {
    pub relation: RelationId,
    pub position: Position,
    /// How many rows `text` holds.
    pub rows: u32,
    /// One line per row, each ended by `\n`, the relation's columns in order, as `COPY … TO
    /// STDOUT` writes them with the snapshot connection's settings (ISO dates, UTC).
    pub text: bytes::Bytes,
}

impl SnapshotRows {
    /// The rows as `Read` changes of `relation` (the description `self.relation` names).
    pub fn changes(&self, relation: &Relation) -> Result<Vec<ChangeEvent>, String> {
        let rows = crate::pgtext::copy_rows::parse_copy_rows(relation, &self.text)?;
        Ok(rows
            .into_iter()
            .map(|row| ChangeEvent {
                relation: self.relation,
                position: self.position,
                op: Op::Read,
                before: None,
                after: Some(row),
            })
            .collect())
    }
}

/// A change of a captured table's columns, at its place in its transaction: table sinks
/// bring their target tables to the new shape before the changes that follow it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaChange {
    /// The table's description after the change.
    pub relation: RelationId,
    pub position: Position,
    pub columns: Vec<ColumnChange>,
    /// Whether the source knew each column by its number (a DDL message), or inferred the
    /// change from two descriptions by name (a rename then looks like a drop and an add).
    pub exact: bool,
}

/// What happened to one column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ColumnChange {
    /// The column `name` of the new description is new; rows that existed before hold
    /// `existing_rows` in it.
    Added {
        name: String,
        existing_rows: ExistingRows,
    },
    Renamed {
        from: String,
        to: String,
    },
    /// The column `name` had the type of `from`; the new description has its new type.
    Retyped {
        name: String,
        from: Column,
        /// The source session's time zone when it changed, for conversions that depend on
        /// it (timestamp to timestamptz).
        time_zone: Option<String>,
    },
    Dropped {
        name: String,
    },
}

/// What the rows that existed before a column was added hold in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ExistingRows {
    Null,
    /// One value for every row, in the type's text form (PostgreSQL's `attmissingval`: a
    /// non-volatile default evaluated once when the column was added).
    Value(String),
    /// A value per row that the change stream does not carry (a volatile default rewrote the
    /// table without logging its rows).
    Unknown,
}

/// What the source appends to the offset log: each transaction as Begin, its changes, Commit.
/// New variants go at the end: the log's encoding numbers them in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    Begin(TxBegin),
    Change(ChangeEvent),
    Commit(TxCommit),
    SnapshotRows(SnapshotRows),
    Schema(SchemaChange),
}

impl Record {
    /// How many row changes the record holds.
    pub fn changes(&self) -> usize {
        match self {
            Record::Change(_) => 1,
            Record::SnapshotRows(rows) => rows.rows as usize,
            Record::Begin(_) | Record::Commit(_) | Record::Schema(_) => 0,
        }
    }
}
