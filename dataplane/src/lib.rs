//! `tern-proxy`, Tern's sidecar proxy, as a library: [`Proxy::start`] runs one in-process
//! (which is how the tests run it) and the `tern-proxy` binary is a thin shell around it.
//!
//! Layout: [`worker`] threads (one per core) run the data path, written once in [`proxy`]
//! against the [`io`] interface and its two backends; [`control`] and [`admin`] run on their
//! own thread and reach workers only by message, as do [`ca_client`], which keeps this
//! proxy certified by `tern-control`'s CA, and [`discovery_client`], which streams its
//! config from `tern-control`; [`snapshot`] is the compiled config workers read; [`tls`]
//! runs mutual TLS handshakes over the same IO interface, then [`ktls`] hands the record
//! layer to the kernel where it can and [`usertls`] runs it in userspace where it cannot;
//! [`metrics`] are per-worker and merged at scrape, and the optional [`access_log`] is
//! written by each worker from its own buffer, as the optional [`trace`]'s spans are
//! gathered, for a thread of their own to send; [`sys`] holds the OS calls; [`intercept`]
//! writes the pod's nftables rules for `tern-proxy init`.

pub mod access_log;
pub mod admin;
pub mod ca_client;
pub mod control;
pub mod discovery_client;
pub mod intercept;
pub mod io;
pub mod ktls;
pub mod metrics;
pub mod probes;
pub mod proxy;
pub mod snapshot;
pub mod sys;
pub mod tls;
pub mod trace;
pub mod usertls;
pub mod worker;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use shared::Config;
use tokio::sync::{Notify, mpsc};

pub use control::{ApplyError, Control};
pub use io::{BackendChoice, BackendKind};

/// How to run the proxy process (as opposed to what to proxy, which is the [`Config`]).
#[derive(Debug, Clone)]
pub struct Options {
    /// Worker threads; `None` means one per CPU the process may use (see
    /// [`sys::default_workers`]).
    pub workers: Option<usize>,
    /// Which IO backend.
    pub backend: BackendChoice,
    /// Pin each worker to its own CPU, when the process has CPUs of its own (see
    /// [`exclusive_cpus`]).
    pub pin_workers: bool,
    /// The scheduler time slice each worker asks for ([`sys::set_thread_slice`]); `None`
    /// (the default) keeps the kernel's. Shorter than the kernel's (0.7–3 ms, by CPU count),
    /// a worker woken by a packet may preempt a busy neighbour sooner; measured, that made a
    /// single hop slower and a pair no faster (docs/benchmarks.md), so it is opt-in.
    pub worker_slice: Option<Duration>,
    /// Admin server address.
    pub admin: SocketAddr,
    /// How long a drain waits for in-flight work.
    pub drain_deadline: Duration,
    /// Where the access log goes (`-`: standard output); none by default
    /// ([`access_log`]).
    pub access_log: Option<std::path::PathBuf>,
    /// Where spans go; none by default ([`trace`]).
    pub trace: Option<TraceOptions>,
}

/// How long a stopping proxy waits for its last spans to reach the collector.
const TRACE_FINISH_WITHIN: Duration = Duration::from_secs(5);

/// Where the proxy's spans go ([`trace`]).
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// The OpenTelemetry collector's OTLP/HTTP address, `host:port`.
    pub collector: String,
    /// The `service.name` the spans carry.
    pub service_name: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            workers: None,
            backend: BackendChoice::default(),
            pin_workers: true,
            worker_slice: None,
            admin: SocketAddr::from(([127, 0, 0, 1], 15000)),
            drain_deadline: Duration::from_secs(30),
            access_log: None,
            trace: None,
        }
    }
}

/// The CPUs to pin `workers` workers to: the allowed ones when there are no more of them
/// than workers (an exclusive cpuset, as Kubernetes' static CPU manager gives a Guaranteed
/// pod), else none. On a shared CPU pool every sidecar sees the same allowed set, and
/// pinning would put every sidecar's worker 0 on the same first CPU; there the scheduler
/// places threads better.
pub fn exclusive_cpus(allowed: Vec<usize>, workers: usize) -> Vec<usize> {
    if allowed.len() <= workers {
        allowed
    } else {
        Vec::new()
    }
}

