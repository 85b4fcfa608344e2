//! What the file holds: the top-level table, `[agent]` and `[source]`, their keys and their
//! defaults. The `[[sink]]` tables are in `sink`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::check::{Checker, Got, Spot, Table};
use super::document::{start, Key, Node, Val};
use super::values::{is_agent_name, is_publication_name, is_slot_name, resolve};
use super::{
    AgentConfig, Config, MySqlSourceConfig, PostgresSourceConfig, SnapshotMode, SourceConfig,
    TablePattern,
};

const DEFAULT_DATA_DIR: &str = "./tidemark-data";
const DEFAULT_HEALTH_PORT: u16 = 8686;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_READY_MAX_LAG: Duration = Duration::from_secs(30);
const DEFAULT_LOG_MAX_BYTES: u64 = 2 * 1024 * 1024 * 1024;
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);
/// Writes WAL in the captured database without touching a table: a logical message nobody
/// subscribes to.
const DEFAULT_HEARTBEAT_QUERY: &str =
    "SELECT pg_logical_emit_message(false, 'tidemark_heartbeat', now()::text)";
const DEFAULT_SLOT_MAX_RETAINED_BYTES: u64 = 1024 * 1024 * 1024;

const MYSQL_SOURCE_KEYS: &[&str] = &[
    "type",
    "url",
    "tables",
    "server_id",
    "snapshot",
    "snapshot_parallelism",
    "connect_timeout",
];

const TOP_KEYS: &[&str] = &["agent", "source", "sink"];
const AGENT_KEYS: &[&str] = &[
    "name",
    "data_dir",
    "health_addr",
    "ready_max_lag",
    "log_max_bytes",
];
const SOURCE_KEYS: &[&str] = &[
    "type",
    "url",
    "tables",
    "slot",
    "publication",
    "snapshot",
    "connect_timeout",
    "status_interval",
    "snapshot_parallelism",
    "heartbeat_interval",
    "heartbeat_query",
    "slot_max_retained_bytes",
];

