//! Kernel TLS (kTLS): after rustls finishes a handshake, the session's keys go to the kernel,
//! which then encrypts and decrypts records itself, so the proxy moves plaintext on the socket
//! and no record crosses into userspace.
//!
//! This module owns detecting kTLS ([`supported`], probed once per process), turning rustls'
//! extracted secrets into the kernel's key structures, and [`KernelTls`], the stream a
//! connection becomes after the hand-off. [`crate::tls::Handshake::into_record_layer`] decides per
//! connection whether to hand off; where it cannot (no kTLS in this kernel, a backend without
//! the socket calls, a record half-read at the end of the handshake), the connection runs
//! Tern's userspace record layer ([`crate::usertls`]) instead.
//!
//! After the hand-off, records other than application data surface as control records: an
//! alert `close_notify` is the end of the stream, any other alert an error; post-handshake
//! messages are handled as in userspace (`usertls::AfterHandshake`). A KeyUpdate
//! installs the next keys in the kernel, which takes them only where it can rekey a live
//! socket ([`can_rekey`]: Linux 6.14 and later; 6.1, say, cannot); a kernel that refuses ends
//! the connection with that error.
//!
//! The sender updates its own keys before the cipher's confidentiality limit (2^24 records
//! for AES-GCM), as the userspace layer does. The kernel numbers the records it seals;
//! `SentRecords` keeps an upper bound of them without a system call per send, and reads
//! the kernel's exact count only when the bound nears the limit.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::Shutdown;
use std::ops::Range;
use std::sync::OnceLock;

use rustls::ConnectionTrafficSecrets;

use crate::io::{BufResult, Stream};
use crate::sys::KtlsKeys;

use crate::usertls::{
    ALERT, APPLICATION_DATA, AfterHandshake, CLOSE_NOTIFY, HANDSHAKE, KEY_UPDATE_MESSAGE,
    MAX_FRAGMENT, peer_alert,
};

/// What this kernel's TLS can do, probed once per process.
#[derive(Debug, Clone, Copy)]
struct KernelAbilities {
    /// It has kTLS (the `tls` TCP upper-layer protocol).
    tls: bool,
    /// It takes new keys on a live kTLS socket (TLS 1.3 KeyUpdate).
    rekey: bool,
}

fn abilities() -> KernelAbilities {
    static ABILITIES: OnceLock<KernelAbilities> = OnceLock::new();
    *ABILITIES.get_or_init(|| match probe() {
        Ok(rekey) => {
            if let Err(error) = &rekey {
                tracing::info!(%error, "kernel TLS is available: mTLS records are handed to the kernel; it cannot update a live connection's keys, so a kTLS connection ends when its peer updates its keys or its own reach their limit");
            } else {
                tracing::info!(
                    "kernel TLS is available, key updates included: mTLS records are handed to the kernel"
                );
            }
            KernelAbilities {
                tls: true,
                rekey: rekey.is_ok(),
            }
        }
        Err(error) => {
            tracing::info!(%error, "kernel TLS is unavailable (no `tls` module?): mTLS records stay in userspace");
            KernelAbilities {
                tls: false,
                rekey: false,
            }
        }
    })
}

/// Whether this kernel offers kTLS (the `tls` TCP upper-layer protocol). Probed once.
pub fn supported() -> bool {
    abilities().tls
}

/// Whether this kernel takes new keys on a live kTLS socket, as a TLS 1.3 KeyUpdate needs
/// (Linux 6.14 and later). Probed once.
pub fn can_rekey() -> bool {
    abilities().rekey
}

/// On a throwaway loopback connection: attaches the TLS ULP (the error: no kTLS), then
/// installs sending keys twice (the inner error: no rekeying).
fn probe() -> io::Result<io::Result<()>> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let socket = std::os::fd::AsFd::as_fd(&client);
    crate::sys::attach_tls_ulp(socket)?;
    let rekey = build(Cipher::Aes128Gcm, &[0; 16], &[0; 12], 0)
        .ok_or_else(|| io::Error::other("probe keys"))
        .and_then(|keys| {
            crate::sys::install_ktls_keys(socket, libc::TLS_TX, &keys).map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("AES-128-GCM keys refused, so rekeying was not tried: {error}"),
                )
            })?;
            crate::sys::install_ktls_keys(socket, libc::TLS_TX, &keys)
        });
    Ok(rekey)
}

