//! Capture of a MariaDB binlog backlog into the offset log, against `mariadb-binlog` (the
//! MariaDB client's binlog reader) decoding the same binlog range in the same run (issue 22).
//!
//!   cargo bench --bench binlog_capture                              # ~200,000 row changes
//!   TIDEMARK_BENCH_ROWS=1000000 cargo bench --bench binlog_capture  # ~1,000,000 row changes
//!   TIDEMARK_BENCH_REPEAT=5 cargo bench --bench binlog_capture      # 5 rounds instead of 3
//!
//! One throwaway MariaDB server (the test harness's: ROW binlog, FULL row images and
//! metadata), one database with an `orders` table of mixed column types (BIGINT, INT
//! UNSIGNED, ENUM, DECIMAL, DOUBLE, DATETIME(6), DATE, VARCHAR). An agent (`snapshot =
//! "never"`) is started once before the workload and stopped as soon as it streams: its log
//! then holds only its starting point, the binlog position before the workload, and a copy of
//! that log starts every round.
//! The workload (seeded, the same every run: multi-row inserts, updates of live keys,
//! deletes, in transactions of one to three statements) then runs while nothing reads the
//! binlog; `SHOW MASTER STATUS` before and after give the range. Each round then measures,
//! in alternating order:
//!
//! - reference: `mariadb-binlog --read-from-remote-server` over TCP (the replication protocol
//!   a replica uses, as the agent does), decoding every row event of the range
//!   (`--base64-output=DECODE-ROWS --verbose`) to /dev/null, from its start until it exits.
//!   Once before the rounds its output is read instead, and its `### INSERT` / `### UPDATE` /
//!   `### DELETE` lines must count the workload's inserts, updates and deletes: the rows were
//!   decoded, not passed over;
//! - tidemark: the release agent started on a copy of the template log (so it resumes at the
//!   range's start), its sink a PostgreSQL target on a port nothing listens on (the sink
//!   never reads the log, so capture has the machine), from its start until its `/status`
//!   says the log is durable up to the range's end (`log.durable_lsn`); its
//!   `tidemark_events_captured_total` must then equal the workload's changes.
//!
//! rows/s is row changes in the range ÷ seconds; medians, minima and maxima over the rounds
//! and the ratio of the medians are printed. Nothing is asserted about time.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::{eventually, free_port, http_get, AgentSetup};
use common::mariadb::MariaDb;
use rand::rngs::StdRng;
use rand::Rng;

const TABLE: &str = "orders";
/// The account `mariadb-binlog` reads the binlog with over TCP, as the agent does with its
/// own (the harness's root account is reachable over the Unix socket only).
const READER_USER: &str = "binlog_reader";
const READER_PASSWORD: &str = "binlog_reader";
const TIMEOUT: Duration = Duration::from_secs(3600);
const POLL: Duration = Duration::from_millis(20);

/// The bench's table: one column of each kind the MySQL source decodes differently.
fn table_ddl() -> String {
    let statuses: Vec<String> = std::iter::once("new")
        .chain(support::STATUSES.iter().copied())
        .map(|s| format!("'{s}'"))
        .collect();
    format!(
        "CREATE TABLE {TABLE} (id BIGINT PRIMARY KEY, customer INT UNSIGNED NOT NULL, \
         status ENUM({}) NOT NULL, amount DECIMAL(12,2) NOT NULL, weight DOUBLE, \
         placed DATETIME(6) NOT NULL, due DATE, note VARCHAR(100))",
        statuses.join(",")
    )
}

/// `'2026-MM-DD HH:MM:SS.ffffff'`.
fn datetime_literal(rng: &mut StdRng) -> String {
    format!(
        "'2026-{:02}-{:02} {:02}:{:02}:{:02}.{:06}'",
        rng.gen_range(1..=12),
        rng.gen_range(1..=28),
        rng.gen_range(0..24),
        rng.gen_range(0..60),
        rng.gen_range(0..60),
        rng.gen_range(0..1_000_000)
    )
}

