#!/usr/bin/env bash
# Prepares what tests/ktls_vm.rs needs to test kernel TLS for real on a machine whose own
# kernel has none: qemu (TCG), a static busybox and cpio from Debian, and a Debian cloud
# kernel, which ships the `tls` module, unpacked under target/ktls-vm/kernel/.
# Run as root on Debian 12; idempotent. CI runs it from .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."

packages=(qemu-system-x86 busybox-static cpio)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

dest=target/ktls-vm/kernel
if ! ls "$dest"/boot/vmlinuz-* >/dev/null 2>&1; then
  # The meta-package names the current cloud kernel; download just that package.
  image=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  if [ -z "$image" ]; then
    apt-get update -qq
    image=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  fi
  work=$(mktemp -d)
  (cd "$work" && apt-get download "$image" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  deb=$(ls "$work"/*.deb)
  mkdir -p "$dest"
  dpkg-deb -x "$deb" "$dest"
  rm -rf "$work"
fi
ls "$dest"/boot/vmlinuz-* >/dev/null
echo "ktls-vm: $(ls "$dest"/lib/modules) ready in $dest"
