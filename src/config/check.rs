//! The validation pass's machinery: [`Checker`] collects every problem instead of stopping at
//! the first, and reads tables, keys and plain values out of the tree. What each table holds
//! is in `schema` and `sink`; the other value kinds are in `values` and `url`.

use std::path::Path;

use super::document::{self, entry_at, kind, Key, Node, Text, Val};
use super::suggest::suggest;
use super::{ConfigError, Location, Problem};

/// Collects problems as (byte offset, message).
pub(super) struct Checker<'t> {
    text: &'t str,
    problems: Vec<(Option<usize>, String)>,
}

/// A table being validated: `label` names it in messages (`[source]`, `[[sink]] "mirror"`),
/// `at` is where it starts (for "missing key").
pub(super) struct Table<'v> {
    pub(super) label: String,
    pub(super) at: Option<usize>,
    pub(super) entries: &'v [(Key, Val)],
}

impl<'v> Table<'v> {
    pub(super) fn get(&self, key: &str) -> Option<&'v (Key, Val)> {
        self.entries.iter().find(|(k, _)| k.name == key)
    }

    /// Where a problem with the value of `key` points.
    pub(super) fn at_key(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(|(k, v)| entry_at(k, v))
    }
}

/// The value being checked: `what` starts its messages (`"snapshot" in [source]`).
pub(super) struct Spot {
    pub(super) what: String,
    pub(super) at: Option<usize>,
}

/// The outcome of looking up an optional key.
pub(super) enum Got<T> {
    Absent,
    /// Present but invalid; already reported.
    Bad,
    Ok(T),
}

impl<T> Got<T> {
    pub(super) fn or(self, default: T) -> Option<T> {
        self.or_else_with(|| default)
    }

    /// `Some(None)` when absent, `None` when invalid.
    pub(super) fn optional(self) -> Option<Option<T>> {
        match self {
            Got::Absent => Some(None),
            Got::Bad => None,
            Got::Ok(v) => Some(Some(v)),
        }
    }

    pub(super) fn or_else_with(self, default: impl FnOnce() -> T) -> Option<T> {
        match self {
            Got::Absent => Some(default()),
            Got::Bad => None,
            Got::Ok(v) => Some(v),
        }
    }
}

