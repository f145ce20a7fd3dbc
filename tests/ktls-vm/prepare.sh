#!/usr/bin/env bash
# Prepares what tests/ktls_vm.rs needs to test kernel TLS for real on a machine whose own
# kernel has none: qemu (TCG), a static busybox, cpio and xz from Debian, and two Debian
# cloud kernels, which ship the `tls` module, each under target/ktls-vm/kernels/<suite>/ as
# `vmlinuz` and `lib/modules/<version>/` (modules decompressed):
#   bookworm          Debian 12's kernel (6.1): kTLS, but no rekeying of a live socket;
#   trixie-backports  the newest Debian kernel (6.14 or later): kTLS with TLS 1.3 KeyUpdate.
# Run as root on Debian 12; idempotent. CI runs it from .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

packages=(qemu-system-x86 busybox-static cpio xz-utils)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# apt for one suite: the system's lists for bookworm; lists of its own for another suite, so
# the machine's sources stay as they are.
apt_for() {
  local suite=$1
  if [ "$suite" = bookworm ]; then
    return
  fi
  local state=$root/target/ktls-vm/apt/$suite
  mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
  echo "deb http://deb.debian.org/debian $suite main" >"$state/sources.list"
  echo "-o Dir::Etc::SourceList=$state/sources.list -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists=$state/lists -o Dir::Cache=$state/cache"
}

# The kernel packages the suite's cloud meta-package names now: the image, and the binary and
# modules packages that newer images are split into.
kernel_packages() {
  local options=$1 image
  image=$(apt-cache $options depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
  [ -n "$image" ] || return 0
  echo "$image"
  apt-cache $options depends "$image" | awk '/Depends: linux-(binary|modules)-/ {print $2}'
}

fetch_kernel() {
  local suite=$1 dest=$root/target/ktls-vm/kernels/$1
  if [ -f "$dest/vmlinuz" ] && ls "$dest"/lib/modules/*/kernel/net/tls/tls.ko >/dev/null 2>&1; then
    return
  fi
  local options
  options=$(apt_for "$suite")
  local names
  names=$(kernel_packages "$options")
  if [ -z "$names" ]; then
    apt-get $options update -qq
    names=$(kernel_packages "$options")
  fi
  [ -n "$names" ] || { echo "ktls-vm: no cloud kernel in $suite" >&2; exit 1; }
  local work
  work=$(mktemp -d)
  # shellcheck disable=SC2086 # the options and names are lists of words
  (cd "$work" && apt-get $options download $names 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  mkdir -p "$work/x"
  for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$work/x"
  done
  local modules
  modules=$(find "$work/x/lib/modules" "$work/x/usr/lib/modules" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n1 || true)
  [ -n "$modules" ] || { echo "ktls-vm: no modules in $names" >&2; exit 1; }
  rm -rf "$dest"
  mkdir -p "$dest/lib/modules"
  local vmlinuz
  vmlinuz=$(find "$work/x/boot" "$modules" -maxdepth 1 -name 'vmlinuz*' 2>/dev/null | head -n1 || true)
  [ -n "$vmlinuz" ] || { echo "ktls-vm: no vmlinuz in $names" >&2; exit 1; }
  cp "$vmlinuz" "$dest/vmlinuz"
  mv "$modules" "$dest/lib/modules/"
  find "$dest/lib/modules" -name '*.ko.xz' -exec xz -d {} +
  rm -rf "$work"
}

for suite in bookworm trixie-backports; do
  fetch_kernel "$suite"
  echo "ktls-vm: $suite $(ls "target/ktls-vm/kernels/$suite/lib/modules") ready"
done
