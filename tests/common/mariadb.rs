//! Throwaway MariaDB servers for integration tests, the MariaDB counterpart of
//! [`super::PgCluster`].
//!
//! A [`MariaDb`] owns one `mariadbd` that it initialised itself with `mariadb-install-db`: a
//! temp dir holding the data directory, the binary log, the server's tmpdir, the server log,
//! the pid file and the Unix socket, and a free TCP port on 127.0.0.1. The binary log is on,
//! in ROW format with FULL row images and FULL row metadata, which is what a binlog reader
//! needs. The invariant it keeps: while the value lives the server is ours alone, and once it
//! is dropped nothing is left running and nothing is left on disk, even when the test
//! panicked (the drop stops the server before the temp dir goes).
//!
//! mariadbd refuses to run as root, so as root `mariadb-install-db` and `mariadbd` run as the
//! `mysql` system user through `runuser`. The harness itself talks to the server with the
//! `mariadb` client as the passwordless `root` over the Unix socket; the agent under test
//! connects over TCP as `tidemark` (password `tidemark`, every privilege including
//! REPLICATION SLAVE and REPLICATION CLIENT), see [`MariaDb::url`]. That user is created
//! while the data directory is initialised, so the binary log starts empty of harness setup.
//!
//! Durability is traded for speed (`sync_binlog=0`, no doublewrite buffer), but not against
//! a crash of the server process: `innodb_flush_log_at_trx_commit=2` hands every commit to
//! the operating system, so after [`MariaDb::kill`] and [`MariaDb::start_again`] the tables
//! hold every transaction the binary log holds. (With `0`, the last second of commits can be
//! in the binary log but not in the tables.)

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rand::Rng;
use tempfile::TempDir;

use super::{effective_uid, free_port, percent_encode};

/// The operating-system user the server runs as when the tests run as root.
const SYSTEM_USER: &str = "mysql";
/// The account the agent under test connects as, over TCP.
const AGENT_USER: &str = "tidemark";
const AGENT_PASSWORD: &str = "tidemark";
/// How often `start` picks another port when a parallel test took the one it chose.
const START_ATTEMPTS: usize = 5;
/// How long a server may take to accept connections after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to shut down after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How many lines of `server.log` a failure message carries.
const LOG_TAIL_LINES: usize = 40;

/// Server options every server gets, after the harness-owned paths, port and server id;
/// `start_with` options are appended after them and win. Small memory settings, so that
/// many servers fit side by side (about 60 MB resident each): the buffer pool, the redo log
/// and the Aria page cache are a fraction of their defaults (see also [`STORAGE_OPTIONS`]),
/// and performance_schema is off.
const BASE_OPTIONS: &[(&str, &str)] = &[
    ("bind-address", "127.0.0.1"),
    ("binlog-format", "ROW"),
    ("binlog-row-image", "FULL"),
    ("binlog-row-metadata", "FULL"),
    ("innodb-flush-log-at-trx-commit", "2"),
    ("sync-binlog", "0"),
    ("skip-name-resolve", ""),
    // What Debian's packaged /etc/mysql configuration sets; the compiled-in default is
    // latin1, which `--no-defaults` would leave us with.
    ("character-set-server", "utf8mb4"),
    ("collation-server", "utf8mb4_general_ci"),
    // TIMESTAMP values read the same on every machine.
    ("default-time-zone", "+00:00"),
    ("performance-schema", "OFF"),
    ("innodb-log-buffer-size", "4M"),
    ("aria-pagecache-buffer-size", "8M"),
    ("key-buffer-size", "1M"),
    ("max-connections", "100"),
];

/// Options given to `mariadb-install-db` as well as to the server: the redo log is created
/// at its final size (a third of the default; the disk holds one per server), and pages are
/// written without the doublewrite buffer, which only guards against torn pages when the
/// machine, not the server, crashes.
const STORAGE_OPTIONS: &[(&str, &str)] = &[
    ("innodb-buffer-pool-size", "32M"),
    ("innodb-log-file-size", "32M"),
    ("innodb-doublewrite", "0"),
];

