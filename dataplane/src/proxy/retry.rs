//! Retries of HTTP requests, as a cluster's [`Retries`] (a BackendPolicy's) ask: which
//! failures go again ([`Failure`]), the budget that caps them on each worker ([`Budget`]), and
//! the request body an HTTP/2 retry sends again ([`Replay`]).
//!
//! Each retry goes to the cluster's next endpoint (round robin), within the route's timeout,
//! which bounds every attempt together; a per-try timeout bounds each one's wait for its
//! response head. The budget follows Linkerd's and Finagle's: retries may add a share of the
//! requests on top of a floor per second, so a failing upstream under load gets a little more
//! traffic, never a multiple of it.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Request;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use shared::config::{Retries, RetryOn};

use crate::metrics::ClusterStats;

/// How an attempt failed, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The upstream closed or reset the connection (or the stream) before a response head.
    Reset,
    /// No response head within the per-try timeout.
    PerTryTimeout,
    /// The upstream answered with this HTTP status.
    Status(u16),
    /// A gRPC call answered `UNAVAILABLE` (`grpc-status: 14` in a trailers-only response).
    Unavailable,
}

/// Whether `retries` asks for `failure` to be tried again.
pub fn wanted(retries: &Retries, failure: Failure) -> bool {
    let on = |kind| retries.on.contains(&kind);
    match failure {
        Failure::Reset => on(RetryOn::Reset),
        Failure::PerTryTimeout | Failure::Status(502..=504) => on(RetryOn::GatewayError),
        Failure::Status(_) => false,
        Failure::Unavailable => on(RetryOn::Unavailable),
    }
}

/// The attempts at one request: its cluster's retry policy (none for a request that cannot
/// go again), the retries it has left, and the route's deadline over them all.
pub struct Attempts<'a> {
    retries: Option<&'a Retries>,
    left: u32,
    overall: tokio::time::Instant,
    stats: &'a ClusterStats,
}

impl<'a> Attempts<'a> {
    /// A request's attempts, starting now, within `timeout`; it counts toward the budget
    /// that its retries draw on.
    pub fn start(
        retries: Option<&'a Retries>,
        timeout: Duration,
        stats: &'a ClusterStats,
    ) -> Attempts<'a> {
        if retries.is_some() {
            stats.retry_budget.request();
        }
        Attempts {
            retries,
            left: retries.map_or(0, |r| r.attempts),
            overall: tokio::time::Instant::now() + timeout,
            stats,
        }
    }

    /// Whether the request may be retried at all (to do work only a retry needs).
    pub fn retryable(&self) -> bool {
        self.retries.is_some()
    }

    /// When the route's timeout runs out.
    pub fn overall(&self) -> tokio::time::Instant {
        self.overall
    }

    /// When an attempt that starts now must have its response head: the per-try timeout,
    /// within what is left of the route's.
    pub fn deadline(&self) -> tokio::time::Instant {
        match self.retries.and_then(|r| r.per_try_timeout) {
            Some(per_try) => self.overall.min(tokio::time::Instant::now() + per_try),
            None => self.overall,
        }
    }

    /// Whether an attempt that failed with `failure` goes again: the policy names it, the
    /// request has retries and time left, and the budget has room (counted either way).
    pub fn again(&mut self, failure: Failure) -> bool {
        let Some(retries) = self.retries else {
            return false;
        };
        if self.left == 0
            || !wanted(retries, failure)
            || tokio::time::Instant::now() >= self.overall
        {
            return false;
        }
        if !self.stats.retry_budget.withdraw(retries) {
            self.stats.retry_refused();
            return false;
        }
        self.left -= 1;
        self.stats.retried();
        true
    }
}

/// How long the budget counts requests before starting over (the previous window's count
/// still sets the share, so a new window does not start with none).
const WINDOW: Duration = Duration::from_secs(10);

/// One worker's retry budget for one cluster: retries may add `budget_percent` of the
/// requests of the current or last [`WINDOW`] (whichever saw more), and beyond that
/// `min_per_second` in any one second.
#[derive(Debug)]
pub struct Budget {
    window_start: Cell<Instant>,
    requests: Cell<u64>,
    previous_requests: Cell<u64>,
    /// Retries taken from the share in this window.
    shared: Cell<u64>,
    second_start: Cell<Instant>,
    /// Retries taken from the floor in this second.
    floor: Cell<u32>,
}

impl Default for Budget {
    fn default() -> Budget {
        let now = Instant::now();
        Budget {
            window_start: Cell::new(now),
            requests: Cell::new(0),
            previous_requests: Cell::new(0),
            shared: Cell::new(0),
            second_start: Cell::new(now),
            floor: Cell::new(0),
        }
    }
}

