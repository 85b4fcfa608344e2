//! The `[[sink]]` tables and their `[[sink.table]]` mappings: keys per sink type, defaults,
//! unique names, and mappings that name captured tables.

use std::path::Path;
use std::time::Duration;

use super::check::{shown_value, Checker, Spot, Table};
use super::document::{entry_at, kind, Key, Node, Val};
use super::values::{is_literal_name, is_sink_name};
use super::{
    ClickHouseMode, ClickHouseSinkConfig, ColumnNaming, DroppedColumns, JsonlSinkConfig,
    PostgresSinkConfig, SinkConfig, SinkKind, SinkMode, TableMapping, TablePattern,
};

const DEFAULT_BATCH_MAX_ROWS: usize = 10_000;
/// A sink never waits on an idle stream: it writes what has queued up while the previous
/// batch was being written, so batches grow with the load and add no latency.
const DEFAULT_BATCH_MAX_WAIT: Duration = Duration::ZERO;
const DEFAULT_MAX_FILE_BYTES: u64 = 128 * 1024 * 1024;

const SINK_COMMON_KEYS: &[&str] = &["name", "type", "batch_max_rows", "batch_max_wait"];
const JSONL_SINK_KEYS: &[&str] = &["path", "max_file_bytes"];
const POSTGRES_SINK_KEYS: &[&str] = &[
    "url",
    "schema",
    "mode",
    "soft_delete",
    "columns",
    "history_deletes",
    "dropped_columns",
    "table",
];
const CLICKHOUSE_SINK_KEYS: &[&str] = &[
    "url",
    "user",
    "password",
    "database",
    "mode",
    "columns",
    "history_deletes",
    "table",
];
/// ClickHouse's own user when the URL and the config name none.
const CLICKHOUSE_DEFAULT_USER: &str = "default";
const TABLE_MAPPING_KEYS: &[&str] = &["source", "target"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkType {
    Jsonl,
    Postgres,
    ClickHouse,
}

impl SinkType {
    fn name(self) -> &'static str {
        match self {
            SinkType::Jsonl => "jsonl",
            SinkType::Postgres => "postgres",
            SinkType::ClickHouse => "clickhouse",
        }
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            SinkType::Jsonl => JSONL_SINK_KEYS,
            SinkType::Postgres => POSTGRES_SINK_KEYS,
            SinkType::ClickHouse => CLICKHOUSE_SINK_KEYS,
        }
    }
}

const SINK_TYPES: &[(&str, SinkType)] = &[
    ("jsonl", SinkType::Jsonl),
    ("postgres", SinkType::Postgres),
    ("clickhouse", SinkType::ClickHouse),
];

