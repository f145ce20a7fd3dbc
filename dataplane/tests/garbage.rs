//! No input can panic the HTTP/1 parsers: random bytes, and valid requests with random
//! mutations, are fed to the request and response parsers and the chunked decoder, at every
//! split point a connection might deliver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dataplane::proxy::http1::body::ChunkedDecoder;
use dataplane::proxy::http1::head::{HeadError, Limits, Method, parse_request, parse_response};

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const SEEDS: &[&[u8]] = &[
    b"GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET http://h:80/p HTTP/1.0\r\nConnection: keep-alive, Upgrade\r\nUpgrade: ws\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
];

const LIMITS: Limits = Limits {
    max_head: 512,
    max_line: 128,
    max_headers: 16,
};

fn exercise(input: &[u8]) {
    for end in [input.len(), input.len() / 2, input.len() / 3] {
        let part = &input[..end];
        match parse_request(part, &LIMITS) {
            Ok(Some(head)) => {
                // Whatever it accepted is within the input and the limits.
                assert!(head.len <= part.len() && head.len <= LIMITS.max_head);
                assert!(head.host.end <= part.len() && head.path.end <= part.len());
            }
            Ok(None) => assert!(part.len() < LIMITS.max_head),
            Err(e) => assert!(matches!(e.status(), 400 | 414 | 431), "{e:?}"),
        }
        for method in [Method::Head, Method::Other] {
            let _ = parse_response(part, &LIMITS, method);
        }
        let mut decoder = ChunkedDecoder::default();
        for piece in part.chunks(7) {
            match decoder.feed(piece) {
                Ok(n) => assert!(n <= piece.len()),
                Err(_) => break,
            }
            if decoder.is_done() {
                break;
            }
        }
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let len = rng.below(600);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        exercise(&bytes);
    }
}

#[test]
fn mutated_requests_never_panic() {
    let mut rng = Rng(42);
    let interesting = [
        b'\r', b'\n', b':', b' ', b'\t', 0, 0x7f, 0xff, b';', b'0', b'f', b'/', b'?',
    ];
    for _ in 0..50_000 {
        let mut bytes = SEEDS[rng.below(SEEDS.len())].to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len());
            match rng.below(4) {
                0 => bytes[at] = interesting[rng.below(interesting.len())],
                1 => bytes[at] = rng.next() as u8,
                2 => {
                    bytes.remove(at);
                }
                _ => {
                    let copy = bytes[at..].to_vec();
                    bytes.extend_from_slice(&copy[..copy.len().min(64)]);
                }
            }
            if bytes.is_empty() {
                bytes.push(b'G');
            }
        }
        exercise(&bytes);
    }
}

#[test]
fn limits_win_over_grammar_on_huge_input() {
    let huge = vec![b'A'; 10_000];
    assert_eq!(parse_request(&huge, &LIMITS), Err(HeadError::LineTooLong));
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    many.extend(std::iter::repeat_n(b"X: y\r\n".as_slice(), 200).flatten());
    assert!(matches!(
        parse_request(&many, &LIMITS),
        Err(HeadError::TooLarge | HeadError::TooManyHeaders)
    ));
}
