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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardvault: error: {e}");
            ExitCode::from(2)
        }
    }
}