/// Why the proxy did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The requested IO backend is unavailable.
    #[error("IO backend: {0}")]
    Backend(std::io::Error),
    /// The admin address could not be bound.
    #[error("admin server on {address}: {source}")]
    Admin {
        /// The address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    /// The access log could not be opened.
    #[error("access log {path}: {source}")]
    AccessLog {
        /// Where it was to go.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The span exporter could not start (or `--trace-collector` is not `host:port`).
    #[error("starting the span exporter: {0}")]
    Trace(std::io::Error),
    /// The first config could not be applied.
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// A running proxy: workers, admin server and control.
pub struct Proxy {
    control: Arc<Control>,
    workers: Vec<JoinHandle<()>>,
    admin: Option<JoinHandle<()>>,
    admin_stop: Arc<Notify>,
    admin_addr: SocketAddr,
}

impl Proxy {
    /// Starts workers and the admin server and applies `config`; returns once every worker
    /// accepts on every listener, or, when the identity comes from the CA, once the request
    /// for it is under way (the config goes live, and `/ready` turns 200, with the
    /// certificate).
    pub fn start(config: Config, source: &str, options: Options) -> Result<Proxy, StartError> {
        let backend = options.backend.resolve().map_err(StartError::Backend)?;
        // kTLS is probed now, so the log says at start-up what mTLS connections will do,
        // and no connection waits for the probe.
        ktls::supported();
        let access_log = match &options.access_log {
            Some(path) => Some(
                access_log::open(path).map_err(|source| StartError::AccessLog {
                    path: path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let trace = match &options.trace {
            Some(trace) => Some(
                trace::Exporter::start(&trace.collector, &trace.service_name)
                    .map_err(StartError::Trace)?,
            ),
            None => None,
        };
        let count = options.workers.unwrap_or_else(sys::default_workers).max(1);
        let cpus = if options.pin_workers {
            exclusive_cpus(sys::allowed_cpus().unwrap_or_default(), count)
        } else {
            Vec::new()
        };
        let admin_socket = std::net::TcpListener::bind(options.admin)
            .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
            .map_err(|source| StartError::Admin {
                address: options.admin,
                source,
            })?;
        let admin_addr = admin_socket
            .local_addr()
            .map_err(|source| StartError::Admin {
                address: options.admin,
                source,
            })?;

        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..count).map(|_| mpsc::unbounded_channel()).unzip();
        let control = Arc::new(Control::new(
            backend,
            senders,
            options.drain_deadline,
            trace.clone(),
        ));
        // Workers start on an empty snapshot; the real one (validated, identity loaded,
        // sockets bound) arrives with the first `apply` below.
        let empty = Config::from_yaml("{}", source).map_err(ApplyError::from)?;
        let first = Arc::new(
            snapshot::Snapshot::compile(empty, None, 0, source.to_owned())
                .map_err(ApplyError::from)?,
        );
        let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(count));
        let mut workers = Vec::with_capacity(count);
        for (id, commands) in receivers.into_iter().enumerate() {
            let spawn = worker::Spawn {
                id,
                workers: count,
                cpu: (!cpus.is_empty()).then(|| cpus[id % cpus.len()]),
                slice: options.worker_slice,
                snapshot: first.clone(),
                commands,
                destinations: control.destination_sender(),
                access_log: access_log.clone(),
                trace: trace.clone(),
            };
            let worker_control = control.clone();
            let remaining = remaining.clone();
            let thread = std::thread::Builder::new()
                .name(format!("tern-worker-{id}"))
                .spawn(move || {
                    let result = match backend {
                        BackendKind::IoUring => worker::run::<io::uring::Uring>(spawn),
                        BackendKind::Epoll => worker::run::<io::epoll::Epoll>(spawn),
                    };
                    if let Err(error) = result {
                        tracing::error!(worker = id, %error, "worker failed");
                    }
                    if remaining.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
                        worker_control.set_finished();
                    }
                });
            match thread {
                Ok(thread) => workers.push(thread),
                Err(error) => {
                    control.drain_within(Duration::ZERO);
                    return Err(StartError::Thread(error));
                }
            }
        }
        let admin_stop = Arc::new(Notify::new());
        let mut proxy = Proxy {
            control: control.clone(),
            workers,
            admin: None,
            admin_stop: admin_stop.clone(),
            admin_addr,
        };
        match control.apply(config, source) {
            // The identity comes from the CA: the admin thread fetches it and applies the
            // config then; until that, /ready says so.
            Ok(_) => {}
            Err(error) if error.is_awaiting() => {}
            Err(error) => return Err(error.into()),
        }
        let admin = std::thread::Builder::new()
            .name("tern-admin".into())
            .spawn(move || {
                if let Err(error) = admin::run(control, admin_socket, admin_stop) {
                    tracing::error!(%error, "admin server failed");
                }
            })
            .map_err(StartError::Thread)?;
        proxy.admin = Some(admin);
        tracing::info!(backend = backend.as_str(), workers = count, admin = %admin_addr, "tern-proxy started");
        Ok(proxy)
    }

    /// The control handle (reload, drain, scrape).
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// The admin server's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound address of a listener.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.control
            .listeners()
            .into_iter()
            .find(|b| b.name == name)
            .map(|b| b.address)
    }

    /// The IO backend the workers run.
    pub fn backend(&self) -> BackendKind {
        self.control.backend
    }

    /// Applies a new config; on error the running config stays.
    pub fn reload(&self, config: Config, source: &str) -> Result<u64, ApplyError> {
        self.control.apply(config, source)
    }

    /// Reads, validates and applies a config file; on error the running config stays.
    pub fn reload_file(&self, path: &Path) -> Result<u64, ApplyError> {
        let config = Config::from_file(path)?;
        self.control.apply(config, &path.display().to_string())
    }

    /// Starts a graceful drain (see [`Control::drain`]).
    pub fn drain(&self) {
        self.control.drain();
    }

    /// Waits for the workers to finish draining, then for the span exporter to send their
    /// last spans (up to 5 s), then stops the admin server.
    pub fn join(mut self) {
        self.join_threads();
    }

    fn join_threads(&mut self) {
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        // The workers' last spans (a drain's last second) go out before the process ends.
        if let Some(exporter) = &self.control.trace {
            exporter.finish(TRACE_FINISH_WITHIN);
        }
        self.admin_stop.notify_one();
        if let Some(admin) = self.admin.take() {
            let _ = admin.join();
        }
    }
}

impl Drop for Proxy {
    /// Dropping a proxy that was not drained stops it at once.
    fn drop(&mut self) {
        self.control.drain_within(Duration::ZERO);
        self.join_threads();
    }
}

#[cfg(test)]
mod tests {
    use super::exclusive_cpus;

    #[test]
    fn workers_are_pinned_only_to_cpus_of_their_own() {
        assert_eq!(exclusive_cpus(vec![2, 3], 2), [2, 3], "an exclusive cpuset");
        assert_eq!(exclusive_cpus(vec![5], 2), [5], "fewer CPUs than workers");
        assert!(
            exclusive_cpus(vec![0, 1, 2, 3], 2).is_empty(),
            "a shared pool: every sidecar would pin to CPU 0"
        );
    }
}
