//! Opaque TCP: each accepted connection is joined to one upstream connection (within its
//! cluster's connection limit) and bytes are copied both ways, unparsed, through one bounded
//! buffer per direction. A buffer starts at 16 KiB, doubles while reads fill it (up to
//! 256 KiB), and gives the memory back when its direction goes quiet.
//!
//! A direction that turns out to be bulk (a read fills a 64 KiB buffer) and whose two sockets
//! carry plain bytes (plain TCP, or kernel TLS) moves to `splice` through a pipe, so its
//! bytes stay in the kernel.
//!
//! Half-close is passed on (end of stream from one side becomes `shutdown(Write)` on the
//! other, and the other direction keeps flowing); an error on either side resets both; a
//! connection with no bytes either way for the cluster's idle timeout is closed.

use std::cell::Cell;
use std::net::Shutdown;
use std::os::fd::{AsFd as _, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rustix::pipe::PipeFlags;

use crate::access_log::AccessLog;
use crate::io::{Backend, Stream};
use crate::metrics::{ClusterStats, Flag, ListenerStats};
use crate::worker::{Room, Sharing, View, Worker};

/// Initial buffer size of each direction.
const COPY_BUFFER: usize = 16 * 1024;
/// A direction whose reads keep filling its buffer grows it up to this, so bulk transfers
/// take fewer, larger syscalls while ordinary connections stay small.
const MAX_COPY_BUFFER: usize = 256 * 1024;
/// A buffer that grew shrinks back to no less than this once its direction is quiet.
const SHRINK_FLOOR: usize = 4 * COPY_BUFFER;
/// A read this large marks a bulk direction, which moves to `splice` where it can.
const SPLICE_AFTER: usize = 64 * 1024;

/// Serves one opaque TCP connection from `caller`; `first` holds bytes already read from
/// the client.
pub async fn serve<B: Backend, D: Stream>(
    worker: &Rc<Worker<B>>,
    view: &View,
    listener: usize,
    cluster: usize,
    down: D,
    first: Vec<u8>,
    caller: &super::Caller,
) {
    let stats = &view.listeners[listener];
    let line = Line::start(worker.access_log(), view, listener, cluster, caller);
    let nothing_to_reuse = || None::<std::convert::Infallible>;
    let room = worker.upstream_room(view, cluster, nothing_to_reuse, Sharing::Exclusive);
    // Held while the upstream connection is open.
    let Ok(Room::Slot(_slot)) = room.await else {
        stats.error(Flag::UpstreamOverflow);
        line.record(Some(Flag::UpstreamOverflow), None, (0, 0));
        let _ = down.shutdown(Shutdown::Both);
        return;
    };
    let Some((up, addr)) = super::connect::<B>(view, cluster, super::Inner::Tcp).await else {
        stats.error(Flag::UpstreamConnectFailure);
        line.record(Some(Flag::UpstreamConnectFailure), None, (0, 0));
        let _ = down.shutdown(Shutdown::Both);
        return;
    };
    let _in_flight = view.in_flight(cluster, addr);
    let idle = view.snapshot.clusters[cluster].idle_timeout;
    let upstream = &view.clusters[cluster];
    let sniffed = first.len() as u64;
    let (outcome, received, sent) =
        pump_counted(&down, &up, first, Vec::new(), idle, stats, upstream).await;
    let received = received + sniffed;
    let flag = (outcome == Pumped::IdleTimeout).then_some(Flag::IdleTimeout);
    if let Some(flag) = flag {
        stats.error(flag);
    }
    line.record(flag, Some(addr), (received, sent));
}

/// An opaque connection's access log line, begun when the connection is: where it was
/// taken and where it goes; written once it ends ([`Line::record`]). Nothing with no log.
pub(crate) struct Line<'a> {
    log: Option<(&'a AccessLog, Instant)>,
    listener: &'a str,
    cluster: &'a str,
    caller: &'a super::Caller,
}

impl<'a> Line<'a> {
    /// A line for `caller`'s connection on `listener` of `view`, to `cluster`.
    pub(crate) fn start(
        log: Option<&'a AccessLog>,
        view: &'a View,
        listener: usize,
        cluster: usize,
        caller: &'a super::Caller,
    ) -> Line<'a> {
        Line {
            log: log.map(|log| (log, Instant::now())),
            listener: &view.snapshot.listeners[listener].name,
            cluster: &view.snapshot.clusters[cluster].name,
            caller,
        }
    }

    /// Writes the line: what ended the connection, the endpoint it reached, and the bytes
    /// from and to the client.
    pub(crate) fn record(
        self,
        flag: Option<Flag>,
        upstream: Option<std::net::SocketAddr>,
        bytes: (u64, u64),
    ) {
        if let Some((log, started)) = self.log {
            log.record(&crate::access_log::Entry {
                listener: self.listener,
                caller: self.caller,
                protocol: "TCP",
                request_fields: b"",
                status: None,
                flag,
                upstream: Some((self.cluster, upstream)),
                bytes: Some(bytes),
                duration: started.elapsed(),
            });
        }
    }
}

/// How a [`pump`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    /// Both directions reached end of stream.
    Finished,
    /// A read or write failed; both sockets were shut down.
    Failed,
    /// Nothing moved for the idle timeout; both sockets were shut down.
    IdleTimeout,
}

