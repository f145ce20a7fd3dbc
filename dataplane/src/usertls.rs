//! Tern's userspace TLS 1.3 record layer: what a connection runs after the handshake when the
//! kernel cannot take its records (no kTLS in this kernel, a cipher it refuses, a stream
//! with no socket of its own) or may not (a record half-read at the hand-off, keys already
//! updated, the peer already closed: `Leftover::kernel_may_take_over`).
//!
//! rustls runs the handshake ([`crate::tls::Handshake`]); then the session's keys are taken out
//! of it, as for kernel TLS, and records are protected here with aws-lc-rs' AEADs. Reads decrypt
//! in place in the buffer the socket was read into, each record's plaintext moved up behind
//! the one before; writes encrypt the caller's plaintext straight into one reusable buffer
//! that goes to the socket in one call. Nothing is copied into or out of rustls' own buffers
//! and nothing is allocated per record.
//!
//! After the handshake a connection carries application data, alerts and the post-handshake
//! messages of TLS 1.3 (`AfterHandshake`, shared with [`crate::ktls`]): a KeyUpdate moves
//! the receiving side to the next keys of the session's key schedule (rustls' kernel
//! connection computes them), and one that asks for an answer has this side update its own
//! sending keys before its next write; a session ticket goes to rustls. `close_notify` is the
//! end of the stream; any other alert ends the connection with an error. A record this layer
//! refuses is answered with the fatal alert that says why ([`Refused`]), if it can be sent
//! within 100 ms, and nothing is sent after it. A sender updates its
//! own keys before its AEAD's confidentiality limit (2^24 records for AES-GCM), so a
//! connection may live and carry data for as long as it is wanted.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::ops::Range;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

use crate::io::{BufResult, Stream};
use crate::tls::KeySchedule;

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

/// Handshake message types after the handshake (RFC 8446 §4).
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// Most post-handshake records a peer may send in a row with no application data between
/// (rustls and BoringSSL allow 32 KeyUpdates): past it, a peer streaming KeyUpdates or
/// tickets is refused rather than served key derivations without end.
const MAX_POST_HANDSHAKE_RUN: u32 = 32;

/// Alert descriptions this side ends a connection with (RFC 8446 §6).
pub(crate) const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const ILLEGAL_PARAMETER: u8 = 47;
const DECODE_ERROR: u8 = 50;
/// How long a refused peer's alert may wait for room in the socket: it is a courtesy, and
/// a peer that reads nothing must not hold the connection open.
const ALERT_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// A record the peer sent and this side refuses, with the alert that tells the peer why.
#[derive(Debug)]
pub(crate) struct Refused {
    pub alert: u8,
    message: &'static str,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message)
    }
}

impl std::error::Error for Refused {}

pub(crate) fn refused(alert: u8, message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Refused { alert, message })
}

/// The error of an alert record from the peer (`record`, its plaintext): its description by
/// name, as the peer's log would have it; no more of the record is logged.
pub(crate) fn peer_alert(record: &[u8]) -> io::Error {
    let said = match record {
        [level, description] => format!(
            "{:?}{}",
            rustls::AlertDescription::from(*description),
            if *level == 1 { " (warning)" } else { "" }
        ),
        _ => format!("malformed ({} bytes)", record.len()),
    };
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!("peer sent TLS alert {said}"),
    )
}

/// The alert that answers `error`, if it is a refusal of what the peer sent.
pub(crate) fn alert_for(error: &io::Error) -> Option<u8> {
    error
        .get_ref()?
        .downcast_ref::<Refused>()
        .map(|refused| refused.alert)
}

/// The KeyUpdate this side sends: type, 24-bit length, `request_update` = `update_not_requested`
/// (the peer need not update its own keys).
pub(crate) const KEY_UPDATE_MESSAGE: [u8; 5] = [KEY_UPDATE, 0, 0, 1, 0];

/// What a record layer keeps of the session after the handshake: rustls' key schedule, the
/// post-handshake records since the peer's last application data, and whether the peer asked
/// for a KeyUpdate this side has not sent yet. Shared by both record layers.
pub(crate) struct AfterHandshake {
    schedule: KeySchedule,
    run: u32,
    owed: bool,
}

impl AfterHandshake {
    pub(crate) fn new(schedule: KeySchedule) -> AfterHandshake {
        AfterHandshake {
            schedule,
            run: 0,
            owed: false,
        }
    }

    /// Handles the post-handshake messages in one handshake record's plaintext: a session
    /// ticket goes to rustls; a KeyUpdate must end the record (the keys change after it).
    /// Returns whether the peer updated its keys: the caller moves reading to
    /// [`Self::next_rx`]. Past [`MAX_POST_HANDSHAKE_RUN`] such records with no data between,
    /// the peer is refused.
    ///
    /// TLS 1.3 lets a handshake message span records. Post-handshake messages are small and
    /// no implementation splits them, so one that does not fit its record is refused.
    pub(crate) fn record(&mut self, mut messages: &[u8]) -> io::Result<bool> {
        self.run += 1;
        if self.run > MAX_POST_HANDSHAKE_RUN {
            return Err(refused(
                UNEXPECTED_MESSAGE,
                "too many TLS post-handshake messages without application data",
            ));
        }
        if messages.is_empty() {
            return Err(refused(UNEXPECTED_MESSAGE, "empty TLS handshake record"));
        }
        while let [kind, a, b, c, rest @ ..] = messages {
            let length = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            let Some((body, rest)) = rest.split_at_checked(length) else {
                break;
            };
            messages = rest;
            match *kind {
                NEW_SESSION_TICKET => self.schedule.ticket(body)?,
                KEY_UPDATE => {
                    match body {
                        [0] => {}
                        // It asks for ours in return, before our next write.
                        [1] => self.owed = true,
                        [_] => {
                            return Err(refused(
                                ILLEGAL_PARAMETER,
                                "TLS KeyUpdate asks neither yes nor no",
                            ));
                        }
                        _ => return Err(refused(DECODE_ERROR, "malformed TLS KeyUpdate")),
                    }
                    if !messages.is_empty() {
                        return Err(refused(
                            UNEXPECTED_MESSAGE,
                            "TLS KeyUpdate not at the end of its record",
                        ));
                    }
                    return Ok(true);
                }
                _ => {
                    return Err(refused(
                        UNEXPECTED_MESSAGE,
                        "unexpected TLS handshake message after the handshake",
                    ));
                }
            }
        }
        if messages.is_empty() {
            Ok(false)
        } else {
            // TLS allows it; this layer does not take it (no implementation splits them).
            Err(refused(
                DECODE_ERROR,
                "TLS post-handshake message split across records",
            ))
        }
    }

