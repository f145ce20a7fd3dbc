//! A throwaway certificate authority for tests: a self-signed root (ECDSA P-256) that issues
//! SPIFFE workload certificates, written as PEM files a proxy config can point at.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A test CA.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The root certificate, PEM.
    pub root_pem: String,
}

/// Where a proxy's identity files were written.
pub struct IdentityPaths {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// Trust bundle.
    pub trust_bundle: PathBuf,
}

impl IdentityPaths {
    /// The `identity:` block of a proxy config.
    pub fn yaml(&self) -> String {
        format!(
            "identity:\n  files:\n    cert: {}\n    key: {}\n    trust_bundle: {}\n",
            self.cert.display(),
            self.key.display(),
            self.trust_bundle.display()
        )
    }
}

impl TestCa {
    /// A new root.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let root = params.self_signed(&key).unwrap();
        TestCa {
            issuer: Issuer::new(params, key),
            root_pem: root.pem(),
        }
    }

    /// Writes this root and its key as PEM files under `dir` (for `tern-control --ca-cert`).
    pub fn write_root(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.root_pem).unwrap();
        std::fs::write(&key, self.issuer.key().serialize_pem()).unwrap();
        (cert, key)
    }

    /// Issues a workload certificate for `spiffe_id`, valid now (or, with `expired`, a
    /// certificate that expired in 2020).
    pub fn issue(&self, spiffe_id: &str, expired: bool) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Issues a certificate and writes it, its key and `trust` (root PEMs) under `dir`.
    pub fn write_identity(
        &self,
        dir: &Path,
        name: &str,
        spiffe_id: &str,
        trust: &[&TestCa],
        expired: bool,
    ) -> IdentityPaths {
        std::fs::create_dir_all(dir).unwrap();
        let (cert, key) = self.issue(spiffe_id, expired);
        let paths = IdentityPaths {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            trust_bundle: dir.join(format!("{name}-bundle.crt")),
        };
        std::fs::write(&paths.cert, cert).unwrap();
        std::fs::write(&paths.key, key).unwrap();
        let bundle: String = trust.iter().map(|ca| ca.root_pem.as_str()).collect();
        std::fs::write(&paths.trust_bundle, bundle).unwrap();
        paths
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates a fresh directory named after `label`.
    pub fn new(label: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tern-{label}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
