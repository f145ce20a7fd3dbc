//! What the proxy asks of the operating system: the CPUs it may use, thread pinning,
//! `SO_REUSEPORT` listening sockets, the original destination of an intercepted connection,
//! the socket mark of the proxy's own connections, and aborting a connection with a reset.
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

/// Asks the kernel's fair scheduler for a time slice of `slice_ns` for the calling thread
/// (EEVDF's custom slice, Linux 6.12 and later, which clamps it to 0.1–100 ms; older kernels
/// ignore it). A thread whose slice is shorter than its neighbours' gets an earlier deadline
/// when it wakes, so it runs sooner instead of queueing behind a busy neighbour's slice; its
/// share of the CPU is unchanged. Returns the slice the thread had: 0 where the kernel has
/// no custom slices.
#[allow(unsafe_code)]
pub fn set_thread_slice(slice_ns: u64) -> io::Result<u64> {
    let size = std::mem::size_of::<libc::sched_attr>() as u32;
    // SAFETY: `sched_attr` is plain data for which all-zeroes is valid, and `sched_getattr`
    // writes at most `size` bytes into the one owned here, for the calling thread (0).
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr, size, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let fair = [libc::SCHED_OTHER, libc::SCHED_BATCH].map(|policy| policy as u32);
    if !fair.contains(&attr.sched_policy) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the thread is not under the fair scheduler",
        ));
    }
    let previous = attr.sched_runtime;
    attr.size = size;
    attr.sched_runtime = slice_ns;
    // SAFETY: `sched_setattr` only reads the struct, whose `size` is set; its policy, nice
    // value and flags are the thread's own, as read above.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(previous)
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

/// Where an intercepted connection was going before `tern-proxy init`'s rules redirected it
/// (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` on an IPv6 socket).
pub fn original_destination(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<SocketAddr> {
    match rustix::net::getsockname(fd)? {
        addr if addr.address_family() == rustix::net::AddressFamily::INET6 => {
            rustix::net::sockopt::ipv6_original_dst(fd)
                .map(SocketAddr::V6)
                .map_err(Into::into)
        }
        _ => rustix::net::sockopt::ip_original_dst(fd)
            .map(SocketAddr::V4)
            .map_err(Into::into),
    }
}

/// Borrows the descriptor of a socket that exposes only `AsRawFd` (tokio-uring's).
#[allow(unsafe_code)]
pub fn borrow_fd<T: std::os::fd::AsRawFd>(owner: &T) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `owner`, which stays alive (and so keeps it open) for
    // as long as the returned borrow, whose lifetime is tied to `owner`'s.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(owner.as_raw_fd()) }
}

/// Ends a TCP connection at once with a reset: `connect(AF_UNSPEC)` disconnects it (connect(2)),
/// sending RST and failing whatever reads and writes are pending, io_uring's included. A
/// kernel-TLS socket refuses the disconnect; it resets when closed instead (`SO_LINGER` 0).
pub fn abort(socket: std::os::fd::BorrowedFd<'_>) {
    if rustix::net::connect_unspec(socket).is_err() {
        // A kernel-TLS socket refuses the disconnect: reset on close. (A shutdown here would
        // send a FIN first, and the peer would see an orderly end.)
        let _ = socket2::SockRef::from(&socket).set_linger(Some(std::time::Duration::ZERO));
    }
}

/// Whether this network namespace has IPv6 (a kernel booted with `ipv6.disable=1`, or a
/// namespace without it, cannot bind `[::]`).
pub fn ipv6_available() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Whether a read on `fd` would return at once (bytes, end of stream or an error), looked at
/// without taking anything (`MSG_PEEK | MSG_DONTWAIT`).
pub fn read_ready(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(&fd)
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until a read on `fd` would return at once, through tokio's reactor (which
/// tokio-uring runs too): unlike a ring read, this wait can be abandoned without losing
/// bytes. The registration ends with the wait; it does not own, or close, the descriptor.
#[allow(unsafe_code)]
pub async fn wait_readable(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is borrowed for as long as this future lives, so the descriptor stays open
    // and refers to the same socket for the whole life of the `AsyncFd`, which is dropped
    // before the future completes.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }?;
    loop {
        let mut ready = registered.readable().await?;
        if read_ready(fd)? {
            return Ok(());
        }
        ready.clear_ready();
    }
}

/// Runs the non-blocking send `send` on `fd` until it does not fail with `WouldBlock`,
/// waiting in between until `fd` has room, through tokio's reactor (as [`wait_readable`]):
/// one registration for all the waits, made only if the first try would block.
#[allow(unsafe_code)]
pub async fn send_when_writable<T>(
    fd: std::os::fd::BorrowedFd<'_>,
    mut send: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    match send() {
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
        done => return done,
    }
    // SAFETY: as in `wait_readable`: `fd` is borrowed for as long as this future lives, and
    // the `AsyncFd` is dropped before it completes.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::WRITABLE)
    }?;
    loop {
        let mut ready = registered.writable().await?;
        match send() {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
            done => return done,
        }
    }
}

