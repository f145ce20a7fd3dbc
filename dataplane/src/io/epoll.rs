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
        let spare = buf.capacity() - buf.len();
        loop {
            if let Err(e) = self.0.readable().await {
                return (Err(e), buf);
            }
            match self.0.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(n) if n > 0 && n < spare => {
                    // A short read emptied the socket: forget its readiness now, so the next
                    // read waits for new bytes instead of first making a `recv` that can only
                    // say EAGAIN. Bytes that arrived meanwhile raise a new (edge-triggered)
                    // event, which tokio has not seen yet, so its tick keeps this clear from
                    // hiding them.
                    let _ = self.0.try_io(tokio::io::Interest::READABLE, || {
                        Err::<(), _>(io::ErrorKind::WouldBlock.into())
                    });
                    return (Ok(n), buf);
                }
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

    fn abort(&self) {
        crate::sys::abort(std::os::fd::AsFd::as_fd(&self.0));
    }

    fn duplicate(&self) -> Option<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.0).try_clone_to_owned().ok()
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

    fn has_input(&self) -> bool {
        crate::sys::read_ready(std::os::fd::AsFd::as_fd(&self.0)).unwrap_or(true)
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

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// A short read forgets readiness; the peer's end of stream that came with the bytes, or
    /// bytes that come after, must still be seen.
    #[test]
    fn after_a_short_read_both_later_bytes_and_end_of_stream_arrive() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let stream = EpollStream(listener.accept().await.unwrap().0);
            let within = |what| async move {
                tokio::time::timeout(std::time::Duration::from_secs(5), what)
                    .await
                    .expect("the read hung")
            };

            peer.write_all(b"first").unwrap();
            let (read, buf) = within(stream.read(Vec::with_capacity(64))).await;
            assert_eq!((read.unwrap(), &buf[..]), (5, &b"first"[..]));

            // Bytes that come after the short read.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            peer.write_all(b"second").unwrap();
            let (read, buf) = within(stream.read(Vec::with_capacity(64))).await;
            assert_eq!((read.unwrap(), &buf[..]), (6, &b"second"[..]));

            // Bytes and the end of stream together, before the read.
            peer.write_all(b"last").unwrap();
            peer.shutdown(Shutdown::Write).unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let (read, buf) = within(stream.read(Vec::with_capacity(64))).await;
            assert_eq!((read.unwrap(), &buf[..]), (4, &b"last"[..]));
            let (read, _) = within(stream.read(Vec::with_capacity(64))).await;
            assert_eq!(read.unwrap(), 0, "end of stream");
        });
    }
}
