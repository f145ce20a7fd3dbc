use super::*;

const LIMITS: Limits = Limits {
    max_head: 1024,
    max_line: 128,
    max_headers: 8,
};

fn request(text: &str) -> Result<Option<RequestHead>, HeadError> {
    parse_request(text.as_bytes(), &LIMITS)
}

fn complete(text: &str) -> RequestHead {
    request(text).unwrap().expect("complete head")
}

#[test]
fn reads_host_path_and_framing() {
    let text =
        "POST /api/v1?x=1 HTTP/1.1\r\nHost: Example.com:80\r\nContent-Length: 5\r\n\r\nhello";
    let head = complete(text);
    assert_eq!(head.len, text.len() - 5);
    assert_eq!(&text[head.host.clone()], "Example.com:80");
    assert_eq!(&text[head.path.clone()], "/api/v1?x=1");
    assert_eq!(head.framing, Framing::Length(5));
    assert!(head.keep_alive && !head.upgrade && !head.expect_continue);
    assert_eq!(head.method, Method::Other);
}

#[test]
fn absolute_form_takes_its_authority() {
    let text = "GET http://svc.local:8080/p?q HTTP/1.1\r\nHost: SVC.local:8080\r\n\r\n";
    let head = complete(text);
    assert_eq!(&text[head.method_name.clone()], "GET");
    assert_eq!(&text[head.host.clone()], "svc.local:8080");
    assert_eq!(&text[head.path.clone()], "/p?q");
    assert_eq!(head.method, Method::Idempotent);
    // The upstream, which sees the head as it came, must not route on another host.
    assert_eq!(
        request("GET http://public.local/admin HTTP/1.1\r\nHost: internal.local\r\n\r\n"),
        Err(HeadError::Malformed(
            "Host differs from the request target's authority"
        ))
    );
}