impl<'t> Checker<'t> {
    pub(super) fn new(text: &'t str) -> Checker<'t> {
        Checker {
            text,
            problems: Vec::new(),
        }
    }

    pub(super) fn report(&mut self, at: Option<usize>, message: String) {
        self.problems.push((at, message));
    }

    pub(super) fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    pub(super) fn location(&self, offset: usize) -> Location {
        document::location(self.text, offset)
    }

    pub(super) fn into_error(mut self, path: &Path) -> ConfigError {
        // File order; problems without a place last, in the order found.
        self.problems
            .sort_by_key(|(at, _)| (at.is_none(), at.unwrap_or(0)));
        let problems = self
            .problems
            .iter()
            .map(|(at, message)| Problem {
                file: path.to_path_buf(),
                location: at.map(|at| self.location(at)),
                message: message.clone(),
            })
            .collect();
        ConfigError::Invalid { problems }
    }

    pub(super) fn table<'v>(
        &mut self,
        label: String,
        key: &Key,
        val: &'v Val,
    ) -> Option<Table<'v>> {
        let at = entry_at(key, val);
        match &val.node {
            Node::Table(entries) => Some(Table { label, at, entries }),
            other => {
                self.report(
                    at,
                    format!("{label} must be a table, found {}", kind(other)),
                );
                None
            }
        }
    }

    /// Reports keys that are not in `allowed`; keys in `foreign` belong to another type of
    /// the same table (`this_type` names the table's own).
    pub(super) fn check_keys(
        &mut self,
        table: &Table<'_>,
        allowed: &[&str],
        foreign: &[(&str, &str)],
        this_type: &str,
    ) {
        for (key, _) in table.entries {
            let name = key.name.as_str();
            if allowed.contains(&name) {
                continue;
            }
            let at = document::start(&key.span);
            if let Some((_, owner)) = foreign.iter().find(|(k, _)| *k == name) {
                self.report(
                    at,
                    format!(
                        "key {name:?} in {} is not valid for type = {this_type:?}; it only applies to type = {owner:?}",
                        table.label
                    ),
                );
                continue;
            }
            let hint = match suggest(name, allowed) {
                Some(near) => format!("; did you mean {near:?}?"),
                None => format!("; valid keys are {}", quoted_list(allowed)),
            };
            self.report(at, format!("unknown key {name:?} in {}{hint}", table.label));
        }
    }

    /// Looks up `key` and checks its value with `parse`.
    pub(super) fn field<T>(
        &mut self,
        table: &Table<'_>,
        key: &str,
        parse: impl FnOnce(&mut Self, &Spot, &Val) -> Option<T>,
    ) -> Got<T> {
        match table.get(key) {
            None => Got::Absent,
            Some((k, v)) => {
                let spot = Spot {
                    what: format!("{key:?} in {}", table.label),
                    at: entry_at(k, v),
                };
                match parse(self, &spot, v) {
                    Some(value) => Got::Ok(value),
                    None => Got::Bad,
                }
            }
        }
    }

    pub(super) fn required<T>(&mut self, table: &Table<'_>, key: &str, got: Got<T>) -> Option<T> {
        self.required_with(table, key, got, "")
    }

    /// Same, `hint` ending the message when `key` is missing.
    pub(super) fn required_with<T>(
        &mut self,
        table: &Table<'_>,
        key: &str,
        got: Got<T>,
        hint: &str,
    ) -> Option<T> {
        match got {
            Got::Absent => {
                self.report(
                    table.at,
                    format!("missing required key {key:?} in {}{hint}", table.label),
                );
                None
            }
            Got::Bad => None,
            Got::Ok(value) => Some(value),
        }
    }

    pub(super) fn wrong_type(&mut self, spot: &Spot, expected: &str, found: &Node) {
        self.report(
            spot.at,
            format!("{} must be {expected}, found {}", spot.what, kind(found)),
        );
    }

    pub(super) fn text(&mut self, spot: &Spot, val: &Val) -> Option<Text> {
        match &val.node {
            Node::Str(text) if text.unresolved => None,
            Node::Str(text) => Some(text.clone()),
            other => {
                self.wrong_type(spot, "a string", other);
                None
            }
        }
    }

    /// A URL checked by `check` (the URL, and how messages show it: without its password),
    /// whose reason is reported as the key's problem.
    pub(super) fn checked_url<T>(
        &mut self,
        spot: &Spot,
        val: &Val,
        check: impl FnOnce(&str, &str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.text(spot, val)?;
        let shown = super::url::redact_url(text.raw.as_deref().unwrap_or(&text.value));
        match check(&text.value, &shown) {
            Ok(url) => Some(url),
            Err(message) => {
                self.report(spot.at, format!("{}: {message}", spot.what));
                None
            }
        }
    }

    pub(super) fn bool(&mut self, spot: &Spot, val: &Val) -> Option<bool> {
        match &val.node {
            Node::Bool(b) => Some(*b),
            other => {
                self.wrong_type(spot, "true or false", other);
                None
            }
        }
    }

    /// One of the strings of `options`.
    pub(super) fn choice<T: Copy>(
        &mut self,
        spot: &Spot,
        val: &Val,
        options: &[(&str, T)],
    ) -> Option<T> {
        let text = self.text(spot, val)?;
        if let Some((_, v)) = options.iter().find(|(name, _)| *name == text.value) {
            return Some(*v);
        }
        let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        self.report(
            spot.at,
            format!(
                "{} must be one of {}; found {}",
                spot.what,
                quoted_list(&names),
                text.shown()
            ),
        );
        None
    }
}

