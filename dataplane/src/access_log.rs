//! The access log: one JSON line per HTTP request answered and per opaque TCP connection
//! ended or turned away (those passed through outside the mesh too), when `--access-log`
//! names where (a file, or `-` for standard output), as Istio's and Linkerd's access logs.
//!
//! Each worker formats its lines into a buffer of its own and writes it to the descriptor
//! the workers share: when it holds [`FLUSH_AT`] bytes, and every [`FLUSH_EVERY`]. A line
//! is at most `PIPE_BUF` bytes (a request's method, authority and path are cut short past
//! [`FIELD_AT_MOST`]), and a write carries whole lines, at most `PIPE_BUF` bytes of them, so
//! lines from different workers reach a pipe (a container's standard output) whole. A pipe
//! or terminal is written without blocking: what a reader that is behind has no room for
//! waits in the buffer, up to [`BACKLOG_AT_MOST`], and past that is dropped and counted
//! (`tern_access_log_dropped_lines_total`), never waited for, so the log adds no latency to
//! the requests it records. (A regular file takes writes into the page cache; only a
//! stalled disk would make one wait.)

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::metrics::Flag;
use crate::proxy::Caller;

/// A worker writes its buffer once it holds this much.
pub const FLUSH_AT: usize = 32 * 1024;
/// And at least this often, when it holds anything.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// The most one write carries: what a pipe takes whole (POSIX `PIPE_BUF` on Linux).
const WRITE_AT_MOST: usize = 4096;
/// The most a request field (method, authority, path) takes of a line, escaped; a longer
/// one is cut short and ends in `...`. With [`NAME_AT_MOST`] for each name, a line stays
/// under [`WRITE_AT_MOST`].
const FIELD_AT_MOST: usize = 768;
/// The most a listener's or cluster's name, or a peer's identity, takes of a line.
const NAME_AT_MOST: usize = 256;
/// The most a worker keeps waiting for a reader that is behind; lines past it are dropped.
const BACKLOG_AT_MOST: usize = 256 * 1024;

/// Opens where the access log goes, for writing without blocking: `-` is the process's
/// standard output (opened anew, so that making it non-blocking leaves the process's own
/// standard output, and any descriptor sharing it, as it was).
pub fn open(path: &Path) -> std::io::Result<Arc<File>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let stdout = path == Path::new("-");
    let path = if stdout {
        Path::new("/proc/self/fd/1")
    } else {
        path
    };
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(!stdout)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|error| {
            if !stdout {
                return error;
            }
            std::io::Error::new(
                error.kind(),
                format!("standard output could not be opened again through /proc/self/fd/1 ({error}); a socket cannot be: give a file or pipe"),
            )
        })?;
    Ok(Arc::new(file))
}

/// One worker's access log.
pub struct AccessLog {
    file: Arc<File>,
    buf: RefCell<Vec<u8>>,
    dropped: Cell<u64>,
    /// A write failed other than for want of room (said once).
    failed: Cell<bool>,
}

/// What one line says.
pub struct Entry<'a> {
    /// The listener that served it.
    pub listener: &'a str,
    /// Who asked.
    pub caller: &'a Caller,
    /// `HTTP/1.1`, `HTTP/2` or `TCP`.
    pub protocol: &'static str,
    /// The request's fields ([`write_request_fields`]); empty for TCP, or a request that
    /// did not parse.
    pub request_fields: &'a [u8],
    /// The response's status; none for TCP.
    pub status: Option<u16>,
    /// Why the proxy answered itself, or the connection ended as it did.
    pub flag: Option<Flag>,
    /// The cluster it went to, and the endpoint, when it got that far.
    pub upstream: Option<(&'a str, Option<SocketAddr>)>,
    /// Bytes from and to the client (TCP).
    pub bytes: Option<(u64, u64)>,
    /// From the request's head to its end (HTTP/1.1: its response's end; HTTP/2: its
    /// response head), or a TCP connection's whole life.
    pub duration: Duration,
}

/// Writes a request's fields (method, authority, path) into `out`, ready for an
/// [`Entry::request`]: done when the request starts, as its bytes may be gone by its end.
pub fn write_request_fields(out: &mut Vec<u8>, method: &[u8], authority: &[u8], path: &[u8]) {
    out.clear();
    out.extend_from_slice(b",\"method\":");
    json_string(out, method, FIELD_AT_MOST);
    out.extend_from_slice(b",\"authority\":");
    json_string(out, authority, FIELD_AT_MOST);
    out.extend_from_slice(b",\"path\":");
    json_string(out, path, FIELD_AT_MOST);
}

