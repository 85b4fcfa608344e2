//! tidemark: a change-data-capture agent. A source connector (`connectors/`) reads a
//! database's change stream into the durable offset log (`log`), the pipeline (`pipeline`)
//! moves what is logged to each sink (`sinks/`) at its own pace.

pub mod check;
pub mod config;
pub mod dead_letter;
pub mod envelope;
pub mod event;
pub mod health;
pub mod log;
pub mod pgclient;
pub mod pgtext;
pub mod pipeline;
pub mod retry;
pub mod status;
pub mod telemetry;
pub mod tls;

#[path = "../connectors/mod.rs"]
pub mod connectors;
#[path = "../sinks/mod.rs"]
pub mod sinks;
