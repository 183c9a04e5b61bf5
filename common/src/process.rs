//! What every Strata binary sets for its own process before it starts work.

/// Transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`), unless the
/// environment sets `STRATA_HUGE_PAGES=on`.
///
/// The allocator (mimalloc) asks the kernel for huge pages where it offers them (`madvise`
/// mode, Debian's default), and a 2 MiB page stays resident while any byte of it is in use. The
/// serving layer over a 10M-event version, asked the bench's spread keys, peaked at 550 MiB with
/// 304 MiB of it in huge pages, and at 457 MiB with them off, run for run on the same data with
/// no loss of requests per second (docs/PERFORMANCE.md). Whether the kernel has huge pages to
/// give depends on how fragmented its memory is, so without this the same run peaked anywhere
/// from 395 to 593 MiB.
pub fn set_up() {
    if std::env::var("STRATA_HUGE_PAGES").is_ok_and(|v| v == "on") {
        return;
    }
    // Not every kernel has the call (before Linux 3.15); the process then runs as it would
    // have, and the logs are not yet set up to say so.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}
