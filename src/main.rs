//! The `tidemark` command line. Exit codes: 0 success, 1 runtime failure, 2 bad config or a
//! prerequisite that is not met.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tidemark::config::{Config, SinkKind};
use tidemark::sinks::clickhouse::ClickHouseSink;
use tidemark::sinks::postgres::PostgresSink;
use tidemark::sinks::Sink;
use tokio_util::sync::CancellationToken;

/// About a third of the agent's time went to glibc's malloc and free; with mimalloc the
/// snapshot and capture paths run faster and the peak RSS is lower (benches/README.md). Its
/// arenas are committed as they are used (`MI_DEFAULT_ARENA_EAGER_COMMIT=0`, set for its build
/// in `.cargo/config.toml`) and memory freed goes back to the system within
/// `ALLOCATOR_PURGE_DELAY_MS`, so the RSS follows what the agent holds (DESIGN, bounded memory).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (which the crate does not name).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// A sink frees and allocates a batch's worth of rows many times a second; held 100 ms, that
/// kept ~27 MiB of freed memory resident with a merge and an SCD2 sink (benches/README.md).
const ALLOCATOR_PURGE_DELAY_MS: std::os::raw::c_long = 10;

#[derive(Parser)]
#[command(name = "tidemark", version, about = "Change-data-capture agent")]
struct Cli {
    /// How log lines look: text (for people) or json (for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline until SIGTERM or SIGINT.
    Run {
        /// The TOML config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate the config and check every endpoint's prerequisites.
    Check {
        /// The TOML config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show where the running agent stands (its /status and /ready); exit 0 when ready.
    Status {
        /// The TOML config file of the running agent.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Inspect or remove dead letters (changes a sink's target refused).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// One line per dead letter: number, time, sink, table, action, reason.
    List {
        #[arg(short, long)]
        config: PathBuf,
        /// Only this sink's.
        #[arg(long)]
        sink: Option<String>,
    },
    /// One dead letter in full (JSON).
    Show {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        sink: String,
        /// Its number in `dlq list`.
        number: usize,
    },
    /// Apply dead letters again once the target takes them (the refusal's cause fixed);
    /// the agent must be stopped. A letter whose key a later change has reached is skipped:
    /// applying it would put an older state back.
    Retry {
        #[arg(short, long)]
        config: PathBuf,
        #[command(flatten)]
        letters: ChosenLetters,
    },
    /// Remove dead letters once handled; the agent must be stopped.
    Drop {
        #[arg(short, long)]
        config: PathBuf,
        #[command(flatten)]
        letters: ChosenLetters,
    },
}

/// The dead letters of one sink that `retry` and `drop` act on.
#[derive(clap::Args)]
struct ChosenLetters {
    #[arg(long)]
    sink: String,
    /// Their numbers in `dlq list`.
    #[arg(required_unless_present = "all")]
    numbers: Vec<usize>,
    /// Every dead letter of the sink.
    #[arg(long)]
    all: bool,
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_SETUP: u8 = 2;

fn main() -> ExitCode {
    // SAFETY: sets one of the allocator's options, which mimalloc allows at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) };
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tidemark: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(config).await,
            Command::Check { config } => check(config).await,
            Command::Status { config } => status(config).await,
            Command::Dlq { action } => dlq(action).await,
        }
    })
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_SETUP)
    })
}

async fn run(path: PathBuf) -> ExitCode {
    let config = match load(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    match tidemark::pipeline::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("tidemark: error: {e:#}");
            ExitCode::from(if e.is_prerequisite() {
                EXIT_SETUP
            } else {
                EXIT_RUNTIME
            })
        }
    }
}

async fn check(path: PathBuf) -> ExitCode {
    let config = match load(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let checks = tidemark::check::run(&config).await;
    for check in &checks {
        println!("{check}");
    }
    if checks.iter().all(|c| c.passed()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_SETUP)
    }
}

