//! Decoding of the messages PostgreSQL's `pgoutput` plugin sends on a logical replication
//! stream, protocol versions 1 and 2 (streaming of in-progress transactions), as specified in
//! the PostgreSQL documentation, "Logical Replication Message Formats" (chapter "Frontend/Backend
//! Protocol"). This module owns the bytes-to-message step only: pure functions over the payload
//! of one XLogData message, no I/O. The invariant it keeps: server bytes never cause a panic;
//! every read goes through a bounds-checked cursor, and a malformed, truncated or over-long
//! message is a [`DecodeError`] naming the message, what was expected and the byte offset.
//! Column values are zero-copy slices of the input buffer. Beside decoding it knows one
//! rule of what an Update's tuples mean: an unchanged TOAST marker in the new tuple stands
//! for the value the old tuple, when it holds the column, carries
//! ([`OldTuple::fill_unchanged_toast`]).

use std::fmt;
use std::str::Utf8Error;

use bytes::Bytes;

/// Begin of a transaction.
pub const BEGIN: u8 = b'B';
/// Commit of a transaction.
pub const COMMIT: u8 = b'C';
/// Replication origin of the transaction that follows.
pub const ORIGIN: u8 = b'O';
/// Description of a relation, sent before its first change in a session.
pub const RELATION: u8 = b'R';
/// Description of a non-built-in data type used by a relation.
pub const TYPE: u8 = b'Y';
/// Row inserted.
pub const INSERT: u8 = b'I';
/// Row updated.
pub const UPDATE: u8 = b'U';
/// Row deleted.
pub const DELETE: u8 = b'D';
/// Relations truncated.
pub const TRUNCATE: u8 = b'T';
/// Logical decoding message (`pg_logical_emit_message`).
pub const MESSAGE: u8 = b'M';
/// Start of a block of a streamed in-progress transaction (protocol v2).
pub const STREAM_START: u8 = b'S';
/// End of a block of a streamed in-progress transaction (protocol v2).
pub const STREAM_STOP: u8 = b'E';
/// Commit of a streamed transaction (protocol v2).
pub const STREAM_COMMIT: u8 = b'c';
/// Abort of a streamed transaction or of one of its subtransactions (protocol v2).
pub const STREAM_ABORT: u8 = b'A';

/// Marks the new tuple of an Insert or Update.
const TUPLE_NEW: u8 = b'N';
/// Marks an old tuple holding only the replica identity key columns.
const TUPLE_KEY: u8 = b'K';
/// Marks an old tuple holding every column (`REPLICA IDENTITY FULL`).
const TUPLE_OLD: u8 = b'O';
const COLUMN_NULL: u8 = b'n';
const COLUMN_UNCHANGED_TOAST: u8 = b'u';
const COLUMN_TEXT: u8 = b't';
const COLUMN_BINARY: u8 = b'b';

/// One pgoutput message. LSNs are raw `u64` positions; timestamps are microseconds since
/// 2000-01-01 00:00:00 UTC, as sent. `xid` on data messages is present only inside a streamed
/// transaction block (between Stream Start and Stream Stop).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    Begin {
        final_lsn: u64,
        commit_ts: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts: i64,
    },
    Origin {
        commit_lsn: u64,
        name: String,
    },
    Relation(RelationMessage),
    Type {
        xid: Option<u32>,
        type_oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        xid: Option<u32>,
        relation_id: u32,
        new: Vec<TupleValue>,
    },
    Update {
        xid: Option<u32>,
        relation_id: u32,
        old: Option<OldTuple>,
        new: Vec<TupleValue>,
    },
    Delete {
        xid: Option<u32>,
        relation_id: u32,
        old: OldTuple,
    },
    Truncate {
        xid: Option<u32>,
        /// Bit 1: `CASCADE`, bit 2: `RESTART IDENTITY`.
        options: u8,
        relation_ids: Vec<u32>,
    },
    Message {
        xid: Option<u32>,
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts: i64,
    },
    /// `subxid == xid` when the whole streamed transaction aborted.
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
}

/// The description of a relation ('R'), which later row messages refer to by `relation_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationMessage {
    pub xid: Option<u32>,
    pub relation_id: u32,
    pub namespace: String,
    pub name: String,
    /// `relreplident`: b'd' default, b'n' nothing, b'f' full, b'i' index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`RelationMessage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

impl RelationColumn {
    /// Whether the column is part of the replica identity key (flag bit 1).
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// The old row of an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': only the replica identity key columns are meaningful; the others are Null.
    Key(Vec<TupleValue>),
    /// 'O': every column (`REPLICA IDENTITY FULL`).
    Full(Vec<TupleValue>),
}

impl OldTuple {
    /// The column values, whichever kind of old tuple this is.
    pub fn values(&self) -> &[TupleValue] {
        match self {
            OldTuple::Key(values) | OldTuple::Full(values) => values,
        }
    }

    /// Replaces each unchanged TOAST marker of an Update's `new` tuple with the old tuple's
    /// value of that column, where the old tuple carries one: every column under REPLICA
    /// IDENTITY FULL, the key columns under a key identity. The marker stands for the very
    /// value the row had: the server sends it only for an on-disk TOAST pointer the update
    /// kept from the old row (a value the update wrote is decoded in full), and it writes
    /// the old tuple with its TOASTed values inline (`ExtractReplicaIdentity` in
    /// `heapam.c`), so the old value is the one the marker left out. A column the old tuple
    /// does not hold (Null, or itself a marker) keeps its marker.
    pub fn fill_unchanged_toast(&self, new: &mut [TupleValue]) {
        for (value, old) in new.iter_mut().zip(self.values()) {
            if *value == TupleValue::UnchangedToast
                && matches!(old, TupleValue::Text(_) | TupleValue::Binary(_))
            {
                *value = old.clone();
            }
        }
    }
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// 'n': SQL NULL.
    Null,
    /// 'u': a TOASTed value that did not change; the server did not send it, and it is not NULL.
    UnchangedToast,
    /// 't': the value in the type's text format.
    Text(Bytes),
    /// 'b': the value in the type's binary format (subscription option `binary`).
    Binary(Bytes),
}

