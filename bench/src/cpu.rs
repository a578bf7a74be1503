//! CPU time of processes from `/proc`: where a run's CPU went, per part of the pipeline.

/// CPU time (user + system) of a process so far, in milliseconds.
pub(crate) fn of_pid(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    ticks_ms(&stat)
}

/// CPU time (user + system) so far of every process whose command name is `comm`
/// (`postgres`, `beam.smp`), in milliseconds.
pub(crate) fn of_comm(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            stat.split_once(" (")
                .and_then(|(_, r)| r.rsplit_once(')'))
                .is_some_and(|(name, _)| name == comm)
        })
        .map(|stat| ticks_ms(&stat))
        .sum()
}

fn ticks_ms(stat: &str) -> f64 {
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 * 1000.0 / ticks
}

/// Milliseconds of CPU the machine has had since boot (all cores), from `/proc/stat`'s
/// first line: busy and idle, to tell how full the cores were.
pub(crate) fn machine_ms() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    let all: u64 = f.iter().take(8).sum();
    (
        (all - idle) as f64 * 1000.0 / ticks,
        idle as f64 * 1000.0 / ticks,
    )
}
