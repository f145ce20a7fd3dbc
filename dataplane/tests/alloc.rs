//! The hot paths allocate nothing per request: the HTTP/1 parse → route path, and reads
//! under hyper's HTTP/2. Counted by dhat's heap profiler in testing mode, which replaces the
//! global allocator in this test binary only and counts every thread's allocations: so the
//! binary runs one test, which checks each path in turn. The test harness's own thread may
//! still allocate once while a busy machine delays it, so each path has three tries to
//! allocate nothing; a path that allocates per request fails every one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dataplane::proxy::http1::body::ChunkedDecoder;
use dataplane::proxy::http1::head::{Limits, parse_request};
use dataplane::snapshot::{ListenerKind, Snapshot};

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

#[test]
fn hot_paths_do_not_allocate() {
    let _profiler = dhat::Profiler::builder().testing().build();
    parse_and_route_do_not_allocate();
    reads_under_hyper_do_not_allocate();
}

fn parse_and_route_do_not_allocate() {
    let yaml = "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    protocol: http\n    routes:\n      - { host: api.example.com, path_prefix: /v1, cluster: api }\n      - { host: api.example.com, path_exact: /v1/users, method: PUT, query: [{ name: x, value: \"1\" }], cluster: exact }\n      - { host: \"*.example.com\", path_regex: \"/v[0-9]+/items/[0-9]+\", headers: [{ name: x-team, value: \"ops|dev\", regex: true }], cluster: exact }\n      - { host: \"*.example.com\", cluster: api }\n      - { cluster: api }\nclusters:\n  - { name: api, endpoints: [127.0.0.1:1] }\n  - { name: exact, endpoints: [127.0.0.1:2] }\n";
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
    let requests: [&[u8]; 5] = [
        b"GET /v2/items/42 HTTP/1.1\r\nHost: www.example.com\r\nX-Team: dev\r\n\r\n",
        b"PUT /v1/users?y=2&x=%31 HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 0\r\n\r\n",
        b"GET /v1/users?x=1 HTTP/1.1\r\nHost: api.example.com\r\nAccept: */*\r\nContent-Length: 3\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: www.example.com\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
        b"GET http://other.test/p HTTP/1.1\r\nHost: other.test\r\n\r\n",
    ];
    let chunked = b"5\r\nhello\r\n0\r\n\r\n";

    // A worker's own copies: each regular expression's scratch space is made on its first
    // match and kept.
    let regexes = snapshot.regexes.for_worker();
    let allocated = allocations_in_three_tries(|| {
        let mut routed = 0;
        for _ in 0..1000 {
            for request in requests {
                let head = parse_request(request, &limits).unwrap().unwrap();
                routed += routes
                    .route(
                        &request[head.host.clone()],
                        (
                            &request[head.method_name.clone()],
                            &request[head.path.clone()],
                        ),
                        &dataplane::proxy::route::RawHead(&request[..head.len]),
                        &regexes,
                    )
                    .map_or(0, |r| r.choose(7).cluster + 1);
            }
            let mut decoder = ChunkedDecoder::default();
            assert_eq!(decoder.feed(chunked).unwrap(), chunked.len());
        }
        // Cluster indexes 0 (api) and 1 (exact), plus one: three to api, two to exact.
        assert_eq!(routed, 7000);
    });
    dhat::assert_eq!(allocated, 0);
}

/// The fewest heap blocks `run` allocated in three runs.
fn allocations_in_three_tries(mut run: impl FnMut()) -> u64 {
    (0..3)
        .map(|_| {
            let before = dhat::HeapStats::get();
            run();
            dhat::HeapStats::get().total_blocks - before.total_blocks
        })
        .min()
        .unwrap_or(u64::MAX)
}

/// A stream that reads `total` bytes in pieces of `piece`, at once.
struct Source {
    left: std::cell::Cell<usize>,
    piece: usize,
}

impl dataplane::io::Stream for Source {
    async fn read(&self, mut buf: Vec<u8>) -> dataplane::io::BufResult<usize> {
        let n = self.left.get().min(self.piece);
        self.left.set(self.left.get() - n);
        buf.resize(buf.len() + n, 7);
        (Ok(n), buf)
    }

    async fn write_all(
        &self,
        buf: Vec<u8>,
        _range: std::ops::Range<usize>,
    ) -> dataplane::io::BufResult<()> {
        (Ok(()), buf)
    }

    fn shutdown(&self, _how: std::net::Shutdown) -> std::io::Result<()> {
        Ok(())
    }
}

fn reads_under_hyper_do_not_allocate() {
    use std::task::{Context, Poll, Waker};

    let mut io = std::pin::pin!(dataplane::io::hyper_io::HyperIo::new(Source {
        left: std::cell::Cell::new(4_000_000),
        piece: 1000,
    }));
    let mut storage = [0u8; 600];
    let mut read = || {
        let mut buf = hyper::rt::ReadBuf::new(&mut storage);
        let mut cx = Context::from_waker(Waker::noop());
        match hyper::rt::Read::poll_read(io.as_mut(), &mut cx, buf.unfilled()) {
            Poll::Ready(result) => result.map(|()| buf.filled().len()).unwrap(),
            Poll::Pending => panic!("the source never waits"),
        }
    };
    // The first read takes the connection's read buffer.
    assert_eq!(read(), 600);

    let mut total = 600;
    let allocated = allocations_in_three_tries(|| {
        for _ in 0..1000 {
            total += read();
        }
    });
    // Each 1000-byte read goes to hyper as 600 bytes, then the 400 left in the buffer.
    assert_eq!(total, 600 + 3 * 500 * 1000, "every byte handed over");
    dhat::assert_eq!(allocated, 0);
}
