//! Throwaway PostgreSQL clusters for integration tests and benches.
//!
//! A [`PgCluster`] owns one server that it initialised itself from the installed server
//! binaries: a temp dir holding the data directory, the server log and the Unix socket,
//! `wal_level=logical`, and a free TCP port on 127.0.0.1. The invariant it keeps: while the
//! value lives the server is ours alone, and once it is dropped nothing is left running and
//! nothing is left on disk, even when the test panicked (the drop stops the server in
//! immediate mode before the temp dir goes).
//!
//! PostgreSQL refuses to run as root, so as root `initdb` and `pg_ctl` run as the `postgres`
//! system user through `runuser`; clients (`psql`, tokio-postgres) connect over TCP with
//! trust authentication as the `postgres` superuser.
//!
//! [`PgCluster::start_tls`] starts a cluster that takes TCP connections over TLS only, with a
//! certificate the test made.
//!
//! `cargo nextest` runs every test in its own process, so a test starts its own cluster and
//! takes a database from [`PgCluster::fresh_database`]; tests that share a cluster never
//! share a database.

// Each test binary (and each bench) uses a different subset of the harness.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use tempfile::TempDir;

/// The database superuser created by `initdb -U`.
const SUPERUSER: &str = "postgres";
/// The operating-system user the server runs as when the tests run as root.
const SYSTEM_USER: &str = "postgres";
/// How often `start` picks another port when a parallel test took the one it chose.
const START_ATTEMPTS: usize = 5;
/// How many lines of `server.log` a failure message carries.
const LOG_TAIL_LINES: usize = 40;

/// Settings every cluster gets; `start_with` settings are appended after them and win.
const BASE_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("wal_level", "logical"),
    ("max_replication_slots", "20"),
    ("max_wal_senders", "20"),
    ("fsync", "off"),
    ("shared_buffers", "128MB"),
];

static DATABASE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Where [`PgCluster::start_tls`] puts the server's certificate and key, in the data directory.
const SERVER_CERT_FILE: &str = "server.crt";
const SERVER_KEY_FILE: &str = "server.key";

/// The certificate (PEM, with any intermediates after it) and private key (PEM) a TLS test
/// cluster presents; see [`PgCluster::start_tls`].
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A PostgreSQL server private to the test that started it.
pub struct PgCluster {
    bindir: PathBuf,
    /// `Some(runuser)` when we are root and the server programs must run as `postgres`.
    runuser: Option<PathBuf>,
    port: u16,
    dir: TempDir,
    /// Locales compiled for this cluster (see [`PgCluster::start_with_locale`]), given to the
    /// server programs as `LOCPATH`.
    locales: Option<PathBuf>,
}

impl PgCluster {
    /// Starts a cluster with the harness defaults (`wal_level=logical`, 20 slots and WAL
    /// senders, `fsync=off`).
    pub fn start() -> PgCluster {
        PgCluster::start_with(&[])
    }

    /// Starts a cluster with extra `postgresql.conf` settings, which override the defaults,
    /// e.g. `&[("wal_level", "replica")]`. The harness owns `port` and
    /// `unix_socket_directories`.
    pub fn start_with(settings: &[(&str, &str)]) -> PgCluster {
        PgCluster::start_configured(settings, None, None)
    }

    /// Starts a cluster whose server knows the locale `name` (e.g. `de_DE.UTF-8`: glibc's
    /// `de_DE` source with the `UTF-8` charmap) besides `C`, so that `settings` or a database
    /// may use it. The locale is compiled with `localedef` into the cluster's temp dir and
    /// found through `LOCPATH`: nothing is installed on the machine.
    pub fn start_with_locale(name: &str, settings: &[(&str, &str)]) -> PgCluster {
        PgCluster::start_configured(settings, None, Some(name))
    }

    /// Starts a cluster that takes TCP connections over TLS only: `ssl = on` with `tls`'s
    /// certificate and key, and a pg_hba.conf whose only TCP entries are `hostssl` for
    /// 127.0.0.1 (Unix-socket connections stay trust). psql, which `psql`,
    /// `create_database` and `fresh_database` use, negotiates TLS by itself; `connect`, which
    /// does not, is refused.
    pub fn start_tls(tls: &ServerTls) -> PgCluster {
        PgCluster::start_configured(&[], Some(tls), None)
    }

