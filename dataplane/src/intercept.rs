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
//!
//! Where nftables is not at hand, the same rules go in as iptables (`iptables-restore` and
//! `ip6tables-restore`, into chains `TERN_INBOUND` and `TERN_OUTBOUND` of the `nat` table,
//! each restore atomic per family), with one jump each from `PREROUTING` and `OUTPUT`, added
//! only when missing, so that too can run twice.

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
    /// The tool could not be run.
    #[error("running {0} (is its package, nftables or iptables, installed?): {1}")]
    Spawn(String, std::io::Error),
    /// The tool refused the rules.
    #[error("{0} refused the rules: {1}")]
    Refused(String, String),
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

/// Which firewall the rules are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Firewall {
    /// nftables when `nft` runs here, else iptables.
    Auto,
    /// One `inet` table, through `nft`.
    Nftables,
    /// `nat` chains for IPv4 and IPv6, through `iptables-restore`/`ip6tables-restore`.
    Iptables,
}

impl Firewall {
    /// Auto resolved: nftables if `nft` runs, else iptables.
    pub fn resolve(self) -> Firewall {
        match self {
            Firewall::Auto if runs("nft", "--version") => Firewall::Nftables,
            Firewall::Auto => Firewall::Iptables,
            chosen => chosen,
        }
    }
}

