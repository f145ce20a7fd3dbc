//! What the proxy asks of the operating system: the CPUs it may use, thread pinning, and
//! `SO_REUSEPORT` listening sockets.
//!
//! The only `unsafe` in the data plane lives here, each block with the reason it is sound.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Listen backlog for every proxy listener.
const BACKLOG: i32 = 1024;

/// The CPUs this process may run on (its affinity mask), in ascending order.
#[allow(unsafe_code)]
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: `cpu_set_t` is a plain bitmask for which all-zeroes is a valid value, and
    // `sched_getaffinity` writes at most `size_of::<cpu_set_t>()` bytes into the set we own.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        set
    };
    // SAFETY: `CPU_ISSET` only reads the set, and every index is below `CPU_SETSIZE`.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins the calling thread to one CPU.
#[allow(unsafe_code)]
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpu {cpu} is out of range"),
        ));
    }
    // SAFETY: the set is zero-initialised and owned here, `cpu` was checked against
    // `CPU_SETSIZE` above, and `sched_setaffinity` only reads the set.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The CPU limit of the process's cgroup (v2 `cpu.max`, else v1 `cfs_quota_us`), rounded
/// up to whole CPUs; `None` when there is no limit or no cgroup information.
pub fn cgroup_cpu_limit() -> Option<usize> {
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cpu.max")
        .ok()
        .and_then(|text| parse_cpu_max(&text));
    v2.or_else(|| {
        let quota = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").ok()?;
        let period = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_period_us").ok()?;
        quota_to_cpus(quota.trim().parse().ok()?, period.trim().parse().ok()?)
    })
}

/// Parses cgroup v2 `cpu.max` (`"<quota|max> <period>"`).
fn parse_cpu_max(text: &str) -> Option<usize> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    let period = fields.next()?.parse().ok()?;
    quota_to_cpus(quota.parse().ok()?, period)
}

fn quota_to_cpus(quota: i64, period: i64) -> Option<usize> {
    if quota <= 0 || period <= 0 {
        return None;
    }
    usize::try_from((quota + period - 1) / period)
        .ok()
        .map(|cpus| cpus.max(1))
}

/// The default worker count: the CPUs in the affinity mask, capped by the cgroup quota, so a
/// pod limited to one CPU runs one worker.
pub fn default_workers() -> usize {
    let cpus = allowed_cpus().map(|cpus| cpus.len()).unwrap_or(1).max(1);
    cgroup_cpu_limit().map_or(cpus, |limit| cpus.min(limit))
}

/// Binds a non-blocking listening TCP socket with `SO_REUSEPORT`, so each worker can own one
/// socket on the same address and the kernel spreads connections among them.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_quota_rounds_up_to_whole_cpus() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("100000 100000\n"), Some(1));
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("50000 100000\n"), Some(1));
        assert_eq!(parse_cpu_max("garbage"), None);
    }

    #[test]
    fn this_process_may_use_some_cpu() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        assert!(default_workers() >= 1 && default_workers() <= cpus.len());
    }

    #[test]
    fn reuseport_lets_two_sockets_share_a_port() {
        let first = bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind_reuseport(addr).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
    }
}
