//! The HTTP/1 hot path without IO: parse a request head, then route it.
//!
//! `cargo bench -p benches --bench http1`
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use dataplane::proxy::http1::body::ChunkedDecoder;
use dataplane::proxy::http1::head::{Limits, parse_request};
use dataplane::snapshot::{ListenerKind, Snapshot};

const CONFIG: &str = r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    protocol: http
    routes:
      - { host: api.example.com, path_prefix: /v1/admin, cluster: admin }
      - { host: api.example.com, path_prefix: /v1, cluster: v1 }
      - { host: api.example.com, path_prefix: /v2, cluster: v2 }
      - { host: "*.example.com", cluster: wildcard }
      - { host: static.example.org, cluster: wildcard }
      - { cluster: fallback }
clusters:
  - { name: admin, endpoints: [127.0.0.1:1] }
  - { name: v1, endpoints: [127.0.0.1:2] }
  - { name: v2, endpoints: [127.0.0.1:3] }
  - { name: wildcard, endpoints: [127.0.0.1:4] }
  - { name: fallback, endpoints: [127.0.0.1:5] }
"#;

const REQUEST: &[u8] = b"GET /v1/users/12345?fields=name,email HTTP/1.1\r\n\
Host: api.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) tern-bench/1.0\r\n\
Accept: application/json\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abc\r\n\
X-Request-Id: 7f3c1e2a-9b4d-4c8e-a1f0-123456789abc\r\n\
Connection: keep-alive\r\n\r\n";

fn parse_and_route(c: &mut Criterion) {
    let config = shared::Config::from_yaml(CONFIG, "bench").unwrap();
    let snapshot = Snapshot::compile(config, None, 1, "bench".into()).unwrap();
    let ListenerKind::Http(routes) = &snapshot.listeners[0].kind else {
        unreachable!()
    };
    let limits = Limits::from(&snapshot.config.http);

    let mut group = c.benchmark_group("http1");
    group.throughput(Throughput::Bytes(REQUEST.len() as u64));
    group.bench_function("parse_request", |b| {
        b.iter(|| parse_request(black_box(REQUEST), &limits).unwrap().unwrap());
    });
    group.bench_function("parse_and_route", |b| {
        b.iter(|| {
            let head = parse_request(black_box(REQUEST), &limits).unwrap().unwrap();
            routes
                .route(
                    &REQUEST[head.host.clone()],
                    (
                        &REQUEST[head.method_name.clone()],
                        &REQUEST[head.path.clone()],
                    ),
                    &dataplane::proxy::route::RawHead(&REQUEST[..head.len]),
                    &snapshot.regexes,
                )
                .unwrap()
                .choose(7)
                .cluster
        });
    });
    let body: Vec<u8> = (0..64)
        .flat_map(|_| {
            b"400\r\n"
                .iter()
                .copied()
                .chain([b'x'; 1024])
                .chain(*b"\r\n")
        })
        .chain(*b"0\r\n\r\n")
        .collect();
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("chunked_scan_64k", |b| {
        b.iter(|| {
            let mut decoder = ChunkedDecoder::default();
            decoder.feed(black_box(&body)).unwrap()
        });
    });
    group.finish();
}

criterion_group!(benches, parse_and_route);
criterion_main!(benches);
