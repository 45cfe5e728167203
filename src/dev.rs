//! `cardvault dev`: a throwaway vault on a fresh machine in one command.
//!
//! Creates a git-ignored folder with a dev CA, a server certificate for localhost and
//! 127.0.0.1, client certificates for `router`, `checkout` and `ops`, a dev policy, a dev KEK
//! and a config, then serves on 127.0.0.1 and prints curl commands that work as printed.
//! Every run starts from scratch: the folder is wiped and made again (only if it carries the
//! dev marker, so a mistyped `--dir` cannot wipe anything else).

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::crypto::{DevKey, DEV_KEY_FILE};
use crate::pki::{Authority, ClientSpec};

const MARKER: &str = ".cardvault-dev";

pub const DEV_POLICY: &str = r#"# Dev policy: one table per caller, matched on the client certificate's URI SAN.
[[identity]]
name = "router"
uri_san = "spiffe://cardvault.dev/router"
permissions = ["tokenize", "read", "customers", "detokenize", "forward", "fingerprint"]
projects = ["*"]
show_iin8 = true

[[identity]]
name = "checkout"
uri_san = "spiffe://cardvault.dev/checkout"
permissions = ["tokenize", "read"]
projects = ["*"]

[[identity]]
name = "ops"
uri_san = "spiffe://cardvault.dev/ops"
permissions = ["keys", "metrics", "backup", "import", "detokenize"]
projects = ["*"]
"#;

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} exists and is not a cardvault dev folder; refusing to wipe it")]
    NotDevFolder(PathBuf),
    #[error("certificates: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("dev key: {0}")]
    Key(#[from] crate::crypto::CryptoError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    AuditKey(#[from] crate::audit::AuditError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), DevError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(contents.as_bytes()).map_err(io(path))
}

fn mkdir(path: &Path) -> Result<(), DevError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(path))
}

/// Lays out the dev folder and returns the path of its config file.
pub fn prepare(dir: &Path, listen: &str) -> Result<PathBuf, DevError> {
    if dir.exists() {
        if !dir.join(MARKER).exists() {
            return Err(DevError::NotDevFolder(dir.to_owned()));
        }
        fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    mkdir(dir)?;
    write(
        &dir.join(MARKER),
        "made by `cardvault dev`; wiped and made again on every run\n",
        0o600,
    )?;
    let pki = dir.join("pki");
    let keys = dir.join("keys");
    mkdir(&pki)?;
    mkdir(&keys)?;

    let ca = Authority::new("cardvault dev CA")?;
    write(&pki.join("ca.pem"), &ca.cert_pem(), 0o644)?;
    let server = ca.server(&["localhost", "127.0.0.1"])?;
    write(&pki.join("server.pem"), &server.cert_pem, 0o644)?;
    write(&pki.join("server.key"), &server.key_pem, 0o600)?;
    for name in ["router", "checkout", "ops"] {
        let client = ca.client(&ClientSpec::named(name))?;
        write(&pki.join(format!("{name}.pem")), &client.cert_pem, 0o644)?;
        write(&pki.join(format!("{name}.key")), &client.key_pem, 0o600)?;
    }
    write(&dir.join("policy.toml"), DEV_POLICY, 0o644)?;
    DevKey::create(&keys.join(DEV_KEY_FILE))?;
    crate::audit::file::AuditKey::create(&keys.join(crate::audit::file::KEY_FILE))?;
    let config = format!(
        r#"# Written by `cardvault dev`. Paths are relative to this file.
listen = "{listen}"
data_dir = "data"
keys_dir = "keys"
policies = "policy.toml"
# One local file holds the whole KEK: fine for a throwaway dev vault, never for real cards.
insecure_dev_key = true

[audit]
path = "audit/audit.log"

[tls]
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"
"#
    );
    let config_path = dir.join("cardvault.toml");
    write(&config_path, &config, 0o600)?;
    Ok(config_path)
}

/// The curl commands printed at startup; each works as printed from the folder `dev` ran in.
pub fn curl_examples(dir: &Path, config: &Config, addr: std::net::SocketAddr) -> String {
    let pki = dir.join("pki");
    let as_caller = |name: &str| {
        format!(
            "curl -sS -w '\\n' --cacert {ca} --cert {cert} --key {key}",
            ca = pki.join("ca.pem").display(),
            cert = pki.join(format!("{name}.pem")).display(),
            key = pki.join(format!("{name}.key")).display(),
        )
    };
    let base = format!("https://{addr}/v1");
    let exp_year = time::OffsetDateTime::now_utc().year() + 3;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cardvault dev is serving on {base} (data in {})",
        config
            .data_dir()
            .unwrap_or(Path::new("PostgreSQL"))
            .display()
    );
    let _ = writeln!(
        out,
        "Dev certificates, policy and an INSECURE dev key are in {}.",
        dir.display()
    );
    let _ = writeln!(out, "Try, from this folder, in another shell:\n");
    let _ = writeln!(out, "# health (any verified client)");
    let _ = writeln!(out, "{} {base}/health\n", as_caller("ops"));
    let _ = writeln!(
        out,
        "# 1. tokenize a test card as the checkout edge; keep the card token"
    );
    let saved = dir.join("card.json");
    let _ = writeln!(
        out,
        "{} -H 'content-type: application/json' -d '{{\"number\":\"4242 4242 4242 4242\",\"exp_month\":12,\"exp_year\":{exp_year},\"cvc\":\"123\",\"holder_name\":\"Ada Lovelace\"}}' {base}/cards | tee {saved}",
        as_caller("checkout"),
        saved = saved.display()
    );
    let _ = writeln!(
        out,
        "CARD=$(sed -E 's/.*\"id\":\"(card_[A-Za-z0-9]+)\".*/\\1/' {}); echo $CARD\n",
        saved.display()
    );
    let _ = writeln!(out, "# 2. read its metadata (never the number)");
    let _ = writeln!(out, "{} {base}/cards/$CARD\n", as_caller("checkout"));
    let _ = writeln!(
        out,
        "# 3. detokenize it as the router: the card details, once"
    );
    let detok = format!(
        "{} -H 'content-type: application/json' -d \"{{\\\"token\\\":\\\"$CARD\\\",\\\"reason\\\":\\\"cit\\\"}}\" {base}/detokenize",
        as_caller("router")
    );
    let _ = writeln!(out, "{detok}\n");
    let _ = writeln!(out, "# 4. a second detokenize is refused: 409 token_used");
    let _ = writeln!(out, "{detok}\n");
    let _ = writeln!(
        out,
        "# 5. the checkout edge may not detokenize: 403 forbidden"
    );
    let _ = writeln!(
        out,
        "{} -H 'content-type: application/json' -d \"{{\\\"token\\\":\\\"$CARD\\\"}}\" {base}/detokenize",
        as_caller("checkout")
    );
    out
}