/// Opens a TCP connection through tokio (both backends run a tokio reactor), with
/// `TCP_NODELAY` and, if given, the socket mark the interception rules leave alone.
pub async fn connect_marked(
    addr: SocketAddr,
    mark: Option<u32>,
) -> io::Result<tokio::net::TcpStream> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    if let Some(mark) = mark {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    socket.set_nodelay(true)?;
    socket.connect(addr).await
}

/// [`connect_marked`] to a host by name: each address it resolves to in turn (say ::1, then
/// 127.0.0.1 for `localhost`), until one answers.
pub async fn connect_named(
    address: &shared::config::HostPort,
    mark: Option<u32>,
) -> io::Result<tokio::net::TcpStream> {
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} resolves to no address", address.host),
    );
    for addr in tokio::net::lookup_host((address.host.as_str(), address.port)).await? {
        match connect_marked(addr, mark).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last = error,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_gets_the_slice_it_asks_for() {
        std::thread::spawn(|| {
            let kernels = match set_thread_slice(250_000) {
                Ok(0) => return println!("this kernel has no custom scheduler slices"),
                Ok(kernels) => kernels,
                // A seccomp filter or a real-time test runner.
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::PermissionDenied | io::ErrorKind::Unsupported
                    ) =>
                {
                    return println!("no scheduler slice here: {error}");
                }
                Err(error) => panic!("{error}"),
            };
            assert_ne!(kernels, 250_000, "the kernel's slice is not the asked one");
            // Asking again reports the slice the first call set.
            assert_eq!(set_thread_slice(kernels).unwrap(), 250_000);
        })
        .join()
        .unwrap();
    }

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

/// Kernel TLS keys for one direction of a TLS 1.3 connection: the cipher, key, IV (salt and
/// nonce part, as the kernel splits them) and the next record sequence number.
#[derive(Clone)]
pub enum KtlsKeys {
    /// TLS_AES_128_GCM_SHA256.
    Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128),
    /// TLS_AES_256_GCM_SHA384.
    Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256),
    /// TLS_CHACHA20_POLY1305_SHA256.
    Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305),
}

