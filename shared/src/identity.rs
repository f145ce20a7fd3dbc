//! Workload identity: SPIFFE IDs of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, as Istio and Linkerd use.
//!
//! This module owns parsing and validation only (of the ID, and of the one URI SAN that carries
//! it in an X.509 SVID); issuing certificates and TLS live in the planes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A validated SPIFFE ID naming a Kubernetes service account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a workload SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{input}` is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>: {reason}"
)]
pub struct SpiffeIdError {
    input: String,
    reason: &'static str,
}

impl SpiffeId {
    /// The single SPIFFE ID in a certificate's URI SANs (DER), as an X.509 SVID carries it.
    pub fn of_certificate(der: &[u8]) -> Result<SpiffeId, String> {
        let (_, parsed) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unparsable certificate: {e}"))?;
        let san = parsed
            .subject_alternative_name()
            .map_err(|e| format!("invalid subjectAltName: {e}"))?
            .ok_or("no subjectAltName")?;
        let mut uris = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                _ => None,
            });
        let (Some(uri), None) = (uris.next(), uris.next()) else {
            return Err("an X.509 SVID carries exactly one URI SAN".into());
        };
        uri.parse().map_err(|e: SpiffeIdError| e.to_string())
    }

    /// Builds an ID from its parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
        })
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(input: &str) -> Result<SpiffeId, SpiffeIdError> {
        let fail = |reason| SpiffeIdError {
            input: input.to_owned(),
            reason,
        };
        let rest = input
            .strip_prefix("spiffe://")
            .ok_or_else(|| fail("the scheme must be spiffe://"))?;
        let (trust_domain, path) = rest.split_once('/').ok_or_else(|| fail("no path"))?;
        if !valid_trust_domain(trust_domain) {
            return Err(fail(
                "the trust domain must be lower-case letters, digits, `.`, `-` or `_`",
            ));
        }
        let parts: Vec<&str> = path.split('/').collect();
        let [ns_key, namespace, sa_key, service_account] = parts.as_slice() else {
            return Err(fail(
                "the path must be /ns/<namespace>/sa/<service-account>",
            ));
        };
        if *ns_key != "ns" || *sa_key != "sa" {
            return Err(fail(
                "the path must be /ns/<namespace>/sa/<service-account>",
            ));
        }
        if !valid_segment(namespace) || !valid_segment(service_account) {
            return Err(fail(
                "namespace and service account must be non-empty letters, digits, `.`, `-` or `_`",
            ));
        }
        Ok(SpiffeId {
            trust_domain: (*trust_domain).to_owned(),
            namespace: (*namespace).to_owned(),
            service_account: (*service_account).to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SpiffeId, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A workload SPIFFE ID, or every service account of one namespace
/// (`spiffe://<trust-domain>/ns/<namespace>/sa/*`): whom an authorization lets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPattern {
    id: SpiffeId,
    any_account: bool,
}

impl IdentityPattern {
    /// Whether `id` is one the pattern names.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        self.id.trust_domain == id.trust_domain
            && self.id.namespace == id.namespace
            && (self.any_account || self.id.service_account == id.service_account)
    }
}

impl FromStr for IdentityPattern {
    type Err = SpiffeIdError;

    fn from_str(input: &str) -> Result<IdentityPattern, SpiffeIdError> {
        match input.strip_suffix("/sa/*") {
            Some(namespace) => {
                let id: SpiffeId =
                    format!("{namespace}/sa/any")
                        .parse()
                        .map_err(|_| SpiffeIdError {
                            input: input.to_owned(),
                            reason: "a pattern is a SPIFFE ID, or one whose service account is `*`",
                        })?;
                Ok(IdentityPattern {
                    id,
                    any_account: true,
                })
            }
            None => Ok(IdentityPattern {
                id: input.parse()?,
                any_account: false,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_names_one_identity_or_a_namespaces_every_one() {
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        let one: IdentityPattern = "spiffe://td/ns/shop/sa/web".parse().unwrap();
        let all: IdentityPattern = "spiffe://td/ns/shop/sa/*".parse().unwrap();
        assert!(one.matches(&id("spiffe://td/ns/shop/sa/web")));
        assert!(!one.matches(&id("spiffe://td/ns/shop/sa/cart")));
        assert!(all.matches(&id("spiffe://td/ns/shop/sa/cart")));
        assert!(!all.matches(&id("spiffe://td/ns/other/sa/web")));
        assert!(!all.matches(&id("spiffe://elsewhere/ns/shop/sa/web")));
        for bad in [
            "spiffe://td/ns/*/sa/web",
            "spiffe://td/ns/shop/sa/w*",
            "spiffe://td/ns/shop",
            "*",
        ] {
            assert!(bad.parse::<IdentityPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_and_prints_workload_ids() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            ("cluster.local", "default", "web")
        );
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(
            SpiffeId::new("td", "ns-1", "sa_2").unwrap().to_string(),
            "spiffe://td/ns/ns-1/sa/sa_2"
        );
    }

    #[test]
    fn refuses_what_is_not_a_workload_id() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/a/sa/",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/sa/b/ns/a",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a b/sa/c",
        ] {
            let error = bad.parse::<SpiffeId>().unwrap_err();
            assert!(error.to_string().contains(bad), "{error}");
        }
    }

    #[test]
    fn round_trips_through_yaml() {
        let id: SpiffeId = serde_yaml::from_str("spiffe://td/ns/a/sa/b").unwrap();
        assert_eq!(
            serde_yaml::to_string(&id).unwrap().trim(),
            "spiffe://td/ns/a/sa/b"
        );
        assert!(serde_yaml::from_str::<SpiffeId>("nope").is_err());
    }
}
