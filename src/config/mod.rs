//! The agent's configuration file. The TOML text is parsed into a tree that keeps the byte span
//! of every key and value (`document`), `${NAME}` references in string values are replaced from
//! the environment (`interpolate`; after parsing, so a value is never re-read as TOML), and one
//! pure pass then validates the tree and collects every problem as `file:line:col: message`
//! (`check` is its machinery, `schema` and `sink` what the file holds, `values` and `url` the
//! kinds of value, `suggest` the "did you mean" for unknown keys).
//!
//! Invariants: a [`Config`] exists only when the whole file is valid, and nothing this module
//! prints (Debug, Display, errors) shows a password or the value of an environment variable.

mod check;
mod document;
mod http_url;
mod interpolate;
mod mysql_url;
mod schema;
mod sink;
mod ssl;
mod suggest;
#[cfg(test)]
mod testing;
mod url;
mod values;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use check::Checker;

pub use http_url::HttpUrl;
pub use mysql_url::MySqlUrl;
pub use ssl::{RootCert, SslMode, TlsSettings};
pub use url::{ConnectionUrl, InvalidUrl, PgConfig};

/// A validated configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from, as given.
    pub path: PathBuf,
    pub agent: AgentConfig,
    pub source: SourceConfig,
    pub sinks: Vec<SinkConfig>,
}

/// `[agent]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Logical server name (`[A-Za-z0-9_]+`); the default slot and publication derive from it.
    pub name: String,
    /// Offset log, dead-letter queue and schema history; resolved against the config file's
    /// directory.
    pub data_dir: PathBuf,
    pub health_addr: SocketAddr,
    /// `/ready` answers 503 while a sink lags more than this behind the source.
    pub ready_max_lag: Duration,
    /// When the log holds about this much that some sink has not applied, the source stops
    /// reading WAL until the sinks catch up (backpressure).
    pub log_max_bytes: u64,
}

/// `[source]`: one source per agent; the set of source types is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    Postgres(PostgresSourceConfig),
    MySql(MySqlSourceConfig),
}

impl SourceConfig {
    /// The captured tables' patterns.
    pub fn tables(&self) -> &[TablePattern] {
        match self {
            SourceConfig::Postgres(config) => &config.tables,
            SourceConfig::MySql(config) => &config.tables,
        }
    }
}

/// `[source]` with `type = "mysql"`: a MySQL or MariaDB server's binlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MySqlSourceConfig {
    pub url: MySqlUrl,
    /// Never empty; each names its database (the pattern's schema).
    pub tables: Vec<TablePattern>,
    /// The server id the binlog stream registers with: unique among the server's replicas.
    pub server_id: u32,
    pub snapshot: SnapshotMode,
    /// How many connections copy the initial snapshot at once.
    pub snapshot_parallelism: usize,
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSourceConfig {
    pub url: ConnectionUrl,
    /// Never empty.
    pub tables: Vec<TablePattern>,
    /// A valid replication slot name, `[a-z0-9_]{1,63}`.
    pub slot: String,
    pub publication: String,
    pub snapshot: SnapshotMode,
    /// How many connections copy the initial snapshot (tables and ranges of a table at once).
    pub snapshot_parallelism: usize,
    /// How often `heartbeat_query` runs on the source (zero: never), so that an idle
    /// captured database still advances the slot past WAL other databases write.
    pub heartbeat_interval: Duration,
    pub heartbeat_query: String,
    /// A warning (every minute) while the slot keeps more WAL than this.
    pub slot_max_retained_bytes: u64,
    pub connect_timeout: Duration,
    pub status_interval: Duration,
}

/// One entry of `source.tables`: a table, or every table of a schema. Names are literal
/// (case-sensitive, never quoted).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TablePattern {
    pub schema: String,
    /// `None` means every table of `schema` (`"schema.*"`).
    pub table: Option<String>,
}

impl TablePattern {
    /// Whether the table `schema.table` is captured by this pattern (exact, case-sensitive).
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        self.schema == schema
            && match &self.table {
                None => true,
                Some(t) => t == table,
            }
    }
}

impl fmt::Display for TablePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.table {
            Some(table) => write!(f, "{}.{}", self.schema, table),
            None => write!(f, "{}.*", self.schema),
        }
    }
}

/// `source.snapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotMode {
    /// Copy the existing rows, then stream changes.
    Initial,
    /// Only stream changes.
    Never,
}

