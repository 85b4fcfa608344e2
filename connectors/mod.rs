//! Sources: one folder per database, each reading its database's change stream into the
//! offset log.
//!
//! The contract of a source (the pipeline keeps its side, every source keeps its own):
//! - `run` is called once, with the log's only writer, and returns when `cancel` fires (`Ok`)
//!   or on a failure retrying cannot cure (`Err`: the agent stops and says why). Connection
//!   trouble is retried inside `run`, with backoff.
//! - It appends whole committed transactions in commit order (Begin, changes, Commit), and a
//!   transaction the database sends again after a restart, which the log holds already, is
//!   recognised and skipped: the log never holds a transaction twice.
//! - It confirms a position to its database (so the database may discard what is before it)
//!   only once every transaction up to it is durable in the log.
//! - It never resumes silently from the wrong place: a different server, a missing slot or a
//!   position the database no longer has stops it with the recovery command.
//! - On `cancel` it stops reading, makes what it appended durable, confirms it, and returns.

pub mod backpressure;
pub mod mysql;
pub mod postgres;
pub mod snapshot_log;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::check::Check;
use crate::config::SourceConfig;
use crate::envelope::SourceInfo;
use crate::log::LogWriter;
use crate::telemetry::Telemetry;

/// Why a source stopped: each source's own errors, which say what happened and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Postgres(#[from] postgres::SourceError),
    #[error(transparent)]
    MySql(#[from] mysql::SourceError),
}

impl SourceError {
    /// Whether the operator's setup is at fault (exit code 2) rather than a runtime failure.
    pub fn is_prerequisite(&self) -> bool {
        match self {
            SourceError::Postgres(e) => e.is_prerequisite(),
            SourceError::MySql(e) => e.is_prerequisite(),
        }
    }
}

/// The closed set of sources, built from config with one match.
pub enum AnySource {
    Postgres(postgres::PostgresSource),
    MySql(mysql::MySqlSource),
}

/// What a source needs besides its own config section.
pub struct SourceSettings {
    /// A table sink is configured: every captured table needs a primary key.
    pub require_primary_keys: bool,
    pub telemetry: Arc<Telemetry>,
    /// Backpressure: capture pauses while the log holds more than this.
    pub log_max_bytes: u64,
}

impl AnySource {
    pub fn build(config: &SourceConfig, settings: SourceSettings) -> AnySource {
        match config {
            SourceConfig::Postgres(config) => AnySource::Postgres(postgres::PostgresSource::new(
                config.clone(),
                settings.require_primary_keys,
                settings.telemetry,
                settings.log_max_bytes,
            )),
            SourceConfig::MySql(config) => AnySource::MySql(mysql::MySqlSource::new(
                config.clone(),
                settings.require_primary_keys,
                settings.telemetry,
                settings.log_max_bytes,
            )),
        }
    }

    /// Who the envelopes say produced them: the `source` block's connector, name and db.
    pub fn info(&self, name: &str) -> SourceInfo {
        match self {
            AnySource::Postgres(source) => source.info(name),
            AnySource::MySql(source) => source.info(name),
        }
    }

    /// How many connections copy the initial snapshot at once (and how many a table sink
    /// loads it with).
    pub fn snapshot_parallelism(&self) -> usize {
        match self {
            AnySource::Postgres(source) => source.snapshot_parallelism(),
            AnySource::MySql(source) => source.snapshot_parallelism(),
        }
    }

    /// The source's part of `tidemark check`.
    pub async fn check(config: &SourceConfig, require_primary_keys: bool) -> Vec<Check> {
        match config {
            SourceConfig::Postgres(config) => {
                postgres::check::run(config, require_primary_keys).await
            }
            SourceConfig::MySql(config) => mysql::check::run(config, require_primary_keys).await,
        }
    }

    /// Captures into the log until `cancel` fires (see the module's contract).
    pub async fn run(
        &self,
        writer: &mut LogWriter,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        match self {
            AnySource::Postgres(source) => Ok(source.run(writer, cancel).await?),
            AnySource::MySql(source) => Ok(source.run(writer, cancel).await?),
        }
    }
}
