//! What the MySQL source needs of the server, checked at start-up and by `tidemark check`:
//! the binary log on, in ROW format with FULL row images and whole JSON values, kept long
//! enough, the REPLICATION SLAVE and REPLICATION CLIENT privileges, and the tables with
//! primary keys. Each failure says the statement that fixes it.

use std::collections::BTreeSet;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::catalog;
use super::{quote, BinlogStart, Server, SourceError};
use crate::check::Check;
use crate::config::{MySqlSourceConfig, SnapshotMode};

/// The binlog retention below which `check` warns: a restart after a longer outage finds its
/// position purged.
const MIN_RETENTION_SECONDS: u64 = 24 * 3600;

/// One server variable, or None when the server has no such variable.
async fn variable(conn: &mut Conn, name: &str) -> Result<Option<String>, SourceError> {
    let row: Option<(String, String)> = conn
        .exec_first("SHOW GLOBAL VARIABLES WHERE Variable_name = ?", (name,))
        .await
        .map_err(|e| SourceError::query(&format!("reading @@{name}"), e))?;
    Ok(row.map(|(_, value)| value))
}

/// The settings the binlog must have, each as (variable, the value it must have, the
/// statement that sets it).
async fn binlog_settings(conn: &mut Conn) -> Result<Vec<String>, SourceError> {
    let mut problems = Vec::new();
    if variable(conn, "log_bin").await?.as_deref() != Some("ON") {
        problems.push(
            "the binary log is off: start the server with --log-bin (log_bin cannot be set at \
             run time)"
                .to_owned(),
        );
        return Ok(problems);
    }
    for (name, wanted) in [("binlog_format", "ROW"), ("binlog_row_image", "FULL")] {
        match variable(conn, name).await? {
            Some(value) if value.eq_ignore_ascii_case(wanted) => {}
            Some(value) => problems.push(format!(
                "{name} is {value}, tidemark needs {wanted}: SET PERSIST {name} = '{wanted}' \
                 (MariaDB: SET GLOBAL {name} = '{wanted}' and put {name} = {wanted} in the \
                 server's config)"
            )),
            None => {}
        }
    }
    if let Some(options) = variable(conn, "binlog_row_value_options").await? {
        if options.to_ascii_uppercase().contains("PARTIAL_JSON") {
            problems.push(
                "binlog_row_value_options is PARTIAL_JSON: updates of JSON columns would carry \
                 only their changes; SET PERSIST binlog_row_value_options = ''"
                    .to_owned(),
            );
        }
    }
    Ok(problems)
}

/// Checks what streaming needs; on success, what the session needs to know of the server.
pub(super) async fn prerequisites(conn: &mut Conn) -> Result<Server, SourceError> {
    let mut problems = binlog_settings(conn).await?;
    // Without them the stream fails later with the server's bare "access denied", or not
    // at all until the first reconnect; refused here, the error carries the GRANT. A role
    // may hold them: then the server is left to decide.
    let grants = Grants::read(conn).await?;
    if !grants.has_roles {
        problems.extend(grants.problem(STREAMING_PRIVILEGES));
    }
    if !problems.is_empty() {
        return Err(SourceError::Prerequisite(problems.join("; ")));
    }
    server(conn).await
}

async fn server(conn: &mut Conn) -> Result<Server, SourceError> {
    let version = variable(conn, "version").await?.unwrap_or_default();
    let server_id = variable(conn, "server_id")
        .await?
        .and_then(|id| id.parse().ok())
        .unwrap_or_default();
    let server_uuid = variable(conn, "server_uuid").await?;
    Ok(Server {
        mariadb: version.to_ascii_lowercase().contains("mariadb"),
        server_id,
        server_uuid,
    })
}

/// The server's GTID state: MariaDB's `gtid_binlog_pos`, MySQL's `gtid_executed` when
/// `gtid_mode` is on; None otherwise.
pub(super) async fn gtid_state(conn: &mut Conn) -> Result<Option<String>, SourceError> {
    if let Some(pos) = variable(conn, "gtid_binlog_pos").await? {
        return Ok(Some(pos));
    }
    if variable(conn, "gtid_mode").await?.as_deref() == Some("ON") {
        return variable(conn, "gtid_executed").await;
    }
    Ok(None)
}