impl Checker<'_> {
    /// The whole file; `path` resolves the relative paths in it.
    pub(super) fn config(&mut self, root: &Val, path: &Path) -> Option<Config> {
        let Node::Table(entries) = &root.node else {
            self.report(
                start(&root.span),
                "the file must be a TOML table".to_owned(),
            );
            return None;
        };
        let root = Table {
            label: "the top-level table".to_owned(),
            at: None,
            entries,
        };
        self.check_keys(&root, TOP_KEYS, &[], "");
        let base = path.parent().unwrap_or(Path::new(""));

        let agent = match root.get("agent") {
            Some((key, val)) => self.agent(key, val, base),
            None => {
                self.report(
                    None,
                    "missing [agent] table; it needs at least name = \"...\"".to_owned(),
                );
                None
            }
        };
        let source = match root.get("source") {
            Some((key, val)) => self.source(key, val, agent.as_ref().map(|a| a.name.as_str())),
            None => {
                self.report(
                    None,
                    "missing [source] table; add one with type = \"postgres\", url and tables"
                        .to_owned(),
                );
                None
            }
        };
        let patterns = source.as_ref().map(SourceConfig::tables);
        let sinks = match root.get("sink") {
            Some((key, val)) => self.sinks(key, val, base, patterns),
            None => {
                self.report(None, "no sinks configured; add a [[sink]] table".to_owned());
                None
            }
        };
        Some(Config {
            path: path.to_path_buf(),
            agent: agent?,
            source: source?,
            sinks: sinks?,
        })
    }

    fn agent(&mut self, key: &Key, val: &Val, base: &Path) -> Option<AgentConfig> {
        let t = self.table("[agent]".to_owned(), key, val)?;
        self.check_keys(&t, AGENT_KEYS, &[], "");
        let name = self.field(&t, "name", |c, s, v| {
            c.name(s, v, is_agent_name, "letters, digits and _ ([A-Za-z0-9_]+)")
        });
        let name = self.required(&t, "name", name);
        let data_dir = self
            .field(&t, "data_dir", |c, s, v| c.path(s, v, base))
            .or_else_with(|| resolve(base, DEFAULT_DATA_DIR));
        let health_addr = self
            .field(&t, "health_addr", Self::socket_addr)
            .or(SocketAddr::from(([127, 0, 0, 1], DEFAULT_HEALTH_PORT)));
        let ready_max_lag = self
            .field(&t, "ready_max_lag", |c, s, v| c.duration(s, v, false))
            .or(DEFAULT_READY_MAX_LAG);
        let log_max_bytes = self
            .field(&t, "log_max_bytes", Self::size)
            .or(DEFAULT_LOG_MAX_BYTES);
        Some(AgentConfig {
            name: name?,
            data_dir: data_dir?,
            health_addr: health_addr?,
            ready_max_lag: ready_max_lag?,
            log_max_bytes: log_max_bytes?,
        })
    }

    fn source(&mut self, key: &Key, val: &Val, agent_name: Option<&str>) -> Option<SourceConfig> {
        let t = self.table("[source]".to_owned(), key, val)?;
        let source_type = self.field(&t, "type", |c, s, v| {
            c.choice(
                s,
                v,
                &[
                    ("postgres", SourceType::Postgres),
                    ("mysql", SourceType::MySql),
                ],
            )
        });
        match source_type {
            Got::Bad => None,
            Got::Absent => {
                // Validate the rest as postgres, the first type, so every problem shows at once.
                self.report(
                    t.at,
                    format!(
                        "missing required key \"type\" in {}; expected type = \"postgres\" or \"mysql\"",
                        t.label
                    ),
                );
                self.postgres_source(&t, agent_name)
            }
            Got::Ok(SourceType::Postgres) => self.postgres_source(&t, agent_name),
            Got::Ok(SourceType::MySql) => self.mysql_source(&t, agent_name),
        }
    }

    /// `[source]` with `type = "mysql"` (MySQL or MariaDB).
    fn mysql_source(&mut self, t: &Table<'_>, agent_name: Option<&str>) -> Option<SourceConfig> {
        self.check_keys(t, MYSQL_SOURCE_KEYS, &[], "");
        let url = self.field(t, "url", Self::mysql_url);
        let url = self.required(t, "url", url);
        let tables = self.field(t, "tables", |c, s, v| {
            let patterns = c.table_patterns(s, v)?;
            if unqualified_table(v) {
                c.report(
                    s.at,
                    format!(
                        "{}: name each table with its database, e.g. \"shop.orders\" or \"shop.*\"",
                        s.what
                    ),
                );
                return None;
            }
            Some(patterns)
        });
        let tables = self.required_with(
            t,
            "tables",
            tables,
            "; list the tables to capture, e.g. tables = [\"shop.orders\", \"shop.*\"]",
        );
        let server_id = self
            .field(t, "server_id", |c, s, v| {
                let Node::Int(n) = v.node else {
                    c.wrong_type(s, "an integer", &v.node);
                    return None;
                };
                match u32::try_from(n) {
                    Ok(id) if id > 0 => Some(id),
                    _ => {
                        c.report(
                            s.at,
                            format!(
                                "{} must be 1 to 4294967295, unique among the server's replicas; found {n}",
                                s.what
                            ),
                        );
                        None
                    }
                }
            })
            .or(agent_name.map_or(1, derived_server_id));
        let snapshot = self.snapshot_mode(t);
        let connect_timeout = self
            .field(t, "connect_timeout", |c, s, v| c.duration(s, v, false))
            .or(DEFAULT_CONNECT_TIMEOUT);
        let snapshot_parallelism = self
            .field(t, "snapshot_parallelism", Self::positive_count)
            .or(std::thread::available_parallelism().map_or(1, usize::from));
        Some(SourceConfig::MySql(MySqlSourceConfig {
            url: url?,
            tables: tables?,
            server_id: server_id?,
            snapshot: snapshot?,
            snapshot_parallelism: snapshot_parallelism?,
            connect_timeout: connect_timeout?,
        }))
    }

    fn snapshot_mode(&mut self, t: &Table<'_>) -> Option<SnapshotMode> {
        self.field(t, "snapshot", |c, s, v| {
            c.choice(
                s,
                v,
                &[
                    ("initial", SnapshotMode::Initial),
                    ("never", SnapshotMode::Never),
                ],
            )
        })
        .or(SnapshotMode::Initial)
    }

    /// `[source]` with `type = "postgres"`.
    fn postgres_source(&mut self, t: &Table<'_>, agent_name: Option<&str>) -> Option<SourceConfig> {
        self.check_keys(t, SOURCE_KEYS, &[], "");

        let url = self.field(t, "url", Self::url);
        let url = self.required(t, "url", url);
        let tables = self.field(t, "tables", Self::table_patterns);
        let tables = self.required_with(
            t,
            "tables",
            tables,
            "; list the tables to capture, e.g. tables = [\"public.orders\", \"public.*\"]",
        );

        let derived = agent_name.map(|name| format!("tidemark_{}", name.to_lowercase()));
        let slot = self.name_or_derived(
            t,
            "slot",
            is_slot_name,
            "1 to 63 characters of a-z, 0-9 and _ (a replication slot name)",
            derived.as_deref(),
        );
        let publication = self.name_or_derived(
            t,
            "publication",
            is_publication_name,
            "1 to 63 characters of letters, digits and _, not starting with a digit (a PostgreSQL identifier)",
            derived.as_deref(),
        );
        let snapshot = self.snapshot_mode(t);
        let connect_timeout = self
            .field(t, "connect_timeout", |c, s, v| c.duration(s, v, false))
            .or(DEFAULT_CONNECT_TIMEOUT);
        let status_interval = self
            .field(t, "status_interval", |c, s, v| c.duration(s, v, false))
            .or(DEFAULT_STATUS_INTERVAL);
        let heartbeat_interval = self
            .field(t, "heartbeat_interval", |c, s, v| c.duration(s, v, true))
            .or(DEFAULT_HEARTBEAT_INTERVAL);
        let heartbeat_query = self
            .field(t, "heartbeat_query", |c, s, v| {
                c.name(s, v, |q| !q.trim().is_empty(), "an SQL statement")
            })
            .or(DEFAULT_HEARTBEAT_QUERY.to_string());
        let slot_max_retained_bytes = self
            .field(t, "slot_max_retained_bytes", Self::size)
            .or(DEFAULT_SLOT_MAX_RETAINED_BYTES);
        let snapshot_parallelism = self
            .field(t, "snapshot_parallelism", Self::positive_count)
            .or(std::thread::available_parallelism().map_or(1, usize::from));

        Some(SourceConfig::Postgres(PostgresSourceConfig {
            url: url?,
            tables: tables?,
            slot: slot?,
            publication: publication?,
            snapshot: snapshot?,
            snapshot_parallelism: snapshot_parallelism?,
            heartbeat_interval: heartbeat_interval?,
            heartbeat_query: heartbeat_query?,
            slot_max_retained_bytes: slot_max_retained_bytes?,
            connect_timeout: connect_timeout?,
            status_interval: status_interval?,
        }))
    }

    /// `key` (the slot or the publication) as written, or else `derived` from agent.name
    /// (None when agent.name is invalid or missing, which is reported already).
    fn name_or_derived(
        &mut self,
        t: &Table<'_>,
        key: &str,
        rule: fn(&str) -> bool,
        rule_text: &str,
        derived: Option<&str>,
    ) -> Option<String> {
        match self.field(t, key, |c, s, v| c.name(s, v, rule, rule_text)) {
            Got::Ok(name) => Some(name),
            Got::Bad => None,
            Got::Absent => match derived {
                Some(name) if rule(name) => Some(name.to_owned()),
                // agent.name's characters are valid in both rules: only the length can fail.
                Some(name) => {
                    self.report(
                        t.at,
                        format!(
                            "the default {key} name, \"tidemark_\" and agent.name, is {} characters, longer than 63; set {key:?} in {}",
                            name.len(),
                            t.label
                        ),
                    );
                    None
                }
                None => None,
            },
        }
    }

    fn table_patterns(&mut self, spot: &Spot, val: &Val) -> Option<Vec<TablePattern>> {
        let Node::Array(items) = &val.node else {
            self.wrong_type(spot, "an array of table names", &val.node);
            return None;
        };
        if items.is_empty() {
            self.report(
                spot.at,
                format!(
                    "{} must list at least one table, e.g. [\"public.orders\"]",
                    spot.what
                ),
            );
            return None;
        }
        let mut patterns = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            let item_spot = Spot {
                what: spot.what.clone(),
                at: start(&item.span).or(spot.at),
            };
            let Some(text) = self.text(&item_spot, item) else {
                ok = false;
                continue;
            };
            match parse_table_pattern(&text.value) {
                Some(pattern) => patterns.push(pattern),
                None => {
                    self.report(
                        item_spot.at,
                        format!(
                            "{}: invalid table {}; expected \"schema.table\", \"schema.*\" or \"table\" (in schema public)",
                            spot.what,
                            text.shown()
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(patterns)
    }
}

#[derive(Clone, Copy)]
enum SourceType {
    Postgres,
    MySql,
}

/// The server id a MySQL source registers with unless `server_id` is set: stable for the
/// agent's name, and far from the small ids servers are usually given.
fn derived_server_id(agent_name: &str) -> u32 {
    0x4000_0000 | (crc32fast::hash(agent_name.as_bytes()) & 0x3FFF_FFFF)
}

/// Whether the array `tables` names a table without its schema (or database).
fn unqualified_table(tables: &Val) -> bool {
    let Node::Array(items) = &tables.node else {
        return false;
    };
    items
        .iter()
        .any(|item| matches!(&item.node, Node::Str(text) if !text.value.contains('.')))
}

/// `"schema.table"`, `"schema.*"`, or `"table"` / `"*"` in schema `public`.
fn parse_table_pattern(s: &str) -> Option<TablePattern> {
    let (schema, table) = s.split_once('.').unwrap_or(("public", s));
    if schema.is_empty() || schema == "*" || table.is_empty() || table.contains('.') {
        return None;
    }
    Some(TablePattern {
        schema: schema.to_owned(),
        table: (table != "*").then(|| table.to_owned()),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::testing::{errors, HEAD, JSONL_SINK};

    #[test]
    fn missing_tables_and_no_sinks_are_reported_without_a_location() {
        assert_eq!(
            errors("[agent]\nname = \"shop\"\n"),
            "tidemark.toml: missing [source] table; add one with type = \"postgres\", url and tables\n\
             tidemark.toml: no sinks configured; add a [[sink]] table"
        );
        assert_eq!(
            errors(HEAD),
            "tidemark.toml: no sinks configured; add a [[sink]] table"
        );
        assert_eq!(
            errors(""),
            "tidemark.toml: missing [agent] table; it needs at least name = \"...\"\n\
             tidemark.toml: missing [source] table; add one with type = \"postgres\", url and tables\n\
             tidemark.toml: no sinks configured; add a [[sink]] table"
        );
        assert_eq!(
            errors(&format!("{HEAD}[sink]\nname = \"e\"\n")),
            "tidemark.toml:8:1: sink must be an array of tables: write [[sink]] (double brackets), not [sink]"
        );
    }

    #[test]
    fn a_mysql_source_takes_its_own_keys_and_defaults() {
        let text = format!(
            "[agent]\nname = \"shop\"\n[source]\ntype = \"mysql\"\n\
             url = \"mysql://repl:${{PW}}@127.0.0.1:3306/shop\"\n\
             tables = [\"shop.orders\", \"crm.*\"]\n{JSONL_SINK}"
        );
        let config = crate::config::testing::parse(&text).unwrap();
        let SourceConfig::MySql(mysql) = &config.source else {
            panic!("{:?} is not a mysql source", config.source)
        };
        assert_eq!(mysql.url.database(), "shop");
        assert_eq!(
            mysql.url.opts().pass(),
            Some(crate::config::testing::SECRET)
        );
        assert_eq!(mysql.server_id, derived_server_id("shop"));
        assert!(mysql.server_id > 1 << 30);
        assert_eq!(mysql.snapshot, SnapshotMode::Initial);
        assert_eq!(
            mysql
                .tables
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["shop.orders", "crm.*"]
        );
    }

    #[test]
    fn a_mysql_source_refuses_postgres_keys_unqualified_tables_and_bad_server_ids() {
        let text = format!(
            "[agent]\nname = \"shop\"\n[source]\ntype = \"mysql\"\n\
             url = \"mysql://repl@127.0.0.1:3306/shop\"\ntables = [\"orders\"]\n\
             slot = \"s\"\nserver_id = 0\n{JSONL_SINK}"
        );
        let message = errors(&text);
        assert!(
            message.contains("name each table with its database"),
            "{message}"
        );
        assert!(message.contains("unknown key \"slot\""), "{message}");
        assert!(
            message.contains("\"server_id\" in [source] must be 1 to 4294967295"),
            "{message}"
        );
    }

    #[test]
    fn an_unknown_source_type_lists_the_known_ones() {
        let text = format!("{}{JSONL_SINK}", HEAD.replace("\"postgres\"", "\"oracle\""));
        assert_eq!(
            errors(&text),
            "tidemark.toml:5:8: \"type\" in [source] must be one of \"postgres\", \"mysql\"; found \"oracle\""
        );
    }

    #[test]
    fn table_patterns_match_schema_and_table_literally() {
        let one = parse_table_pattern("sales.Orders").unwrap();
        assert_eq!(one.to_string(), "sales.Orders");
        assert!(one.matches("sales", "Orders"));
        assert!(!one.matches("sales", "orders"));
        assert!(!one.matches("public", "Orders"));
        let all = parse_table_pattern("sales.*").unwrap();
        assert_eq!(all.to_string(), "sales.*");
        assert!(all.matches("sales", "anything"));
        assert!(!all.matches("Sales", "anything"));
        let bare = parse_table_pattern("orders").unwrap();
        assert_eq!(bare.to_string(), "public.orders");
        assert!(bare.matches("public", "orders"));
        for bad in ["", ".x", "x.", "*.x", "a.b.c"] {
            assert_eq!(parse_table_pattern(bad), None, "{bad:?}");
        }
        let text = format!(
            "{}{JSONL_SINK}",
            HEAD.replace("[\"public.orders\"]", "[\"public.orders\", \"a.b.c\", 7]")
        );
        assert_eq!(
            errors(&text),
            "tidemark.toml:7:28: \"tables\" in [source]: invalid table \"a.b.c\"; expected \"schema.table\", \"schema.*\" or \"table\" (in schema public)\n\
             tidemark.toml:7:37: \"tables\" in [source] must be a string, found an integer"
        );
    }

    #[test]
    fn invalid_slot_and_publication_names_are_rejected() {
        let text = format!("{HEAD}slot = \"Tidemark-Slot\"\npublication = \"1pub\"\n{JSONL_SINK}");
        assert_eq!(
            errors(&text),
            "tidemark.toml:8:8: \"slot\" in [source] must be 1 to 63 characters of a-z, 0-9 and _ (a replication slot name); found \"Tidemark-Slot\"\n\
             tidemark.toml:9:15: \"publication\" in [source] must be 1 to 63 characters of letters, digits and _, not starting with a digit (a PostgreSQL identifier); found \"1pub\""
        );
        let long = "a".repeat(60);
        let text = format!(
            "{}{JSONL_SINK}",
            HEAD.replace("\"shop\"", &format!("\"{long}\""))
        );
        assert_eq!(
            errors(&text),
            "tidemark.toml:4:1: the default slot name, \"tidemark_\" and agent.name, is 69 characters, longer than 63; set \"slot\" in [source]\n\
             tidemark.toml:4:1: the default publication name, \"tidemark_\" and agent.name, is 69 characters, longer than 63; set \"publication\" in [source]"
        );
    }
}
