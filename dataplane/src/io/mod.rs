//! The small IO interface the proxy logic is written against, and its two backends.
//!
//! Every worker runs one backend: [`uring::Uring`] (io_uring through tokio-uring) or
//! [`epoll::Epoll`] (a current-thread tokio runtime). Both hand buffers over by ownership
//! (`Vec<u8>` in, `Vec<u8>` back), which is what io_uring needs and costs epoll nothing, so
//! the proxy code above this module is written once and runs, and is tested, on both.
//! Timers and task spawning are tokio's on both backends (tokio-uring drives a tokio
//! current-thread runtime), so they are not part of this interface.
//!
//! This module owns backend selection ([`BackendChoice::resolve`]); it must not hold proxy
//! logic.

pub mod epoll;
pub mod hyper_io;
pub mod uring;

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::ops::Range;

use serde::Serialize;

/// An owned buffer handed back with the result of the operation that used it.
pub type BufResult<T> = (io::Result<T>, Vec<u8>);

/// Which IO backend a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// io_uring, through tokio-uring.
    IoUring,
    /// epoll, through a current-thread tokio runtime.
    Epoll,
}

impl BackendKind {
    /// The name used in logs, metrics and `/config_dump`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::IoUring => "io_uring",
            BackendKind::Epoll => "epoll",
        }
    }
}

/// What the operator asked for.
///
/// The default is epoll: measured through the proxy on this project's benchmark machine,
/// the tokio-uring backend adds about 50 µs at p50 and 80 µs at p99 per hop over epoll
/// (`docs/benchmarks.md`), so io_uring has not earned the default yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum BackendChoice {
    /// io_uring when the kernel and the seccomp profile allow it, else epoll.
    Auto,
    /// io_uring or fail.
    IoUring,
    /// epoll.
    #[default]
    Epoll,
}

impl BackendChoice {
    /// Decides the backend for this process, probing io_uring when it matters.
    pub fn resolve(self) -> io::Result<BackendKind> {
        match self {
            BackendChoice::Epoll => Ok(BackendKind::Epoll),
            BackendChoice::IoUring => uring::probe().map(|()| BackendKind::IoUring),
            BackendChoice::Auto => match uring::probe() {
                Ok(()) => Ok(BackendKind::IoUring),
                Err(error) => {
                    tracing::warn!(%error, "io_uring is unavailable; using the epoll backend");
                    Ok(BackendKind::Epoll)
                }
            },
        }
    }
}

/// A connected TCP stream. Methods take `&self` so one task can read while another writes.
#[allow(async_fn_in_trait)] // Workers are single-threaded: these futures need not be `Send`.
pub trait Stream: Sized + 'static {
    /// Reads into the spare capacity of `buf`, after `buf.len()`, and extends its length by
    /// what was read. `Ok(0)` is end of stream. A full buffer is grown first.
    async fn read(&self, buf: Vec<u8>) -> BufResult<usize>;

    /// Writes all of `buf[range]`.
    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> BufResult<()>;

    /// Shuts down one or both directions. `Shutdown::Both` also completes a read another
    /// task has pending, which is how an idle connection is closed promptly.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;

    /// Another handle on the socket (`dup`), by which it can be shut down while this one is
    /// in use elsewhere (a connection whose peer a new authorization refuses); `None` where
    /// there is none.
    fn duplicate(&self) -> Option<std::os::fd::OwnedFd> {
        None
    }

    /// Ends the connection now with a reset ([`crate::sys::abort`]), so the peer cannot
    /// take what it received for the whole message; reads and writes pending on it fail.
    /// Best effort.
    fn abort(&self) {}

    /// Waits until a read would not block (bytes, end of stream or an error are there),
    /// consuming nothing, so it may be abandoned (a timeout) without losing bytes; `read`
    /// right after returns at once. Plain sockets only.
    async fn readable(&self) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Whether something is there to read right now (bytes, the end of the stream, an
    /// error), looked at without taking it. An idle pooled connection with input is one its
    /// upstream closed, or sent more than its last response held. `false` where it cannot
    /// tell.
    fn has_input(&self) -> bool {
        false
    }

    /// The original destination of an intercepted connection (`SO_ORIGINAL_DST`).
    fn original_destination(&self) -> io::Result<SocketAddr> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Ends the sending direction cleanly (a half-close): for TLS, `close_notify` first.
    async fn close_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }

    /// The socket, where this backend can drive kernel TLS on it; `None` keeps TLS in
    /// userspace.
    fn kernel_tls_socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    /// On a kernel-TLS socket: reads (part of) one record's plaintext after `buf.len()` and
    /// returns its length and the record's content type.
    async fn read_tls_record(&self, buf: Vec<u8>) -> BufResult<(usize, u8)> {
        (Err(io::ErrorKind::Unsupported.into()), buf)
    }

    /// On a kernel-TLS socket: sends `data` as one record of `record_type` (an alert, or a
    /// KeyUpdate).
    async fn write_tls_record(&self, _record_type: u8, _data: &[u8]) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Whether the bytes on this socket are exactly the application's (plain TCP, or kernel
    /// TLS with nothing buffered) and this backend can `splice` them, so opaque TCP can move
    /// them socket to socket through a pipe without copying them into userspace.
    fn can_splice(&self) -> bool {
        false
    }

    /// Moves up to `len` bytes from the socket into the empty `pipe`; `Ok(0)` is end of
    /// stream. Only when [`Self::can_splice`].
    async fn splice_to_pipe(
        &self,
        _pipe: std::os::fd::BorrowedFd<'_>,
        _len: usize,
    ) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Moves up to `len` bytes from `pipe` into the socket; returns how many. Only when
    /// [`Self::can_splice`].
    async fn splice_from_pipe(
        &self,
        _pipe: std::os::fd::BorrowedFd<'_>,
        _len: usize,
    ) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// A listening socket.