/// The `orders` table's columns beyond `id`, `status` and `note`, as the workload fills
/// them. Every update raises `amount`, so each updated row differs and the server logs it
/// (MariaDB logs no row image for a row an UPDATE leaves as it was).
struct Orders;

impl support::OrderColumns for Orders {
    fn row(&self, rng: &mut StdRng, id: i64) -> String {
        let weight = if rng.gen_ratio(1, 10) {
            "NULL".to_string()
        } else {
            format!("{:.3}", rng.gen_range(0.01..80.0))
        };
        let due = if rng.gen_ratio(1, 4) {
            "NULL".to_string()
        } else {
            format!(
                "'2027-{:02}-{:02}'",
                rng.gen_range(1..=12),
                rng.gen_range(1..=28)
            )
        };
        let placed = datetime_literal(rng);
        let note = support::text_literal(rng);
        format!(
            "({id},{},'new',{}.{:02},{weight},{placed},{due},{note})",
            rng.gen_range(1..4_000_000_000u32),
            rng.gen_range(1..5_000),
            rng.gen_range(0..100)
        )
    }

    fn update(&self, rng: &mut StdRng) -> String {
        format!(
            "amount = amount + {}.{:02}, placed = {}",
            rng.gen_range(1..20),
            rng.gen_range(0..100),
            datetime_literal(rng)
        )
    }
}

/// A position in the server's binlog, as `SHOW MASTER STATUS` gives it.
#[derive(Debug, Clone, PartialEq)]
struct BinlogPosition {
    file: String,
    offset: u64,
}

impl BinlogPosition {
    fn now(my: &MariaDb) -> BinlogPosition {
        let status = my.query("", "SHOW MASTER STATUS");
        let mut fields = status.split('\t');
        let file = fields.next().unwrap_or_default().to_string();
        let offset = fields
            .next()
            .and_then(|o| o.parse().ok())
            .unwrap_or_else(|| panic!("SHOW MASTER STATUS gave {status:?}: is the binlog on?"));
        BinlogPosition { file, offset }
    }

    /// The agent's position of this binlog position (its `Position::binlog`: the file's
    /// number in the high 24 bits, the offset in the low 40), for comparing with what
    /// `/status` shows.
    fn agent_position(&self) -> u64 {
        let number: u64 = self
            .file
            .rsplit('.')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("binlog file name {:?} has no number", self.file));
        (number << 40) | self.offset
    }
}

/// `16/B374D848` (how the agent shows positions) as a number.
fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

