//! hyper's IO traits over the owned-buffer [`Stream`], so hyper's HTTP/2 (server and client)
//! runs on either backend and over mTLS unchanged.
//!
//! Reads go through one receive future per connection, boxed once and polled only from
//! `poll_read` (so on hyper's own task, with no wake-up of its own): it reads into the
//! connection's buffer whenever hyper wants bytes and none are left, so no read allocates;
//! bytes beyond what hyper asked for wait in that buffer for the next call. Writes are coalesced: hyper's HTTP/2 writes each
//! frame as the connection task gets to it (a response's HEADERS, DATA and trailers in
//! separate polls), so bytes are accepted into a buffer and the connection's sender task
//! (started by the first write, idle between bursts, no task spawned per burst), woken by
//! the first write of a burst, yields once (every task ready on this worker runs first, and
//! may add frames) and then sends everything in one write; what arrives meanwhile goes in
//! the next. One send per burst instead of one per frame means fewer syscalls and, more to the
//! point, fewer wake-ups of the peer. A flush returns at once; a write error is reported by
//! the next write, flush or shutdown, and a shutdown first waits for the sender. Writes wait
//! while `WRITE_LIMIT` bytes are unsent. Buffers are reused from burst to burst. The only
//! future dropped while it runs is a read still waiting when the adapter itself is dropped,
//! when nothing more is wanted from the socket; the drop shuts the socket for reading so
//! that io_uring read completes and the socket can close. (And a last write that a peer
//! which stopped reading has kept waiting `LAST_WRITE_LIMIT` after the adapter went: the
//! connection is aborted, which fails it.)

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use super::{BufResult, Stream};

/// Room for one read.
const READ_BUFFER: usize = 16 * 1024;

/// Unsent bytes above which writes wait for the sender.
const WRITE_LIMIT: usize = 256 * 1024;

/// How long the sender may go on writing its last bytes after the adapter is gone (hyper
/// has given up on the connection) before the connection is aborted: a peer that stops
/// reading must not hold the socket and its buffers for ever.
const LAST_WRITE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The write side, shared by the adapter and its sender task.
#[derive(Default)]
struct Sending {
    /// Bytes accepted and not yet handed to a write.
    pending: Vec<u8>,
    /// A buffer to swap in for the next burst.
    spare: Vec<u8>,
    /// The sender task was started (it lives as long as the adapter).
    started: bool,
    /// The sender holds a burst it is writing.
    writing: bool,
    /// The sender, idle, waiting for bytes.
    idle: Option<std::task::Waker>,
    /// The adapter is gone: the sender ends once nothing is left to write, or aborts the
    /// connection if that takes longer than `LAST_WRITE_LIMIT`.
    dropped: bool,
    /// The sender, writing, to be told the adapter is gone.
    writing_waker: Option<std::task::Waker>,
    /// The error a write met: every later call reports it, and nothing more is sent.
    failed: Option<(io::ErrorKind, String)>,
    /// A write or shutdown waiting for the sender.
    waiting: Option<std::task::Waker>,
}

impl Sending {
    /// Whether bytes accepted are still to be written.
    fn busy(&self) -> bool {
        self.writing || !self.pending.is_empty()
    }

    fn wake_waiting(&mut self) {
        if let Some(waker) = self.waiting.take() {
            waker.wake();
        }
    }
}

/// The read side, shared by the adapter and its receive future.
#[derive(Default)]
struct Receiving {
    /// hyper wants bytes and none are left: the receive future is to read.
    wanted: bool,
    /// A read is in flight.
    reading: bool,
    /// The buffer for the next read, handed back by the adapter once drained.
    buf: Vec<u8>,
    /// The last read's outcome and buffer, for the adapter to take.
    done: Option<BufResult<usize>>,
}

/// A [`Stream`] as `hyper::rt::Read + hyper::rt::Write`.
pub struct HyperIo<S: Stream> {
    stream: Rc<S>,
    receiving: Rc<RefCell<Receiving>>,
    /// `receive`, polled only from `poll_read`.
    receiver: Pin<Box<dyn Future<Output = ()>>>,
    /// Bytes read and not yet handed to hyper: `read_buf[read_pos..]`.
    read_buf: Vec<u8>,
    read_pos: usize,
    sending: Rc<RefCell<Sending>>,
    closing: Option<Pin<Box<dyn Future<Output = io::Result<()>>>>>,
}

impl<S: Stream> HyperIo<S> {
    /// Wraps a stream.
    pub fn new(stream: S) -> HyperIo<S> {
        let stream = Rc::new(stream);
        let receiving = Rc::<RefCell<Receiving>>::default();
        HyperIo {
            receiver: Box::pin(receive(stream.clone(), receiving.clone())),
            stream,
            receiving,
            read_buf: Vec::new(),
            read_pos: 0,
            sending: Rc::default(),
            closing: None,
        }
    }