static DATABASE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A MariaDB server private to the test that started it.
pub struct MariaDb {
    programs: Programs,
    /// `Some(runuser)` when we are root and the server programs must run as `mysql`.
    runuser: Option<PathBuf>,
    port: u16,
    server_id: u32,
    /// The `start_with` options, appended to the harness's on every start.
    options: Vec<(String, String)>,
    /// The running server (with `runuser`, the `runuser` process whose child it is); `None`
    /// after `stop`/`kill`.
    server: Mutex<Option<Child>>,
    dir: TempDir,
}

/// The installed MariaDB programs the harness runs.
struct Programs {
    server: PathBuf,
    install_db: PathBuf,
    client: PathBuf,
}

/// Why a start failed: another process holds the port (try another), or anything else.
enum StartFailure {
    PortTaken(String),
    Other(String),
}

impl MariaDb {
    /// Starts a server with the harness defaults: ROW binary log with full row images and
    /// metadata, a random server id, small buffers.
    pub fn start() -> MariaDb {
        MariaDb::start_with(&[])
    }

    /// Starts a server with extra options, which override the defaults, e.g.
    /// `&[("binlog_row_image", "MINIMAL")]` for `--binlog_row_image=MINIMAL`; an empty
    /// value gives the bare flag (`("skip-log-bin", "")`). The options are also given to
    /// `mariadb-install-db`, so those fixed when the data directory is created
    /// (`innodb_page_size`, `lower_case_table_names`) work. The harness owns `datadir`,
    /// `tmpdir`, `port`, `socket`, `pid-file` and `log-error`.
    pub fn start_with(options: &[(&str, &str)]) -> MariaDb {
        let programs = find_programs();
        let runuser = if effective_uid() == 0 {
            let runuser = find_runuser();
            ensure_system_user();
            Some(runuser)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("tidemark-mariadb-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temp dir for the test server: {e}"));
        // tempfile creates the dir with mode 0700; the server user must be able to reach
        // the data directory, the socket and the log in it.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("making {} traversable: {e}", dir.path().display()));

        // Built before anything is spawned, so that a panic below drops it and the drop
        // stops whatever did start.
        let mut server = MariaDb {
            programs,
            runuser,
            port: 0,
            server_id: rand::thread_rng().gen_range(1..1u32 << 31),
            options: options
                .iter()
                .map(|(key, value)| ((*key).to_string(), (*value).to_string()))
                .collect(),
            server: Mutex::new(None),
            dir,
        };
        server.prepare_dir();
        server.install_db();
        server.start_on_free_port();
        server
    }

    /// The `[source]` body of an agent that captures `tables` (TOML strings, e.g.
    /// `"\"shop.items\""`) of database `db`.
    pub fn source_toml(&self, db: &str, tables: &str) -> String {
        format!(
            "type = \"mysql\"\nurl = \"{}\"\ntables = [{tables}]\nconnect_timeout = \"20s\"\n\
             snapshot_parallelism = 2\n",
            self.url(db)
        )
    }

    /// The TCP port the server listens on (127.0.0.1); the same after `start_again`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's `server_id`, random in 1..2^31, so that servers started together (and a
    /// replica the agent registers as) are told apart.
    pub fn server_id(&self) -> u32 {
        self.server_id
    }

    /// `mysql://tidemark:tidemark@127.0.0.1:PORT/db`: the agent's account, over TCP.
    pub fn url(&self, db: &str) -> String {
        self.url_as(AGENT_USER, AGENT_PASSWORD, db)
    }

