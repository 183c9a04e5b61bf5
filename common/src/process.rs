//! What every Strata binary sets for its own process before it starts work.

/// Transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`), unless the
/// environment sets `STRATA_HUGE_PAGES=on`.
///
/// The allocator (mimalloc) asks the kernel for huge pages where it offers them (`madvise`
/// mode, Debian's default), and a 2 MiB page stays resident while any byte of it is in use. The
/// serving layer over a 10M-event version, asked the bench's spread keys, peaked at 630 MiB with
/// 316 MiB of it in huge pages, and at 473 MiB with them off, back to back on the same data
/// (docs/PERFORMANCE.md). Whether the kernel has huge pages to give depends on how fragmented
/// its memory is at the time, so the same run peaked anywhere from 395 to 630 MiB before.
pub fn set_up() {
    if std::env::var("STRATA_HUGE_PAGES").is_ok_and(|v| v == "on") {
        return;
    }
    // Not every kernel has the call (before Linux 3.15); the process then runs as it would
    // have, and the logs are not yet set up to say so.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

/// The calling thread at the lowest scheduling priority (nice 19), for background work that
/// should take only the CPU time nothing else wants: on Linux the nice value is per thread.
/// Where the call fails, the thread keeps its priority.
pub fn background_thread() {
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_thread_runs_at_nice_19_and_others_keep_theirs() {
        let before = rustix::process::getpriority_process(None).expect("priority");
        let inside = std::thread::spawn(|| {
            background_thread();
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("priority")
        })
        .join()
        .expect("thread");
        assert_eq!(inside, 19);
        assert_eq!(
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("priority"),
            before
        );
    }

    #[test]
    fn huge_pages_are_off_for_the_process_after_set_up() {
        if std::env::var("STRATA_HUGE_PAGES").is_ok_and(|v| v == "on") {
            panic!("STRATA_HUGE_PAGES=on is set: this test checks the default");
        }
        set_up();
        assert_eq!(
            rustix::thread::transparent_huge_pages_are_disabled().ok(),
            Some(true)
        );
    }
}
