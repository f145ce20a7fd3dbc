//! Tern's userspace TLS 1.3 record layer: what a connection runs after the handshake when the
//! kernel cannot take its records (no kTLS in this kernel, or the io_uring backend).
//!
//! rustls runs the handshake ([`crate::tls::Handshake`]); then the session's keys are taken out
//! of it, as for kernel TLS, and records are protected here with ring's AEADs. Reads decrypt
//! in place in the buffer the socket was read into, packing the plaintext of many records
//! together in the same pass; writes encrypt into one reusable buffer that goes to the socket
//! in one call. Nothing is copied into or out of rustls' own buffers and nothing is allocated
//! per record.
//!
//! The contract after the handshake is the kernel's ([`crate::ktls`]): application data and
//! alerts. `close_notify` is the end of the stream; any other alert, or a post-handshake
//! handshake message (a KeyUpdate or session ticket; Tern sends neither), ends the connection
//! with an error. A sender stops with an error at its AEAD's confidentiality limit (2^24
//! records for AES-GCM) rather than send past it: a KeyUpdate would need the traffic secret,
//! which rustls' buffered connection does not hand out. Pools retire a connection before
//! that ([`UserTls::worn`]): past 7/8 of the limit in either direction it is not reused.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

use crate::io::{BufResult, Stream};

/// TLS content types (RFC 8446 §5.1).
pub(crate) const ALERT: u8 = 21;
pub(crate) const HANDSHAKE: u8 = 22;
pub(crate) const APPLICATION_DATA: u8 = 23;
/// A warning-level `close_notify` alert.
pub(crate) const CLOSE_NOTIFY: [u8; 2] = [1, 0];
/// A record header: type, legacy version, length.
pub(crate) const HEADER: usize = 5;
/// The AEAD tag of every TLS 1.3 cipher suite.
const TAG: usize = 16;
/// The largest plaintext of one record.
pub(crate) const MAX_FRAGMENT: usize = 16 * 1024;
/// The largest encrypted record body TLS 1.3 allows (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
/// The first read size; a connection whose reads keep filling it doubles it up to
/// [`MAX_READ`], so bulk transfers take fewer, larger reads while others stay small.
const FIRST_READ: usize = MAX_FRAGMENT + 2 * HEADER + TAG + 1;
/// The largest read.
const MAX_READ: usize = 256 * 1024;
/// How many encrypted bytes a write gathers before it goes to the socket.
const WRITE_BATCH: usize = 256 * 1024;

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// One direction's AEAD key, its static IV and the next record's sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    sequence: u64,
    /// The sequence number this direction must not reach.
    limit: u64,
}

impl Keys {
    /// Keys from rustls' extracted secrets; `None` for a cipher this layer does not have.
    fn new(sequence: u64, secrets: &ConnectionTrafficSecrets, limit: u64) -> Option<Keys> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return None,
        };
        Some(Keys {
            key: LessSafeKey::new(UnboundKey::new(algorithm, key.as_ref()).ok()?),
            iv: iv.as_ref().try_into().ok()?,
            sequence,
            limit,
        })
    }

    /// The per-record nonce (RFC 8446 §5.3): the IV XOR the sequence number, which advances.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.sequence >= self.limit {
            return Err(io::Error::other(
                "TLS confidentiality limit reached: this connection carried all the records its key may protect",
            ));
        }
        let mut nonce = self.iv;
        for (byte, sequence) in nonce[4..].iter_mut().zip(self.sequence.to_be_bytes()) {
            *byte ^= sequence;
        }
        self.sequence += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// The next sequence number, which is what kernel TLS takes as `rec_seq`.
    pub(crate) fn sequence(&self) -> u64 {
        self.sequence
    }
}

/// What [`Opener::open`] found in a buffer of ciphertext.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Opened {
    /// Plaintext now packed at the start of the buffer, this long.
    pub plaintext: usize,
    /// Bytes of whole records taken; the rest is a partial record.
    pub consumed: usize,
    /// The peer's `close_notify` arrived (anything after it is ignored).
    pub closed: bool,
}

