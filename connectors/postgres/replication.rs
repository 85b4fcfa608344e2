//! The replication connection: PostgreSQL's streaming replication sub-protocol ("Streaming
//! Replication Protocol" in the PostgreSQL docs) spoken over TCP (with TLS as the URL's
//! `sslmode` says: `crate::tls` owns the policy, this file the SSLRequest exchange) or a Unix
//! socket with postgres-protocol's message codecs. tokio-postgres cannot enter CopyBoth mode, so
//! startup, authentication (trust, cleartext, md5, SCRAM-SHA-256), the replication commands and
//! the CopyBoth stream are done here. Nothing here decides what to confirm: the caller passes
//! the flush position, which must be durable in the offset log.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{Host, SslNegotiation};
use tokio_postgres::error::SqlState;
use tokio_rustls::TlsConnector;

use crate::config::PgConfig;
use crate::event::Position;
use crate::tls;

/// Microseconds between the Unix epoch and PostgreSQL's epoch, 2000-01-01 00:00 UTC.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

const COPY_BOTH_RESPONSE_TAG: u8 = b'W';
const XLOG_DATA_TAG: u8 = b'w';
const PRIMARY_KEEPALIVE_TAG: u8 = b'k';
const STANDBY_STATUS_UPDATE_TAG: u8 = b'r';

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot reach PostgreSQL at {target}: {source}")]
    Connect { target: String, source: io::Error },
    #[error("connection to PostgreSQL lost: {0}")]
    Io(#[from] io::Error),
    #[error("PostgreSQL: {message} (SQLSTATE {})", code.code())]
    Server {
        code: SqlState,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Unsupported(String),
}

impl ReplicationError {
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// What the server sends inside the CopyBoth stream.
#[derive(Debug)]
pub enum ReplicationMessage {
    XLogData {
        wal_start: Position,
        wal_end: Position,
        data: Bytes,
    },
    PrimaryKeepalive {
        wal_end: Position,
        reply_requested: bool,
    },
}

/// The server's answer to IDENTIFY_SYSTEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_position: Position,
    pub database: Option<String>,
}

trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// What START_REPLICATION asks pgoutput for (both need PostgreSQL 14 or newer).
#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    /// Protocol version 2: transactions larger than the server's `logical_decoding_work_mem`
    /// arrive in blocks while they run, instead of spilling to the server's disk first.
    pub streaming: bool,
    /// Logical decoding messages (the incremental snapshot's watermarks).
    pub messages: bool,
}

pub struct ReplicationConnection {
    stream: Box<dyn Transport>,
    read_buf: BytesMut,
    write_buf: BytesMut,
}

/// Session settings that fix the text output of every value the server sends, so the type
/// conversion sees one format (they apply to the walsender's output functions too). money
/// prints in the session's `lc_monetary`, which the database may set to any locale
/// (`1.234,56 €`); `C` prints one format (`$1,234.56`) with two fraction digits, and table
/// sinks load it back under `C` too, so a target holds the source's amount.
const OUTPUT_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("IntervalStyle", "iso_8601"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("lc_monetary", "C"),
];

