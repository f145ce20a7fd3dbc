use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};

use super::*;

/// A token validity for tests that are not about expiry.
const DAY: Duration = Duration::from_secs(24 * 3600);

struct Dir(PathBuf);

impl Dir {
    fn new(label: &str) -> Dir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tern-ca-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options(dir: &Path) -> CaOptions {
    CaOptions {
        state_dir: dir.to_owned(),
        trust_domain: "mesh.test".into(),
        workload_lifetime: Duration::from_secs(3600),
        ca_cert: None,
        ca_key: None,
        extra_roots: None,
    }
}

fn csr(uris: &[&str], key: &KeyPair) -> Vec<u8> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    // A CSR may ask for anything; the CA must ignore all but the key and the URI SAN.
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.serialize_request(key).unwrap().der().to_vec()
}

const WEB: &str = "spiffe://mesh.test/ns/shop/sa/web";

#[test]
fn a_valid_request_gets_a_short_lived_leaf_for_the_proven_identity_only() {
    let dir = Dir::new("valid");
    let ca = Authority::open(&options(&dir.0)).unwrap();
    let id: SpiffeId = WEB.parse().unwrap();
    let key = KeyPair::generate().unwrap();
    let issued = ca
        .certify(&csr(&[WEB], &key), Credential::Token(&ca.token(&id, DAY)))
        .unwrap();
    assert_eq!(issued.id, id);
    assert_eq!(
        issued.chain.len(),
        1,
        "the root signs directly: no intermediates"
    );
    assert_eq!(issued.trust_bundle.len(), 1);

    let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(&issued.trust_bundle[0]).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(leaf.issuer(), root.subject());
    assert!(
        !leaf.is_ca(),
        "the CSR asked for CA; the CA must not grant it"
    );
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        rcgen::PublicKeyData::der_bytes(&key),
        "the certificate is for the proxy's own key"
    );
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(lifetime, 3600 + 60, "lifetime plus clock-skew slack");
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        format!("[URI({WEB:?})]")
    );
}

