//! A throwaway ClickHouse engine behind ClickHouse's HTTP interface, for the ClickHouse sink's
//! tests: the counterpart of [`super::PgCluster`] for that sink.
//!
//! Debian's clickhouse-server package is from 2018, too old for what the sink uses
//! (ReplacingMergeTree's `is_deleted`); PyPI's `chdb-core` is a current engine (26.x) built as
//! a library. `clickhouse_http.py` (next to this file) serves ClickHouse's HTTP interface over
//! it, so every statement the sink sends runs in the real engine. The harness looks for a
//! Python that imports chdb: `$TIDEMARK_CHDB_PYTHON`, then `/opt/tidemark-chdb/bin/python`
//! (where `.ci/run` installs it), then `python3`.
//!
//! A [`ClickHouse`] owns one such server: a temp dir with the engine's data, a free port on
//! 127.0.0.1, user `default` with password [`PASSWORD`]. Dropping it kills the server and
//! removes the data. [`ClickHouse::query`] runs SQL over the same HTTP interface.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::percent_encode;

pub const PASSWORD: &str = "tidemark-test";
const INSTALLED_PYTHON: &str = "/opt/tidemark-chdb/bin/python";
const INSTALL_HINT: &str = "install the engine with: python3 -m venv /opt/tidemark-chdb && \
                            /opt/tidemark-chdb/bin/pip install --no-deps chdb-core==26.9.0 \
                            (or run .ci/run), or set TIDEMARK_CHDB_PYTHON to a Python that \
                            imports chdb";

pub struct ClickHouse {
    server: Child,
    port: u16,
    dir: TempDir,
}

impl ClickHouse {
    pub fn start() -> ClickHouse {
        let python = find_python();
        let dir = tempfile::Builder::new()
            .prefix("tidemark-clickhouse-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temp dir for the test engine: {e}"));
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/common/clickhouse_http.py");
        let mut server = Command::new(&python)
            .arg(&script)
            .arg(dir.path())
            .arg(PASSWORD)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} {}: {e}", python, script.display()));
        let mut first_line = String::new();
        let read = server
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut first_line));
        let port = match (read, first_line.trim().parse()) {
            (Some(Ok(_)), Ok(port)) => port,
            _ => {
                let _ = server.kill();
                let status = server.wait();
                panic!("the ClickHouse test server did not start ({status:?}); {INSTALL_HINT}");
            }
        };
        ClickHouse { server, port, dir }
    }

    /// `http://default:PASSWORD@127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!(
            "http://default:{}@127.0.0.1:{}",
            percent_encode(PASSWORD),
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `[[sink]]` of type clickhouse named `name` into `database`.
    pub fn sink_toml(&self, name: &str, database: &str, mode: &str) -> String {
        format!(
            "[[sink]]\nname = \"{name}\"\ntype = \"clickhouse\"\nurl = \"{}\"\n\
             database = \"{database}\"\nmode = \"{mode}\"\n",
            self.url()
        )
    }

    /// Runs one statement; its output as the engine writes it (TabSeparated unless the
    /// statement says `FORMAT`). Panics with the engine's message when it fails.
    pub fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .unwrap_or_else(|e| panic!("ClickHouse query failed: {e}\n--- sql ---\n{sql}"))
    }

    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))
            .map_err(|e| format!("connecting to 127.0.0.1:{}: {e}", self.port))?;
        let request = format!(
            "POST /?password={} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{sql}",
            percent_encode(PASSWORD),
            sql.len()
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| format!("sending the query: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .map_err(|e| format!("reading the answer: {e}"))?;
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("malformed answer: {response}"))?;
        if head.starts_with("HTTP/1.1 200") {
            Ok(body.to_string())
        } else {
            Err(body.trim_end().to_string())
        }
    }

    /// Rows of `SELECT columns FROM database.table FINAL` (which leaves out rows whose last
    /// version is deleted), sorted, one per line, values tab-separated as ClickHouse's
    /// TabSeparated writes them (`\N` for NULL).
    pub fn dump_final(&self, database: &str, table: &str, columns: &str) -> String {
        let out = self.query(&format!(
            "SELECT {columns} FROM {database}.{table} FINAL ORDER BY {columns}"
        ));
        out.trim_end_matches('\n').to_string()
    }

    /// The directory holding the engine's data.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("engine")
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A Python that imports chdb.
fn find_python() -> String {
    let mut candidates = Vec::new();
    if let Ok(python) = std::env::var("TIDEMARK_CHDB_PYTHON") {
        candidates.push(python);
    }
    candidates.push(INSTALLED_PYTHON.to_string());
    candidates.push("python3".to_string());
    for python in candidates {
        let imports = Command::new(&python)
            .args(["-c", "import chdb.session"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if imports {
            return python;
        }
    }
    panic!(
        "no Python with chdb (the ClickHouse engine the sink's tests use) found; {INSTALL_HINT}"
    );
}
