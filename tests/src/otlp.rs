//! A fake OpenTelemetry collector on loopback: takes OTLP/HTTP JSON (`POST /v1/traces`),
//! answers 200, and keeps every span with its resource's `service.name`.

use std::io::{Read as _, Write as _};
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// The running collector (its thread ends with the test process).
pub struct Collector {
    /// `127.0.0.1:<port>`.
    pub address: String,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Collector {
    pub fn start() -> Collector {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let Some(body) = read_post(&mut stream) else {
                    continue;
                };
                let request: Value = serde_json::from_slice(&body).unwrap();
                for resource in request["resourceSpans"].as_array().unwrap() {
                    let service =
                        resource["resource"]["attributes"][0]["value"]["stringValue"].clone();
                    for scope in resource["scopeSpans"].as_array().unwrap() {
                        for span in scope["spans"].as_array().unwrap() {
                            let mut span = span.clone();
                            span["service"] = service.clone();
                            kept.lock().unwrap().push(span);
                        }
                    }
                }
                // Kept before the answer: an exporter that saw it sees its spans kept.
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
            }
        });
        Collector { address, spans }
    }

    /// The spans received so far.
    pub fn spans(&self) -> Vec<Value> {
        self.spans.lock().unwrap().clone()
    }
}

/// A request's body, once its head says `POST /v1/traces` and its whole body is in.
fn read_post(stream: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    let mut request = Vec::new();
    let mut chunk = [0; 65536];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        request.extend_from_slice(&chunk[..n]);
        let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&request[..end]).into_owned();
        assert!(head.starts_with("POST /v1/traces HTTP/1.1"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))?
            .parse()
            .ok()?;
        if request.len() >= end + 4 + length {
            return Some(request[end + 4..end + 4 + length].to_vec());
        }
    }
}

/// The value of a span's attribute `key`, as OTLP JSON writes it (`{"stringValue": …}`).
pub fn attribute(span: &Value, key: &str) -> Value {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .map_or(Value::Null, |a| a["value"].clone())
}