fn runs(program: &str, flag: &str) -> bool {
    Command::new(program)
        .arg(flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The iptables chains that hold the rules, and the built-in chains that jump to them.
pub const IPTABLES_CHAINS: [(&str, &str); 2] =
    [("PREROUTING", "TERN_INBOUND"), ("OUTPUT", "TERN_OUTBOUND")];

/// An IP family, for iptables (which keeps one rule set per family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `iptables`.
    V4,
    /// `ip6tables`.
    V6,
}

impl Family {
    fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn holds(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }
}

/// `-m multiport` takes at most 15 ports; longer lists become several rules.
fn port_lists(ports: &[u16]) -> Vec<String> {
    ports
        .chunks(15)
        .map(|chunk| {
            chunk
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

impl Interception {
    /// The `iptables-restore --noflush` input for `family`: the two chains (declaring them
    /// empties them) and their rules, the same as [`Interception::ruleset`]'s.
    pub fn iptables_rules(&self, family: Family) -> String {
        let (inbound, outbound) = (IPTABLES_CHAINS[0].1, IPTABLES_CHAINS[1].1);
        let mut out = format!("*nat\n:{inbound} - [0:0]\n:{outbound} - [0:0]\n");
        let _ = writeln!(out, "-A {inbound} -i lo -j RETURN");
        for ports in port_lists(&self.exclude_inbound_ports) {
            let _ = writeln!(
                out,
                "-A {inbound} -p tcp -m multiport --dports {ports} -j RETURN"
            );
        }
        if !self.include_inbound_ports.is_empty() {
            // Included ports jump to the redirect; everything else falls through (returns).
            for ports in port_lists(&self.include_inbound_ports) {
                let _ = writeln!(
                    out,
                    "-A {inbound} -p tcp -m multiport --dports {ports} -j REDIRECT --to-ports {}",
                    self.inbound_port
                );
            }
        } else {
            let _ = writeln!(
                out,
                "-A {inbound} -p tcp -j REDIRECT --to-ports {}",
                self.inbound_port
            );
        }

        let _ = writeln!(
            out,
            "-A {outbound} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        );
        let _ = writeln!(
            out,
            "-A {outbound} -m mark --mark {:#x} -j RETURN",
            self.proxy_mark
        );
        let _ = writeln!(out, "-A {outbound} -o lo -j RETURN");
        for net in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|n| family.holds(n))
        {
            let _ = writeln!(out, "-A {outbound} -d {net} -j RETURN");
        }
        for ports in port_lists(&self.exclude_outbound_ports) {
            let _ = writeln!(
                out,
                "-A {outbound} -p tcp -m multiport --dports {ports} -j RETURN"
            );
        }
        let redirect = format!("-j REDIRECT --to-ports {}", self.outbound_port);
        if self.include_outbound_cidrs.is_empty() {
            let _ = writeln!(out, "-A {outbound} -p tcp {redirect}");
        } else {
            // Only the included destinations; a family with none is left alone.
            for net in self
                .include_outbound_cidrs
                .iter()
                .filter(|n| family.holds(n))
            {
                let _ = writeln!(out, "-A {outbound} -p tcp -d {net} {redirect}");
            }
        }
        out.push_str("COMMIT\n");
        out
    }
}

/// Installs the iptables rules for both families (IPv6 only where the namespace has it), then
/// the jumps to them that are missing.
pub fn apply_iptables(interception: &Interception) -> Result<(), InterceptError> {
    for family in families() {
        let restore = format!("{}-restore", family.tool());
        run_with_input(
            &restore,
            &["--noflush"],
            &interception.iptables_rules(family),
        )?;
        for (builtin, chain) in IPTABLES_CHAINS {
            let jump = ["-t", "nat", "-C", builtin, "-p", "tcp", "-j", chain];
            if run(family.tool(), &jump).is_err() {
                let mut add = jump;
                add[2] = "-A";
                run(family.tool(), &add)?;
            }
        }
    }
    Ok(())
}

/// Removes the iptables rules and chains (and succeeds when there are none).
pub fn uninstall_iptables() -> Result<(), InterceptError> {
    for family in families() {
        for (builtin, chain) in IPTABLES_CHAINS {
            let jump = ["-t", "nat", "-D", builtin, "-p", "tcp", "-j", chain];
            while run(family.tool(), &jump).is_ok() {}
            let _ = run(family.tool(), &["-t", "nat", "-F", chain]);
            let _ = run(family.tool(), &["-t", "nat", "-X", chain]);
        }
    }
    Ok(())
}

/// IPv4, and IPv6 when this namespace has it.
fn families() -> Vec<Family> {
    if crate::sys::ipv6_available() {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), InterceptError> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| InterceptError::Spawn(program.to_owned(), e))?;
    succeeded(program, &output)
}

fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<(), InterceptError> {
    let spawn_error = |e| InterceptError::Spawn(program.to_owned(), e);
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    succeeded(program, &output)
}

/// The tool's exit, as a result carrying what it said on failure.
fn succeeded(program: &str, output: &std::process::Output) -> Result<(), InterceptError> {
    if output.status.success() {
        Ok(())
    } else {
        Err(InterceptError::Refused(
            program.to_owned(),
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

/// The nftables file that removes the rules (and succeeds when there are none).
pub fn uninstall_ruleset() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Applies an nftables file with `nft -f -`, in the current network namespace.
pub fn apply(ruleset: &str) -> Result<(), InterceptError> {
    run_with_input("nft", &["-f", "-"], ruleset)
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
    fn iptables_rules_say_the_same_per_family() {
        let interception = Interception {
            include_outbound_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            exclude_outbound_cidrs: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            exclude_outbound_ports: (1..=20).collect(),
            exclude_inbound_ports: vec![15020],
            ..Interception::default()
        };
        let v4 = interception.iptables_rules(Family::V4);
        for expected in [
            ":TERN_INBOUND - [0:0]",
            "-A TERN_INBOUND -i lo -j RETURN",
            "-A TERN_INBOUND -p tcp -m multiport --dports 15020 -j RETURN",
            "-A TERN_INBOUND -p tcp -j REDIRECT --to-ports 15006",
            "-A TERN_OUTBOUND -m owner --uid-owner 1337 -j RETURN",
            "-A TERN_OUTBOUND -m mark --mark 0x539 -j RETURN",
            "-A TERN_OUTBOUND -o lo -j RETURN",
            "-A TERN_OUTBOUND -d 10.96.0.0/12 -j RETURN",
            "--dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j RETURN",
            "--dports 16,17,18,19,20 -j RETURN",
            "-A TERN_OUTBOUND -p tcp -d 10.0.0.0/8 -j REDIRECT --to-ports 15001",
            "COMMIT",
        ] {
            assert!(v4.contains(expected), "{expected} missing from\n{v4}");
        }
        assert!(!v4.contains("fd00"), "{v4}");
        // IPv6 has no included destination: nothing of it is redirected outbound.
        let v6 = interception.iptables_rules(Family::V6);
        assert!(
            v6.contains("-A TERN_OUTBOUND -d fd00::/8 -j RETURN"),
            "{v6}"
        );
        assert!(!v6.contains("--to-ports 15001"), "{v6}");
        assert!(v6.contains("--to-ports 15006"), "{v6}");
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