impl AccessLog {
    /// A worker's log, writing to `file`.
    pub fn new(file: Arc<File>) -> AccessLog {
        AccessLog {
            file,
            buf: RefCell::new(Vec::with_capacity(FLUSH_AT + WRITE_AT_MOST)),
            dropped: Cell::new(0),
            failed: Cell::new(false),
        }
    }

    /// Lines dropped so far, for want of room where they go.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Adds a line; writes the buffer once it is full.
    pub fn record(&self, entry: &Entry<'_>) {
        let full = {
            let mut out = self.buf.borrow_mut();
            format(&mut out, entry, SystemTime::now());
            out.len() >= FLUSH_AT
        };
        if full {
            self.flush();
        }
    }

    /// Writes what the buffer holds, in whole lines, as far as the reader has room. What it
    /// has no room for waits for the next flush, up to [`BACKLOG_AT_MOST`]; past that, and
    /// after a failed write, lines are dropped and counted.
    pub fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        let mut written = 0;
        let mut failed = false;
        while written < buf.len() {
            let rest = &buf[written..];
            let end = if rest.len() <= WRITE_AT_MOST {
                rest.len()
            } else {
                // Whole lines up to the limit (no line is longer).
                rest[..WRITE_AT_MOST]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(WRITE_AT_MOST, |newline| newline + 1)
            };
            match (&*self.file).write(&rest[..end]) {
                Ok(n) if n > 0 => written += n,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Ok(_) => {
                    failed = true;
                    break;
                }
                Err(error) => {
                    if !self.failed.replace(true) {
                        tracing::warn!(%error, "the access log could not be written; its lines are dropped (tern_access_log_dropped_lines_total)");
                    }
                    failed = true;
                    break;
                }
            }
        }
        buf.drain(..written);
        // Kept for the next flush, up to a bound; lines past it (or all, after a failure)
        // are dropped, whole.
        let keep = if failed {
            0
        } else if buf.len() <= BACKLOG_AT_MOST {
            buf.len()
        } else {
            buf[..BACKLOG_AT_MOST]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |newline| newline + 1)
        };
        let lines = buf[keep..].iter().filter(|&&b| b == b'\n').count();
        self.dropped.set(self.dropped.get() + lines as u64);
        buf.truncate(keep);
    }
}

impl Drop for AccessLog {
    /// The worker is done: what it holds goes out (as far as there is room).
    fn drop(&mut self) {
        self.flush();
    }
}

/// Writes `entry`'s line, ended at `now`, into `out`.
fn format(out: &mut Vec<u8>, entry: &Entry<'_>, now: SystemTime) {
    let start = now.checked_sub(entry.duration).unwrap_or(now);
    let micros = u64::try_from(entry.duration.as_micros()).unwrap_or(u64::MAX);
    let _ = write!(
        out,
        "{{\"start_time\":\"{}\",\"duration_us\":{micros},\"listener\":",
        humantime::format_rfc3339_micros(start)
    );
    json_string(out, entry.listener.as_bytes(), NAME_AT_MOST);
    let _ = write!(out, ",\"downstream\":\"{}\"", entry.caller.addr);
    out.extend_from_slice(b",\"peer_identity\":");
    match &entry.caller.identity {
        Some(identity) => json_string(out, identity.to_string().as_bytes(), 2 * NAME_AT_MOST),
        None => out.extend_from_slice(b"null"),
    }
    let _ = write!(out, ",\"protocol\":\"{}\"", entry.protocol);
    out.extend_from_slice(entry.request_fields);
    if let Some(status) = entry.status {
        let _ = write!(out, ",\"status\":{status}");
    }
    let flag = entry.flag.map_or("-", Flag::code);
    let _ = write!(out, ",\"response_flag\":\"{flag}\"");
    match entry.upstream {
        Some((cluster, addr)) => {
            out.extend_from_slice(b",\"cluster\":");
            json_string(out, cluster.as_bytes(), NAME_AT_MOST);
            match addr {
                Some(addr) => {
                    let _ = write!(out, ",\"upstream\":\"{addr}\"");
                }
                None => out.extend_from_slice(b",\"upstream\":null"),
            }
        }
        None => out.extend_from_slice(b",\"cluster\":null,\"upstream\":null"),
    }
    if let Some((received, sent)) = entry.bytes {
        let _ = write!(out, ",\"bytes_received\":{received},\"bytes_sent\":{sent}");
    }
    out.extend_from_slice(b"}\n");
}

