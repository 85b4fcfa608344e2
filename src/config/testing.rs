//! Fixtures shared by the config module's tests.

use std::path::Path;

use super::{Config, ConfigError, ConnectionUrl};

/// The file name every message starts with.
pub(super) const FILE: &str = "tidemark.toml";
/// The value of `${PW}`: quotes and backslashes must survive substitution, and no message
/// may contain it.
pub(super) const SECRET: &str = "pa\"ss\\w0rd";

/// A valid `[agent]` and `[source]`, eight lines; a test appends keys of `[source]` or sinks.
pub(super) const HEAD: &str = r#"[agent]
name = "shop"

[source]
type = "postgres"
url = "postgres://replicator@127.0.0.1:5432/shop"
tables = ["public.orders"]
"#;

/// A valid sink, for tests whose subject is elsewhere.
pub(super) const JSONL_SINK: &str = "[[sink]]\nname = \"e\"\ntype = \"jsonl\"\npath = \"e\"\n";

pub(super) fn fake_env(name: &str) -> Option<String> {
    match name {
        "PW" => Some(SECRET.to_owned()),
        "SCHEMA" => Some("we\"ird\\name".to_owned()),
        "MODE" => Some("turbo".to_owned()),
        _ => None,
    }
}

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(FILE), &fake_env)
}

/// The error text for an invalid file.
pub(super) fn errors(text: &str) -> String {
    match parse(text) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(e) => e.to_string(),
    }
}

#[allow(clippy::unwrap_used)]
pub(super) fn url(s: &str) -> ConnectionUrl {
    s.parse().unwrap()
}
