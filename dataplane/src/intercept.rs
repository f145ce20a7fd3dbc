//! Traffic interception inside a pod's network namespace (`tern-proxy init`, what
//! istio-init and linkerd's proxy-init do): nftables rules that send the pod's outbound TCP
//! to the proxy's outbound port and its inbound TCP to the inbound port, leaving out the
//! proxy's own traffic (by UID and by socket mark), loopback, and the CIDRs and ports the
//! operator excludes. IPv4 and IPv6 share one `inet` table.
//!
//! The rules are applied with `nft -f -`, not a netlink library: `nft` applies the whole
//! file as one atomic transaction, it is the reference implementation of the nftables
//! language operators already read, and init runs once per pod, so spawning it costs
//! nothing that matters. The file first declares and deletes the table, then writes it
//! whole, so running init twice leaves the same rules (idempotent), and `--uninstall`
//! removes exactly the table.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use ipnet::IpNet;

/// The nftables table that holds every rule (family `inet`: IPv4 and IPv6).
pub const TABLE: &str = "tern";

/// What to intercept and where to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interception {
    /// Where outbound TCP goes (the proxy's outbound listener).
    pub outbound_port: u16,
    /// Where inbound TCP goes (the proxy's inbound listener).
    pub inbound_port: u16,
    /// The proxy's UID: its own connections are not intercepted.
    pub proxy_uid: u32,
    /// A socket mark the proxy may set instead: such connections are not intercepted.
    pub proxy_mark: u32,
    /// Outbound destinations to intercept; empty means all.
    pub include_outbound_cidrs: Vec<IpNet>,
    /// Outbound destinations left alone.
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<u16>,
    /// Inbound ports to intercept; empty means all.
    pub include_inbound_ports: Vec<u16>,
    /// Inbound ports left alone (e.g. a health port the kubelet must reach directly).
    pub exclude_inbound_ports: Vec<u16>,
}

impl Default for Interception {
    fn default() -> Self {
        Interception {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_uid: 1337,
            proxy_mark: 1337,
            include_outbound_cidrs: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_inbound_ports: Vec::new(),
            exclude_inbound_ports: Vec::new(),
        }
    }
}

/// Why the rules could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// `nft` could not be run.
    #[error("running nft (is the nftables package installed?): {0}")]
    Spawn(std::io::Error),
    /// `nft` refused the rules.
    #[error("nft refused the rules: {0}")]
    Refused(String),
}

fn set<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

impl Interception {
    /// The nftables file that installs the rules (idempotently).
    pub fn ruleset(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
        );

        let _ = writeln!(out, "\tchain inbound {{");
        let _ = writeln!(
            out,
            "\t\ttype nat hook prerouting priority dstnat; policy accept;"
        );
        let _ = writeln!(out, "\t\tmeta l4proto != tcp return");
        let _ = writeln!(out, "\t\tiifname \"lo\" return");
        if !self.exclude_inbound_ports.is_empty() {
            let _ = writeln!(
                out,
                "\t\ttcp dport {} return",
                set(&self.exclude_inbound_ports)
            );
        }
        if !self.include_inbound_ports.is_empty() {
            let _ = writeln!(
                out,
                "\t\ttcp dport != {} return",
                set(&self.include_inbound_ports)
            );
        }
        let _ = writeln!(
            out,
            "\t\tmeta l4proto tcp redirect to :{}",
            self.inbound_port
        );
        let _ = writeln!(out, "\t}}");

