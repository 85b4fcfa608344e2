//! `tidemark check`: every prerequisite the agent needs, checked before it runs, one line per
//! check with the fix for each failure.

use std::fmt;

use crate::config::{Config, SinkKind};
use crate::connectors::AnySource;

/// The outcome of one check: what was checked, and either what was found or what is wrong
/// and how to fix it.
pub struct Check {
    pub subject: String,
    pub outcome: Outcome,
}

pub enum Outcome {
    Ok(String),
    /// The agent runs, but something works less well than it could; says how to improve it.
    Warn(String),
    Fail(String),
}

impl Check {
    pub fn ok(subject: impl Into<String>, found: impl Into<String>) -> Check {
        Check {
            subject: subject.into(),
            outcome: Outcome::Ok(found.into()),
        }
    }

    pub fn warn(subject: impl Into<String>, note: impl Into<String>) -> Check {
        Check {
            subject: subject.into(),
            outcome: Outcome::Warn(note.into()),
        }
    }

    pub fn fail(subject: impl Into<String>, problem: impl Into<String>) -> Check {
        Check {
            subject: subject.into(),
            outcome: Outcome::Fail(problem.into()),
        }
    }

    pub fn passed(&self) -> bool {
        !matches!(self.outcome, Outcome::Fail(_))
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Ok(found) => write!(f, "ok    {}: {found}", self.subject),
            Outcome::Warn(note) => write!(f, "warn  {}: {note}", self.subject),
            Outcome::Fail(problem) => write!(f, "FAIL  {}: {problem}", self.subject),
        }
    }
}

/// Runs every check of an already valid config.
pub async fn run(config: &Config) -> Vec<Check> {
    let mut checks = vec![Check::ok(
        "config",
        format!("{} is valid", config.path.display()),
    )];
    let table_sinks = config.sinks.iter().any(|s| s.kind.requires_primary_keys());
    checks.extend(AnySource::check(&config.source, table_sinks).await);
    for sink in &config.sinks {
        let subject = format!("sink {:?}", sink.name);
        checks.push(match &sink.kind {
            SinkKind::Jsonl(jsonl) => match writable_dir(&jsonl.path) {
                Ok(()) => Check::ok(subject, format!("{} is writable", jsonl.path.display())),
                Err(e) => Check::fail(
                    subject,
                    format!(
                        "cannot write to {}: {e}; create it or give the agent's user write access",
                        jsonl.path.display()
                    ),
                ),
            },
            SinkKind::Postgres(target) => {
                crate::sinks::postgres::check::run(&sink.name, target).await
            }
            SinkKind::ClickHouse(target) => {
                crate::sinks::clickhouse::check::run(&sink.name, target).await
            }
        });
    }
    let data_dir = &config.agent.data_dir;
    checks.push(match writable_dir(data_dir) {
        Ok(()) => Check::ok(
            "agent.data_dir",
            format!("{} is writable", data_dir.display()),
        ),
        Err(e) => Check::fail(
            "agent.data_dir",
            format!(
                "cannot write to {}: {e}; create it or give the agent's user write access",
                data_dir.display()
            ),
        ),
    });
    checks
}

fn writable_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(".tidemark-check");
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(probe)
}