/// The kernel's key structure for one direction, from rustls' secrets and the next record
/// sequence number. `None` for a cipher the kernel interface does not cover.
pub fn keys(sequence: u64, secrets: &ConnectionTrafficSecrets) -> Option<KtlsKeys> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            build(Cipher::Aes128Gcm, key.as_ref(), iv.as_ref(), sequence)
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            build(Cipher::Aes256Gcm, key.as_ref(), iv.as_ref(), sequence)
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => build(
            Cipher::Chacha20Poly1305,
            key.as_ref(),
            iv.as_ref(),
            sequence,
        ),
        _ => None,
    }
}

/// The AEADs the kernel takes for TLS 1.3.
#[derive(Debug, Clone, Copy)]
enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// Lays out `key` and the 12-byte `iv` as the kernel wants them; `None` if a length is wrong.
fn build(cipher: Cipher, key: &[u8], iv: &[u8], sequence: u64) -> Option<KtlsKeys> {
    let rec_seq = sequence.to_be_bytes();
    // AES-GCM: the kernel takes the nonce's first 4 bytes as `salt`, the other 8 as `iv`.
    let (salt, nonce) = iv.split_at_checked(4)?;
    let info = |cipher_type| libc::tls_crypto_info {
        version: libc::TLS_1_3_VERSION,
        cipher_type,
    };
    Some(match cipher {
        Cipher::Aes128Gcm => KtlsKeys::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
            info: info(libc::TLS_CIPHER_AES_GCM_128),
            iv: nonce.try_into().ok()?,
            key: key.try_into().ok()?,
            salt: salt.try_into().ok()?,
            rec_seq,
        }),
        Cipher::Aes256Gcm => KtlsKeys::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
            info: info(libc::TLS_CIPHER_AES_GCM_256),
            iv: nonce.try_into().ok()?,
            key: key.try_into().ok()?,
            salt: salt.try_into().ok()?,
            rec_seq,
        }),
        // ChaCha20-Poly1305 takes the whole nonce as `iv`, and no salt.
        Cipher::Chacha20Poly1305 => {
            KtlsKeys::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                iv: iv.try_into().ok()?,
                key: key.try_into().ok()?,
                salt: [],
                rec_seq,
            })
        }
    })
}

/// A TLS connection whose record layer the kernel runs: reads and writes are plaintext on
/// the socket; plaintext rustls had already decrypted before the hand-off is read first.
pub struct KernelTls<S> {
    inner: S,
    /// Plaintext decrypted before the hand-off, not yet read.
    pending: RefCell<Vec<u8>>,
    /// The session after the handshake; borrowed only between awaits.
    after: RefCell<AfterHandshake>,
    /// The records sealed under the current sending keys (the writer's alone).
    sent: Cell<SentRecords>,
}

/// What the sender knows of the records the kernel has sealed under the current keys, to
/// update them before the cipher's confidentiality limit. Counting them exactly would cost
/// a system call per send, so this keeps an upper bound (a record holds at least one byte,
/// so a send of n bytes seals at most n records) and reads the kernel's exact count only
/// when the bound could reach the limit: for AES-GCM's 2^24 records, about once per 2 MiB
/// sent, since keys are updated at 7/8 of the limit (where the kernel can rekey).
#[derive(Debug, Clone, Copy)]
struct SentRecords {
    /// Records one key may protect.
    limit: u64,
    /// Records sealed at the last exact reading.
    known: u64,
    /// Records sealed since then, at most.
    unchecked: u64,
}

impl SentRecords {
    /// The count for keys that have sealed `sequence` records already.
    fn new(limit: u64, sequence: u64) -> SentRecords {
        SentRecords {
            limit,
            known: sequence,
            unchecked: 0,
        }
    }

    /// How many of `len` bytes one send may take: all of them unless the limit is smaller
    /// than twice that (test limits only).
    fn share(&self, len: usize) -> u64 {
        (len as u64).min(self.limit / 2)
    }

    /// Whether a send of `share` bytes might take the keys past their limit, one record
    /// kept for the KeyUpdate: then the exact count is needed.
    fn might_reach_limit(&self, share: u64) -> bool {
        self.known
            .saturating_add(self.unchecked)
            .saturating_add(share)
            .saturating_add(1)
            >= self.limit
    }

    /// With the exact count in `known`: whether the keys should be updated before sending
    /// `share` bytes (they are at 7/8 of their limit, or the send might pass it).
    fn should_update(&self, share: u64) -> bool {
        self.known >= self.limit - self.limit / 8 || self.might_reach_limit(share)
    }
}