    /// `mysql://user:password@127.0.0.1:PORT/db`, with user, password and database
    /// percent-encoded so any characters survive.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "mysql://{}:{}@127.0.0.1:{}/{}",
            percent_encode(user),
            percent_encode(password),
            self.port,
            percent_encode(db)
        )
    }

    /// The server's Unix socket, where the harness connects as root.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    /// The server's data directory.
    pub fn datadir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the binary log (`binlog.000001`, ... and `binlog.index`) and
    /// nothing else.
    pub fn binlog_dir(&self) -> PathBuf {
        self.dir.path().join("binlog")
    }

    /// The `mariadb` (or `mysql`) client in use, for tests that run it with arguments of
    /// their own, e.g. over TCP as `tidemark`.
    pub fn client_program(&self) -> &Path {
        &self.programs.client
    }

    /// Runs `sql` (any number of statements, `DELIMITER` works) with the `mariadb` client
    /// as root over the socket against `db` (`""`: no default database). Panics with the
    /// client's stderr when a statement fails; the statements after it do not run.
    pub fn exec(&self, db: &str, sql: &str) {
        if let Err(error) = self.try_exec(db, sql) {
            panic!("mariadb against database {db:?} failed: {error}\n--- sql ---\n{sql}");
        }
    }

    /// [`MariaDb::exec`], with the client's exit status and stderr as the error.
    pub fn try_exec(&self, db: &str, sql: &str) -> Result<(), String> {
        self.run_client(db, sql).map(drop)
    }

    /// Runs `sql` like [`MariaDb::exec`] and returns its output without the final newline:
    /// rows on lines, columns separated by tabs, no column names (`--batch
    /// --skip-column-names`). NULL reads `NULL`; tab, newline, backslash and NUL in values
    /// read `\t`, `\n`, `\\`, `\0`.
    pub fn query(&self, db: &str, sql: &str) -> String {
        self.run_client(db, sql).unwrap_or_else(|error| {
            panic!("mariadb against database {db:?} failed: {error}\n--- sql ---\n{sql}")
        })
    }

    /// Sorted text dump of `table` for row-for-row comparison with
    /// [`super::PgCluster::dump`] of the same rows: `columns` is a comma-separated list of
    /// column names or expressions (no aliases), output as PostgreSQL's COPY text format
    /// writes them (tab-separated, `\N` for NULL, `\\`, `\t`, `\n`, `\r` escaped, no final
    /// newline), rows in the order PostgreSQL's `ORDER BY` gives under the C collation the
    /// test clusters use: numbers and dates by value, strings by their bytes, NULLs last.
    /// Values are MariaDB's text (a boolean is `0`/`1`, not `f`/`t`). Empty when the table
    /// cannot be read.
    pub fn dump(&self, db: &str, table: &str, columns: &str) -> String {
        let expressions = split_select_list(columns);
        if expressions.is_empty() {
            return String::new();
        }
        let select: Vec<String> = expressions
            .iter()
            .map(|e| format!("({e}) IS NULL, ({e})"))
            .collect();
        // Character strings sort by their bytes first (the server's collation is
        // case-insensitive), then everything by value.
        let order: Vec<String> = expressions
            .iter()
            .map(|e| {
                format!(
                    "({e}) IS NULL, \
                     CASE WHEN COLLATION({e}) <> 'binary' THEN CAST(({e}) AS BINARY) END, ({e})"
                )
            })
            .collect();
        let sql = format!(
            "SELECT {} FROM {table} ORDER BY {}",
            select.join(", "),
            order.join(", ")
        );
        let output = match self.run_client(db, &sql) {
            Ok(output) if !output.is_empty() => output,
            _ => return String::new(),
        };
        // Not `lines()`, which would take a carriage return ending a value for a line end.
        output
            .split('\n')
            .map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                fields
                    .chunks(2)
                    .map(|pair| match pair {
                        ["1", _] => "\\N".to_string(),
                        [_, value] => value.replace('\r', "\\r"),
                        _ => String::new(),
                    })
                    .collect::<Vec<String>>()
                    .join("\t")
            })
            .collect::<Vec<String>>()
            .join("\n")
    }

    /// Creates database `name` (quoted, so any name works).
    pub fn create_database(&self, name: &str) {
        self.exec("", &format!("CREATE DATABASE {}", quote_identifier(name)));
    }

    /// Creates a database no other test uses, named `<prefix>_<n>_<random>`, and returns
    /// its name.
    pub fn fresh_database(&self, prefix: &str) -> String {
        let prefix: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let name = format!(
            "{prefix}_{}_{:08x}",
            DATABASE_COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        self.create_database(&name);
        name
    }

    /// The whole server log so far (every start appends to it).
    pub fn server_log(&self) -> String {
        let bytes = fs::read(self.log_path())
            .unwrap_or_else(|e| panic!("reading server log {}: {e}", self.log_path().display()));
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Shuts the server down cleanly (SIGTERM, then waits; SIGKILL and a panic when it takes
    /// longer than a minute). `start_again` brings it back on the same port.
    pub fn stop(&self) {
        let mut running = self.running();
        let Some(child) = running.as_mut() else {
            panic!("stopping the test server: it is not running");
        };
        if let Err(message) = self.terminate(child) {
            *running = None;
            panic!("{message}\n{}", self.log_tail_for_message());
        }
        *running = None;
    }

    /// Kills the server with SIGKILL, as a crash would: the next start runs crash recovery.
    pub fn kill(&self) {
        let mut running = self.running();
        let Some(child) = running.as_mut() else {
            panic!("killing the test server: it is not running");
        };
        self.kill_now(child);
        *running = None;
    }

    /// Starts the server again after `stop`/`kill`, with the same data directory, options
    /// and port.
    pub fn start_again(&self) {
        if self.running().is_some() {
            panic!("starting the test server again: it is still running");
        }
        let outcome = self.spawn_and_wait();
        if let Err(StartFailure::PortTaken(message) | StartFailure::Other(message)) = outcome {
            panic!("{message}");
        }
    }

    fn running(&self) -> MutexGuard<'_, Option<Child>> {
        // A panic while the lock was held leaves the child as it was: still usable.
        self.server
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn pid_path(&self) -> PathBuf {
        self.dir.path().join("mysqld.pid")
    }

    /// The last lines of the server log, for failure messages; never panics.
    fn log_tail_for_message(&self) -> String {
        let log = fs::read(self.log_path())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        format!(
            "--- last lines of {} ---\n{tail}",
            self.log_path().display()
        )
    }

    fn server_log_since(&self, offset: u64) -> String {
        let bytes = fs::read(self.log_path()).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// Creates the binlog dir, the server's tmpdir, the server log and the script that
    /// creates the agent's account, and hands the temp dir to the server user when we are
    /// root.
    fn prepare_dir(&self) {
        for dir in [self.binlog_dir(), self.tmpdir()] {
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        // Created here, so that the server's stdout and stderr can go to it as well: errors
        // from before the server opens its log (an unknown option) end up in it too.
        fs::write(self.log_path(), "")
            .unwrap_or_else(|e| panic!("creating {}: {e}", self.log_path().display()));
        // The bootstrap server runs without grant tables; FLUSH PRIVILEGES loads them, so
        // that account statements work.
        let script = format!(
            "FLUSH PRIVILEGES;\n\
             CREATE USER '{AGENT_USER}'@'%' IDENTIFIED BY '{AGENT_PASSWORD}';\n\
             GRANT ALL PRIVILEGES ON *.* TO '{AGENT_USER}'@'%' WITH GRANT OPTION;\n"
        );
        let script_path = self.init_script_path();
        fs::write(&script_path, script)
            .unwrap_or_else(|e| panic!("writing {}: {e}", script_path.display()));
        if self.runuser.is_some() {
            self.hand_dir_to_system_user();
        }
    }

    /// The server's own `tmpdir`. Every mariadbd, the bootstrap one of `mariadb-install-db`
    /// included, deletes the `#sql*` files in its tmpdir when it starts: in a shared /tmp
    /// it would delete the temporary tables of servers that run in parallel tests.
    fn tmpdir(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    fn init_script_path(&self) -> PathBuf {
        self.dir.path().join("init.sql")
    }

    fn hand_dir_to_system_user(&self) {
        let output = Command::new("chown")
            .arg("-R")
            .arg(format!("{SYSTEM_USER}:"))
            .arg(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("running chown: {e}"));
        if !output.status.success() {
            panic!(
                "tests run as root, so the test server runs as the `{SYSTEM_USER}` system user, \
                 but `chown -R {SYSTEM_USER}: {}` failed: {}\n{}",
                self.dir.path().display(),
                String::from_utf8_lossy(&output.stderr).trim_end(),
                create_user_hint()
            );
        }
    }

    /// `mariadb-install-db`: system tables, passwordless root, no test database, and the
    /// agent's account; nothing written to a binary log.
    fn install_db(&self) {
        let mut cmd = self.server_command(&self.programs.install_db);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", self.datadir().display()))
            .arg(format!("--tmpdir={}", self.tmpdir().display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ])
            .arg(format!(
                "--extra-file={}",
                self.init_script_path().display()
            ))
            .args(option_args(STORAGE_OPTIONS.iter().copied()))
            .args(option_args(
                self.options.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ));
        let output = cmd
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.programs.install_db.display()));
        if !output.status.success() {
            let hint = if self.runuser.is_some() {
                format!(
                    "\n(as root, mariadb-install-db runs as `{SYSTEM_USER}`, which must be able \
                     to reach {}; TMPDIR=/tmp usually is)",
                    self.dir.path().display()
                )
            } else {
                String::new()
            };
            panic!(
                "{} failed ({}):\n{}{}{hint}",
                self.programs.install_db.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    /// Picks a free port and starts the server on it. Another test process may bind the
    /// port between our probe and the server's bind; then the next attempt takes another.
    fn start_on_free_port(&mut self) {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            self.port = free_port();
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(StartFailure::PortTaken(message)) => last_error = message,
                Err(StartFailure::Other(message)) => panic!("{message}"),
            }
        }
        panic!("no free port after {START_ATTEMPTS} attempts; last failure: {last_error}");
    }

    /// The server's command line after the program: `--no-defaults` (first, or it is
    /// ignored) so no my.cnf on the machine steers it, the harness's options, the caller's.
    fn server_args(&self) -> Vec<String> {
        let mut args = vec![
            "--no-defaults".to_string(),
            format!("--datadir={}", self.datadir().display()),
            format!("--port={}", self.port),
            format!("--socket={}", self.socket_path().display()),
            format!("--pid-file={}", self.pid_path().display()),
            format!("--log-error={}", self.log_path().display()),
            format!("--log-bin={}", self.binlog_dir().join("binlog").display()),
            format!("--server-id={}", self.server_id),
            format!("--tmpdir={}", self.tmpdir().display()),
        ];
        args.extend(option_args(
            BASE_OPTIONS
                .iter()
                .copied()
                .chain(STORAGE_OPTIONS.iter().copied()),
        ));
        args.extend(option_args(
            self.options.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        ));
        args
    }

    /// Spawns the server and waits until it takes connections on its socket. On failure
    /// the server is not running any more.
    fn spawn_and_wait(&self) -> Result<(), StartFailure> {
        let log_before = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
        let log = fs::OpenOptions::new()
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log_path().display()));
        let log_for_stderr = log
            .try_clone()
            .unwrap_or_else(|e| panic!("duplicating the handle of the server log: {e}"));
        let mut cmd = self.server_command(&self.programs.server);
        cmd.args(self.server_args())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_for_stderr));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.programs.server.display()));
        let mut running = self.running();
        let child = running.insert(child);

        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    *running = None;
                    return Err(self.start_failure(log_before, &format!("exited ({status})")));
                }
                Ok(None) => {}
                Err(e) => {
                    self.kill_now(child);
                    *running = None;
                    return Err(StartFailure::Other(format!("waiting for mariadbd: {e}")));
                }
            }
            if self.accepts_connections() {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                self.kill_now(child);
                *running = None;
                return Err(self.start_failure(
                    log_before,
                    &format!(
                        "took no connection on {} within {}s",
                        self.socket_path().display(),
                        READY_TIMEOUT.as_secs()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_failure(&self, log_before: u64, what: &str) -> StartFailure {
        let message = format!(
            "the test server on port {} {what}:\n{}",
            self.port,
            self.log_tail_for_message()
        );
        let log = self.server_log_since(log_before);
        if log.contains("Address already in use") || log.contains("Bind on TCP/IP port") {
            StartFailure::PortTaken(message)
        } else {
            StartFailure::Other(message)
        }
    }

    fn accepts_connections(&self) -> bool {
        self.client_command("")
            .args(["--connect-timeout=5", "--execute=SELECT 1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// SIGTERM, then waits for a clean shutdown; SIGKILL when it takes too long.
    fn terminate(&self, child: &mut Child) -> Result<(), String> {
        match self.server_pid(child) {
            Some(pid) => send_signal(pid, "TERM"),
            // As root, before mariadbd started or after it exited: runuser forwards SIGTERM
            // to its child.
            None => send_signal(child.id(), "TERM"),
        }
        if wait_for_exit(child, STOP_TIMEOUT).is_some() {
            return Ok(());
        }
        self.kill_now(child);
        Err(format!(
            "the test server on port {} did not shut down within {}s of SIGTERM; killed it",
            self.port,
            STOP_TIMEOUT.as_secs()
        ))
    }

    /// SIGKILL to mariadbd itself (with runuser, killing runuser would leave it running),
    /// then reaps the child.
    fn kill_now(&self, child: &mut Child) {
        if let Some(pid) = self.server_pid(child) {
            send_signal(pid, "KILL");
        }
        if wait_for_exit(child, Duration::from_secs(10)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// mariadbd's pid: the child itself, or as root the child of the `runuser` we spawned:
    /// its only child in /proc, else the pid file's pid if its parent is that `runuser`
    /// (after a kill the pid file still names the dead server).
    fn server_pid(&self, child: &Child) -> Option<u32> {
        let id = child.id();
        if self.runuser.is_none() {
            return Some(id);
        }
        let from_children = fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
            .ok()
            .and_then(|children| children.split_whitespace().next()?.parse().ok());
        from_children.or_else(|| {
            let pid: u32 = fs::read_to_string(self.pid_path())
                .ok()?
                .trim()
                .parse()
                .ok()?;
            (parent_pid(pid)? == id).then_some(pid)
        })
    }

    /// A server program, run as `mysql` when we are root, in the temp dir (the server user
    /// may not be able to enter our working directory).
    fn server_command(&self, program: &Path) -> Command {
        let mut cmd = match &self.runuser {
            Some(runuser) => {
                let mut cmd = Command::new(runuser);
                cmd.args(["-u", SYSTEM_USER, "--"]).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        clear_mysql_env(&mut cmd);
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    /// The client as root over the socket, batch mode, `db` as the default database.
    fn client_command(&self, db: &str) -> Command {
        let mut cmd = Command::new(&self.programs.client);
        cmd.arg("--no-defaults")
            .arg("--protocol=SOCKET")
            .arg(format!("--socket={}", self.socket_path().display()))
            .args([
                "--user=root",
                "--batch",
                "--skip-column-names",
                "--binary-mode",
                "--default-character-set=utf8mb4",
            ]);
        if !db.is_empty() {
            cmd.arg(format!("--database={db}"));
        }
        clear_mysql_env(&mut cmd);
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    /// The client's output, or its exit status and stderr.
    fn run_client(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut child = self
            .client_command(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.programs.client.display()));
        let mut stdin = child.stdin.take();
        // Write from another thread: the client may block on a full stdout pipe before it
        // has read all of a long script.
        let sql_owned = sql.to_string();
        let writer = thread::spawn(move || {
            if let Some(stdin) = stdin.as_mut() {
                // A write error means the client exited early; its stderr says why.
                let _ = stdin.write_all(sql_owned.as_bytes());
            }
        });
        let output = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for the mariadb client: {e}"));
        let _ = writer.join();
        if !output.status.success() {
            return Err(format!(
                "{}:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            ));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        Ok(stdout.strip_suffix('\n').unwrap_or(&stdout).to_string())
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let mut running = self.running();
        let Some(child) = running.as_mut() else {
            return;
        };
        if let Err(message) = self.terminate(child) {
            eprintln!("{message}");
        }
        *running = None;
    }
}

/// Waits up to `timeout` for `child` to exit; its status, or None when it is still running.
fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if started.elapsed() < timeout => thread::sleep(Duration::from_millis(20)),
            Ok(None) => return None,
            // Reaped already, or not our child any more: nothing to wait for.
            Err(_) => return child.wait().ok(),
        }
    }
}

/// The parent of process `pid`, from /proc/<pid>/stat: `pid (comm) state ppid ...`, where
/// comm may hold spaces and parentheses.
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// `kill -<signal> <pid>`; a process that is gone already is no error.
fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// `--key=value`, or `--key` for an empty value.
fn option_args<'a>(options: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<String> {
    options
        .map(|(key, value)| {
            if value.is_empty() {
                format!("--{key}")
            } else {
                format!("--{key}={value}")
            }
        })
        .collect()
}

/// A MariaDB identifier in backticks.
fn quote_identifier(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Splits a select list at its top-level commas: not inside parentheses or quotes.
fn split_select_list(list: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some(q) if c == '\\' && q != '`' => escaped = true,
            // A doubled quote closes and reopens: the net effect is the same.
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '\'' | '"' | '`' => quote = Some(c),
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    parts.push(list[start..i].trim());
                    start = i + 1;
                }
                _ => {}
            },
        }
    }
    parts.push(list[start..].trim());
    parts.retain(|part| !part.is_empty());
    parts
}

/// The server, install and client programs, each by its MariaDB name first, then its MySQL
/// name, on PATH or in /usr/sbin (Debian puts mariadbd there, outside an ordinary PATH).
fn find_programs() -> Programs {
    let find = |names: &[&str]| -> Option<PathBuf> {
        let path_dirs = std::env::var_os("PATH").unwrap_or_default();
        let dirs: Vec<PathBuf> = std::env::split_paths(&path_dirs)
            .chain(
                ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from),
            )
            .collect();
        names
            .iter()
            .find_map(|name| dirs.iter().map(|dir| dir.join(name)).find(|p| p.is_file()))
    };
    let server = find(&["mariadbd", "mysqld"]);
    let install_db = find(&["mariadb-install-db", "mysql_install_db"]);
    let client = find(&["mariadb", "mysql"]);
    match (server, install_db, client) {
        (Some(server), Some(install_db), Some(client)) => Programs {
            server,
            install_db,
            client,
        },
        (server, install_db, client) => {
            let missing: Vec<&str> = [
                (server.is_none(), "mariadbd (or mysqld)"),
                (
                    install_db.is_none(),
                    "mariadb-install-db (or mysql_install_db)",
                ),
                (client.is_none(), "mariadb (or mysql)"),
            ]
            .into_iter()
            .filter_map(|(missing, name)| missing.then_some(name))
            .collect();
            panic!(
                "MariaDB programs not found on PATH or in /usr/sbin: {}. The tests start their \
                 own throwaway servers from them. Install them: `apt-get install -y \
                 mariadb-server mariadb-client` on Debian/Ubuntu (the packaged service need \
                 not run), `dnf install mariadb-server` on Fedora/RHEL, `brew install mariadb` \
                 on macOS.",
                missing.join(", ")
            )
        }
    }
}

fn find_runuser() -> PathBuf {
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_dirs)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join("runuser"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "tests run as root and mariadbd refuses to, so the test server must run as the \
                 `{SYSTEM_USER}` user via `runuser`, which is not installed (it comes with \
                 util-linux); install it or run the tests as an ordinary user"
            )
        })
}

/// Panics with the command that creates the server user when it does not exist.
fn ensure_system_user() {
    let exists = Command::new("id")
        .args(["-u", SYSTEM_USER])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("looking up the `{SYSTEM_USER}` user with `id`: {e}"))
        .success();
    if !exists {
        panic!(
            "tests run as root and mariadbd refuses to, so the test server runs as the \
             `{SYSTEM_USER}` system user, which does not exist.\n{}",
            create_user_hint()
        );
    }
}

fn create_user_hint() -> String {
    format!(
        "Create the user: `useradd --system --user-group --home-dir /nonexistent \
         --no-create-home --shell /usr/sbin/nologin {SYSTEM_USER}` (installing the \
         mariadb-server package does this)."
    )
}

/// Keeps the developer's MYSQL_PWD, MYSQL_HOST, MYSQL_UNIX_PORT, ... from steering our
/// programs.
fn clear_mysql_env(cmd: &mut Command) {
    let names: Vec<OsString> = std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| {
            let name = name.to_string_lossy();
            name.starts_with("MYSQL") || name.starts_with("MARIADB")
        })
        .collect();
    for name in names {
        cmd.env_remove(name);
    }
}

/// Panics when a MySQL source's envelope appears more than once: the same binlog position,
/// row, op and images (a snapshot's rows share one position and differ by their images).
pub fn assert_no_envelope_twice(envelopes: &[serde_json::Value]) {
    let mut seen = std::collections::BTreeMap::new();
    for envelope in envelopes {
        let source = &envelope["source"];
        let key = (
            source["file"].as_str().unwrap_or_default().to_owned(),
            source["pos"].as_u64().unwrap_or_default(),
            source["row"].as_u64().unwrap_or_default(),
            envelope["op"].as_str().unwrap_or_default().to_owned(),
            source["snapshot"].as_str().unwrap_or_default().to_owned(),
            envelope["before"].to_string(),
            envelope["after"].to_string(),
        );
        *seen.entry(key).or_insert(0) += 1;
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "envelopes written twice: {doubled:?}");
}
