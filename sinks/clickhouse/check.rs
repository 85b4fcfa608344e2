//! The ClickHouse sink's part of `tidemark check`: the server answers, its version has the
//! engine features the sink uses, and the user may create the sink's database and tables.

use super::client::{ClickHouseClient, ClickHouseError};
use super::types::quote_identifier;
use crate::check::Check;
use crate::config::ClickHouseSinkConfig;

/// ReplacingMergeTree's `is_deleted` column came with ClickHouse 23.2.
const OLDEST_VERSION: (u32, u32) = (23, 2);

pub async fn run(name: &str, config: &ClickHouseSinkConfig) -> Check {
    let subject = format!("sink {name:?}");
    let client = match ClickHouseClient::new(config) {
        Ok(client) => client,
        Err(e) => return Check::fail(subject, e),
    };
    let version = match client.query("SELECT version() FORMAT TabSeparated").await {
        Ok(answer) => String::from_utf8_lossy(&answer).trim().to_string(),
        Err(e) => {
            return Check::fail(
                subject,
                format!("cannot query {}: {}", config.url, reason(&e, &config.user)),
            )
        }
    };
    let numbers: Vec<u32> = version.split('.').map_while(|n| n.parse().ok()).collect();
    if numbers.len() < 2 || (numbers[0], numbers[1]) < OLDEST_VERSION {
        return Check::fail(
            subject,
            format!(
                "ClickHouse {version} lacks ReplacingMergeTree's is_deleted column, which the \
                 sink's tables use; upgrade the server to {}.{} or later",
                OLDEST_VERSION.0, OLDEST_VERSION.1
            ),
        );
    }
    let database = quote_identifier(&config.database);
    let probe = quote_identifier("_tidemark_check");
    let created = client
        .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
        .await;
    let table = match created {
        Ok(_) => {
            client
                .query(&format!(
                    "CREATE TABLE IF NOT EXISTS {database}.{probe} (id UInt8) ENGINE = Memory"
                ))
                .await
        }
        Err(e) => Err(e),
    };
    match table {
        Ok(_) => {
            let _ = client
                .query(&format!("DROP TABLE IF EXISTS {database}.{probe}"))
                .await;
            Check::ok(
                subject,
                format!(
                    "ClickHouse {version} at {}; user {:?} may create tables in database {:?}",
                    config.url, config.user, config.database
                ),
            )
        }
        Err(e) => Check::fail(
            subject,
            format!(
                "user {:?} cannot create database {:?} and tables in it: {}; grant it with \
                 GRANT CREATE DATABASE, CREATE TABLE, ALTER, INSERT, SELECT, TRUNCATE ON {}.* TO {}",
                config.user,
                config.database,
                e.message(),
                database,
                quote_identifier(&config.user)
            ),
        ),
    }
}

fn reason(error: &ClickHouseError, user: &str) -> String {
    match error {
        ClickHouseError::Refused { code: 516, .. } => format!(
            "user {user:?} was refused (wrong user or password): set them in the url \
             (http://USER:PASSWORD@HOST:8123) or in `user` and `password`"
        ),
        other => other.message().to_string(),
    }
}