impl<S: Stream> KernelTls<S> {
    /// Wraps a socket whose keys are installed, with the plaintext of records that arrived
    /// with the end of the handshake; `limit` is the records one sending key may protect,
    /// `sequence` how many the current one has (the kernel continues from there).
    pub(crate) fn new(
        inner: S,
        pending: Vec<u8>,
        after: AfterHandshake,
        limit: u64,
        sequence: u64,
    ) -> KernelTls<S> {
        KernelTls {
            inner,
            pending: RefCell::new(pending),
            after: RefCell::new(after),
            sent: Cell::new(SentRecords::new(limit, sequence)),
        }
    }

    fn socket(&self) -> io::Result<std::os::fd::BorrowedFd<'_>> {
        self.inner
            .kernel_tls_socket()
            .ok_or_else(|| io::Error::other("not a kernel-TLS socket"))
    }

    /// Installs the next keys of one direction (sequence numbers start again at zero).
    fn install_next_keys(&self, direction: libc::c_int) -> io::Result<()> {
        let mut after = self.after.borrow_mut();
        let secrets = if direction == libc::TLS_TX {
            after.next_tx()?
        } else {
            after.next_rx()?
        };
        let keys = keys(0, &secrets).ok_or_else(|| {
            io::Error::other("the updated TLS keys are not of the session's cipher")
        })?;
        crate::sys::install_ktls_keys(self.socket()?, direction, &keys).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("the kernel cannot take updated TLS keys (a KeyUpdate; this kernel cannot rekey a live TLS socket): {error}"),
            )
        })
    }

    /// Handles a post-handshake record's messages.
    fn post_handshake(&self, record: &[u8]) -> io::Result<()> {
        let keys_updated = self.after.borrow_mut().record(record)?;
        if keys_updated {
            self.install_next_keys(libc::TLS_RX)?;
        }
        Ok(())
    }

    /// Sends the KeyUpdate the peer asked for, if it did.
    async fn pay_key_update(&self) -> io::Result<()> {
        if self.after.borrow().owes_key_update() {
            self.update_keys().await?;
        }
        Ok(())
    }

    /// Sends a KeyUpdate and moves the kernel to the next sending keys. A KeyUpdate the peer
    /// asked for stays owed until both are done, so a write abandoned or failed in between
    /// sends nothing under the old keys as if it were paid.
    async fn update_keys(&self) -> io::Result<()> {
        if !can_rekey() {
            return Err(cannot_rekey());
        }
        self.inner
            .write_tls_record(HANDSHAKE, &KEY_UPDATE_MESSAGE)
            .await?;
        self.install_next_keys(libc::TLS_TX)?;
        self.after.borrow_mut().paid_key_update();
        self.sent.set(SentRecords::new(self.sent.get().limit, 0));
        Ok(())
    }

    /// Makes room under the current sending keys for a send of up to `len` bytes, updating
    /// them first if the send might take them past their limit, and returns how many of the
    /// bytes may go in this send (at most `len`). Where the kernel cannot update keys, they
    /// serve up to their limit, and then the connection ends with an error.
    async fn room_to_send(&self, len: usize) -> io::Result<usize> {
        let mut sent = self.sent.get();
        let share = sent.share(len);
        if sent.might_reach_limit(share) {
            sent.known = crate::sys::ktls_sequence(self.socket()?, libc::TLS_TX)?;
            sent.unchecked = 0;
            self.sent.set(sent);
            if can_rekey() && sent.should_update(share) {
                self.update_keys().await?;
                sent = self.sent.get();
            } else if sent.might_reach_limit(share) {
                return Err(cannot_rekey());
            }
        }
        sent.unchecked = sent.unchecked.saturating_add(share);
        self.sent.set(sent);
        // `share` is at most `len`.
        Ok(share as usize)
    }
}

/// Why a kTLS connection ends where the kernel cannot rekey.
fn cannot_rekey() -> io::Error {
    io::Error::other(
        "this connection's TLS sending keys must be updated (they near their confidentiality limit, or the peer asked) and this kernel cannot update a kTLS connection's keys (Linux 6.14 and later can): the connection ends",
    )
}

