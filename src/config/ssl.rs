//! libpq's TLS parameters of a connection string: `sslmode` (all six of libpq's values) and
//! `sslrootcert`. They are taken out of the string before tokio-postgres parses it, because its
//! parser knows only three modes and no root certificate; checked, they travel beside the
//! parsed config as [`TlsSettings`] for `crate::tls`, which owns what they mean.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::str::FromStr;

/// libpq's `sslmode`: whether the connection is encrypted and what of the server's
/// certificate is verified (see "SSL Mode Descriptions" in the PostgreSQL docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// libpq tries plain first; here TLS is tried first and plain is the fallback, as for
    /// `prefer` (a server that takes both gets an encrypted connection).
    Allow,
    /// TLS when the server offers it, plain otherwise (libpq's default).
    Prefer,
    /// TLS or nothing; the certificate is not verified unless `sslrootcert` is given.
    Require,
    /// TLS, and the certificate must chain to a root in `sslrootcert` (which is then
    /// required); its host name is not checked.
    VerifyCa,
    /// TLS, a chain to a root in `sslrootcert` (default: the system's roots), and a
    /// certificate that names the URL's host.
    VerifyFull,
}

impl SslMode {
    const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    /// The value as written in a connection string.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the connection may go on unencrypted when the server declines TLS.
    pub fn allows_plain(self) -> bool {
        matches!(self, SslMode::Disable | SslMode::Allow | SslMode::Prefer)
    }

    /// tokio-postgres's nearest mode.
    pub(super) fn tokio_mode(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Tokio;
        match self {
            SslMode::Disable => Tokio::Disable,
            SslMode::Allow | SslMode::Prefer => Tokio::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Tokio::Require,
        }
    }

    fn valid_values() -> String {
        SslMode::ALL.map(SslMode::as_str).join(", ")
    }
}

impl FromStr for SslMode {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SslMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == s)
            .ok_or(())
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// libpq's `sslrootcert`: the CA certificates that verify the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates (relative paths are against the working directory, as in
    /// libpq). It existed when the config was read.
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's trusted roots.
    System,
}

impl fmt::Display for RootCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootCert::File(path) => write!(f, "{}", path.display()),
            RootCert::System => f.write_str("system"),
        }
    }
}

/// The TLS parameters of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// `prefer` when the string has none, as in libpq; `verify-full` with
    /// `sslrootcert=system`.
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
}

/// `sslmode` and `sslrootcert` as found in a connection string, before they are checked.
#[derive(Default)]
pub(super) struct RawTls {
    mode: Option<String>,
    root_cert: Option<String>,
}

impl RawTls {
    /// Whether `key` is one of ours; then its value is kept (the last one wins, as in libpq).
    fn take(&mut self, key: &str, value: String) -> bool {
        match key {
            "sslmode" => self.mode = Some(value),
            "sslrootcert" => self.root_cert = Some(value),
            _ => return false,
        }
        true
    }

    /// The settings, or what is wrong with them and how to fix it.
    pub(super) fn check(self) -> Result<TlsSettings, String> {
        let root_cert = match self.root_cert.as_deref() {
            None | Some("") => None,
            Some("system") => Some(RootCert::System),
            Some(path) => {
                let path = PathBuf::from(path);
                match std::fs::metadata(&path) {
                    Ok(meta) if meta.is_file() => Some(RootCert::File(path)),
                    Ok(_) => {
                        return Err(format!(
                            "sslrootcert {} is not a file; give the PEM file of the CA \
                             certificate that signed the server's certificate",
                            path.display()
                        ))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(format!(
                            "sslrootcert {} does not exist; give the PEM file of the CA \
                             certificate that signed the server's certificate, or \
                             sslrootcert=system for the system's trusted roots",
                            path.display()
                        ))
                    }
                    Err(e) => {
                        return Err(format!(
                            "sslrootcert {} cannot be read: {e}; give the agent's user read \
                             access to it",
                            path.display()
                        ))
                    }
                }
            }
        };
        let mode = match self.mode.as_deref() {
            // libpq: sslrootcert=system makes verify-full the default.
            None if root_cert == Some(RootCert::System) => SslMode::VerifyFull,
            None => SslMode::Prefer,
            Some(value) => value.parse().map_err(|()| {
                format!(
                    "sslmode={value:?} is not an sslmode; use one of {}",
                    SslMode::valid_values()
                )
            })?,
        };
        if mode == SslMode::VerifyCa && root_cert.is_none() {
            return Err(
                "sslmode=verify-ca needs sslrootcert: checked against the system's roots \
                        without the host name, any certificate a public CA issued would pass; \
                        give sslrootcert=/path/to/ca.pem, or use sslmode=verify-full"
                    .to_owned(),
            );
        }
        if root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
            // As libpq: with the system's roots, any certificate a public CA issued for any
            // name would pass a weaker check.
            return Err(format!(
                "sslrootcert=system needs sslmode=verify-full (with the system's roots only \
                 the host name check makes verification mean anything), not sslmode={mode}"
            ));
        }
        Ok(TlsSettings { mode, root_cert })
    }
}

