//! Process hardening, through rustix's safe wrappers (`unsafe_code` stays forbidden):
//!
//! - no core dumps: `RLIMIT_CORE` 0 and `PR_SET_DUMPABLE` 0 (the latter also keeps other
//!   processes of the same user from attaching or reading `/proc/PID/mem`), for every command,
//!   since `unseal` and `keys` handle shares and passphrases too;
//! - memory locked (`mlockall`, current and future pages, as they are touched) where the OS
//!   allows it, so keys and card data never reach swap; a warning where it does not;
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

/// Locks the process's memory if the memlock limit is unlimited, and says what it did. A
/// limited memlock is not tried, not even as root (root without CAP_IPC_LOCK, in a container,
/// is held to it): with future pages locked, allocations past the limit would fail later, in
/// the middle of serving.
pub fn lock_memory() {
    let limit = getrlimit(Resource::Memlock);
    if limit.current.is_some() {
        tracing::warn!(
            memlock_bytes = limit.current,
            "memory is not locked (RLIMIT_MEMLOCK is limited): keys could reach swap; \
             set LimitMEMLOCK=infinity (systemd) or disable swap"
        );
        return;
    }
    match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT) {
        Ok(()) => tracing::info!("memory locked: keys and card data stay out of swap"),
        Err(e) => tracing::warn!(error = %e, "memory could not be locked: keys could reach swap"),
    }
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

/// Warns about running as root: nothing here needs it.
pub fn warn_if_root() {
    if geteuid().is_root() {
        tracing::warn!("running as root: run cardvault as its own unprivileged user");
    }
}