/// How a message shows the value of `key` in `table`, `plain` being its checked form: as
/// written in the file when it came from the environment.
pub(super) fn shown_value(table: &Table<'_>, key: &str, plain: &str) -> String {
    match table.get(key) {
        Some((
            _,
            Val {
                node: Node::Str(text),
                ..
            },
        )) if text.raw.is_some() => text.shown(),
        _ => format!("{plain:?}"),
    }
}

fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{errors, HEAD};

    #[test]
    fn every_problem_is_reported_in_one_pass() {
        let text = r#"[agent]
name = "my shop"
health_addr = "localhost:8686"

[source]
type = "postgres"
url = "postgres://replicator@127.0.0.1:5432"
tables = []
snapshot = "${MODE}"
status_interval = 10

[[sink]]
type = "jsonl"
batch_max_rows = 0

[[sink]]
name = "mirror"
type = "postgres"
schema = "replica"
soft_delete = "yes"
[[sink.table]]
source = "public.customers"
"#;
        assert_eq!(
            errors(text),
            [
                r#"tidemark.toml:2:8: "name" in [agent] must be letters, digits and _ ([A-Za-z0-9_]+); found "my shop""#,
                r#"tidemark.toml:3:15: "health_addr" in [agent] must be an IP address and port such as "127.0.0.1:8686" (host names are not resolved); found "localhost:8686""#,
                r#"tidemark.toml:7:7: "url" in [source]: connection URL "postgres://replicator@127.0.0.1:5432" names no database; add it as the path: postgres://USER:PASSWORD@HOST:PORT/DBNAME"#,
                r#"tidemark.toml:8:10: "tables" in [source] must list at least one table, e.g. ["public.orders"]"#,
                r#"tidemark.toml:9:12: "snapshot" in [source] must be one of "initial", "never"; found "${MODE}" (expanded value not shown)"#,
                r#"tidemark.toml:10:19: "status_interval" in [source] is a bare number (10); add a unit: write e.g. "10s" or "10ms" (units ms, s, m, h)"#,
                r#"tidemark.toml:12:1: missing required key "name" in [[sink]] #1"#,
                r#"tidemark.toml:12:1: missing required key "path" in [[sink]] #1; set it to the directory to write to"#,
                r#"tidemark.toml:14:18: "batch_max_rows" in [[sink]] #1 must be at least 1, found 0"#,
                r#"tidemark.toml:16:1: missing required key "url" in [[sink]] "mirror""#,
                r#"tidemark.toml:20:15: "soft_delete" in [[sink]] "mirror" must be true or false, found a string"#,
                r#"tidemark.toml:21:1: missing required key "target" in [[sink.table]] #1 of [[sink]] "mirror""#,
            ]
            .join("\n")
        );
    }

    #[test]
    fn bad_enum_values_list_the_valid_ones() {
        let text = format!(
            "{}[[sink]]\nname = \"m\"\ntype = \"kafka\"\n\
             [[sink]]\nname = \"n\"\ntype = \"postgres\"\nurl = \"postgres://l@h/w\"\nschema = \"r\"\nmode = \"upsert\"\ncolumns = \"DBT\"\n",
            HEAD.replace("tables =", "snapshot = \"full\"\ntables =")
        );
        assert_eq!(
            errors(&text),
            [
                r#"tidemark.toml:7:12: "snapshot" in [source] must be one of "initial", "never"; found "full""#,
                r#"tidemark.toml:11:8: "type" in [[sink]] "m" must be one of "jsonl", "postgres", "clickhouse"; found "kafka""#,
                r#"tidemark.toml:17:8: "mode" in [[sink]] "n" must be one of "merge", "scd2", "append"; found "upsert""#,
                r#"tidemark.toml:18:11: "columns" in [[sink]] "n" must be one of "tidemark", "dbt"; found "DBT""#,
            ]
            .join("\n")
        );
    }
}
