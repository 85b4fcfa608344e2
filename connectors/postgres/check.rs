//! The source's part of `tidemark check`: reachable, wal_level = logical, the REPLICATION
//! attribute, room for a slot and a WAL sender, the tables, the role's right to read them,
//! the publication, their keys, the schema-change trigger (installed when the role may), and a
//! replication connection that authenticates.

use super::catalog::Catalog;
use super::ddl;
use super::replication::ReplicationConnection;
use super::{check_prerequisites, SourceError};
use crate::check::Check;
use crate::config::PostgresSourceConfig;

/// `require_primary_keys`: a table sink is configured, so every table needs a primary key.
pub async fn run(config: &PostgresSourceConfig, require_primary_keys: bool) -> Vec<Check> {
    let mut checks = Vec::new();
    let catalog = match Catalog::connect(&config.url).await {
        Ok(catalog) => {
            checks.push(Check::ok(
                "source",
                format!("connected to {}", config.url.redacted()),
            ));
            catalog
        }
        Err(e) => {
            checks.push(Check::fail("source", e.to_string()));
            return checks;
        }
    };
    checks.push(outcome(
        "source prerequisites",
        check_prerequisites(&catalog)
            .await
            .map(|()| "wal_level = logical, role may replicate".to_string()),
    ));
    checks.push(outcome(
        "replication headroom",
        catalog.check_replication_headroom(&config.slot).await,
    ));
    match catalog.resolve_tables(&config.tables).await {
        Ok(tables) if tables.is_empty() => checks.push(Check::fail(
            "source.tables",
            "the patterns match no table; create the tables or fix the patterns",
        )),
        Ok(tables) => {
            let names: Vec<String> = tables.iter().map(ToString::to_string).collect();
            checks.push(Check::ok("source.tables", names.join(", ")));
            checks.push(outcome(
                "replica identity",
                catalog
                    .check_replica_identity(&tables)
                    .await
                    .map(|()| "every table has a primary key or replica identity".to_string()),
            ));
            checks.push(outcome(
                "table privileges",
                catalog
                    .check_select(&tables)
                    .await
                    .map(|()| "the role may read every table".to_string()),
            ));
            checks.push(outcome(
                "publication",
                catalog
                    .check_publication(&config.publication, &tables)
                    .await,
            ));
            if require_primary_keys {
                checks.push(outcome(
                    "primary keys",
                    catalog
                        .check_primary_keys(&tables)
                        .await
                        .map(|()| "every table has one, as postgres sinks need".to_string()),
                ));
            }
        }
        Err(e) => checks.push(Check::fail("source.tables", e.to_string())),
    }
    checks.push(schema_changes(&catalog).await);
    checks.push(outcome(
        "replication connection",
        async {
            let mut connection = ReplicationConnection::connect(&config.url.pg_config()).await?;
            let system = connection.identify_system().await?;
            connection.close().await?;
            Ok::<_, SourceError>(format!(
                "system {} timeline {} at {}",
                system.system_id, system.timeline, system.xlog_position
            ))
        }
        .await,
    ));
    checks
}

/// Installs the schema-change trigger when the role may; says what is not exact without it.
async fn schema_changes(catalog: &Catalog) -> Check {
    const SUBJECT: &str = "schema changes";
    let installed = async {
        if catalog.server_version_num().await? < 140_000 {
            return Ok(None);
        }
        catalog.install_ddl_trigger().await.map(Some)
    };
    match installed.await {
        Ok(Some(true)) => Check::ok(
            SUBJECT,
            format!(
                "event trigger {} installed: column changes are followed at their place in \
                 the stream",
                ddl::TRIGGER_NAME
            ),
        ),
        Ok(Some(false)) => Check::warn(
            SUBJECT,
            format!(
                "the role may not create the event trigger {} (it needs a superuser), so \
                 schema changes are inferred from the stream: a renamed column is followed as a \
                 drop and an add, and a new column's value for existing rows is read when the \
                 table next changes. Run `tidemark check` once as a superuser to install it",
                ddl::TRIGGER_NAME
            ),
        ),
        Ok(None) => Check::warn(
            SUBJECT,
            "PostgreSQL 13 and older send no logical decoding messages, so schema changes are \
             inferred from the stream: a renamed column is followed as a drop and an add",
        ),
        Err(e) => Check::fail(SUBJECT, e.to_string()),
    }
}

fn outcome(subject: &str, result: Result<String, SourceError>) -> Check {
    match result {
        Ok(found) => Check::ok(subject, found),
        Err(e) => Check::fail(subject, e.to_string()),
    }
}