/// A pgoutput message that could not be decoded. Offsets count from the tag byte (byte 0).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message is empty (expected a message tag at byte 0)")]
    Empty,
    #[error(
        "pgoutput message has unknown tag {:?} (0x{tag:02x}) at byte 0 (expected a message of \
         protocol version 1 or 2)",
        char::from(*tag)
    )]
    UnknownTag { tag: u8 },
    #[error(
        "pgoutput {} message: {field} truncated at byte {offset} (expected {needed} bytes, \
         {available} remain)",
        Kind(*tag)
    )]
    Truncated {
        tag: u8,
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error(
        "pgoutput {} message: {field} starting at byte {offset} is not terminated (expected a \
         NUL-terminated string)",
        Kind(*tag)
    )]
    UnterminatedString {
        tag: u8,
        field: &'static str,
        offset: usize,
    },
    #[error(
        "pgoutput {} message: {field} is not valid UTF-8 at byte {offset} (expected a UTF-8 \
         string)",
        Kind(*tag)
    )]
    InvalidUtf8 {
        tag: u8,
        field: &'static str,
        offset: usize,
        #[source]
        source: Utf8Error,
    },
    #[error(
        "pgoutput {} message: {field} at byte {offset} is negative ({value}; expected a length \
         of 0 or more)",
        Kind(*tag)
    )]
    NegativeLength {
        tag: u8,
        field: &'static str,
        offset: usize,
        value: i32,
    },
    #[error(
        "pgoutput {} message: {field} at byte {offset} is {:?} (expected {expected})",
        Kind(*tag),
        char::from(*found)
    )]
    UnexpectedByte {
        tag: u8,
        field: &'static str,
        offset: usize,
        found: u8,
        expected: &'static str,
    },
    #[error(
        "pgoutput {} message: {count} trailing bytes at byte {offset} (expected the message to \
         end there)",
        Kind(*tag)
    )]
    TrailingBytes {
        tag: u8,
        offset: usize,
        count: usize,
    },
}

/// Displays a known tag as its name and character, e.g. `Update ('U')`.
struct Kind(u8);

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            BEGIN => "Begin",
            COMMIT => "Commit",
            ORIGIN => "Origin",
            RELATION => "Relation",
            TYPE => "Type",
            INSERT => "Insert",
            UPDATE => "Update",
            DELETE => "Delete",
            TRUNCATE => "Truncate",
            MESSAGE => "Message",
            STREAM_START => "Stream Start",
            STREAM_STOP => "Stream Stop",
            STREAM_COMMIT => "Stream Commit",
            STREAM_ABORT => "Stream Abort",
            _ => "unknown",
        };
        write!(f, "{name} ({:?})", char::from(self.0))
    }
}

/// Decodes one pgoutput message: the payload of one XLogData message, tag byte first.
///
/// `in_stream` is true between Stream Start and Stream Stop (protocol v2): there, Relation,
/// Type, Insert, Update, Delete, Truncate and Message carry the transaction's xid after the tag.
pub fn decode(data: &Bytes, in_stream: bool) -> Result<LogicalMessage, DecodeError> {
    let Some(&tag) = data.first() else {
        return Err(DecodeError::Empty);
    };
    let mut cursor = Cursor { data, pos: 1, tag };
    let c = &mut cursor;
    let message = match tag {
        BEGIN => LogicalMessage::Begin {
            final_lsn: c.u64("final LSN")?,
            commit_ts: c.i64("commit timestamp")?,
            xid: c.u32("xid")?,
        },
        COMMIT => LogicalMessage::Commit {
            flags: c.u8("flags")?,
            commit_lsn: c.u64("commit LSN")?,
            end_lsn: c.u64("end LSN")?,
            commit_ts: c.i64("commit timestamp")?,
        },
        ORIGIN => LogicalMessage::Origin {
            commit_lsn: c.u64("commit LSN")?,
            name: c.cstr("origin name")?,
        },
        RELATION => LogicalMessage::Relation(RelationMessage {
            xid: c.stream_xid(in_stream)?,
            relation_id: c.u32("relation id")?,
            namespace: c.cstr("namespace")?,
            name: c.cstr("relation name")?,
            replica_identity: c.u8("replica identity")?,
            columns: relation_columns(c)?,
        }),
        TYPE => LogicalMessage::Type {
            xid: c.stream_xid(in_stream)?,
            type_oid: c.u32("type OID")?,
            namespace: c.cstr("namespace")?,
            name: c.cstr("type name")?,
        },
        INSERT => LogicalMessage::Insert {
            xid: c.stream_xid(in_stream)?,
            relation_id: c.u32("relation id")?,
            new: {
                c.expect_byte("new tuple marker", TUPLE_NEW, "'N'")?;
                tuple(c)?
            },
        },
        UPDATE => {
            let xid = c.stream_xid(in_stream)?;
            let relation_id = c.u32("relation id")?;
            let offset = c.pos;
            let old = match c.u8("tuple marker")? {
                TUPLE_KEY => Some(OldTuple::Key(tuple(c)?)),
                TUPLE_OLD => Some(OldTuple::Full(tuple(c)?)),
                TUPLE_NEW => None,
                found => {
                    return Err(c.unexpected("tuple marker", offset, found, "'K', 'O' or 'N'"))
                }
            };
            if old.is_some() {
                c.expect_byte("new tuple marker", TUPLE_NEW, "'N'")?;
            }
            LogicalMessage::Update {
                xid,
                relation_id,
                old,
                new: tuple(c)?,
            }
        }
        DELETE => {
            let xid = c.stream_xid(in_stream)?;
            let relation_id = c.u32("relation id")?;
            let offset = c.pos;
            let old = match c.u8("old tuple marker")? {
                TUPLE_KEY => OldTuple::Key(tuple(c)?),
                TUPLE_OLD => OldTuple::Full(tuple(c)?),
                found => return Err(c.unexpected("old tuple marker", offset, found, "'K' or 'O'")),
            };
            LogicalMessage::Delete {
                xid,
                relation_id,
                old,
            }
        }
        TRUNCATE => {
            let xid = c.stream_xid(in_stream)?;
            let count = c.length("relation count")?;
            let options = c.u8("options")?;
            let mut relation_ids = Vec::with_capacity(count.min(c.remaining() / 4));
            for _ in 0..count {
                relation_ids.push(c.u32("relation id")?);
            }
            LogicalMessage::Truncate {
                xid,
                options,
                relation_ids,
            }
        }
        MESSAGE => LogicalMessage::Message {
            xid: c.stream_xid(in_stream)?,
            // Only bit 1 (transactional) is defined.
            transactional: c.u8("flags")? & 1 != 0,
            lsn: c.u64("message LSN")?,
            prefix: c.cstr("prefix")?,
            content: {
                let len = c.length("content length")?;
                c.bytes(len, "content")?
            },
        },
        STREAM_START => LogicalMessage::StreamStart {
            xid: c.u32("xid")?,
            // As the server's own reader does: the segment is first only when the byte is 1.
            first_segment: c.u8("first segment flag")? == 1,
        },
        STREAM_STOP => LogicalMessage::StreamStop,
        STREAM_COMMIT => LogicalMessage::StreamCommit {
            xid: c.u32("xid")?,
            flags: c.u8("flags")?,
            commit_lsn: c.u64("commit LSN")?,
            end_lsn: c.u64("end LSN")?,
            commit_ts: c.i64("commit timestamp")?,
        },
        STREAM_ABORT => LogicalMessage::StreamAbort {
            xid: c.u32("xid")?,
            subxid: c.u32("subtransaction xid")?,
        },
        _ => return Err(DecodeError::UnknownTag { tag }),
    };
    cursor.finish()?;
    Ok(message)
}

