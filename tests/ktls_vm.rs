//! Kernel TLS tested for real: this machine's kernel has no kTLS, so each test boots a Debian
//! cloud kernel (which ships `tls.ko`) under qemu (TCG: slow, never used for timing) with an
//! initramfs holding busybox, the kernel's crypto and TLS modules, and a static build of the
//! `ktls` test binary, and runs it there with `TERN_EXPECT_KTLS=1`: every suite must go
//! through the kernel, byte-exact, with the kernel's own counters agreeing.
//!
//! Two kernels, because kTLS differs where it matters: Debian 12's 6.1, which cannot take new
//! keys on a live socket, and the newest Debian kernel (trixie-backports), which can, so TLS
//! 1.3 KeyUpdate is checked both where it ends a connection and where it carries on. Debian
//! 12's boots without IPv6 (`ipv6.disable=1`, as some clusters' nodes do), which also checks
//! that an intercepting proxy serves IPv4 there.
//!
//! Needs `tests/ktls-vm/prepare.sh` to have run once (qemu, busybox, cpio, xz, zstd and the kernel
//! packages; CI runs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Guest modules: the TLS ULP and the AEADs it uses (arch-specific ones may fail to load
/// without the CPU features; the generic ones then serve).
const MODULES: &[&str] = &[
    "cryptd",
    "crypto_simd",
    "gf128mul",
    "ghash_generic",
    "ctr",
    "gcm",
    "seqiv",
    "aesni_intel",
    "ghash_clmulni_intel",
    "libchacha",
    "chacha_generic",
    "chacha",
    "chacha_x86_64",
    "libpoly1305",
    "poly1305_generic",
    "poly1305_x86_64",
    "chacha20poly1305",
    "tls",
];

/// Module directories copied into the guest.
const MODULE_DIRS: &[&str] = &["crypto", "lib/crypto", "arch/x86/crypto", "net/tls"];

/// How long the guest may run (TCG is slow: about 10 s per 64 MiB of kTLS traffic).
const GUEST_DEADLINE: Duration = Duration::from_secs(900);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn run(command: &mut Command) {
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(status.success(), "{command:?}: {status}");
}

/// Builds the `ktls` test binary statically linked, in a target directory of its own.
fn build_guest_test() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "test",
            "--no-run",
            "--locked",
            "-p",
            "tests",
            "--test",
            "ktls",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--message-format=json",
        ])
        .env("CARGO_TARGET_DIR", workspace().join("target/ktls-vm/build"))
        // With an explicit --target, RUSTFLAGS reach only target code, not build scripts.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // A second build of the whole workspace: nobody debugs it, so it keeps no debug
        // info and no incremental state, which would double its size on disk.
        .env("CARGO_PROFILE_DEV_DEBUG", "false")
        .env("CARGO_INCREMENTAL", "0")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "building the static guest test failed"
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("\"executable\":\"") && line.contains("ktls"))
        .find_map(|line| {
            let start = line.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + line[start..].find('"')?;
            Some(PathBuf::from(&line[start..end]))
        })
        .expect("cargo named the ktls test executable")
}

fn init_script() -> String {
    let modules = MODULES.join(" ");
    format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\n\
         depmod\n\
         for m in {modules}; do modprobe $m 2>/dev/null || echo \"module $m: not loaded\"; done\n\
         ip link set lo up\n\
         echo KTLS-VM-ULP: $(cat /proc/sys/net/ipv4/tcp_available_ulp)\n\
         TERN_EXPECT_KTLS=1 TMPDIR=/tmp RUST_BACKTRACE=1 /ktls --test-threads=1 --nocapture\n\
         echo KTLS-VM-EXIT $?\n\
         poweroff -f\n"
    )
}

/// Packs busybox, the modules, the test and `/init` into a gzip'd newc cpio.
fn build_initramfs(kernel: &Path, version: &str, test: &Path, dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for sub in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
    std::fs::copy(test, root.join("ktls")).unwrap();
    let modules = root.join("lib/modules").join(version);
    for sub in MODULE_DIRS {
        let target = modules.join("kernel").join(sub);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        run(Command::new("cp")
            .arg("-r")
            .arg(
                kernel
                    .join("lib/modules")
                    .join(version)
                    .join("kernel")
                    .join(sub),
            )
            .arg(&target));
    }
    for file in ["modules.builtin", "modules.order"] {
        let from = kernel.join("lib/modules").join(version).join(file);
        if from.exists() {
            std::fs::copy(from, modules.join(file)).unwrap();
        }
    }
    let init = root.join("init");
    std::fs::write(&init, init_script()).unwrap();
    run(Command::new("chmod").arg("+x").arg(&init));
    let image = dir.join("initramfs.cpio.gz");
    run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        image.display()
    )));
    image
}

