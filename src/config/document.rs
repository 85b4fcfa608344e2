//! The TOML text as a tree that keeps the byte span of every key and value, and the mapping
//! from a byte offset to the line and column a message shows.
//!
//! `toml::Spanned<T>` alone cannot represent a document: implicit tables (`[a.b]` without
//! `[a]`, dotted keys) have no span and make it fail. So the tree asks for spans through the
//! same serde protocol `toml::Spanned` uses (a struct with these reserved names, which toml's
//! deserializer answers with the span) and accepts a plain value when the deserializer has no
//! span to give.

use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::Location;

const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];
/// The one key of the map toml presents a datetime as.
const DATETIME_FIELD: &str = "$__toml_private_datetime";

pub(super) type Span = Range<usize>;

#[derive(Debug, Clone)]
pub(super) struct Key {
    pub(super) name: String,
    pub(super) span: Option<Span>,
}

#[derive(Debug, Clone)]
pub(super) struct Val {
    pub(super) span: Option<Span>,
    pub(super) node: Node,
}

#[derive(Debug, Clone)]
pub(super) enum Node {
    Str(Text),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime,
    Array(Vec<Val>),
    Table(Vec<(Key, Val)>),
}

#[derive(Debug, Clone)]
pub(super) struct Text {
    /// After substitution.
    pub(super) value: String,
    /// The text as written in the file, when `${NAME}` references were substituted: messages
    /// show this, never `value`.
    pub(super) raw: Option<String>,
    /// A reference could not be substituted (already reported): no further checks.
    pub(super) unresolved: bool,
}

impl Text {
    fn plain(value: &str) -> Text {
        Text {
            value: value.to_owned(),
            raw: None,
            unresolved: false,
        }
    }

    /// The value for a message: as written when it came from the environment.
    pub(super) fn shown(&self) -> String {
        match &self.raw {
            None => format!("{:?}", self.value),
            Some(raw) => format!("{raw:?} (expanded value not shown)"),
        }
    }
}

/// Parses the file; a syntax error is one problem, as (byte offset, message).
pub(super) fn parse(text: &str) -> Result<Val, (Option<usize>, String)> {
    toml::from_str::<Val>(text).map_err(|e| {
        let message = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        (e.span().map(|s| s.start), message)
    })
}

/// The line and column (in characters) of byte `offset` of `text`.
pub(super) fn location(text: &str, offset: usize) -> Location {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

/// How a message names a node's type.
pub(super) fn kind(node: &Node) -> &'static str {
    match node {
        Node::Str(_) => "a string",
        Node::Int(_) => "an integer",
        Node::Float(_) => "a float",
        Node::Bool(_) => "a boolean",
        Node::Datetime => "a datetime",
        Node::Array(_) => "an array",
        Node::Table(_) => "a table",
    }
}

pub(super) fn start(span: &Option<Span>) -> Option<usize> {
    span.as_ref().map(|s| s.start)
}

/// Where a problem with an entry points: its value, else its key (implicit tables have no
/// span).
pub(super) fn entry_at(key: &Key, val: &Val) -> Option<usize> {
    start(&val.span).or(start(&key.span))
}

fn malformed<E: de::Error>() -> E {
    E::custom("malformed spanned value from the TOML parser")
}

/// Reads the rest of a spanned triple after its start key.
fn spanned_rest<'de, A, T>(map: &mut A) -> Result<(Span, T), A::Error>
where
    A: MapAccess<'de>,
    T: Deserialize<'de>,
{
    let start: usize = map.next_value()?;
    if map.next_key::<String>()?.as_deref() != Some(SPANNED_END) {
        return Err(malformed());
    }
    let end: usize = map.next_value()?;
    if map.next_key::<String>()?.as_deref() != Some(SPANNED_VALUE) {
        return Err(malformed());
    }
    let value: T = map.next_value()?;
    Ok((start..end, value))
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key {
                    name: v.to_owned(),
                    span: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Key, A::Error> {
                if map.next_key::<String>()?.as_deref() != Some(SPANNED_START) {
                    return Err(malformed());
                }
                let (span, name) = spanned_rest::<A, String>(&mut map)?;
                Ok(Key {
                    name,
                    span: Some(span),
                })
            }
        }
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, KeyVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(Text::plain(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Val>()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        table_rest(None, &mut map)
    }
}

/// A table (or toml's datetime pseudo-table), `first` being its first key when already read.
fn table_rest<'de, A: MapAccess<'de>>(first: Option<Key>, map: &mut A) -> Result<Node, A::Error> {
    let mut next = match first {
        Some(key) => Some(key),
        None => map.next_key::<Key>()?,
    };
    if let Some(key) = &next {
        if key.span.is_none() && key.name == DATETIME_FIELD {
            let _: String = map.next_value()?;
            return Ok(Node::Datetime);
        }
    }
    let mut entries = Vec::new();
    while let Some(key) = next {
        let value: Val = map.next_value()?;
        entries.push((key, value));
        next = map.next_key()?;
    }
    Ok(Node::Table(entries))
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

impl<'de> Deserialize<'de> for Val {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ValVisitor;
        impl ValVisitor {
            fn unspanned<E>(node: Result<Node, E>) -> Result<Val, E> {
                node.map(|node| Val { span: None, node })
            }
        }
        impl<'de> Visitor<'de> for ValVisitor {
            type Value = Val;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a TOML value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Val, E> {
                Self::unspanned(NodeVisitor.visit_str(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Val, E> {
                Self::unspanned(NodeVisitor.visit_i64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Val, E> {
                Self::unspanned(NodeVisitor.visit_f64(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Val, E> {
                Self::unspanned(NodeVisitor.visit_bool(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Val, A::Error> {
                Self::unspanned(NodeVisitor.visit_seq(seq))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Val, A::Error> {
                match map.next_key::<Key>()? {
                    Some(key) if key.span.is_none() && key.name == SPANNED_START => {
                        let (span, node) = spanned_rest::<A, Node>(&mut map)?;
                        Ok(Val {
                            span: Some(span),
                            node,
                        })
                    }
                    first => Self::unspanned(table_rest(first, &mut map)),
                }
            }
        }
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, ValVisitor)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{errors, HEAD, JSONL_SINK};

    #[test]
    fn toml_syntax_error_is_one_problem_with_its_location() {
        let text = "[agent]\nname = \"shop\n[source]\n";
        assert_eq!(errors(text), "tidemark.toml:2:13: invalid basic string");
        let text = "[agent]\nname = \"a\"\nname = \"b\"\n";
        assert_eq!(
            errors(text),
            "tidemark.toml:3:1: duplicate key `name` in table `agent`"
        );
    }

    #[test]
    fn implicit_tables_and_datetimes_are_reported_not_fatal() {
        let text =
            format!("{HEAD}connect_timeout = 00:00:30\n[agent.extra.deep]\nx = 1\n{JSONL_SINK}");
        assert_eq!(
            errors(&text),
            "tidemark.toml:8:19: \"connect_timeout\" in [source] must be a string, found a datetime\n\
             tidemark.toml:9:8: unknown key \"extra\" in [agent]; valid keys are \"name\", \"data_dir\", \"health_addr\", \"ready_max_lag\", \"log_max_bytes\""
        );
    }
}
