//! PostgreSQL connection strings: checked to name a host and a database, and never shown with
//! their password. libpq's TLS parameters (`sslmode`, `sslrootcert`) are taken out by
//! `super::ssl` before tokio-postgres parses the string, and travel beside the parsed config
//! as [`TlsSettings`] for `crate::tls`, which owns what they mean.

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use super::check::{Checker, Spot};
use super::document::Val;
use super::ssl::{take_tls_params, TlsSettings};

const URL_SHAPE: &str = "postgres://USER:PASSWORD@HOST:PORT/DBNAME";

/// A PostgreSQL connection string (URL or `key=value` form) that may hold a password. Debug
/// and Display show it with the password replaced by `***`; only [`ConnectionUrl::expose`]
/// and [`ConnectionUrl::pg_config`] give the secret away.
#[derive(Clone, PartialEq, Eq)]
// The parsed form is boxed: it is large, and a `ConnectionUrl` sits in enum variants.
pub struct ConnectionUrl(String, Box<PgConfig>);

impl ConnectionUrl {
    /// The connection string as configured, password included.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The connection string with the password replaced by `***`, for messages.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// The parsed connection parameters (validated to name a host and a database), with the
    /// TLS settings tokio-postgres does not hold.
    pub fn pg_config(&self) -> PgConfig {
        (*self.1).clone()
    }

    /// The `sslmode` and `sslrootcert` of the connection string.
    pub fn tls(&self) -> &TlsSettings {
        &self.1.tls
    }
}

impl fmt::Debug for ConnectionUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnectionUrl")
            .field(&self.redacted())
            .finish()
    }
}

impl fmt::Display for ConnectionUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl FromStr for ConnectionUrl {
    type Err = InvalidUrl;

    /// Parses and checks a connection string the way the config file does (it must name a
    /// host and a database).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check_url(s, &redact_url(s), true)
    }
}

/// A parsed connection string: the tokio-postgres config (which it derefs to), the TLS
/// settings tokio-postgres cannot hold, and the string redacted for messages. Connections go
/// through `crate::tls`, which reads all three; the tokio-postgres config's own `ssl_mode` is
/// the nearest of its three modes, so a connection made around `crate::tls` with `NoTls` fails
/// instead of going unencrypted when TLS is required.
#[derive(Clone, PartialEq, Eq)]
pub struct PgConfig {
    config: tokio_postgres::Config,
    tls: TlsSettings,
    redacted: String,
}

impl PgConfig {
    /// The connection parameters tokio-postgres understands.
    pub fn tokio_config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// `sslmode` and `sslrootcert`.
    pub fn tls(&self) -> &TlsSettings {
        &self.tls
    }

    /// The connection string with the password replaced by `***`, for messages.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

impl Deref for PgConfig {
    type Target = tokio_postgres::Config;

    fn deref(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &self.redacted)
            .field("tls", &self.tls)
            .finish()
    }
}

/// A connection string that cannot be used; the message shows it redacted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidUrl(String);

impl Checker<'_> {
    pub(super) fn url(&mut self, spot: &Spot, val: &Val) -> Option<ConnectionUrl> {
        let text = self.text(spot, val)?;
        let shown = redact_url(text.raw.as_deref().unwrap_or(&text.value));
        match check_url(&text.value, &shown, text.raw.is_none()) {
            Ok(url) => Some(url),
            Err(InvalidUrl(message)) => {
                self.report(spot.at, format!("{}: {message}", spot.what));
                None
            }
        }
    }
}

/// Parses and checks a connection string; `shown` is how messages print it (redacted, and as
/// written in the file when it came from the environment). `detail` allows the parser's reason,
/// which can quote parts of the string, so it is left out for substituted values.
fn check_url(url: &str, shown: &str, detail: bool) -> Result<ConnectionUrl, InvalidUrl> {
    let (stripped, tls) = take_tls_params(url);
    let mut config = match stripped.parse::<tokio_postgres::Config>() {
        Ok(config) => config,
        Err(e) => {
            let reason = std::error::Error::source(&e)
                .map(|cause| cause.to_string())
                .filter(|_| detail)
                .map(|cause| {
                    // "unexpected character ... but got `x`" could show a character of a
                    // password.
                    let cause = cause
                        .split(" but got")
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    format!(" ({cause})")
                })
                .unwrap_or_default();
            return Err(InvalidUrl(format!(
                "cannot parse connection URL {shown:?}{reason}; expected {URL_SHAPE}"
            )));
        }
    };
    if config.get_hosts().is_empty() {
        return Err(InvalidUrl(format!(
            "connection URL {shown:?} names no host; expected {URL_SHAPE}"
        )));
    }
    if config.get_dbname().is_none() {
        return Err(InvalidUrl(format!(
            "connection URL {shown:?} names no database; add it as the path: {URL_SHAPE}"
        )));
    }
    let tls = tls
        .check()
        .map_err(|problem| InvalidUrl(format!("connection URL {shown:?}: {problem}")))?;
    config.ssl_mode(tls.mode.tokio_mode());
    let parsed = PgConfig {
        config,
        tls,
        redacted: redact_url(url),
    };
    Ok(ConnectionUrl(url.to_owned(), Box::new(parsed)))
}