/// Boots the kernel prepared for `suite`, with `cmdline` added to its command line, with the
/// guest test, and returns its console.
fn boot(suite: &str, cmdline: &str) -> String {
    // One guest at a time: each takes both emulated CPUs' worth of host time.
    static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guest = ONE_GUEST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let kernel = workspace().join("target/ktls-vm/kernels").join(suite);
    let vmlinuz = kernel.join("vmlinuz");
    assert!(
        vmlinuz.exists(),
        "no kernel under {}: run tests/ktls-vm/prepare.sh first",
        kernel.display()
    );
    let version = std::fs::read_dir(kernel.join("lib/modules"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .unwrap();

    // Built once for both kernels.
    static TEST: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let test = TEST.get_or_init(build_guest_test);
    let dir = tests::pki::TempDir::new("ktls-vm");
    let initramfs = build_initramfs(&kernel, &version, test, &dir.0);

    // TCG can crash a guest kernel while it patches its own code early in boot (an `int3`
    // oops in code another vCPU just rewrote, seen once in a newer kernel): a guest that
    // panics before the test starts is booted again, twice at most.
    let mut attempts = 1;
    loop {
        let console = run_guest(suite, &vmlinuz, &initramfs, cmdline);
        let crashed_in_boot = !console.contains("KTLS-VM-ULP:") && console.contains("Kernel panic");
        if !crashed_in_boot || attempts == 3 {
            return console;
        }
        println!("the {suite} guest's kernel crashed while booting; booting it again");
        attempts += 1;
    }
}

/// Runs one guest to its end and returns its console.
fn run_guest(suite: &str, vmlinuz: &Path, initramfs: &Path, cmdline: &str) -> String {
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1536", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-nic", "none", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 {cmdline}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 installed (tests/ktls-vm/prepare.sh)");
    let mut stdout = qemu.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut output = Vec::new();
        let _ = stdout.read_to_end(&mut output);
        String::from_utf8_lossy(&output).into_owned()
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = qemu.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > GUEST_DEADLINE {
            let _ = qemu.kill();
            let _ = qemu.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let console = reader.join().unwrap();
    println!("{console}");
    assert!(
        status.is_some(),
        "the {suite} guest did not finish within {GUEST_DEADLINE:?}"
    );
    console
}

/// The TLS 1.3 suites, as the guest test names them.
const SUITES: [&str; 3] = [
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_CHACHA20_POLY1305_SHA256",
];

/// What every kTLS kernel must show: the ULP, and every suite carried by the kernel.
fn assert_carried_by_the_kernel(console: &str) {
    assert!(
        console.contains("KTLS-VM-ULP:") && console.contains(" tls"),
        "the guest kernel did not offer the tls ULP"
    );
    let on_epoll = SUITES
        .iter()
        .chain(&["key update", "session tickets", "bad record"])
        .map(|what| format!("{what} Epoll"));
    let on_io_uring = [
        "TLS13_AES_128_GCM_SHA256",
        "key update",
        "session tickets",
        "bad record",
    ]
    .map(|what| format!("{what} IoUring"));
    for checked in on_epoll
        .chain(on_io_uring)
        .chain(["early data and close_notify".to_owned()])
    {
        assert!(
            console.contains(&format!("KTLS-CHECKED {checked}: kernel")),
            "{checked} was not carried by kTLS in the guest"
        );
    }
    for suite in SUITES {
        for backend in ["Epoll", "IoUring"] {
            assert!(
                console.contains(&format!(
                    "KTLS-CHECKED own key update {suite} {backend}: kernel"
                )),
                "{suite}'s sender keys were not checked in the kernel on {backend}"
            );
        }
    }
    assert!(
        console.contains("test result: ok. 14 passed"),
        "guest tests failed"
    );
    assert!(
        console.contains("KTLS-VM-EXIT 0"),
        "guest test binary failed"
    );
}

/// Debian 12's kernel (6.1): kTLS, but it cannot take new keys on a live socket, so a
/// KeyUpdate either way ends that connection, cleanly and before any key passes its limit.
/// Booted without IPv6, where interception must go on with IPv4 alone.
#[test]
fn ktls_carries_the_mtls_pair_in_debian_12s_kernel() {
    let console = boot("bookworm", "ipv6.disable=1");
    assert_carried_by_the_kernel(&console);
    assert!(
        console.contains("KTLS-CHECKED interception: IPv4 only, this kernel has no IPv6"),
        "interception without IPv6 was not checked"
    );
    assert!(
        console.contains("KTLS-CHECKED this kernel refused updated keys"),
        "a peer's KeyUpdate was not refused by 6.1"
    );
    for suite in SUITES {
        for backend in ["Epoll", "IoUring"] {
            assert!(
                console.contains(&format!(
                    "KTLS-CHECKED own key update {suite} {backend}: kernel, refused by this kernel"
                )),
                "{suite}: the sender did not stop at its limit on 6.1 ({backend})"
            );
        }
    }
}

/// The newest Debian kernel (trixie-backports): kTLS with TLS 1.3 KeyUpdate, both the peer's
/// and the proxy's own, without ending a connection.
#[test]
fn ktls_carries_the_mtls_pair_and_updates_keys_in_a_newer_kernel() {
    let console = boot("trixie-backports", "");
    assert_carried_by_the_kernel(&console);
    assert!(
        console.contains("KTLS-CHECKED interception: IPv4 and IPv6"),
        "interception with IPv6 was not checked"
    );
    assert!(
        !console.contains("KTLS-CHECKED this kernel refused updated keys"),
        "a peer's KeyUpdate was refused by a kernel that rekeys"
    );
    // 1000 records a suite at 64 records per key: 15 rekeys a suite at least, on each backend.
    for backend in ["Epoll", "IoUring"] {
        let rekeys: u64 = console
            .lines()
            .find_map(|line| {
                line.split(&format!("KTLS-CHECKED own key update {backend}: kernel, "))
                    .nth(1)?
                    .strip_suffix(" rekeys")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("the guest counted the kernel's rekeys on {backend}"));
        assert!(rekeys >= 3 * 15, "{backend}: {rekeys} rekeys");
    }
}
