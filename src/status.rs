//! `tidemark status`: the running agent's `/status` and `/ready`, read over its HTTP port and
//! shown for a terminal, one line per component.

use std::fmt::Write as _;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot reach the agent at {addr}: {message} (is `tidemark run` running with this \
         config? its agent.health_addr is {addr})"
    )]
    Unreachable { addr: SocketAddr, message: String },
    #[error("the agent at {addr} answered {path} with something unreadable: {message}")]
    Unreadable {
        addr: SocketAddr,
        path: &'static str,
        message: String,
    },
}

/// The agent's `/status` and `/ready` documents.
pub struct Report {
    pub status: Value,
    pub ready: Value,
}

impl Report {
    pub fn is_ready(&self) -> bool {
        self.ready["ready"] == true
    }
}

pub async fn fetch(addr: SocketAddr) -> Result<Report, StatusError> {
    Ok(Report {
        status: get_json(addr, "/status").await?,
        ready: get_json(addr, "/ready").await?,
    })
}

async fn get_json(addr: SocketAddr, path: &'static str) -> Result<Value, StatusError> {
    let unreachable = |message: String| StatusError::Unreachable { addr, message };
    let unreadable = |message: String| StatusError::Unreadable {
        addr,
        path,
        message,
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| unreadable(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| unreadable(e.to_string()))
}

/// The report as lines for a terminal.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let status = &report.status;
    let source = &status["source"];
    let connected = if source["connected"] == true {
        "connected".to_string()
    } else {
        format!("NOT CONNECTED: {}", text(&source["last_error"]))
    };
    let _ = writeln!(
        out,
        "source  {connected} · received {} · logged {} · confirmed {} · slot keeps {}",
        text(&source["received_lsn"]),
        text(&source["logged_lsn"]),
        text(&source["confirmed_lsn"]),
        source["slot_retained_bytes"]
            .as_u64()
            .map_or_else(|| "-".to_string(), bytes),
    );
    let snapshot = &source["snapshot"];
    if let Some(tables) = snapshot["tables"].as_object() {
        let tables: Vec<String> = tables
            .iter()
            .map(|(name, t)| format!("{name} {}/~{}", t["rows"], t["estimated"]))
            .collect();
        let _ = writeln!(
            out,
            "snapshot {} · {} rows in {:.0} s ({} rows/s) · {}",
            text(&snapshot["state"]),
            snapshot["rows"],
            snapshot["seconds"].as_f64().unwrap_or(0.0),
            snapshot["rows_per_second"],
            tables.join(" · "),
        );
    }
    let log = &status["log"];
    let _ = writeln!(
        out,
        "log     {} on disk · durable position {} ({})",
        bytes(log["bytes"].as_u64().unwrap_or(0)),
        log["durable_position"],
        text(&log["durable_lsn"]),
    );
    if let Some(sinks) = status["sinks"].as_object() {
        for (name, sink) in sinks {
            let state = if sink["applying"] == true {
                "applying".to_string()
            } else {
                format!("NOT APPLYING: {}", text(&sink["last_error"]))
            };
            let _ = writeln!(
                out,
                "sink    {name}: {state} · position {} · lag {}, {:.1} s · {} batches ({:.0} changes/s) · {} dead letters",
                sink["applied_position"],
                bytes(sink["lag_bytes"].as_u64().unwrap_or(0)),
                sink["lag_seconds"].as_f64().unwrap_or(0.0),
                sink["batches"],
                sink["changes_per_second"].as_f64().unwrap_or(0.0),
                sink["dead_letters"],
            );
        }
    }
    if report.is_ready() {
        out.push_str("ready   yes\n");
    } else {
        let reasons: Vec<String> = report.ready["reasons"]
            .as_array()
            .map(|r| r.iter().map(text).collect())
            .unwrap_or_default();
        let _ = writeln!(out, "ready   NO: {}", reasons.join("; "));
    }
    out
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_line_per_component_and_why_not_ready() {
        let report = Report {
            status: serde_json::json!({
                "source": {"connected": true, "received_lsn": "0/10", "logged_lsn": "0/10",
                           "confirmed_lsn": "0/10", "slot_retained_bytes": 3_145_728,
                           "snapshot": {"state": "running", "rows": 1500, "seconds": 2.0,
                                        "rows_per_second": 750,
                                        "tables": {"public.t": {"rows": 1500, "estimated": 4000}}}},
                "log": {"bytes": 2048, "durable_position": 7, "durable_lsn": "0/10"},
                "sinks": {"mirror": {"applying": false, "last_error": "connection refused",
                                     "applied_position": 5, "lag_bytes": 0, "lag_seconds": 1.5,
                                     "batches": 2, "dead_letters": 0}}
            }),
            ready: serde_json::json!({"ready": false, "reasons": ["sink \"mirror\" is not applying"]}),
        };
        let text = render(&report);
        assert!(text.contains("source  connected · received 0/10"), "{text}");
        assert!(text.contains("slot keeps 3.0 MiB"), "{text}");
        assert!(
            text.contains("snapshot running · 1500 rows in 2 s (750 rows/s) · public.t 1500/~4000"),
            "{text}"
        );
        assert!(
            text.contains("log     2.0 KiB on disk · durable position 7 (0/10)"),
            "{text}"
        );
        assert!(
            text.contains("sink    mirror: NOT APPLYING: connection refused · position 5"),
            "{text}"
        );
        assert!(
            text.contains("ready   NO: sink \"mirror\" is not applying"),
            "{text}"
        );
    }
}