    /// The peer sent a record of `len` bytes of application data. Only data ends a run of
    /// post-handshake records: empty records, which TLS allows, do not.
    pub(crate) fn data(&mut self, len: usize) {
        if len > 0 {
            self.run = 0;
        }
    }

    /// Whether the peer asked for a KeyUpdate this side has not sent yet.
    pub(crate) fn owes_key_update(&self) -> bool {
        self.owed
    }

    /// The owed KeyUpdate was sent and the sending keys moved on.
    pub(crate) fn paid_key_update(&mut self) {
        self.owed = false;
    }

    /// The next receiving keys, after a KeyUpdate from the peer.
    pub(crate) fn next_rx(&mut self) -> io::Result<ConnectionTrafficSecrets> {
        self.schedule.next_rx()
    }

    /// The next sending keys, after a KeyUpdate this side sends.
    pub(crate) fn next_tx(&mut self) -> io::Result<ConnectionTrafficSecrets> {
        self.schedule.next_tx()
    }
}

/// One direction's AEAD key, its static IV and the next record's sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    sequence: u64,
}

impl Keys {
    /// Keys from rustls' secrets; `None` for a cipher this layer does not have.
    fn new(sequence: u64, secrets: &ConnectionTrafficSecrets) -> Option<Keys> {
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
        })
    }

    /// The keys a KeyUpdate moves to (sequence numbers start again at zero).
    fn next(secrets: io::Result<ConnectionTrafficSecrets>) -> io::Result<Keys> {
        Keys::new(0, &secrets?)
            .ok_or_else(|| io::Error::other("the updated TLS keys are not of the session's cipher"))
    }

    /// The per-record nonce (RFC 8446 §5.3): the IV XOR the sequence number, which advances.
    fn next_nonce(&mut self) -> Nonce {
        let mut nonce = self.iv;
        for (byte, sequence) in nonce[4..].iter_mut().zip(self.sequence.to_be_bytes()) {
            *byte ^= sequence;
        }
        self.sequence += 1;
        Nonce::assume_unique_for_key(nonce)
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
    /// The peer updated its keys.
    pub keys_updated: bool,
}

/// The receiving direction.
pub(crate) struct Opener {
    keys: Keys,
}

impl Opener {
    pub(crate) fn new(sequence: u64, secrets: &ConnectionTrafficSecrets) -> Option<Opener> {
        Keys::new(sequence, secrets).map(|keys| Opener { keys })
    }

    /// The next record's sequence number, which is what kernel TLS takes as `rec_seq`.
    pub(crate) fn sequence(&self) -> u64 {
        self.keys.sequence
    }

    /// Decrypts every whole record at the start of `buf` in place, packing their
    /// application data at the start of `buf`; post-handshake messages go to `after`, and a
    /// KeyUpdate moves the records after it to the next keys.
    pub(crate) fn open(
        &mut self,
        buf: &mut [u8],
        after: &mut AfterHandshake,
    ) -> io::Result<Opened> {
        let mut opened = Opened {
            plaintext: 0,
            consumed: 0,
            closed: false,
            keys_updated: false,
        };
        while let Some(header) = buf.get(opened.consumed..opened.consumed + HEADER) {
            let header: [u8; HEADER] = header
                .try_into()
                .map_err(|_| refused(DECODE_ERROR, "short header"))?;
            let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] == ALERT {
                // An alert in the clear (a peer that failed before it had keys): not
                // answered with one.
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "peer sent an unencrypted TLS alert",
                ));
            }
            if header[0] != APPLICATION_DATA || header[1] != 3 {
                return Err(refused(
                    UNEXPECTED_MESSAGE,
                    "not a TLS 1.3 application data record",
                ));
            }
            if length > MAX_CIPHERTEXT {
                return Err(refused(
                    RECORD_OVERFLOW,
                    "TLS record longer than 2^14 + 256",
                ));
            }
            if length < TAG + 1 {
                return Err(refused(BAD_RECORD_MAC, "TLS record shorter than its tag"));
            }
            let at = opened.consumed;
            let end = at + HEADER + length;
            if end > buf.len() {
                break;
            }
            let nonce = self.keys.next_nonce();
            // The plaintext lands `plaintext` bytes in, behind the ciphertext it came from.
            let plaintext = opened.plaintext;
            let inner = self
                .keys
                .key
                .open_within(
                    nonce,
                    Aad::from(header),
                    &mut buf[plaintext..end],
                    at + HEADER - plaintext..,
                )
                .map_err(|_| refused(BAD_RECORD_MAC, "TLS record failed authentication"))?;
            // The inner content type is the last non-zero byte; zeros after it are padding.
            let Some(last) = inner.iter().rposition(|&b| b != 0) else {
                return Err(refused(
                    UNEXPECTED_MESSAGE,
                    "TLS record with no content type",
                ));
            };
            // The content, its type and the padding together: at most 2^14 + 1 (RFC 8446 §5.4).
            if inner.len() > MAX_FRAGMENT + 1 {
                return Err(refused(
                    RECORD_OVERFLOW,
                    "TLS record plaintext longer than 2^14 bytes",
                ));
            }
            opened.consumed = end;
            match inner[last] {
                APPLICATION_DATA => {
                    opened.plaintext += last;
                    after.data(last);
                }
                // close_notify (description 0), at whatever level.
                ALERT if last == 2 && inner[1] == 0 => {
                    opened.closed = true;
                    return Ok(opened);
                }
                ALERT if last == 2 => return Err(peer_alert(&inner[..last])),
                ALERT => return Err(refused(DECODE_ERROR, "malformed TLS alert")),
                HANDSHAKE => {
                    if after.record(&inner[..last])? {
                        self.keys = Keys::next(after.next_rx())?;
                        opened.keys_updated = true;
                    }
                }
                _ => return Err(refused(UNEXPECTED_MESSAGE, "unexpected TLS content type")),
            }
        }
        Ok(opened)
    }
}