/// The connection string with every password replaced by `***`. Conservative for strings that
/// do not parse: in URL form everything between the first `:` of the user info and the last
/// `@` is hidden.
pub(super) fn redact_url(s: &str) -> String {
    match s.find("://") {
        Some(i) => {
            let (scheme, rest) = s.split_at(i + 3);
            let rest = redact_user_info(rest);
            let (before, query) = match rest.split_once('?') {
                Some((before, query)) => (before, Some(query)),
                None => (rest.as_str(), None),
            };
            let mut out = format!("{scheme}{before}");
            if let Some(query) = query {
                let params: Vec<String> = query
                    .split('&')
                    .map(|param| match param.split_once('=') {
                        Some((key, _)) if key == "password" => format!("{key}=***"),
                        _ => param.to_owned(),
                    })
                    .collect();
                out.push('?');
                out.push_str(&params.join("&"));
            }
            out
        }
        None if s.contains('=') => redact_key_values(s),
        None => redact_user_info(s),
    }
}

/// `user:password@rest` -> `user:***@rest`.
fn redact_user_info(s: &str) -> String {
    if let Some(at) = s.rfind('@') {
        if let Some(colon) = s[..at].find(':') {
            return format!("{}***{}", &s[..=colon], &s[at..]);
        }
    }
    s.to_owned()
}

/// `host=h password=secret` -> `host=h password=***`. The value runs to the next
/// `keyword=` (so a malformed value with spaces is hidden whole).
fn redact_key_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = find_keyword(rest, "password") {
        let after_kw = &rest[i + "password".len()..];
        let after_eq = after_kw.trim_start();
        let Some(value) = after_eq.strip_prefix('=') else {
            out.push_str(&rest[..i + "password".len()]);
            rest = after_kw;
            continue;
        };
        out.push_str(&rest[..i]);
        out.push_str("password=***");
        let value = value.trim_start();
        // Skip a quoted value's closing quote, then up to the next `keyword=`.
        let mut from = 0;
        if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            from = value.len();
            for (j, c) in quoted.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '\'' => {
                        from = j + 2;
                        break;
                    }
                    _ => {}
                }
            }
        }
        let end = next_keyword_start(value, from);
        rest = &value[end..];
        if end < value.len() {
            out.push(' ');
        }
    }
    out.push_str(rest);
    out
}

/// Byte offset of `keyword` as a whole token (at the start or after whitespace).
fn find_keyword(s: &str, keyword: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find(keyword).map(|i| i + from) {
        let at_token_start = match s[..i].chars().next_back() {
            None => true,
            Some(c) => c.is_whitespace(),
        };
        let next = s[i + keyword.len()..].chars().next();
        if at_token_start && next.is_some_and(|c| c == '=' || c.is_whitespace()) {
            return Some(i);
        }
        from = i + keyword.len();
    }
    None
}

