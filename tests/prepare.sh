#!/usr/bin/env bash
# Installs, as root on Debian 12, what the end-to-end tests need beyond Rust: iproute2 (network
# namespaces for the pod tests), nftables and iptables (`tern-proxy init`'s rules, both
# kinds), procps (kill, pgrep), and what the kernel-TLS VM test needs (tests/ktls-vm/prepare.sh). Idempotent; .ci/run runs it.
# Without root, the pod tests say why and pass without running.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 procps nftables iptables)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

bash tests/ktls-vm/prepare.sh
