//! Runs the real `tidemark` binary against a test cluster: config files, start, health,
//! SIGKILL/SIGTERM, and reading what the JSONL sink wrote.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::{PgCluster, TableLocks};

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_tidemark")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A working directory with a config for one agent with a JSONL sink.
pub struct AgentSetup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub health_port: u16,
}

impl AgentSetup {
    /// `tables` is the TOML array body, e.g. `"public.a", "public.b"`.
    pub fn jsonl(source_url: &str, tables: &str) -> AgentSetup {
        AgentSetup::with_sinks(
            source_url,
            tables,
            "[[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n",
        )
    }

    /// An agent with the given `[[sink]]` tables (TOML text).
    pub fn with_sinks(source_url: &str, tables: &str, sinks: &str) -> AgentSetup {
        AgentSetup::with_source(
            &format!(
                "type = \"postgres\"\nurl = \"{source_url}\"\ntables = [{tables}]\n\
                 snapshot = \"never\"\nconnect_timeout = \"3s\"\n"
            ),
            sinks,
        )
    }

    /// An agent with the given `[source]` keys and `[[sink]]` tables (TOML text).
    pub fn with_source(source: &str, sinks: &str) -> AgentSetup {
        let dir = tempfile::tempdir().expect("temp dir");
        let health_port = free_port();
        let config = dir.path().join("tidemark.toml");
        let text = format!(
            "[agent]\nname = \"test\"\ndata_dir = \"data\"\nhealth_addr = \"127.0.0.1:{health_port}\"\n\n\
             [source]\n{source}\n{sinks}"
        );
        std::fs::write(&config, text).expect("write config");
        AgentSetup {
            dir,
            config,
            health_port,
        }
    }

    /// Takes an initial snapshot (the config's default is none) and keeps the offset log
    /// under `log_max_bytes` (a size, e.g. `"128KiB"`), so that a sink held back pauses the
    /// snapshot.
    pub fn with_initial_snapshot(self, log_max_bytes: &str) -> AgentSetup {
        let config = std::fs::read_to_string(&self.config)
            .expect("read config")
            .replace("snapshot = \"never\"", "snapshot = \"initial\"")
            .replace(
                "data_dir = \"data\"",
                &format!("data_dir = \"data\"\nlog_max_bytes = \"{log_max_bytes}\""),
            );
        std::fs::write(&self.config, config).expect("write config");
        self
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn events_dir(&self) -> PathBuf {
        self.dir.path().join("events")
    }

    /// The dead letters of sink `sink`, one JSON object each.
    pub fn dead_letters(&self, sink: &str) -> Vec<serde_json::Value> {
        let path = self.data_dir().join(format!("dead_letters/{sink}.jsonl"));
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .lines()
            .map(|l| serde_json::from_str(l).expect("a dead letter is JSON"))
            .collect()
    }

    /// The sink's one dead letter, whose reason names `reason` (a constraint, say).
    pub fn only_dead_letter(&self, sink: &str, reason: &str) -> serde_json::Value {
        let mut letters = self.dead_letters(sink);
        assert_eq!(letters.len(), 1, "{letters:?}");
        let letter = letters.remove(0);
        assert!(
            letter["reason"]
                .as_str()
                .is_some_and(|r| r.contains(reason)),
            "the dead letter's reason does not name {reason}: {letter}"
        );
        letter
    }

    pub fn start(&self) -> Agent {
        let log_path = self.dir.path().join("agent.log");
        let log_offset = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("agent log");
        let child = Command::new(binary())
            .args(["run", "-c"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tidemark");
        Agent {
            child,
            health_port: self.health_port,
            log_path,
            log_offset,
        }
    }

    /// Runs `tidemark <args> -c config` to completion.
    pub fn command(&self, subcommand: &str) -> Output {
        run_tidemark(subcommand, &self.config)
    }

    /// Every envelope the JSONL sink wrote, in file order.
    pub fn envelopes(&self) -> Vec<serde_json::Value> {
        read_envelopes(&self.events_dir())
    }
}

pub fn run_tidemark(subcommand: &str, config: &Path) -> Output {
    Command::new(binary())
        .arg(subcommand)
        .arg("-c")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tidemark")
}

pub fn read_envelopes(dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(_) => return Vec::new(),
    };
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read events file");
        // The agent may be writing: a last line without its newline is not complete yet.
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        for line in complete.lines().filter(|l| !l.is_empty()) {
            out.push(
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{}: bad JSON line {line:?}: {e}", file.display())),
            );
        }
    }
    out
}

pub struct Agent {
    child: Child,
    health_port: u16,
    log_path: PathBuf,
    log_offset: usize,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What this run of the agent logged (earlier runs share the file).
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        text.get(self.log_offset..).unwrap_or_default().to_string()
    }

