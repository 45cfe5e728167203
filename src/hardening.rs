//! Process hardening, through rustix's safe wrappers (`unsafe_code` stays forbidden):
//!
//! - no core dumps: `RLIMIT_CORE` 0 and `PR_SET_DUMPABLE` 0 (the latter also keeps other
//!   processes of the same user from attaching or reading `/proc/PID/mem`), for every command,
//!   since `unseal` and `keys` handle shares and passphrases too;
//! - memory locked (`mlockall`, current and future pages, as they are touched) where the OS
//!   allows it without a limit (memlock unlimited, or `CAP_IPC_LOCK`), so keys and card data
//!   never reach swap; a warning where it does not;
//! - transparent huge pages off, so a heap of small objects is not made resident (and
//!   locked) 2 MiB at a time;
//! - a warning when running as root.

use rustix::mm::{mlockall, MlockAllFlags};
use rustix::process::{
    geteuid, getrlimit, set_dumpable_behavior, setrlimit, DumpableBehavior, Resource, Rlimit,
};

/// Turns core dumps off for this process. Errors are returned for the caller to refuse or
/// report; neither call fails on Linux for an unprivileged process lowering its own limits.
pub fn no_core_dumps() -> std::io::Result<()> {
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

/// Locks the process's memory where no limit can bite, and says what it did: when the memlock
/// limit is unlimited, or the process holds `CAP_IPC_LOCK` (which exempts it from the limit;
/// a container started with `--cap-add IPC_LOCK` keeps the default 8 MiB limit but has it).
/// Otherwise it is not tried, not even as root (root without `CAP_IPC_LOCK`, in a container,
/// is held to the limit): with future pages locked, allocations past the limit would fail
/// later, in the middle of serving.
pub fn lock_memory() {
    let limit = getrlimit(Resource::Memlock);
    if limit.current.is_some() && !holds_ipc_lock() {
        tracing::warn!(
            memlock_bytes = limit.current,
            "memory is not locked (RLIMIT_MEMLOCK is limited, no CAP_IPC_LOCK): keys could \
             reach swap; set LimitMEMLOCK=infinity (systemd), grant CAP_IPC_LOCK, or disable swap"
        );
        return;
    }
    match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT) {
        Ok(()) => tracing::info!("memory locked: keys and card data stay out of swap"),
        Err(e) => tracing::warn!(error = %e, "memory could not be locked: keys could reach swap"),
    }
}

/// Whether `CAP_IPC_LOCK` is in this thread's effective set (the kernel checks the calling
/// thread's). An error reading it counts as no.
fn holds_ipc_lock() -> bool {
    rustix::thread::capabilities(None).is_ok_and(|sets| {
        sets.effective
            .contains(rustix::thread::CapabilitySet::IPC_LOCK)
    })
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`), whatever the
/// system setting or the allocator asks for. The heap is many small objects spread over the
/// allocator's arenas; with THP, sled alone holding 1M records was resident at 115 MiB
/// instead of 76, and with `mlockall` every such page is locked too. No speed difference was
/// measured.
pub fn no_huge_pages() {
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(error = %e, "transparent huge pages could not be turned off");
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    geteuid().is_root()
}

/// Warns about running as root: nothing here needs it.
pub fn warn_if_root() {
    if is_root() {
        tracing::warn!("running as root: run cardvault as its own unprivileged user");
    }
}

#[cfg(test)]
mod tests {
    /// The capability read agrees with what the kernel reports for this thread in
    /// `/proc/thread-self/status` (bit 14 of `CapEff`), whichever way this machine has it.
    #[test]
    fn ipc_lock_is_read_from_the_effective_set() {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(super::holds_ipc_lock(), cap_eff & (1 << 14) != 0);
    }
}
