//! The CPU thread count of the tensor kernels, settled once at start.
//!
//! candle's CPU backend asks for its thread count on every matmul and, unless `RAYON_NUM_THREADS` is
//! set, re-reads `/proc/cpuinfo` each time (most of a token's time on a tiny model). So the binaries
//! decide the count once — `--threads`, else the cgroup's CPU quota (a container's `cpu.max`), else
//! the cores this process may run on — then export it as `RAYON_NUM_THREADS` (what candle reads) and
//! build rayon's global pool with it before any kernel runs. The engine's forward passes run on a pool
//! of the same size whose first worker is the engine loop itself (`Engine::spawn`).

use std::path::Path;

/// The thread count for `requested` (0: decide from the cgroup quota and the available cores).
pub fn effective(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cgroup_quota(Path::new("/sys/fs/cgroup")).map_or(cores, |q| q.min(cores))
}

/// Whole CPUs granted by the cgroup v2 quota under `root` (`cpu.max` = `QUOTA PERIOD`, rounded up),
/// or the v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`; none when unlimited or unreadable.
pub fn cgroup_quota(root: &Path) -> Option<usize> {
    let whole = |quota: f64, period: f64| {
        (quota > 0.0 && period > 0.0).then(|| ((quota / period).ceil() as usize).max(1))
    };
    if let Ok(s) = std::fs::read_to_string(root.join("cpu.max")) {
        let mut f = s.split_whitespace();
        let quota = f.next()?.parse().ok()?; // `max`: no quota
        let period = f.next()?.parse().ok()?;
        return whole(quota, period);
    }
    let read = |name: &str| -> Option<f64> {
        std::fs::read_to_string(root.join("cpu").join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    whole(read("cpu.cfs_quota_us")?, read("cpu.cfs_period_us")?)
}

/// Settles the kernel thread count for this process: exports `RAYON_NUM_THREADS` and builds rayon's
/// global pool with [`effective`]`(requested)` threads; returns the count.
///
/// # Safety
/// Call it first thing in `main`, before any other thread exists: it changes the environment.
#[allow(unsafe_code)]
pub unsafe fn settle(requested: usize) -> usize {
    let n = effective(requested);
    // SAFETY: the caller guarantees that no other thread runs yet (nothing reads the environment
    // concurrently).
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    // Fails only if a pool exists already, which cannot happen before the first kernel.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("kernel-{i}"))
        .build_global();
    n
}

/// The threads the tensor kernels use in this process now (rayon's global pool).
pub fn current() -> usize {
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(files: &[(&str, &str)]) -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("cgroup-{}-{n}", std::process::id()));
        for (name, body) in files {
            let p = d.join(name);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, body).expect("write");
        }
        d
    }

    #[test]
    fn cgroup_quotas_round_up_to_whole_cpus() {
        assert_eq!(cgroup_quota(&dir(&[("cpu.max", "max 100000\n")])), None);
        assert_eq!(cgroup_quota(&dir(&[("cpu.max", "200000 100000\n")])), Some(2));
        assert_eq!(cgroup_quota(&dir(&[("cpu.max", "150000 100000\n")])), Some(2));
        assert_eq!(cgroup_quota(&dir(&[("cpu.max", "10000 100000\n")])), Some(1));
        let v1 = [
            ("cpu/cpu.cfs_quota_us", "300000\n"),
            ("cpu/cpu.cfs_period_us", "100000\n"),
        ];
        assert_eq!(cgroup_quota(&dir(&v1)), Some(3));
        let unlimited = [
            ("cpu/cpu.cfs_quota_us", "-1\n"),
            ("cpu/cpu.cfs_period_us", "100000\n"),
        ];
        assert_eq!(cgroup_quota(&dir(&unlimited)), None);
        assert_eq!(cgroup_quota(&dir(&[])), None);
    }

    #[test]
    fn an_explicit_count_wins() {
        assert_eq!(effective(3), 3);
        assert!(effective(0) >= 1);
    }
}