impl Budget {
    /// A request's first attempt went out.
    pub fn request(&self) {
        self.roll(Instant::now());
        self.requests.set(self.requests.get() + 1);
    }

    /// Takes a retry from the budget; false when it has none left.
    pub fn withdraw(&self, retries: &Retries) -> bool {
        self.withdraw_at(retries, Instant::now())
    }

    fn withdraw_at(&self, retries: &Retries, now: Instant) -> bool {
        self.roll(now);
        let requests = self.requests.get().max(self.previous_requests.get());
        if self.shared.get() < requests * u64::from(retries.budget_percent) / 100 {
            self.shared.set(self.shared.get() + 1);
            return true;
        }
        if now.saturating_duration_since(self.second_start.get()) >= Duration::from_secs(1) {
            self.second_start.set(now);
            self.floor.set(0);
        }
        if self.floor.get() < retries.min_per_second {
            self.floor.set(self.floor.get() + 1);
            return true;
        }
        false
    }

    /// Starts a new window when the current one is over (a window with no traffic leaves
    /// none to the next).
    fn roll(&self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start.get());
        if elapsed < WINDOW {
            return;
        }
        let previous = if elapsed < WINDOW * 2 {
            self.requests.get()
        } else {
            0
        };
        self.previous_requests.set(previous);
        self.requests.set(0);
        self.shared.set(0);
        self.window_start.set(now);
    }
}

/// Most request body a request keeps for sending again (Linkerd keeps 64 KiB too): a
/// larger body goes once, and is not retried. HTTP/2 records it as it goes; HTTP/1.1 reads
/// one of known length whole before the request goes.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// An HTTP/2 request body as it goes upstream: passed straight on, or recorded as it goes
/// so that a retry can send it again.
pub enum Outgoing {
    /// Passed on as it comes (no retries for this cluster).
    Direct(Incoming),
    /// Recorded for a retry.
    Replay(Replay),
}

impl Body for Outgoing {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Outgoing::Direct(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::into))),
            Outgoing::Replay(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Outgoing::Direct(body) => body.is_end_stream(),
            Outgoing::Replay(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Outgoing::Direct(body) => body.size_hint(),
            Outgoing::Replay(body) => body.size_hint(),
        }
    }
}

/// What the client sent of a body so far, shared by every attempt's [`Replay`].
struct Recording<S> {
    source: S,
    /// Data frames read from `source`, while they fit in [`REPLAY_LIMIT`].
    data: Vec<Bytes>,
    size: usize,
    trailers: Option<hyper::HeaderMap>,
    /// `source` ended (trailers included).
    ended: bool,
    /// The body outgrew the limit or failed: it cannot be sent again.
    lost: bool,
    /// The newest attempt's number: only it reads on from `source`.
    newest: u32,
    /// The waker of the attempt waiting on `source`, woken when a newer attempt takes over
    /// (`source` keeps only the last waker given it): the older one then fails, and hyper
    /// resets its stream rather than leave it open, holding a place on its connection.
    reader: Option<Waker>,
}

/// Records a request body as its first attempt sends it, and gives each later attempt a
/// copy from the start.
pub struct Recorder<S = Incoming>(Rc<RefCell<Recording<S>>>);

impl<S> Recorder<S> {
    /// A recorder of `source`, and the first attempt's body.
    pub fn new(source: S) -> (Recorder<S>, Replay<S>) {
        let recording = Rc::new(RefCell::new(Recording {
            source,
            data: Vec::new(),
            size: 0,
            trailers: None,
            ended: false,
            lost: false,
            newest: 0,
            reader: None,
        }));
        let first = Replay {
            recording: recording.clone(),
            attempt: 0,
            sent: 0,
            trailers_sent: false,
        };
        (Recorder(recording), first)
    }

    /// Whether the body can still be sent again.
    pub fn replayable(&self) -> bool {
        !self.0.borrow().lost
    }

    /// The next attempt's body, from the start; None when the body cannot be sent again.
    pub fn again(&self) -> Option<Replay<S>> {
        let mut recording = self.0.borrow_mut();
        if recording.lost {
            return None;
        }
        recording.newest += 1;
        if let Some(reader) = recording.reader.take() {
            reader.wake();
        }
        Some(Replay {
            recording: self.0.clone(),
            attempt: recording.newest,
            sent: 0,
            trailers_sent: false,
        })
    }
}

/// One attempt's copy of a request body: it sends what was recorded, then goes on reading the
/// client's body (recording it), as Linkerd's `ReplayBody`. An older attempt's copy that
/// reaches the end of the recording fails (its stream is being given up).
pub struct Replay<S = Incoming> {
    recording: Rc<RefCell<Recording<S>>>,
    attempt: u32,
    /// Data frames of the recording this copy has sent.
    sent: usize,
    trailers_sent: bool,
}

