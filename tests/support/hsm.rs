//! The tests' PKCS#11 device: SoftHSM2 (Debian's `softhsm2`) with a token folder and config of
//! the test's own, named to the daemon and the CLI by `SOFTHSM2_CONF`. Without the module these
//! tests are skipped, unless `CARDVAULT_REQUIRE_SOFTHSM` is set (CI sets it).

use std::path::{Path, PathBuf};
use std::process::Command;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const TOKEN: &str = "cardvault";
pub const KEY: &str = "cardvault-kek";
pub const PIN: &str = "4417-user-pin";
const SO_PIN: &str = "9921-so-pin";

/// Whether SoftHSM2 tests can run here; panics if they must and cannot.
pub fn available() -> bool {
    let found = Path::new(MODULE).is_file();
    if !found {
        assert!(
            std::env::var_os("CARDVAULT_REQUIRE_SOFTHSM").is_none(),
            "SoftHSM2 is required here (apt-get install softhsm2)"
        );
        eprintln!("SKIPPED: no SoftHSM2 (apt-get install softhsm2)");
    }
    found
}

/// One test's SoftHSM2: its config and token folder.
pub struct SoftHsm {
    pub conf: PathBuf,
    pub tokens: PathBuf,
}

impl SoftHsm {
    pub fn new(root: &Path) -> SoftHsm {
        let tokens = root.join("hsm-tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = root.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        SoftHsm { conf, tokens }
    }

    /// `softhsm2-util ARGS` on this test's tokens; panics on failure.
    pub fn util(&self, args: &[&str]) -> String {
        let out = Command::new("softhsm2-util")
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "softhsm2-util {args:?}: {text}");
        text
    }

    pub fn init_token(&self, label: &str) {
        self.util(&[
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            PIN,
            "--so-pin",
            SO_PIN,
        ]);
    }

    /// The token wiped: every key on it gone.
    pub fn delete_token(&self, label: &str) {
        self.util(&["--delete-token", "--token", label]);
    }

    /// Imports `key` (32 bytes) as an AES key labelled `label` with `CKA_ID` `id`: a key
    /// whose value existed outside the device.
    pub fn import_aes(&self, token: &str, label: &str, id: &str, key: &[u8], dir: &Path) {
        let file = dir.join("imported.key");
        std::fs::write(&file, key).unwrap();
        self.util(&[
            "--import",
            file.to_str().unwrap(),
            "--aes",
            "--token",
            token,
            "--label",
            label,
            "--id",
            &cardvault::crypto::hex(id.as_bytes()),
            "--pin",
            PIN,
        ]);
        std::fs::remove_file(&file).unwrap();
    }
}

/// The `[kek]` section naming this harness's token and key, the PIN in `hsm.pin`.
pub fn kek_section() -> String {
    format!(
        "[kek]\nbackend = \"pkcs11\"\n[kek.pkcs11]\nmodule = \"{MODULE}\"\ntoken_label = \"{TOKEN}\"\n\
         key_label = \"{KEY}\"\npin_file = \"hsm.pin\"\n"
    )
}