/// Start of the first `word=` token after whitespace at or after `from`, else `s.len()`.
fn next_keyword_start(s: &str, from: usize) -> usize {
    let mut search = from.min(s.len());
    while let Some(ws) = s[search..].find(char::is_whitespace).map(|i| i + search) {
        let token = s[ws..].trim_start();
        let token_start = s.len() - token.len();
        let word_len = token
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(token.len());
        if word_len > 0 && token[word_len..].trim_start().starts_with('=') {
            return token_start;
        }
        if token.is_empty() {
            return s.len();
        }
        search = token_start;
    }
    s.len()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::testing::{errors, parse, url, HEAD, JSONL_SINK};

    #[test]
    fn connection_url_is_redacted_in_debug_and_display() {
        let url =
            url("postgres://replicator:hunter2@db:5432/shop?application_name=x&password=hunter3");
        for shown in [format!("{url}"), format!("{url:?}"), url.redacted()] {
            assert!(
                shown.contains(
                    "postgres://replicator:***@db:5432/shop?application_name=x&password=***"
                ),
                "{shown}"
            );
            assert!(!shown.contains("hunter"), "{shown}");
        }
        assert_eq!(
            url.expose(),
            "postgres://replicator:hunter2@db:5432/shop?application_name=x&password=hunter3"
        );

        let text = format!(
            "{}{JSONL_SINK}",
            HEAD.replace("replicator@", "replicator:${PW}@")
        );
        let config = parse(&text).unwrap();
        let debug = format!("{config:?}");
        assert!(
            debug.contains("ConnectionUrl(\"postgres://replicator:***@127.0.0.1:5432/shop\")"),
            "{debug}"
        );
        assert!(!debug.contains("w0rd"), "{debug}");
    }

    #[test]
    fn unparsable_url_error_shows_it_redacted() {
        let text = format!(
            "{}[[sink]]\nname = \"m\"\ntype = \"postgres\"\nurl = \"postgres://loader:hunter2@h:port/w\"\nschema = \"r\"\n\
             [[sink]]\nname = \"n\"\ntype = \"postgres\"\nurl = \"postgres://loader:${{PW}}@h:port/w\"\nschema = \"r\"\n",
            HEAD.replace(
                "postgres://replicator@127.0.0.1:5432/shop",
                "host=db password=hunter2 dbname=shop nonsense=1"
            )
        );
        let message = errors(&text);
        assert_eq!(
            message,
            [
                r#"tidemark.toml:6:7: "url" in [source]: cannot parse connection URL "host=db password=*** dbname=shop nonsense=1" (unknown option `nonsense`); expected postgres://USER:PASSWORD@HOST:PORT/DBNAME"#,
                r#"tidemark.toml:11:7: "url" in [[sink]] "m": cannot parse connection URL "postgres://loader:***@h:port/w" (invalid value for option `port`); expected postgres://USER:PASSWORD@HOST:PORT/DBNAME"#,
                r#"tidemark.toml:16:7: "url" in [[sink]] "n": cannot parse connection URL "postgres://loader:***@h:port/w"; expected postgres://USER:PASSWORD@HOST:PORT/DBNAME"#,
            ]
            .join("\n")
        );
        assert!(!message.contains("hunter2"));
        assert!(!message.contains("w0rd"));
    }

    #[test]
    fn redaction_covers_every_place_a_password_can_be() {
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgresql://u:p@h/db"),
            "postgresql://u:***@h/db"
        );
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("postgres://h:5432/db"), "postgres://h:5432/db");
        assert_eq!(
            redact_url("postgres://h/db?password=p&user=u"),
            "postgres://h/db?password=***&user=u"
        );
        assert_eq!(
            redact_url("host=h password='a b\\' c' dbname=d"),
            "host=h password=*** dbname=d"
        );
        assert_eq!(
            redact_url("host=h password = se cret dbname=d"),
            "host=h password=*** dbname=d"
        );
        assert_eq!(redact_url("password=p"), "password=***");
        assert_eq!(
            redact_url("user=password dbname=d"),
            "user=password dbname=d"
        );
        assert_eq!(redact_url("u:p@h"), "u:***@h");
    }

    #[test]
    fn connection_url_must_name_a_host_and_a_database() {
        assert_eq!(
            "postgres://u:secret@h:5432".parse::<ConnectionUrl>(),
            Err(InvalidUrl(
                "connection URL \"postgres://u:***@h:5432\" names no database; add it as the path: postgres://USER:PASSWORD@HOST:PORT/DBNAME"
                    .to_owned()
            ))
        );
        assert_eq!(
            "postgres:///db".parse::<ConnectionUrl>(),
            Err(InvalidUrl(
                "connection URL \"postgres:///db\" names no host; expected postgres://USER:PASSWORD@HOST:PORT/DBNAME"
                    .to_owned()
            ))
        );
        let url: ConnectionUrl = "postgres://u@h/db?host=/run/postgresql".parse().unwrap();
        assert_eq!(url.pg_config().get_dbname(), Some("db"));
    }
}
