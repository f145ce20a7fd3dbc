//! `ternctl demo` end to end (the real binaries): it builds the mesh, measures both paths
//! without errors, writes its reports, and leaves nothing running and no namespace behind,
//! both in pods (where this machine allows) and on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use tests::binary;
use tests::pki::TempDir;

fn demo(extra: &[&str]) -> (String, TempDir) {
    let out = TempDir::new("demo");
    let output = Command::new(binary("ternctl"))
        .args(["demo", "--duration", "1s", "--rounds", "1", "--rate", "200"])
        .args(["--connections", "4", "--out"])
        .arg(&out.0)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (stdout, out)
}

fn assert_measured(stdout: &str, out: &TempDir) {
    for path in ["direct", "meshed"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(path) && l.contains("µs"))
            .unwrap_or_else(|| panic!("no {path} row in\n{stdout}"));
        // The last column is the error count.
        assert_eq!(line.split_whitespace().last(), Some("0"), "{line}");
        for ext in ["json", "hgrm", "svg"] {
            let file = out.0.join(format!("reports/{path}-round1.{ext}"));
            assert!(file.exists(), "{} missing", file.display());
        }
    }
    assert!(stdout.contains("added"), "{stdout}");
}

fn nothing_left(out: &TempDir) {
    let namespaces = Command::new("ip").args(["netns", "list"]).output();
    if let Ok(namespaces) = namespaces {
        let listed = String::from_utf8_lossy(&namespaces.stdout).into_owned();
        assert!(!listed.contains("tern-demo-"), "{listed}");
    }
    // No program the demo started is still running with its files.
    let dir = out.0.display().to_string();
    let running = Command::new("pgrep").args(["-f", &dir]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&running.stdout).trim().is_empty(),
        "still running: {}",
        String::from_utf8_lossy(&running.stdout)
    );
}

/// One test, so the two demos never run at once (each checks that none of its namespaces
/// is left).
#[test]
fn the_demo_measures_a_mesh_on_loopback_and_in_pods_and_cleans_up() {
    let (stdout, out) = demo(&["--loopback"]);
    assert!(stdout.contains("loopback"), "{stdout}");
    assert_measured(&stdout, &out);
    nothing_left(&out);

    if !tests::pods::supported() {
        return;
    }
    let (stdout, out) = demo(&[]);
    assert!(stdout.contains("pods (network namespaces"), "{stdout}");
    assert_measured(&stdout, &out);
    nothing_left(&out);
}