    fn start_configured(
        settings: &[(&str, &str)],
        tls: Option<&ServerTls>,
        locale: Option<&str>,
    ) -> PgCluster {
        let bindir = find_bindir();
        let runuser = if effective_uid() == 0 {
            Some(find_runuser())
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("tidemark-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temp dir for the test cluster: {e}"));
        // tempfile creates the dir with mode 0700; the server user must be able to reach
        // the socket and the log in it.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("making {} traversable: {e}", dir.path().display()));

        let mut cluster = PgCluster {
            bindir,
            runuser,
            port: 0,
            dir,
            locales: None,
        };
        if let Some(name) = locale {
            cluster.locales = Some(compile_locale(cluster.dir.path(), name));
        }
        if cluster.runuser.is_some() {
            cluster.hand_dir_to_system_user();
        }
        cluster.initdb();
        if let Some(tls) = tls {
            cluster.install_tls(tls);
        }
        let mut conf: Vec<(&str, String)> = BASE_SETTINGS
            .iter()
            .map(|(key, value)| (*key, (*value).to_string()))
            .collect();
        conf.push((
            "unix_socket_directories",
            cluster.socket_dir().display().to_string(),
        ));
        if tls.is_some() {
            conf.extend([
                ("ssl", "on".to_string()),
                ("ssl_cert_file", SERVER_CERT_FILE.to_string()),
                ("ssl_key_file", SERVER_KEY_FILE.to_string()),
            ]);
        }
        conf.extend(
            settings
                .iter()
                .map(|(key, value)| (*key, (*value).to_string())),
        );
        cluster.append_conf(&conf);
        cluster.start_on_free_port();
        cluster
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's Unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory of the server binaries in use (`initdb`, `pg_ctl`, `psql`, ...).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            percent_encode(SUPERUSER),
            self.port,
            percent_encode(db)
        )
    }

    /// `postgres://user:password@127.0.0.1:PORT/db`, with user, password and database
    /// percent-encoded so any characters survive.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            percent_encode(user),
            percent_encode(password),
            self.port,
            percent_encode(db)
        )
    }

    /// Connects as the superuser to `db`; the connection task is spawned on the current
    /// tokio runtime. Panics with the server log's tail when the connection fails.
    pub async fn connect(&self, db: &str) -> tokio_postgres::Client {
        self.connect_url(&self.url(db)).await
    }

    /// Holds `LOCK TABLE … IN SHARE MODE` on `tables` of `db` in an open transaction until
    /// [`TableLocks::release`]: a sink writing them waits, without failing.
    pub fn lock_tables(&self, db: &str, tables: &[&str]) -> TableLocks {
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        let client = runtime.block_on(self.connect(db));
        let locks: Vec<String> = tables
            .iter()
            .map(|t| format!("LOCK TABLE {t} IN SHARE MODE"))
            .collect();
        runtime
            .block_on(client.batch_execute(&format!("BEGIN; {}", locks.join("; "))))
            .unwrap_or_else(|e| panic!("locking {tables:?}: {e}"));
        TableLocks { runtime, client }
    }

    /// Connects to `db` as `user` with `password`.
    pub async fn connect_as(&self, user: &str, password: &str, db: &str) -> tokio_postgres::Client {
        self.connect_url(&self.url_as(user, password, db)).await
    }

    async fn connect_url(&self, url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!("connecting to {url}: {e}\n{}", self.log_tail_for_message())
            });
        let url = url.to_string();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("test connection to {url} ended: {e}");
            }
        });
        client
    }

    /// Runs `sql` (any number of statements) with the cluster's
    /// `psql -X -qAt -v ON_ERROR_STOP=1` as the superuser against `db` and returns its
    /// output without the final newline: rows on lines, columns separated by `|`. Panics
    /// with psql's stderr when a statement fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.run_psql(db, sql).unwrap_or_else(|error| {
            panic!("psql against database {db:?} failed: {error}\n--- sql ---\n{sql}")
        })
    }

    /// [`PgCluster::psql`], None when a statement fails (e.g. the table is not there yet).
    pub fn try_psql(&self, db: &str, sql: &str) -> Option<String> {
        self.run_psql(db, sql).ok()
    }

    /// Sorted text dump of a table, for row-for-row comparison; empty when it cannot be read.
    pub fn dump(&self, db: &str, table: &str, columns: &str) -> String {
        self.try_psql(
            db,
            &format!("COPY (SELECT {columns} FROM {table} ORDER BY 1, 2) TO STDOUT"),
        )
        .unwrap_or_default()
    }

    /// psql's output, or its exit status and stderr.
    fn run_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(self.bindir.join("psql"));
        clear_pg_env(&mut cmd);
        cmd.current_dir(self.dir.path())
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", db, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.bindir.join("psql").display()));
        let mut stdin = child.stdin.take();
        // Write from another thread: psql may block on a full stdout pipe before it has
        // read all of a long script.
        let sql_owned = sql.to_string();
        let writer = std::thread::spawn(move || {
            if let Some(stdin) = stdin.as_mut() {
                // A write error means psql exited early; its stderr says why.
                let _ = stdin.write_all(sql_owned.as_bytes());
            }
        });
        let output = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for psql: {e}"));
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

    /// Creates database `name` (quoted, so any name works).
    pub fn create_database(&self, name: &str) {
        self.psql(
            "postgres",
            &format!(
                "CREATE DATABASE {}",
                postgres_protocol::escape::escape_identifier(name)
            ),
        );
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

    /// Restarts the server (fast shutdown, then start) on the same port; committed data
    /// survives and every open connection is closed.
    pub fn restart(&self) {
        let mut cmd = self.pg_ctl();
        cmd.arg("-l")
            .arg(self.log_path())
            .args(["-m", "fast", "restart"]);
        self.run_or_panic("pg_ctl restart", cmd);
    }

    /// Stops the server with a fast shutdown (clients are disconnected, a checkpoint is
    /// written). `start_again` brings it back on the same port.
    pub fn stop(&self) {
        let mut cmd = self.pg_ctl();
        cmd.args(["-m", "fast", "stop"]);
        self.run_or_panic("pg_ctl stop", cmd);
    }

    /// Stops the server in immediate mode, as a crash would: no shutdown checkpoint, so
    /// the next start runs crash recovery.
    pub fn stop_immediate(&self) {
        let mut cmd = self.pg_ctl();
        cmd.args(["-m", "immediate", "stop"]);
        self.run_or_panic("pg_ctl stop -m immediate", cmd);
    }

    /// Starts the server again after `stop`/`stop_immediate`, on the same port.
    pub fn start_again(&self) {
        if let Err(message) = self.pg_ctl_start() {
            panic!("{message}");
        }
    }

    /// The whole server log so far.
    pub fn server_log(&self) -> String {
        let bytes = fs::read(self.log_path())
            .unwrap_or_else(|e| panic!("reading server log {}: {e}", self.log_path().display()));
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
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

    fn hand_dir_to_system_user(&self) {
        let mut cmd = Command::new("chown");
        cmd.arg("-R")
            .arg(format!("{SYSTEM_USER}:"))
            .arg(self.dir.path());
        let output = cmd
            .output()
            .unwrap_or_else(|e| panic!("running chown: {e}"));
        if !output.status.success() {
            panic!(
                "tests run as root, so the test cluster runs as the `{SYSTEM_USER}` system user, \
                 but `chown -R {SYSTEM_USER}: {}` failed: {}\n\
                 Create the user: `useradd --system --user-group postgres` \
                 (installing the postgresql package does this).",
                self.dir.path().display(),
                String::from_utf8_lossy(&output.stderr).trim_end()
            );
        }
    }

    fn initdb(&self) {
        let mut cmd = self.server_command("initdb");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-U", SUPERUSER, "-A", "trust", "--no-sync"])
            .args(["-E", "UTF8", "--locale=C"]);
        let output = spawn_and_wait("initdb", &mut cmd);
        if !output.status.success() {
            let hint = if self.runuser.is_some() {
                format!(
                    "\n(as root, initdb runs as `{SYSTEM_USER}`, which must be able to reach {}; \
                     TMPDIR=/tmp usually is)",
                    self.dir.path().display()
                )
            } else {
                String::new()
            };
            panic!(
                "initdb failed ({}):\n{}{}{hint}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    /// Copies the certificate and key into the data directory, where the server reads them
    /// (the key must be the server user's and mode 0600, or the server refuses to start), and
    /// replaces pg_hba.conf with TLS-only TCP entries.
    fn install_tls(&self, tls: &ServerTls) {
        let data = self.data_dir();
        for (from, to, mode) in [
            (&tls.cert, SERVER_CERT_FILE, 0o644),
            (&tls.key, SERVER_KEY_FILE, 0o600),
        ] {
            let target = data.join(to);
            fs::copy(from, &target).unwrap_or_else(|e| {
                panic!("copying {} to {}: {e}", from.display(), target.display())
            });
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", target.display()));
            if self.runuser.is_some() {
                self.chown_to_system_user(&target);
            }
        }
        let hba = data.join("pg_hba.conf");
        fs::write(
            &hba,
            "# tidemark test harness: TCP over TLS only\n\
             local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostssl replication all 127.0.0.1/32 trust\n",
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", hba.display()));
    }

    fn chown_to_system_user(&self, path: &Path) {
        let output = Command::new("chown")
            .arg(format!("{SYSTEM_USER}:"))
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("running chown: {e}"));
        if !output.status.success() {
            panic!(
                "chown {SYSTEM_USER}: {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr).trim_end()
            );
        }
    }

    fn append_conf(&self, settings: &[(&str, String)]) {
        let path = self.data_dir().join("postgresql.conf");
        let mut text = String::from("\n# tidemark test harness\n");
        for (key, value) in settings {
            text.push_str(&format!("{key} = {}\n", conf_quote(value)));
        }
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .unwrap_or_else(|e| panic!("appending to {}: {e}", path.display()));
    }

    /// Picks a free port and starts the server on it. Another test process may bind the
    /// port between our probe and the server's bind; then the next attempt takes another.
    fn start_on_free_port(&mut self) {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            self.port = free_port();
            self.append_conf(&[("port", self.port.to_string())]);
            let log_before = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
            match self.pg_ctl_start() {
                Ok(()) => return,
                Err(message) => {
                    let log = self.server_log_since(log_before);
                    if !log.contains("could not bind") && !log.contains("Address already in use") {
                        panic!("{message}");
                    }
                    last_error = message;
                }
            }
        }
        panic!("no free port after {START_ATTEMPTS} attempts; last failure: {last_error}");
    }

    fn server_log_since(&self, offset: u64) -> String {
        let bytes = fs::read(self.log_path()).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let mut cmd = self.pg_ctl();
        cmd.arg("-l").arg(self.log_path()).arg("start");
        let output = spawn_and_wait("pg_ctl start", &mut cmd);
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "starting the test cluster on port {} failed ({}):\n{}{}\n{}",
                self.port,
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log_tail_for_message()
            ))
        }
    }

    /// `pg_ctl -D <data> -w -t 60`.
    fn pg_ctl(&self) -> Command {
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("-D").arg(self.data_dir()).args(["-w", "-t", "60"]);
        cmd
    }

    fn run_or_panic(&self, what: &str, mut cmd: Command) {
        let output = spawn_and_wait(what, &mut cmd);
        if !output.status.success() {
            panic!(
                "{what} failed ({}):\n{}{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log_tail_for_message()
            );
        }
    }

    /// A server program from the bindir, run as `postgres` when we are root, in the temp
    /// dir (the server user may not be able to enter our working directory).
    fn server_command(&self, program: &str) -> Command {
        let program = self.bindir.join(program);
        let mut cmd = match &self.runuser {
            Some(runuser) => {
                let mut cmd = Command::new(runuser);
                cmd.args(["-u", SYSTEM_USER, "--"]).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        clear_pg_env(&mut cmd);
        if let Some(locales) = &self.locales {
            cmd.env("LOCPATH", locales);
        }
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }
}

/// Compiles the locale `name` (`<source>.<charmap>`) into `<dir>/locales/<name>` with
/// `localedef`; returns `<dir>/locales`, a `LOCPATH` for it.
fn compile_locale(dir: &Path, name: &str) -> PathBuf {
    let (source, charmap) = name
        .split_once('.')
        .unwrap_or_else(|| panic!("locale {name:?} is not <source>.<charmap>"));
    let locales = dir.join("locales");
    fs::create_dir_all(&locales).unwrap_or_else(|e| panic!("creating {}: {e}", locales.display()));
    let output = Command::new("localedef")
        .args(["-i", source, "-f", charmap])
        .arg(locales.join(name))
        .output()
        .unwrap_or_else(|e| panic!("running localedef (it comes with libc-bin): {e}"));
    assert!(
        output.status.success(),
        "localedef -i {source} -f {charmap} failed ({}): {}\n\
         The locale sources come with the `locales` package: `apt-get install locales`.",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
    locales
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let pid_file = self.data_dir().join("postmaster.pid");
        if !pid_file.exists() {
            return;
        }
        let mut cmd = self.pg_ctl();
        cmd.args(["-m", "immediate", "stop"]);
        match cmd.output() {
            Ok(output) if output.status.success() => return,
            Ok(output) => eprintln!(
                "stopping the test cluster failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            ),
            Err(e) => eprintln!("running pg_ctl stop: {e}"),
        }
        // Last resort, so that removing the temp dir does not leave a server running.
        let pid = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.lines().next().map(str::trim).map(str::to_string))
            .filter(|pid| pid.parse::<u32>().is_ok());
        if let Some(pid) = pid {
            let _ = Command::new("kill").args(["-KILL", &pid]).output();
        }
    }
}

/// The server binaries: `pg_config --bindir` when it has `initdb`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian/Ubuntu keep one dir per major version).
fn find_bindir() -> PathBuf {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        .filter(|dir| !dir.as_os_str().is_empty());
    if let Some(dir) = &from_pg_config {
        if dir.join("initdb").is_file() {
            return dir.clone();
        }
    }
    if let Some(dir) = newest_debian_bindir() {
        return dir;
    }
    let pg_config_said = match from_pg_config {
        Some(dir) => format!(
            "`pg_config --bindir` is {} but has no initdb",
            dir.display()
        ),
        None => "`pg_config` is not on PATH".to_string(),
    };
    panic!(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: {pg_config_said}, and \
         no /usr/lib/postgresql/*/bin/initdb exists. The tests start their own throwaway \
         clusters from these binaries. Install them: `apt-get install -y postgresql` on \
         Debian/Ubuntu (the packaged cluster need not run), `dnf install postgresql-server` \
         on Fedora/RHEL, `brew install postgresql` on macOS; then make sure `pg_config` is on \
         PATH if they live elsewhere."
    );
}

fn newest_debian_bindir() -> Option<PathBuf> {
    fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

fn effective_uid() -> u32 {
    // /proc/self/status: "Uid:\t<real>\t<effective>\t<saved>\t<fs>".
    let from_proc = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                .and_then(|uid| uid.parse().ok())
        });
    if let Some(uid) = from_proc {
        return uid;
    }
    let output = Command::new("id")
        .arg("-u")
        .output()
        .unwrap_or_else(|e| panic!("finding our user id with `id -u`: {e}"));
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("parsing the output of `id -u`: {e}"))
}

fn find_runuser() -> PathBuf {
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_dirs)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join("runuser"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "tests run as root and PostgreSQL refuses to, so the test cluster must run as \
                 the `{SYSTEM_USER}` user via `runuser`, which is not installed (it comes with \
                 util-linux); install it or run the tests as an ordinary user"
            )
        })
}

/// Asks the kernel for a free port on 127.0.0.1; the listener closes on return.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("finding a free port on 127.0.0.1: {e}"))
}

fn spawn_and_wait(what: &str, cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {what} ({cmd:?}): {e}"))
}

/// Keeps the developer's PGHOST, PGDATA, PGOPTIONS, ... from steering our programs.
fn clear_pg_env(cmd: &mut Command) {
    let names: Vec<OsString> = std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| name.to_string_lossy().starts_with("PG"))
        .collect();
    for name in names {
        cmd.env_remove(name);
    }
}

/// A `postgresql.conf` string literal.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}
pub mod agent;
pub mod clickhouse;
pub mod mariadb;

/// Locks that [`PgCluster::lock_tables`] holds.
pub struct TableLocks {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl TableLocks {
    pub fn release(self) {
        self.runtime
            .block_on(self.client.batch_execute("COMMIT"))
            .expect("releasing the locks");
    }
}
pub mod workload;
