//! The HTTP/1 parse → route path allocates nothing per request (counted by dhat's heap
//! profiler in testing mode, which replaces the global allocator in this test binary only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dataplane::proxy::http1::body::ChunkedDecoder;
use dataplane::proxy::http1::head::{Limits, parse_request};
use dataplane::snapshot::{ListenerKind, Snapshot};

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

#[test]
fn parse_and_route_do_not_allocate() {
    let yaml = "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes:\n      - { host: api.example.com, path_prefix: /v1, cluster: api }\n      - { host: \"*.example.com\", cluster: api }\n      - { cluster: api }\nclusters:\n  - { name: api, endpoints: [127.0.0.1:1] }\n";
    let snapshot = Snapshot::compile(
        shared::Config::from_yaml(yaml, "t").unwrap(),
        None,
        1,
        "t".into(),
    )
    .unwrap();
    let ListenerKind::Http(routes) = &snapshot.listeners[0].kind else {
        unreachable!()
    };
    let limits = Limits::from(&snapshot.config.http);
    let requests: [&[u8]; 3] = [
        b"GET /v1/users?x=1 HTTP/1.1\r\nHost: api.example.com\r\nAccept: */*\r\nContent-Length: 3\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: www.example.com\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
        b"GET http://other.test/p HTTP/1.1\r\nHost: other.test\r\n\r\n",
    ];
    let chunked = b"5\r\nhello\r\n0\r\n\r\n";

    let _profiler = dhat::Profiler::builder().testing().build();
    let before = dhat::HeapStats::get();
    let mut routed = 0;
    for _ in 0..1000 {
        for request in requests {
            let head = parse_request(request, &limits).unwrap().unwrap();
            routed += routes
                .route(
                    &request[head.host.clone()],
                    &request[head.path.clone()],
                    &dataplane::snapshot::RawHead(&request[..head.len]),
                )
                .map_or(0, |r| r.choose(7).cluster + 1);
        }
        let mut decoder = ChunkedDecoder::default();
        assert_eq!(decoder.feed(chunked).unwrap(), chunked.len());
    }
    let after = dhat::HeapStats::get();
    assert_eq!(routed, 3000);
    dhat::assert_eq!(after.total_blocks, before.total_blocks);
}
