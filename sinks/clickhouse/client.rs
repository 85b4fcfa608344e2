//! ClickHouse's HTTP interface: statements in the body, an insert's rows in the body after
//! the statement in the `query` parameter, settings as parameters, the user and password in
//! ClickHouse's own headers (never in the URL, which error messages show). Every answer that
//! is not 200 is an exception: its code (the `X-ClickHouse-Exception-Code` header) tells
//! whether trying again can help.

use std::time::Duration;

use reqwest::{Client, StatusCode, Url};

use crate::config::ClickHouseSinkConfig;

/// How long one request may take, the server's part included; a batch insert of many rows
/// stays far below it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Exception codes for conditions that pass: overload, timeouts, a replica or Keeper away.
const PASSING_CODES: &[u32] = &[
    159, // TIMEOUT_EXCEEDED
    164, // READONLY (a replica in read-only mode)
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    241, // MEMORY_LIMIT_EXCEEDED
    242, // TABLE_IS_READ_ONLY
    252, // TOO_MANY_PARTS
    279, // ALL_CONNECTION_TRIES_FAILED
    425, // SYSTEM_ERROR
    999, // KEEPER_EXCEPTION
];

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClickHouseError {
    /// Not reached, or an answer that says to try again later.
    Passing(String),
    /// The server refused the statement: `code` is its exception code (0: none was given).
    Refused { code: u32, message: String },
}

impl ClickHouseError {
    pub fn message(&self) -> &str {
        match self {
            ClickHouseError::Passing(message) | ClickHouseError::Refused { message, .. } => message,
        }
    }
}

#[derive(Clone)]
pub struct ClickHouseClient {
    http: Client,
    address: Url,
    user: String,
    password: Option<String>,
}

impl ClickHouseClient {
    pub fn new(config: &ClickHouseSinkConfig) -> Result<ClickHouseClient, String> {
        let http = Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(ClickHouseClient {
            http,
            address: config.url.address.clone(),
            user: config.user.clone(),
            password: config.password.clone(),
        })
    }

    /// Runs one statement; returns its output (`FORMAT` in the statement says which).
    pub async fn query(&self, sql: &str) -> Result<Vec<u8>, ClickHouseError> {
        self.send(&[], sql.as_bytes().to_vec()).await
    }

    /// Runs `insert` (an `INSERT … FORMAT …` statement) with `rows` in that format as its
    /// data; `settings` apply to this statement alone.
    pub async fn insert(
        &self,
        insert: &str,
        settings: &[(&str, &str)],
        rows: Vec<u8>,
    ) -> Result<(), ClickHouseError> {
        let mut params = vec![("query", insert)];
        params.extend_from_slice(settings);
        self.send(&params, rows).await.map(drop)
    }

    async fn send(
        &self,
        params: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ClickHouseError> {
        let mut request = self
            .http
            .post(self.address.clone())
            .query(params)
            .header("X-ClickHouse-User", &self.user)
            .body(body);
        if let Some(password) = &self.password {
            request = request.header("X-ClickHouse-Key", password);
        }
        let response = request.send().await.map_err(|e| {
            ClickHouseError::Passing(format!("sending to {}: {}", self.shown(), without_url(e)))
        })?;
        let status = response.status();
        let code = response
            .headers()
            .get("X-ClickHouse-Exception-Code")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        let bytes = response.bytes().await.map_err(|e| {
            ClickHouseError::Passing(format!(
                "reading the answer of {}: {}",
                self.shown(),
                without_url(e)
            ))
        })?;
        if status == StatusCode::OK && code.is_none() {
            return Ok(bytes.to_vec());
        }
        let text = String::from_utf8_lossy(&bytes).trim().to_string();
        let message = format!("{} answered {status}: {text}", self.shown());
        Err(match code {
            Some(code) if PASSING_CODES.contains(&code) => ClickHouseError::Passing(message),
            Some(code) => ClickHouseError::Refused { code, message },
            // A proxy or load balancer in front of the server.
            None if status.is_server_error() => ClickHouseError::Passing(message),
            None => ClickHouseError::Refused { code: 0, message },
        })
    }

    fn shown(&self) -> &str {
        self.address.as_str().trim_end_matches('/')
    }
}

/// reqwest's message without the URL it names (the query parameter holds the statement).
fn without_url(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