impl<S: Stream> KernelTls<S> {
    /// Reads the next record the ordinary way into the empty `pipe`, for a splice that could
    /// not take it: 0 for close_notify, an error for a truncation, else its data (not
    /// expected, but never lost).
    async fn read_into(&self, pipe: std::os::fd::BorrowedFd<'_>) -> io::Result<usize> {
        let (read, buf) = self.read(Vec::with_capacity(MAX_FRAGMENT)).await;
        let n = read?;
        if n > 0 {
            let written = rustix::io::write(pipe, &buf[..n])?;
            if written < n {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(n)
    }
}

impl<S: Stream> Stream for KernelTls<S> {
    async fn read(&self, mut buf: Vec<u8>) -> BufResult<usize> {
        {
            let mut pending = self.pending.borrow_mut();
            if !pending.is_empty() {
                if buf.len() == buf.capacity() {
                    buf.reserve(buf.capacity().max(4096));
                }
                let n = pending.len().min(buf.capacity() - buf.len());
                buf.extend(pending.drain(..n));
                return (Ok(n), buf);
            }
        }
        let start = buf.len();
        // A control record (an alert, a KeyUpdate, a ticket) longer than the room it is read
        // into would come in parts, each looking whole: room for the largest one.
        if buf.capacity() - buf.len() < MAX_FRAGMENT {
            buf.reserve(MAX_FRAGMENT);
        }
        loop {
            let (read, back) = self.inner.read_tls_record(buf).await;
            buf = back;
            let (n, record_type) = match read {
                Ok(read) => read,
                Err(error) => return (Err(error), buf),
            };
            if record_type == APPLICATION_DATA {
                if n > 0 {
                    self.after.borrow_mut().data(n);
                    return (Ok(n), buf);
                }
                // End of stream without close_notify: a truncation attack or a crash.
                let error = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed without TLS close_notify",
                );
                return (Err(error), buf);
            }
            // A control record: take it out of the caller's buffer.
            let record = buf[start..].to_vec();
            buf.truncate(start);
            let error = match record_type {
                // close_notify: a clean end of stream.
                ALERT if record.len() == 2 && record[1] == 0 => return (Ok(0), buf),
                ALERT => peer_alert(&record),
                // Nothing for the caller: read the next record.
                HANDSHAKE => match self.post_handshake(&record) {
                    Ok(()) => continue,
                    Err(error) => error,
                },
                other => io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected TLS record type {other}"),
                ),
            };
            return (Err(error), buf);
        }
    }

    async fn write_all(&self, mut buf: Vec<u8>, range: Range<usize>) -> BufResult<()> {
        if let Err(error) = self.pay_key_update().await {
            return (Err(error), buf);
        }
        let mut start = range.start;
        // One send unless the limit is tiny.
        while start < range.end {
            let n = match self.room_to_send(range.end - start).await {
                Ok(n) => n,
                Err(error) => return (Err(error), buf),
            };
            let (written, back) = self.inner.write_all(buf, start..start + n).await;
            buf = back;
            if let Err(error) = written {
                return (Err(error), buf);
            }
            start += n;
        }
        (Ok(()), buf)
    }

    fn has_input(&self) -> bool {
        !self.pending.borrow().is_empty() || self.inner.has_input()
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
        self.pay_key_update().await?;
        self.room_to_send(1).await?;
        self.inner.write_tls_record(ALERT, &CLOSE_NOTIFY).await?;
        self.inner.shutdown(Shutdown::Write)
    }

    fn can_splice(&self) -> bool {
        self.pending.borrow().is_empty() && self.inner.can_splice()
    }

    async fn splice_to_pipe(
        &self,
        pipe: std::os::fd::BorrowedFd<'_>,
        len: usize,
    ) -> io::Result<usize> {
        match self.inner.splice_to_pipe(pipe, len).await {
            // The kernel splices only application data; the next record is a control record
            // (close_notify, say): read it the ordinary way. Nothing spliced is the TCP end of
            // stream (or an empty record): also read the ordinary way, which tells
            // close_notify, a truncation and data apart.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.read_into(pipe).await,
            Ok(0) => self.read_into(pipe).await,
            result => result,
        }
    }