    /// Waits until `/health` answers 200.
    pub fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tidemark exited with {status}:\n{}", self.log());
            }
            if http_get(self.health_port, "/health").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "tidemark /health did not answer within 30 s:\n{}",
            self.log()
        );
    }

    /// Waits until the agent's log says it streams (the slot exists and is read).
    pub fn wait_streaming(&mut self) {
        self.wait_log("streaming changes", Duration::from_secs(60));
    }

    /// Waits until this run of the agent logged `needle`; panics with the log when it exits
    /// or `timeout` passes first.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "tidemark exited with {status} before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "tidemark did not log {needle:?} within {timeout:?}:\n{}",
            self.log()
        );
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (within 30 s).
    pub fn terminate(mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!(
            "tidemark did not stop within 30 s of SIGTERM:\n{}",
            self.log()
        );
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for AgentSetup {
    /// A failed test keeps what the agent wrote (config, agent.log, data_dir, JSONL files).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let kept = std::env::temp_dir().join(format!(
            "tidemark-failed-{}",
            self.dir.path().file_name().unwrap().to_string_lossy()
        ));
        match Command::new("cp")
            .arg("-a")
            .arg(self.dir.path())
            .arg(&kept)
            .status()
        {
            Ok(status) if status.success() => {
                eprintln!("agent directory kept in {}", kept.display())
            }
            other => eprintln!("keeping the agent directory failed: {other:?}"),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A source database with a table `t` of 120,000 rows, a warehouse with its merge target
/// (`replica.t`) locked, and an agent setup that snapshots `t` with a 128 KiB log: the sink
/// is held back until the locks are released, so the snapshot fills the log and pauses.
/// Returns the source database, the warehouse, the locks and the setup.
pub fn held_back_snapshot(pg: &PgCluster) -> (String, String, TableLocks, AgentSetup) {
    let db = pg.fresh_database("src");
    let warehouse = pg.fresh_database("warehouse");
    pg.psql(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, repeat('x', 40) FROM generate_series(1, 120000) g",
    );
    pg.psql(
        &warehouse,
        "CREATE SCHEMA replica; CREATE TABLE replica.t (id int PRIMARY KEY, v text)",
    );
    let locks = pg.lock_tables(&warehouse, &["replica.t"]);
    let setup = AgentSetup::with_sinks(
        &pg.url(&db),
        "\"public.t\"",
        &mirror_sink(&pg.url(&warehouse)),
    )
    .with_initial_snapshot("128KiB");
    (db, warehouse, locks, setup)
}

/// A bare HTTP/1.1 GET; the response text, or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// A merge sink `mirror` into schema `replica` of the database at `url`.
pub fn mirror_sink(url: &str) -> String {
    format!(
        "[[sink]]\nname = \"mirror\"\ntype = \"postgres\"\nurl = \"{url}\"\nschema = \"replica\"\n"
    )
}

/// An SCD2 sink `history` into schema `history` of the database at `url`.
pub fn history_sink(url: &str) -> String {
    format!(
        "[[sink]]\nname = \"history\"\ntype = \"postgres\"\nurl = \"{url}\"\nschema = \"history\"\n\
         mode = \"scd2\"\n"
    )
}

/// A JSONL sink `events`, in the agent's directory.
pub const EVENTS_SINK: &str = "[[sink]]\nname = \"events\"\ntype = \"jsonl\"\npath = \"events\"\n";

/// A sink of each kind: `mirror` and `history` into the database at `url`, and `events`.
pub fn every_sink(url: &str) -> String {
    format!("{}\n{}\n{EVENTS_SINK}", mirror_sink(url), history_sink(url))
}

/// Runs `tidemark dlq <args> -c config`: exit code, stdout, stderr.
pub fn dlq(setup: &AgentSetup, args: &[&str]) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(binary())
        .arg("dlq")
        .args(args)
        .arg("-c")
        .arg(&setup.config)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Polls `condition` every 100 ms for up to `timeout`; true when it held.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    condition()
}