#[test]
fn the_root_and_token_key_persist_across_restarts() {
    let dir = Dir::new("persist");
    let first = Authority::open(&options(&dir.0)).unwrap();
    let token = first.token(&WEB.parse().unwrap(), DAY);
    let second = Authority::open(&options(&dir.0)).unwrap();
    assert_eq!(first.trust_bundle(), second.trust_bundle());
    assert_eq!(second.verify_token(&token).unwrap().to_string(), WEB);
    let mode = std::fs::metadata(dir.0.join("ca.key"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077,
        0,
        "the root key is private"
    );
}

#[test]
fn credentials_are_checked_against_the_requested_identity() {
    let dir = Dir::new("tokens");
    let other_dir = Dir::new("tokens-other");
    let ca = Authority::open(&options(&dir.0)).unwrap();
    let other_ca = Authority::open(&options(&other_dir.0)).unwrap();
    let key = KeyPair::generate().unwrap();
    let request = csr(&[WEB], &key);
    let db: SpiffeId = "spiffe://mesh.test/ns/shop/sa/db".parse().unwrap();

    let denied = ca
        .certify(&request, Credential::Token(&ca.token(&db, DAY)))
        .unwrap_err();
    assert!(
        matches!(&denied, CertifyError::Denied { proven, requested } if proven == &db.to_string() && requested == WEB),
        "{denied:?}"
    );
    for garbage in [
        "",
        "tern1",
        "tern1.a.b",
        "tern1.a.b.c",
        "Bearer xyz",
        "\u{0}\u{1}",
    ] {
        assert!(
            matches!(
                ca.certify(&request, Credential::Token(garbage)),
                Err(CertifyError::Unauthenticated(_))
            ),
            "{garbage:?}"
        );
    }
    // A token minted by another CA, and one whose identity was edited, are both forged.
    let foreign = other_ca.token(&WEB.parse().unwrap(), DAY);
    assert!(matches!(
        ca.certify(&request, Credential::Token(&foreign)),
        Err(CertifyError::Unauthenticated(_))
    ));
    // A token whose identity or expiry was edited is forged.
    let db_token = ca.token(&db, DAY);
    let parts: Vec<&str> = db_token.split('.').collect();
    let (expires, tag) = (parts[2], parts[3]);
    let edited = format!("tern2.{}.{expires}.{tag}", URL_SAFE_NO_PAD.encode(WEB));
    assert!(matches!(
        ca.certify(&request, Credential::Token(&edited)),
        Err(CertifyError::Unauthenticated(_))
    ));
    let web_token = ca.token(&WEB.parse().unwrap(), DAY);
    let parts: Vec<&str> = web_token.split('.').collect();
    let later = format!("tern2.{}.{}.{}", parts[1], u64::MAX, parts[3]);
    assert!(matches!(
        ca.certify(&request, Credential::Token(&later)),
        Err(CertifyError::Unauthenticated(_))
    ));
    assert!(ca.certify(&request, Credential::Token(&web_token)).is_ok());
}

#[test]
fn a_token_proves_its_identity_only_until_it_expires() {
    let dir = Dir::new("token-expiry");
    let ca = Authority::open(&options(&dir.0)).unwrap();
    let web: SpiffeId = WEB.parse().unwrap();
    let token = ca.token(&web, Duration::from_secs(1));
    assert_eq!(ca.verify_token(&token), Ok(web.clone()));
    std::thread::sleep(Duration::from_millis(2100));
    let expired = ca.verify_token(&token).unwrap_err();
    assert!(
        matches!(&expired, CertifyError::Unauthenticated(why) if why.contains("expired")),
        "{expired}"
    );
    // A token of the first format, which never expired, is refused with what to do.
    let old = format!("tern1.{}.AAAA", URL_SAFE_NO_PAD.encode(WEB));
    let refused = ca.verify_token(&old).unwrap_err();
    assert!(
        refused.to_string().contains("tern-control token"),
        "{refused}"
    );
}

#[test]
fn a_mesh_certificate_proves_its_identity_for_a_renewal() {
    let dir = Dir::new("renewal");
    let ca = Authority::open(&options(&dir.0)).unwrap();
    let key = KeyPair::generate().unwrap();
    let web: SpiffeId = WEB.parse().unwrap();
    let first = ca
        .certify(&csr(&[WEB], &key), Credential::Token(&ca.token(&web, DAY)))
        .unwrap();
    let leaf = &first.chain[0];
    assert_eq!(ca.prove(Credential::Certificate(leaf)), Ok(web));
    // The renewal: a new key, proven by the certificate alone.
    let renewed = ca
        .certify(
            &csr(&[WEB], &KeyPair::generate().unwrap()),
            Credential::Certificate(leaf),
        )
        .unwrap();
    assert_eq!(renewed.id.to_string(), WEB);
    // It proves its own identity only.
    let other = "spiffe://mesh.test/ns/shop/sa/db";
    assert!(matches!(
        ca.certify(&csr(&[other], &key), Credential::Certificate(leaf)),
        Err(CertifyError::Denied { .. })
    ));
    // An expired certificate proves nothing (a resumed TLS session skips the handshake's
    // check of it).
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(WEB.try_into().unwrap())];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let expired = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
    let refused = ca
        .prove(Credential::Certificate(expired.der()))
        .unwrap_err();
    assert!(refused.to_string().contains("validity period"), "{refused}");
    // A certificate of another trust domain, or with no SPIFFE ID, proves nothing.
    for (sans, label) in [
        (
            vec![SanType::URI(
                "spiffe://elsewhere/ns/shop/sa/web".try_into().unwrap(),
            )],
            "another trust domain",
        ),
        (
            vec![SanType::DnsName("web.shop".try_into().unwrap())],
            "a DNS name",
        ),
    ] {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let cert = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        assert!(
            matches!(
                ca.prove(Credential::Certificate(cert.der())),
                Err(CertifyError::Unauthenticated(_))
            ),
            "{label}"
        );
    }
}

#[test]
fn malformed_requests_are_invalid_arguments() {
    let dir = Dir::new("malformed");
    let ca = Authority::open(&options(&dir.0)).unwrap();
    let token = ca.token(&WEB.parse().unwrap(), DAY);
    let p256 = KeyPair::generate().unwrap();
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"not a CSR".to_vec()),
        ("empty", Vec::new()),
        ("P-384 key", csr(&[WEB], &p384)),
        ("no URI SAN", csr(&[], &p256)),
        (
            "two URI SANs",
            csr(&[WEB, "spiffe://mesh.test/ns/shop/sa/db"], &p256),
        ),
        (
            "other trust domain",
            csr(&["spiffe://evil.test/ns/shop/sa/web"], &p256),
        ),
        ("not SPIFFE", csr(&["https://example.com/"], &p256)),
    ];
    for (what, request) in cases {
        assert!(
            matches!(
                ca.certify(&request, Credential::Token(&token)),
                Err(CertifyError::Invalid(_))
            ),
            "{what}"
        );
    }
    // A CSR whose signature does not match its key: flip a byte of the signature.
    let mut forged = csr(&[WEB], &p256);
    let last = forged.len() - 1;
    forged[last] ^= 0x01;
    assert!(matches!(
        ca.certify(&forged, Credential::Token(&token)),
        Err(CertifyError::Invalid(_))
    ));
}

