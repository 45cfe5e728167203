//! The tests' PostgreSQL: a [`cardvault::throwaway::Cluster`] per test that asks for one.
//! Without the server binaries those tests are skipped, unless `CARDVAULT_REQUIRE_POSTGRES` is
//! set (CI sets it).

use std::path::Path;

pub use cardvault::throwaway::Cluster as PgCluster;

/// Whether PostgreSQL tests can run here; panics if they must and cannot.
pub fn available() -> bool {
    let found = cardvault::throwaway::bin_dir().is_some();
    if !found {
        assert!(
            std::env::var_os("CARDVAULT_REQUIRE_POSTGRES").is_none(),
            "PostgreSQL server binaries are required here (apt-get install postgresql)"
        );
        eprintln!("SKIPPED: no PostgreSQL server binaries (apt-get install postgresql)");
    }
    found
}

/// A running cluster in `parent`; panics if it cannot start.
pub fn start(parent: &Path) -> PgCluster {
    PgCluster::start(parent).unwrap_or_else(|e| panic!("PostgreSQL did not start: {e}"))
}

/// One value (or rows, one per line) from a query on the `cardvault` database.
pub fn query(pg: &PgCluster, sql: &str) -> String {
    let out = pg.psql("cardvault", sql).unwrap();
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
