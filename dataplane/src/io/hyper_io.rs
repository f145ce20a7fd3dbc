//! hyper's IO traits over the owned-buffer [`Stream`], so hyper's HTTP/2 (server and client)
//! runs on either backend and over mTLS unchanged.
//!
//! A read in flight is a boxed future holding its buffer; bytes beyond what hyper asked for
//! wait in that buffer for the next call. A write is accepted whole (copied into the adapter's
//! buffer) and finishes in the background: the next write, a flush or a shutdown waits for
//! it and reports its error. A future is never dropped while it runs, so no io_uring
//! operation is abandoned; buffers are reused from call to call.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use super::{BufResult, Stream};

type Op<T> = Pin<Box<dyn Future<Output = BufResult<T>>>>;

/// Room for one read.
const READ_BUFFER: usize = 16 * 1024;

/// A [`Stream`] as `hyper::rt::Read + hyper::rt::Write`.
pub struct HyperIo<S: Stream> {
    stream: Rc<S>,
    reading: Option<Op<usize>>,
    /// Bytes read and not yet handed to hyper: `read_buf[read_pos..]`.
    read_buf: Vec<u8>,
    read_pos: usize,
    writing: Option<Op<()>>,
    write_buf: Vec<u8>,
    closing: Option<Pin<Box<dyn Future<Output = io::Result<()>>>>>,
}

impl<S: Stream> HyperIo<S> {
    /// Wraps a stream.
    pub fn new(stream: S) -> HyperIo<S> {
        HyperIo {
            stream: Rc::new(stream),
            reading: None,
            read_buf: Vec::new(),
            read_pos: 0,
            writing: None,
            write_buf: Vec::new(),
            closing: None,
        }
    }

    /// Finishes the write in flight, if any.
    fn poll_written(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(op) = self.writing.as_mut() {
            let (result, buf) = ready!(op.as_mut().poll(cx));
            self.writing = None;
            self.write_buf = buf;
            result?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: Stream> hyper::rt::Read for HyperIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut out: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read_pos >= this.read_buf.len() {
            if this.reading.is_none() {
                let mut buf = std::mem::take(&mut this.read_buf);
                buf.clear();
                buf.reserve(READ_BUFFER);
                let stream = this.stream.clone();
                this.reading = Some(Box::pin(async move { stream.read(buf).await }));
            }
            let Some(op) = this.reading.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            let (result, buf) = ready!(op.as_mut().poll(cx));
            this.reading = None;
            this.read_buf = buf;
            this.read_pos = 0;
            if let Err(error) = result {
                this.read_buf.clear();
                return Poll::Ready(Err(error));
            }
            // Ok(0) leaves the buffer empty: end of stream, nothing put.
        }
        let available = &this.read_buf[this.read_pos..];
        let n = available.len().min(out.remaining());
        out.put_slice(&available[..n]);
        this.read_pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: Stream> hyper::rt::Write for HyperIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_written(cx))?;
        let mut buf = std::mem::take(&mut this.write_buf);
        buf.clear();
        buf.extend_from_slice(data);
        let len = buf.len();
        let stream = this.stream.clone();
        let mut op: Op<()> = Box::pin(async move { stream.write_all(buf, 0..len).await });
        // Start it now; a write to a socket with room completes at once.
        match op.as_mut().poll(cx) {
            Poll::Ready((result, buf)) => {
                this.write_buf = buf;
                result?;
            }
            Poll::Pending => this.writing = Some(op),
        }
        Poll::Ready(Ok(len))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_written(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_written(cx))?;
        if this.closing.is_none() {
            let stream = this.stream.clone();
            this.closing = Some(Box::pin(async move { stream.close_write().await }));
        }
        match this.closing.as_mut() {
            Some(op) => op.as_mut().poll(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<S: Stream> Drop for HyperIo<S> {
    fn drop(&mut self) {
        // A read still in flight is an io_uring operation that outlives its future and keeps
        // the socket open: shut the socket so it completes and the socket closes.
        if self.reading.is_some() {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Runs hyper's background tasks (connection drivers, streams) on the worker's own thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalExec;

impl<F: Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, future: F) {
        tokio::task::spawn_local(future);
    }
}