/// [`pump`] between a client (`down`) and an upstream (`up`), counting bytes on the
/// listener's and the cluster's statistics; returns how it ended and the bytes read from
/// the client and from the upstream.
pub async fn pump_counted<D: Stream, U: Stream>(
    down: &D,
    up: &U,
    to_up: Vec<u8>,
    to_down: Vec<u8>,
    idle: Duration,
    listener: &ListenerStats,
    cluster: &ClusterStats,
) -> (Pumped, u64, u64) {
    let (received, sent) = (Cell::new(0), Cell::new(0));
    let from_down = |n| {
        received.set(received.get() + n);
        listener.received(n);
        cluster.sent(n);
    };
    let from_up = |n| {
        sent.set(sent.get() + n);
        listener.sent(n);
        cluster.received(n);
    };
    let spliced = || listener.spliced();
    let outcome = pump(
        down, up, to_up, to_down, idle, &from_down, &from_up, &spliced,
    )
    .await;
    (outcome, received.get(), sent.get())
}

/// Copies `a → b` and `b → a` until both directions end. `to_b` and `to_a` are bytes already
/// read from `a` and `b`, written first. `on_a` and `on_b` count bytes read from each side;
/// `on_splice` counts directions that moved to `splice`.
#[allow(clippy::too_many_arguments)]
pub async fn pump<A: Stream, B: Stream>(
    a: &A,
    b: &B,
    to_b: Vec<u8>,
    to_a: Vec<u8>,
    idle: Duration,
    on_a: &dyn Fn(u64),
    on_b: &dyn Fn(u64),
    on_splice: &dyn Fn(),
) -> Pumped {
    let last_activity = Cell::new(Instant::now());
    let copies = async {
        // The first direction to fail ends the other too (it has reset both sides).
        match tokio::try_join!(
            copy(a, b, to_b, &last_activity, on_a, on_splice),
            copy(b, a, to_a, &last_activity, on_b, on_splice)
        ) {
            Ok(_) => Pumped::Finished,
            Err(_) => Pumped::Failed,
        }
    };
    let watchdog = async {
        loop {
            let deadline = last_activity.get() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    };
    tokio::select! {
        outcome = copies => outcome,
        () = watchdog => {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
            Pumped::IdleTimeout
        }
    }
}

/// One direction: read from `src`, write to `dst`, pass end of stream on as a half-close.
async fn copy<S: Stream, D: Stream>(
    src: &S,
    dst: &D,
    pending: Vec<u8>,
    last_activity: &Cell<Instant>,
    count: &dyn Fn(u64),
    on_splice: &dyn Fn(),
) -> std::io::Result<()> {
    let mut buf = pending;
    let result = async {
        if !buf.is_empty() {
            let len = buf.len();
            let (written, back) = dst.write_all(std::mem::take(&mut buf), 0..len).await;
            buf = back;
            written?;
        }
        if buf.capacity() < COPY_BUFFER {
            buf.reserve(COPY_BUFFER - buf.len());
        }
        loop {
            buf.clear();
            let (read, back) = src.read(std::mem::take(&mut buf)).await;
            buf = back;
            let n = read?;
            if n == 0 {
                // The peer may already be gone entirely; that is not this direction's error.
                let _ = dst.close_write().await;
                return Ok(());
            }
            last_activity.set(Instant::now());
            count(n as u64);
            let (written, back) = dst.write_all(std::mem::take(&mut buf), 0..n).await;
            buf = back;
            written?;
            if n >= SPLICE_AFTER && src.can_splice() && dst.can_splice() {
                match rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC) {
                    Ok(pipe) => {
                        on_splice();
                        return splice(src, dst, pipe, last_activity, count).await;
                    }
                    Err(error) => tracing::debug!(%error, "no pipe for splice; copying"),
                }
            }
            if n == buf.capacity() && n < MAX_COPY_BUFFER {
                buf.reserve(2 * n - buf.len());
            } else {
                // A bulk burst is over: give most of the buffer back. Not below what a TLS
                // read reserves (two records), so that reads do not reallocate each time.
                buf.clear();
                crate::io::fit(&mut buf, n, SHRINK_FLOOR);
            }
        }
    }
    .await;
    if result.is_err() {
        // A reset (or a failed write) on one side reaches the other as a reset, not as a
        // clean end (a FIN) it could take for the whole stream. Aborting also fails what the
        // other direction has pending on either socket, which `try_join` then drops.
        src.abort();
        dst.abort();
    }
    result
}

/// One direction, the rest of the way, socket → pipe → socket: the bytes are never copied
/// into the proxy. Errors are handled by the caller, [`copy`].
async fn splice<S: Stream, D: Stream>(
    src: &S,
    dst: &D,
    (read_end, write_end): (OwnedFd, OwnedFd),
    last_activity: &Cell<Instant>,
    count: &dyn Fn(u64),
) -> std::io::Result<()> {
    // A larger pipe moves more per call; the default (64 KiB) also works.
    let _ = rustix::pipe::fcntl_setpipe_size(&write_end, MAX_COPY_BUFFER);
    loop {
        let n = src
            .splice_to_pipe(write_end.as_fd(), MAX_COPY_BUFFER)
            .await?;
        if n == 0 {
            let _ = dst.close_write().await;
            return Ok(());
        }
        last_activity.set(Instant::now());
        count(n as u64);
        let mut left = n;
        while left > 0 {
            match dst.splice_from_pipe(read_end.as_fd(), left).await? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                moved => left -= moved,
            }
        }
    }
}