/// Why an older attempt's body stopped.
#[derive(Debug, thiserror::Error)]
#[error("the request is being sent again")]
struct Superseded;

/// What an HTTP/2 request needs to go again: its head, and its body's recording.
pub struct Resend {
    method: hyper::Method,
    uri: hyper::Uri,
    version: hyper::Version,
    headers: hyper::HeaderMap,
    body: Recorder,
}

impl Resend {
    /// The request as its first attempt sends it, and, when it may be retried, what a retry
    /// needs (the head is copied, the body recorded as it goes).
    pub fn split(
        request: Request<Incoming>,
        retryable: bool,
    ) -> (Request<Outgoing>, Option<Resend>) {
        if !retryable {
            return (request.map(Outgoing::Direct), None);
        }
        let (parts, body) = request.into_parts();
        let (body, first) = Recorder::new(body);
        let resend = Resend {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body,
        };
        (
            Request::from_parts(parts, Outgoing::Replay(first)),
            Some(resend),
        )
    }

    /// The next attempt after `failure`, when `attempts` allow one and the body can be sent
    /// again.
    pub fn again(
        resend: Option<&Resend>,
        attempts: &mut Attempts<'_>,
        failure: Failure,
    ) -> Option<Request<Outgoing>> {
        let resend = resend?;
        if !resend.body.replayable() || !attempts.again(failure) {
            return None;
        }
        let mut request = Request::new(Outgoing::Replay(resend.body.again()?));
        *request.method_mut() = resend.method.clone();
        *request.uri_mut() = resend.uri.clone();
        *request.version_mut() = resend.version;
        *request.headers_mut() = resend.headers.clone();
        Some(request)
    }
}

