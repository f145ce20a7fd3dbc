//! The io_uring backend: tokio-uring per worker, completion-based IO on owned buffers.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::ops::Range;

use tokio_uring::buf::BoundedBuf;

use super::{Backend, BackendKind, BufResult, Listener, Stream};

/// Submission queue entries per worker ring.
const RING_ENTRIES: u32 = 256;

/// The io_uring backend.
#[derive(Debug)]
pub struct Uring;

/// A tokio-uring TCP stream.
pub struct UringStream(tokio_uring::net::TcpStream);

/// A tokio-uring TCP listener.
pub struct UringListener(tokio_uring::net::TcpListener);

/// Checks that this process may use io_uring: the `io_uring_disabled` sysctl, then a real
/// ring setup, which is what a seccomp profile that blocks io_uring makes fail (`EPERM`,
/// `ENOSYS`).
pub fn probe() -> io::Result<()> {
    if let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        && text.trim() == "2"
    {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "io_uring is disabled by the kernel.io_uring_disabled sysctl",
        ));
    }
    io_uring::IoUring::new(2)
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("io_uring_setup failed: {e}")))
}

impl Stream for UringStream {
    async fn read(&self, mut buf: Vec<u8>) -> BufResult<usize> {
        super::ensure_spare(&mut buf);
        let start = buf.len();
        let (result, slice) = self.0.read(buf.slice(start..)).await;
        (result, slice.into_inner())
    }

    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> BufResult<()> {
        if range.start >= range.end {
            return (Ok(()), buf);
        }
        if range.end > buf.len() {
            return (Err(io::ErrorKind::InvalidInput.into()), buf);
        }
        let (result, slice) = self.0.write_all(buf.slice(range)).await;
        (result, slice.into_inner())
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.0.shutdown(how)
    }

    fn abort(&self) {
        crate::sys::abort(crate::sys::borrow_fd(&self.0));
    }

    fn duplicate(&self) -> Option<std::os::fd::OwnedFd> {
        crate::sys::borrow_fd(&self.0).try_clone_to_owned().ok()
    }

    async fn readable(&self) -> io::Result<()> {
        crate::sys::wait_readable(crate::sys::borrow_fd(&self.0)).await
    }

    fn original_destination(&self) -> io::Result<SocketAddr> {
        crate::sys::original_destination(crate::sys::borrow_fd(&self.0))
    }

    fn has_input(&self) -> bool {
        crate::sys::read_ready(crate::sys::borrow_fd(&self.0)).unwrap_or(true)
    }

    fn kernel_tls_socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(crate::sys::borrow_fd(&self.0))
    }

    /// Application data comes through a ring read, as on a plain socket. When the next
    /// record is of another type (an alert, a KeyUpdate, a session ticket) the kernel fails
    /// that read with `EIO` and keeps the record, which only a `recvmsg` with room for its
    /// type can take (tokio-uring has none for TCP): one non-blocking `recvmsg` takes it.
    async fn read_tls_record(&self, mut buf: Vec<u8>) -> BufResult<(usize, u8)> {
        super::ensure_spare(&mut buf);
        let start = buf.len();
        let (result, slice) = self.0.read(buf.slice(start..)).await;
        let mut buf = slice.into_inner();
        let result = match result {
            Ok(n) => Ok((n, crate::usertls::APPLICATION_DATA)),
            Err(error) if error.raw_os_error() == Some(libc::EIO) => {
                crate::sys::recv_tls_record(crate::sys::borrow_fd(&self.0), &mut buf).map_err(
                    |e| {
                        // No record after all: the read's error stands.
                        let cause = if e.kind() == io::ErrorKind::WouldBlock {
                            error
                        } else {
                            e
                        };
                        io::Error::new(
                            cause.kind(),
                            format!("kernel TLS read on io_uring (a record that is not application data): {cause}"),
                        )
                    },
                )
            }
            Err(error) => Err(error),
        };
        (result, buf)
    }

    async fn write_tls_record(&self, record_type: u8, data: &[u8]) -> io::Result<()> {
        let fd = crate::sys::borrow_fd(&self.0);
        let sent = crate::sys::send_when_writable(fd, || {
            crate::sys::send_tls_record(fd, record_type, data)
        })
        .await
        .map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("sending a kernel TLS record of type {record_type} on io_uring: {error}"),
            )
        })?;
        if sent == data.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "kernel TLS took {sent} of a {}-byte record of type {record_type} on io_uring",
                    data.len()
                ),
            ))
        }
    }
}

impl Listener for UringListener {
    type Stream = UringStream;

    async fn accept(&self) -> io::Result<(UringStream, SocketAddr)> {
        let (stream, peer) = self.0.accept().await?;
        stream.set_nodelay(true)?;
        Ok((UringStream(stream), peer))
    }
}

impl Backend for Uring {
    type Stream = UringStream;
    type Listener = UringListener;
    const KIND: BackendKind = BackendKind::IoUring;

    fn listener(socket: std::net::TcpListener) -> io::Result<UringListener> {
        Ok(UringListener(tokio_uring::net::TcpListener::from_std(
            socket,
        )))
    }

    async fn connect(addr: SocketAddr, mark: Option<u32>) -> io::Result<UringStream> {
        let stream = match mark {
            None => tokio_uring::net::TcpStream::connect(addr).await?,
            // tokio-uring cannot set options before connecting: connect through tokio's
            // reactor, then hand the socket to the ring.
            Some(_) => tokio_uring::net::TcpStream::from_std(
                crate::sys::connect_marked(addr, mark).await?.into_std()?,
            ),
        };
        stream.set_nodelay(true)?;
        Ok(UringStream(stream))
    }

    fn block_on<F: Future>(future: F) -> io::Result<F::Output> {
        let mut builder = tokio_uring::builder();
        builder.entries(RING_ENTRIES);
        let runtime = tokio_uring::Runtime::new(&builder)?;
        Ok(runtime.block_on(future))
    }
}
