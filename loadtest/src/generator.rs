//! The open-loop engine: requests leave on a fixed schedule per connection whatever the
//! responses do, and each latency is measured from the request's *intended* send time, so a
//! stall shows in the percentiles instead of silently lowering the rate (coordinated
//! omission, as wrk2 corrects it).
//!
//! One thread per core, each with its own connections, `mio` event loop and `timerfd` (so
//! sends are scheduled to the microsecond, not to epoll's millisecond), its own histograms,
//! and no allocation per request. Threads share nothing but progress counters.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};

use crate::protocol::{Response, Step, Workload};

/// Histogram range: 1 µs to 60 s at three significant digits.
pub const MAX_MICROS: u64 = 60_000_000;
/// Read buffer per connection; a response head must fit in it.
const READ_BUFFER: usize = 64 * 1024;
const TIMER: Token = Token(usize::MAX);

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where to send.
    pub target: SocketAddr,
    /// What to send.
    pub workload: Workload,
    /// Requests per second, over all connections.
    pub rate: f64,
    /// Connections, each sending one request at a time.
    pub connections: usize,
    /// Generator threads.
    pub threads: usize,
    /// Measured time, after the warm-up.
    pub duration: Duration,
    /// Time run but not measured.
    pub warmup: Duration,
    /// A response later than this after its intended send time counts as a timeout.
    pub timeout: Duration,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The target refused or did not answer a test connection.
    #[error("cannot reach {target}: {source}")]
    Unreachable {
        /// The target.
        target: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The plan makes no sense.
    #[error("invalid plan: {0}")]
    Invalid(&'static str),
    /// The OS refused a timer, poller or thread.
    #[error("setting up the generator: {0}")]
    Setup(io::Error),
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Latency from intended send to complete response, µs, successful requests in the window.
    pub latency: Histogram<u64>,
    /// How late requests actually left, µs: the generator's own lateness plus waiting for the
    /// previous response on the connection.
    pub send_lag: Histogram<u64>,
    /// Requests whose intended time fell in the window.
    pub scheduled: u64,
    /// Of those, completed successfully.
    pub completed: u64,
    /// Of those, failed, by kind.
    pub errors: BTreeMap<String, u64>,
    /// From the window's start to the last completion of a window request.
    pub elapsed: Duration,
    /// The rate asked for.
    pub target_rate: f64,
}

impl Outcome {
    /// Completed requests per second over the window.
    pub fn achieved_rate(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.completed as f64 / seconds
        } else {
            0.0
        }
    }

    /// Errors of all kinds.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// An outcome with nothing recorded yet.
    pub fn empty(target_rate: f64) -> Outcome {
        Outcome {
            latency: histogram(),
            send_lag: histogram(),
            scheduled: 0,
            completed: 0,
            errors: BTreeMap::new(),
            elapsed: Duration::ZERO,
            target_rate,
        }
    }

    /// Adds a later run (another round) into this one: counts add, and so do the elapsed
    /// times, so the achieved rate stays per second of measurement.
    pub fn merge(&mut self, other: Outcome) {
        let elapsed = self.elapsed + other.elapsed;
        self.merge_parallel(other);
        self.elapsed = elapsed;
    }

    /// Adds a concurrent part of the same run (another thread's): counts add; the run lasted
    /// as long as its longest part.
    fn merge_parallel(&mut self, other: Outcome) {
        // Same bounds everywhere, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.send_lag.add(&other.send_lag);
        self.scheduled += other.scheduled;
        self.completed += other.completed;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.elapsed = self.elapsed.max(other.elapsed);
    }
}

/// Live counters a progress line reads while a run goes on.
#[derive(Debug, Default)]
pub struct Progress {
    /// Completed requests (warm-up included).
    pub completed: AtomicU64,
    /// Failed requests (warm-up included).
    pub errors: AtomicU64,
    /// Set to stop every thread early.
    pub cancel: AtomicBool,
}

/// A histogram with the generator's bounds.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3)
        .unwrap_or_else(|_| unreachable!("constant bounds are valid"))
}