async fn status(path: PathBuf) -> ExitCode {
    let config = match load(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match tidemark::status::fetch(config.agent.health_addr).await {
        Ok(report) => {
            print!("{}", tidemark::status::render(&report));
            if report.is_ready() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_RUNTIME)
            }
        }
        Err(e) => {
            eprintln!("tidemark: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn dlq(action: DlqAction) -> ExitCode {
    let path = match &action {
        DlqAction::List { config, .. }
        | DlqAction::Show { config, .. }
        | DlqAction::Retry { config, .. }
        | DlqAction::Drop { config, .. } => config,
    };
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match dead_letters(&config, action).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tidemark: {message}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn dead_letters(config: &Config, action: DlqAction) -> Result<(), String> {
    use tidemark::dead_letter;
    let data_dir = &config.agent.data_dir;
    let files = dead_letter::files(data_dir)
        .map_err(|e| format!("reading {}: {e}", data_dir.join("dead_letters").display()))?;
    let file_of = |sink: &str| {
        if !config.sinks.iter().any(|s| s.name == sink) {
            return Err(format!("no sink {sink:?} in {}", config.path.display()));
        }
        Ok(files
            .iter()
            .find(|(name, _)| name == sink)
            .map(|(_, path)| path.clone()))
    };
    let read = |path: &Path| {
        dead_letter::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
    };
    let selected = |count: usize, numbers: &[usize], all: bool| match numbers
        .iter()
        .find(|n| **n == 0 || **n > count)
    {
        Some(missing) => Err(format!("sink has {count} dead letters, no #{missing}")),
        None => Ok((0..count)
            .map(|i| all || numbers.contains(&(i + 1)))
            .collect::<Vec<bool>>()),
    };
    match action {
        DlqAction::List { sink, .. } => {
            let mut shown = 0;
            for (name, path) in &files {
                if sink.as_ref().is_some_and(|s| s != name) {
                    continue;
                }
                for (number, letter) in read(path)?.iter().enumerate() {
                    let when = chrono::DateTime::from_timestamp_millis(letter.ts_ms)
                        .map_or_else(|| letter.ts_ms.to_string(), |t| t.to_rfc3339());
                    println!(
                        "{name} #{} {when} {} {}: {}",
                        number + 1,
                        letter.table,
                        letter.action,
                        letter.reason
                    );
                    shown += 1;
                }
            }
            if shown == 0 {
                println!("no dead letters");
            }
            Ok(())
        }
        DlqAction::Show { sink, number, .. } => {
            let path =
                file_of(&sink)?.ok_or_else(|| format!("sink {sink:?} has no dead letters"))?;
            let letters = read(&path)?;
            let letter = number
                .checked_sub(1)
                .and_then(|i| letters.get(i))
                .ok_or_else(|| {
                    format!(
                        "sink {sink:?} has {} dead letters, no #{number}",
                        letters.len()
                    )
                })?;
            let text = serde_json::to_string_pretty(letter).map_err(|e| e.to_string())?;
            println!("{text}");
            Ok(())
        }
        DlqAction::Drop {
            letters: ChosenLetters { sink, numbers, all },
            ..
        } => {
            let path =
                file_of(&sink)?.ok_or_else(|| format!("sink {sink:?} has no dead letters"))?;
            // The agent appends to the file while it runs: change it only while it is stopped.
            let _lock = tidemark::log::lock_data_dir(data_dir)
                .map_err(|e| format!("{e}; stop the agent before dropping dead letters"))?;
            let letters = read(&path)?;
            let dropped =
                selected(letters.len(), &numbers, all).map_err(|e| format!("{sink:?}: {e}"))?;
            let kept: Vec<_> = letters
                .into_iter()
                .zip(dropped)
                .filter(|(_, dropped)| !dropped)
                .map(|(letter, _)| letter)
                .collect();
            dead_letter::rewrite(&path, &kept)
                .map_err(|e| format!("rewriting {}: {e}", path.display()))?;
            println!("sink {sink:?}: {} dead letters left", kept.len());
            Ok(())
        }
        DlqAction::Retry {
            letters: ChosenLetters { sink, numbers, all },
            ..
        } => {
            let path =
                file_of(&sink)?.ok_or_else(|| format!("sink {sink:?} has no dead letters"))?;
            let kind = config
                .sinks
                .iter()
                .find(|s| s.name == sink)
                .map(|s| &s.kind);
            if !matches!(
                kind,
                Some(SinkKind::Postgres(_)) | Some(SinkKind::ClickHouse(_))
            ) {
                return Err(format!(
                    "sink {sink:?} is not a postgres or clickhouse sink: its letters cannot \
                     be applied again"
                ));
            }
            // Opening the log takes the data_dir's lock: the agent must be stopped.
            let log = tidemark::log::OffsetLog::open(data_dir)
                .map_err(|e| format!("{e}; stop the agent before retrying dead letters"))?;
            let letters = read(&path)?;
            let chosen =
                selected(letters.len(), &numbers, all).map_err(|e| format!("{sink:?}: {e}"))?;
            let touches = dead_letter::read_touches(&path)
                .map_err(|e| format!("reading the touches next to {}: {e}", path.display()))?;
            let mut target_sink = match kind {
                Some(SinkKind::ClickHouse(target)) => Retrier::ClickHouse(
                    ClickHouseSink::new(&sink, target, log, data_dir).map_err(|e| e.to_string())?,
                ),
                Some(SinkKind::Postgres(target)) => Retrier::Postgres(
                    PostgresSink::new(&sink, target, log, data_dir).map_err(|e| e.to_string())?,
                ),
                _ => {
                    return Err(format!(
                        "sink {sink:?} is not a postgres or clickhouse sink"
                    ))
                }
            };
            let applied = match &mut target_sink {
                Retrier::Postgres(target) => Sink::open(target).await,
                Retrier::ClickHouse(target) => Sink::open(target).await,
            }
            .map_err(|e| e.to_string())?;
            let mut retried = vec![false; letters.len()];
            let mut changes = Vec::new();
            // The letter number of each change.
            let mut numbers = Vec::new();
            for (number, letter) in letters.iter().enumerate() {
                if !chosen[number] {
                    continue;
                }
                match &letter.change {
                    _ if dead_letter::is_superseded(letter, &touches, applied) => println!(
                        "#{}: skipped, a later change of its key has been applied since; \
                         `tidemark dlq drop` removes it",
                        number + 1
                    ),
                    None => println!(
                        "#{}: skipped, written by a tidemark that did not record the change \
                         to apply again; apply it by hand from `tidemark dlq show`, then drop it",
                        number + 1
                    ),
                    Some(change) => {
                        retried[number] = true;
                        changes.push(change.clone());
                        numbers.push(number);
                    }
                }
            }
            let (refused, superseded) = match &mut target_sink {
                Retrier::Postgres(target) => target
                    .retry(&changes, applied)
                    .await
                    .map(|refused| (refused, Vec::new())),
                Retrier::ClickHouse(target) => target.retry(&changes, applied).await,
            }
            .map_err(|e| e.to_string())?;
            for change in &superseded {
                let number = numbers[*change];
                retried[number] = false;
                println!(
                    "#{}: skipped, the target holds a later version of its key; \
                     `tidemark dlq drop` removes it",
                    number + 1
                );
            }
            // The retried letters go; the sink appended the ones refused again after them.
            let now = read(&path)?;
            let kept: Vec<_> = now
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !retried.get(*i).copied().unwrap_or(false))
                .map(|(_, letter)| letter)
                .collect();
            dead_letter::rewrite(&path, &kept)
                .map_err(|e| format!("rewriting {}: {e}", path.display()))?;
            println!(
                "sink {sink:?}: {} applied, {refused} refused again, {} dead letters left",
                changes.len() - superseded.len() - refused,
                kept.len()
            );
            if refused > 0 {
                return Err(format!(
                    "{refused} dead letters were refused again; `tidemark dlq list` shows why"
                ));
            }
            Ok(())
        }
    }
}

/// The sinks whose dead letters `dlq retry` applies again.
enum Retrier {
    Postgres(PostgresSink),
    ClickHouse(ClickHouseSink),
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("stop requested; finishing the batch in flight");
    shutdown.cancel();
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