/// Takes `sslmode` and `sslrootcert` out of a connection string, so tokio-postgres's parser
/// sees only what it knows. In `key=value` form the parameters are blanked with spaces, so the
/// parser's byte offsets in its messages stay right; a syntax error stops the search and is
/// left for the parser to report.
pub(super) fn take_tls_params(url: &str) -> (Cow<'_, str>, RawTls) {
    let mut tls = RawTls::default();
    if let Some(query) = url_query(url) {
        let params: Vec<_> = url_params(&url[query.clone()]).collect();
        let total = params.len();
        let kept: Vec<&str> = params
            .into_iter()
            .filter_map(|(key, value, raw)| (!tls.take(&key, value)).then_some(raw))
            .collect();
        if kept.len() == total {
            return (Cow::Borrowed(url), tls);
        }
        // Whatever follows the last parameter tokio-postgres can split is kept for its
        // parser to report.
        let consumed: usize = url_params(&url[query.clone()])
            .map(|(_, _, raw)| raw.len() + 1)
            .sum();
        let unparsed = url.get(query.start + consumed..).unwrap_or_default();
        let mut rest = kept.join("&");
        if !unparsed.is_empty() {
            if !rest.is_empty() {
                rest.push('&');
            }
            rest.push_str(unparsed);
        }
        // `query` starts after the `?`.
        let before = &url[..query.start - 1];
        let stripped = if rest.is_empty() {
            before.to_owned()
        } else {
            format!("{before}?{rest}")
        };
        return (Cow::Owned(stripped), tls);
    }
    if url_prefix_len(url).is_some() {
        return (Cow::Borrowed(url), tls);
    }
    let mut blanked: Option<String> = None;
    for (key, value, span) in key_value_params(url) {
        if tls.take(key, value) {
            let text = blanked.get_or_insert_with(|| url.to_owned());
            text.replace_range(span.clone(), &" ".repeat(span.len()));
        }
    }
    let stripped = blanked.map_or(Cow::Borrowed(url), Cow::Owned);
    (stripped, tls)
}

/// The length of `postgres://` or `postgresql://` at the start, if the string is a URL.
fn url_prefix_len(url: &str) -> Option<usize> {
    ["postgres://", "postgresql://"]
        .into_iter()
        .find(|prefix| url.starts_with(prefix))
        .map(str::len)
}

/// The byte range of a URL's query (after the `?`), found as tokio-postgres finds it: the user
/// info runs to the first `@`, the query starts at the first `?` after it.
fn url_query(url: &str) -> Option<Range<usize>> {
    let start = url_prefix_len(url)?;
    let after_user = url[start..].find('@').map_or(start, |at| start + at + 1);
    let question = after_user + url[after_user..].find('?')?;
    Some(question + 1..url.len())
}

/// A URL query's parameters as tokio-postgres splits them (the key runs to `=`, the value to
/// `&`): decoded key, decoded value, raw `key=value` text. A parameter without `=` ends the
/// list (tokio-postgres reports it).
fn url_params(query: &str) -> impl Iterator<Item = (String, String, &str)> {
    let mut rest = query;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let eq = rest.find('=')?;
        let end = rest[eq..].find('&').map_or(rest.len(), |amp| eq + amp);
        let raw = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        Some((decode(&raw[..eq]), decode(&raw[eq + 1..]), raw))
    })
}