fn relation_columns(c: &mut Cursor<'_>) -> Result<Vec<RelationColumn>, DecodeError> {
    let count = c.u16("column count")?;
    // Every column takes at least 10 bytes: never reserve more than the input can hold.
    let mut columns = Vec::with_capacity(usize::from(count).min(c.remaining() / 10));
    for _ in 0..count {
        columns.push(RelationColumn {
            flags: c.u8("column flags")?,
            name: c.cstr("column name")?,
            type_oid: c.u32("column type OID")?,
            type_modifier: c.i32("column type modifier")?,
        });
    }
    Ok(columns)
}

/// TupleData: a column count, then one kind byte per column and, for 't' and 'b', a length
/// and that many bytes.
fn tuple(c: &mut Cursor<'_>) -> Result<Vec<TupleValue>, DecodeError> {
    let count = c.u16("tuple column count")?;
    let mut values = Vec::with_capacity(usize::from(count).min(c.remaining()));
    for _ in 0..count {
        let offset = c.pos;
        let value = match c.u8("column kind")? {
            COLUMN_NULL => TupleValue::Null,
            COLUMN_UNCHANGED_TOAST => TupleValue::UnchangedToast,
            COLUMN_TEXT => {
                let len = c.length("column value length")?;
                TupleValue::Text(c.bytes(len, "column value")?)
            }
            COLUMN_BINARY => {
                let len = c.length("column value length")?;
                TupleValue::Binary(c.bytes(len, "column value")?)
            }
            found => {
                return Err(c.unexpected("column kind", offset, found, "'n', 'u', 't' or 'b'"))
            }
        };
        values.push(value);
    }
    Ok(values)
}

/// A bounds-checked reader over one message. `pos` never exceeds `data.len()`.
struct Cursor<'a> {
    data: &'a Bytes,
    pos: usize,
    tag: u8,
}

impl Cursor<'_> {
    fn rest(&self) -> &[u8] {
        self.data.get(self.pos..).unwrap_or_default()
    }

    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn truncated(&self, field: &'static str, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            tag: self.tag,
            field,
            offset: self.pos,
            needed,
            available: self.remaining(),
        }
    }

    fn unexpected(
        &self,
        field: &'static str,
        offset: usize,
        found: u8,
        expected: &'static str,
    ) -> DecodeError {
        DecodeError::UnexpectedByte {
            tag: self.tag,
            field,
            offset,
            found,
            expected,
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        match self.rest().first_chunk::<N>() {
            Some(&bytes) => {
                self.pos += N;
                Ok(bytes)
            }
            None => Err(self.truncated(field, N)),
        }
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_be_bytes)
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    /// A signed Int32 length or count, which must not be negative.
    fn length(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let value = self.i32(field)?;
        usize::try_from(value).map_err(|_| DecodeError::NegativeLength {
            tag: self.tag,
            field,
            offset,
            value,
        })
    }

    fn stream_xid(&mut self, in_stream: bool) -> Result<Option<u32>, DecodeError> {
        if in_stream {
            self.u32("xid").map(Some)
        } else {
            Ok(None)
        }
    }

    fn expect_byte(
        &mut self,
        field: &'static str,
        wanted: u8,
        expected: &'static str,
    ) -> Result<(), DecodeError> {
        let offset = self.pos;
        match self.u8(field)? {
            found if found == wanted => Ok(()),
            found => Err(self.unexpected(field, offset, found, expected)),
        }
    }

    /// `n` bytes as a slice of the input buffer (no copy).
    fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        if n > self.remaining() {
            return Err(self.truncated(field, n));
        }
        let start = self.pos;
        self.pos += n;
        Ok(self.data.slice(start..self.pos))
    }

    /// A NUL-terminated string.
    fn cstr(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let start = self.pos;
        let rest = self.rest();
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString {
                tag: self.tag,
                field,
                offset: start,
            });
        };
        let text = std::str::from_utf8(rest.get(..nul).unwrap_or_default())
            .map_err(|source| DecodeError::InvalidUtf8 {
                tag: self.tag,
                field,
                offset: start + source.valid_up_to(),
                source,
            })?
            .to_owned();
        self.pos = start + nul + 1;
        Ok(text)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                tag: self.tag,
                offset: self.pos,
                count,
            }),
        }
    }
}