/// Runs the plan to completion.
pub fn run(plan: &Plan, progress: &Progress) -> Result<Outcome, RunError> {
    if !plan.rate.is_finite()
        || plan.rate <= 0.0
        || plan.connections == 0
        || plan.threads == 0
        || plan.duration.is_zero()
    {
        return Err(RunError::Invalid(
            "rate, connections, threads and duration must be positive",
        ));
    }
    std::net::TcpStream::connect_timeout(&plan.target, Duration::from_secs(2)).map_err(
        |source| RunError::Unreachable {
            target: plan.target,
            source,
        },
    )?;

    let threads = plan.threads.min(plan.connections);
    // Each connection sends every `interval`; connections are staggered evenly across it.
    let interval = plan.connections as f64 * 1e9 / plan.rate;
    let start = Instant::now() + Duration::from_millis(20);
    let results: Vec<Result<Outcome, RunError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<usize> = (t..plan.connections).step_by(threads).collect();
                scope.spawn(move || Thread::new(plan, &mine, interval, start)?.run(progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(RunError::Invalid("a generator thread panicked")))
            })
            .collect()
    });
    let mut merged = Outcome::empty(plan.rate);
    for result in results {
        merged.merge_parallel(result?);
    }
    Ok(merged)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No socket (never connected, or dropped after an error).
    Down,
    /// Non-blocking connect in progress.
    Connecting,
    /// Connected, no request outstanding.
    Idle,
    /// A request is being written or its response read.
    Busy,
}

struct Conn {
    stream: Option<TcpStream>,
    state: State,
    /// Intended send time of the outstanding (or next) request, ns since start.
    intended: u64,
    /// When the request actually left.
    sent_at: u64,
    /// Whether the intended time came while connecting.
    send_when_connected: bool,
    written: usize,
    /// Received bytes not yet consumed are `rbuf[..filled]`.
    rbuf: Box<[u8]>,
    filled: usize,
    response: Response,
    /// HTTP/2: the connection's frame and HPACK state, and the bytes it sends (requests
    /// with their stream IDs, acknowledgements); `written` counts into `out`.
    h2: Option<crate::h2::Connection>,
    out: Vec<u8>,
}

impl Conn {
    fn consume(&mut self, n: usize) {
        self.rbuf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }
}

struct Thread<'a> {
    plan: &'a Plan,
    poll: Poll,
    timer: std::os::fd::OwnedFd,
    conns: Vec<Conn>,
    /// (intended ns, connection) for connections waiting for their next send time.
    due: BinaryHeap<Reverse<(u64, usize)>>,
    interval: f64,
    start: Instant,
    window: (u64, u64),
    outcome: Outcome,
    last_completion: u64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn micros_ceil(ns: u64) -> u64 {
    ns.div_ceil(1000).clamp(1, MAX_MICROS)
}

