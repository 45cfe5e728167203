//! The `cardvault` binary: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cardvault",
    version,
    about = "A card vault: mTLS-only tokenization and detokenization"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with operator-provided certificates, keys and policies.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// A throwaway local vault: dev CA and certificates, dev policy, dev key; prints curl examples.
    Dev {
        /// Folder for the dev material (wiped and made again on every run).
        #[arg(long, default_value = ".cardvault-dev")]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
    },
    /// Load test over real mTLS: starts a throwaway vault unless --target is given.
    Bench {
        /// Length of each scenario's measured run (90s, 10s, 1m...).
        #[arg(long, default_value = "10s")]
        duration: String,
        /// Concurrent keep-alive connections.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Scenario to run (repeatable); default: all of them.
        #[arg(long = "scenario")]
        scenarios: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// A running vault to drive instead, e.g. https://127.0.0.1:8443
        #[arg(long, requires_all = ["cert", "key", "ca"])]
        target: Option<String>,
        /// Client certificate for --target (needs tokenize, read, customers, detokenize).
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
        /// CA that signed the vault's server certificate.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create the key-encryption key in the config's keys_dir.
    Init {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve { config } => cardvault::commands::serve(config),
        Command::Dev { dir, listen } => cardvault::commands::dev(dir, listen),
        Command::Keys {
            command: KeysCommand::Init { config },
        } => cardvault::commands::keys_init(config),
        Command::Bench {
            duration,
            concurrency,
            scenarios,
            json,
            target,
            cert,
            key,
            ca,
        } => {
            // clap's `requires_all` makes --cert, --key and --ca present whenever --target is.
            let target = match (target, cert, key, ca) {
                (Some(url), Some(cert), Some(key), Some(ca)) => Some(cardvault::bench::Target {
                    url: url.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                }),
                _ => None,
            };
            cardvault::commands::bench(duration, *concurrency, scenarios, *json, target)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardvault: error: {e}");
            ExitCode::from(2)
        }
    }
}