/// [`OUTPUT_SETTINGS`] as startup options.
fn session_options() -> String {
    OUTPUT_SETTINGS
        .iter()
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// [`OUTPUT_SETTINGS`] as `SET` statements, for the ordinary connections that read values
/// (the snapshot's, the catalog's).
pub fn set_output_settings() -> String {
    OUTPUT_SETTINGS
        .iter()
        .map(|(name, value)| format!("SET {name} = {}", quote_literal(value)))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ReplicationConnection {
    /// Opens a `replication=database` connection, encrypted as the URL's `sslmode` says, and
    /// authenticates.
    pub async fn connect(config: &PgConfig) -> Result<Self, ReplicationError> {
        let stream = open_stream(config).await?;
        let mut conn = ReplicationConnection {
            stream,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::with_capacity(1024),
        };
        conn.startup(config).await?;
        Ok(conn)
    }

    async fn startup(&mut self, config: &tokio_postgres::Config) -> Result<(), ReplicationError> {
        let user = config
            .get_user()
            .ok_or_else(|| ReplicationError::Protocol("the source url names no user".into()))?;
        let database = config.get_dbname().unwrap_or(user);
        let mut params = vec![
            ("user", user),
            ("database", database),
            ("replication", "database"),
            ("application_name", "tidemark"),
            ("client_encoding", "UTF8"),
        ];
        // Ours last: a later -c wins, and the type conversion depends on these.
        let options = match config.get_options() {
            Some(extra) => format!("{extra} {}", session_options()),
            None => session_options(),
        };
        params.push(("options", &options));
        frontend::startup_message(params.iter().copied(), &mut self.write_buf)?;
        self.flush().await?;
        self.authenticate(user, config.get_password()).await?;
        loop {
            match self.read_message().await? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                _ => {}
            }
        }
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
    ) -> Result<(), ReplicationError> {
        let need_password = || {
            password.ok_or_else(|| {
                ReplicationError::Protocol(
                    "the server asks for a password but the source url has none: \
                     add it to the url (postgres://user:${PASSWORD}@host/db)"
                        .into(),
                )
            })
        };
        match self.read_message().await? {
            Message::AuthenticationOk => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(need_password()?, &mut self.write_buf)?;
                self.flush().await?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(user.as_bytes(), need_password()?, body.salt());
                frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                self.flush().await?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut scram = false;
                while let Some(m) = mechanisms.next().map_err(ReplicationError::Io)? {
                    scram |= m == SCRAM_SHA_256;
                }
                if !scram {
                    return Err(ReplicationError::Unsupported(
                        "the server offers no SASL mechanism tidemark supports (SCRAM-SHA-256)"
                            .into(),
                    ));
                }
                let mut sasl = ScramSha256::new(need_password()?, ChannelBinding::unsupported());
                frontend::sasl_initial_response(
                    SCRAM_SHA_256,
                    sasl.message(),
                    &mut self.write_buf,
                )?;
                self.flush().await?;
                match self.read_message().await? {
                    Message::AuthenticationSaslContinue(body) => sasl.update(body.data())?,
                    Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                    _ => return Err(unexpected("SASL continue")),
                }
                frontend::sasl_response(sasl.message(), &mut self.write_buf)?;
                self.flush().await?;
                match self.read_message().await? {
                    Message::AuthenticationSaslFinal(body) => sasl.finish(body.data())?,
                    Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                    _ => return Err(unexpected("SASL final")),
                }
            }
            Message::ErrorResponse(body) => return Err(server_error(body.fields())),
            _ => {
                return Err(ReplicationError::Unsupported(
                    "the server asks for an authentication method tidemark does not support \
                     (supported: trust, password, md5, scram-sha-256)"
                        .into(),
                ))
            }
        }
        match self.read_message().await? {
            Message::AuthenticationOk => Ok(()),
            Message::ErrorResponse(body) => Err(server_error(body.fields())),
            _ => Err(unexpected("authentication ok")),
        }
    }

    /// Runs a replication command (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT …) and returns
    /// its rows as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(range) = ranges.next()? {
                        row.push(match range {
                            Some(r) => Some(
                                std::str::from_utf8(buf.get(r).unwrap_or_default())
                                    .map_err(|e| ReplicationError::Protocol(e.to_string()))?
                                    .to_string(),
                            ),
                            None => None,
                        });
                    }
                    rows.push(row);
                }
                Message::ErrorResponse(body) => error = Some(server_error(body.fields())),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .filter(|r| r.len() >= 4)
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten();
        let system_id = field(0).unwrap_or_default();
        let timeline = field(1)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM: bad timeline".into()))?;
        let xlog_position = field(2)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM: bad xlogpos".into()))?;
        Ok(SystemIdentity {
            system_id,
            timeline,
            xlog_position,
            database: field(3),
        })
    }

    /// Creates a logical slot with pgoutput without exporting a snapshot.
    pub async fn create_slot(&mut self, slot: &str) -> Result<Position, ReplicationError> {
        let (lsn, _) = self.create_slot_with(slot, "NOEXPORT_SNAPSHOT").await?;
        Ok(lsn)
    }

    /// Creates the slot and exports the snapshot of its consistent point: ordinary
    /// connections that `SET TRANSACTION SNAPSHOT` to the returned name see the database as it
    /// was there, until this connection runs its next command. Returns the consistent point
    /// (where streaming starts) and the snapshot's name.
    pub async fn create_slot_exporting(
        &mut self,
        slot: &str,
    ) -> Result<(Position, String), ReplicationError> {
        let (lsn, snapshot) = self.create_slot_with(slot, "EXPORT_SNAPSHOT").await?;
        let snapshot = snapshot.ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT: no snapshot name".into())
        })?;
        Ok((lsn, snapshot))
    }

    async fn create_slot_with(
        &mut self,
        slot: &str,
        snapshot_option: &str,
    ) -> Result<(Position, Option<String>), ReplicationError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {snapshot_option}",
            quote_ident(slot)
        );
        let rows = self.simple_query(&sql).await?;
        let row = rows.first();
        let lsn = row
            .and_then(|r| r.get(1).cloned().flatten())
            .and_then(|lsn| lsn.parse().ok())
            .ok_or_else(|| ReplicationError::Protocol("CREATE_REPLICATION_SLOT: no LSN".into()))?;
        Ok((lsn, row.and_then(|r| r.get(2).cloned().flatten())))
    }

    /// Enters CopyBoth mode streaming pgoutput changes of `publication` from `start`.
    pub async fn start_replication(
        &mut self,
        slot: &str,
        publication: &str,
        start: Position,
        options: StreamOptions,
    ) -> Result<(), ReplicationError> {
        let protocol = if options.streaming {
            "proto_version '2', streaming 'on'"
        } else {
            "proto_version '1'"
        };
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({protocol}, publication_names {}{})",
            quote_ident(slot),
            start,
            quote_literal(&quote_ident(publication)),
            if options.messages {
                ", messages 'true'"
            } else {
                ""
            },
        );
        frontend::query(&sql, &mut self.write_buf)?;
        self.flush().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.first() {
                Some(&COPY_BOTH_RESPONSE_TAG) => return Ok(()),
                _ => match parse_frame(frame)? {
                    Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                    Message::NoticeResponse(_) => {}
                    _ => return Err(unexpected("CopyBothResponse")),
                },
            }
        }
    }

    /// The next message of the CopyBoth stream. Cancel-safe: a message is either returned
    /// whole or stays buffered.
    pub async fn next_message(&mut self) -> Result<ReplicationMessage, ReplicationError> {
        loop {
            match parse_frame(self.read_frame().await?)? {
                Message::CopyData(body) => return parse_copy_data(body.into_bytes()),
                Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                Message::CopyDone => {
                    return Err(ReplicationError::Protocol(
                        "the server ended the replication stream".into(),
                    ))
                }
                _ => {}
            }
        }
    }

    /// Sends a standby status update: everything up to `flush` is durable on our side.
    pub async fn send_status(&mut self, flush: Position) -> Result<(), ReplicationError> {
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(STANDBY_STATUS_UPDATE_TAG);
        payload.put_u64(flush.0);
        payload.put_u64(flush.0);
        payload.put_u64(flush.0);
        payload.put_i64(pg_now_micros());
        payload.put_u8(0);
        frontend::CopyData::new(payload.freeze())?.write(&mut self.write_buf);
        self.flush().await
    }

    /// Ends the stream politely so the walsender records the last status we sent.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        frontend::copy_done(&mut self.write_buf);
        frontend::terminate(&mut self.write_buf);
        self.flush().await?;
        self.stream.shutdown().await?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.stream.write_all(&self.write_buf).await?;
        self.write_buf.clear();
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads one whole backend message frame (tag, length, body). Cancel-safe.
    async fn read_frame(&mut self) -> Result<BytesMut, ReplicationError> {
        loop {
            if self.read_buf.len() >= 5 {
                let len = u32::from_be_bytes([
                    self.read_buf[1],
                    self.read_buf[2],
                    self.read_buf[3],
                    self.read_buf[4],
                ]) as usize;
                if len < 4 {
                    return Err(ReplicationError::Protocol(format!(
                        "message {:?} with invalid length {len}",
                        self.read_buf[0] as char
                    )));
                }
                if self.read_buf.len() > len {
                    return Ok(self.read_buf.split_to(len + 1));
                }
                self.read_buf.reserve(len + 1 - self.read_buf.len());
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ReplicationError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }

    async fn read_message(&mut self) -> Result<Message, ReplicationError> {
        let frame = self.read_frame().await?;
        parse_frame(frame)
    }
}

fn parse_frame(mut frame: BytesMut) -> Result<Message, ReplicationError> {
    let tag = frame.first().copied().unwrap_or_default();
    Message::parse(&mut frame)
        .map_err(|e| ReplicationError::Protocol(format!("message {:?}: {e}", tag as char)))?
        .ok_or_else(|| ReplicationError::Protocol(format!("message {:?} incomplete", tag as char)))
}

fn parse_copy_data(mut data: Bytes) -> Result<ReplicationMessage, ReplicationError> {
    let truncated = |what: &str| {
        ReplicationError::Protocol(format!("{what} message truncated ({} bytes)", data.len()))
    };
    match data.first().copied() {
        Some(XLOG_DATA_TAG) => {
            if data.len() < 25 {
                return Err(truncated("XLogData"));
            }
            data.advance(1);
            let wal_start = Position(data.get_u64());
            let wal_end = Position(data.get_u64());
            let _send_time = data.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data,
            })
        }
        Some(PRIMARY_KEEPALIVE_TAG) => {
            if data.len() < 18 {
                return Err(truncated("primary keepalive"));
            }
            data.advance(1);
            let wal_end = Position(data.get_u64());
            let _send_time = data.get_i64();
            Ok(ReplicationMessage::PrimaryKeepalive {
                wal_end,
                reply_requested: data.get_u8() == 1,
            })
        }
        other => Err(ReplicationError::Protocol(format!(
            "unknown CopyData message {:?}",
            other.map(char::from)
        ))),
    }
}