/// An organisation's root, and a mesh intermediate it signs that expires `lifetime` from
/// now (negative: expired) with its key.
fn root_and_intermediate(
    lifetime: time::Duration,
) -> (rcgen::Certificate, rcgen::Certificate, KeyPair) {
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.distinguished_name.push(DnType::CommonName, "org root");
    let root_cert = root.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root, root_key);
    let inter_key = KeyPair::generate().unwrap();
    let mut inter = CertificateParams::new(Vec::<String>::new()).unwrap();
    inter.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    inter
        .distinguished_name
        .push(DnType::CommonName, "mesh intermediate");
    let now = time::OffsetDateTime::now_utc();
    inter.not_before = now - time::Duration::days(30);
    inter.not_after = now + lifetime;
    let inter_cert = inter.signed_by(&inter_key, &root_issuer).unwrap();
    (root_cert, inter_cert, inter_key)
}

#[test]
fn an_operator_intermediate_signs_and_its_root_and_extra_roots_form_the_bundle() {
    let dir = Dir::new("intermediate");
    std::fs::create_dir_all(&dir.0).unwrap();
    let (root_cert, inter_cert, inter_key) = root_and_intermediate(time::Duration::days(365));
    let old_root = rcgen::generate_simple_self_signed(vec!["old".into()]).unwrap();
    std::fs::write(dir.0.join("inter.crt"), inter_cert.pem()).unwrap();
    std::fs::write(dir.0.join("inter.key"), inter_key.serialize_pem()).unwrap();
    std::fs::write(
        dir.0.join("roots.crt"),
        format!("{}{}", root_cert.pem(), old_root.cert.pem()),
    )
    .unwrap();

    let mut opts = options(&dir.0.join("state"));
    opts.ca_cert = Some(dir.0.join("inter.crt"));
    opts.ca_key = Some(dir.0.join("inter.key"));
    let missing_root = Authority::open(&opts).unwrap_err();
    assert!(
        missing_root.to_string().contains("--extra-roots"),
        "{missing_root}"
    );
    opts.extra_roots = Some(dir.0.join("roots.crt"));
    let ca = Authority::open(&opts).unwrap();
    let key = KeyPair::generate().unwrap();
    let issued = ca
        .certify(
            &csr(&[WEB], &key),
            Credential::Token(&ca.token(&WEB.parse().unwrap(), DAY)),
        )
        .unwrap();
    assert_eq!(issued.chain.len(), 2, "leaf and intermediate");
    assert_eq!(issued.chain[1], *inter_cert.der());
    assert_eq!(issued.trust_bundle.len(), 2, "the root and the old root");
    assert_eq!(issued.trust_bundle[0], *root_cert.der());
    let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
    let (_, signer) = x509_parser::parse_x509_certificate(&issued.chain[1]).unwrap();
    leaf.verify_signature(Some(signer.public_key())).unwrap();
}

#[test]
fn bad_options_are_refused_with_a_reason() {
    let dir = Dir::new("options");
    let mut opts = options(&dir.0);
    opts.trust_domain = String::new();
    assert!(Authority::open(&opts).is_err());
    for lifetime in [Duration::from_secs(4), Duration::from_secs(100 * 24 * 3600)] {
        let mut opts = options(&dir.0);
        opts.workload_lifetime = lifetime;
        assert!(
            Authority::open(&opts)
                .unwrap_err()
                .to_string()
                .contains("lifetime"),
            "{lifetime:?}"
        );
    }
    let mut opts = options(&dir.0);
    opts.ca_cert = Some(dir.0.join("missing.crt"));
    opts.ca_key = Some(dir.0.join("missing.key"));
    assert!(
        Authority::open(&opts)
            .unwrap_err()
            .to_string()
            .contains("missing.crt")
    );
}

#[test]
fn the_key_itself_must_be_p256_whatever_the_signature_says() {
    let p256 = KeyPair::generate().unwrap();
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    assert!(has_p256_key(&csr(&[WEB], &p256)));
    assert!(!has_p256_key(&csr(&[WEB], &p384)));
    assert!(!has_p256_key(b"not a CSR"));
}