/// Stops when the server no longer has the binlog file `start` is in.
pub(super) async fn position_available(
    conn: &mut Conn,
    start: &BinlogStart,
) -> Result<(), SourceError> {
    let files: Vec<mysql_async::Row> = conn
        .query("SHOW BINARY LOGS")
        .await
        .map_err(|e| SourceError::query("listing the binlog files (SHOW BINARY LOGS)", e))?;
    let names: Vec<String> = files.iter().filter_map(|row| row.get(0)).collect();
    if names.contains(&start.file) {
        return Ok(());
    }
    Err(SourceError::Prerequisite(format!(
        "the server no longer has binlog file {} (it has {}), where the log's last transaction \
         ends: the changes since are lost to the binlog. Capture again from a new snapshot: \
         stop the agent, move the data_dir away, and start it (the sinks' tables are replaced \
         by the snapshot); keep the binlog longer (binlog_expire_logs_seconds) from then on",
        start.file,
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    )))
}

/// The source's part of `tidemark check`.
pub async fn run(config: &MySqlSourceConfig, require_primary_keys: bool) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut conn = match super::connect(config).await {
        Ok(conn) => {
            checks.push(Check::ok("source", format!("connected to {}", config.url)));
            conn
        }
        Err(e) => {
            checks.push(Check::fail("source", e.to_string()));
            return checks;
        }
    };
    checks.push(match binlog_settings(&mut conn).await {
        Ok(problems) if problems.is_empty() => Check::ok(
            "binlog",
            "log_bin = ON, binlog_format = ROW, binlog_row_image = FULL",
        ),
        Ok(problems) => Check::fail("binlog", problems.join("; ")),
        Err(e) => Check::fail("binlog", e.to_string()),
    });
    checks.push(row_metadata(&mut conn).await);
    checks.push(retention(&mut conn).await);
    checks.push(privileges(&mut conn, config).await);
    match catalog::captured_tables(&mut conn, &config.tables).await {
        Ok(tables) if tables.is_empty() => checks.push(Check::fail(
            "source.tables",
            "the patterns match no table; create the tables or fix the patterns",
        )),
        Ok(tables) => {
            let names: Vec<String> = tables.iter().map(|(d, t)| format!("{d}.{t}")).collect();
            checks.push(Check::ok("source.tables", names.join(", ")));
            checks.push(primary_keys(&mut conn, &tables, require_primary_keys).await);
        }
        Err(e) => checks.push(Check::fail("source.tables", e.to_string())),
    }
    checks
}

async fn retention(conn: &mut Conn) -> Check {
    let seconds = match variable(conn, "binlog_expire_logs_seconds").await {
        Ok(Some(seconds)) => seconds.parse::<u64>().ok(),
        Ok(None) => match variable(conn, "expire_logs_days").await {
            Ok(days) => days
                .and_then(|d| d.parse::<f64>().ok())
                .map(|d| (d * 86_400.0) as u64),
            Err(e) => return Check::fail("binlog retention", e.to_string()),
        },
        Err(e) => return Check::fail("binlog retention", e.to_string()),
    };
    match seconds {
        Some(0) | None => Check::ok(
            "binlog retention",
            "the server keeps its binlog until purged",
        ),
        Some(s) if s < MIN_RETENTION_SECONDS => Check::warn(
            "binlog retention",
            format!(
                "the server purges its binlog after {s} s: an agent stopped longer loses its \
                 place; SET GLOBAL binlog_expire_logs_seconds = 604800 (a week) and put \
                 binlog_expire_logs_seconds = 604800 in the server's config (MySQL: SET \
                 PERSIST binlog_expire_logs_seconds = 604800)"
            ),
        ),
        Some(s) => Check::ok("binlog retention", format!("{s} s")),
    }
}

/// The global privileges reading the binlog needs: the dump itself, and the binlog's files and
/// position (`SHOW BINARY LOGS`, `SHOW MASTER STATUS`).
const STREAMING_PRIVILEGES: &[&str] = &["REPLICATION SLAVE", "REPLICATION CLIENT"];

/// What the session's account was granted on `*.*`, as `SHOW GRANTS` lists it.
struct Grants {
    /// The account as a GRANT statement names it: `'reader'@'127.0.0.1'`.
    account: String,
    global: BTreeSet<String>,
    /// The account was granted roles, whose privileges `SHOW GRANTS` does not list.
    has_roles: bool,
}