/// The sending direction, with the buffer records are built in.
pub(crate) struct Sealer {
    keys: Keys,
    /// The confidentiality limit: records one key may protect.
    limit: u64,
    /// Records sealed since the last send, in `out[..sealed]`. The rest of `out` is
    /// initialized memory kept for the next records, so sealing encrypts the caller's
    /// plaintext straight into it rather than copying it in first.
    out: Vec<u8>,
    sealed: usize,
    /// Records were lost (a seal failed, or a send failed or was abandoned mid-way), a KeyUpdate
    /// among them perhaps, so nothing more may be sent.
    failed: bool,
}

impl Sealer {
    pub(crate) fn new(
        sequence: u64,
        secrets: &ConnectionTrafficSecrets,
        limit: u64,
    ) -> Option<Sealer> {
        Keys::new(sequence, secrets).map(|keys| Sealer {
            keys,
            limit,
            out: Vec::new(),
            sealed: 0,
            failed: false,
        })
    }

    /// The records sealed since the last send.
    #[cfg(test)]
    fn records(&self) -> &[u8] {
        &self.out[..self.sealed]
    }

    /// Appends `data` to the outgoing buffer as one record of `content_type` (at most
    /// [`MAX_FRAGMENT`] bytes), after a KeyUpdate if the current keys have protected all
    /// the records they may.
    fn seal(
        &mut self,
        content_type: u8,
        data: &[u8],
        after: &mut AfterHandshake,
    ) -> io::Result<()> {
        // The KeyUpdate takes the last sequence number the keys allow.
        if self.keys.sequence.saturating_add(1) >= self.limit {
            self.update_keys(after)?;
        }
        self.seal_record(content_type, data)
    }

    /// Grows the buffer, once, to hold the records of `len` more bytes of plaintext and two
    /// KeyUpdates; sealing a batch then neither reallocates nor copies what it sealed.
    fn make_room(&mut self, len: usize) {
        let per_record = HEADER + 1 + TAG;
        let records = len.div_ceil(MAX_FRAGMENT);
        let wanted =
            self.sealed + len + records * per_record + 2 * (per_record + KEY_UPDATE_MESSAGE.len());
        if self.out.len() < wanted {
            self.out.resize(wanted, 0);
        }
    }

    /// Sends a KeyUpdate (one that asks nothing of the peer) and moves to the next keys.
    fn update_keys(&mut self, after: &mut AfterHandshake) -> io::Result<()> {
        let next = Keys::next(after.next_tx())?;
        self.seal_record(HANDSHAKE, &KEY_UPDATE_MESSAGE)?;
        self.keys = next;
        Ok(())
    }

    fn seal_record(&mut self, content_type: u8, data: &[u8]) -> io::Result<()> {
        debug_assert!(data.len() <= MAX_FRAGMENT);
        let length = data.len() + 1 + TAG;
        let nonce = self.keys.next_nonce();
        let end = self.sealed + HEADER + length;
        if self.out.len() < end {
            self.out.resize(end, 0);
        }
        let header = [
            APPLICATION_DATA,
            3,
            3,
            (length >> 8) as u8,
            (length & 0xff) as u8,
        ];
        let (header_out, body) = self.out[self.sealed..end].split_at_mut(HEADER);
        header_out.copy_from_slice(&header);
        // The inner content type is the one byte of plaintext after the data.
        let (ciphertext, type_and_tag) = body.split_at_mut(data.len());
        self.keys
            .key
            .seal_out_of_place_scatter(
                nonce,
                Aad::from(header),
                data,
                ciphertext,
                &[content_type],
                type_and_tag,
            )
            .map_err(|_| io::Error::other("TLS record could not be sealed"))?;
        self.sealed = end;
        Ok(())
    }
}

/// What the records read with the end of a handshake held, opened: the record layer a
/// connection takes over with.
pub(crate) struct Leftover {
    /// Plaintext, to be read first.
    pub pending: Vec<u8>,
    /// Ciphertext of a record not yet whole.
    pub partial: Vec<u8>,
    /// The peer's `close_notify` came already.
    pub closed: bool,
    /// The peer updated its keys already.
    pub keys_updated: bool,
}

