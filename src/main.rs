//! The `cardvault` binary: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// mimalloc: measured faster than glibc's malloc on the request path (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// The daemon's config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// A throwaway local vault: dev CA and certificates, dev policy, dev key; prints curl examples.
    Dev {
        /// Folder for the dev material (wiped and made again on every run).
        #[arg(long, default_value = ".cardvault-dev")]
        dir: PathBuf,
        /// Address to serve on (loopback: the dev material is not for a network).
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
        /// The engine of the vault the bench starts: sled, or postgres (a throwaway
        /// PostgreSQL cluster started for the run, as the tests do).
        #[arg(long, default_value = "sled", conflicts_with = "target")]
        store: String,
        /// Nodes the bench starts over its throwaway PostgreSQL (with --store postgres); the
        /// load is spread over them, one connection after another.
        #[arg(long, default_value_t = 1, conflicts_with = "target")]
        nodes: usize,
        /// A running vault to drive instead, e.g. https://127.0.0.1:8443; repeat it for several
        /// nodes, and the connections are spread over them.
        #[arg(long, requires_all = ["cert", "key", "ca"])]
        target: Vec<String>,
        /// Client certificate for --target (needs tokenize, read, customers, detokenize).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Private key (PEM) of --cert.
        #[arg(long)]
        key: Option<PathBuf>,
        /// CA that signed the vault's server certificate.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Card tokens written into the bench's own vault before it starts, outside the
        /// measured time (e.g. 1M): the records tokenization writes, without requests.
        #[arg(long, default_value = "0", conflicts_with = "target")]
        fill: String,
        /// Store sizes to measure at, e.g. 0,1M,5M,10M: the store is filled to each in turn,
        /// the daemon restarted (startup timed), every scenario run; one table row per size.
        #[arg(long, conflicts_with_all = ["target", "fill"])]
        growth: Option<String>,
        /// Instead of the scenarios: import a card file of this many rows (e.g. 1M), encrypted
        /// to the vault's RSA-4096 import key, and report rows/s and the daemon's peak memory.
        #[arg(long, conflicts_with_all = ["target", "fill", "growth"])]
        import_rows: Option<String>,
    },
    /// Check a config without starting: policies, TLS files and their deadlines, keys_dir;
    /// lists every problem serve would refuse to start on, exits non-zero if any.
    Check {
        /// The daemon's config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// The policy: which identity a certificate is, and what it may do.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The store: moving it between engines.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// An online backup of the running vault's store (permission `backup`): ciphertext and
    /// wrapped keys, with a digest and a MAC under the root key. sled only.
    Backup {
        #[command(flatten)]
        connect: Connect,
        /// Where to write it (must not exist; written as FILE.partial, then renamed).
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into an empty store, every daemon stopped; the digest, the KEK and
    /// the MAC are checked before anything is written.
    Restore {
        /// The daemon's config file (TOML): the store to restore into, and keys_dir.
        #[arg(long)]
        config: PathBuf,
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// A custodian's share file of the backup's KEK (or its recovery KEK); give k of them.
        /// Not needed with [kek] backend = "pkcs11" when the HSM holds the backup's KEK.
        #[arg(long = "share")]
        shares: Vec<PathBuf>,
        /// NAME=PATH: a custodian's passphrase file; repeatable.
        #[arg(long = "passphrase-file")]
        passphrase_files: Vec<String>,
    },
    /// Import an OpenPGP-encrypted card file (CSV or JSON Lines) into a project's customers
    /// and customer tokens (permission `import`); writes one results line per row.
    Import {
        #[command(flatten)]
        connect: Connect,
        #[arg(long, default_value = "default")]
        project: String,
        /// The encrypted file (binary or armored), encrypted to the vault's import key.
        #[arg(long)]
        file: PathBuf,
        /// The results file (CSV; must not exist): row, customer_ref, customer, token, status.
        #[arg(long)]
        out: PathBuf,
        /// The sender's public key: the file must be signed by it.
        #[arg(long)]
        signer: Option<PathBuf>,
    },
    /// Export a project's customer tokens, encrypted to a recipient's OpenPGP key, under dual
    /// control (permission `export`).
    Export {
        #[command(subcommand)]
        command: ExportCommand,
    },
    /// Submit one custodian's share to a sealed vault (with the custodian's own certificate).
    Unseal {
        #[command(flatten)]
        connect: Connect,
        /// The custodian's share file (keys_dir/custodians/NAME.share).
        #[arg(long)]
        share: PathBuf,
        /// Read the passphrase from this file (mode 0600) instead of the terminal.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

/// How an operator command reaches the running vault.
#[derive(Args)]
struct Connect {
    /// The daemon's config file (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Client certificate (PEM) of the operator or custodian.
    #[arg(long)]
    cert: PathBuf,
    /// Private key (PEM) of --cert.
    #[arg(long)]
    key: PathBuf,
    /// CA of the vault's server certificate; default: the config's tls.client_ca.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The vault's URL; default: https:// and the config's listen address. `unseal` takes it
    /// once per node, and submits the share to each.
    #[arg(long)]
    url: Vec<String>,
}

impl Connect {
    fn to_lib(&self) -> cardvault::commands::Connect {
        cardvault::commands::Connect {
            config: self.config.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
            url: self.url.first().cloned(),
        }
    }
}

#[derive(Subcommand)]
enum ExportCommand {
    /// Record an export request; prints its id. Nothing leaves until another identity approves.
    Request {
        #[command(flatten)]
        connect: Connect,
        #[arg(long, default_value = "default")]
        project: String,
        /// The recipient's OpenPGP public key (armored or binary).
        #[arg(long)]
        recipient: PathBuf,
        /// Only these customers (one `cust_…` per line); default: all of the project's.
        #[arg(long)]
        customers: Option<PathBuf>,
    },
    /// Approve another identity's export request (within 24 h of it).
    Approve {
        id: String,
        #[command(flatten)]
        connect: Connect,
        #[arg(long, default_value = "default")]
        project: String,
    },
    /// Fetch an approved export, encrypted to its recipient only.
    Fetch {
        id: String,
        #[command(flatten)]
        connect: Connect,
        #[arg(long, default_value = "default")]
        project: String,
        /// Where to write it (must not exist; written as FILE.partial, then renamed).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Which identity a client certificate matches, its permissions, projects and what it
    /// is shown of cards.
    Explain {
        /// The daemon's config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The client certificate (PEM, leaf first).
        #[arg(long)]
        cert: PathBuf,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy a stopped vault's store to another engine (sled to PostgreSQL, or back), then
    /// verify every record; a second run only verifies. Both configs share keys_dir.
    Copy {
        /// Config of the store to copy from.
        #[arg(long)]
        from: PathBuf,
        /// Config of the store to copy to (empty, or holding this same store).
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every line's HMAC and chain link; exits non-zero naming the first bad line.
    Verify {
        /// The audit log, or its rotated parts oldest first and the live log last; default:
        /// the config's audit log with every part `[audit] rotate_mb` left beside it.
        files: Vec<PathBuf>,
        /// For the audit key in keys_dir.
        #[arg(long)]
        config: PathBuf,
        /// The first file continues a part not given: it may start mid-chain.
        #[arg(long)]
        rotated: bool,
        /// The audit key file to verify with (one kept by `audit rotate-key`); default: the
        /// one in keys_dir.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// With the daemon stopped: move the audit log and its key aside and start a new log under
    /// a new key that continues the old chain.
    RotateKey {
        /// The daemon's config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make the KEK and split it among custodians (k of n unseal); with [kek] backend =
    /// "pkcs11", make the KEK inside the HSM and split a recovery KEK among the custodians;
    /// or make the insecure dev key.
    Init {
        /// The daemon's config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Custodian names, comma-separated; each is also the name of their policy identity.
        #[arg(long, required_unless_present = "insecure_dev_key")]
        custodians: Option<String>,
        /// How many custodians it takes to unseal (at least 2).
        #[arg(long, required_unless_present = "insecure_dev_key")]
        threshold: Option<u8>,
        /// NAME=PATH: read NAME's new passphrase from PATH (mode 0600); repeatable.
        #[arg(long = "passphrase-file")]
        passphrase_files: Vec<String>,
        /// One local file holding the whole KEK, for dev and tests; serve refuses it unless
        /// the config says insecure_dev_key = true.
        #[arg(long)]
        insecure_dev_key: bool,
    },
    /// The key inventory: every key, its state, encryption count and records.
    Status {
        #[command(flatten)]
        connect: Connect,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make a new DEK version active now; older versions are re-encrypted away.
    Rotate {
        #[command(flatten)]
        connect: Connect,
    },
    /// The vault's OpenPGP import key (permission `import`): made if there is none, sealed by
    /// the KEK in the store; prints the armored public key to hand to the sending PSP.
    ImportKey {
        #[command(flatten)]
        connect: Connect,
        /// A project the identity holds `import` on (the key itself is vault-wide).
        #[arg(long, default_value = "default")]
        project: String,
        /// rsa4096 (what every PSP's tooling reads) or curve25519.
        #[arg(long, default_value = "rsa4096")]
        algorithm: String,
        /// Make a new key even if there is one; older keys still decrypt until removed.
        #[arg(long, conflicts_with = "remove")]
        rotate: bool,
        /// Remove the import key of this fingerprint.
        #[arg(long)]
        remove: Option<String>,
    },
    /// Replace the KEK: k current custodians prove custody, new shares for a new list.
    Rekey {
        #[command(flatten)]
        connect: Connect,
        /// A current custodian's share file; give k of them.
        #[arg(long = "share", required = true)]
        shares: Vec<PathBuf>,
        /// NAME=PATH: a current custodian's passphrase file; repeatable.
        #[arg(long = "passphrase-file")]
        passphrase_files: Vec<String>,
        /// The new custodian list, comma-separated.
        #[arg(long)]
        custodians: String,
        /// How many of the new custodians it takes to unseal (at least 2).
        #[arg(long)]
        threshold: u8,
        /// NAME=PATH: a new custodian's new passphrase file; repeatable.
        #[arg(long = "new-passphrase-file")]
        new_passphrase_files: Vec<String>,
    },
    /// Move the seal while serving: to pkcs11 (the KEK in the HSM the config names, the
    /// custodians' KEK kept for recovery) or back to shamir; k custodians' shares.
    Migrate {
        #[command(flatten)]
        connect: Connect,
        /// The seal to move to: pkcs11 or shamir (the config's [kek] backend must say the same).
        #[arg(long, value_parser = ["pkcs11", "shamir"])]
        to: String,
        /// A custodian's share file; give k of them.
        #[arg(long = "share", required = true)]
        shares: Vec<PathBuf>,
        /// NAME=PATH: a custodian's passphrase file; repeatable.
        #[arg(long = "passphrase-file")]
        passphrase_files: Vec<String>,
    },
}

fn main() -> ExitCode {
    // Before anything holds a key, a share or a card: no core dumps, for every command.
    if let Err(e) = cardvault::hardening::no_core_dumps() {
        eprintln!("cardvault: error: cannot turn core dumps off: {e}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve { config } => cardvault::commands::serve(config),
        Command::Check { config } => cardvault::commands::check(config),
        Command::Policy {
            command: PolicyCommand::Explain { config, cert },
        } => cardvault::commands::policy_explain(config, cert),
        Command::Dev { dir, listen } => cardvault::commands::dev(dir, listen),
        Command::Import {
            connect,
            project,
            file,
            out,
            signer,
        } => cardvault::commands::import(&connect.to_lib(), project, file, out, signer.as_deref()),
        Command::Export { command } => match command {
            ExportCommand::Request {
                connect,
                project,
                recipient,
                customers,
            } => cardvault::commands::export_request(
                &connect.to_lib(),
                project,
                recipient,
                customers.as_deref(),
            ),
            ExportCommand::Approve {
                id,
                connect,
                project,
            } => cardvault::commands::export_approve(&connect.to_lib(), project, id),
            ExportCommand::Fetch {
                id,
                connect,
                project,
                out,
            } => cardvault::commands::export_fetch(&connect.to_lib(), project, id, out),
        },
        Command::Keys { command } => match command {
            KeysCommand::Init {
                config,
                custodians,
                threshold,
                passphrase_files,
                insecure_dev_key,
            } => cardvault::commands::keys_init(
                config,
                custodians.as_deref(),
                *threshold,
                passphrase_files,
                *insecure_dev_key,
            ),
            KeysCommand::Status { connect, json } => {
                cardvault::commands::keys_status(&connect.to_lib(), *json)
            }
            KeysCommand::Rotate { connect } => cardvault::commands::keys_rotate(&connect.to_lib()),
            KeysCommand::ImportKey {
                connect,
                project,
                algorithm,
                rotate,
                remove,
            } => cardvault::commands::keys_import_key(
                &connect.to_lib(),
                project,
                algorithm,
                *rotate,
                remove.as_deref(),
            ),
            KeysCommand::Rekey {
                connect,
                shares,
                passphrase_files,
                custodians,
                threshold,
                new_passphrase_files,
            } => cardvault::commands::keys_rekey(
                &connect.to_lib(),
                shares,
                passphrase_files,
                custodians,
                *threshold,
                new_passphrase_files,
            ),
            KeysCommand::Migrate {
                connect,
                to,
                shares,
                passphrase_files,
            } => cardvault::commands::keys_migrate(&connect.to_lib(), to, shares, passphrase_files),
        },
        Command::Audit {
            command:
                AuditCommand::Verify {
                    files,
                    config,
                    rotated,
                    key,
                },
        } => cardvault::commands::audit_verify(config, files, *rotated, key.as_deref()),
        Command::Audit {
            command: AuditCommand::RotateKey { config },
        } => cardvault::commands::audit_rotate_key(config),
        Command::Store {
            command: StoreCommand::Copy { from, to },
        } => cardvault::commands::store_copy(from, to),
        Command::Backup { connect, out } => cardvault::commands::backup(&connect.to_lib(), out),
        Command::Restore {
            config,
            from,
            shares,
            passphrase_files,
        } => cardvault::commands::restore(config, from, shares, passphrase_files),
        Command::Unseal {
            connect,
            share,
            passphrase_file,
        } => cardvault::commands::unseal(
            &connect.to_lib(),
            &connect.url,
            share,
            passphrase_file.as_deref(),
        ),
        Command::Bench {
            duration,
            concurrency,
            scenarios,
            json,
            store,
            nodes,
            target,
            cert,
            key,
            ca,
            fill,
            growth,
            import_rows,
        } => {
            if let Some(rows) = import_rows {
                return match cardvault::commands::bench_import(store, rows, *json) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("cardvault: error: {e}");
                        ExitCode::from(2)
                    }
                };
            }
            // clap's `requires_all` makes --cert, --key and --ca present whenever --target is.
            let target = match (target.is_empty(), cert, key, ca) {
                (false, Some(cert), Some(key), Some(ca)) => Some(cardvault::bench::Target {
                    urls: target.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                }),
                _ => None,
            };
            cardvault::commands::bench(
                duration,
                *concurrency,
                scenarios,
                *json,
                (store, *nodes),
                target,
                (fill, growth.as_deref()),
            )
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