impl Grants {
    async fn read(conn: &mut Conn) -> Result<Grants, SourceError> {
        let lines: Vec<String> = conn
            .query("SHOW GRANTS")
            .await
            .map_err(|e| SourceError::query("reading the user's privileges (SHOW GRANTS)", e))?;
        // CURRENT_USER(), not the url's user: the grant belongs to the account the server
        // matched, whose host part may be other than '%'.
        let current: Option<String> = conn
            .query_first("SELECT CURRENT_USER()")
            .await
            .map_err(|e| SourceError::query("reading the user's account (CURRENT_USER())", e))?;
        let current = current.unwrap_or_default();
        let (user, host) = current.rsplit_once('@').unwrap_or((&current, "%"));
        let (global, has_roles) = global_privileges(&lines);
        Ok(Grants {
            account: format!("{}@{}", quote_string(user), quote_string(host)),
            global,
            has_roles,
        })
    }

    /// Those of `needed` the account lacks on `*.*`.
    fn missing<'a>(&self, needed: &[&'a str]) -> Vec<&'a str> {
        let has = |privilege: &str| {
            self.global.contains("ALL PRIVILEGES") || self.global.contains(privilege)
        };
        needed
            .iter()
            .copied()
            // MariaDB 10.5+ names REPLICATION CLIENT `BINLOG MONITOR`.
            .filter(|p| !(has(p) || (*p == "REPLICATION CLIENT" && has("BINLOG MONITOR"))))
            .collect()
    }

    /// Why the account cannot do its part, and the GRANT that lets it; None when it can.
    fn problem(&self, needed: &[&str]) -> Option<String> {
        let missing = self.missing(needed);
        if missing.is_empty() {
            return None;
        }
        Some(format!(
            "the user lacks {}: GRANT {} ON *.* TO {}",
            missing.join(" and "),
            missing.join(", "),
            self.account
        ))
    }
}

/// The privileges `SHOW GRANTS` lines give on `*.*` (upper case, one entry each, so that
/// `REPLICATION SLAVE ADMIN` is not taken for `REPLICATION SLAVE`), and whether a line grants
/// a role.
fn global_privileges(lines: &[String]) -> (BTreeSet<String>, bool) {
    let mut global = BTreeSet::new();
    let mut has_roles = false;
    for line in lines {
        let Some(grant) = line.strip_prefix("GRANT ") else {
            continue;
        };
        let Some((privileges, on)) = grant.split_once(" ON ") else {
            // `GRANT role TO user`: no ON.
            has_roles |= grant.contains(" TO ");
            continue;
        };
        if !on.starts_with("*.* TO ") {
            continue;
        }
        // MySQL 8 lists dynamic privileges joined by a bare comma.
        global.extend(
            privileges
                .split(',')
                .map(|p| p.trim().to_ascii_uppercase())
                .filter(|p| !p.is_empty()),
        );
    }
    (global, has_roles)
}