/// The parameters of a `key=value` connection string as tokio-postgres reads them (values
/// plain or single-quoted, backslash escapes): key, unescaped value, byte span of the whole
/// parameter. Stops at the first syntax error.
fn key_value_params(s: &str) -> Vec<(&str, String, Range<usize>)> {
    let mut params = Vec::new();
    let mut chars = s.char_indices().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        while chars
            .next_if(|&(_, c)| !c.is_whitespace() && c != '=')
            .is_some()
        {}
        let key_end = chars.peek().map_or(s.len(), |&(i, _)| i);
        let key = &s[start..key_end];
        skip_ws(&mut chars);
        if key.is_empty() || chars.next_if(|&(_, c)| c == '=').is_none() {
            break;
        }
        skip_ws(&mut chars);
        let mut value = String::new();
        let quoted = chars.next_if(|&(_, c)| c == '\'').is_some();
        let mut closed = !quoted;
        while let Some((_, c)) = chars.next_if(|&(_, c)| quoted || !c.is_whitespace()) {
            match c {
                '\'' if quoted => {
                    closed = true;
                    break;
                }
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                c => value.push(c),
            }
        }
        if !closed || (!quoted && value.is_empty()) {
            break;
        }
        let end = chars.peek().map_or(s.len(), |&(i, _)| i);
        params.push((key, value, start..end));
    }
    params
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::testing::{errors, url, HEAD};
    use crate::config::ConnectionUrl;

    fn tls_of(s: &str) -> (SslMode, Option<RootCert>, tokio_postgres::config::SslMode) {
        let url = url(s);
        let tls = url.tls().clone();
        assert_eq!(url.pg_config().tls(), &tls);
        (tls.mode, tls.root_cert, url.pg_config().get_ssl_mode())
    }

    #[test]
    fn every_libpq_sslmode_is_accepted_in_both_forms() {
        use tokio_postgres::config::SslMode as Tokio;
        let cases = [
            ("disable", SslMode::Disable, Tokio::Disable),
            ("allow", SslMode::Allow, Tokio::Prefer),
            ("prefer", SslMode::Prefer, Tokio::Prefer),
            ("require", SslMode::Require, Tokio::Require),
            ("verify-ca", SslMode::VerifyCa, Tokio::Require),
            ("verify-full", SslMode::VerifyFull, Tokio::Require),
        ];
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not checked here").unwrap();
        let root = Some(RootCert::File(ca.clone()));
        for (value, mode, tokio_mode) in cases {
            let (query, expected_root) = if mode == SslMode::VerifyCa {
                (
                    format!("sslmode={value}&sslrootcert={}", ca.display()),
                    &root,
                )
            } else {
                (format!("sslmode={value}"), &None)
            };
            assert_eq!(
                tls_of(&format!("postgres://u:pw@db:5433/shop?{query}")),
                (mode, expected_root.clone(), tokio_mode),
                "{value}"
            );
            assert_eq!(
                tls_of(&format!("host=db {} dbname=shop", query.replace('&', " "))),
                (mode, expected_root.clone(), tokio_mode),
                "{value}"
            );
            assert_eq!(mode.to_string(), value);
        }
        assert_eq!(
            tls_of("postgres://u@db/shop"),
            (SslMode::Prefer, None, Tokio::Prefer),
            "libpq's default"
        );
    }

    #[test]
    fn tls_parameters_are_taken_out_and_the_rest_still_parses() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("root ca.pem");
        std::fs::write(&ca, "not checked here").unwrap();
        let encoded = ca.display().to_string().replace(' ', "%20");

        let text = format!(
            "postgres://u:p%40ss@db:5433/shop?application_name=x&sslmode=verify-full\
             &sslrootcert={encoded}&password=hunter3&connect_timeout=7"
        );
        let url = url(&text);
        assert_eq!(url.expose(), text, "the URL itself is kept as written");
        assert_eq!(url.tls().mode, SslMode::VerifyFull);
        assert_eq!(url.tls().root_cert, Some(RootCert::File(ca.clone())));
        let config = url.pg_config();
        assert_eq!(config.get_application_name(), Some("x"));
        assert_eq!(config.get_password(), Some(&b"hunter3"[..]));
        assert_eq!(config.get_dbname(), Some("shop"));
        assert_eq!(config.get_ports(), &[5433]);
        assert_eq!(
            config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(7))
        );
        assert!(!format!("{config:?}").contains("hunter"), "{config:?}");
        assert_eq!(config.redacted(), url.redacted());

        let only = url_with_query_of(&format!("sslrootcert={encoded}&sslmode=require"));
        assert_eq!(only.pg_config().get_dbname(), Some("shop"));
        assert_eq!(only.tls().mode, SslMode::Require);

        let quoted = format!(
            "host=db user=u sslrootcert='{}' dbname=shop sslmode = verify-ca port=5433",
            ca.display()
        );
        let url = ConnectionUrl::from_str(&quoted).unwrap();
        assert_eq!(url.tls().mode, SslMode::VerifyCa);
        assert_eq!(url.tls().root_cert, Some(RootCert::File(ca)));
        assert_eq!(url.pg_config().get_ports(), &[5433]);
        assert_eq!(url.pg_config().get_user(), Some("u"));
    }

    fn url_with_query_of(query: &str) -> ConnectionUrl {
        url(&format!("postgres://u@db/shop?{query}"))
    }

    #[test]
    fn verify_ca_needs_an_sslrootcert() {
        assert_eq!(
            "postgres://u@db/shop?sslmode=verify-ca"
                .parse::<ConnectionUrl>()
                .unwrap_err()
                .to_string(),
            "connection URL \"postgres://u@db/shop?sslmode=verify-ca\": sslmode=verify-ca needs \
             sslrootcert: checked against the system's roots without the host name, any \
             certificate a public CA issued would pass; give sslrootcert=/path/to/ca.pem, or use \
             sslmode=verify-full"
        );
    }

    #[test]
    fn sslrootcert_system_means_verify_full() {
        let url = url_with_query_of("sslrootcert=system");
        assert_eq!(url.tls().mode, SslMode::VerifyFull);
        assert_eq!(url.tls().root_cert, Some(RootCert::System));
        assert_eq!(
            "postgres://u@db/shop?sslrootcert=system&sslmode=verify-ca"
                .parse::<ConnectionUrl>()
                .unwrap_err()
                .to_string(),
            "connection URL \"postgres://u@db/shop?sslrootcert=system&sslmode=verify-ca\": \
             sslrootcert=system needs sslmode=verify-full (with the system's roots only the host \
             name check makes verification mean anything), not sslmode=verify-ca"
        );
    }

    #[test]
    fn bad_sslmode_and_missing_sslrootcert_are_config_errors_with_the_fix() {
        let text = format!(
            "{}[[sink]]\nname = \"m\"\ntype = \"postgres\"\nurl = \"host=h password=hunter2 dbname=w sslmode=verify-full sslrootcert=/nonexistent/ca.pem\"\nschema = \"r\"\n",
            HEAD.replace(
                "postgres://replicator@127.0.0.1:5432/shop",
                "postgres://replicator:hunter2@127.0.0.1:5432/shop?sslmode=verify_full"
            )
        );
        assert_eq!(
            errors(&text),
            [
                r#"tidemark.toml:6:7: "url" in [source]: connection URL "postgres://replicator:***@127.0.0.1:5432/shop?sslmode=verify_full": sslmode="verify_full" is not an sslmode; use one of disable, allow, prefer, require, verify-ca, verify-full"#,
                r#"tidemark.toml:11:7: "url" in [[sink]] "m": connection URL "host=h password=*** dbname=w sslmode=verify-full sslrootcert=/nonexistent/ca.pem": sslrootcert /nonexistent/ca.pem does not exist; give the PEM file of the CA certificate that signed the server's certificate, or sslrootcert=system for the system's trusted roots"#,
            ]
            .join("\n")
        );
    }

    #[test]
    fn key_value_parse_errors_keep_their_byte_offsets() {
        // The blanked sslmode keeps the parser's offsets pointing at the string as written.
        let message = "host=db sslmode=require dbname 'shop'"
            .parse::<ConnectionUrl>()
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("(unexpected character at byte 31: expected `=`)"),
            "{message}"
        );
    }
}
