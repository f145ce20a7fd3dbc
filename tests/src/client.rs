//! Blocking clients that send exact bytes and read exact HTTP/1.1 responses.

use std::io::{Read, Write};

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long any client read may wait.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A deterministic payload that never repeats a short period (xorshift), so a dropped,
/// duplicated or reordered chunk shows as a difference.
pub fn payload(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Connects with read and write timeouts set.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// One `read`, retried on `EINTR` (which io_uring's kernel threads can cause in this
/// process).
pub fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

/// Sends `len` bytes of [`payload`] to an echo path while reading the echo back (both
/// directions at once), half-closes, reads until the far side's half-close comes back through,
/// and asserts every byte returned unchanged and in order. Returns the byte count.
pub fn assert_bulk_echo(addr: SocketAddr, len: usize) -> usize {
    let mut stream = connect(addr);
    let sent = payload(len);
    let mut writer = stream.try_clone().expect("clone the socket");
    let to_send = sent.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&to_send).expect("send");
        // Half-close: the echo server sees end of stream only through the proxies.
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    });
    let mut received = Vec::with_capacity(sent.len());
    stream
        .read_to_end(&mut received)
        .expect("read until the half-close is passed back");
    sender.join().expect("sender thread");
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "bytes differ");
    sent.len()
}

/// Opens a connection to an echo path, sends `message` and asserts it comes back unchanged.
pub fn assert_echo(addr: SocketAddr, message: &[u8]) {
    let mut stream = connect(addr);
    stream.write_all(message).expect("send");
    let mut reply = vec![0u8; message.len()];
    stream.read_exact(&mut reply).expect("echo");
    assert_eq!(reply, message);
}

/// Sends `raw` on a new connection and reads one response.
pub fn request(addr: SocketAddr, raw: &str) -> Response {
    let mut conn = Conn::new(connect(addr));
    conn.send(raw.as_bytes());
    conn.response(false)
}

/// A client connection that reads responses one by one, keeping leftover bytes.
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes sent so far.
    pub sent: usize,
    /// Bytes received so far.
    pub received: usize,
}

impl Conn {
    /// Wraps a connected socket.
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
            sent: 0,
            received: 0,
        }
    }

    /// Opens a connection.
    pub fn open(addr: SocketAddr) -> Conn {
        Conn::new(connect(addr))
    }

    /// Writes bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
        self.sent += bytes.len();
    }

    /// Sends `message` to an echo path and asserts it comes back unchanged.
    pub fn echo(&mut self, message: &[u8]) {
        self.send(message);
        let mut reply = vec![0u8; message.len()];
        self.stream.read_exact(&mut reply).expect("echo");
        self.received += reply.len();
        assert_eq!(reply, message);
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let n = read_some(&mut self.stream, &mut chunk).expect("read from proxy");
        self.buf.extend_from_slice(&chunk[..n]);
        self.received += n;
        n
    }

    /// Reads one response (`head_request`: the request was HEAD, so no body).
    pub fn response(&mut self, head_request: bool) -> Response {
        let (status, headers, len) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut fields);
            if let httparse::Status::Complete(len) =
                parsed.parse(&self.buf).expect("valid response head")
            {
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (parsed.code.unwrap(), headers, len);
            }
            assert!(
                self.fill() > 0,
                "connection closed before a response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        self.buf.drain(..len);
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
            return response;
        }
        if let Some(length) = response.header("content-length") {
            let length: usize = length.trim().parse().expect("content-length");
            while self.buf.len() < length {
                assert!(self.fill() > 0, "connection closed mid-body");
            }
            response.body = self.buf.drain(..length).collect();
        } else if response
            .header("transfer-encoding")
            .is_some_and(|te| te.contains("chunked"))
        {
            response.body = self.read_chunked();
        } else {
            while self.fill() > 0 {}
            response.body = std::mem::take(&mut self.buf);
        }
        response
    }

    fn line(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return line;
            }
            assert!(self.fill() > 0, "connection closed mid-chunk");
        }
    }

    fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let size_line = self.line();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                .expect("chunk size");
            if size == 0 {
                while !self.line().is_empty() {}
                return body;
            }
            while self.buf.len() < size + 2 {
                assert!(self.fill() > 0, "connection closed mid-chunk");
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Whether the peer closed: reads until end of stream (or timeout/reset, which fail).
    pub fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        match read_some(&mut self.stream, &mut chunk) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}
