//! `cardvault check`: everything about a config that can be judged without starting the
//! daemon, listed at once. `serve` runs the same checks before it opens anything, and refuses
//! to start on a problem.
//!
//! It reads files only: the store is not opened (sled allows one process on it, and a check
//! must not write); `serve` checks the KEK against the store when it opens it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::config::Config;

/// What a check found. Problems stop `serve`; warnings do not.
#[derive(Debug, Default)]
pub struct Findings {
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

impl Findings {
    fn problem(&mut self, text: impl Into<String>) {
        self.problems.push(text.into());
    }

    fn warning(&mut self, text: impl Into<String>) {
        self.warnings.push(text.into());
    }
}

/// Every check on a loaded config.
pub fn run(config: &Config) -> Findings {
    let mut found = Findings::default();
    if let Err(e) = crate::policy::Policy::load(&config.policies) {
        found.problem(e.to_string());
    }
    if let Some(path) = &config.receivers {
        if let Err(e) = crate::forward::Receivers::load(path) {
            found.problem(e.to_string());
        }
    }
    tls(config, &mut found);
    keys_dir(config, &mut found);
    spool_dir(config, &mut found);
    hsm(config, &mut found);
    if let crate::store::StoreConfig::Postgres(settings) = &config.store {
        database(settings, &mut found);
    }
    found
}

/// `spool_dir` (where an import's upload waits, ciphertext only): a folder. Only imports need
/// it, so a problem with it is a warning; a folder others may write to without the sticky bit
/// is a problem (they could remove an upload while it is read).
fn spool_dir(config: &Config, found: &mut Findings) {
    let dir = &config.spool_dir;
    match std::fs::metadata(dir) {
        Err(e) => found.warning(format!(
            "spool_dir {}: {e}; imports will answer 503 spool_unavailable",
            dir.display()
        )),
        Ok(meta) if !meta.is_dir() => found.warning(format!(
            "spool_dir {} is not a folder; imports will answer 503 spool_unavailable",
            dir.display()
        )),
        Ok(meta) if meta.permissions().mode() & 0o1002 == 0o002 => found.problem(format!(
            "spool_dir {} is writable by others without the sticky bit: chmod o-w or +t it",
            dir.display()
        )),
        Ok(_) => {}
    }
}

/// `[store.postgres]`'s files: the password file exists and only its owner reads it; the CA
/// (and client certificate and key) load. The database itself is not contacted.
fn database(settings: &crate::store::PgSettings, found: &mut Findings) {
    if let Some(path) = &settings.password_file {
        match std::fs::metadata(path) {
            Err(e) => found.problem(format!(
                "[store.postgres] password_file {}: {e}",
                path.display()
            )),
            Ok(meta) if meta.permissions().mode() & 0o077 != 0 => found.problem(format!(
                "[store.postgres] password_file {} is open to others (mode {:o}): chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            )),
            Ok(_) => {}
        }
    }
    if let Some(ca) = &settings.ca {
        if let Err(e) = crate::tls::load_certs(ca) {
            found.problem(format!("[store.postgres] ca: {e}"));
        }
    }
    if let (Some(cert), Some(key)) = (&settings.cert, &settings.key) {
        if let Err(e) = crate::tls::load_certs(cert) {
            found.problem(format!("[store.postgres] cert: {e}"));
        }
        if let Err(e) = crate::tls::load_key(key) {
            found.problem(format!("[store.postgres] key: {e}"));
        }
    }
}

/// Certificates, key and CRLs load together; none has run out, none runs out within 30 days
/// (a warning); the private key is not readable by others.
fn tls(config: &Config, found: &mut Findings) {
    match crate::tls::server_config(&config.tls.paths()) {
        Err(e) => found.problem(format!("TLS: {e}")),
        Ok((_, state)) => {
            for (deadline, days_left) in state.expiring(crate::vault::unix_now()) {
                let at = crate::vault::rfc3339(deadline.at);
                // An expired server certificate fails every client; an expired certificate in
                // a CA bundle (kept through a rollover) or one stale CRL among several may
                // fail only some, so those do not stop a start.
                if days_left < 0 && deadline.kind == "server_certificate" {
                    found.problem(format!("{} ran out at {at}", deadline.what));
                } else if days_left < 0 {
                    found.warning(format!(
                        "{} ran out at {at}: handshakes it covers are refused",
                        deadline.what
                    ));
                } else {
                    found.warning(format!(
                        "{} runs out in {days_left} days ({at})",
                        deadline.what
                    ));
                }
            }
        }
    }
    if let Ok(meta) = std::fs::metadata(&config.tls.key) {
        let mode = meta.permissions().mode();
        if mode & 0o004 != 0 {
            found.problem(format!(
                "{} (the TLS private key) is readable by others (mode {:o}): chmod o-rwx it",
                config.tls.key.display(),
                mode & 0o777
            ));
        }
    }
}

/// `keys_dir`: closed to others, holding a KEK's custody (or the dev key where allowed) and
/// the audit key, every file owned by whoever owns the folder (the daemon's user).
fn keys_dir(config: &Config, found: &mut Findings) {
    let dir = &config.keys_dir;
    let Ok(meta) = std::fs::metadata(dir) else {
        found.problem(format!(
            "{} does not exist: create it (mode 0700, owned by the daemon's user), then run \
             `cardvault keys init`",
            dir.display()
        ));
        return;
    };
    let mode = meta.permissions().mode();
    if mode & 0o007 != 0 {
        found.problem(format!(
            "{} is accessible to others (mode {:o}): chmod o-rwx it",
            dir.display(),
            mode & 0o777
        ));
    }
    // As `serve` looks for them: `custodians`, `custodians.next` (a rekey that switched the
    // store but not the folders), set-aside ones; the store's KEK picks one at start.
    let custody = crate::crypto::custody::custody_dirs(dir);
    let dev_key = dir.join(crate::crypto::DEV_KEY_FILE);
    if !custody.is_empty() {
        for folder in &custody {
            if let Err(e) = crate::crypto::custody::Custody::load(folder) {
                found.problem(format!("{}: {e}", folder.display()));
            }
        }
        if dev_key.exists() {
            found.problem(format!(
                "{} holds custodian shares and an insecure dev key: remove the dev key",
                dir.display()
            ));
        }
    } else if dev_key.exists() {
        if !config.insecure_dev_key {
            found.problem(format!(
                "{} holds only the INSECURE dev key; production needs custodian shares",
                dir.display()
            ));
        }
    } else {
        found.problem(format!(
            "{} holds no key: run `cardvault keys init --config FILE --custodians NAMES \
             --threshold K`",
            dir.display()
        ));
    }
    let audit_key = dir.join(crate::audit::file::KEY_FILE);
    if let Err(e) = crate::audit::file::AuditKey::load(&audit_key) {
        found.problem(format!("{}: {}", audit_key.display(), e.0));
    }
    owners(dir, meta.uid(), found);
}

/// `[kek.pkcs11]`: a PIN file others may read is refused; a module or PIN file that is not
/// there is a warning (the daemon starts sealed, says why, and tries again).
fn hsm(config: &Config, found: &mut Findings) {
    let crate::crypto::seal::Backend::Pkcs11(settings) = &config.kek else {
        return;
    };
    if !settings.module.is_file() {
        found.warning(format!(
            "[kek.pkcs11] module {} does not exist: the daemon will stay sealed until it does \
             (or custodians unseal it with recovery shares)",
            settings.module.display()
        ));
    }
    match std::fs::metadata(&settings.pin_file) {
        Err(e) => found.warning(format!(
            "[kek.pkcs11] pin_file {}: {e}: the daemon will stay sealed until it can read it",
            settings.pin_file.display()
        )),
        Ok(_) => {
            if let Err(e) = crate::crypto::custody::check_private(&settings.pin_file) {
                found.problem(format!("[kek.pkcs11] pin_file: {e}"));
            }
        }
    }
}

/// Anything below `dir` owned by someone else than `uid` (the folder's owner) may be
/// unreadable to the daemon (`keys init` run as root, say): a warning, since a root-owned
/// folder of files the daemon's user owns works too.
fn owners(dir: &Path, uid: u32, found: &mut Findings) {
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path.clone());
            }
            if meta.uid() != uid {
                found.warning(format!(
                    "{} is owned by uid {}, but {} by uid {uid}: the daemon may not read it \
                     (chown it to the folder's owner)",
                    path.display(),
                    meta.uid(),
                    dir.display()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config whose files are all missing reports every one of them, not only the first.
    #[test]
    fn every_problem_is_listed() {
        let dir = std::env::temp_dir().join(format!("cardvault-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = Config::parse(
            r#"
            listen = "127.0.0.1:8443"
            data_dir = "data"
            keys_dir = "keys"
            policies = "policies"
            [tls]
            cert = "server.pem"
            key = "server.key"
            client_ca = "ca.pem"
            [audit]
            path = "audit/audit.log"
            "#,
            &dir,
        )
        .unwrap();
        let found = run(&config);
        let all = found.problems.join("\n");
        for want in ["policies", "TLS", "keys does not exist"] {
            assert!(all.contains(want), "no {want:?} in:\n{all}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