/// The inverse of [`decode`], for tests: encodes a message the way the server does. A message
/// with an xid on a data message encodes the streamed form (decode it with `in_stream`).
#[cfg(test)]
pub(crate) fn encode(message: &LogicalMessage) -> Bytes {
    use bytes::{BufMut, BytesMut};

    fn xid(out: &mut BytesMut, xid: &Option<u32>) {
        if let Some(xid) = xid {
            out.put_u32(*xid);
        }
    }
    fn cstr(out: &mut BytesMut, s: &str) {
        out.put_slice(s.as_bytes());
        out.put_u8(0);
    }
    fn tuple(out: &mut BytesMut, values: &[TupleValue]) {
        out.put_u16(values.len() as u16);
        for value in values {
            match value {
                TupleValue::Null => out.put_u8(COLUMN_NULL),
                TupleValue::UnchangedToast => out.put_u8(COLUMN_UNCHANGED_TOAST),
                TupleValue::Text(bytes) | TupleValue::Binary(bytes) => {
                    out.put_u8(match value {
                        TupleValue::Text(_) => COLUMN_TEXT,
                        _ => COLUMN_BINARY,
                    });
                    out.put_i32(bytes.len() as i32);
                    out.put_slice(bytes);
                }
            }
        }
    }
    fn old_tuple(out: &mut BytesMut, old: &OldTuple) {
        match old {
            OldTuple::Key(values) => {
                out.put_u8(TUPLE_KEY);
                tuple(out, values);
            }
            OldTuple::Full(values) => {
                out.put_u8(TUPLE_OLD);
                tuple(out, values);
            }
        }
    }

    let mut out = BytesMut::new();
    let o = &mut out;
    match message {
        LogicalMessage::Begin {
            final_lsn,
            commit_ts,
            xid,
        } => {
            o.put_u8(BEGIN);
            o.put_u64(*final_lsn);
            o.put_i64(*commit_ts);
            o.put_u32(*xid);
        }
        LogicalMessage::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_ts,
        } => {
            o.put_u8(COMMIT);
            o.put_u8(*flags);
            o.put_u64(*commit_lsn);
            o.put_u64(*end_lsn);
            o.put_i64(*commit_ts);
        }
        LogicalMessage::Origin { commit_lsn, name } => {
            o.put_u8(ORIGIN);
            o.put_u64(*commit_lsn);
            cstr(o, name);
        }
        LogicalMessage::Relation(relation) => {
            o.put_u8(RELATION);
            xid(o, &relation.xid);
            o.put_u32(relation.relation_id);
            cstr(o, &relation.namespace);
            cstr(o, &relation.name);
            o.put_u8(relation.replica_identity);
            o.put_u16(relation.columns.len() as u16);
            for column in &relation.columns {
                o.put_u8(column.flags);
                cstr(o, &column.name);
                o.put_u32(column.type_oid);
                o.put_i32(column.type_modifier);
            }
        }
        LogicalMessage::Type {
            xid: x,
            type_oid,
            namespace,
            name,
        } => {
            o.put_u8(TYPE);
            xid(o, x);
            o.put_u32(*type_oid);
            cstr(o, namespace);
            cstr(o, name);
        }
        LogicalMessage::Insert {
            xid: x,
            relation_id,
            new,
        } => {
            o.put_u8(INSERT);
            xid(o, x);
            o.put_u32(*relation_id);
            o.put_u8(TUPLE_NEW);
            tuple(o, new);
        }
        LogicalMessage::Update {
            xid: x,
            relation_id,
            old,
            new,
        } => {
            o.put_u8(UPDATE);
            xid(o, x);
            o.put_u32(*relation_id);
            if let Some(old) = old {
                old_tuple(o, old);
            }
            o.put_u8(TUPLE_NEW);
            tuple(o, new);
        }
        LogicalMessage::Delete {
            xid: x,
            relation_id,
            old,
        } => {
            o.put_u8(DELETE);
            xid(o, x);
            o.put_u32(*relation_id);
            old_tuple(o, old);
        }
        LogicalMessage::Truncate {
            xid: x,
            options,
            relation_ids,
        } => {
            o.put_u8(TRUNCATE);
            xid(o, x);
            o.put_i32(relation_ids.len() as i32);
            o.put_u8(*options);
            for id in relation_ids {
                o.put_u32(*id);
            }
        }
        LogicalMessage::Message {
            xid: x,
            transactional,
            lsn,
            prefix,
            content,
        } => {
            o.put_u8(MESSAGE);
            xid(o, x);
            o.put_u8(u8::from(*transactional));
            o.put_u64(*lsn);
            cstr(o, prefix);
            o.put_i32(content.len() as i32);
            o.put_slice(content);
        }
        LogicalMessage::StreamStart { xid, first_segment } => {
            o.put_u8(STREAM_START);
            o.put_u32(*xid);
            o.put_u8(u8::from(*first_segment));
        }
        LogicalMessage::StreamStop => o.put_u8(STREAM_STOP),
        LogicalMessage::StreamCommit {
            xid,
            flags,
            commit_lsn,
            end_lsn,
            commit_ts,
        } => {
            o.put_u8(STREAM_COMMIT);
            o.put_u32(*xid);
            o.put_u8(*flags);
            o.put_u64(*commit_lsn);
            o.put_u64(*end_lsn);
            o.put_i64(*commit_ts);
        }
        LogicalMessage::StreamAbort { xid, subxid } => {
            o.put_u8(STREAM_ABORT);
            o.put_u32(*xid);
            o.put_u32(*subxid);
        }
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    // Fixtures captured from PostgreSQL 15.20 with
    // `pg_logical_slot_peek_binary_changes('fix', NULL, NULL, 'proto_version', '2',
    // 'publication_names', 'pub', 'messages', 'true', 'streaming', 'on')` (and
    // `'proto_version', '1', 'binary', 'true'` for the binary tuple), after:
    //
    //   CREATE TYPE mood AS ENUM ('calm', 'stormy');                          -- oid 16385
    //   CREATE TABLE accounts (id int PRIMARY KEY, name text, balance bigint); -- oid 16389
    //   CREATE TABLE events (id int, payload text, m mood);                   -- oid 16396
    //   ALTER TABLE events REPLICA IDENTITY FULL;
    //   CREATE TABLE docs (id int PRIMARY KEY, body text, rev int);           -- oid 16401
    //   ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
    //   CREATE TABLE bulk (id serial PRIMARY KEY, filler text);               -- oid 16409
    //   INSERT INTO accounts VALUES (1, 'alice', 100), (2, NULL, 5);
    //   UPDATE accounts SET id = 10, balance = 200 WHERE id = 1;
    //   UPDATE accounts SET balance = 6 WHERE id = 2;
    //   DELETE FROM accounts WHERE id = 2;
    //   INSERT INTO events VALUES (1, 'hello', 'calm');
    //   UPDATE events SET payload = 'bye' WHERE id = 1;
    //   DELETE FROM events WHERE id = 1;
    //   INSERT INTO docs VALUES (1, repeat('x', 10000), 1);
    //   UPDATE docs SET rev = 2 WHERE id = 1;
    //   TRUNCATE accounts, events RESTART IDENTITY CASCADE;
    //   SELECT pg_logical_emit_message(true, 'tidemark', '\x00ff0a'::bytea);
    //   SELECT pg_logical_emit_message(false, 'tidemark/nt', 'plain');
    //   -- one transaction under replication origin 'upstream' (commit LSN 0/1234ABCD)
    //   -- streamed (logical_decoding_work_mem = 64kB): 2000 rows into bulk, 2000 more in a
    //   -- savepoint rolled back, a row into accounts, commit; then 2000 rows and ROLLBACK.
    const BEGIN_732: &str = "42000000000154faf800030412d2250722000002dc";
    const COMMIT_732: &str = "4300000000000154faf8000000000154fb2800030412d2250722";
    const RELATION_ACCOUNTS: &str = "52000040057075626c6963006163636f756e747300640003016964000000\
        0017ffffffff006e616d650000000019ffffffff0062616c616e63650000000014ffffffff";
    const RELATION_EVENTS: &str = "520000400c7075626c6963006576656e7473006600030169640000000017\
        ffffffff017061796c6f61640000000019ffffffff016d0000004001ffffffff";
    const TYPE_MOOD: &str = "59000040017075626c6963006d6f6f6400";
    const INSERT_ALICE: &str = "49000040054e00037400000001317400000005616c6963657400000003313030";
    const INSERT_WITH_NULL: &str = "49000040054e00037400000001326e740000000135";
    const INSERT_ALICE_BINARY: &str = "49000040054e00036200000004000000016200000005616c6963\
        6562000000080000000000000064";
    const UPDATE_KEY_CHANGE: &str = "55000040054b00037400000001316e6e4e00037400000002313074000000\
        05616c6963657400000003323030";
    const UPDATE_WITHOUT_OLD: &str = "55000040054e00037400000001326e740000000136";
    const UPDATE_FULL_IDENTITY: &str = "550000400c4f0003740000000131740000000568656c6c6f74000000\
        0463616c6d4e00037400000001317400000003627965740000000463616c6d";
    const UPDATE_UNCHANGED_TOAST: &str = "55000040114e000374000000013175740000000132";
    const DELETE_BY_KEY: &str = "44000040054b00037400000001326e6e";
    const DELETE_FULL_IDENTITY: &str =
        "440000400c4f00037400000001317400000003627965740000000463616c6d";
    const TRUNCATE_TWO: &str = "540000000203000040050000400c";
    const MESSAGE_TRANSACTIONAL: &str = "4d0100000000015541c0746964656d61726b000000000300ff0a";
    const MESSAGE_NON_TRANSACTIONAL: &str =
        "4d000000000001554238746964656d61726b2f6e740000000005706c61696e";
    const ORIGIN_UPSTREAM: &str = "4f000000001234abcd757073747265616d00";
    const STREAM_START_FIRST: &str = "53000002e901";
    const STREAM_START_LATER: &str = "53000002e900";
    const STREAM_STOP_MSG: &str = "45";
    const STREAMED_RELATION_BULK: &str = "52000002e9000040197075626c69630062756c6b00640002016964\
        0000000017ffffffff0066696c6c65720000000019ffffffff";
    const STREAMED_INSERT_SUBXACT: &str =
        "49000002eb000040054e0003740000000134740000000464617665740000000138";
    const STREAM_COMMIT_745: &str = "63000002e9000000000001634d000000000001634d3800030412d2253671";
    const STREAM_ABORT_SUBXACT: &str = "41000002e9000002ea";
    const STREAM_ABORT_WHOLE: &str = "41000002ec000002ec";

    fn hex(s: &str) -> Result<Bytes, std::num::ParseIntError> {
        let digits = s.as_bytes();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(&String::from_utf8_lossy(pair), 16))
            .collect::<Result<Vec<u8>, _>>()
            .map(Bytes::from)
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn decoded(
        fixture: &str,
        in_stream: bool,
    ) -> Result<LogicalMessage, Box<dyn std::error::Error>> {
        Ok(decode(&hex(fixture)?, in_stream)?)
    }

    #[test]
    fn begin_carries_final_lsn_commit_timestamp_and_xid() -> TestResult {
        assert_eq!(
            decoded(BEGIN_732, false)?,
            LogicalMessage::Begin {
                final_lsn: 0x154_FAF8,
                commit_ts: 0x0003_0412_d225_0722,
                xid: 732,
            }
        );
        Ok(())
    }

    #[test]
    fn commit_carries_flags_lsns_and_timestamp() -> TestResult {
        assert_eq!(
            decoded(COMMIT_732, false)?,
            LogicalMessage::Commit {
                flags: 0,
                commit_lsn: 0x154_FAF8,
                end_lsn: 0x154_FB28,
                commit_ts: 0x0003_0412_d225_0722,
            }
        );
        Ok(())
    }

    #[test]
    fn origin_names_the_upstream_and_its_commit_lsn() -> TestResult {
        assert_eq!(
            decoded(ORIGIN_UPSTREAM, false)?,
            LogicalMessage::Origin {
                commit_lsn: 0x1234_ABCD,
                name: "upstream".into(),
            }
        );
        Ok(())
    }

    #[test]
    fn relation_lists_columns_with_key_flags_types_and_modifiers() -> TestResult {
        let LogicalMessage::Relation(relation) = decoded(RELATION_ACCOUNTS, false)? else {
            return Err("not a Relation".into());
        };
        assert_eq!(
            relation,
            RelationMessage {
                xid: None,
                relation_id: 16389,
                namespace: "public".into(),
                name: "accounts".into(),
                replica_identity: b'd',
                columns: vec![
                    RelationColumn {
                        flags: 1,
                        name: "id".into(),
                        type_oid: 23,
                        type_modifier: -1
                    },
                    RelationColumn {
                        flags: 0,
                        name: "name".into(),
                        type_oid: 25,
                        type_modifier: -1
                    },
                    RelationColumn {
                        flags: 0,
                        name: "balance".into(),
                        type_oid: 20,
                        type_modifier: -1
                    },
                ],
            }
        );
        let keys: Vec<bool> = relation
            .columns
            .iter()
            .map(RelationColumn::is_key)
            .collect();
        assert_eq!(keys, [true, false, false]);
        Ok(())
    }

    #[test]
    fn relation_with_full_identity_marks_every_column_as_key() -> TestResult {
        let LogicalMessage::Relation(relation) = decoded(RELATION_EVENTS, false)? else {
            return Err("not a Relation".into());
        };
        assert_eq!(relation.relation_id, 16396);
        assert_eq!(relation.replica_identity, b'f');
        assert!(relation.columns.iter().all(RelationColumn::is_key));
        let types: Vec<u32> = relation.columns.iter().map(|c| c.type_oid).collect();
        assert_eq!(types, [23, 25, 16385]);
        Ok(())
    }

    #[test]
    fn type_describes_a_user_defined_type() -> TestResult {
        assert_eq!(
            decoded(TYPE_MOOD, false)?,
            LogicalMessage::Type {
                xid: None,
                type_oid: 16385,
                namespace: "public".into(),
                name: "mood".into(),
            }
        );
        Ok(())
    }

    #[test]
    fn insert_carries_text_values() -> TestResult {
        assert_eq!(
            decoded(INSERT_ALICE, false)?,
            LogicalMessage::Insert {
                xid: None,
                relation_id: 16389,
                new: vec![text("1"), text("alice"), text("100")],
            }
        );
        Ok(())
    }

    #[test]
    fn insert_keeps_null_columns_as_null() -> TestResult {
        assert_eq!(
            decoded(INSERT_WITH_NULL, false)?,
            LogicalMessage::Insert {
                xid: None,
                relation_id: 16389,
                new: vec![text("2"), TupleValue::Null, text("5")],
            }
        );
        Ok(())
    }

    #[test]
    fn insert_in_binary_mode_carries_binary_values() -> TestResult {
        let binary = |b: &[u8]| TupleValue::Binary(Bytes::copy_from_slice(b));
        assert_eq!(
            decoded(INSERT_ALICE_BINARY, false)?,
            LogicalMessage::Insert {
                xid: None,
                relation_id: 16389,
                new: vec![
                    binary(&1i32.to_be_bytes()),
                    binary(b"alice"),
                    binary(&100i64.to_be_bytes()),
                ],
            }
        );
        Ok(())
    }

    #[test]
    fn column_values_share_the_input_buffer() -> TestResult {
        let data = hex(INSERT_ALICE)?;
        let LogicalMessage::Insert { new, .. } = decode(&data, false)? else {
            return Err("not an Insert".into());
        };
        let input = data.as_ptr_range();
        for value in &new {
            let TupleValue::Text(bytes) = value else {
                return Err("not a text value".into());
            };
            assert!(
                input.contains(&bytes.as_ptr()),
                "value {bytes:?} was copied"
            );
        }
        Ok(())
    }

    #[test]
    fn update_of_a_key_carries_the_old_key_tuple() -> TestResult {
        assert_eq!(
            decoded(UPDATE_KEY_CHANGE, false)?,
            LogicalMessage::Update {
                xid: None,
                relation_id: 16389,
                old: Some(OldTuple::Key(vec![
                    text("1"),
                    TupleValue::Null,
                    TupleValue::Null
                ])),
                new: vec![text("10"), text("alice"), text("200")],
            }
        );
        Ok(())
    }

    #[test]
    fn update_with_full_identity_carries_the_whole_old_row() -> TestResult {
        let message = decoded(UPDATE_FULL_IDENTITY, false)?;
        assert_eq!(
            message,
            LogicalMessage::Update {
                xid: None,
                relation_id: 16396,
                old: Some(OldTuple::Full(vec![text("1"), text("hello"), text("calm")])),
                new: vec![text("1"), text("bye"), text("calm")],
            }
        );
        Ok(())
    }

    #[test]
    fn update_without_key_change_has_no_old_tuple() -> TestResult {
        assert_eq!(
            decoded(UPDATE_WITHOUT_OLD, false)?,
            LogicalMessage::Update {
                xid: None,
                relation_id: 16389,
                old: None,
                new: vec![text("2"), TupleValue::Null, text("6")],
            }
        );
        Ok(())
    }

    #[test]
    fn unchanged_toast_column_is_distinct_from_null() -> TestResult {
        let LogicalMessage::Update { old, new, .. } = decoded(UPDATE_UNCHANGED_TOAST, false)?
        else {
            return Err("not an Update".into());
        };
        assert_eq!(old, None);
        assert_eq!(new, [text("1"), TupleValue::UnchangedToast, text("2")]);
        assert_ne!(new.get(1), Some(&TupleValue::Null));
        Ok(())
    }

    #[test]
    fn unchanged_toast_is_filled_from_a_full_old_tuple() {
        let old = OldTuple::Full(vec![text("1"), text("big"), TupleValue::Null]);
        let mut new = vec![text("1"), TupleValue::UnchangedToast, text("2")];
        old.fill_unchanged_toast(&mut new);
        assert_eq!(new, [text("1"), text("big"), text("2")]);
    }

    #[test]
    fn unchanged_toast_is_filled_only_where_the_old_tuple_holds_the_value() {
        // An old key sends the key columns; the others are Null, not the row's values.
        let old = OldTuple::Key(vec![text("key"), TupleValue::Null, TupleValue::Null]);
        let mut new = vec![
            TupleValue::UnchangedToast,
            TupleValue::UnchangedToast,
            text("2"),
        ];
        old.fill_unchanged_toast(&mut new);
        assert_eq!(new, [text("key"), TupleValue::UnchangedToast, text("2")]);
        // A marker is never copied for a value, nor does a value replace a sent value.
        let old = OldTuple::Full(vec![TupleValue::UnchangedToast, text("old")]);
        let mut new = vec![TupleValue::UnchangedToast, text("new")];
        old.fill_unchanged_toast(&mut new);
        assert_eq!(new, [TupleValue::UnchangedToast, text("new")]);
    }

    #[test]
    fn delete_by_key_carries_only_the_key_columns() -> TestResult {
        let message = decoded(DELETE_BY_KEY, false)?;
        assert_eq!(
            message,
            LogicalMessage::Delete {
                xid: None,
                relation_id: 16389,
                old: OldTuple::Key(vec![text("2"), TupleValue::Null, TupleValue::Null]),
            }
        );
        Ok(())
    }

    #[test]
    fn delete_with_full_identity_carries_the_whole_old_row() -> TestResult {
        let LogicalMessage::Delete { old, .. } = decoded(DELETE_FULL_IDENTITY, false)? else {
            return Err("not a Delete".into());
        };
        assert!(matches!(old, OldTuple::Full(_)));
        assert_eq!(old.values(), [text("1"), text("bye"), text("calm")]);
        Ok(())
    }

    #[test]
    fn truncate_lists_every_relation_and_the_options() -> TestResult {
        assert_eq!(
            decoded(TRUNCATE_TWO, false)?,
            LogicalMessage::Truncate {
                xid: None,
                // CASCADE (1) | RESTART IDENTITY (2)
                options: 3,
                relation_ids: vec![16389, 16396],
            }
        );
        Ok(())
    }

    #[test]
    fn transactional_message_carries_binary_content() -> TestResult {
        assert_eq!(
            decoded(MESSAGE_TRANSACTIONAL, false)?,
            LogicalMessage::Message {
                xid: None,
                transactional: true,
                lsn: 0x155_41C0,
                prefix: "tidemark".into(),
                content: Bytes::from_static(&[0x00, 0xff, 0x0a]),
            }
        );
        Ok(())
    }

    #[test]
    fn non_transactional_message_is_flagged() -> TestResult {
        assert_eq!(
            decoded(MESSAGE_NON_TRANSACTIONAL, false)?,
            LogicalMessage::Message {
                xid: None,
                transactional: false,
                lsn: 0x155_4238,
                prefix: "tidemark/nt".into(),
                content: Bytes::from_static(b"plain"),
            }
        );
        Ok(())
    }

    #[test]
    fn stream_start_marks_the_first_segment_only() -> TestResult {
        assert_eq!(
            decoded(STREAM_START_FIRST, false)?,
            LogicalMessage::StreamStart {
                xid: 745,
                first_segment: true
            }
        );
        assert_eq!(
            decoded(STREAM_START_LATER, false)?,
            LogicalMessage::StreamStart {
                xid: 745,
                first_segment: false
            }
        );
        Ok(())
    }

    #[test]
    fn stream_stop_is_a_bare_tag() -> TestResult {
        assert_eq!(decoded(STREAM_STOP_MSG, true)?, LogicalMessage::StreamStop);
        Ok(())
    }

    #[test]
    fn data_messages_inside_a_stream_carry_the_xid() -> TestResult {
        let LogicalMessage::Relation(relation) = decoded(STREAMED_RELATION_BULK, true)? else {
            return Err("not a Relation".into());
        };
        assert_eq!(relation.xid, Some(745));
        assert_eq!(relation.relation_id, 16409);
        assert_eq!(relation.name, "bulk");
        assert_eq!(
            decoded(STREAMED_INSERT_SUBXACT, true)?,
            LogicalMessage::Insert {
                xid: Some(747),
                relation_id: 16389,
                new: vec![text("4"), text("dave"), text("8")],
            }
        );
        Ok(())
    }

    #[test]
    fn streamed_message_decoded_outside_a_stream_is_an_error() -> TestResult {
        // Without the xid the relation id is misread and the tuple marker is not 'N'.
        assert!(decode(&hex(STREAMED_INSERT_SUBXACT)?, false).is_err());
        Ok(())
    }

    #[test]
    fn stream_commit_carries_xid_lsns_and_timestamp() -> TestResult {
        assert_eq!(
            decoded(STREAM_COMMIT_745, false)?,
            LogicalMessage::StreamCommit {
                xid: 745,
                flags: 0,
                commit_lsn: 0x163_4D00,
                end_lsn: 0x163_4D38,
                commit_ts: 0x0003_0412_d225_3671,
            }
        );
        Ok(())
    }

    #[test]
    fn stream_abort_names_the_aborted_subtransaction_or_the_whole_transaction() -> TestResult {
        assert_eq!(
            decoded(STREAM_ABORT_SUBXACT, false)?,
            LogicalMessage::StreamAbort {
                xid: 745,
                subxid: 746
            }
        );
        assert_eq!(
            decoded(STREAM_ABORT_WHOLE, false)?,
            LogicalMessage::StreamAbort {
                xid: 748,
                subxid: 748
            }
        );
        Ok(())
    }

    #[test]
    fn every_fixture_reencodes_to_the_captured_bytes() -> TestResult {
        let fixtures = [
            (BEGIN_732, false),
            (COMMIT_732, false),
            (RELATION_ACCOUNTS, false),
            (RELATION_EVENTS, false),
            (TYPE_MOOD, false),
            (INSERT_ALICE, false),
            (INSERT_WITH_NULL, false),
            (INSERT_ALICE_BINARY, false),
            (UPDATE_KEY_CHANGE, false),
            (UPDATE_WITHOUT_OLD, false),
            (UPDATE_FULL_IDENTITY, false),
            (UPDATE_UNCHANGED_TOAST, false),
            (DELETE_BY_KEY, false),
            (DELETE_FULL_IDENTITY, false),
            (TRUNCATE_TWO, false),
            (MESSAGE_TRANSACTIONAL, false),
            (MESSAGE_NON_TRANSACTIONAL, false),
            (ORIGIN_UPSTREAM, false),
            (STREAM_START_FIRST, false),
            (STREAM_START_LATER, false),
            (STREAM_STOP_MSG, false),
            (STREAMED_RELATION_BULK, true),
            (STREAMED_INSERT_SUBXACT, true),
            (STREAM_COMMIT_745, false),
            (STREAM_ABORT_SUBXACT, false),
            (STREAM_ABORT_WHOLE, false),
        ];
        for (fixture, in_stream) in fixtures {
            let data = hex(fixture)?;
            assert_eq!(
                encode(&decode(&data, in_stream)?),
                data,
                "fixture {fixture}"
            );
        }
        Ok(())
    }

    #[test]
    fn empty_payload_is_an_error() {
        assert_eq!(decode(&Bytes::new(), false), Err(DecodeError::Empty));
    }

    #[test]
    fn unknown_tag_is_an_error_naming_the_tag() {
        let error = decode(&Bytes::from_static(b"Zabc"), false);
        assert_eq!(error, Err(DecodeError::UnknownTag { tag: b'Z' }));
        let message = error.map(|_| ()).err().map(|e| e.to_string());
        assert_eq!(
            message.as_deref(),
            Some(
                "pgoutput message has unknown tag 'Z' (0x5a) at byte 0 (expected a message of \
                 protocol version 1 or 2)"
            )
        );
    }

    #[test]
    fn truncated_column_value_names_message_field_and_offset() -> TestResult {
        // Update, relation 16389, new tuple of one text column claiming 120 bytes, 3 present.
        let mut data = hex("55000040054e000174")?.to_vec();
        data.extend_from_slice(&120i32.to_be_bytes());
        data.extend_from_slice(b"abc");
        let error = decode(&Bytes::from(data), false);
        assert_eq!(
            error,
            Err(DecodeError::Truncated {
                tag: b'U',
                field: "column value",
                offset: 13,
                needed: 120,
                available: 3,
            })
        );
        assert_eq!(
            error.map(|_| ()).err().map(|e| e.to_string()).as_deref(),
            Some(
                "pgoutput Update ('U') message: column value truncated at byte 13 (expected 120 \
                 bytes, 3 remain)"
            )
        );
        Ok(())
    }

    #[test]
    fn negative_column_length_is_an_error() -> TestResult {
        let error = decode(&hex("49000040054e000174ffffffff")?, false);
        assert_eq!(
            error,
            Err(DecodeError::NegativeLength {
                tag: b'I',
                field: "column value length",
                offset: 9,
                value: -1,
            })
        );
        Ok(())
    }

    #[test]
    fn negative_truncate_count_is_an_error() -> TestResult {
        let error = decode(&hex("54ffffffff00")?, false);
        assert!(matches!(
            error,
            Err(DecodeError::NegativeLength {
                tag: b'T',
                offset: 1,
                ..
            })
        ));
        Ok(())
    }

    #[test]
    fn invalid_utf8_in_a_name_is_an_error_at_the_bad_byte() -> TestResult {
        // Type 16385 in namespace "pu\xffblic".
        let error = decode(&hex("59000040017075ff626c6963006d6f6f6400")?, false);
        let Err(DecodeError::InvalidUtf8 {
            tag, field, offset, ..
        }) = error
        else {
            return Err(format!("expected InvalidUtf8, got {error:?}").into());
        };
        assert_eq!((tag, field, offset), (b'Y', "namespace", 7));
        Ok(())
    }

    #[test]
    fn string_without_terminator_is_an_error() -> TestResult {
        let error = decode(&hex("4f000000001234abcd7570")?, false);
        assert_eq!(
            error,
            Err(DecodeError::UnterminatedString {
                tag: b'O',
                field: "origin name",
                offset: 9,
            })
        );
        Ok(())
    }

    #[test]
    fn unknown_column_kind_is_an_error() -> TestResult {
        let error = decode(&hex("49000040054e000178")?, false);
        assert_eq!(
            error,
            Err(DecodeError::UnexpectedByte {
                tag: b'I',
                field: "column kind",
                offset: 8,
                found: b'x',
                expected: "'n', 'u', 't' or 'b'",
            })
        );
        Ok(())
    }

    #[test]
    fn old_tuple_not_followed_by_new_tuple_is_an_error() -> TestResult {
        // 'K' tuple with one NULL column, then 'K' again where 'N' must follow.
        let error = decode(&hex("55000040054b00016e4b")?, false);
        assert!(matches!(
            error,
            Err(DecodeError::UnexpectedByte {
                tag: b'U',
                field: "new tuple marker",
                offset: 9,
                found: b'K',
                ..
            })
        ));
        Ok(())
    }

    #[test]
    fn delete_without_old_tuple_is_an_error() -> TestResult {
        let error = decode(&hex("44000040054e00016e")?, false);
        assert!(matches!(
            error,
            Err(DecodeError::UnexpectedByte {
                tag: b'D',
                found: b'N',
                ..
            })
        ));
        Ok(())
    }

    #[test]
    fn trailing_bytes_after_a_complete_message_are_an_error() -> TestResult {
        let error = decode(&hex("4500")?, false);
        assert_eq!(
            error,
            Err(DecodeError::TrailingBytes {
                tag: b'E',
                offset: 1,
                count: 1,
            })
        );
        assert_eq!(
            error.map(|_| ()).err().map(|e| e.to_string()).as_deref(),
            Some(
                "pgoutput Stream Stop ('E') message: 1 trailing bytes at byte 1 (expected the \
                 message to end there)"
            )
        );
        Ok(())
    }

    const TAGS: [u8; 14] = [
        BEGIN,
        COMMIT,
        ORIGIN,
        RELATION,
        TYPE,
        INSERT,
        UPDATE,
        DELETE,
        TRUNCATE,
        MESSAGE,
        STREAM_START,
        STREAM_STOP,
        STREAM_COMMIT,
        STREAM_ABORT,
    ];

    /// Whether `message` must be decoded with `in_stream` to round-trip.
    fn streamed(message: &LogicalMessage) -> bool {
        match message {
            LogicalMessage::Relation(RelationMessage { xid, .. })
            | LogicalMessage::Type { xid, .. }
            | LogicalMessage::Insert { xid, .. }
            | LogicalMessage::Update { xid, .. }
            | LogicalMessage::Delete { xid, .. }
            | LogicalMessage::Truncate { xid, .. }
            | LogicalMessage::Message { xid, .. } => xid.is_some(),
            _ => false,
        }
    }

    fn name() -> impl Strategy<Value = String> {
        vec(
            any::<char>().prop_filter("C strings end at NUL", |c| *c != '\0'),
            0..12,
        )
        .prop_map(String::from_iter)
    }

    fn payload() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..40).prop_map(Bytes::from)
    }

    fn tuple_values() -> impl Strategy<Value = Vec<TupleValue>> {
        let value = prop_oneof![
            Just(TupleValue::Null),
            Just(TupleValue::UnchangedToast),
            payload().prop_map(TupleValue::Text),
            payload().prop_map(TupleValue::Binary),
        ];
        vec(value, 0..6)
    }

    fn old_tuple() -> impl Strategy<Value = OldTuple> {
        prop_oneof![
            tuple_values().prop_map(OldTuple::Key),
            tuple_values().prop_map(OldTuple::Full),
        ]
    }

    fn column() -> impl Strategy<Value = RelationColumn> {
        (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
            |(flags, name, type_oid, type_modifier)| RelationColumn {
                flags,
                name,
                type_oid,
                type_modifier,
            },
        )
    }

    fn message() -> impl Strategy<Value = LogicalMessage> {
        let xid = || proptest::option::of(any::<u32>());
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_ts, xid)| {
                LogicalMessage::Begin {
                    final_lsn,
                    commit_ts,
                    xid,
                }
            }),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_ts)| LogicalMessage::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_ts,
                }
            ),
            (any::<u64>(), name())
                .prop_map(|(commit_lsn, name)| LogicalMessage::Origin { commit_lsn, name }),
            (
                xid(),
                any::<u32>(),
                name(),
                name(),
                any::<u8>(),
                vec(column(), 0..5)
            )
                .prop_map(
                    |(xid, relation_id, namespace, name, replica_identity, columns)| {
                        LogicalMessage::Relation(RelationMessage {
                            xid,
                            relation_id,
                            namespace,
                            name,
                            replica_identity,
                            columns,
                        })
                    }
                ),
            (xid(), any::<u32>(), name(), name()).prop_map(|(xid, type_oid, namespace, name)| {
                LogicalMessage::Type {
                    xid,
                    type_oid,
                    namespace,
                    name,
                }
            }),
            (xid(), any::<u32>(), tuple_values()).prop_map(|(xid, relation_id, new)| {
                LogicalMessage::Insert {
                    xid,
                    relation_id,
                    new,
                }
            }),
            (
                xid(),
                any::<u32>(),
                proptest::option::of(old_tuple()),
                tuple_values()
            )
                .prop_map(|(xid, relation_id, old, new)| LogicalMessage::Update {
                    xid,
                    relation_id,
                    old,
                    new,
                }),
            (xid(), any::<u32>(), old_tuple()).prop_map(|(xid, relation_id, old)| {
                LogicalMessage::Delete {
                    xid,
                    relation_id,
                    old,
                }
            }),
            (xid(), any::<u8>(), vec(any::<u32>(), 0..6)).prop_map(
                |(xid, options, relation_ids)| LogicalMessage::Truncate {
                    xid,
                    options,
                    relation_ids,
                }
            ),
            (xid(), any::<bool>(), any::<u64>(), name(), payload()).prop_map(
                |(xid, transactional, lsn, prefix, content)| LogicalMessage::Message {
                    xid,
                    transactional,
                    lsn,
                    prefix,
                    content,
                }
            ),
            (any::<u32>(), any::<bool>()).prop_map(|(xid, first_segment)| {
                LogicalMessage::StreamStart { xid, first_segment }
            }),
            Just(LogicalMessage::StreamStop),
            (
                any::<u32>(),
                any::<u8>(),
                any::<u64>(),
                any::<u64>(),
                any::<i64>()
            )
                .prop_map(|(xid, flags, commit_lsn, end_lsn, commit_ts)| {
                    LogicalMessage::StreamCommit {
                        xid,
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_ts,
                    }
                }),
            (any::<u32>(), any::<u32>())
                .prop_map(|(xid, subxid)| LogicalMessage::StreamAbort { xid, subxid }),
        ]
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(message in message()) {
            let data = encode(&message);
            prop_assert_eq!(decode(&data, streamed(&message))?, message);
        }

        #[test]
        fn every_truncation_of_a_message_is_an_error(message in message()) {
            let data = encode(&message);
            let in_stream = streamed(&message);
            for len in 0..data.len() {
                let truncated = data.slice(..len);
                prop_assert!(
                    decode(&truncated, in_stream).is_err(),
                    "prefix of {} bytes decoded: {:?}", len, truncated
                );
            }
        }

        #[test]
        fn bytes_after_a_complete_message_are_an_error(message in message(), extra in any::<u8>()) {
            let mut data = encode(&message).to_vec();
            data.push(extra);
            let error = decode(&Bytes::from(data), streamed(&message));
            let is_trailing = matches!(error, Err(DecodeError::TrailingBytes { count: 1, .. }));
            prop_assert!(is_trailing, "{:?}", error);
        }

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(
            data in vec(any::<u8>(), 0..96),
            in_stream in any::<bool>(),
        ) {
            let _ = decode(&Bytes::from(data), in_stream);
        }

        #[test]
        fn decode_never_panics_on_arbitrary_bodies_of_known_messages(
            tag in proptest::sample::select(TAGS.to_vec()),
            body in vec(any::<u8>(), 0..96),
            in_stream in any::<bool>(),
        ) {
            let mut data = vec![tag];
            data.extend(body);
            let _ = decode(&Bytes::from(data), in_stream);
        }
    }
}