async fn open_stream(config: &PgConfig) -> Result<Box<dyn Transport>, ReplicationError> {
    let host = config
        .get_hosts()
        .first()
        .cloned()
        .unwrap_or_else(|| Host::Unix(PathBuf::from("/var/run/postgresql")));
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let timeout = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
    match host {
        Host::Tcp(name) => {
            // As in libpq, `hostaddr` is where to connect when given; `host` stays the name
            // the server's certificate must carry.
            let (addr, target) = match config.get_hostaddrs().first() {
                Some(ip) => (ip.to_string(), format!("{name} ({ip}) port {port}")),
                None => (name.clone(), format!("{name}:{port}")),
            };
            // Before any I/O: an unusable sslrootcert is the operator's to fix, not a network
            // failure to retry.
            let tls = tls::client_config(config).map_err(tls_error)?;
            let connecting = async {
                let stream = TcpStream::connect((addr.as_str(), port))
                    .await
                    .map_err(|source| ReplicationError::Connect {
                        target: target.clone(),
                        source,
                    })?;
                let _ = stream.set_nodelay(true);
                match tls {
                    None => Ok(Box::new(stream) as Box<dyn Transport>),
                    Some(tls) => negotiate_tls(stream, tls, config, &name, &target).await,
                }
            };
            tokio::time::timeout(timeout, connecting)
                .await
                .map_err(|_| ReplicationError::Connect {
                    target: target.clone(),
                    source: timed_out(),
                })?
        }
        // PostgreSQL never offers TLS on a Unix socket, and libpq does not ask there.
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let target = path.display().to_string();
            tokio::time::timeout(timeout, UnixStream::connect(&path))
                .await
                .map_err(|_| timed_out())
                .and_then(|r| r)
                .map(|s| Box::new(s) as Box<dyn Transport>)
                .map_err(|source| ReplicationError::Connect { target, source })
        }
    }
}

