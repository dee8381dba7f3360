//! Memory and CPU of a contender's whole process group, from /proc. Every contender is started as the
//! leader of its own process group, so the group is exactly the contender and anything it forked
//! (socat forks one child per connection).

use std::fs;

/// Memory of a process group, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    /// Sum of the processes' RSS.
    pub rss_kib: u64,
    /// Sum of the processes' PSS (shared pages divided among the processes sharing them).
    pub pss_kib: u64,
    pub processes: usize,
}

/// The processes whose process group is `pgid`.
pub fn group(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(f) = stat_fields(pid) {
            if f.get(2).and_then(|s| s.parse::<i32>().ok()) == Some(pgid) {
                out.push(pid);
            }
        }
    }
    out
}

/// Fields of /proc/<pid>/stat after the command name: index 0 is field 3 (state).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// RSS and PSS summed over the group, from smaps_rollup.
pub fn group_mem(pgid: i32) -> Mem {
    let mut m = Mem::default();
    for pid in group(pgid) {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
            continue;
        };
        m.processes += 1;
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(key), Some(v)) = (it.next(), it.next()) else {
                continue;
            };
            let v: u64 = v.parse().unwrap_or(0);
            match key {
                "Rss:" => m.rss_kib += v,
                "Pss:" => m.pss_kib += v,
                _ => {}
            }
        }
    }
    m
}

/// CPU seconds (user + system, including reaped children) summed over the group.
pub fn group_cpu_secs(pgid: i32) -> f64 {
    let tick = clock_ticks();
    let mut ticks = 0u64;
    for pid in group(pgid) {
        if let Some(f) = stat_fields(pid) {
            // Fields 14-17: utime, stime, cutime, cstime.
            for i in 11..=14 {
                ticks += f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    ticks as f64 / tick
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}
