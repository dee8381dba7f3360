//! The standard `process_*` series, read from `/proc/self` at scrape time, so an operator can follow
//! memory and descriptors per connection without another exporter on the gateway.

use super::{family, sample};

/// Kernel clock ticks per second for `/proc/<pid>/stat` times (USER_HZ, 100 on every Linux ABI).
const TICKS_PER_SECOND: f64 = 100.0;

/// Appends the process series that can be read; any that cannot are left out.
pub(super) fn render(out: &mut String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(kib) = status_kib(&status, "VmRSS:") {
        gauge(
            out,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            (kib * 1024) as f64,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        // Less the descriptor that lists the directory.
        let open = fds.count().saturating_sub(1);
        gauge(out, "process_open_fds", "Number of open file descriptors.", open as f64);
    }
    if let Some(max) = open_files_limit() {
        gauge(
            out,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            max as f64,
        );
    }
    if let Some((cpu, start)) = stat_times() {
        let name = "process_cpu_seconds_total";
        family(out, name, "counter", "Total user and system CPU time spent in seconds.");
        sample(out, name, &[], cpu);
        if let Some(start) = start {
            gauge(
                out,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                start,
            );
        }
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    family(out, name, "gauge", help);
    sample(out, name, &[], value);
}

fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The soft limit on open files (`ulimit -n`, systemd's `LimitNOFILE=`).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// CPU seconds used, and the start time as a Unix timestamp (when the boot time is known).
fn stat_times() -> Option<(f64, Option<f64>)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses; the fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Counting from `state` as field 3 of proc(5): utime 14, stime 15, starttime 22.
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    let cpu = (field(14)? + field(15)?) / TICKS_PER_SECOND;
    let start = boot_time()
        .zip(field(22))
        .map(|(boot, ticks)| boot + ticks / TICKS_PER_SECOND);
    Some((cpu, start))
}

fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok();
    let btime = stat.and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok());
    // The systemd unit's ProcSubset=pid hides /proc/stat: the boot time is then now minus CLOCK_BOOTTIME, the
    // clock /proc/<pid>/stat counts start times on.
    btime.or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        let up = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Some(now.as_secs_f64() - (up.tv_sec as f64 + up.tv_nsec as f64 / 1e9))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let mut out = String::new();
        render(&mut out);
        for name in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_cpu_seconds_total",
            "process_start_time_seconds",
        ] {
            assert!(out.contains(&format!("\n{name} ")), "{name} missing:\n{out}");
        }
        let start: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("process_start_time_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0 * 365.0,
            "start {start}, now {now}"
        );
    }
}