    /// The error the sender met, if any.
    fn failure(&self) -> io::Result<()> {
        match &self.sending.borrow().failed {
            Some((kind, message)) => Err(io::Error::new(*kind, message.clone())),
            None => Ok(()),
        }
    }
}

/// Reads whenever the adapter wants bytes, for as long as the adapter lives. Only
/// `poll_read` polls it, and it sets `wanted` before it does, so waiting for `wanted` needs
/// no waker; a read in flight registers hyper's task like any IO.
async fn receive<S: Stream>(stream: Rc<S>, receiving: Rc<RefCell<Receiving>>) {
    loop {
        std::future::poll_fn(|_| {
            if receiving.borrow().wanted {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        let mut buf = {
            let mut state = receiving.borrow_mut();
            state.wanted = false;
            state.reading = true;
            std::mem::take(&mut state.buf)
        };
        buf.clear();
        buf.reserve(READ_BUFFER);
        let done = stream.read(buf).await;
        let mut state = receiving.borrow_mut();
        state.reading = false;
        state.done = Some(done);
    }
}

/// Sends what the adapter accepts, burst by burst, for as long as the adapter lives.
async fn send<S: Stream>(stream: Rc<S>, sending: Rc<RefCell<Sending>>) {
    loop {
        // Idle until a burst starts, or the adapter goes with nothing left to write.
        let burst = std::future::poll_fn(|cx| {
            let mut state = sending.borrow_mut();
            if !state.pending.is_empty() {
                state.idle = None;
                return Poll::Ready(true);
            }
            if state.dropped {
                return Poll::Ready(false);
            }
            if !state.idle.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                state.idle = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
        if !burst {
            return;
        }
        // Let every task ready on this worker run first: they may add frames.
        tokio::task::yield_now().await;
        let buf = {
            let mut state = sending.borrow_mut();
            let spare = std::mem::take(&mut state.spare);
            let buf = std::mem::replace(&mut state.pending, spare);
            state.writing = true;
            state.wake_waiting();
            buf
        };
        let len = buf.len();
        let (written, mut buf) = tokio::select! {
            biased;
            written = stream.write_all(buf, 0..len) => written,
            () = abandoned(&sending) => {
                // The write is dropped with its buffer; the abort fails it on either backend,
                // and the sender ends as after any failed write.
                tracing::debug!("peer took no bytes after the connection ended; aborting it");
                stream.abort();
                let stopped = io::Error::new(io::ErrorKind::TimedOut, "peer stopped reading");
                (Err(stopped), Vec::new())
            }
        };
        let mut state = sending.borrow_mut();
        buf.clear();
        super::fit(&mut buf, len, READ_BUFFER);
        state.spare = buf;
        state.writing = false;
        if let Err(error) = written {
            state.failed = Some((error.kind(), error.to_string()));
            state.pending.clear();
            state.wake_waiting();
            return;
        }
        if !state.busy() {
            // A shutdown may be waiting for the last burst to go.
            state.wake_waiting();
        }
    }
}

/// Waits until the adapter is gone, then `LAST_WRITE_LIMIT` more.
async fn abandoned(sending: &RefCell<Sending>) {
    std::future::poll_fn(|cx| {
        let mut state = sending.borrow_mut();
        if state.dropped {
            return Poll::Ready(());
        }
        if !state
            .writing_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.writing_waker = Some(cx.waker().clone());
        }
        Poll::Pending
    })
    .await;
    tokio::time::sleep(LAST_WRITE_LIMIT).await;
}

impl<S: Stream> hyper::rt::Read for HyperIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut out: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read_pos >= this.read_buf.len() {
            {
                let mut state = this.receiving.borrow_mut();
                if !state.reading && state.done.is_none() {
                    state.buf = std::mem::take(&mut this.read_buf);
                    state.wanted = true;
                }
            }
            // It never ends: it reads, or waits to be wanted again.
            let _ = this.receiver.as_mut().poll(cx);
            let Some((result, buf)) = this.receiving.borrow_mut().done.take() else {
                return Poll::Pending;
            };
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
        this.failure()?;
        let mut state = this.sending.borrow_mut();
        if state.pending.len() >= WRITE_LIMIT {
            state.waiting = Some(cx.waker().clone());
            return Poll::Pending;
        }
        state.pending.extend_from_slice(data);
        if !state.started {
            state.started = true;
            tokio::task::spawn_local(send(this.stream.clone(), this.sending.clone()));
        } else if let Some(sender) = state.idle.take() {
            sender.wake();
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.failure())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let mut state = this.sending.borrow_mut();
            if state.busy() {
                state.waiting = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        this.failure()?;
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
        // the socket open: shut the socket so it completes and the socket closes. Bytes the
        // sender has yet to write still go: then only reading is shut, and the socket closes
        // when the sender lets go of it.
        let mut state = self.sending.borrow_mut();
        if self.receiving.borrow().reading {
            let how = if state.busy() {
                std::net::Shutdown::Read
            } else {
                std::net::Shutdown::Both
            };
            let _ = self.stream.shutdown(how);
        }
        // The sender ends after what it has left, within `LAST_WRITE_LIMIT`.
        state.dropped = true;
        if let Some(sender) = state.idle.take() {
            sender.wake();
        }
        if let Some(sender) = state.writing_waker.take() {
            sender.wake();
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

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::net::Shutdown;
    use std::ops::Range;

    use hyper::rt::Write as _;

    use super::*;

    /// A stream that records its writes and fails them on demand.
    #[derive(Default)]
    struct Recorder {
        writes: RefCell<Vec<Vec<u8>>>,
        fail: Cell<bool>,
    }

    impl Stream for Recorder {
        async fn read(&self, buf: Vec<u8>) -> BufResult<usize> {
            std::future::pending::<()>().await;
            (Ok(0), buf)
        }

        async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> BufResult<()> {
            if self.fail.get() {
                return (Err(io::ErrorKind::BrokenPipe.into()), buf);
            }
            self.writes.borrow_mut().push(buf[range].to_vec());
            (Ok(()), buf)
        }

        fn shutdown(&self, _how: Shutdown) -> io::Result<()> {
            Ok(())
        }
    }

    fn write(io: &mut HyperIo<Rc<Recorder>>, data: &[u8]) -> Poll<io::Result<usize>> {
        let waker = std::task::Waker::noop();
        Pin::new(io).poll_write(&mut Context::from_waker(waker), data)
    }

    impl Stream for Rc<Recorder> {
        async fn read(&self, buf: Vec<u8>) -> BufResult<usize> {
            (**self).read(buf).await
        }
        async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> BufResult<()> {
            (**self).write_all(buf, range).await
        }
        fn shutdown(&self, how: Shutdown) -> io::Result<()> {
            (**self).shutdown(how)
        }
    }

    fn run(test: impl Future<Output = ()>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, test);
    }

    #[test]
    fn frames_written_in_one_burst_go_out_in_one_write() {
        run(async {
            let recorder = Rc::new(Recorder::default());
            let mut io = HyperIo::new(recorder.clone());
            for frame in [&b"HEADERS"[..], b"DATA", b"TRAILERS"] {
                assert!(matches!(write(&mut io, frame), Poll::Ready(Ok(_))));
            }
            assert!(
                recorder.writes.borrow().is_empty(),
                "nothing sent before the yield"
            );
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            assert_eq!(*recorder.writes.borrow(), [b"HEADERSDATATRAILERS".to_vec()]);

            // The next burst is a write of its own.
            assert!(matches!(write(&mut io, b"PING"), Poll::Ready(Ok(4))));
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            assert_eq!(recorder.writes.borrow().len(), 2);
        });
    }

    #[test]
    fn the_sender_idles_between_bursts_and_ends_after_the_adapter_with_its_last_bytes() {
        run(async {
            let recorder = Rc::new(Recorder::default());
            let mut io = HyperIo::new(recorder.clone());
            for _ in 0..3 {
                assert!(matches!(write(&mut io, b"burst"), Poll::Ready(Ok(5))));
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
            }
            assert_eq!(recorder.writes.borrow().len(), 3, "a write per burst");
            assert_eq!(Rc::strong_count(&recorder), 2, "the stream is held");

            // Bytes accepted before the adapter goes still go; then the sender lets go of
            // the stream.
            assert!(matches!(write(&mut io, b"last"), Poll::Ready(Ok(4))));
            drop(io);
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            assert_eq!(recorder.writes.borrow().last().unwrap(), b"last");
            assert_eq!(Rc::strong_count(&recorder), 1, "the sender ended");
        });
    }

    /// A stream whose peer takes nothing: writes wait for ever, until the stream is aborted.
    #[derive(Default)]
    struct Stalled {
        aborted: Cell<bool>,
    }

    impl Stream for Rc<Stalled> {
        async fn read(&self, buf: Vec<u8>) -> BufResult<usize> {
            std::future::pending::<()>().await;
            (Ok(0), buf)
        }
        async fn write_all(&self, buf: Vec<u8>, _range: Range<usize>) -> BufResult<()> {
            std::future::pending::<()>().await;
            (Ok(()), buf)
        }
        fn shutdown(&self, _how: Shutdown) -> io::Result<()> {
            Ok(())
        }
        fn abort(&self) {
            self.aborted.set(true);
        }
    }

    #[test]
    fn a_last_write_the_peer_never_takes_ends_in_an_abort() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, async {
            let stalled = Rc::new(Stalled::default());
            let mut io = HyperIo::<Rc<Stalled>>::new(stalled.clone());
            let waker = std::task::Waker::noop();
            let written = Pin::new(&mut io).poll_write(&mut Context::from_waker(waker), b"GOAWAY");
            assert!(matches!(written, Poll::Ready(Ok(6))));
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            // While hyper holds the connection, a slow peer is hyper's to time out.
            tokio::time::sleep(LAST_WRITE_LIMIT * 2).await;
            assert!(!stalled.aborted.get());
            drop(io);
            tokio::time::sleep(LAST_WRITE_LIMIT - std::time::Duration::from_secs(1)).await;
            assert!(!stalled.aborted.get(), "the last bytes get their time");
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            assert!(stalled.aborted.get());
            assert_eq!(
                Rc::strong_count(&stalled),
                1,
                "the sender let go of the socket"
            );
        });
    }

    /// A stream whose reads take chunks pushed by the test, waiting while there are none.
    #[derive(Clone, Default)]
    struct Chunks(Rc<ChunksState>);

    #[derive(Default)]
    struct ChunksState {
        queue: RefCell<std::collections::VecDeque<Vec<u8>>>,
        ended: Cell<bool>,
        pushed: tokio::sync::Notify,
        reads: Cell<usize>,
    }

    impl Chunks {
        fn push(&self, chunk: &[u8]) {
            self.0.queue.borrow_mut().push_back(chunk.to_vec());
            self.0.pushed.notify_one();
        }
    }

    impl Stream for Chunks {
        async fn read(&self, mut buf: Vec<u8>) -> BufResult<usize> {
            self.0.reads.set(self.0.reads.get() + 1);
            loop {
                if let Some(chunk) = self.0.queue.borrow_mut().pop_front() {
                    buf.extend_from_slice(&chunk);
                    return (Ok(chunk.len()), buf);
                }
                if self.0.ended.get() {
                    return (Ok(0), buf);
                }
                self.0.pushed.notified().await;
            }
        }

        async fn write_all(&self, buf: Vec<u8>, _range: Range<usize>) -> BufResult<()> {
            (Ok(()), buf)
        }

        fn shutdown(&self, _how: Shutdown) -> io::Result<()> {
            Ok(())
        }
    }

    /// What one `poll_read` with room for `room` bytes puts, once it is ready.
    async fn read_up_to(io: &mut HyperIo<Chunks>, room: usize) -> io::Result<Vec<u8>> {
        let mut storage = vec![0u8; room];
        let mut buf = hyper::rt::ReadBuf::new(&mut storage);
        std::future::poll_fn(|cx| {
            hyper::rt::Read::poll_read(Pin::new(&mut *io), cx, buf.unfilled())
        })
        .await?;
        Ok(buf.filled().to_vec())
    }

    #[test]
    fn reads_hand_hyper_every_byte_in_order_and_wait_for_more_without_losing_any() {
        run(async {
            let chunks = Chunks::default();
            let mut io = HyperIo::new(chunks.clone());
            chunks.push(b"hello ");
            chunks.push(b"wide world");
            let mut got = Vec::new();
            while got.len() < 16 {
                got.extend(read_up_to(&mut io, 4).await.unwrap());
            }
            assert_eq!(got, b"hello wide world");
            assert_eq!(chunks.0.reads.get(), 2, "a read per chunk, bytes left wait");

            // Nothing there: the read waits, and the bytes pushed later wake it.
            let later = chunks.clone();
            tokio::task::spawn_local(async move {
                tokio::task::yield_now().await;
                later.push(b"later");
                later.0.ended.set(true);
            });
            assert_eq!(read_up_to(&mut io, 64).await.unwrap(), b"later");
            assert_eq!(read_up_to(&mut io, 64).await.unwrap(), b"", "end of stream");
        });
    }

    #[test]
    fn a_failed_write_is_reported_by_the_next_call_and_writes_wait_above_the_limit() {
        run(async {
            let recorder = Rc::new(Recorder::default());
            let mut io = HyperIo::new(recorder.clone());
            let big = vec![7u8; WRITE_LIMIT];
            assert!(matches!(write(&mut io, &big), Poll::Ready(Ok(_))));
            assert!(write(&mut io, b"more").is_pending(), "over the limit: wait");
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            assert!(matches!(write(&mut io, b"more"), Poll::Ready(Ok(4))));

            recorder.fail.set(true);
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            for _ in 0..2 {
                let error = write(&mut io, b"after").map(|r| r.unwrap_err());
                assert!(
                    matches!(error, Poll::Ready(ref e) if e.kind() == io::ErrorKind::BrokenPipe),
                    "every write after the failure reports it: {error:?}"
                );
            }
        });
    }
}
