//! The `process_*` families and the allocator's heap, read from /proc and glibc.

use super::render::Family;

/// The fields of a `/proc/<pid>/stat` after the command name, which may hold spaces, so
/// they are counted from its closing parenthesis: the state is index 0, so field N
/// (1-based, man proc) is index N - 3.
pub(super) fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

fn field(fields: &[&str], i: usize) -> Option<f64> {
    fields.get(i).and_then(|v| v.parse::<f64>().ok())
}

/// User and system CPU seconds from fields 14 and 15 (utime, stime, in clock ticks).
pub(super) fn cpu_seconds(fields: &[&str]) -> Option<f64> {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((field(fields, 11)? + field(fields, 12)?) / ticks)
}

/// CPU seconds (user + system) process `pid` has used so far; the benchmarks measure
/// the replicas they start with it.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_seconds(&stat_fields(&stat)?)
}

/// What the allocator holds for live data and what it keeps freed: resident memory well
/// above the first is memory freed after a burst (a join storm) and not given back, not
/// state that grows.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(super) fn heap_metrics(f: &mut Family<'_>) {
    // SAFETY: mallinfo2 reads the allocator's own counters and has no preconditions.
    let m = unsafe { libc::mallinfo2() };
    f.one(
        "hydrascale_heap_in_use_bytes",
        "gauge",
        "Bytes allocated and not yet freed (glibc mallinfo2: uordblks + hblkhd).",
        (m.uordblks + m.hblkhd) as f64,
    );
    f.one(
        "hydrascale_heap_free_bytes",
        "gauge",
        "Bytes freed but kept by the allocator in its arenas (glibc mallinfo2: fordblks).",
        m.fordblks as f64,
    );
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) fn heap_metrics(_f: &mut Family<'_>) {}

/// `process_*` families as the Go and Python clients name them, from /proc.
pub(super) fn process_metrics(out: &mut String) {
    let mut f = Family { out };
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    let Some(fields) = stat_fields(&stat) else {
        return;
    };
    let num = |i: usize| field(&fields, i);
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    if let Some(cpu) = cpu_seconds(&fields) {
        f.one(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            cpu,
        );
    }
    if let Some(rss) = num(21) {
        f.one(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss * page,
        );
    }
    heap_metrics(&mut f);
    if let Some(vsize) = num(20) {
        f.one(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            vsize,
        );
    }
    if let (Some(start), Ok(uptime)) = (num(19), std::fs::read_to_string("/proc/uptime")) {
        let boot_ago = uptime
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        if let Some(up) = boot_ago {
            f.one(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch, in seconds.",
                (now - up + start / ticks).round(),
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        f.one(
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            fds.count(),
        );
    }
}