/// One `[[sink]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// Unique across sinks, `[A-Za-z0-9_-]+`.
    pub name: String,
    /// At least 1.
    pub batch_max_rows: usize,
    /// The longest a sink lingers for more changes before writing a batch that is not full;
    /// 0 (the default) writes what has queued up at once.
    pub batch_max_wait: Duration,
    pub kind: SinkKind,
}

/// The sink types; the set is closed (`type = "..."` in the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkKind {
    Jsonl(JsonlSinkConfig),
    Postgres(PostgresSinkConfig),
    ClickHouse(ClickHouseSinkConfig),
}

impl SinkKind {
    /// Whether the sink keys its target rows by the source's primary key.
    pub fn requires_primary_keys(&self) -> bool {
        match self {
            SinkKind::Jsonl(_) => false,
            SinkKind::Postgres(_) => true,
            SinkKind::ClickHouse(sink) => sink.mode != ClickHouseMode::Changelog,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonlSinkConfig {
    /// A directory; resolved against the config file's directory.
    pub path: PathBuf,
    /// At least 1.
    pub max_file_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSinkConfig {
    pub url: ConnectionUrl,
    /// Target schema (literal name, 1 to 63 bytes).
    pub schema: String,
    pub mode: SinkMode,
    pub soft_delete: bool,
    /// Only meaningful for [`SinkMode::Scd2`].
    pub columns: ColumnNaming,
    pub history_deletes: bool,
    /// What a column dropped in the source becomes in the target.
    pub dropped_columns: DroppedColumns,
    /// Per-table renames; a table without one keeps its name in `schema`.
    pub tables: Vec<TableMapping>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickHouseSinkConfig {
    /// The server's HTTP interface; credentials from the URL unless `user` / `password` say.
    pub url: HttpUrl,
    pub user: String,
    pub password: Option<String>,
    /// Target database, created if missing.
    pub database: String,
    pub mode: ClickHouseMode,
    /// Only meaningful for [`ClickHouseMode::Scd2`].
    pub columns: ColumnNaming,
    /// SCD2: a delete adds a version marked deleted (else it only ends the current one).
    pub history_deletes: bool,
    /// Per-table renames (`"database.table"`); a table without one keeps its name in
    /// `database`.
    pub tables: Vec<TableMapping>,
}

/// `mode` of a clickhouse sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClickHouseMode {
    /// A ReplacingMergeTree per table: the live rows under `FINAL`.
    Merge,
    /// Every committed version, with its validity.
    Scd2,
    /// Every change as a row, partitioned by day.
    Changelog,
}

impl ClickHouseMode {
    /// The name `mode` gives it.
    pub fn name(self) -> &'static str {
        match self {
            ClickHouseMode::Merge => "merge",
            ClickHouseMode::Scd2 => "scd2",
            ClickHouseMode::Changelog => "changelog",
        }
    }
}

/// `mode` of a postgres sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SinkMode {
    Merge,
    Scd2,
    Append,
}

/// `columns` of a postgres sink: the names of the SCD2 bookkeeping columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnNaming {
    Tidemark,
    Dbt,
}

/// `dropped_columns` of a postgres sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DroppedColumns {
    /// Kept, nullable: rows keep the values they had, rows written later hold NULL.
    Keep,
    Drop,
}

/// One `[[sink.table]]`. Both names are always qualified, `"schema.table"`: an unqualified
/// `source` is in schema `public`, an unqualified `target` in the sink's `schema`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMapping {
    pub source: String,
    pub target: String,
}

/// Why there is no [`Config`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("{}: cannot read config file: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Everything wrong with the file, in file order; Display prints one problem per line.
    #[error("{}", join_lines(.problems))]
    Invalid { problems: Vec<Problem> },
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// Where in the file, when the problem has a place (a missing table has none).
    pub location: Option<Location>,
    pub message: String,
}

/// A 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some(at) => write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                at.line,
                at.column,
                self.message
            ),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