impl<S> Body for Replay<S>
where
    S: Body<Data = Bytes> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let mut recording = this.recording.borrow_mut();
        if let Some(data) = recording.data.get(this.sent) {
            this.sent += 1;
            return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
        }
        if recording.ended {
            if !this.trailers_sent
                && let Some(trailers) = &recording.trailers
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
            }
            return Poll::Ready(None);
        }
        if this.attempt != recording.newest {
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        let recording = &mut *recording;
        let frame = match Pin::new(&mut recording.source).poll_frame(cx) {
            Poll::Pending => {
                recording.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(None) => {
                recording.ended = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(error))) => {
                recording.lost = true;
                return Poll::Ready(Some(Err(error.into())));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            if !recording.lost {
                recording.size += data.len();
                if recording.size > REPLAY_LIMIT {
                    recording.lost = true;
                    recording.data = Vec::new();
                } else {
                    recording.data.push(data.clone());
                    this.sent += 1;
                }
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            recording.trailers = Some(trailers.clone());
            recording.ended = true;
            this.trailers_sent = true;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let recording = self.recording.borrow();
        if self.sent < recording.data.len() || (recording.trailers.is_some() && !self.trailers_sent)
        {
            return false;
        }
        recording.ended || (self.attempt == recording.newest && recording.source.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let recording = self.recording.borrow();
        if recording.ended {
            let left: usize = recording.data.iter().skip(self.sent).map(Bytes::len).sum();
            return SizeHint::with_exact(left as u64);
        }
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, StreamBody};

    fn retries(on: &[RetryOn]) -> Retries {
        Retries {
            attempts: 2,
            on: on.to_vec(),
            per_try_timeout: None,
            budget_percent: 20,
            min_per_second: 1,
        }
    }

    #[test]
    fn each_kind_of_failure_is_retried_only_when_asked() {
        let gateway = retries(&[RetryOn::GatewayError]);
        for status in [502, 503, 504] {
            assert!(wanted(&gateway, Failure::Status(status)), "{status}");
        }
        assert!(wanted(&gateway, Failure::PerTryTimeout));
        for failure in [
            Failure::Status(500),
            Failure::Status(200),
            Failure::Reset,
            Failure::Unavailable,
        ] {
            assert!(!wanted(&gateway, failure), "{failure:?}");
        }
        let reset = retries(&[RetryOn::Reset]);
        assert!(wanted(&reset, Failure::Reset));
        assert!(!wanted(&reset, Failure::Status(503)));
        let unavailable = retries(&[RetryOn::Unavailable]);
        assert!(wanted(&unavailable, Failure::Unavailable));
        assert!(!wanted(&unavailable, Failure::Reset));
    }

    #[test]
    fn the_budget_allows_a_share_of_requests_on_top_of_a_floor() {
        let policy = Retries {
            min_per_second: 2,
            ..retries(&[RetryOn::Reset])
        };
        let budget = Budget::default();
        let start = budget.window_start.get();
        let take = |at: Instant| {
            (0..1000)
                .take_while(|_| budget.withdraw_at(&policy, at))
                .count()
        };
        // No traffic yet: the floor alone, for this second.
        assert_eq!(take(start), 2);
        assert_eq!(take(start + Duration::from_millis(999)), 0);
        assert_eq!(take(start + Duration::from_secs(1)), 2);
        // 100 requests make room for 20 more (20%).
        for _ in 0..100 {
            budget.request();
        }
        assert_eq!(take(start + Duration::from_secs(1)), 20);
        // The next window starts with the last window's share, and the floor.
        let next = start + WINDOW;
        assert_eq!(take(next), 22);
        // After a whole window with no traffic, the floor alone.
        assert_eq!(take(next + WINDOW * 3), 2);
    }

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn an_attempt_waiting_on_the_client_fails_once_a_newer_one_takes_over() {
        // The client sends one frame, then nothing yet: the body is still arriving.
        let (frames, source) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
        frames
            .send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        let source = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(source));
        let (recorder, mut first) = Recorder::new(source);
        let count = std::sync::Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            Pin::new(&mut first).poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert!(Pin::new(&mut first).poll_frame(&mut cx).is_pending());

        let second = recorder.again().unwrap();
        assert_eq!(
            count.0.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "woken"
        );
        assert!(matches!(
            Pin::new(&mut first).poll_frame(&mut cx),
            Poll::Ready(Some(Err(_)))
        ));
        // The newer attempt sends what was recorded, then the rest as it comes.
        frames
            .send(Ok(Frame::data(Bytes::from_static(b"b"))))
            .await
            .unwrap();
        drop(frames);
        assert_eq!(read(second).await.0, b"ab".to_vec());
    }

    type Chunks = StreamBody<
        tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>,
    >;

    fn body(frames: Vec<Frame<Bytes>>) -> Chunks {
        StreamBody::new(tokio_stream::iter(
            frames.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    async fn read<S>(body: Replay<S>) -> (Vec<u8>, Option<hyper::HeaderMap>)
    where
        S: Body<Data = Bytes> + Unpin,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let collected = body.collect().await.map_err(|e| e.to_string()).unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_retry_sends_the_whole_body_and_its_trailers_again() {
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-timeout", "1S".parse().unwrap());
        let (recorder, first) = Recorder::new(body(vec![
            Frame::data(Bytes::from_static(b"hello ")),
            Frame::data(Bytes::from_static(b"world")),
            Frame::trailers(trailers.clone()),
        ]));
        let _second = recorder.again().unwrap();
        let third = recorder.again().unwrap();
        // The newest attempt reads the client's body; the others replay what it recorded.
        assert_eq!(
            read(third).await,
            (b"hello world".to_vec(), Some(trailers.clone()))
        );
        assert_eq!(read(first).await, (b"hello world".to_vec(), Some(trailers)));
    }

    #[tokio::test]
    async fn an_older_attempt_stops_where_the_recording_does() {
        let (recorder, mut first) = Recorder::new(body(vec![
            Frame::data(Bytes::from_static(b"a")),
            Frame::data(Bytes::from_static(b"b")),
        ]));
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"a"));
        let second = recorder.again().unwrap();
        // The first attempt has sent all that was recorded; the rest is the second's.
        assert!(first.frame().await.unwrap().is_err());
        assert_eq!(read(second).await.0, b"ab".to_vec());
    }

    #[tokio::test]
    async fn a_body_past_the_limit_goes_once_and_cannot_be_sent_again() {
        let big = Bytes::from(vec![7u8; REPLAY_LIMIT + 1]);
        let (recorder, first) = Recorder::new(body(vec![
            Frame::data(Bytes::from_static(b"x")),
            Frame::data(big),
        ]));
        let sent = first.collect().await.unwrap().to_bytes();
        assert_eq!(sent.len(), REPLAY_LIMIT + 2);
        assert!(!recorder.replayable());
        assert!(recorder.again().is_none());

        let (recorder, small) = Recorder::new(body(vec![Frame::data(Bytes::from_static(b"x"))]));
        let _ = small.collect().await.unwrap();
        assert!(recorder.replayable());
        assert_eq!(read(recorder.again().unwrap()).await.0, b"x".to_vec());
    }

    #[tokio::test]
    async fn an_empty_body_is_sent_again_as_an_empty_one() {
        let (recorder, first) = Recorder::new(body(Vec::new()));
        assert!(first.collect().await.unwrap().to_bytes().is_empty());
        let second = recorder.again().unwrap();
        // hyper ends the stream with the request's head when the body says it has ended.
        assert!(second.is_end_stream());
        assert_eq!(second.size_hint().exact(), Some(0));
    }
}
