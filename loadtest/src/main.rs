//! `tern-load`: `run` sends open-loop load and reports latency; `serve` runs a built-in
//! upstream; `compare` runs one scenario against several targets in interleaved rounds.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use loadtest::generator::{self, Plan, Progress, RunError};
use loadtest::protocol::{Protocol, Workload};
use loadtest::report::{self, Report};
use loadtest::{compare, serve};

#[derive(Debug, Parser)]
#[command(
    name = "tern-load",
    version,
    about = "Open-loop load generator with HDR latency reports"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send constant-rate load to one target and report latency.
    Run(RunArgs),
    /// Run a built-in upstream until interrupted.
    Serve(ServeArgs),
    /// Run one scenario against direct, Tern and peer proxies, interleaved, and compare.
    Compare(CompareArgs),
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// The scenario file (see loadtest/scenarios/).
    #[arg(long)]
    scenario: PathBuf,
    /// Where to write .hgrm, JSON and charts (default: target/tern-load/SCENARIO, the scenario's name).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The tern-proxy binary [default: beside tern-load].
    #[arg(long)]
    tern_proxy: Option<PathBuf>,
    /// The tern-control binary, whose CA certifies the Tern mTLS pair [default: beside
    /// tern-load].
    #[arg(long)]
    tern_control: Option<PathBuf>,
    /// The haproxy binary.
    #[arg(long, default_value = "haproxy")]
    haproxy: PathBuf,
    /// The nginx binary.
    #[arg(long, default_value = "nginx")]
    nginx: PathBuf,
    /// Override the scenario's rounds.
    #[arg(long)]
    rounds: Option<usize>,
    /// Override the scenario's measured duration per target and round.
    #[arg(long, value_parser = duration)]
    duration: Option<Duration>,
}