/// The receiving direction.
pub(crate) struct Opener {
    keys: Keys,
}

impl Opener {
    pub(crate) fn new(sequence: u64, secrets: &ConnectionTrafficSecrets) -> Option<Opener> {
        Keys::new(sequence, secrets, u64::MAX).map(|keys| Opener { keys })
    }

    pub(crate) fn sequence(&self) -> u64 {
        self.keys.sequence()
    }

    /// Decrypts every whole record at the start of `buf` in place, packing their
    /// application data at the start of `buf`.
    pub(crate) fn open(&mut self, buf: &mut [u8]) -> io::Result<Opened> {
        let mut plaintext = 0;
        let mut at = 0;
        while let Some(header) = buf.get(at..at + HEADER) {
            let header: [u8; HEADER] = header.try_into().map_err(|_| invalid("short header"))?;
            let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] != APPLICATION_DATA || header[1] != 3 || length > MAX_CIPHERTEXT {
                return Err(invalid("not a TLS 1.3 application data record"));
            }
            if length < TAG + 1 {
                return Err(invalid("TLS record shorter than its tag"));
            }
            let end = at + HEADER + length;
            if end > buf.len() {
                break;
            }
            let nonce = self.keys.next_nonce()?;
            // The plaintext lands `plaintext` bytes in, behind the ciphertext it came from.
            let opened = self
                .keys
                .key
                .open_within(
                    nonce,
                    Aad::from(header),
                    &mut buf[plaintext..end],
                    at + HEADER - plaintext..,
                )
                .map_err(|_| invalid("TLS record failed authentication"))?;
            // The inner content type is the last non-zero byte; zeros after it are padding.
            let Some(last) = opened.iter().rposition(|&b| b != 0) else {
                return Err(invalid("TLS record with no content type"));
            };
            if last > MAX_FRAGMENT {
                return Err(invalid("TLS record plaintext longer than 2^14 bytes"));
            }
            let content_type = opened[last];
            at = end;
            match content_type {
                APPLICATION_DATA => plaintext += last,
                // close_notify (description 0), at whatever level.
                ALERT if last == 2 && opened[1] == 0 => {
                    return Ok(Opened {
                        plaintext,
                        consumed: at,
                        closed: true,
                    });
                }
                ALERT => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("peer sent TLS alert {:?}", &opened[..last]),
                    ));
                }
                HANDSHAKE => {
                    return Err(invalid(
                        "a post-handshake message (KeyUpdate or session ticket) arrived; Tern sidecars send neither",
                    ));
                }
                _ => return Err(invalid("unexpected TLS content type")),
            }
        }
        Ok(Opened {
            plaintext,
            consumed: at,
            closed: false,
        })
    }
}

/// The sending direction, with the buffer records are built in.
pub(crate) struct Sealer {
    keys: Keys,
    out: Vec<u8>,
}

impl Sealer {
    pub(crate) fn new(
        sequence: u64,
        secrets: &ConnectionTrafficSecrets,
        limit: u64,
    ) -> Option<Sealer> {
        Keys::new(sequence, secrets, limit).map(|keys| Sealer {
            keys,
            out: Vec::new(),
        })
    }

    pub(crate) fn sequence(&self) -> u64 {
        self.keys.sequence()
    }