/// Asks the server for TLS with an SSLRequest ("SSL Session Encryption" in the protocol
/// chapter of the PostgreSQL docs) unless `sslnegotiation=direct`, and does the handshake
/// when it agrees; the startup message then goes over the returned stream. A server that
/// answers `N` gets a plain connection only when the mode allows it.
async fn negotiate_tls(
    mut stream: TcpStream,
    tls: rustls::ClientConfig,
    config: &PgConfig,
    host: &str,
    target: &str,
) -> Result<Box<dyn Transport>, ReplicationError> {
    let mode = config.tls().mode;
    let lost = |source: io::Error| ReplicationError::Connect {
        target: target.to_owned(),
        source,
    };
    if config.get_ssl_negotiation() == SslNegotiation::Direct {
        if mode.allows_plain() {
            return Err(ReplicationError::Unsupported(format!(
                "{}: sslnegotiation=direct cannot fall back to a plain connection, so it \
                 needs sslmode=require or stricter, not sslmode={mode}",
                config.redacted()
            )));
        }
    } else {
        let mut request = BytesMut::with_capacity(8);
        frontend::ssl_request(&mut request);
        stream.write_all(&request).await.map_err(lost)?;
        // Exactly one byte: anything the server sent after it belongs to the TLS handshake,
        // never to the (encrypted) protocol that follows.
        match stream.read_u8().await.map_err(lost)? {
            b'S' => {}
            b'N' if mode.allows_plain() => return Ok(Box::new(stream)),
            b'N' => return Err(tls_error(tls::refused(config))),
            other => {
                return Err(ReplicationError::Protocol(format!(
                    "the server answered the SSLRequest with {:?} instead of S or N",
                    char::from(other)
                )))
            }
        }
    }
    let name = tls::server_name(config, host).map_err(tls_error)?;
    match TlsConnector::from(Arc::new(tls))
        .connect(name, stream)
        .await
    {
        Ok(stream) => Ok(Box::new(stream)),
        Err(e) => Err(match tls::handshake_failure(config, &e) {
            Some(failure) => tls_error(failure),
            None => lost(e),
        }),
    }
}

/// TLS problems need the operator (a certificate, sslrootcert, the server's ssl setting):
/// they are not retried like a lost connection.
fn tls_error(e: tls::TlsError) -> ReplicationError {
    ReplicationError::Unsupported(e.to_string())
}

fn server_error(mut fields: ErrorFields<'_>) -> ReplicationError {
    let mut code = SqlState::INTERNAL_ERROR;
    let mut message = String::new();
    let mut detail = None;
    let mut hint = None;
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'C' => code = SqlState::from_code(&value),
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
    }
    ReplicationError::Server {
        code,
        message,
        detail,
        hint,
    }
}

fn unexpected(expected: &str) -> ReplicationError {
    ReplicationError::Protocol(format!("unexpected message, expected {expected}"))
}

/// Now, in microseconds since PostgreSQL's epoch.
fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default();
    unix - PG_EPOCH_OFFSET_MICROS
}

pub fn quote_ident(name: &str) -> String {
    postgres_protocol::escape::escape_identifier(name)
}

pub fn quote_literal(value: &str) -> String {
    postgres_protocol::escape::escape_literal(value)
}
