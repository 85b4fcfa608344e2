//! HTTP endpoints with credentials (`http://USER:PASSWORD@HOST:PORT`, `https://…`): the
//! ClickHouse sink's `url`. The credentials are taken out of the URL when it is checked, so
//! the address a message shows never holds the password.

use std::fmt;

use percent_encoding::percent_decode_str;
use reqwest::Url;

use super::check::{Checker, Spot};
use super::document::Val;
use super::url::redact_url;

const URL_SHAPE: &str = "http://USER:PASSWORD@HOST:8123 (or https://…:8443)";

/// An HTTP(S) base address and the user and password the URL gave, if any. Debug and
/// Display show the address without credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// Scheme, host and port; no credentials, path `/`.
    pub address: Url,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HttpUrl").field(&self.to_string()).finish()
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.address.as_str().trim_end_matches('/'))
    }
}

impl std::str::FromStr for HttpUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        check_url(url, &redact_url(url))
    }
}

impl Checker<'_> {
    pub(super) fn http_url(&mut self, spot: &Spot, val: &Val) -> Option<HttpUrl> {
        self.checked_url(spot, val, check_url)
    }
}

/// Parses and checks a URL; `shown` is how messages print it (the parser's own reason is left
/// out: it can quote the password).
fn check_url(url: &str, shown: &str) -> Result<HttpUrl, String> {
    let mut parsed =
        Url::parse(url).map_err(|_| format!("{shown} is not a valid URL; expected {URL_SHAPE}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "{shown} is not an HTTP URL; expected {URL_SHAPE} (ClickHouse's HTTP interface)"
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{shown} names no host; expected {URL_SHAPE}"));
    }
    if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
        return Err(format!(
            "{shown} has a path or query; give the server's address only ({URL_SHAPE}) and \
             the database in `database`"
        ));
    }
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    let user = Some(decode(parsed.username())).filter(|u| !u.is_empty());
    let password = parsed.password().map(decode);
    // Neither fails on an http(s) URL with a host.
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    Ok(HttpUrl {
        address: parsed,
        user,
        password,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_address() {
        let url: HttpUrl = "https://loader:p%40ss@ch.internal:8443".parse().unwrap();
        assert_eq!(url.user.as_deref(), Some("loader"));
        assert_eq!(url.password.as_deref(), Some("p@ss"));
        assert_eq!(url.to_string(), "https://ch.internal:8443");
        assert!(!format!("{url:?}").contains("p@ss"));
        let bare: HttpUrl = "http://127.0.0.1:8123/".parse().unwrap();
        assert_eq!((bare.user, bare.password), (None, None));
    }

    #[test]
    fn bad_urls_say_what_is_wrong_without_the_password() {
        for (url, says) in [
            ("postgres://u:hunter2@h/db", "is not an HTTP URL"),
            ("http://u:hunter2@h:8123/analytics", "has a path or query"),
            ("http://u:hunter2@h:8123/?database=x", "has a path or query"),
            ("ch.internal:8123", "is not"),
        ] {
            let message = url.parse::<HttpUrl>().unwrap_err();
            assert!(message.contains(says), "{url}: {message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }
}