fn duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text)
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Address to load.
    #[arg(long)]
    target: SocketAddr,
    /// Protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Http)]
    protocol: Protocol,
    /// Requests per second, over all connections.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Connections (each with one request outstanding).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Measured duration.
    #[arg(long, default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Warm-up before measuring (excluded from the histogram).
    #[arg(long, default_value = "2s", value_parser = duration)]
    warmup: Duration,
    /// A response later than this counts as a timeout.
    #[arg(long, default_value = "5s", value_parser = duration)]
    timeout: Duration,
    /// Generator threads [default: the CPUs available].
    #[arg(long)]
    threads: Option<usize>,
    /// Request body bytes (HTTP, HTTP/2: a POST when non-zero), request bytes (TCP), or the
    /// message size (gRPC).
    #[arg(long, default_value_t = 0)]
    request_size: usize,
    /// TCP: response bytes expected per request.
    #[arg(long, default_value_t = 1024)]
    response_size: usize,
    /// HTTP: Host header (HTTP/2, gRPC: `:authority`).
    #[arg(long, default_value = "tern-load")]
    host: String,
    /// HTTP: request path (gRPC: `/package.Service/Method`) [default: `/`; gRPC: the built-in
    /// echo, `/tern.load.v1.Echo/Echo`].
    #[arg(long)]
    path: Option<String>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the HdrHistogram percentile distribution here.
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Write a latency-by-percentile SVG chart here.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Exit non-zero when the achieved rate misses the target by more than 1%.
    #[arg(long)]
    strict: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Http)]
    protocol: Protocol,
    /// TCP: request bytes per response.
    #[arg(long, default_value_t = 1)]
    request_size: usize,
    /// Response body bytes (TCP: 0 echoes).
    #[arg(long, default_value_t = 1024)]
    response_size: usize,
    /// Delay before each response.
    #[arg(long, default_value = "0s", value_parser = duration)]
    delay: Duration,
    /// Stall: pause this long ...
    #[arg(long, value_parser = duration, requires = "stall_every")]
    stall: Option<Duration>,
    /// ... every this long.
    #[arg(long, value_parser = duration)]
    stall_every: Option<Duration>,
    /// Server threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Serve(args) => serve_forever(args),
        Command::Compare(args) => compare(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tern-load: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let path = args.path.as_deref();
    let workload = match args.protocol {
        Protocol::Tcp => Workload::tcp(args.request_size, args.response_size),
        Protocol::Http => Workload::http(&args.host, path.unwrap_or("/"), args.request_size),
        Protocol::Http2 => Workload::http2(&args.host, path.unwrap_or("/"), args.request_size),
        Protocol::Grpc => Workload::grpc(
            &args.host,
            path.unwrap_or(loadtest::h2::GRPC_ECHO_PATH),
            args.request_size,
        ),
    };
    let plan = Plan {
        target: args.target,
        workload,
        rate: args.rate,
        connections: args.connections,
        threads: args.threads.unwrap_or_else(available_cpus),
        duration: args.duration,
        warmup: args.warmup,
        timeout: args.timeout,
    };
    let progress = Progress::default();
    let total = args.warmup + args.duration;
    let done = std::sync::atomic::AtomicBool::new(false);
    let outcome = std::thread::scope(|scope| {
        if std::io::stderr().is_terminal() {
            scope.spawn(|| progress_line(&progress, &done, total));
        }
        let outcome = generator::run(&plan, &progress);
        done.store(true, Ordering::Relaxed);
        outcome
    });
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(error @ RunError::Unreachable { .. }) => {
            eprintln!("tern-load: {error}");
            return Ok(ExitCode::from(2));
        }
        Err(error) => return Err(error.into()),
    };
    let name = args.target.to_string();
    let report = Report::new(&name, args.protocol.name(), args.connections, &outcome);
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.hgrm {
        std::fs::write(path, report::hgrm(&outcome.latency))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        report::chart(
            path,
            &format!("{name} at {:.0}/s", args.rate),
            &[(name.clone(), &outcome.latency)],
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    if outcome.completed == 0 {
        eprintln!("tern-load: no request succeeded");
        return Ok(ExitCode::from(1));
    }
    if args.strict && !report.rate_kept {
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

fn progress_line(progress: &Progress, done: &std::sync::atomic::AtomicBool, total: Duration) {
    let started = Instant::now();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        eprint!(
            "\r{:>5.1}s / {:.0}s  completed {}  errors {}   ",
            started.elapsed().as_secs_f64(),
            total.as_secs_f64(),
            progress.completed.load(Ordering::Relaxed),
            progress.errors.load(Ordering::Relaxed)
        );
    }
    eprint!("\r{:60}\r", "");
}

fn compare(args: CompareArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.scenario)
        .with_context(|| format!("reading {}", args.scenario.display()))?;
    let mut scenario: compare::Scenario = serde_yaml::from_str(&text)
        .with_context(|| format!("parsing {}", args.scenario.display()))?;
    if let Some(rounds) = args.rounds {
        scenario.rounds = rounds;
    }
    if let Some(duration) = args.duration {
        scenario.duration = duration;
    }
    let beside = |name: &str| std::env::current_exe().map(|exe| exe.with_file_name(name));
    let programs = compare::Programs {
        tern_proxy: args.tern_proxy.map_or_else(|| beside("tern-proxy"), Ok)?,
        tern_control: args
            .tern_control
            .map_or_else(|| beside("tern-control"), Ok)?,
        haproxy: args.haproxy,
        nginx: args.nginx,
    };
    let name = args
        .scenario
        .file_stem()
        .map_or_else(|| "compare".into(), |s| s.to_string_lossy().into_owned());
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from("target/tern-load").join(name));
    compare::run(&scenario, &programs, &out)?;
    Ok(ExitCode::SUCCESS)
}

fn serve_forever(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let spec = serve::Spec {
        addr: args.listen,
        protocol: args.protocol,
        request_size: args.request_size,
        response_size: args.response_size,
        delay: args.delay,
        stall: args.stall.zip(args.stall_every),
        threads: args.threads,
    };
    let server = serve::start(spec).with_context(|| format!("listening on {}", args.listen))?;
    println!("serving {:?} on {}", args.protocol, server.addr);
    loop {
        std::thread::park();
    }
}