    /// Appends `data` to the outgoing buffer as one record of `content_type` (at most
    /// [`MAX_FRAGMENT`] bytes).
    fn seal(&mut self, content_type: u8, data: &[u8]) -> io::Result<()> {
        debug_assert!(data.len() <= MAX_FRAGMENT);
        let length = data.len() + 1 + TAG;
        // The nonce first: at the limit nothing is added to the buffer.
        let nonce = self.keys.next_nonce()?;
        let start = self.out.len();
        self.out.reserve(HEADER + length);
        let header = [
            APPLICATION_DATA,
            3,
            3,
            (length >> 8) as u8,
            (length & 0xff) as u8,
        ];
        self.out.extend_from_slice(&header);
        self.out.extend_from_slice(data);
        self.out.push(content_type);
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.out[start + HEADER..])
            .map_err(|_| io::Error::other("TLS record could not be sealed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// The receiving side's state, borrowed only between awaits.
struct Receiving {
    opener: Opener,
    /// Plaintext decrypted before this layer took over, read first.
    pending: Vec<u8>,
    /// Ciphertext of a record not yet whole.
    partial: Vec<u8>,
    /// The next read's size.
    read_size: usize,
    /// The peer's `close_notify` was read: after `pending`, end of stream.
    closed: bool,
}

/// A TLS connection whose record layer is [`Opener`] and [`Sealer`]: a [`Stream`] of
/// plaintext over a [`Stream`] of records.
pub struct UserTls<S> {
    inner: S,
    receiving: RefCell<Receiving>,
    /// Held while records are being written, so they go out in sequence order.
    sending: tokio::sync::Mutex<Sealer>,
    /// The next record's sequence number on the sending side, readable without the lock.
    sent: std::cell::Cell<u64>,
    /// Where [`Self::worn`] starts saying yes.
    worn_at: u64,
}

impl<S> UserTls<S> {
    /// Whether either direction has used 7/8 of what its key may protect: a pool should not
    /// reuse the connection, so it is retired before a write fails at the limit.
    pub fn worn(&self) -> bool {
        let received = self
            .receiving
            .try_borrow()
            .map_or(0, |receiving| receiving.opener.sequence());
        self.sent.get().max(received) >= self.worn_at
    }
}

impl<S: Stream> UserTls<S> {
    /// Takes over `inner` after the handshake: `pending` is plaintext already decrypted,
    /// `partial` ciphertext already read (not a whole record), `closed` whether the peer's
    /// `close_notify` came already.
    pub(crate) fn new(
        inner: S,
        opener: Opener,
        sealer: Sealer,
        pending: Vec<u8>,
        partial: Vec<u8>,
        closed: bool,
    ) -> UserTls<S> {
        UserTls {
            inner,
            receiving: RefCell::new(Receiving {
                opener,
                pending,
                partial,
                read_size: FIRST_READ,
                closed,
            }),
            sent: std::cell::Cell::new(sealer.sequence()),
            worn_at: sealer.keys.limit - sealer.keys.limit / 8,
            sending: tokio::sync::Mutex::new(sealer),
        }
    }

    /// Writes what the sealer holds, then empties it.
    async fn send(&self, sealer: &mut Sealer) -> io::Result<()> {
        self.sent.set(sealer.sequence());
        let out = std::mem::take(&mut sealer.out);
        let len = out.len();
        let (written, mut back) = self.inner.write_all(out, 0..len).await;
        back.clear();
        crate::io::fit(&mut back, len, FIRST_READ);
        sealer.out = back;
        written
    }
}

impl<S: Stream> Stream for UserTls<S> {
    async fn read(&self, mut buf: Vec<u8>) -> BufResult<usize> {
        let start = buf.len();
        loop {
            let whole_record = {
                let mut receiving = self.receiving.borrow_mut();
                let receiving = &mut *receiving;
                if !receiving.pending.is_empty() {
                    crate::io::ensure_spare(&mut buf);
                    let n = receiving.pending.len().min(buf.capacity() - buf.len());
                    buf.extend(receiving.pending.drain(..n));
                    return (Ok(n), buf);
                }
                if receiving.closed {
                    return (Ok(0), buf);
                }
                // Room for the carried-over partial record and a read that can complete it.
                let wanted =
                    receiving.partial.len() + receiving.read_size.max(MAX_CIPHERTEXT + HEADER);
                if buf.capacity() - buf.len() < wanted {
                    buf.reserve(wanted);
                }
                // `partial` stays until this read's bytes are opened, so a read abandoned
                // mid-await (a timeout) loses nothing.
                buf.extend_from_slice(&receiving.partial);
                whole_record(&buf[start..])
            };
            if !whole_record {
                let asked = buf.capacity() - buf.len();
                let (read, back) = self.inner.read(buf).await;
                buf = back;
                match read {
                    Ok(0) => {
                        let error = if buf.len() > start {
                            "peer closed in the middle of a TLS record"
                        } else {
                            // A truncation attack or a crash.
                            "peer closed without TLS close_notify"
                        };
                        buf.truncate(start);
                        return (
                            Err(io::Error::new(io::ErrorKind::UnexpectedEof, error)),
                            buf,
                        );
                    }
                    Ok(n) => {
                        let mut receiving = self.receiving.borrow_mut();
                        if n == asked && receiving.read_size < MAX_READ {
                            receiving.read_size = (receiving.read_size * 2).min(MAX_READ);
                        } else if n.saturating_mul(8) < receiving.read_size {
                            receiving.read_size = (receiving.read_size / 2).max(FIRST_READ);
                        }
                    }
                    Err(error) => {
                        buf.truncate(start);
                        return (Err(error), buf);
                    }
                }
            }
            let mut receiving = self.receiving.borrow_mut();
            receiving.partial.clear();
            let opened = match receiving.opener.open(&mut buf[start..]) {
                Ok(opened) => opened,
                Err(error) => {
                    buf.truncate(start);
                    return (Err(error), buf);
                }
            };
            receiving.closed = opened.closed;
            if !opened.closed {
                receiving
                    .partial
                    .extend_from_slice(&buf[start + opened.consumed..]);
            }
            buf.truncate(start + opened.plaintext);
            if opened.plaintext > 0 || opened.closed {
                return (Ok(opened.plaintext), buf);
            }
        }
    }

    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> BufResult<()> {
        let Some(data) = buf.get(range) else {
            return (Err(io::ErrorKind::InvalidInput.into()), buf);
        };
        let mut sealer = self.sending.lock().await;
        for batch in data.chunks(WRITE_BATCH) {
            for fragment in batch.chunks(MAX_FRAGMENT) {
                if let Err(error) = sealer.seal(APPLICATION_DATA, fragment) {
                    sealer.out.clear();
                    return (Err(error), buf);
                }
            }
            if let Err(error) = self.send(&mut sealer).await {
                return (Err(error), buf);
            }
        }
        (Ok(()), buf)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.shutdown(how)
    }

    async fn close_write(&self) -> io::Result<()> {
        let mut sealer = self.sending.lock().await;
        sealer.seal(ALERT, &CLOSE_NOTIFY)?;
        self.send(&mut sealer).await?;
        self.inner.shutdown(Shutdown::Write)
    }
}

/// Whether `ciphertext` starts with a whole record (or a header no record can have, which
/// [`Opener::open`] then refuses without waiting for more).
fn whole_record(ciphertext: &[u8]) -> bool {
    match ciphertext.get(..HEADER) {
        None => false,
        Some(header) => {
            let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
            header[0] != APPLICATION_DATA
                || length > MAX_CIPHERTEXT
                || ciphertext.len() >= HEADER + length
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::sync::Arc;

    use rustls::crypto::ring::cipher_suite;
    use rustls::{ClientConnection, Connection, ServerConnection, SupportedCipherSuite};

    use super::*;

    /// A finished in-memory TLS 1.3 handshake between a rustls client and server, with the
    /// server's keys extracted into this layer; the client stays in rustls.
    struct Session {
        client: Connection,
        opener: Opener,
        sealer: Sealer,
    }

    fn session(suite: SupportedCipherSuite) -> Session {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["peer.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        let provider = Arc::new(provider);
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("peer.example").unwrap();
        let mut client = Connection::from(ClientConnection::new(Arc::new(client), name).unwrap());
        let mut server = Connection::from(ServerConnection::new(Arc::new(server)).unwrap());
        while client.is_handshaking() || server.is_handshaking() {
            pass(&mut client, &mut server);
            pass(&mut server, &mut client);
        }
        let limit = suite.tls13().unwrap().common.confidentiality_limit;
        let secrets = server.dangerous_extract_secrets().unwrap();
        Session {
            client,
            opener: Opener::new(secrets.rx.0, &secrets.rx.1).unwrap(),
            sealer: Sealer::new(secrets.tx.0, &secrets.tx.1, limit).unwrap(),
        }
    }

    /// Hands what `from` has to send to `to`.
    fn pass(from: &mut Connection, to: &mut Connection) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        // An empty read would be taken for the peer's end of stream.
        if !wire.is_empty() {
            to.read_tls(&mut wire.as_slice()).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    const SUITES: [SupportedCipherSuite; 3] = [
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];

    /// `len` bytes of a pattern that shows misplaced bytes.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// What the rustls client sends for `data` (its records, whole).
    fn client_records(client: &mut Connection, data: &[u8]) -> Vec<u8> {
        let mut written = 0;
        let mut wire = Vec::new();
        while written < data.len() {
            written += client.writer().write(&data[written..]).unwrap();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
        }
        wire
    }

    #[test]
    fn records_from_rustls_open_in_place_across_every_boundary() {
        for suite in SUITES {
            let mut s = session(suite);
            let data = pattern(100_000);
            let mut wire = client_records(&mut s.client, &data);
            wire.extend(client_records(&mut s.client, b"tail"));
            // Fed in pieces that cut headers, bodies and tags anywhere.
            let mut received = Vec::new();
            let mut held: Vec<u8> = Vec::new();
            for piece in wire.chunks(7_001) {
                held.extend_from_slice(piece);
                let opened = s.opener.open(&mut held).unwrap();
                assert!(!opened.closed);
                received.extend_from_slice(&held[..opened.plaintext]);
                held.drain(..opened.consumed);
            }
            assert!(held.is_empty(), "{suite:?}: bytes left over");
            assert_eq!(received.len(), data.len() + 4, "{suite:?}");
            assert!(received[..data.len()] == data[..], "{suite:?}");
            assert_eq!(&received[data.len()..], b"tail");

            s.client.send_close_notify();
            let mut wire = Vec::new();
            s.client.write_tls(&mut wire).unwrap();
            let opened = s.opener.open(&mut wire).unwrap();
            assert_eq!((opened.plaintext, opened.closed), (0, true), "{suite:?}");
        }
    }

    #[test]
    fn sealed_records_are_read_by_rustls() {
        for suite in SUITES {
            let mut s = session(suite);
            let data = pattern(70_000);
            for fragment in data.chunks(MAX_FRAGMENT) {
                s.sealer.seal(APPLICATION_DATA, fragment).unwrap();
            }
            s.sealer.seal(ALERT, &CLOSE_NOTIFY).unwrap();
            let wire = std::mem::take(&mut s.sealer.out);
            let mut received = Vec::new();
            let mut at = 0;
            // One record at a time, as a socket reader would hand them over.
            while at < wire.len() {
                let length = usize::from(u16::from_be_bytes([wire[at + 3], wire[at + 4]]));
                let mut record = &wire[at..at + HEADER + length];
                at += HEADER + length;
                while !record.is_empty() {
                    let n = s.client.read_tls(&mut record).unwrap();
                    assert!(n > 0, "{suite:?}");
                    s.client.process_new_packets().unwrap();
                    let mut chunk = [0; 4096];
                    loop {
                        match s.client.reader().read(&mut chunk) {
                            Ok(0) => break,
                            Ok(n) => received.extend_from_slice(&chunk[..n]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => panic!("{suite:?} at {}: {e}", received.len()),
                        }
                    }
                }
            }
            assert!(received == data, "{suite:?}");
            assert!(
                matches!(s.client.reader().read(&mut [0; 1]), Ok(0)),
                "{suite:?}: close_notify is a clean end"
            );
        }
    }

    #[test]
    fn a_tampered_record_is_refused() {
        let mut s = session(SUITES[0]);
        let mut wire = client_records(&mut s.client, b"hello");
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let error = s.opener.open(&mut wire).unwrap_err();
        assert!(error.to_string().contains("authentication"), "{error}");
    }

    #[test]
    fn a_key_update_or_a_fatal_alert_ends_the_connection() {
        let mut s = session(SUITES[0]);
        s.client.refresh_traffic_keys().unwrap();
        let mut wire = Vec::new();
        s.client.write_tls(&mut wire).unwrap();
        let error = s.opener.open(&mut wire).unwrap_err();
        assert!(error.to_string().contains("post-handshake"), "{error}");

        // A fatal alert (handshake_failure), opened with the keys that sealed it.
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: [7u8; 32].into(),
            iv: [9u8; 12].into(),
        };
        let mut sealer = Sealer::new(0, &secrets, u64::MAX).unwrap();
        let mut opener = Opener::new(0, &secrets).unwrap();
        sealer.seal(APPLICATION_DATA, b"x").unwrap();
        sealer.seal(ALERT, &[2, 40]).unwrap();
        let error = opener.open(&mut sealer.out).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted, "{error}");
    }

    #[test]
    fn garbage_is_refused_without_waiting_for_more() {
        let mut s = session(SUITES[0]);
        assert!(whole_record(b"GET / HTTP/1.1"));
        let error = s.opener.open(&mut b"GET / HTTP/1.1".to_vec()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let huge = [APPLICATION_DATA, 3, 3, 0xff, 0xff];
        assert!(whole_record(&huge));
        assert!(s.opener.open(&mut huge.to_vec()).is_err());
        assert!(!whole_record(&[APPLICATION_DATA, 3, 3, 0, 40, 1, 2]));
    }

    /// A socket that takes every write.
    struct Sink;

    impl Stream for Sink {
        async fn read(&self, buf: Vec<u8>) -> BufResult<usize> {
            (Ok(0), buf)
        }
        async fn write_all(&self, buf: Vec<u8>, _range: Range<usize>) -> BufResult<()> {
            (Ok(()), buf)
        }
        fn shutdown(&self, _how: Shutdown) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_connection_is_worn_at_seven_eighths_of_its_limit_either_way() {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: [1u8; 32].into(),
            iv: [2u8; 12].into(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Records received so far, and a sender limited to 16 records.
        let connection = |received| {
            UserTls::new(
                Sink,
                Opener::new(received, &secrets).unwrap(),
                Sealer::new(0, &secrets, 16).unwrap(),
                Vec::new(),
                Vec::new(),
                false,
            )
        };
        let tls = connection(0);
        for _ in 0..13 {
            let (written, _) = runtime.block_on(tls.write_all(b"x".to_vec(), 0..1));
            written.unwrap();
        }
        assert!(!tls.worn(), "13 of 16 records");
        let (written, _) = runtime.block_on(tls.write_all(b"x".to_vec(), 0..1));
        written.unwrap();
        assert!(tls.worn(), "14 of 16 records");

        let tls = connection(14);
        assert!(tls.worn(), "the peer's side counts too");
    }

    #[test]
    fn the_sender_stops_at_the_confidentiality_limit() {
        let mut s = session(SUITES[0]);
        s.sealer.keys.limit = s.sealer.keys.sequence + 2;
        s.sealer.seal(APPLICATION_DATA, b"one").unwrap();
        s.sealer.seal(APPLICATION_DATA, b"two").unwrap();
        let error = s.sealer.seal(APPLICATION_DATA, b"three").unwrap_err();
        assert!(
            error.to_string().contains("confidentiality limit"),
            "{error}"
        );
    }
}