/// Attaches the kernel's TLS upper-layer protocol to a connected TCP socket. The socket
/// behaves as before until keys are installed; `ENOENT` means this kernel has no kTLS.
#[allow(unsafe_code)]
pub fn attach_tls_ulp(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    const NAME: &[u8] = b"tls";
    // SAFETY: `NAME` outlives the call and its length is passed with it; the fd is borrowed,
    // so it is open for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            NAME.as_ptr().cast(),
            NAME.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Installs one direction's keys (`libc::TLS_TX` or `libc::TLS_RX`) on a socket that has
/// the TLS ULP attached.
#[allow(unsafe_code)]
pub fn install_ktls_keys(
    fd: std::os::fd::BorrowedFd<'_>,
    direction: libc::c_int,
    keys: &KtlsKeys,
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    fn raw<T>(info: &T) -> (*const libc::c_void, usize) {
        (std::ptr::from_ref(info).cast(), std::mem::size_of::<T>())
    }
    let (pointer, len) = match keys {
        KtlsKeys::Aes128Gcm(info) => raw(info),
        KtlsKeys::Aes256Gcm(info) => raw(info),
        KtlsKeys::Chacha20Poly1305(info) => raw(info),
    };
    // SAFETY: `pointer` refers to a `#[repr(C)]` uapi struct borrowed for the call, and `len`
    // is exactly its size, as the kernel's `tls_setsockopt` expects for the cipher it names.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TLS,
            direction,
            pointer,
            len as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How many records a kTLS socket has sealed (or opened) under the current keys of one
/// direction: the sequence number of its next record, which the kernel reports with the
/// keys (`getsockopt(SOL_TLS, TLS_TX/TLS_RX)`).
pub fn ktls_sequence(fd: std::os::fd::BorrowedFd<'_>, direction: libc::c_int) -> io::Result<u64> {
    use std::mem::{offset_of, size_of};
    // The kernel takes either the common header alone or exactly the cipher's structure: ask
    // for the header to learn the cipher, then for the structure.
    let mut info = [0u8; 64];
    ktls_crypto_info(
        fd,
        direction,
        &mut info[..size_of::<libc::tls_crypto_info>()],
    )?;
    // `struct tls_crypto_info`: version, then cipher type (native byte order).
    let cipher = u16::from_ne_bytes([info[2], info[3]]);
    let (len, at) = match cipher {
        libc::TLS_CIPHER_AES_GCM_128 => (
            size_of::<libc::tls12_crypto_info_aes_gcm_128>(),
            offset_of!(libc::tls12_crypto_info_aes_gcm_128, rec_seq),
        ),
        libc::TLS_CIPHER_AES_GCM_256 => (
            size_of::<libc::tls12_crypto_info_aes_gcm_256>(),
            offset_of!(libc::tls12_crypto_info_aes_gcm_256, rec_seq),
        ),
        libc::TLS_CIPHER_CHACHA20_POLY1305 => (
            size_of::<libc::tls12_crypto_info_chacha20_poly1305>(),
            offset_of!(libc::tls12_crypto_info_chacha20_poly1305, rec_seq),
        ),
        other => return Err(io::Error::other(format!("unknown kTLS cipher {other}"))),
    };
    let info = info
        .get_mut(..len)
        .ok_or_else(|| io::Error::other("kTLS keys larger than expected"))?;
    ktls_crypto_info(fd, direction, info)?;
    info.get(at..at + 8)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| io::Error::other("the kernel reported short kTLS keys"))
}

/// Reads a kTLS socket's crypto info of one direction into `info`, which must be exactly the
/// size the kernel writes.
#[allow(unsafe_code)]
fn ktls_crypto_info(
    fd: std::os::fd::BorrowedFd<'_>,
    direction: libc::c_int,
    info: &mut [u8],
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is borrowed mutably for
    // the call, and sets `len` to how many it wrote; the fd is borrowed, so open.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TLS,
            direction,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != info.len() {
        return Err(io::Error::other(
            "the kernel reported kTLS keys of an unexpected size",
        ));
    }
    Ok(())
}

/// Receives from a kTLS socket into `buf`'s spare capacity: one record's plaintext (or part
/// of it) and the record's content type (23 application data, 21 alert, 22 handshake).
/// Non-blocking; `WouldBlock` when nothing is ready.
#[allow(unsafe_code)]
pub fn recv_tls_record(
    fd: std::os::fd::BorrowedFd<'_>,
    buf: &mut Vec<u8>,
) -> io::Result<(usize, u8)> {
    use std::os::fd::AsRawFd as _;
    let spare = buf.spare_capacity_mut();
    let mut iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    // Room for one cmsghdr carrying one byte, aligned as cmsghdr requires.
    let mut control = [0u64; 8];
    // SAFETY: all-zeroes is a valid `msghdr` (null pointers, zero lengths).
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `message` points at `iov` (the uninitialised spare capacity of `buf`, which
    // the kernel only writes) and at `control`, both live for the call with the lengths
    // given. The fd is borrowed, so it is open.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut message, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    let mut record_type = 23; // without a cmsg the record is application data
    // SAFETY: the CMSG macros walk the control buffer within `msg_controllen`, which the
    // kernel set to what it wrote; the data read is one byte inside a cmsg it wrote.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&message);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_TLS && (*cmsg).cmsg_type == libc::TLS_GET_RECORD_TYPE
            {
                record_type = *libc::CMSG_DATA(cmsg);
            }
            cmsg = libc::CMSG_NXTHDR(&message, cmsg);
        }
    }
    Ok((n, record_type))
}

/// Sends `data` as one record of `record_type` on a kTLS socket (an alert, say). Non-blocking.
#[allow(unsafe_code)]
pub fn send_tls_record(
    fd: std::os::fd::BorrowedFd<'_>,
    record_type: u8,
    data: &[u8],
) -> io::Result<usize> {
    use std::os::fd::AsRawFd as _;
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: all-zeroes is a valid `msghdr`.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    message.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as _;
    // SAFETY: the control buffer (64 bytes) holds CMSG_SPACE(1) bytes; the header and its
    // one data byte are written inside it. `iov` points at `data`, which the kernel only
    // reads. The fd is borrowed, so it is open.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&message);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = record_type;
        libc::sendmsg(fd.as_raw_fd(), &message, libc::MSG_DONTWAIT)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
