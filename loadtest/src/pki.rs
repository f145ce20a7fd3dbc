//! Certificates for the peer proxies' mTLS pairs (HAProxy, nginx): a CA made for one run and
//! SPIFFE workload certificates issued by it, written as PEM files their configs point at.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A run's CA and the workload identities it issued.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    trust_domain: String,
}

impl Pki {
    /// Creates a CA under `dir` and issues one identity per workload name
    /// (`spiffe://<trust_domain>/ns/default/sa/<name>`).
    pub fn generate(dir: &Path, trust_domain: &str, workloads: &[&str]) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "tern-load run CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let root = ca.self_signed(&ca_key)?;
        std::fs::write(dir.join("ca.crt"), root.pem())?;
        let issuer = Issuer::new(ca, ca_key);
        let pki = Pki {
            dir: dir.to_owned(),
            trust_domain: trust_domain.to_owned(),
        };
        for name in workloads {
            let mut leaf = CertificateParams::new(Vec::<String>::new())?;
            // The URI SAN is the SPIFFE ID Tern checks; the DNS SAN lets HAProxy and nginx,
            // which cannot match URI SANs, verify the same certificates by name.
            leaf.subject_alt_names = vec![
                SanType::URI(pki.spiffe_id(name).as_str().try_into()?),
                SanType::DnsName(pki.dns_name(name).as_str().try_into()?),
            ];
            leaf.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let key = KeyPair::generate()?;
            let cert = leaf.signed_by(&key, &issuer)?;
            std::fs::write(dir.join(format!("{name}.crt")), cert.pem())?;
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
            // HAProxy takes certificate and key in one file.
            std::fs::write(
                dir.join(format!("{name}.pem")),
                format!("{}{}", cert.pem(), key.serialize_pem()),
            )?;
        }
        Ok(pki)
    }

    /// The SPIFFE ID of a workload.
    pub fn spiffe_id(&self, name: &str) -> String {
        format!("spiffe://{}/ns/default/sa/{name}", self.trust_domain)
    }

    /// The DNS name in a workload's certificate.
    pub fn dns_name(&self, name: &str) -> String {
        format!("{name}.{}", self.trust_domain)
    }

    /// The directory holding `ca.crt` and `<name>.{crt,key,pem}`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