impl Checker<'_> {
    /// The `[[sink]]` array; `patterns` are the source's tables (None when they are invalid).
    pub(super) fn sinks(
        &mut self,
        key: &Key,
        val: &Val,
        base: &Path,
        patterns: Option<&[TablePattern]>,
    ) -> Option<Vec<SinkConfig>> {
        let at = entry_at(key, val);
        let items = match &val.node {
            Node::Array(items) => items,
            Node::Table(_) => {
                self.report(
                    at,
                    "sink must be an array of tables: write [[sink]] (double brackets), not [sink]"
                        .to_owned(),
                );
                return None;
            }
            other => {
                self.report(
                    at,
                    format!(
                        "sink must be an array of [[sink]] tables, found {}",
                        kind(other)
                    ),
                );
                return None;
            }
        };
        if items.is_empty() {
            self.report(at, "no sinks configured; add a [[sink]] table".to_owned());
            return None;
        }
        let mut seen: Vec<(String, Option<usize>)> = Vec::new();
        let mut sinks = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.sink(i, key, item, base, patterns, &mut seen) {
                Some(sink) => sinks.push(sink),
                None => ok = false,
            }
        }
        ok.then_some(sinks)
    }

    /// `seen` holds the names (and places) of the sinks before this one.
    fn sink(
        &mut self,
        index: usize,
        key: &Key,
        val: &Val,
        base: &Path,
        patterns: Option<&[TablePattern]>,
        seen: &mut Vec<(String, Option<usize>)>,
    ) -> Option<SinkConfig> {
        // The label uses the sink's name when it has a usable one, else its position.
        let label = match &val.node {
            Node::Table(entries) => match entries.iter().find(|(k, _)| k.name == "name") {
                Some((
                    _,
                    Val {
                        node: Node::Str(t), ..
                    },
                )) if t.raw.is_none() && is_sink_name(&t.value) => {
                    format!("[[sink]] {:?}", t.value)
                }
                _ => format!("[[sink]] #{}", index + 1),
            },
            _ => format!("[[sink]] #{}", index + 1),
        };
        let t = self.table(label, key, val)?;

        let sink_type = self.field(&t, "type", |c, s, v| c.choice(s, v, SINK_TYPES));
        let sink_type = self.required_with(
            &t,
            "type",
            sink_type,
            "; expected one of \"jsonl\", \"postgres\", \"clickhouse\"",
        );
        match sink_type {
            Some(this) => {
                let mut allowed: Vec<&str> = SINK_COMMON_KEYS.to_vec();
                allowed.extend_from_slice(this.keys());
                let foreign: Vec<(&str, &str)> = SINK_TYPES
                    .iter()
                    .filter(|(_, other)| *other != this)
                    .flat_map(|(name, other)| other.keys().iter().map(move |k| (*k, *name)))
                    .filter(|(k, _)| !allowed.contains(k))
                    .collect();
                self.check_keys(&t, &allowed, &foreign, this.name());
            }
            None => {
                // Unknown type: keys of any sink type may be right.
                let mut allowed: Vec<&str> = SINK_COMMON_KEYS.to_vec();
                for (_, ty) in SINK_TYPES {
                    allowed.extend_from_slice(ty.keys());
                }
                self.check_keys(&t, &allowed, &[], "");
            }
        }

        let name = self.field(&t, "name", |c, s, v| {
            c.name(
                s,
                v,
                is_sink_name,
                "letters, digits, _ and - ([A-Za-z0-9_-]+)",
            )
        });
        let name = self.required(&t, "name", name);
        if let Some(name) = &name {
            let at = t.at_key("name");
            match seen.iter().find(|(n, _)| n == name) {
                Some((_, first)) => {
                    let first = match first {
                        Some(first) => {
                            format!(" (first used on line {})", self.location(*first).line)
                        }
                        None => String::new(),
                    };
                    self.report(
                        at,
                        format!(
                            "duplicate sink name {}{first}; sink names must be unique",
                            shown_value(&t, "name", name)
                        ),
                    );
                }
                None => seen.push((name.clone(), at)),
            }
        }
        let batch_max_rows = self
            .field(&t, "batch_max_rows", Self::positive_count)
            .or(DEFAULT_BATCH_MAX_ROWS);
        let batch_max_wait = self
            .field(&t, "batch_max_wait", |c, s, v| c.duration(s, v, true))
            .or(DEFAULT_BATCH_MAX_WAIT);

        let kind = match sink_type? {
            SinkType::Jsonl => self.jsonl_sink(&t, base).map(SinkKind::Jsonl),
            SinkType::Postgres => self.postgres_sink(&t, patterns).map(SinkKind::Postgres),
            SinkType::ClickHouse => self.clickhouse_sink(&t, patterns).map(SinkKind::ClickHouse),
        };
        Some(SinkConfig {
            name: name?,
            batch_max_rows: batch_max_rows?,
            batch_max_wait: batch_max_wait?,
            kind: kind?,
        })
    }

    fn jsonl_sink(&mut self, t: &Table<'_>, base: &Path) -> Option<JsonlSinkConfig> {
        let path = self.field(t, "path", |c, s, v| c.path(s, v, base));
        let path = self.required_with(t, "path", path, "; set it to the directory to write to");
        let max_file_bytes = self
            .field(t, "max_file_bytes", Self::size)
            .or(DEFAULT_MAX_FILE_BYTES);
        Some(JsonlSinkConfig {
            path: path?,
            max_file_bytes: max_file_bytes?,
        })
    }

    fn postgres_sink(
        &mut self,
        t: &Table<'_>,
        patterns: Option<&[TablePattern]>,
    ) -> Option<PostgresSinkConfig> {
        let url = self.field(t, "url", Self::url);
        let url = self.required(t, "url", url);
        let schema = self.field(t, "schema", |c, s, v| {
            c.name(s, v, is_literal_name, "a name of 1 to 63 bytes")
        });
        let schema = self.required(t, "schema", schema);
        let mode = self
            .field(t, "mode", |c, s, v| {
                c.choice(
                    s,
                    v,
                    &[
                        ("merge", SinkMode::Merge),
                        ("scd2", SinkMode::Scd2),
                        ("append", SinkMode::Append),
                    ],
                )
            })
            .or(SinkMode::Merge);
        let soft_delete = self.field(t, "soft_delete", Self::bool).or(false);
        let columns = self.column_naming(t);
        let history_deletes = self.field(t, "history_deletes", Self::bool).or(false);
        let dropped_columns = self
            .field(t, "dropped_columns", |c, s, v| {
                c.choice(
                    s,
                    v,
                    &[
                        ("keep", DroppedColumns::Keep),
                        ("drop", DroppedColumns::Drop),
                    ],
                )
            })
            .or(DroppedColumns::Keep);
        let tables = match t.get("table") {
            None => Some(Vec::new()),
            Some((key, val)) => self.table_mappings(t, key, val, schema.as_deref(), patterns),
        };
        Some(PostgresSinkConfig {
            url: url?,
            schema: schema?,
            mode: mode?,
            soft_delete: soft_delete?,
            columns: columns?,
            history_deletes: history_deletes?,
            dropped_columns: dropped_columns?,
            tables: tables?,
        })
    }

    fn clickhouse_sink(
        &mut self,
        t: &Table<'_>,
        patterns: Option<&[TablePattern]>,
    ) -> Option<ClickHouseSinkConfig> {
        let url = self.field(t, "url", Self::http_url);
        let url = self.required_with(
            t,
            "url",
            url,
            "; set it to the server's HTTP interface, e.g. \"http://default:PASSWORD@127.0.0.1:8123\"",
        );
        let user = self
            .field(t, "user", |c, s, v| c.text(s, v).map(|t| t.value))
            .optional();
        let password = self
            .field(t, "password", |c, s, v| c.text(s, v).map(|t| t.value))
            .optional();
        if let (Some(url), Some(key)) = (
            &url,
            ["user", "password"].iter().find(|k| t.get(k).is_some()),
        ) {
            let in_url = if *key == "user" {
                url.user.is_some()
            } else {
                url.password.is_some()
            };
            if in_url {
                self.report(
                    t.at_key(key),
                    format!(
                        "{} gives the {key} twice, in \"url\" and in \"{key}\"; keep one",
                        t.label
                    ),
                );
            }
        }
        let database = self.field(t, "database", |c, s, v| {
            c.name(s, v, is_literal_name, "a name of 1 to 63 bytes")
        });
        let database = self.required(t, "database", database);
        let mode = self
            .field(t, "mode", |c, s, v| {
                c.choice(
                    s,
                    v,
                    &[
                        ("merge", ClickHouseMode::Merge),
                        ("scd2", ClickHouseMode::Scd2),
                        ("changelog", ClickHouseMode::Changelog),
                    ],
                )
            })
            .or(ClickHouseMode::Merge);
        let columns = self.column_naming(t);
        let history_deletes = self.field(t, "history_deletes", Self::bool).or(false);
        let tables = match t.get("table") {
            None => Some(Vec::new()),
            Some((key, val)) => self.table_mappings(t, key, val, database.as_deref(), patterns),
        };
        let url = url?;
        let user = user?
            .or_else(|| url.user.clone())
            .unwrap_or_else(|| CLICKHOUSE_DEFAULT_USER.to_owned());
        let password = password?.or_else(|| url.password.clone());
        Some(ClickHouseSinkConfig {
            url,
            user,
            password,
            database: database?,
            mode: mode?,
            history_deletes: history_deletes?,
            columns: columns?,
            tables: tables?,
        })
    }

    /// `columns`: the names of the SCD2 bookkeeping columns.
    fn column_naming(&mut self, t: &Table<'_>) -> Option<ColumnNaming> {
        self.field(t, "columns", |c, s, v| {
            c.choice(
                s,
                v,
                &[
                    ("tidemark", ColumnNaming::Tidemark),
                    ("dbt", ColumnNaming::Dbt),
                ],
            )
        })
        .or(ColumnNaming::Tidemark)
    }

    fn table_mappings(
        &mut self,
        sink: &Table<'_>,
        key: &Key,
        val: &Val,
        sink_schema: Option<&str>,
        patterns: Option<&[TablePattern]>,
    ) -> Option<Vec<TableMapping>> {
        let Node::Array(items) = &val.node else {
            self.report(
                entry_at(key, val),
                format!(
                    "\"table\" in {} must be an array of [[sink.table]] tables, found {}",
                    sink.label,
                    kind(&val.node)
                ),
            );
            return None;
        };
        let mut mappings = Vec::with_capacity(items.len());
        let mut seen: Vec<String> = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let label = format!("[[sink.table]] #{} of {}", i + 1, sink.label);
            let Some(t) = self.table(label, key, item) else {
                ok = false;
                continue;
            };
            self.check_keys(&t, TABLE_MAPPING_KEYS, &[], "");
            let source = self.field(&t, "source", |c, s, v| {
                c.qualified_table(s, v, Some("public"))
            });
            let source = self.required(&t, "source", source);
            let target = self.field(&t, "target", |c, s, v| c.qualified_table(s, v, sink_schema));
            let target = self.required(&t, "target", target);
            let source_at = t.at_key("source");
            if let (Some(source), Some(patterns)) = (&source, patterns) {
                let captured = source
                    .split_once('.')
                    .is_some_and(|(s, tb)| patterns.iter().any(|p| p.matches(s, tb)));
                if !captured {
                    self.report(
                        source_at,
                        format!(
                            "\"source\" in {}: table {} is not captured by source.tables",
                            t.label,
                            shown_value(&t, "source", source)
                        ),
                    );
                    ok = false;
                }
            }
            if let Some(source) = &source {
                if seen.contains(source) {
                    self.report(
                        source_at,
                        format!(
                            "\"source\" in {}: table {} is mapped twice in {}",
                            t.label,
                            shown_value(&t, "source", source),
                            sink.label
                        ),
                    );
                    ok = false;
                } else {
                    seen.push(source.clone());
                }
            }
            match (source, target) {
                (Some(source), Some(target)) => mappings.push(TableMapping { source, target }),
                _ => ok = false,
            }
        }
        ok.then_some(mappings)
    }

    /// `"schema.table"`, or `"table"` in `default_schema` (None: the default is unknown because
    /// it is invalid, which is reported already).
    fn qualified_table(
        &mut self,
        spot: &Spot,
        val: &Val,
        default_schema: Option<&str>,
    ) -> Option<String> {
        let text = self.text(spot, val)?;
        let (schema, table) = match text.value.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (default_schema, text.value.as_str()),
        };
        let valid = |s: &str| !s.is_empty() && !s.contains('.') && s != "*";
        if !valid(table) || schema.is_some_and(|s| !valid(s)) {
            self.report(
                spot.at,
                format!(
                    "{} must be a table name, \"schema.table\" or \"table\"; found {}",
                    spot.what,
                    text.shown()
                ),
            );
            return None;
        }
        Some(format!("{}.{table}", schema?))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{errors, HEAD};

    #[test]
    fn key_of_another_sink_type_is_not_valid_for_this_type() {
        let text = format!(
            "{HEAD}
[[sink]]
name = \"mirror\"
type = \"postgres\"
url = \"postgres://loader@127.0.0.1:5432/warehouse\"
schema = \"replica\"
path = \"./events\"

[[sink]]
name = \"events\"
type = \"jsonl\"
path = \"./events\"
mode = \"merge\"
"
        );
        assert_eq!(
            errors(&text),
            "tidemark.toml:14:1: key \"path\" in [[sink]] \"mirror\" is not valid for type = \"postgres\"; it only applies to type = \"jsonl\"\n\
             tidemark.toml:20:1: key \"mode\" in [[sink]] \"events\" is not valid for type = \"jsonl\"; it only applies to type = \"postgres\""
        );
    }

    #[test]
    fn duplicate_sink_names_are_reported_at_the_second() {
        let text = format!(
            "{HEAD}[[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"a\"\n\
             [[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"b\"\n"
        );
        assert_eq!(
            errors(&text),
            r#"tidemark.toml:13:8: duplicate sink name "events" (first used on line 9); sink names must be unique"#
        );
    }

    #[test]
    fn table_mappings_must_name_captured_tables_once() {
        let text = format!(
            "{HEAD}[[sink]]\nname = \"m\"\ntype = \"postgres\"\nurl = \"postgres://l@h/w\"\nschema = \"r\"\n\
             [[sink.table]]\nsource = \"public.orders\"\ntarget = \"x.orders\"\n\
             [[sink.table]]\nsource = \"orders\"\ntarget = \"y.orders\"\n\
             [[sink.table]]\nsource = \"public.refunds\"\ntarget = \"y.refunds\"\n"
        );
        assert_eq!(
            errors(&text),
            "tidemark.toml:17:10: \"source\" in [[sink.table]] #2 of [[sink]] \"m\": table \"public.orders\" is mapped twice in [[sink]] \"m\"\n\
             tidemark.toml:20:10: \"source\" in [[sink.table]] #3 of [[sink]] \"m\": table \"public.refunds\" is not captured by source.tables"
        );
    }

    #[test]
    fn a_clickhouse_sink_takes_its_credentials_from_the_url_or_its_keys_not_both() {
        let sink = |extra: &str, url: &str| {
            format!(
                "{HEAD}[[sink]]\nname = \"ch\"\ntype = \"clickhouse\"\nurl = \"{url}\"\n\
                 database = \"shop\"\n{extra}"
            )
        };
        let config = crate::config::testing::parse(&sink("", "http://loader:pw@ch:8123")).unwrap();
        let crate::config::SinkKind::ClickHouse(ch) = &config.sinks[0].kind else {
            panic!("not a clickhouse sink: {:?}", config.sinks[0].kind);
        };
        assert_eq!(
            (ch.user.as_str(), ch.password.as_deref(), ch.url.to_string()),
            ("loader", Some("pw"), "http://ch:8123".to_string())
        );
        assert_eq!(ch.mode, crate::config::ClickHouseMode::Merge);
        assert_eq!(
            errors(&sink("password = \"other\"\n", "http://loader:pw@ch:8123")),
            "tidemark.toml:13:12: [[sink]] \"ch\" gives the password twice, in \"url\" and in \"password\"; keep one"
        );
        assert_eq!(
            errors(&sink("schema = \"s\"\n", "http://ch:8123")),
            "tidemark.toml:13:1: key \"schema\" in [[sink]] \"ch\" is not valid for type = \"clickhouse\"; it only applies to type = \"postgres\""
        );
    }
}
