//! MySQL and MariaDB connection URLs (`mysql://USER:PASSWORD@HOST:PORT/DATABASE`): checked to
//! name a user and a database, and never shown with their password.

use std::fmt;

use super::check::{Checker, Spot};
use super::document::Val;
use super::url::redact_url;

const URL_SHAPE: &str = "mysql://USER:PASSWORD@HOST:PORT/DATABASE";

/// A MySQL connection URL that may hold a password. Debug and Display show it with the
/// password replaced by `***`; only [`MySqlUrl::opts`] gives the secret away.
#[derive(Clone, PartialEq, Eq)]
pub struct MySqlUrl {
    url: String,
    opts: Box<mysql_async::Opts>,
}

impl MySqlUrl {
    /// The connection options, password included.
    pub fn opts(&self) -> mysql_async::Opts {
        (*self.opts).clone()
    }

    /// The database the URL names (checked to be there).
    pub fn database(&self) -> &str {
        self.opts.db_name().unwrap_or_default()
    }

    /// The URL with the password replaced by `***`, for messages.
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for MySqlUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("MySqlUrl").field(&self.redacted()).finish()
    }
}

impl fmt::Display for MySqlUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::str::FromStr for MySqlUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        check_url(url, &redact_url(url))
    }
}

impl Checker<'_> {
    pub(super) fn mysql_url(&mut self, spot: &Spot, val: &Val) -> Option<MySqlUrl> {
        self.checked_url(spot, val, check_url)
    }
}

/// Parses and checks a URL; `shown` is how messages print it. The parser's own reason is
/// left out: it can quote the password.
fn check_url(url: &str, shown: &str) -> Result<MySqlUrl, String> {
    if !url.starts_with("mysql://") {
        return Err(format!(
            "{shown} is not a MySQL URL; expected {URL_SHAPE} (the scheme is mysql:// for \
             MariaDB too)"
        ));
    }
    let opts = mysql_async::Opts::from_url(url)
        .map_err(|_| format!("{shown} is not a valid URL; expected {URL_SHAPE}"))?;
    if opts.db_name().is_none_or(str::is_empty) {
        return Err(format!(
            "{shown} names no database; add it to the path: {URL_SHAPE}"
        ));
    }
    if opts.user().is_none_or(str::is_empty) {
        return Err(format!("{shown} names no user; expected {URL_SHAPE}"));
    }
    Ok(MySqlUrl {
        url: url.to_owned(),
        opts: Box::new(opts),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_url_names_user_host_and_database_and_hides_its_password() {
        let url: MySqlUrl = "mysql://repl:s3cret@db.internal:3307/shop".parse().unwrap();
        let opts = url.opts();
        assert_eq!(opts.user(), Some("repl"));
        assert_eq!(opts.pass(), Some("s3cret"));
        assert_eq!(opts.ip_or_hostname(), "db.internal");
        assert_eq!(opts.tcp_port(), 3307);
        assert_eq!(url.database(), "shop");
        assert_eq!(
            format!("{url:?}"),
            "MySqlUrl(\"mysql://repl:***@db.internal:3307/shop\")"
        );
        assert!(!url.to_string().contains("s3cret"));
    }

    #[test]
    fn bad_urls_say_what_is_missing_without_the_password() {
        for (url, says) in [
            ("postgres://u:p@h/db", "is not a MySQL URL"),
            ("mysql://u:hunter2@h:3306", "names no database"),
            ("mysql://u:hunter2@h:3306/", "names no database"),
            ("mysql://h:3306/db", "names no user"),
        ] {
            let message = url.parse::<MySqlUrl>().unwrap_err();
            assert!(message.contains(says), "{url}: {message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }
}
