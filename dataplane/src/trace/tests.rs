#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};

use serde_json::Value;

use super::*;

const PARENT: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn traceparents_are_read_as_the_w3c_spec_says() {
    let context = Context::parse(PARENT).unwrap();
    assert!(context.sampled());
    assert_eq!(context.trace_id[0], 0x4b);
    assert_eq!(context.parent_id[7], 0xb7);
    // Surrounding spaces go; a later version may carry more fields.
    assert!(Context::parse(b" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ").is_some());
    assert!(
        Context::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later").is_some()
    );
    let unsampled = Context::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
    assert!(!unsampled.unwrap().sampled());
    for bad in [
        &b""[..],
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902é7-01".as_bytes(),
    ] {
        assert_eq!(
            Context::parse(bad),
            None,
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

/// A collector on loopback that answers `status` to each POST and keeps the bodies.
fn collector(status: u16) -> (String, std::sync::mpsc::Receiver<Value>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (bodies, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut request = Vec::new();
            let mut chunk = [0; 65536];
            let body = loop {
                let n = stream.read(&mut chunk).unwrap();
                if n == 0 {
                    break String::new();
                }
                request.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&request).into_owned();
                let Some((head, body)) = text.split_once("\r\n\r\n") else {
                    continue;
                };
                assert!(head.starts_with("POST /v1/traces HTTP/1.1\r\n"), "{head}");
                assert!(head.contains("Content-Type: application/json"), "{head}");
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if body.len() >= length {
                    break body.to_owned();
                }
            };
            if body.is_empty() {
                continue;
            }
            let _ = bodies.send(serde_json::from_str(&body).unwrap());
            let _ = write!(stream, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (address, received)
}

fn ended<'a>(status: Option<u16>, flag: Option<Flag>) -> Ended<'a> {
    Ended {
        kind: Kind::Server,
        protocol: "1.1",
        status,
        flag,
        listener: "inbound:web:80",
        cluster: Some("web"),
        peer: None,
    }
}

#[test]
fn a_sampled_request_s_span_reaches_the_collector_as_otlp_json() {
    let (address, bodies) = collector(200);
    let exporter = Exporter::start(&address, "web-sidecar").unwrap();
    // The connections carry the interception mark (setting one needs CAP_NET_ADMIN, which
    // the tests have).
    exporter.set_mark(Some(1337));
    let tracer = Tracer::new(&exporter);
    // Unsampled, absent or broken contexts make no span.
    let unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    assert!(
        tracer
            .begin(Some(unsampled), b"GET", b"web", b"/")
            .is_none()
    );
    assert!(tracer.begin(None, b"GET", b"web", b"/").is_none());
    assert!(tracer.begin(Some(b"junk"), b"GET", b"web", b"/").is_none());

    let span = tracer
        .begin(Some(PARENT), b"GET", b"web:80", b"/items/\"7\"?secret=1")
        .unwrap();
    let traceparent = span.traceparent();
    let onward = Context::parse(&traceparent).unwrap();
    assert_eq!(onward.trace_id, Context::parse(PARENT).unwrap().trace_id);
    assert_ne!(onward.parent_id, Context::parse(PARENT).unwrap().parent_id);
    assert!(onward.sampled());
    let span_id = String::from_utf8(traceparent[36..52].to_vec()).unwrap();
    tracer.end(span, &ended(Some(503), None));
    let refused = tracer.begin(Some(PARENT), b"POST", b"web", b"/").unwrap();
    tracer.end(refused, &ended(Some(403), Some(Flag::Unauthorized)));
    tracer.flush();

    let body = bodies.recv_timeout(Duration::from_secs(10)).unwrap();
    let resource = &body["resourceSpans"][0];
    assert_eq!(
        resource["resource"]["attributes"][0],
        serde_json::json!({ "key": "service.name", "value": { "stringValue": "web-sidecar" } })
    );
    let spans = resource["scopeSpans"][0]["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 2);
    let span = &spans[0];
    assert_eq!(span["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(span["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(span["spanId"], span_id.as_str());
    assert_eq!(span["name"], "GET");
    assert_eq!(span["kind"], 2);
    let start: u128 = span["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let end: u128 = span["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(start > 0 && end >= start);
    let attribute = |span: &Value, key: &str| {
        span["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == key)
            .map(|a| a["value"].clone())
    };
    assert_eq!(
        attribute(span, "url.path").unwrap()["stringValue"],
        "/items/\"7\""
    );
    assert_eq!(
        attribute(span, "server.address").unwrap()["stringValue"],
        "web"
    );
    assert_eq!(attribute(span, "server.port").unwrap()["intValue"], "80");
    assert_eq!(
        attribute(span, "http.response.status_code").unwrap()["intValue"],
        "503"
    );
    assert_eq!(
        attribute(span, "tern.cluster").unwrap()["stringValue"],
        "web"
    );
    assert!(attribute(span, "error.type").is_none());
    assert_eq!(span["status"]["code"], 2, "a 5xx is an error");
    let refused = &spans[1];
    assert_eq!(refused["name"], "POST");
    assert_eq!(
        attribute(refused, "error.type").unwrap()["stringValue"],
        Flag::Unauthorized.code()
    );
    assert_eq!(refused["status"]["code"], 2);
    // The ids differ span to span.
    assert_ne!(refused["spanId"], span["spanId"]);

    wait_for(|| exporter.counts() == (2, 0));
}

/// Polls `done` for up to 10 s.
fn wait_for(done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_collector_that_fails_or_falls_behind_costs_spans_not_requests() {
    // A collector that answers 500: the batch fails, counted.
    let (address, bodies) = collector(500);
    let exporter = Exporter::start(&address, "tern-proxy").unwrap();
    let tracer = Tracer::new(&exporter);
    let span = tracer.begin(Some(PARENT), b"GET", b"web", b"/").unwrap();
    tracer.end(span, &ended(Some(200), None));
    tracer.flush();
    bodies.recv_timeout(Duration::from_secs(10)).unwrap();
    wait_for(|| exporter.counts() == (0, 1));

    // A collector that never answers: once the exporter waits on it, the queue fills, and
    // what does not fit is dropped at once, not waited for.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let exporter = Exporter::start(&silent.local_addr().unwrap().to_string(), "x").unwrap();
    let tracer = Tracer::new(&exporter);
    let send_one = || {
        let span = tracer.begin(Some(PARENT), b"GET", b"web", b"/").unwrap();
        tracer.end(span, &ended(Some(200), None));
        tracer.flush();
    };
    send_one();
    let (_waiting, _) = silent.accept().unwrap();
    for _ in 0..QUEUE + 10 {
        send_one();
    }
    assert_eq!(tracer.dropped(), 10);
}

#[test]
fn authorities_split_into_host_and_port() {
    assert_eq!(split_authority(b"web:80"), (&b"web"[..], Some(80)));
    assert_eq!(split_authority(b"web"), (&b"web"[..], None));
    assert_eq!(
        split_authority(b"[fd00::1]:8080"),
        (&b"fd00::1"[..], Some(8080))
    );
    assert_eq!(split_authority(b"[fd00::1]"), (&b"fd00::1"[..], None));
    assert_eq!(split_authority(b"fd00::1"), (&b"fd00::1"[..], None));
    assert_eq!(split_authority(b"web:http"), (&b"web:http"[..], None));
}

#[test]
fn unknown_flags_are_cleared_and_a_client_s_4xx_is_an_error() {
    let (address, _bodies) = collector(200);
    let exporter = Exporter::start(&address, "x").unwrap();
    let tracer = Tracer::new(&exporter);
    let flagged = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff";
    let span = tracer.begin(Some(flagged), b"GET", b"web", b"/").unwrap();
    let traceparent = span.traceparent();
    assert!(traceparent.ends_with(b"-03"), "{traceparent:?}");
    // Written over a version-00 value in place, it says the same.
    let mut in_place = *flagged;
    span.write_parent(&mut in_place[36..]);
    assert_eq!(in_place, traceparent);

    let mut out = Vec::new();
    let client = Ended {
        kind: Kind::Client,
        ..ended(Some(404), None)
    };
    encode(&mut out, &span, &client);
    let encoded: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(encoded["status"]["code"], 2, "{encoded}");
    out.clear();
    encode(&mut out, &span, &ended(Some(404), None));
    let encoded: Value = serde_json::from_slice(&out).unwrap();
    assert!(
        encoded["status"]["code"].is_null(),
        "a server's 4xx: {encoded}"
    );
}

#[test]
fn the_collector_is_host_and_port() {
    for bad in [
        "http://otel:4318",
        "otel",
        "otel:0",
        ":4318",
        "otel:4318/v1/traces",
    ] {
        assert!(Exporter::start(bad, "x").is_err(), "{bad}");
    }
}

#[test]
fn a_finishing_exporter_sends_what_stopping_workers_held() {
    let (address, bodies) = collector(200);
    let exporter = Exporter::start(&address, "x").unwrap();
    let tracer = Tracer::new(&exporter);
    let span = tracer.begin(Some(PARENT), b"GET", b"web", b"/").unwrap();
    tracer.end(span, &ended(Some(200), None));
    // A worker that stops hands over what it holds; the exporter sends it, then ends.
    drop(tracer);
    exporter.finish(Duration::from_secs(10));
    assert_eq!(exporter.counts(), (1, 0));
    assert!(bodies.try_recv().is_ok());
}
