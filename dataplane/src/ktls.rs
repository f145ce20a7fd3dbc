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
//! messages are handled as in userspace ([`AfterHandshake`]). A KeyUpdate
//! installs the next keys in the kernel, which takes them only where it can rekey a live
//! socket (recent kernels; Linux 6.1, the VM test's, cannot); a kernel that refuses ends the
//! connection with that error.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::ops::Range;
use std::sync::OnceLock;

use rustls::ConnectionTrafficSecrets;

use crate::io::{BufResult, Stream};
use crate::sys::KtlsKeys;

use crate::usertls::{
    ALERT, APPLICATION_DATA, AfterHandshake, CLOSE_NOTIFY, HANDSHAKE, KEY_UPDATE_MESSAGE,
    MAX_FRAGMENT,
};

/// Whether this kernel offers kTLS (the `tls` TCP upper-layer protocol). Probed once.
pub fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| match probe() {
        Ok(()) => {
            tracing::info!("kernel TLS is available: mTLS records are handed to the kernel");
            true
        }
        Err(error) => {
            tracing::info!(%error, "kernel TLS is unavailable (no `tls` module?): mTLS records stay in userspace");
            false
        }
    })
}

/// Attaches the TLS ULP to a throwaway loopback connection.
fn probe() -> io::Result<()> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    crate::sys::attach_tls_ulp(std::os::fd::AsFd::as_fd(&client))
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
}

impl<S: Stream> KernelTls<S> {
    /// Wraps a socket whose keys are installed, with the plaintext of records that arrived
    /// with the end of the handshake.
    pub(crate) fn new(inner: S, pending: Vec<u8>, after: AfterHandshake) -> KernelTls<S> {
        KernelTls {
            inner,
            pending: RefCell::new(pending),
            after: RefCell::new(after),
        }
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
        let socket = self
            .inner
            .kernel_tls_socket()
            .ok_or_else(|| io::Error::other("not a kernel-TLS socket"))?;
        crate::sys::install_ktls_keys(socket, direction, &keys).map_err(|error| {
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

    /// Sends the KeyUpdate the peer asked for, if it did, and moves to the next keys. It is
    /// owed until both are done, so a write abandoned or failed in between sends nothing
    /// under the old keys as if it were paid.
    async fn pay_key_update(&self) -> io::Result<()> {
        if self.after.borrow().owes_key_update() {
            self.inner
                .write_tls_record(HANDSHAKE, &KEY_UPDATE_MESSAGE)
                .await?;
            self.install_next_keys(libc::TLS_TX)?;
            self.after.borrow_mut().paid_key_update();
        }
        Ok(())
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
        loop {
            let (read, back) = self.inner.read_tls_record(buf).await;
            buf = back;
            let (n, record_type) = match read {
                Ok(read) => read,
                Err(error) => return (Err(error), buf),
            };
            if record_type == APPLICATION_DATA {
                if n > 0 {
                    self.after.borrow_mut().data();
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
                ALERT if record.get(1) == Some(&0) => return (Ok(0), buf),
                ALERT => io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("peer sent TLS alert {record:?}"),
                ),
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

    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> BufResult<()> {
        if let Err(error) = self.pay_key_update().await {
            return (Err(error), buf);
        }
        self.inner.write_all(buf, range).await
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.shutdown(how)
    }

    async fn close_write(&self) -> io::Result<()> {
        self.pay_key_update().await?;
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
            // (close_notify, say): read it the ordinary way.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let (read, buf) = self.read(Vec::with_capacity(MAX_FRAGMENT)).await;
                let n = read?;
                if n > 0 {
                    // Not expected, but never lose bytes: the empty pipe takes a record.
                    let written = rustix::io::write(pipe, &buf[..n])?;
                    if written < n {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                }
                Ok(n)
            }
            result => result,
        }
    }

    async fn splice_from_pipe(
        &self,
        pipe: std::os::fd::BorrowedFd<'_>,
        len: usize,
    ) -> io::Result<usize> {
        self.pay_key_update().await?;
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
    fn wrong_lengths_are_refused_rather_than_truncated() {
        assert!(build(Cipher::Aes128Gcm, &[1; 32], &IV, 0).is_none());
        assert!(build(Cipher::Aes256Gcm, &[1; 16], &IV, 0).is_none());
        assert!(build(Cipher::Chacha20Poly1305, &[1; 32], &IV[..8], 0).is_none());
        assert!(build(Cipher::Aes128Gcm, &[1; 16], &IV[..2], 0).is_none());
    }
}
