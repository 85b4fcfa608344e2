//! The PostgreSQL sink's part of `tidemark check`: the target is reachable, the mode is one
//! tidemark builds, and the role may create the sink's schema and tables in it.

use crate::check::Check;
use crate::config::{PostgresSinkConfig, SinkMode};
use crate::tls;

pub async fn run(name: &str, config: &PostgresSinkConfig) -> Check {
    let subject = format!("sink {name:?}");
    if config.mode == SinkMode::Append {
        return Check::fail(
            subject,
            "mode \"append\" is not built yet for a postgres sink; use mode = \"merge\" or \
             \"scd2\", or a jsonl sink for a stream of envelopes",
        );
    }
    let (client, connection) = match tls::connect(&config.url.pg_config()).await {
        Ok(connected) => connected,
        Err(e) => {
            return Check::fail(
                subject,
                format!("cannot connect to {}: {e}", config.url.redacted()),
            )
        }
    };
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT n.oid IS NOT NULL, \
               CASE WHEN n.oid IS NULL THEN has_database_privilege(current_database(), 'CREATE') \
                    ELSE has_schema_privilege(n.oid, 'CREATE') END, \
               current_user::text \
             FROM (SELECT 1) one LEFT JOIN pg_namespace n ON n.nspname = $1",
            &[&config.schema],
        )
        .await;
    match row {
        Ok(row) => {
            let (exists, can_create, user): (bool, bool, String) =
                (row.get(0), row.get(1), row.get(2));
            let schema = postgres_protocol::escape::escape_identifier(&config.schema);
            match (exists, can_create) {
                (_, true) => Check::ok(
                    subject,
                    format!("{} reachable; role {user:?} may create tables in schema {}", config.url.redacted(), config.schema),
                ),
                (true, false) => Check::fail(
                    subject,
                    format!("role {user:?} may not create tables in schema {schema}: GRANT CREATE ON SCHEMA {schema} TO \"{user}\";"),
                ),
                (false, false) => Check::fail(
                    subject,
                    format!("schema {schema} does not exist and role {user:?} may not create it: CREATE SCHEMA {schema} AUTHORIZATION \"{user}\"; (or GRANT CREATE ON DATABASE … TO \"{user}\";)"),
                ),
            }
        }
        Err(e) => Check::fail(subject, format!("reading privileges: {e}")),
    }
}