/// Writes `bytes` as a JSON string: quotes, backslashes and control characters escaped,
/// and every byte outside printable ASCII as `\u00XX` (request bytes need not be UTF-8;
/// this keeps the line valid JSON and says which bytes came). Past `at_most` bytes of
/// output it stops, with `...`.
pub(crate) fn json_string(out: &mut Vec<u8>, bytes: &[u8], at_most: usize) {
    out.push(b'"');
    let start = out.len();
    for &b in bytes {
        if out.len() - start + 6 > at_most {
            out.extend_from_slice(b"...");
            break;
        }
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x20..=0x7e => out.push(b),
            _ => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(identity: Option<&str>) -> Caller {
        Caller::new(
            "10.0.0.1:5555".parse().unwrap(),
            identity.map(|id| id.parse().unwrap()),
        )
    }

    #[test]
    fn a_line_is_one_json_object_whatever_the_request_bytes() {
        let caller = caller(Some("spiffe://tern.test/ns/shop/sa/web"));
        let mut request = Vec::new();
        write_request_fields(&mut request, b"GET", b"b", b"/a\"b\\c\n\xff?q=1");
        let entry = Entry {
            listener: "in-http",
            caller: &caller,
            protocol: "HTTP/1.1",
            request_fields: &request,
            status: Some(403),
            flag: Some(Flag::Unauthorized),
            upstream: None,
            bytes: None,
            duration: Duration::from_micros(1500),
        };
        let mut out = Vec::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        format(&mut out, &entry, now);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["start_time"], "2027-01-15T07:59:59.998500Z");
        assert_eq!(line["duration_us"], 1500);
        assert_eq!(line["peer_identity"], "spiffe://tern.test/ns/shop/sa/web");
        assert_eq!(line["path"], "/a\"b\\c\n\u{ff}?q=1");
        assert_eq!(line["status"], 403);
        assert_eq!(line["response_flag"], "RBAC");
        assert_eq!(line["cluster"], serde_json::Value::Null);

        let plain = super::tests::caller(None);
        let tcp = Entry {
            listener: "db",
            caller: &plain,
            protocol: "TCP",
            request_fields: b"",
            status: None,
            flag: None,
            upstream: Some(("db", Some("10.0.0.9:5432".parse().unwrap()))),
            bytes: Some((10, 20)),
            duration: Duration::from_secs(2),
        };
        out.clear();
        format(&mut out, &tcp, now);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["peer_identity"], serde_json::Value::Null);
        assert_eq!(line["upstream"], "10.0.0.9:5432");
        assert_eq!(line["bytes_sent"], 20);
        assert_eq!(line["response_flag"], "-");
        assert!(line.get("status").is_none() && line.get("method").is_none());
    }

    #[test]
    fn a_reader_behind_gets_whole_lines_later_or_they_are_counted_dropped() {
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        rustix::io::ioctl_fionbio(&writer, true).unwrap();
        rustix::io::ioctl_fionbio(&reader, true).unwrap();
        let log = AccessLog::new(Arc::new(File::from(writer)));
        let caller = caller(None);
        // Every line as long as a line gets: each request field cut short.
        let mut request = Vec::new();
        let long = vec![b'\x01'; 10_000];
        write_request_fields(&mut request, &long, &long, &long);
        let entry = Entry {
            listener: "l",
            caller: &caller,
            protocol: "HTTP/1.1",
            request_fields: &request,
            status: Some(200),
            flag: None,
            upstream: None,
            bytes: None,
            duration: Duration::ZERO,
        };
        // Far more than the pipe (64 KiB) and the backlog hold, flushed as it fills.
        for _ in 0..1_000 {
            log.record(&entry);
        }
        log.flush();
        let pending = |log: &AccessLog| !log.buf.borrow().is_empty();
        assert!(pending(&log), "a backlog waits for the reader");
        assert!(log.dropped() > 0);
        let mut got = Vec::new();
        let mut chunk = vec![0; 1 << 16];
        loop {
            while let Ok(n) = rustix::io::read(&reader, &mut chunk) {
                got.extend_from_slice(&chunk[..n]);
            }
            if !pending(&log) {
                break;
            }
            log.flush();
        }
        let lines: Vec<&[u8]> = got
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len() as u64 + log.dropped(), 1_000);
        for line in lines {
            assert!(line.len() < WRITE_AT_MOST, "{}", line.len());
            let line: serde_json::Value = serde_json::from_slice(line).unwrap();
            assert!(line["path"].as_str().unwrap().ends_with("..."));
        }
    }
}
