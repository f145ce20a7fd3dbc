//! `tern-load compare` end to end on loopback: direct traffic, one `tern-proxy` hop and an
//! mTLS sidecar pair, each started from the real binary, measured in one run, for HTTP/1.1,
//! opaque TCP and gRPC (which the proxies route as HTTP/2).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use loadtest::compare::{self, Programs, Scenario, TargetKind};
use loadtest::protocol::Protocol;
use tests::binary;
use tests::pki::TempDir;

fn scenario(protocol: Protocol) -> Scenario {
    Scenario {
        protocol,
        rate: 200.0,
        connections: vec![2],
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(200),
        rounds: 2,
        request_size: 64,
        response_size: 512,
        targets: vec![TargetKind::Direct, TargetKind::Tern, TargetKind::TernMtls],
        generator_threads: 1,
        saturation: None,
        reconnect: false,
    }
}

#[test]
fn compares_direct_a_hop_and_an_mtls_pair_in_one_run() {
    for protocol in [Protocol::Http, Protocol::Tcp, Protocol::Grpc] {
        let out = TempDir::new("compare");
        let programs = Programs {
            tern_proxy: binary("tern-proxy"),
            tern_control: binary("tern-control"),
            haproxy: "haproxy".into(),
            nginx: "nginx".into(),
        };
        let comparison = compare::run(&scenario(protocol), &programs, &out.0).unwrap();
        assert!(comparison.skipped.is_empty(), "{:?}", comparison.skipped);
        let names: Vec<&str> = comparison
            .results
            .iter()
            .map(|r| r.target.as_str())
            .collect();
        assert_eq!(names, ["direct", "tern", "tern-mtls"]);
        for result in &comparison.results {
            assert!(
                result.errors.is_empty(),
                "{protocol:?} {}: {:?}",
                result.target,
                result.errors
            );
            assert_eq!(
                result.latency_us.count, 400,
                "{protocol:?} {}",
                result.target
            );
            if result.target != "direct" {
                assert!(result.added_us.contains_key("p99"));
                assert_eq!(result.added_us_by_round.len(), 2, "{}", result.target);
                assert!(result.vcpu_per_1000_rps.is_some_and(|v| v > 0.0));
                assert!(result.rss_idle_mb.is_some_and(|mb| mb > 1.0));
            }
        }
        // Two rounds: Tern's added latency is set beside that round's direct, round by round.
        let text = std::fs::read_to_string(out.0.join("report.txt")).unwrap();
        assert!(
            text.contains("added over direct") && !text.contains("ratio by round"),
            "no peer ran, so there is no ratio to give by round:\n{text}"
        );
        for file in [
            "report.json",
            "report.txt",
            "latency-c2.svg",
            "direct-c2.hgrm",
            "tern-mtls-c2.hgrm",
        ] {
            assert!(out.0.join(file).exists(), "{file} was not written");
        }
    }
}