/// The JSON body of an HTTP response from the agent.
fn agent_json(port: u16, path: &str) -> Option<serde_json::Value> {
    let response = http_get(port, path)?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// Where the agent's log is durable up to, from its `/status`.
fn durable_position(port: u16) -> Option<u64> {
    let status = agent_json(port, "/status")?;
    parse_lsn(status["log"]["durable_lsn"].as_str()?)
}

/// The agent's `tidemark_events_captured_total` for `table`, from its `/metrics`.
fn captured(port: u16, table: &str) -> Option<u64> {
    let metrics = http_get(port, "/metrics")?;
    let prefix = format!("tidemark_events_captured_total{{table=\"{table}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|count| count.trim().parse().ok())
}

/// The MariaDB client's binlog reader (MySQL's name as a fallback), where the harness finds
/// the server's other programs.
fn binlog_program() -> PathBuf {
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path_dirs)
        .chain(["/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .collect();
    ["mariadb-binlog", "mysqlbinlog"]
        .iter()
        .find_map(|name| dirs.iter().map(|dir| dir.join(name)).find(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!(
                "mariadb-binlog (or mysqlbinlog) not found on PATH: it is the reference. \
                 Install it: `apt-get install -y mariadb-client` on Debian/Ubuntu"
            )
        })
}

/// `mariadb-binlog` reading `from`..`to` from the server over TCP and decoding every row.
fn mariadb_binlog(my: &MariaDb, from: &BinlogPosition, to: &BinlogPosition) -> Command {
    let mut cmd = Command::new(binlog_program());
    cmd.args([
        "--no-defaults",
        "--read-from-remote-server",
        "--host=127.0.0.1",
    ])
    .arg(format!("--port={}", my.port()))
    .arg(format!("--user={READER_USER}"))
    .arg(format!("--password={READER_PASSWORD}"))
    .args(["--base64-output=DECODE-ROWS", "--verbose"])
    .arg(format!("--start-position={}", from.offset))
    .arg(format!("--stop-position={}", to.offset))
    .arg(&from.file)
    .stdin(Stdio::null());
    cmd
}

/// Runs the reference once with its output read: the (inserts, updates, deletes) of
/// `db`.`TABLE` it decoded.
fn reference_row_counts(
    my: &MariaDb,
    db: &str,
    from: &BinlogPosition,
    to: &BinlogPosition,
) -> [usize; 3] {
    let prefixes = ["### INSERT INTO", "### UPDATE", "### DELETE FROM"]
        .map(|statement| format!("{statement} `{db}`.`{TABLE}`").into_bytes());
    let mut child = mariadb_binlog(my, from, to)
        .stdout(Stdio::piped())
        .spawn()
        .expect("running mariadb-binlog");
    let mut counts = [0; 3];
    let stdout = child.stdout.take().expect("mariadb-binlog's stdout");
    for line in BufReader::new(stdout).split(b'\n') {
        let line = line.expect("reading mariadb-binlog's output");
        for (count, prefix) in counts.iter_mut().zip(&prefixes) {
            if line.starts_with(prefix) {
                *count += 1;
            }
        }
    }
    let status = child.wait().expect("waiting for mariadb-binlog");
    assert!(status.success(), "mariadb-binlog failed: {status}");
    counts
}

/// The agent's `[source]` and `[[sink]]`: the MySQL source on the bench's table from the
/// position its log holds, and a sink that never reaches its target, so that it reads nothing
/// from the log while the capture is measured.
fn agent_setup(my: &MariaDb, db: &str) -> AgentSetup {
    AgentSetup::with_source(
        &format!(
            "type = \"mysql\"\nurl = \"{}\"\ntables = [\"{db}.{TABLE}\"]\nsnapshot = \"never\"\n",
            my.url(db)
        ),
        &format!(
            "[[sink]]\nname = \"nowhere\"\ntype = \"postgres\"\n\
             url = \"postgres://postgres@127.0.0.1:{}/nowhere\"\nschema = \"replica\"\n",
            free_port()
        ),
    )
}

/// Polls until `position` answers at least `target`; the time since `started`.
fn wait_position(position: impl Fn() -> Option<u64>, target: u64, started: Instant) -> Duration {
    loop {
        if position().is_some_and(|p| p >= target) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "tidemark capture: the log not durable up to the range's end within {TIMEOUT:?}"
        );
        std::thread::sleep(POLL);
    }
}

fn main() {
    if !support::is_bench_run() {
        return;
    }
    let target = support::setting("TIDEMARK_BENCH_ROWS", 200_000).max(1);
    let rounds = support::setting("TIDEMARK_BENCH_REPEAT", 3).max(1);
    let w = support::OrderWorkload::generate(0x6269_6e6c, TABLE, target, &Orders);
    let my = MariaDb::start();
    let version = my.query("", "SELECT VERSION()");
    let db = my.fresh_database("shop");
    my.exec(&db, &table_ddl());
    my.exec(
        "",
        &format!(
            "CREATE USER '{READER_USER}'@'%' IDENTIFIED BY '{READER_PASSWORD}'; \
             GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{READER_USER}'@'%';"
        ),
    );

    // The template log: the agent's starting point, the position before the workload.
    let template = agent_setup(&my, &db);
    let mut agent = template.start();
    agent.wait_log("streaming the binlog", Duration::from_secs(60));
    let start = BinlogPosition::now(&my);
    let logged_start = durable_position(template.health_port);
    assert_eq!(
        logged_start,
        Some(start.agent_position()),
        "the template log should start where the workload does, {start:?}"
    );
    let _ = agent.terminate();

    let recording = Instant::now();
    my.exec(&db, &w.sql);
    let recorded = recording.elapsed();
    let end = BinlogPosition::now(&my);
    assert_eq!(
        start.file, end.file,
        "the workload's binlog range should be in one file (raise max_binlog_size)"
    );
    let binlog_bytes = end.offset - start.offset;
    println!(
        "workload: {} row changes ({} inserts, {} updates, {} deletes) in {} transactions, \
         recorded in {:.1} s",
        w.changes(),
        w.inserts,
        w.updates,
        w.deletes,
        w.transactions,
        recorded.as_secs_f64()
    );
    println!(
        "  binlog {} {}..{} ({:.1} MiB); MariaDB {version}; {}",
        start.file,
        start.offset,
        end.offset,
        binlog_bytes as f64 / (1024.0 * 1024.0),
        binlog_program().display()
    );

    let decoded = reference_row_counts(&my, &db, &start, &end);
    assert_eq!(
        decoded,
        [w.inserts, w.updates, w.deletes],
        "mariadb-binlog's decoded rows (inserts, updates, deletes) should be the workload's"
    );
    println!(
        "  mariadb-binlog decoded {} inserted, {} updated and {} deleted rows: every change",
        decoded[0], decoded[1], decoded[2]
    );

    let captured_table = format!("{db}.{TABLE}");
    let mut reference = Vec::new();
    let mut tidemark = Vec::new();
    for round in 1..=rounds {
        let measure_reference = |reference: &mut Vec<f64>| {
            let started = Instant::now();
            let status = mariadb_binlog(&my, &start, &end)
                .stdout(Stdio::null())
                .status()
                .expect("running mariadb-binlog");
            assert!(status.success(), "mariadb-binlog failed: {status}");
            reference.push(started.elapsed().as_secs_f64());
        };
        let measure_tidemark = |tidemark: &mut Vec<f64>| {
            let setup = agent_setup(&my, &db);
            let copied = Command::new("cp")
                .arg("-a")
                .arg(template.data_dir())
                .arg(setup.data_dir())
                .status()
                .expect("cp");
            assert!(copied.success(), "copying the template log");
            let started = Instant::now();
            let agent = setup.start();
            let took = wait_position(
                || durable_position(setup.health_port),
                end.agent_position(),
                started,
            );
            let mut count = None;
            let all = eventually(Duration::from_secs(10), || {
                count = captured(setup.health_port, &captured_table);
                count == Some(w.changes() as u64)
            });
            assert!(
                all,
                "tidemark captured {count:?} changes of {captured_table}, the workload has {}",
                w.changes()
            );
            // The sink never reached its target, so the agent exits non-zero; its log is
            // flushed either way.
            let _ = agent.terminate();
            tidemark.push(took.as_secs_f64());
        };
        if round % 2 == 1 {
            measure_reference(&mut reference);
            measure_tidemark(&mut tidemark);
        } else {
            measure_tidemark(&mut tidemark);
            measure_reference(&mut reference);
        }
        let rate = |v: &[f64]| w.changes() as f64 / v.last().copied().unwrap_or(f64::NAN);
        println!(
            "round {round} ({} first): the reference {:.0} rows/s, tidemark {:.0}",
            if round % 2 == 1 {
                "mariadb-binlog"
            } else {
                "tidemark"
            },
            rate(&reference),
            rate(&tidemark)
        );
    }

    let changes = w.changes();
    println!();
    println!(
        "{:<44} {:>9} {:>10} {:>10} {:>10}",
        "capture of the binlog range", "median s", "rows/s", "min", "max"
    );
    let rows = [
        ("mariadb-binlog --verbose (binlog → /dev/null)", &reference),
        ("tidemark MySQL capture (binlog → log)", &tidemark),
    ];
    for (name, seconds) in rows {
        let (med, min, max) = support::rates(changes, seconds);
        println!(
            "{name:<44} {:>9.2} {med:>10.0} {min:>10.0} {max:>10.0}",
            support::median(seconds.clone())
        );
    }
    println!();
    println!(
        "tidemark MySQL capture / mariadb-binlog: {:.2}×",
        support::rates(changes, &tidemark).0 / support::rates(changes, &reference).0
    );
}