#[allow(async_fn_in_trait)]
pub trait Listener: 'static {
    /// The streams it accepts.
    type Stream: Stream;
    /// Waits for the next connection.
    async fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)>;
}

/// One IO backend: how to run, listen and connect.
#[allow(async_fn_in_trait)]
pub trait Backend: 'static {
    /// Its connected stream.
    type Stream: Stream;
    /// Its listener.
    type Listener: Listener<Stream = Self::Stream>;
    /// Which backend this is.
    const KIND: BackendKind;

    /// Adopts a bound, listening, non-blocking std socket.
    fn listener(socket: std::net::TcpListener) -> io::Result<Self::Listener>;

    /// Opens a TCP connection, with `TCP_NODELAY` set and, if given, the socket mark that
    /// keeps it out of the interception rules.
    async fn connect(addr: SocketAddr, mark: Option<u32>) -> io::Result<Self::Stream>;

    /// Builds this backend's runtime on the current thread and runs `future` on it to
    /// completion; tasks may be spawned with `tokio::task::spawn_local`.
    fn block_on<F: Future>(future: F) -> io::Result<F::Output>;
}

/// After a read or write that used `used` bytes of `buf`, gives memory back: a buffer that
/// grew for a bulk burst and is now more than eight times what traffic uses shrinks to twice
/// that, never below `floor`. Buffers grow when reads fill them; this keeps a connection
/// that once moved bulk from holding its largest buffer for the rest of its life.
pub(crate) fn fit(buf: &mut Vec<u8>, used: usize, floor: usize) {
    if let Some(fitted) = fitted_size(buf.capacity(), used, floor) {
        buf.shrink_to(fitted.max(buf.len()));
    }
}

/// What a buffer of `size` bytes, of which traffic used `used`, shrinks to by [`fit`]'s
/// rule, if it shrinks: for buffers whose size is not their capacity.
pub(crate) fn fitted_size(size: usize, used: usize, floor: usize) -> Option<usize> {
    (size > floor && used.saturating_mul(8) < size).then(|| used.saturating_mul(2).max(floor))
}

/// Writes all of `buf` to `stream` and leaves it empty, keeping its memory for the next use
/// (a burst's beyond `floor` given back as [`fit`] does): one buffer serves every write.
pub(crate) async fn write_out<S: Stream>(
    stream: &S,
    buf: &mut Vec<u8>,
    floor: usize,
) -> io::Result<()> {
    let out = std::mem::take(buf);
    let len = out.len();
    let (written, mut back) = stream.write_all(out, 0..len).await;
    back.clear();
    fit(&mut back, len, floor);
    *buf = back;
    written
}

/// Grows `buf` when it has no spare capacity, so a read always has room.
pub(crate) fn ensure_spare(buf: &mut Vec<u8>) {
    if buf.len() == buf.capacity() {
        buf.reserve(buf.capacity().max(4096));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_give_back_what_bulk_made_them_take() {
        let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
        fit(&mut buf, 100 * 1024, 16 * 1024);
        assert_eq!(buf.capacity(), 256 * 1024, "still in use: kept");
        fit(&mut buf, 1000, 16 * 1024);
        assert!(buf.capacity() >= 16 * 1024 && buf.capacity() < 32 * 1024);
        let mut small: Vec<u8> = Vec::with_capacity(16 * 1024);
        fit(&mut small, 0, 16 * 1024);
        assert_eq!(small.capacity(), 16 * 1024, "never below the floor");
        let mut full = vec![1u8; 64 * 1024];
        full.reserve(1024 * 1024);
        fit(&mut full, 10, 4096);
        assert!(
            full.len() == 64 * 1024 && full.capacity() >= 64 * 1024,
            "never below its length"
        );
    }
}