        let _ = writeln!(out, "\tchain outbound {{");
        let _ = writeln!(
            out,
            "\t\ttype nat hook output priority -100; policy accept;"
        );
        let _ = writeln!(out, "\t\tmeta l4proto != tcp return");
        let _ = writeln!(out, "\t\tmeta skuid {} return", self.proxy_uid);
        let _ = writeln!(out, "\t\tmeta mark {:#x} return", self.proxy_mark);
        let _ = writeln!(out, "\t\toifname \"lo\" return");
        let (v4, v6): (Vec<&IpNet>, Vec<&IpNet>) = self
            .exclude_outbound_cidrs
            .iter()
            .partition(|n| matches!(n, IpNet::V4(_)));
        if !v4.is_empty() {
            let _ = writeln!(out, "\t\tip daddr {} return", set(&v4));
        }
        if !v6.is_empty() {
            let _ = writeln!(out, "\t\tip6 daddr {} return", set(&v6));
        }
        if !self.include_outbound_cidrs.is_empty() {
            let (v4, v6): (Vec<&IpNet>, Vec<&IpNet>) = self
                .include_outbound_cidrs
                .iter()
                .partition(|n| matches!(n, IpNet::V4(_)));
            // A family with nothing included is left alone entirely.
            if v4.is_empty() {
                let _ = writeln!(out, "\t\tmeta nfproto ipv4 return");
            } else {
                let _ = writeln!(out, "\t\tmeta nfproto ipv4 ip daddr != {} return", set(&v4));
            }
            if v6.is_empty() {
                let _ = writeln!(out, "\t\tmeta nfproto ipv6 return");
            } else {
                let _ = writeln!(
                    out,
                    "\t\tmeta nfproto ipv6 ip6 daddr != {} return",
                    set(&v6)
                );
            }
        }
        if !self.exclude_outbound_ports.is_empty() {
            let _ = writeln!(
                out,
                "\t\ttcp dport {} return",
                set(&self.exclude_outbound_ports)
            );
        }
        let _ = writeln!(
            out,
            "\t\tmeta l4proto tcp redirect to :{}",
            self.outbound_port
        );
        let _ = writeln!(out, "\t}}\n}}");
        out
    }
}

/// The nftables file that removes the rules (and succeeds when there are none).
pub fn uninstall_ruleset() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Applies an nftables file with `nft -f -`, in the current network namespace.
pub fn apply(ruleset: &str) -> Result<(), InterceptError> {
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(InterceptError::Spawn)?;
    if let Some(mut stdin) = nft.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .map_err(InterceptError::Spawn)?;
    }
    let output = nft.wait_with_output().map_err(InterceptError::Spawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(InterceptError::Refused(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_leaves_out_the_proxy_loopback_and_exclusions() {
        let rules = Interception {
            exclude_outbound_cidrs: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            exclude_outbound_ports: vec![5432],
            exclude_inbound_ports: vec![15020, 22],
            ..Interception::default()
        }
        .ruleset();
        for expected in [
            "table inet tern\ndelete table inet tern\ntable inet tern {",
            "type nat hook prerouting priority dstnat;",
            "tcp dport { 15020, 22 } return",
            "meta l4proto tcp redirect to :15006",
            "type nat hook output priority -100;",
            "meta skuid 1337 return",
            "meta mark 0x539 return",
            "oifname \"lo\" return",
            "ip daddr { 10.96.0.0/12 } return",
            "ip6 daddr { fd00::/8 } return",
            "tcp dport { 5432 } return",
            "meta l4proto tcp redirect to :15001",
        ] {
            assert!(rules.contains(expected), "{expected} missing from\n{rules}");
        }
        // The proxy's own traffic is left alone before anything is redirected.
        assert!(rules.find("skuid").unwrap() < rules.find("redirect to :15001").unwrap());
        assert!(!rules.contains("nfproto"), "no include list: every family");
    }

    #[test]
    fn an_include_list_leaves_other_destinations_and_families_alone() {
        let rules = Interception {
            include_outbound_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            include_inbound_ports: vec![8080],
            ..Interception::default()
        }
        .ruleset();
        assert!(
            rules.contains("meta nfproto ipv4 ip daddr != { 10.0.0.0/8 } return"),
            "{rules}"
        );
        assert!(rules.contains("meta nfproto ipv6 return"), "{rules}");
        assert!(rules.contains("tcp dport != { 8080 } return"), "{rules}");
    }
}
