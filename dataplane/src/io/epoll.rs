//! The epoll backend: a current-thread tokio runtime per worker, readiness-based IO.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::ops::Range;

use super::{Backend, BackendKind, BufResult, Listener, Stream};

/// `splice` flags: move pages rather than copy where the kernel can; never block.
const SPLICE: rustix::pipe::SpliceFlags =
    rustix::pipe::SpliceFlags::MOVE.union(rustix::pipe::SpliceFlags::NONBLOCK);

/// The epoll backend.
#[derive(Debug)]
pub struct Epoll;

/// A tokio TCP stream behind the owned-buffer interface.
#[derive(Debug)]
pub struct EpollStream(tokio::net::TcpStream);

/// A tokio TCP listener.
#[derive(Debug)]
pub struct EpollListener(tokio::net::TcpListener);

impl Stream for EpollStream {
    async fn read(&self, mut buf: Vec<u8>) -> BufResult<usize> {
        super::ensure_spare(&mut buf);
        loop {
            if let Err(e) = self.0.readable().await {
                return (Err(e), buf);
            }
            match self.0.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return (result, buf),
            }
        }
    }

    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> BufResult<()> {
        let Some(mut rest) = buf.get(range.clone()) else {
            return (Err(io::ErrorKind::InvalidInput.into()), buf);
        };
        while !rest.is_empty() {
            if let Err(e) = self.0.writable().await {
                return (Err(e), buf);
            }
            match self.0.try_write(rest) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        socket2::SockRef::from(&self.0).shutdown(how)
    }

    async fn readable(&self) -> io::Result<()> {
        // tokio's readiness can be stale after a read that did not drain the socket; a peek
        // confirms it (and clears it when there is nothing).
        let fd = std::os::fd::AsFd::as_fd(&self.0);
        self.0
            .async_io(tokio::io::Interest::READABLE, || {
                if crate::sys::read_ready(fd)? {
                    Ok(())
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                }
            })
            .await
    }

    fn original_destination(&self) -> io::Result<SocketAddr> {
        crate::sys::original_destination(std::os::fd::AsFd::as_fd(&self.0))
    }

    fn can_splice(&self) -> bool {
        true
    }

    async fn splice_to_pipe(
        &self,
        pipe: std::os::fd::BorrowedFd<'_>,
        len: usize,
    ) -> io::Result<usize> {
        // The pipe is empty, so EAGAIN can only mean the socket has nothing yet: `async_io`
        // waits for readiness and retries on it.
        self.0
            .async_io(tokio::io::Interest::READABLE, || {
                Ok(rustix::pipe::splice(
                    &self.0, None, pipe, None, len, SPLICE,
                )?)
            })
            .await
    }

    async fn splice_from_pipe(
        &self,
        pipe: std::os::fd::BorrowedFd<'_>,
        len: usize,
    ) -> io::Result<usize> {
        // The pipe holds `len` bytes, so EAGAIN can only mean the socket is full.
        self.0
            .async_io(tokio::io::Interest::WRITABLE, || {
                Ok(rustix::pipe::splice(
                    pipe, None, &self.0, None, len, SPLICE,
                )?)
            })
            .await
    }

    fn kernel_tls_socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(&self.0))
    }

    async fn read_tls_record(&self, mut buf: Vec<u8>) -> BufResult<(usize, u8)> {
        super::ensure_spare(&mut buf);
        let fd = std::os::fd::AsFd::as_fd(&self.0);
        let result = self
            .0
            .async_io(tokio::io::Interest::READABLE, || {
                crate::sys::recv_tls_record(fd, &mut buf)
            })
            .await;
        (result, buf)
    }

    async fn write_tls_record(&self, record_type: u8, data: &[u8]) -> io::Result<()> {
        let fd = std::os::fd::AsFd::as_fd(&self.0);
        let sent = self
            .0
            .async_io(tokio::io::Interest::WRITABLE, || {
                crate::sys::send_tls_record(fd, record_type, data)
            })
            .await?;
        if sent == data.len() {
            Ok(())
        } else {
            Err(io::ErrorKind::WriteZero.into())
        }
    }
}

impl Listener for EpollListener {
    type Stream = EpollStream;

    async fn accept(&self) -> io::Result<(EpollStream, SocketAddr)> {
        let (stream, peer) = self.0.accept().await?;
        stream.set_nodelay(true)?;
        Ok((EpollStream(stream), peer))
    }
}

impl Backend for Epoll {
    type Stream = EpollStream;
    type Listener = EpollListener;
    const KIND: BackendKind = BackendKind::Epoll;

    fn listener(socket: std::net::TcpListener) -> io::Result<EpollListener> {
        tokio::net::TcpListener::from_std(socket).map(EpollListener)
    }

    async fn connect(addr: SocketAddr, mark: Option<u32>) -> io::Result<EpollStream> {
        crate::sys::connect_marked(addr, mark)
            .await
            .map(EpollStream)
    }

    fn block_on<F: Future>(future: F) -> io::Result<F::Output> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        Ok(local.block_on(&runtime, future))
    }
}
