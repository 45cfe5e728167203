//! The binary's subcommands, behind a thin `main`: each returns an error the caller prints.

use std::path::Path;

use crate::config::{Config, LogConfig, LogFormat};
use crate::crypto::{LocalKek, LOCAL_KEK_FILE};
use crate::server::{Application, StartupError};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error(transparent)]
    Dev(#[from] crate::dev::DevError),
    #[error("{0}")]
    Keys(String),
    #[error("server: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Bench(#[from] crate::bench::BenchError),
}

/// Installs the log subscriber. Nothing the crate logs carries card data or keys; the level
/// only decides how much of the rest is shown.
pub fn init_logging(log: &LogConfig) {
    let level = log.level.parse().unwrap_or(tracing::Level::INFO);
    // Colours only on a terminal: logs sent to a file or journald stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(true)
        .with_ansi(ansi);
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// `cardvault serve --config FILE`
pub fn serve(config_path: &Path) -> Result<(), CommandError> {
    let config = Config::load(config_path)?;
    init_logging(&config.log);
    run(&config, |_| {})
}

fn run(config: &Config, on_listening: impl FnOnce(&Application)) -> Result<(), CommandError> {
    actix_web::rt::System::new().block_on(async {
        let app = Application::build(config)?;
        on_listening(&app);
        app.run().await.map_err(CommandError::Serve)
    })
}

/// `cardvault keys init --config FILE`: a new local KEK in `keys_dir`, never overwriting one.
pub fn keys_init(config_path: &Path) -> Result<(), CommandError> {
    let config = Config::load(config_path)?;
    std::fs::create_dir_all(&config.keys_dir).map_err(|e| {
        CommandError::Keys(format!("cannot create {}: {e}", config.keys_dir.display()))
    })?;
    let path = config.keys_dir.join(LOCAL_KEK_FILE);
    LocalKek::create(&path).map_err(|e| CommandError::Keys(e.to_string()))?;
    println!(
        "wrote a new key-encryption key to {} (mode 0600)",
        path.display()
    );
    println!("back it up offline: without it, nothing in data_dir can be read");
    Ok(())
}

/// `cardvault dev`: throwaway certificates, policy and key; serves and prints curl examples.
pub fn dev(dir: &Path, listen: &str) -> Result<(), CommandError> {
    let config_path = crate::dev::prepare(dir, listen)?;
    let config = Config::load(&config_path)?;
    init_logging(&config.log);
    run(&config, |app| {
        println!(
            "{}",
            crate::dev::curl_examples(dir, &config, app.local_addr())
        );
    })
}

/// `cardvault bench`: prints a table (or JSON) of throughput and latency per scenario.
pub fn bench(
    duration: &str,
    concurrency: usize,
    scenarios: &[String],
    json: bool,
    target: Option<crate::bench::Target>,
) -> Result<(), CommandError> {
    use crate::bench::{BenchError, BenchOptions, SCENARIOS};
    let duration = crate::config::parse_duration(duration)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            BenchError::Setup(format!(
                "--duration {duration:?} is not a duration like 10s or 1m"
            ))
        })?;
    let scenarios = if scenarios.is_empty() || scenarios.iter().any(|s| s == "all") {
        SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        scenarios.to_vec()
    };
    let options = BenchOptions {
        duration,
        concurrency: concurrency.max(1),
        scenarios,
        json,
        target,
    };
    let figures = crate::bench::run(&options)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&figures).unwrap_or_default()
        );
    } else {
        print!("{}", crate::bench::table(&figures));
    }
    Ok(())
}