/// A CA opened on an operator's intermediate that expires `lifetime` from now (negative:
/// expired).
fn ca_on_intermediate(dir: &Dir, lifetime: time::Duration) -> Authority {
    std::fs::create_dir_all(&dir.0).unwrap();
    let (root_cert, inter_cert, inter_key) = root_and_intermediate(lifetime);
    std::fs::write(dir.0.join("inter.crt"), inter_cert.pem()).unwrap();
    std::fs::write(dir.0.join("inter.key"), inter_key.serialize_pem()).unwrap();
    std::fs::write(dir.0.join("root.crt"), root_cert.pem()).unwrap();
    let mut opts = options(&dir.0.join("state"));
    opts.workload_lifetime = Duration::from_secs(24 * 3600);
    opts.ca_cert = Some(dir.0.join("inter.crt"));
    opts.ca_key = Some(dir.0.join("inter.key"));
    opts.extra_roots = Some(dir.0.join("root.crt"));
    Authority::open(&opts).unwrap()
}

#[test]
fn no_workload_certificate_outlives_the_signing_certificate() {
    let dir = Dir::new("signer-expiry");
    let ca = ca_on_intermediate(&dir, time::Duration::hours(2));
    let key = KeyPair::generate().unwrap();
    let token = ca.token(&WEB.parse().unwrap(), DAY);
    let issued = ca
        .certify(&csr(&[WEB], &key), Credential::Token(&token))
        .unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
    let (_, signer) = x509_parser::parse_x509_certificate(&issued.chain[1]).unwrap();
    assert_eq!(
        leaf.validity().not_after,
        signer.validity().not_after,
        "24 h asked for, 2 h left on the signer"
    );

    let dir = Dir::new("signer-expired");
    let ca = ca_on_intermediate(&dir, -time::Duration::hours(1));
    let refused = ca.certify(
        &csr(&[WEB], &key),
        Credential::Token(&ca.token(&WEB.parse().unwrap(), DAY)),
    );
    assert!(
        matches!(&refused, Err(CertifyError::Internal(why)) if why.contains("expired")),
        "{refused:?}"
    );
}

#[test]
fn bootstrap_tokens_are_told_from_serviceaccount_tokens_and_reviews_stay_in_the_trust_domain() {
    let dir = Dir::new("reviewed");
    let authority = Authority::open(&options(&dir.0)).unwrap();
    let id: SpiffeId = "spiffe://mesh.test/ns/shop/sa/cart".parse().unwrap();
    let token = authority.token(&id, DAY);
    assert!(Authority::is_bootstrap_token(&token));
    assert!(Authority::is_bootstrap_token(&format!(" {token}\n")));
    assert!(Authority::is_bootstrap_token("tern1.old.format"));
    for other in ["eyJhbGciOiJSUzI1NiJ9.payload.sig", "ternary.x", "tern2", ""] {
        assert!(!Authority::is_bootstrap_token(other), "{other}");
    }

    let key = KeyPair::generate().unwrap();
    let request = csr(&["spiffe://mesh.test/ns/shop/sa/cart"], &key);
    let issued = authority
        .certify(&request, Credential::Reviewed(id.clone()))
        .unwrap();
    assert_eq!(issued.id, id);
    // The cluster's word marks the certificate, and a renewal by that certificate alone
    // (the API server out of reach) keeps the mark; a bootstrap token's does not carry it.
    assert!(super::cluster_proven(&issued.chain[0]));
    let renewed = authority
        .certify(&request, Credential::Certificate(&issued.chain[0]))
        .unwrap();
    assert!(super::cluster_proven(&renewed.chain[0]));
    let bootstrapped = authority
        .certify(&request, Credential::Token(&token))
        .unwrap();
    assert!(!super::cluster_proven(&bootstrapped.chain[0]));
    let renewed = authority
        .certify(&request, Credential::Certificate(&bootstrapped.chain[0]))
        .unwrap();
    assert!(!super::cluster_proven(&renewed.chain[0]));
    let elsewhere: SpiffeId = "spiffe://other.test/ns/shop/sa/cart".parse().unwrap();
    assert!(matches!(
        authority.prove(Credential::Reviewed(elsewhere)),
        Err(CertifyError::Unauthenticated(_))
    ));
}

#[test]
fn a_first_start_killed_between_the_root_key_and_its_certificate_starts_afresh() {
    let dir = Dir::new("half-root");
    std::fs::create_dir_all(&dir.0).unwrap();
    // What a start killed after writing the key, before the certificate, leaves.
    std::fs::write(dir.0.join("ca.key"), "-----BEGIN PRIVATE KEY-----\n").unwrap();
    let authority = Authority::open(&options(&dir.0)).unwrap();
    assert!(dir.0.join("ca.crt").exists());
    let again = Authority::open(&options(&dir.0)).unwrap();
    assert_eq!(
        authority.trust_bundle(),
        again.trust_bundle(),
        "the new root is kept"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