    async fn splice_from_pipe(
        &self,
        pipe: std::os::fd::BorrowedFd<'_>,
        len: usize,
    ) -> io::Result<usize> {
        self.pay_key_update().await?;
        let len = self.room_to_send(len).await?;
        self.inner.splice_from_pipe(pipe, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IV: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];

    #[test]
    fn keys_split_the_nonce_as_the_kernel_expects() {
        let Some(KtlsKeys::Aes128Gcm(info)) = build(Cipher::Aes128Gcm, &[7; 16], &IV, 0x0102)
        else {
            panic!("AES-128-GCM keys");
        };
        assert_eq!(info.info.version, libc::TLS_1_3_VERSION);
        assert_eq!(info.info.cipher_type, libc::TLS_CIPHER_AES_GCM_128);
        assert_eq!(info.salt, [0, 1, 2, 3]);
        assert_eq!(info.iv, [4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(info.key, [7; 16]);
        assert_eq!(info.rec_seq, [0, 0, 0, 0, 0, 0, 1, 2]);

        let Some(KtlsKeys::Aes256Gcm(info)) = build(Cipher::Aes256Gcm, &[9; 32], &IV, 1) else {
            panic!("AES-256-GCM keys");
        };
        assert_eq!(info.key, [9; 32]);
        assert_eq!(info.salt, [0, 1, 2, 3]);
        assert_eq!(info.rec_seq, [0, 0, 0, 0, 0, 0, 0, 1]);

        let Some(KtlsKeys::Chacha20Poly1305(info)) =
            build(Cipher::Chacha20Poly1305, &[5; 32], &IV, 2)
        else {
            panic!("ChaCha20-Poly1305 keys");
        };
        assert_eq!(info.iv, IV, "ChaCha20 takes the whole nonce");
        assert_eq!(info.info.cipher_type, libc::TLS_CIPHER_CHACHA20_POLY1305);
    }

    #[test]
    fn rustls_secrets_map_onto_the_kernel_structures() {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: [3u8; 32].into(),
            iv: IV.into(),
        };
        assert!(
            matches!(keys(5, &secrets), Some(KtlsKeys::Aes256Gcm(info)) if info.key == [3; 32])
        );
    }

    #[test]
    fn the_sender_reads_the_kernels_count_only_near_the_limit() {
        let mut sent = SentRecords::new(1 << 24, 0);
        // 16 KiB sends: the bound (a record per byte) reaches the limit after 1023 of them.
        for _ in 0..1023 {
            let share = sent.share(16 * 1024);
            assert_eq!(share, 16 * 1024);
            assert!(!sent.might_reach_limit(share));
            sent.unchecked += share;
        }
        assert!(sent.might_reach_limit(16 * 1024));
        // The kernel says 1023 records: far from the limit, the bound starts again.
        sent.known = 1023;
        sent.unchecked = 0;
        assert!(!sent.should_update(16 * 1024));
        // At 7/8 of the limit the keys are updated, whatever the send.
        sent.known = (1 << 24) - (1 << 21);
        assert!(sent.should_update(1));
        assert!(
            !SentRecords {
                known: (1 << 24) - (1 << 21) - 1,
                ..sent
            }
            .should_update(1)
        );
    }

    #[test]
    fn a_send_never_takes_the_keys_past_their_limit() {
        // A tiny limit (tests lower it): a send may take half of it at most, and one record
        // is always kept for the KeyUpdate.
        let sent = SentRecords::new(64, 0);
        assert_eq!(sent.share(1000), 32);
        assert_eq!(sent.share(12), 12);
        let sent = SentRecords {
            known: 30,
            unchecked: 0,
            ..sent
        };
        assert!(sent.might_reach_limit(33));
        assert!(sent.should_update(33), "30 + 33 + the KeyUpdate reach 64");
        assert!(!sent.should_update(32));
        // Records sealed before the hand-off count.
        assert!(SentRecords::new(64, 40).might_reach_limit(23));
        // No limit to speak of (ChaCha20-Poly1305): never a reading.
        let sent = SentRecords {
            known: u64::MAX - 1,
            unchecked: u64::MAX,
            ..SentRecords::new(u64::MAX, 0)
        };
        assert!(sent.might_reach_limit(1), "saturates rather than wraps");
        assert!(!SentRecords::new(u64::MAX, 0).might_reach_limit(1 << 40));
    }

    #[test]
    fn wrong_lengths_are_refused_rather_than_truncated() {
        assert!(build(Cipher::Aes128Gcm, &[1; 32], &IV, 0).is_none());
        assert!(build(Cipher::Aes256Gcm, &[1; 16], &IV, 0).is_none());
        assert!(build(Cipher::Chacha20Poly1305, &[1; 32], &IV[..8], 0).is_none());
        assert!(build(Cipher::Aes128Gcm, &[1; 16], &IV[..2], 0).is_none());
    }
}