impl Leftover {
    /// Opens the records in `ciphertext`.
    pub(crate) fn open(
        opener: &mut Opener,
        after: &mut AfterHandshake,
        mut ciphertext: Vec<u8>,
    ) -> io::Result<Leftover> {
        let opened = opener.open(&mut ciphertext, after)?;
        let partial = if opened.closed {
            Vec::new()
        } else {
            ciphertext[opened.consumed..].to_vec()
        };
        ciphertext.truncate(opened.plaintext);
        Ok(Leftover {
            pending: ciphertext,
            partial,
            closed: opened.closed,
            keys_updated: opened.keys_updated,
        })
    }

    /// Whether the kernel can take the connection's records from here: nothing half-read,
    /// nothing closed, and the keys still those of the handshake.
    pub(crate) fn kernel_may_take_over(&self) -> bool {
        self.partial.is_empty() && !self.closed && !self.keys_updated
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

/// A TLS connection whose record layer is `Opener` and `Sealer`: a [`Stream`] of
/// plaintext over a [`Stream`] of records.
pub struct UserTls<S> {
    inner: S,
    receiving: RefCell<Receiving>,
    /// Held while records are being written, so they go out in sequence order.
    sending: tokio::sync::Mutex<Sealer>,
    /// The session after the handshake; borrowed only between awaits.
    after: RefCell<AfterHandshake>,
}

impl<S: Stream> UserTls<S> {
    /// Takes over `inner` after the handshake, with what came with its end.
    pub(crate) fn new(
        inner: S,
        opener: Opener,
        sealer: Sealer,
        after: AfterHandshake,
        leftover: Leftover,
    ) -> UserTls<S> {
        UserTls {
            inner,
            receiving: RefCell::new(Receiving {
                opener,
                pending: leftover.pending,
                partial: leftover.partial,
                read_size: FIRST_READ,
                closed: leftover.closed,
            }),
            sending: tokio::sync::Mutex::new(sealer),
            after: RefCell::new(after),
        }
    }

    /// Writes the records the sealer holds, then empties it, keeping its memory (a burst's
    /// beyond `FIRST_READ` given back as [`crate::io::fit`] does). Abandoned or failed
    /// mid-way, the records (a KeyUpdate among them, perhaps) are lost and the sealer stays
    /// failed.
    async fn send(&self, sealer: &mut Sealer) -> io::Result<()> {
        // Only records sealed by a sealer that had not failed are sent (`seal` checks).
        debug_assert!(!sealer.failed);
        let out = std::mem::take(&mut sealer.out);
        let len = std::mem::take(&mut sealer.sealed);
        sealer.failed = true;
        let (written, mut back) = self.inner.write_all(out, 0..len).await;
        if let Some(fitted) = crate::io::fitted_size(back.len(), len, FIRST_READ) {
            back.truncate(fitted);
            back.shrink_to_fit();
        }
        sealer.out = back;
        sealer.failed = written.is_err();
        written
    }

    /// Tells the peer why its record is refused (RFC 8446 §6.2: a fatal alert), if a write in
    /// progress ends and the socket takes the alert within [`ALERT_WAIT`]; nothing is sent
    /// after it.
    async fn refuse(&self, error: &io::Error) {
        let Some(description) = alert_for(error) else {
            return;
        };
        let alert = async {
            let mut sealer = self.sending.lock().await;
            if self.seal(&mut sealer, ALERT, &[2, description]).is_ok() {
                let _ = self.send(&mut sealer).await;
            }
            // Nothing follows a fatal alert, sent or not.
            sealer.failed = true;
        };
        if tokio::time::timeout(ALERT_WAIT, alert).await.is_err() {
            // A write in progress or the alert itself is stuck (the peer reads nothing):
            // end the connection now, so nothing more goes out and an abandoned write
            // (io_uring keeps the socket while one is in flight) holds nothing open.
            self.inner.abort();
        }
    }

    /// Seals `data` as records of `content_type`, after the KeyUpdate the peer asked for.
    fn seal(&self, sealer: &mut Sealer, content_type: u8, data: &[u8]) -> io::Result<()> {
        if sealer.failed {
            return Err(io::Error::other(
                "an earlier TLS record could not be sealed or sent; nothing more is sent",
            ));
        }
        sealer.make_room(data.len());
        let after = &mut *self.after.borrow_mut();
        let sealed = (|| {
            if after.owes_key_update() {
                sealer.update_keys(after)?;
                after.paid_key_update();
            }
            for fragment in data.chunks(MAX_FRAGMENT) {
                sealer.seal(content_type, fragment, after)?;
            }
            Ok(())
        })();
        if sealed.is_err() {
            sealer.sealed = 0;
            sealer.failed = true;
        }
        sealed
    }
}

impl<S: Stream> Stream for UserTls<S> {
    async fn read(&self, mut buf: Vec<u8>) -> BufResult<usize> {
        let start = buf.len();
        loop {
            {
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
                // `partial` (never a whole record: `Opener::open` takes every whole one) stays
                // until this read's bytes are opened, so a read abandoned mid-await (a
                // timeout) loses nothing.
                buf.extend_from_slice(&receiving.partial);
            }
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
            let opened = {
                let mut receiving = self.receiving.borrow_mut();
                receiving.partial.clear();
                let opened = receiving
                    .opener
                    .open(&mut buf[start..], &mut self.after.borrow_mut());
                if let Ok(opened) = &opened {
                    receiving.closed = opened.closed;
                    if !opened.closed {
                        receiving
                            .partial
                            .extend_from_slice(&buf[start + opened.consumed..]);
                    }
                }
                opened
            };
            let opened = match opened {
                Ok(opened) => opened,
                Err(error) => {
                    buf.truncate(start);
                    self.refuse(&error).await;
                    return (Err(error), buf);
                }
            };
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
            if let Err(error) = self.seal(&mut sealer, APPLICATION_DATA, batch) {
                return (Err(error), buf);
            }
            if let Err(error) = self.send(&mut sealer).await {
                return (Err(error), buf);
            }
        }
        (Ok(()), buf)
    }

    fn has_input(&self) -> bool {
        let receiving = self.receiving.borrow();
        !receiving.pending.is_empty()
            || !receiving.partial.is_empty()
            || receiving.closed
            || self.inner.has_input()
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.shutdown(how)
    }

    fn duplicate(&self) -> Option<std::os::fd::OwnedFd> {
        self.inner.duplicate()
    }

    fn abort(&self) {
        self.inner.abort();
    }

    async fn close_write(&self) -> io::Result<()> {
        let mut sealer = self.sending.lock().await;
        self.seal(&mut sealer, ALERT, &CLOSE_NOTIFY)?;
        self.send(&mut sealer).await?;
        self.inner.shutdown(Shutdown::Write)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use rustls::SupportedCipherSuite;
    use rustls::crypto::aws_lc_rs::cipher_suite;

    use super::*;
    use crate::tls::in_memory::{self, deliver, sent_by};

    /// A finished in-memory TLS 1.3 session between a rustls peer and Tern's side, whose
    /// keys are in this layer.
    struct Session {
        peer: rustls::Connection,
        opener: Opener,
        sealer: Sealer,
        after: AfterHandshake,
        /// Ciphertext that came with the end of the handshake.
        leftover: Vec<u8>,
    }

    impl Session {
        fn new(tern: crate::tls::HandshakeState, mut peer: rustls::Connection) -> Session {
            let session = in_memory::handshake(tern, &mut peer);
            let secrets = session.secrets;
            Session {
                peer,
                opener: Opener::new(secrets.rx.0, &secrets.rx.1).unwrap(),
                sealer: Sealer::new(secrets.tx.0, &secrets.tx.1, session.limit).unwrap(),
                after: AfterHandshake::new(session.schedule),
                leftover: session.incoming,
            }
        }

        /// Tern as the server, the peer a rustls client.
        fn server(suite: SupportedCipherSuite) -> Session {
            let (client, server) = in_memory::configs(suite);
            Session::new(in_memory::server(server), in_memory::peer_client(client))
        }

        /// Opens what the peer sent, whole.
        fn open(&mut self, mut wire: Vec<u8>) -> io::Result<(Vec<u8>, Opened)> {
            let opened = self.opener.open(&mut wire, &mut self.after)?;
            assert_eq!(opened.consumed, wire.len(), "a record left over");
            wire.truncate(opened.plaintext);
            Ok((wire, opened))
        }

        /// What the peer reads of `wire`.
        fn peer_reads(&mut self, wire: &[u8]) -> Vec<u8> {
            deliver(&mut self.peer, wire);
            let mut received = Vec::new();
            let mut chunk = [0; 4096];
            loop {
                match self.peer.reader().read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => received.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("after {} bytes: {e}", received.len()),
                }
            }
            received
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

    /// What the rustls peer sends for `data` (its records, whole).
    fn peer_records(peer: &mut rustls::Connection, data: &[u8]) -> Vec<u8> {
        let mut written = 0;
        let mut wire = Vec::new();
        while written < data.len() {
            written += peer.writer().write(&data[written..]).unwrap();
            wire.extend(sent_by(peer));
        }
        wire
    }

    #[test]
    fn records_from_rustls_open_in_place_across_every_boundary() {
        for suite in SUITES {
            let mut s = Session::server(suite);
            assert!(s.leftover.is_empty());
            let data = pattern(100_000);
            let mut wire = peer_records(&mut s.peer, &data);
            wire.extend(peer_records(&mut s.peer, b"tail"));
            // Fed in pieces that cut headers, bodies and tags anywhere.
            let mut received = Vec::new();
            let mut held: Vec<u8> = Vec::new();
            for piece in wire.chunks(7_001) {
                held.extend_from_slice(piece);
                let opened = s.opener.open(&mut held, &mut s.after).unwrap();
                assert!(!opened.closed);
                received.extend_from_slice(&held[..opened.plaintext]);
                held.drain(..opened.consumed);
            }
            assert!(held.is_empty(), "{suite:?}: bytes left over");
            assert_eq!(received.len(), data.len() + 4, "{suite:?}");
            assert!(received[..data.len()] == data[..], "{suite:?}");
            assert_eq!(&received[data.len()..], b"tail");

            s.peer.send_close_notify();
            let wire = sent_by(&mut s.peer);
            let (plaintext, opened) = s.open(wire).unwrap();
            assert!(plaintext.is_empty() && opened.closed, "{suite:?}");
        }
    }

    #[test]
    fn sealed_records_are_read_by_rustls() {
        for suite in SUITES {
            let mut s = Session::server(suite);
            let data = pattern(70_000);
            for fragment in data.chunks(MAX_FRAGMENT) {
                s.sealer
                    .seal(APPLICATION_DATA, fragment, &mut s.after)
                    .unwrap();
            }
            s.sealer.seal(ALERT, &CLOSE_NOTIFY, &mut s.after).unwrap();
            let wire = s.sealer.records().to_vec();
            let mut received = Vec::new();
            let mut at = 0;
            // One record at a time, as a socket reader would hand them over.
            while at < wire.len() {
                let length = usize::from(u16::from_be_bytes([wire[at + 3], wire[at + 4]]));
                received.extend(s.peer_reads(&wire[at..at + HEADER + length]));
                at += HEADER + length;
            }
            assert!(received == data, "{suite:?}");
            assert!(
                matches!(s.peer.reader().read(&mut [0; 1]), Ok(0)),
                "{suite:?}: close_notify is a clean end"
            );
        }
    }

    /// A record sealed with `keys` as the peer would, its inner plaintext as given (content,
    /// type, padding).
    fn record_sealed_with(keys: &mut Keys, inner: &[u8]) -> Vec<u8> {
        let length = u16::try_from(inner.len() + TAG).unwrap().to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, length[0], length[1]];
        let mut body = inner.to_vec();
        let nonce = keys.next_nonce();
        keys.key
            .seal_in_place_append_tag(nonce, Aad::from(header), &mut body)
            .unwrap();
        [&header[..], &body].concat()
    }

    #[test]
    fn padding_is_taken_off_and_counts_towards_the_plaintext_limit() {
        let (client, server) = in_memory::configs(SUITES[0]);
        let session = in_memory::handshake(
            in_memory::server(server),
            &mut in_memory::peer_client(client),
        );
        let (sequence, secrets) = session.secrets.rx;
        let mut opener = Opener::new(sequence, &secrets).unwrap();
        let mut peer = Keys::new(sequence, &secrets).unwrap();
        let mut after = AfterHandshake::new(session.schedule);
        let mut padded = b"hi".to_vec();
        padded.push(APPLICATION_DATA);
        padded.resize(2 + 1 + 100, 0);
        let mut wire = record_sealed_with(&mut peer, &padded);
        let opened = opener.open(&mut wire, &mut after).unwrap();
        assert_eq!(&wire[..opened.plaintext], b"hi");
        // Content, type and padding over 2^14 + 1 bytes, however little of it is content.
        padded.resize(MAX_FRAGMENT + 2, 0);
        let mut wire = record_sealed_with(&mut peer, &padded);
        let error = opener.open(&mut wire, &mut after).unwrap_err();
        assert!(error.to_string().contains("longer than 2^14"), "{error}");
    }

    #[test]
    fn a_tampered_record_is_refused() {
        let mut s = Session::server(SUITES[0]);
        let mut wire = peer_records(&mut s.peer, b"hello");
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let error = s.open(wire).unwrap_err();
        assert!(error.to_string().contains("authentication"), "{error}");
    }

    #[test]
    fn a_fatal_alert_ends_the_connection() {
        let mut s = Session::server(SUITES[0]);
        // handshake_failure, sealed with the keys that open it.
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: [7u8; 32].into(),
            iv: [9u8; 12].into(),
        };
        let mut sealer = Sealer::new(0, &secrets, u64::MAX).unwrap();
        let mut opener = Opener::new(0, &secrets).unwrap();
        sealer.seal(APPLICATION_DATA, b"x", &mut s.after).unwrap();
        sealer.seal(ALERT, &[2, 40], &mut s.after).unwrap();
        let mut wire = sealer.records().to_vec();
        let error = opener.open(&mut wire, &mut s.after).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted, "{error}");
        assert_eq!(error.to_string(), "peer sent TLS alert HandshakeFailure");
    }

    #[test]
    fn garbage_is_refused_without_waiting_for_more() {
        let mut s = Session::server(SUITES[0]);
        let error = s.open(b"GET / HTTP/1.1".to_vec()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let huge = [APPLICATION_DATA, 3, 3, 0xff, 0xff];
        assert!(s.open(huge.to_vec()).is_err());
        // A record's start is held, waiting for the rest.
        let mut start = vec![APPLICATION_DATA, 3, 3, 0, 40, 1, 2];
        let opened = s.opener.open(&mut start, &mut s.after).unwrap();
        assert_eq!((opened.consumed, opened.plaintext), (0, 0));
    }

    /// An in-memory socket: reads take what the test put in `incoming`, writes land in
    /// `outgoing`.
    #[derive(Default)]
    struct Wire {
        incoming: RefCell<Vec<u8>>,
        outgoing: RefCell<Vec<u8>>,
        /// Writes never finish.
        stalled: std::cell::Cell<bool>,
        /// Writes fail.
        broken: std::cell::Cell<bool>,
    }

    impl Stream for std::rc::Rc<Wire> {
        async fn read(&self, mut buf: Vec<u8>) -> BufResult<usize> {
            let mut incoming = self.incoming.borrow_mut();
            let n = incoming.len().min(buf.capacity() - buf.len());
            buf.extend(incoming.drain(..n));
            (Ok(n), buf)
        }
        async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> BufResult<()> {
            if self.stalled.get() {
                std::future::pending::<()>().await;
            }
            if self.broken.get() {
                return (Err(io::ErrorKind::BrokenPipe.into()), buf);
            }
            self.outgoing.borrow_mut().extend_from_slice(&buf[range]);
            (Ok(()), buf)
        }
        fn shutdown(&self, _how: Shutdown) -> io::Result<()> {
            Ok(())
        }
    }

    /// Tern's side of `s` as a [`UserTls`] over an in-memory socket.
    fn over_wire(
        s: Session,
    ) -> (
        UserTls<std::rc::Rc<Wire>>,
        std::rc::Rc<Wire>,
        rustls::Connection,
    ) {
        let socket = std::rc::Rc::new(Wire::default());
        let mut opener = s.opener;
        let mut after = s.after;
        let leftover = Leftover::open(&mut opener, &mut after, s.leftover).unwrap();
        let tls = UserTls::new(socket.clone(), opener, s.sealer, after, leftover);
        (tls, socket, s.peer)
    }

    #[test]
    fn writes_reach_the_peer_in_order_and_a_burst_gives_its_buffer_back() {
        for suite in SUITES {
            let (tls, socket, mut peer) = over_wire(Session::server(suite));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let burst = pattern(300 * 1024);
            let (written, _) = runtime.block_on(tls.write_all(burst.clone(), 0..burst.len()));
            written.unwrap();
            let after_burst = tls.sending.try_lock().unwrap().out.len();
            assert!(
                after_burst >= WRITE_BATCH,
                "{suite:?}: the burst's records were built in one buffer"
            );
            for small in [&b"small"[..], b"and smaller"] {
                let (written, _) = runtime.block_on(tls.write_all(small.to_vec(), 0..small.len()));
                written.unwrap();
            }
            let kept = tls.sending.try_lock().unwrap().out.len();
            assert!(
                kept <= 2 * FIRST_READ,
                "{suite:?}: {kept} bytes kept after small writes"
            );

            let wire = std::mem::take(&mut *socket.outgoing.borrow_mut());
            let mut received = Vec::new();
            let mut at = 0;
            while at < wire.len() {
                let length = usize::from(u16::from_be_bytes([wire[at + 3], wire[at + 4]]));
                deliver(&mut peer, &wire[at..at + HEADER + length]);
                peer.reader().read_to_end(&mut received).unwrap_or_default();
                at += HEADER + length;
            }
            assert_eq!(received.len(), burst.len() + 16, "{suite:?}");
            assert!(received[..burst.len()] == burst[..], "{suite:?}");
            assert_eq!(&received[burst.len()..], b"smalland smaller", "{suite:?}");
        }
    }

    #[test]
    fn a_write_abandoned_or_failed_mid_send_stops_the_sender() {
        for abandoned in [true, false] {
            let (tls, socket, _peer) = over_wire(Session::server(SUITES[0]));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            if abandoned {
                socket.stalled.set(true);
                runtime.block_on(async {
                    tokio::select! {
                        biased;
                        _ = tls.write_all(b"lost".to_vec(), 0..4) => panic!("a stalled write finished"),
                        _ = tokio::task::yield_now() => {}
                    }
                });
                socket.stalled.set(false);
            } else {
                socket.broken.set(true);
                let (written, _) = runtime.block_on(tls.write_all(b"lost".to_vec(), 0..4));
                assert!(written.is_err());
                socket.broken.set(false);
            }
            // The lost records took sequence numbers the peer never saw: what follows could
            // not be opened, so it is not sent.
            let (written, _) = runtime.block_on(tls.write_all(b"next".to_vec(), 0..4));
            let error = written.unwrap_err();
            assert!(
                error.to_string().contains("nothing more is sent"),
                "{abandoned}: {error}"
            );
            assert!(socket.outgoing.borrow().is_empty(), "{abandoned}");
        }
    }

    #[test]
    fn a_refused_record_is_answered_with_the_alert_that_says_why_and_nothing_after() {
        let tampered = |peer: &mut rustls::Connection| {
            let mut wire = peer_records(peer, b"hello");
            let last = wire.len() - 1;
            wire[last] ^= 1;
            wire
        };
        let oversized = |_: &mut rustls::Connection| vec![APPLICATION_DATA, 3, 3, 0xff, 0xff];
        let plaintext = |_: &mut rustls::Connection| b"GET / HTTP/1.1\r\n".to_vec();
        type Wire = fn(&mut rustls::Connection) -> Vec<u8>;
        let cases: [(Wire, rustls::AlertDescription); 3] = [
            (tampered, rustls::AlertDescription::BadRecordMac),
            (oversized, rustls::AlertDescription::RecordOverflow),
            (plaintext, rustls::AlertDescription::UnexpectedMessage),
        ];
        for (sent, alert) in cases {
            let (tls, socket, mut peer) = over_wire(Session::server(SUITES[0]));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            *socket.incoming.borrow_mut() = sent(&mut peer);
            let (read, _) = runtime.block_on(tls.read(Vec::new()));
            assert_eq!(read.unwrap_err().kind(), io::ErrorKind::InvalidData);
            let wire = std::mem::take(&mut *socket.outgoing.borrow_mut());
            peer.read_tls(&mut &wire[..]).unwrap();
            assert_eq!(
                peer.process_new_packets().unwrap_err(),
                rustls::Error::AlertReceived(alert)
            );
            // Nothing is sent after a fatal alert.
            let (written, _) = runtime.block_on(tls.write_all(b"more".to_vec(), 0..4));
            assert!(written.is_err());
            assert!(socket.outgoing.borrow().is_empty());
        }
        // A peer that reads nothing does not hold the refusal up.
        let (tls, socket, mut peer) = over_wire(Session::server(SUITES[0]));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        socket.stalled.set(true);
        *socket.incoming.borrow_mut() = tampered(&mut peer);
        let (read, _) = runtime.block_on(tls.read(Vec::new()));
        assert!(read.is_err());
    }

    #[test]
    fn a_key_update_from_the_peer_is_followed_and_answered_before_the_next_write() {
        for suite in SUITES {
            let mut s = Session::server(suite);
            let mut wire = peer_records(&mut s.peer, b"before");
            // rustls asks for an update in return.
            s.peer.refresh_traffic_keys().unwrap();
            wire.extend(sent_by(&mut s.peer));
            wire.extend(peer_records(&mut s.peer, b"after"));

            let socket = std::rc::Rc::new(Wire::default());
            *socket.incoming.borrow_mut() = wire;
            let leftover = Leftover::open(&mut s.opener, &mut s.after, Vec::new()).unwrap();
            let tls = UserTls::new(socket.clone(), s.opener, s.sealer, s.after, leftover);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let mut received = Vec::new();
            while received.len() < 11 {
                let (read, buf) = runtime.block_on(tls.read(Vec::with_capacity(64 * 1024)));
                assert!(read.unwrap() > 0, "{suite:?}");
                received.extend(buf);
            }
            assert_eq!(received, b"beforeafter", "{suite:?}");
            assert!(tls.after.borrow().owes_key_update(), "{suite:?}");

            let (written, _) = runtime.block_on(tls.write_all(b"reply".to_vec(), 0..5));
            written.unwrap();
            assert!(!tls.after.borrow().owes_key_update());
            let wire = std::mem::take(&mut *socket.outgoing.borrow_mut());
            // The KeyUpdate record, then the data under the new keys.
            assert!(wire.len() > 2 * (HEADER + TAG), "{suite:?}");
            let mut peer = s.peer;
            deliver(&mut peer, &wire);
            let mut reply = [0; 5];
            peer.reader().read_exact(&mut reply).unwrap();
            assert_eq!(&reply, b"reply", "{suite:?}");
        }
    }

    #[test]
    fn the_sender_updates_its_keys_before_the_confidentiality_limit() {
        let mut s = Session::server(SUITES[0]);
        s.sealer.limit = s.sealer.keys.sequence + 3;
        let data = pattern(10 * 100);
        for record in data.chunks(100) {
            s.sealer
                .seal(APPLICATION_DATA, record, &mut s.after)
                .unwrap();
        }
        let wire = s.sealer.records().to_vec();
        let records = {
            let (mut count, mut at) = (0, 0);
            while at < wire.len() {
                at += HEADER + usize::from(u16::from_be_bytes([wire[at + 3], wire[at + 4]]));
                count += 1;
            }
            count
        };
        // Ten of data; each set of keys seals two of them and a KeyUpdate.
        assert_eq!(records, 10 + 4);
        assert!(s.sealer.keys.sequence < 3);
        assert_eq!(s.peer_reads(&wire), data);
    }

    #[test]
    fn a_session_ticket_from_the_server_goes_to_rustls() {
        let (client, mut server) = in_memory::configs(SUITES[1]);
        server.send_tls13_tickets = 2;
        let mut s = Session::new(in_memory::client(client), in_memory::peer_server(server));
        // The tickets follow the server's handshake; application data follows them.
        let mut wire = std::mem::take(&mut s.leftover);
        wire.extend(peer_records(&mut s.peer, b"hello"));
        let (plaintext, opened) = s.open(wire).unwrap();
        assert_eq!(plaintext, b"hello");
        assert!(!opened.keys_updated);
    }

    #[test]
    fn post_handshake_messages_out_of_place_are_refused() {
        let server = || AfterHandshake::new(Session::server(SUITES[0]).after.schedule);
        let ticket = [NEW_SESSION_TICKET, 0, 0, 4, 0, 0, 0, 1];
        // Each refused with the alert RFC 8446 names for it (§4.6.3, §5.1, §6.2).
        let cases: [(&[u8], &str, u8); 7] = [
            (&ticket, "client sent a session ticket", UNEXPECTED_MESSAGE),
            (
                &[KEY_UPDATE, 0, 0, 1, 7],
                "neither yes nor no",
                ILLEGAL_PARAMETER,
            ),
            (&[KEY_UPDATE, 0, 0, 2, 0, 0], "malformed", DECODE_ERROR),
            (
                &[KEY_UPDATE, 0, 0, 1, 0, KEY_UPDATE, 0, 0, 1, 0],
                "end of its record",
                UNEXPECTED_MESSAGE,
            ),
            (
                &[KEY_UPDATE, 0, 0, 2, 0],
                "split across records",
                DECODE_ERROR,
            ),
            (&[KEY_UPDATE, 0], "split across records", DECODE_ERROR),
            // A CertificateRequest: post-handshake authentication is not offered.
            (
                &[13, 0, 0, 0],
                "unexpected TLS handshake message",
                UNEXPECTED_MESSAGE,
            ),
        ];
        let mut after = server();
        for (messages, expected, alert) in cases {
            let error = after.record(messages).unwrap_err();
            assert!(
                error.to_string().contains(expected),
                "{messages:?}: {error}"
            );
            assert_eq!(alert_for(&error), Some(alert), "{messages:?}");
        }
        // A KeyUpdate that asks for ours is owed until paid.
        let mut after = server();
        assert!(after.record(&[KEY_UPDATE, 0, 0, 1, 1]).unwrap());
        assert!(after.owes_key_update());
        after.paid_key_update();
        assert!(!after.owes_key_update());
        // A peer that sends KeyUpdates without end is refused, one with data between is not,
        // and empty data records between do not count as data.
        after.data(1);
        for _ in 0..MAX_POST_HANDSHAKE_RUN {
            assert!(after.record(&KEY_UPDATE_MESSAGE).unwrap());
            after.data(0);
        }
        let error = after.record(&KEY_UPDATE_MESSAGE).unwrap_err();
        assert!(error.to_string().contains("too many"), "{error}");
        after.data(1);
        assert!(after.record(&KEY_UPDATE_MESSAGE).unwrap());
    }
}
