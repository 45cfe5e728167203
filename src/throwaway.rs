//! A throwaway PostgreSQL cluster: `initdb` into a folder, `pg_ctl start` on a free loopback
//! port (and a Unix socket in the same folder), `fsync = on`, a `cardvault` database; stopped
//! when dropped. For `cardvault bench --store postgres` and the end-to-end tests; never for
//! serving cards.
//!
//! PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user and
//! every server command runs through `runuser -u postgres --`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where Debian puts the server binaries (not on `PATH`).
const BIN_DIRS: &[&str] = &["/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin"];

pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    running: bool,
}

/// The folder of the server binaries, if PostgreSQL is installed.
pub fn bin_dir() -> Option<PathBuf> {
    BIN_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("initdb").exists())
}

fn as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs a server binary, as `postgres` when we are root.
fn run(bin: &Path, args: &[&str]) -> Result<Output, String> {
    let mut cmd = if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args)
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))
}

fn checked(what: &str, out: Output) -> Result<Output, String> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn text(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))
}

impl Cluster {
    /// A new cluster in `parent/pg` with a `cardvault` database, running.
    pub fn start(parent: &Path) -> Result<Cluster, String> {
        let bin = bin_dir().ok_or("no PostgreSQL server binaries (apt-get install postgresql)")?;
        let dir = parent.join("pg");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if as_root() {
            let out = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .output()
                .map_err(|e| format!("chown: {e}"))?;
            checked("chown", out)?;
            // The postgres user must be able to reach its folder.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let data = dir.join("data");
        let out = run(
            &bin.join("initdb"),
            &[
                "-D",
                text(&data)?,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )?;
        checked("initdb", out)?;
        let mut cluster = Cluster {
            bin,
            dir,
            port: 0,
            running: false,
        };
        cluster.start_again()?;
        checked(
            "CREATE DATABASE",
            cluster.psql("postgres", "CREATE DATABASE cardvault")?,
        )?;
        Ok(cluster)
    }

    /// Starts the (stopped) cluster again, on the port it had (a free one the first time).
    pub fn start_again(&mut self) -> Result<(), String> {
        if self.port == 0 {
            self.port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?
                .port();
        }
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on \
             -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        let out = run(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                text(&self.dir.join("data"))?,
                "-o",
                &options,
                "-l",
                text(&log)?,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        checked("pg_ctl start", out)
            .map_err(|e| format!("{e}{}", std::fs::read_to_string(&log).unwrap_or_default()))?;
        self.running = true;
        Ok(())
    }

    /// Turns TLS on with this server certificate and key (PEM) and refuses connections over TCP
    /// without it, then restarts the cluster.
    pub fn require_tls(&mut self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.dir.join("data");
        let write = |name: &str, text: &str, mode: u32| -> Result<(), String> {
            let path = data.join(name);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if as_root() {
                checked(
                    "chown",
                    Command::new("chown")
                        .args(["postgres:postgres"])
                        .arg(&path)
                        .output()
                        .map_err(|e| format!("chown: {e}"))?,
                )?;
            }
            Ok(())
        };
        write("server.crt", cert_pem, 0o644)?;
        write("server.key", key_pem, 0o600)?;
        write(
            "pg_hba.conf",
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
            0o600,
        )?;
        let conf = data.join("postgresql.conf");
        let mut text =
            std::fs::read_to_string(&conf).map_err(|e| format!("{}: {e}", conf.display()))?;
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
        self.stop();
        self.start_again()
    }

    /// Stops the cluster at once (`-m immediate`: like a crash of the database server).
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        if let Ok(data) = text(&self.dir.join("data")) {
            let _ = run(
                &self.bin.join("pg_ctl"),
                &["-D", data, "-m", "immediate", "-w", "stop"],
            );
        }
        self.running = false;
    }

    /// A synchronous standby of this cluster in `parent/NAME` (`pg_basebackup -R`), running
    /// on a port of its own; this cluster then waits for it at every commit
    /// (`synchronous_standby_names = '*'`, `synchronous_commit = on`).
    pub fn standby(&self, name: &str) -> Result<Cluster, String> {
        let parent = self
            .dir
            .parent()
            .ok_or("the cluster's folder has no parent")?;
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if as_root() {
            checked(
                "chown",
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir)
                    .output()
                    .map_err(|e| format!("chown: {e}"))?,
            )?;
        }
        let port = self.port.to_string();
        let out = run(
            &self.bin.join("pg_basebackup"),
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                text(&dir.join("data"))?,
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        )?;
        checked("pg_basebackup", out)?;
        let mut standby = Cluster {
            bin: self.bin.clone(),
            dir,
            port: 0,
            running: false,
        };
        standby.start_again()?;
        checked(
            "synchronous_standby_names",
            self.psql(
                "postgres",
                "ALTER SYSTEM SET synchronous_standby_names = '*'",
            )?,
        )?;
        checked(
            "pg_reload_conf",
            self.psql("postgres", "SELECT pg_reload_conf()")?,
        )?;
        Ok(standby)
    }

    /// Promotes this standby to primary and waits until it accepts writes.
    pub fn promote(&self) -> Result<(), String> {
        let out = run(
            &self.bin.join("pg_ctl"),
            &["-D", text(&self.dir.join("data"))?, "-w", "promote"],
        )?;
        checked("pg_ctl promote", out).map(drop)
    }

    /// SIGKILL to the postmaster and every process it started: a crash of the machine's
    /// database, with no shutdown of any kind.
    pub fn kill9(&mut self) -> Result<(), String> {
        let pid = self.pid().ok_or("the cluster is not running")?.to_string();
        let signal = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .output()
                .map_err(|e| format!("{program}: {e}"))
        };
        // Stopped first, so it neither notices nor restarts the children killed next.
        let stopped = signal("kill", &["-STOP", &pid])?;
        let children = signal("pkill", &["-KILL", "-P", &pid])?;
        let parent = signal("kill", &["-KILL", &pid])?;
        if !stopped.status.success() || !children.status.success() || !parent.status.success() {
            return Err(format!(
                "could not kill the postmaster {pid} and its children"
            ));
        }
        self.running = false;
        Ok(())
    }

    /// The postmaster's process id, while running.
    pub fn pid(&self) -> Option<u32> {
        let pid = std::fs::read_to_string(self.dir.join("data").join("postmaster.pid")).ok()?;
        pid.lines().next()?.trim().parse().ok()
    }

    /// The URL a daemon connects with: loopback TCP, no password.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/cardvault", self.port)
    }

    /// The `[store]` section for a daemon on this cluster; `extra` goes in `[store.postgres]`.
    pub fn store_config(&self, extra: &str) -> String {
        format!(
            "[store]\nengine = \"postgres\"\n[store.postgres]\nurl = \"{}\"\n{extra}\n",
            self.url()
        )
    }

    /// A client program of this cluster's, pointed at it as `postgres`.
    fn client(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]);
        cmd
    }

    /// Runs SQL through `psql` on database `db`.
    pub fn psql(&self, db: &str, sql: &str) -> Result<Output, String> {
        self.client("psql")
            .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .map_err(|e| format!("psql: {e}"))
    }

    /// A plain-SQL dump of the `cardvault` database.
    pub fn dump(&self) -> Result<Vec<u8>, String> {
        let out = self
            .client("pg_dump")
            .args(["--no-owner", "cardvault"])
            .output()
            .map_err(|e| format!("pg_dump: {e}"))?;
        Ok(checked("pg_dump", out)?.stdout)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
