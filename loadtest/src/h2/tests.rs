use super::*;

#[test]
fn hpack_integers_follow_rfc_7541() {
    // C.1.1–C.1.3.
    let mut out = Vec::new();
    hpack_int(&mut out, 0, 5, 10);
    assert_eq!(out, [0x0a]);
    out.clear();
    hpack_int(&mut out, 0, 5, 1337);
    assert_eq!(out, [0x1f, 0x9a, 0x0a]);
    out.clear();
    hpack_int(&mut out, 0, 8, 42);
    assert_eq!(out, [0x2a]);
}

/// A request template taken apart: headers, body, and (type, flags) of each frame.
type Decoded = (Vec<(String, String)>, Vec<u8>, Vec<(u8, u8)>);

/// Decodes a request template's header block and returns its headers and its body.
fn decode_template(template: &[u8]) -> Decoded {
    let mut at = 0;
    let mut headers = Vec::new();
    let mut body = Vec::new();
    let mut frames = Vec::new();
    let mut decoder = loona_hpack::Decoder::new();
    while at < template.len() {
        let len = usize::from(template[at]) << 16
            | usize::from(template[at + 1]) << 8
            | usize::from(template[at + 2]);
        let (kind, flags) = (template[at + 3], template[at + 4]);
        frames.push((kind, flags));
        let payload = &template[at + 9..at + 9 + len];
        match kind {
            HEADERS => decoder
                .decode_with_cb(payload, |n, v| {
                    headers.push((
                        String::from_utf8_lossy(&n).into_owned(),
                        String::from_utf8_lossy(&v).into_owned(),
                    ));
                })
                .unwrap(),
            DATA => body.extend_from_slice(payload),
            other => panic!("frame type {other} in a request"),
        }
        at += 9 + len;
    }
    (headers, body, frames)
}

#[test]
fn requests_encode_the_headers_a_server_decodes() {
    let (headers, body, frames) = decode_template(&request_template(Kind::Http, "svc", "/x", 0));
    let expected = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/x"),
        (":authority", "svc"),
        ("user-agent", "tern-load"),
    ];
    assert_eq!(
        headers,
        expected.map(|(n, v)| (n.to_owned(), v.to_owned())).to_vec()
    );
    assert!(body.is_empty());
    assert_eq!(frames, [(HEADERS, END_HEADERS | END_STREAM)]);

    // gRPC: POST, the gRPC headers, one length-prefixed message split across DATA frames.
    let (headers, body, frames) =
        decode_template(&request_template(Kind::Grpc, "svc", GRPC_ECHO_PATH, 20_000));
    assert!(headers.contains(&(":method".into(), "POST".into())));
    assert!(headers.contains(&("content-type".into(), "application/grpc".into())));
    assert!(headers.contains(&("te".into(), "trailers".into())));
    assert_eq!(&body[..5], &[0, 0, 0, 0x4e, 0x20]);
    assert_eq!(body.len(), 5 + 20_000);
    assert_eq!(
        frames,
        [(HEADERS, END_HEADERS), (DATA, 0), (DATA, END_STREAM)]
    );
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame_header(&mut out, payload.len(), kind, flags, stream);
    out.extend_from_slice(payload);
    out
}

/// Feeds `bytes` through `step` until a response completes; returns the step and how many
/// bytes were consumed in all.
fn run(connection: &mut Connection, bytes: &[u8]) -> (Step, usize) {
    let mut at = 0;
    loop {
        match connection.step(&bytes[at..]).unwrap() {
            Step::More(0) => panic!("incomplete at {at} of {}", bytes.len()),
            Step::More(n) => at += n,
            done => return (done, at),
        }
    }
}