impl<'a> Thread<'a> {
    fn new(
        plan: &'a Plan,
        mine: &[usize],
        interval: f64,
        start: Instant,
    ) -> Result<Thread<'a>, RunError> {
        // Best effort: a 1 µs timer slack (the default is 50 µs).
        let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1000));
        let poll = Poll::new().map_err(RunError::Setup)?;
        let timer = rustix::time::timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .map_err(|e| RunError::Setup(e.into()))?;
        poll.registry()
            .register(
                &mut mio::unix::SourceFd(&timer.as_raw_fd()),
                TIMER,
                Interest::READABLE,
            )
            .map_err(RunError::Setup)?;
        let mut due = BinaryHeap::with_capacity(mine.len());
        let conns = mine
            .iter()
            .enumerate()
            .map(|(local, &global)| {
                let first = (global as f64 * interval / plan.connections as f64) as u64;
                due.push(Reverse((first, local)));
                Conn {
                    stream: None,
                    state: State::Down,
                    intended: first,
                    sent_at: 0,
                    send_when_connected: false,
                    written: 0,
                    rbuf: vec![0; READ_BUFFER].into_boxed_slice(),
                    filled: 0,
                    response: plan.workload.response(),
                    h2: None,
                    out: Vec::new(),
                }
            })
            .collect();
        let warmup = nanos(plan.warmup);
        Ok(Thread {
            plan,
            poll,
            timer,
            conns,
            due,
            interval,
            start,
            window: (warmup, warmup.saturating_add(nanos(plan.duration))),
            outcome: Outcome::empty(plan.rate),
            last_completion: 0,
        })
    }

    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.start))
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.window.0 && t < self.window.1
    }

    fn run(mut self, progress: &Progress) -> Result<Outcome, RunError> {
        for i in 0..self.conns.len() {
            self.connect(i);
        }
        let mut events = Events::with_capacity(256);
        let timeout = nanos(self.plan.timeout);
        loop {
            let now = self.now();
            while let Some(&Reverse((t, i))) = self.due.peek() {
                if t > now {
                    break;
                }
                self.due.pop();
                if t >= self.window.1 || progress.cancel.load(Ordering::Relaxed) {
                    continue; // No more sends on this connection.
                }
                self.send(i, t, progress);
            }
            // Time out late responses; find the next deadline.
            let mut next = u64::MAX;
            let mut busy = false;
            for i in 0..self.conns.len() {
                if self.conns[i].state == State::Busy
                    || (self.conns[i].state == State::Connecting
                        && self.conns[i].send_when_connected)
                {
                    let deadline = self.conns[i].intended.saturating_add(timeout);
                    if deadline <= now {
                        self.fail(i, "timeout", progress);
                    } else {
                        busy = true;
                        next = next.min(deadline);
                    }
                }
            }
            // After the timeouts: each one scheduled its connection's next send.
            next = next.min(self.due.peek().map_or(u64::MAX, |Reverse((t, _))| *t));
            if self.due.is_empty() && !busy {
                break;
            }
            self.arm(next.saturating_sub(self.now()).max(1))?;
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(RunError::Setup(e));
            }
            for event in &events {
                if event.token() == TIMER {
                    let mut expirations = [0u8; 8];
                    let _ = rustix::io::read(&self.timer, &mut expirations);
                    continue;
                }
                let i = event.token().0;
                if self.conns[i].state == State::Connecting
                    && (event.is_writable() || event.is_error())
                {
                    self.connected(i, progress);
                }
                if self.conns[i].state == State::Busy {
                    if event.is_writable() {
                        self.write(i, progress);
                    }
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        self.read(i, progress);
                    }
                }
            }
        }
        let (start, _) = self.window;
        self.outcome.elapsed = Duration::from_nanos(self.last_completion.saturating_sub(start));
        Ok(self.outcome)
    }

    fn arm(&self, after_ns: u64) -> Result<(), RunError> {
        let value = Timespec {
            tv_sec: i64::try_from(after_ns / 1_000_000_000).unwrap_or(i64::MAX),
            tv_nsec: i64::try_from(after_ns % 1_000_000_000).unwrap_or(0),
        };
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        rustix::time::timerfd_settime(&self.timer, TimerfdTimerFlags::empty(), &spec)
            .map(drop)
            .map_err(|e| RunError::Setup(e.into()))
    }

    fn connect(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        match TcpStream::connect(self.plan.target) {
            Ok(mut stream) => {
                let registered = self.poll.registry().register(
                    &mut stream,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                );
                if registered.is_ok() {
                    let _ = stream.set_nodelay(true);
                    conn.stream = Some(stream);
                    conn.state = State::Connecting;
                    conn.h2 = self
                        .plan
                        .workload
                        .protocol
                        .h2()
                        .map(crate::h2::Connection::new);
                    conn.out.clear();
                    return;
                }
                conn.state = State::Down;
            }
            Err(_) => conn.state = State::Down,
        }
    }

    fn connected(&mut self, i: usize, progress: &Progress) {
        let conn = &mut self.conns[i];
        let Some(stream) = &conn.stream else { return };
        match stream.take_error() {
            Ok(None) if stream.peer_addr().is_ok() => {
                conn.state = State::Idle;
                if conn.send_when_connected {
                    conn.send_when_connected = false;
                    self.start(i, progress);
                }
            }
            Ok(None) => {} // Still connecting.
            _ => {
                let pending = conn.send_when_connected;
                self.drop_conn(i);
                if pending {
                    self.fail(i, "connect", progress);
                }
            }
        }
    }

    fn drop_conn(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if let Some(mut stream) = conn.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        conn.state = State::Down;
        conn.send_when_connected = false;
        conn.filled = 0;
    }

    /// Starts the request intended for `t` on connection `i`.
    fn send(&mut self, i: usize, t: u64, progress: &Progress) {
        self.conns[i].intended = t;
        if self.in_window(t) {
            self.outcome.scheduled += 1;
        }
        match self.conns[i].state {
            State::Down => {
                self.connect(i);
                if self.conns[i].state == State::Down {
                    self.fail(i, "connect", progress);
                } else {
                    self.conns[i].send_when_connected = true;
                }
                return;
            }
            State::Connecting => {
                self.conns[i].send_when_connected = true;
                return;
            }
            State::Idle | State::Busy => {}
        }
        self.start(i, progress);
    }

    /// Puts the request intended for `conns[i].intended` on the wire (the connection is up).
    fn start(&mut self, i: usize, progress: &Progress) {
        let t = self.conns[i].intended;
        let now = self.now();
        let conn = &mut self.conns[i];
        conn.state = State::Busy;
        conn.sent_at = now;
        if let Some(h2) = &mut conn.h2 {
            // Bytes of `out` not yet written (an acknowledgement) go first.
            let written = conn.written.min(conn.out.len());
            conn.out.drain(..written);
            h2.request(&self.plan.workload.request, &mut conn.out);
        }
        conn.written = 0;
        conn.response = self.plan.workload.response();
        if self.in_window(t) {
            let _ = self
                .outcome
                .send_lag
                .record(micros_ceil(now.saturating_sub(t)));
        }
        self.write(i, progress);
    }

    fn write(&mut self, i: usize, progress: &Progress) {
        let conn = &mut self.conns[i];
        let request: &[u8] = if conn.h2.is_some() {
            &conn.out
        } else {
            &self.plan.workload.request
        };
        let Some(stream) = conn.stream.as_mut() else {
            return;
        };
        while conn.written < request.len() {
            match stream.write(&request[conn.written..]) {
                Ok(0) => return self.fail(i, "write", progress),
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.fail(i, "write", progress),
            }
        }
    }

    fn read(&mut self, i: usize, progress: &Progress) {
        loop {
            let conn = &mut self.conns[i];
            let Some(stream) = conn.stream.as_mut() else {
                return;
            };
            if conn.filled == conn.rbuf.len() {
                return self.fail(i, "response head too large", progress);
            }
            match stream.read(&mut conn.rbuf[conn.filled..]) {
                Ok(0) => return self.fail(i, "closed", progress),
                Ok(n) => conn.filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.fail(i, "reset", progress),
            }
            // Scan what arrived.
            loop {
                let conn = &mut self.conns[i];
                let step = match &mut conn.h2 {
                    Some(h2) => h2.step(&conn.rbuf[..conn.filled]),
                    None => conn.response.step(&conn.rbuf[..conn.filled]),
                };
                match step {
                    Ok(Step::More(0)) => break,
                    Ok(Step::More(n)) => conn.consume(n),
                    Ok(Step::Done(n, status)) => {
                        conn.consume(n);
                        self.complete(i, status, progress);
                        if self.plan.workload.reconnect {
                            // The next send opens a new connection.
                            self.drop_conn(i);
                            return;
                        }
                        break;
                    }
                    Ok(Step::DoneClose(n, status)) => {
                        conn.consume(n);
                        self.complete(i, status, progress);
                        // The next send reconnects.
                        self.drop_conn(i);
                        return;
                    }
                    Ok(Step::Failed(n, kind)) => {
                        conn.consume(n);
                        if self.in_window(self.conns[i].intended) {
                            self.last_completion = self.last_completion.max(self.now());
                        }
                        self.count_error(i, kind, progress);
                        self.conns[i].state = State::Idle;
                        self.schedule_next(i);
                        break;
                    }
                    Err(e) => return self.fail(i, e.kind(), progress),
                }
            }
            // HTTP/2 acknowledgements and window updates go out at once.
            let conn = &mut self.conns[i];
            if let Some(h2) = &mut conn.h2
                && h2.take_pending(&mut conn.out)
            {
                self.write(i, progress);
            }
            if self.conns[i].state != State::Busy {
                return;
            }
        }
    }

    fn complete(&mut self, i: usize, status: u16, progress: &Progress) {
        let now = self.now();
        let t = self.conns[i].intended;
        self.conns[i].state = State::Idle;
        if (200..400).contains(&status) || status == 0 {
            progress.completed.fetch_add(1, Ordering::Relaxed);
            if self.in_window(t) {
                let _ = self
                    .outcome
                    .latency
                    .record(micros_ceil(now.saturating_sub(t)));
                self.outcome.completed += 1;
                self.last_completion = self.last_completion.max(now);
            }
        } else {
            progress.errors.fetch_add(1, Ordering::Relaxed);
            if self.in_window(t) {
                *self
                    .outcome
                    .errors
                    .entry(format!("http {}xx", status / 100))
                    .or_default() += 1;
                self.last_completion = self.last_completion.max(now);
            }
        }
        self.schedule_next(i);
    }

    /// Counts the outstanding request as failed, drops the connection, schedules the next.
    fn fail(&mut self, i: usize, kind: &str, progress: &Progress) {
        self.count_error(i, kind, progress);
        self.drop_conn(i);
        self.schedule_next(i);
    }

    /// Counts the outstanding request as an error of `kind`.
    fn count_error(&mut self, i: usize, kind: &str, progress: &Progress) {
        let t = self.conns[i].intended;
        progress.errors.fetch_add(1, Ordering::Relaxed);
        if self.in_window(t) {
            match self.outcome.errors.get_mut(kind) {
                Some(n) => *n += 1,
                None => {
                    self.outcome.errors.insert(kind.to_owned(), 1);
                }
            }
        }
    }

    fn schedule_next(&mut self, i: usize) {
        let next = (self.conns[i].intended as f64 + self.interval) as u64;
        self.conns[i].intended = next;
        self.due.push(Reverse((next, i)));
    }
}