/// A string literal for a GRANT's account name.
fn quote_string(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// Whether the binlog describes its rows' columns: without it, rows read after a later
/// `ALTER TABLE` changed their table can only be matched to the catalog as it is now.
async fn row_metadata(conn: &mut Conn) -> Check {
    match variable(conn, "binlog_row_metadata").await {
        Ok(Some(value)) if value.eq_ignore_ascii_case("FULL") => {
            Check::ok("binlog_row_metadata", "FULL")
        }
        Ok(Some(value)) => Check::warn(
            "binlog_row_metadata",
            format!(
                "{value}: rows the agent reads after a later ALTER TABLE changed their table \
                 stop the source; SET PERSIST binlog_row_metadata = 'FULL' (MariaDB: SET \
                 GLOBAL binlog_row_metadata = 'FULL' and put binlog_row_metadata = FULL in the \
                 server's config)"
            ),
        ),
        Ok(None) => Check::warn(
            "binlog_row_metadata",
            "the server has no binlog_row_metadata (MySQL before 8.0.1, MariaDB before 10.5): \
             rows the agent reads after a later ALTER TABLE changed their table stop the source",
        ),
        Err(e) => Check::fail("binlog_row_metadata", e.to_string()),
    }
}

async fn privileges(conn: &mut Conn, config: &MySqlSourceConfig) -> Check {
    let grants = match Grants::read(conn).await {
        Ok(grants) => grants,
        Err(e) => return Check::fail("privileges", e.to_string()),
    };
    let mut needed = STREAMING_PRIVILEGES.to_vec();
    if config.snapshot == SnapshotMode::Initial {
        // The snapshot's FLUSH TABLES WITH READ LOCK.
        needed.push("RELOAD");
    }
    match grants.problem(&needed) {
        None => Check::ok("privileges", needed.join(", ")),
        // The privileges may come with a role; only the server can tell.
        Some(problem) if grants.has_roles => Check::warn(
            "privileges",
            format!("{problem} (unless one of its roles grants them)"),
        ),
        Some(problem) => Check::fail("privileges", problem),
    }
}

async fn primary_keys(conn: &mut Conn, tables: &[(String, String)], required: bool) -> Check {
    let mut without = Vec::new();
    let mut first_alter = None;
    for (database, table) in tables {
        match catalog::columns(conn, database, table).await {
            Ok(columns) if !columns.iter().any(|c| c.primary_key) => {
                without.push(format!("{database}.{table}"));
                // Quoted, so the statement runs as printed for any name; the key's columns
                // are the operator's to choose.
                first_alter.get_or_insert_with(|| {
                    format!(
                        "ALTER TABLE {}.{} ADD PRIMARY KEY (…)",
                        quote(database),
                        quote(table)
                    )
                });
            }
            Ok(_) => {}
            Err(e) => return Check::fail("primary keys", e.to_string()),
        }
    }
    match (without.is_empty(), required) {
        (true, _) => Check::ok("primary keys", "every table has one"),
        (false, true) => Check::fail(
            "primary keys",
            format!(
                "{} without a primary key: a table sink cannot apply its changes; add one, \
                 e.g. {}",
                without.join(", "),
                first_alter.unwrap_or_default()
            ),
        ),
        (false, false) => Check::warn(
            "primary keys",
            format!(
                "{} without a primary key (fine for append sinks)",
                without.join(", ")
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(grants: &[&str]) -> Vec<String> {
        grants.iter().map(|l| (*l).to_owned()).collect()
    }

    #[test]
    fn replication_slave_admin_is_not_replication_slave() {
        let (global, has_roles) = global_privileges(&lines(&[
            "GRANT REPLICATION SLAVE ADMIN, BINLOG MONITOR ON *.* TO `admin`@`%`",
        ]));
        assert!(!has_roles);
        assert!(global.contains("REPLICATION SLAVE ADMIN"));
        assert!(!global.contains("REPLICATION SLAVE"));
    }

    #[test]
    fn only_global_grants_count_and_roles_are_noticed() {
        let (global, has_roles) = global_privileges(&lines(&[
            "GRANT USAGE ON *.* TO `reader`@`127.0.0.1` IDENTIFIED BY PASSWORD '*AB'",
            "GRANT SELECT, RELOAD ON `shop`.* TO `reader`@`127.0.0.1`",
            "GRANT BACKUP_ADMIN,REPLICATION_APPLIER ON *.* TO `reader`@`127.0.0.1`",
            "GRANT `capture` TO `reader`@`127.0.0.1`",
        ]));
        assert!(has_roles);
        let expected: BTreeSet<String> = ["USAGE", "BACKUP_ADMIN", "REPLICATION_APPLIER"]
            .map(str::to_owned)
            .into();
        assert_eq!(global, expected);
    }

    #[test]
    fn the_grant_names_what_is_missing_and_the_account() {
        let (global, has_roles) = global_privileges(&lines(&[
            "GRANT BINLOG MONITOR ON *.* TO `o'neil`@`10.0.0.%`",
        ]));
        let grants = Grants {
            account: format!("{}@{}", quote_string("o'neil"), quote_string("10.0.0.%")),
            global,
            has_roles,
        };
        assert_eq!(
            grants.problem(&["REPLICATION SLAVE", "REPLICATION CLIENT", "RELOAD"]),
            Some(
                "the user lacks REPLICATION SLAVE and RELOAD: GRANT REPLICATION SLAVE, RELOAD \
                 ON *.* TO 'o''neil'@'10.0.0.%'"
                    .to_owned()
            )
        );
        let all = Grants {
            account: String::new(),
            global: ["ALL PRIVILEGES".to_owned()].into(),
            has_roles: false,
        };
        assert_eq!(all.problem(STREAMING_PRIVILEGES), None);
    }
}