#[test]
fn responses_settings_pings_and_the_hpack_table_across_responses() {
    let mut encoder = loona_hpack::Encoder::new();
    let mut connection = Connection::new(Kind::Http);
    let mut out = Vec::new();
    let template = request_template(Kind::Http, "svc", "/", 0);
    connection.request(&template, &mut out);
    assert!(
        out.starts_with(PREFACE),
        "the first request opens the connection"
    );

    let mut server = frame(SETTINGS, 0, 0, &[]);
    server.extend(frame(PING, 0, 0, b"12345678"));
    // Incremental indexing puts the headers in the server's dynamic table.
    let block = encoder.encode([(&b":status"[..], &b"200"[..]), (b"x-big", b"value")]);
    server.extend(frame(HEADERS, END_HEADERS, 1, &block));
    server.extend(frame(DATA, END_STREAM, 1, b"hello"));
    // A partial frame is not consumed.
    assert_eq!(connection.step(&server[..5]).unwrap(), Step::More(0));
    let (step, consumed) = run(&mut connection, &server);
    assert_eq!(step, Step::Done(5 + 9, 200));
    assert_eq!(consumed + 14, server.len());
    let mut pending = Vec::new();
    assert!(connection.take_pending(&mut pending));
    let mut expected = frame(SETTINGS, ACK, 0, &[]);
    expected.extend(frame(PING, ACK, 0, b"12345678"));
    assert_eq!(pending, expected);

    // The second request is stream 3; its response refers to the table entries the first
    // one made (a decoder that lost them would fail).
    out.clear();
    connection.request(&template, &mut out);
    assert_eq!(&out[5..9], &[0, 0, 0, 3]);
    let block = encoder.encode([(&b":status"[..], &b"200"[..]), (b"x-big", b"value")]);
    assert!(block.len() <= 3, "indexed references: {block:?}");
    let mut server = frame(HEADERS, END_HEADERS, 3, &block[..1]);
    server.truncate(9); // HEADERS without END_HEADERS, then CONTINUATION
    server[4] = 0;
    server[2] = 1;
    server.push(block[0]);
    server.extend(frame(CONTINUATION, END_HEADERS, 3, &block[1..]));
    server.extend(frame(DATA, END_STREAM, 3, b""));
    assert_eq!(run(&mut connection, &server).0, Step::Done(9, 200));
}

#[test]
fn grpc_statuses_and_protocol_errors() {
    let mut encoder = loona_hpack::Encoder::new();
    let mut connection = Connection::new(Kind::Grpc);
    let template = request_template(Kind::Grpc, "svc", GRPC_ECHO_PATH, 3);
    connection.request(&template, &mut Vec::new());
    // Headers, message, trailers with OK.
    let mut server = frame(
        HEADERS,
        END_HEADERS,
        1,
        &encoder.encode([(&b":status"[..], &b"200"[..])]),
    );
    server.extend(frame(DATA, 0, 1, &[0, 0, 0, 0, 3, b'a', b'b', b'c']));
    let trailers = encoder.encode([(&b"grpc-status"[..], &b"0"[..])]);
    server.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &trailers));
    assert_eq!(
        run(&mut connection, &server).0,
        Step::Done(9 + trailers.len(), 200)
    );

    // Trailers-only failure.
    connection.request(&template, &mut Vec::new());
    let block = encoder.encode([(&b":status"[..], &b"200"[..]), (b"grpc-status", b"14")]);
    let server = frame(HEADERS, END_HEADERS | END_STREAM, 3, &block);
    assert_eq!(
        run(&mut connection, &server).0,
        Step::Failed(server.len(), "grpc UNAVAILABLE")
    );

    // A reset of our stream, GOAWAY, an oversized frame.
    connection.request(&template, &mut Vec::new());
    let reset = frame(RST_STREAM, 0, 5, &[0, 0, 0, 2]);
    assert_eq!(connection.step(&reset), Err(ProtocolError::StreamReset));
    let goaway = frame(GOAWAY, 0, 0, &[0; 8]);
    assert_eq!(connection.step(&goaway), Err(ProtocolError::GoAway));
    let mut huge = Vec::new();
    frame_header(&mut huge, MAX_FRAME + 1, DATA, 0, 5);
    assert_eq!(connection.step(&huge), Err(ProtocolError::BadFrame));
}