#[test]
fn a_line_ending_in_a_bare_lf_is_refused_in_either_head() {
    let bare = Err(HeadError::Malformed("line ending in a bare LF"));
    // The proxy would see Content-Length; an upstream that ends lines only at CRLF would not.
    assert_eq!(
        request("POST / HTTP/1.1\r\nHost: a\r\nX: y\nContent-Length: 5\r\n\r\nhello"),
        bare
    );
    assert_eq!(request("GET / HTTP/1.1\nHost: a\n\n"), bare);
    assert_eq!(
        parse_response(
            b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
            &LIMITS,
            Method::Other
        ),
        bare.map(|_: Option<RequestHead>| None)
    );
    // Empty lines before the request line are ignored (RFC 9112 §2.2), and do not count
    // toward the request line's length.
    let head = complete("\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(head.len, 29);
    let long = format!(
        "\r\n\r\nGET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
        "x".repeat(200)
    );
    assert_eq!(request(&long), Err(HeadError::LineTooLong));
}

#[test]
fn an_empty_content_length_is_refused() {
    for value in ["", ",", " , "] {
        assert_eq!(
            request(&format!(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length:{value}\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            Err(HeadError::Malformed("invalid Content-Length")),
            "{value:?}"
        );
    }
}

#[test]
fn only_idempotent_methods_may_be_sent_twice() {
    for (method, idempotent) in [
        ("GET", true),
        ("HEAD", true),
        ("PUT", true),
        ("DELETE", true),
        ("OPTIONS", true),
        ("POST", false),
        ("PATCH", false),
        ("PURGE", false),
    ] {
        let head = complete(&format!("{method} / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert_eq!(head.method.idempotent(), idempotent, "{method}");
    }
}

#[test]
fn connection_semantics_by_version() {
    assert!(!complete("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
    assert!(!complete("GET / HTTP/1.0\r\n\r\n").keep_alive);
    assert!(complete("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
    let ws = complete(
        "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    assert!(ws.upgrade);
    let expect = complete(
        "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    assert!(expect.expect_continue);
    assert_eq!(expect.framing, Framing::Chunked);
    assert_eq!(
        complete("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n").method,
        Method::Head
    );
}

#[test]
fn partial_heads_ask_for_more() {
    assert_eq!(request("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
    assert_eq!(request("GE"), Ok(None));
}

#[test]
fn refuses_ambiguous_or_malformed_requests() {
    let bad = [
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        "GET nopath HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        "\x16\x03\x01\x02\x00\x01\x00\x01\x03\x03",
        "GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
        // No fragment, and an absolute-form authority of a host and port only: each of these
        // reads as another authority or path to some server.
        "GET /public#/x HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET http://b#/public/x HTTP/1.1\r\nHost: b#\r\n\r\n",
        "GET http://b\\admin HTTP/1.1\r\nHost: b\\admin\r\n\r\n",
        "GET http://user@b/x HTTP/1.1\r\nHost: user@b\r\n\r\n",
        "GET http://b%2fadmin/x HTTP/1.1\r\n\r\n",
    ];
    for text in bad {
        let error = request(text).expect_err(text);
        assert_eq!(error.status(), 400, "{text:?}: {error}");
    }
    // Equal repeated lengths are one length.
    assert_eq!(
        complete("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n").framing,
        Framing::Length(3)
    );
}

#[test]
fn enforces_limits_with_the_right_status() {
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(200));
    assert_eq!(request(&long_line).unwrap_err().status(), 414);
    // Still incomplete, but already past the line limit.
    assert_eq!(
        request(&format!("GET /{}", "a".repeat(200)))
            .unwrap_err()
            .status(),
        414
    );
    let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(9));
    assert_eq!(request(&many).unwrap_err(), HeadError::TooManyHeaders);
    assert_eq!(request(&many).unwrap_err().status(), 431);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n",
        "b".repeat(1100)
    );
    assert_eq!(request(&big).unwrap_err().status(), 431);
}

fn response(text: &str, method: Method) -> ResponseHead {
    parse_response(text.as_bytes(), &LIMITS, method)
        .unwrap()
        .expect("complete head")
}

#[test]
fn response_framing() {
    let r = response(
        "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
        Method::Other,
    );
    assert_eq!(
        (r.status, r.framing, r.keep_alive),
        (200, Framing::Length(10), true)
    );
    let r = response(
        "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
        Method::Head,
    );
    assert_eq!(r.framing, Framing::Empty);
    let r = response("HTTP/1.1 204 No Content\r\n\r\n", Method::Other);
    assert_eq!(r.framing, Framing::Empty);
    let r = response(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        Method::Other,
    );
    assert_eq!(r.framing, Framing::Chunked);
    let r = response("HTTP/1.1 200 OK\r\n\r\n", Method::Other);
    assert_eq!((r.framing, r.keep_alive), (Framing::UntilClose, false));
    let r = response(
        "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
        Method::Other,
    );
    assert!(!r.keep_alive && r.says_close);
    let r = response(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
        Method::Other,
    );
    assert!(!r.keep_alive && r.says_close);
    // Transfer-Encoding from an HTTP/1.0 sender: faulty framing, the connection goes after.
    let r = response(
        "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
        Method::Other,
    );
    assert_eq!((r.framing, r.keep_alive), (Framing::Chunked, false));
    assert!(parse_response(b"garbage\r\n\r\n", &LIMITS, Method::Other).is_err());
}

#[test]
fn rewrites_connection_to_close() {
    let head = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n";
    let out = with_connection_close(head);
    assert_eq!(
        out,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\n"
    );
    let reparsed = response(std::str::from_utf8(&out).unwrap(), Method::Other);
    assert!(reparsed.says_close);
}

#[test]
fn a_chunked_response_for_an_http10_client_loses_chunked_and_says_close() {
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\n";
    let out = dechunked(head);
    assert_eq!(
        out,
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nconnection: close\r\n\r\n"
    );
    let reparsed = response(std::str::from_utf8(&out).unwrap(), Method::Other);
    assert_eq!(reparsed.framing, Framing::UntilClose);
    // Other codings stay, without the final chunked (which alone was undone), across
    // fields too.
    let head =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked, Chunked\r\n\r\n";
    assert_eq!(
        dechunked(head),
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n"
    );
}

#[test]
fn an_h2c_upgrade_is_declined_by_rewriting_the_request_into_plain_http1() {
    let text = "GET /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nAccept: */*\r\n\r\n";
    let head = complete(text);
    assert!(head.upgrade && head.h2c_upgrade);
    let plain = without_h2c_upgrade(&text.as_bytes()[..head.len], head.keep_alive);
    assert_eq!(
        String::from_utf8(plain).unwrap(),
        "GET /x HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"
    );
    // A close the client asked for stays.
    let closing =
        "GET /x HTTP/1.1\r\nHost: a\r\nConnection: close, Upgrade\r\nUpgrade: h2c\r\n\r\n";
    let head = complete(closing);
    let plain = without_h2c_upgrade(closing.as_bytes(), head.keep_alive);
    assert_eq!(
        String::from_utf8(plain).unwrap(),
        "GET /x HTTP/1.1\r\nHost: a\r\nconnection: close\r\n\r\n"
    );
    // Other upgrades are the client's to make.
    let ws =
        complete("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    assert!(ws.upgrade && !ws.h2c_upgrade);
}

#[test]
fn a_routes_header_edits_rewrite_only_the_fields_they_name() {
    let header = |name: &str, value: &str| shared::config::Header {
        name: name.into(),
        value: value.into(),
    };
    let modifier = shared::config::HeaderModifier {
        set: vec![header("x-env", "prod")],
        add: vec![header("x-tag", "mesh")],
        remove: vec!["X-Debug".into()],
    };
    let edits = HeaderEdits::new(&modifier).unwrap();
    let text = "\r\nGET /x HTTP/1.1\r\nHost: a\r\nX-ENV: dev\r\nx-env-extra: kept\r\nx-debug: 1\r\nx-tag: client\r\nx-debugger: kept\r\n\r\n";
    let edited = edited(text.as_bytes(), &edits);
    assert_eq!(
        String::from_utf8(edited.clone()).unwrap(),
        "\r\nGET /x HTTP/1.1\r\nHost: a\r\nx-env-extra: kept\r\nx-tag: client\r\nx-debugger: kept\r\nx-env: prod\r\nx-tag: mesh\r\n\r\n"
    );
    // Still one whole head, every line ending in CRLF.
    let head = parse_request(&edited, &LIMITS).unwrap().unwrap();
    assert_eq!(head.len, edited.len());
}

#[test]
fn a_rewritten_target_goes_in_origin_form_with_its_host() {
    let text = "GET http://a.example/old/x?q=1 HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\n\r\n";
    let head = complete(text);
    let moved = retargeted(text.as_bytes(), &head, b"/new/x?q=1", Some(b"b.example"));
    assert_eq!(
        String::from_utf8(moved.clone()).unwrap(),
        "GET /new/x?q=1 HTTP/1.1\r\nAccept: */*\r\nhost: b.example\r\n\r\n"
    );
    let again = parse_request(&moved, &LIMITS).unwrap().unwrap();
    assert_eq!(&moved[again.host.clone()], b"b.example");
    assert_eq!(&moved[again.path.clone()], b"/new/x?q=1");

    // Absolute form without Host (HTTP/1.0 may): the authority becomes Host.
    let text = "GET http://a.example:81/old HTTP/1.0\r\n\r\n";
    let head = complete(text);
    let moved = retargeted(text.as_bytes(), &head, b"/new", None);
    assert_eq!(
        String::from_utf8(moved).unwrap(),
        "GET /new HTTP/1.0\r\nhost: a.example:81\r\n\r\n"
    );

    let text = "POST /old HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi";
    let head = complete(text);
    let moved = retargeted(&text.as_bytes()[..head.len], &head, b"/new", None);
    assert_eq!(
        String::from_utf8(moved).unwrap(),
        "POST /new HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n"
    );
}
