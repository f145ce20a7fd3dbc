//! The `tern-control` binary: `token` mints what the CA of its state directory takes, with
//! the expiry asked for, and refuses a foreign trust domain; `serve` comes up and exits 0 on SIGTERM; `crds` prints
//! exactly the committed `deploy/crds/tern.dev.yaml`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_tern-control");

fn state_dir(label: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-control-cli-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn token_proves_its_identity_to_the_state_directorys_ca_until_it_expires() {
    let dir = state_dir("token");
    let token = |id: &str, valid_for: &str| {
        Command::new(BIN)
            .args([
                "token",
                id,
                "--trust-domain",
                "mesh.test",
                "--valid-for",
                valid_for,
            ])
            .arg("--state-dir")
            .arg(&dir)
            .output()
            .unwrap()
    };
    let web = "spiffe://mesh.test/ns/shop/sa/web";
    let minted = token(web, "1h");
    assert!(minted.status.success(), "{minted:?}");
    let text = String::from_utf8(minted.stdout).unwrap();
    assert!(text.starts_with("tern2."), "{text}");
    // The CA that later runs on this state directory takes it (the token key persisted),
    // and it expires in an hour.
    let authority = controlplane::Authority::open(&controlplane::CaOptions {
        state_dir: dir.clone(),
        trust_domain: "mesh.test".into(),
        workload_lifetime: std::time::Duration::from_secs(3600),
        ca_cert: None,
        ca_key: None,
        extra_roots: None,
    })
    .unwrap();
    assert_eq!(authority.verify_token(&text).unwrap().to_string(), web);
    let expiry: u64 = text.split('.').nth(2).unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 3590..=now + 3600).contains(&expiry),
        "{expiry} vs {now}"
    );

    let foreign = token("spiffe://elsewhere.test/ns/shop/sa/web", "1h");
    assert!(!foreign.status.success());
    assert!(
        String::from_utf8_lossy(&foreign.stderr).contains("not in trust domain"),
        "{foreign:?}"
    );
    let never = token(web, "0s");
    assert!(!never.status.success(), "{never:?}");
    let garbage = token("https://example.com", "1h");
    assert!(!garbage.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_starts_and_exits_cleanly_on_sigterm() {
    let dir = state_dir("serve");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(&dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|line| line.contains("tern-control serving"));
    assert!(serving.is_some(), "never served");
    assert!(dir.join("ca.crt").exists() && dir.join("ca.key").exists());
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_committed_crds_are_the_ones_the_types_generate() {
    let output = Command::new(BIN).arg("crds").output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let generated = String::from_utf8(output.stdout).unwrap();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/tern.dev.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        generated == committed,
        "{} differs from the CRD types: regenerate it with\n  cargo run -p controlplane --bin tern-control -- crds > deploy/crds/tern.dev.yaml",
        path.display()
    );
}

const TERNCTL: &str = env!("CARGO_BIN_EXE_ternctl");

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ternctl_status_reads_a_running_control_plane() {
    let dir = state_dir("ternctl");
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: { name: cart }\nspec:\n  ports: [{ name: http, port: 80 }]\n",
    )
    .unwrap();
    std::fs::write(
        manifests.join("broken.yaml"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: r }\nspec: { rulez: [] }\n",
    )
    .unwrap();
    let admin = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                &admin,
                "--manifests",
            ])
            .arg(&manifests)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|line| line.contains("tern-control serving")),
        "never served"
    );
    let status = Command::new(TERNCTL)
        .args(["status", "--admin", &admin])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let text = String::from_utf8(status.stdout).unwrap();
    assert!(
        text.contains("config generation 1: 1 objects in use, 1 refused"),
        "{text}"
    );
    assert!(
        text.contains("broken.yaml (document 1): HTTPRoute r: spec.rulez: unknown field `rulez`"),
        "{text}"
    );
    assert!(text.contains("(no proxy connected)"), "{text}");

    let json = Command::new(TERNCTL)
        .args(["status", "--json", "--admin", &admin])
        .output()
        .unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed["objects"], 1);

    drop(lines);
    drop(child);
    let gone = Command::new(TERNCTL)
        .args(["status", "--admin", &admin])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "{gone:?}");
    assert!(
        String::from_utf8_lossy(&gone.stderr)
            .contains("connecting to tern-control's admin endpoint"),
        "{gone:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