fn join_lines(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads, interpolates (from the process environment) and validates the file; all
    /// problems in one error.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Config::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Same from text; `path` is only used in messages and to resolve relative paths; `env`
    /// looks up `${NAME}`.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut checker = Checker::new(text);
        let mut root = match document::parse(text) {
            Ok(root) => root,
            Err((at, message)) => {
                checker.report(at, message);
                return Err(checker.into_error(path));
            }
        };
        checker.interpolate(&mut root, env);
        match checker.config(&root, path) {
            Some(config) if checker.is_clean() => Ok(config),
            _ => {
                if checker.is_clean() {
                    // Every path that yields no value reports why; this is a safety net.
                    checker.report(None, "invalid configuration".to_owned());
                }
                Err(checker.into_error(path))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::testing::{fake_env, url, HEAD, SECRET};

    #[test]
    fn full_config_parses_every_value_and_resolves_paths() {
        let text = r#"
[agent]
name = "Shop"
data_dir = "./state"
health_addr = "0.0.0.0:9000"

[source]
type = "postgres"
url = "postgres://replicator:${PW}@db.internal:5433/shop"
tables = ["public.orders", "inventory.*", "Customers"]
slot = "custom_slot"
publication = "Custom_Pub"
snapshot = "never"
connect_timeout = "1.5s"
status_interval = "2m"
snapshot_parallelism = 3

[[sink]]
name = "events"
type = "jsonl"
path = "./out/events"
max_file_bytes = "64MiB"
batch_max_rows = 500
batch_max_wait = "1s"

[[sink]]
name = "mirror-2"
type = "postgres"
url = "postgres://loader@127.0.0.1:5432/warehouse"
schema = "replica"
mode = "scd2"
soft_delete = true
columns = "dbt"
history_deletes = true
dropped_columns = "drop"
[[sink.table]]
source = "public.orders"
target = "sales.orders"
[[sink.table]]
source = "Customers"
target = "clients"

[[sink]]
name = "archive"
type = "jsonl"
path = "/var/lib/archive"
max_file_bytes = 1000
"#;
        let config =
            Config::parse(text, Path::new("/etc/tidemark/tidemark.toml"), &fake_env).unwrap();
        let expected = Config {
            path: PathBuf::from("/etc/tidemark/tidemark.toml"),
            agent: AgentConfig {
                name: "Shop".to_owned(),
                data_dir: PathBuf::from("/etc/tidemark/state"),
                health_addr: "0.0.0.0:9000".parse().unwrap(),
                ready_max_lag: Duration::from_secs(30),
                log_max_bytes: 2 * 1024 * 1024 * 1024,
            },
            source: SourceConfig::Postgres(PostgresSourceConfig {
                url: url(&format!(
                    "postgres://replicator:{SECRET}@db.internal:5433/shop"
                )),
                tables: vec![
                    TablePattern {
                        schema: "public".to_owned(),
                        table: Some("orders".to_owned()),
                    },
                    TablePattern {
                        schema: "inventory".to_owned(),
                        table: None,
                    },
                    TablePattern {
                        schema: "public".to_owned(),
                        table: Some("Customers".to_owned()),
                    },
                ],
                slot: "custom_slot".to_owned(),
                publication: "Custom_Pub".to_owned(),
                snapshot: SnapshotMode::Never,
                snapshot_parallelism: 3,
                heartbeat_interval: Duration::from_secs(60),
                heartbeat_query:
                    "SELECT pg_logical_emit_message(false, 'tidemark_heartbeat', now()::text)"
                        .to_string(),
                slot_max_retained_bytes: 1024 * 1024 * 1024,
                connect_timeout: Duration::from_millis(1500),
                status_interval: Duration::from_secs(120),
            }),
            sinks: vec![
                SinkConfig {
                    name: "events".to_owned(),
                    batch_max_rows: 500,
                    batch_max_wait: Duration::from_secs(1),
                    kind: SinkKind::Jsonl(JsonlSinkConfig {
                        path: PathBuf::from("/etc/tidemark/out/events"),
                        max_file_bytes: 64 * 1024 * 1024,
                    }),
                },
                SinkConfig {
                    name: "mirror-2".to_owned(),
                    batch_max_rows: 10_000,
                    batch_max_wait: Duration::ZERO,
                    kind: SinkKind::Postgres(PostgresSinkConfig {
                        url: url("postgres://loader@127.0.0.1:5432/warehouse"),
                        schema: "replica".to_owned(),
                        mode: SinkMode::Scd2,
                        soft_delete: true,
                        columns: ColumnNaming::Dbt,
                        history_deletes: true,
                        dropped_columns: DroppedColumns::Drop,
                        tables: vec![
                            TableMapping {
                                source: "public.orders".to_owned(),
                                target: "sales.orders".to_owned(),
                            },
                            TableMapping {
                                source: "public.Customers".to_owned(),
                                target: "replica.clients".to_owned(),
                            },
                        ],
                    }),
                },
                SinkConfig {
                    name: "archive".to_owned(),
                    batch_max_rows: 10_000,
                    batch_max_wait: Duration::ZERO,
                    kind: SinkKind::Jsonl(JsonlSinkConfig {
                        path: PathBuf::from("/var/lib/archive"),
                        max_file_bytes: 1000,
                    }),
                },
            ],
        };
        assert_eq!(config, expected);
        let SourceConfig::Postgres(pg) = &config.source else {
            panic!("{:?} is not a postgres source", config.source)
        };
        let pg_config = pg.url.pg_config();
        assert_eq!(pg_config.get_password(), Some(SECRET.as_bytes()));
        assert_eq!(pg_config.get_dbname(), Some("shop"));
        assert_eq!(pg_config.get_ports(), &[5433]);
    }

    #[test]
    fn omitted_keys_take_their_defaults_and_slot_derives_from_agent_name() {
        let text = r#"
[agent]
name = "Shop_EU"
[source]
type = "postgres"
url = "postgres://replicator@127.0.0.1:5432/shop"
tables = ["orders"]
[[sink]]
name = "events"
type = "jsonl"
path = "events"
[[sink]]
name = "mirror"
type = "postgres"
url = "postgres://loader@127.0.0.1:5432/warehouse"
schema = "replica"
"#;
        let config = Config::parse(text, Path::new("conf/tidemark.toml"), &fake_env).unwrap();
        assert_eq!(config.agent.data_dir, PathBuf::from("conf/tidemark-data"));
        assert_eq!(
            config.agent.health_addr,
            SocketAddr::from(([127, 0, 0, 1], 8686))
        );
        let SourceConfig::Postgres(pg) = &config.source else {
            panic!("{:?} is not a postgres source", config.source)
        };
        assert_eq!(pg.slot, "tidemark_shop_eu");
        assert_eq!(pg.publication, "tidemark_shop_eu");
        assert_eq!(pg.snapshot, SnapshotMode::Initial);
        assert_eq!(pg.connect_timeout, Duration::from_secs(30));
        assert_eq!(pg.status_interval, Duration::from_secs(10));
        assert_eq!(
            pg.tables,
            vec![TablePattern {
                schema: "public".to_owned(),
                table: Some("orders".to_owned())
            }]
        );
        assert_eq!(
            config.sinks[0],
            SinkConfig {
                name: "events".to_owned(),
                batch_max_rows: 10_000,
                batch_max_wait: Duration::ZERO,
                kind: SinkKind::Jsonl(JsonlSinkConfig {
                    path: PathBuf::from("conf/events"),
                    max_file_bytes: 134_217_728,
                }),
            }
        );
        let SinkKind::Postgres(mirror) = &config.sinks[1].kind else {
            panic!("expected a postgres sink, got {:?}", config.sinks[1]);
        };
        assert_eq!(mirror.mode, SinkMode::Merge);
        assert!(!mirror.soft_delete);
        assert_eq!(mirror.columns, ColumnNaming::Tidemark);
        assert!(!mirror.history_deletes);
        assert_eq!(mirror.dropped_columns, DroppedColumns::Keep);
        assert_eq!(mirror.tables, vec![]);

        // A config file in the working directory resolves to plain relative paths.
        let config = Config::parse(text, Path::new("tidemark.toml"), &fake_env).unwrap();
        assert_eq!(config.agent.data_dir, PathBuf::from("tidemark-data"));
    }

    #[test]
    fn load_reads_the_file_and_reports_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tidemark.toml");
        std::fs::write(
            &path,
            format!("{HEAD}[[sink]]\nname = \"e\"\ntype = \"jsonl\"\npath = \"./events\"\n"),
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.path, path);
        assert_eq!(config.agent.data_dir, dir.path().join("tidemark-data"));
        let SinkKind::Jsonl(jsonl) = &config.sinks[0].kind else {
            panic!("expected a jsonl sink, got {:?}", config.sinks[0]);
        };
        assert_eq!(jsonl.path, dir.path().join("events"));

        let missing = dir.path().join("nope.toml");
        let err = Config::load(&missing).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("{}: cannot read config file: ", missing.display())),
            "{err}"
        );
    }
}
