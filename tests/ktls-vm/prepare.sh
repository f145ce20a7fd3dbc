#!/usr/bin/env bash
# Prepares what tests/ktls_vm.rs needs to test kernel TLS for real on a machine whose own
# kernel has none: qemu (TCG), a static busybox, cpio, xz and zstd from Debian, and two Debian
# cloud kernels, which ship the `tls` module, each under target/ktls-vm/kernels/<suite>/ as
# `vmlinuz` and `lib/modules/<version>/` (modules decompressed):
#   bookworm          Debian 12's kernel (6.1): kTLS, but no rekeying of a live socket;
#   trixie-backports  the newest Debian kernel (6.14 or later): kTLS with TLS 1.3 KeyUpdate.
# Run as root on Debian 12; idempotent. CI runs it from .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

packages=(qemu-system-x86 busybox-static cpio xz-utils zstd)
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

fail() {
  echo "ktls-vm: $*" >&2
  exit 1
}

work=
trap '[ -z "$work" ] || rm -rf "$work"' EXIT

# Downloads the packages named in $names into $work; fails unless every one arrived.
download() {
  rm -f "$work"/*.deb
  # shellcheck disable=SC2086 # the options and names are lists of words
  (cd "$work" && apt-get $options download $names 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  [ "$(find "$work" -maxdepth 1 -name '*.deb' | wc -l)" -eq "$(echo "$names" | wc -w)" ]
}

fetch_kernel() {
  local suite=$1 dest=$root/target/ktls-vm/kernels/$1
  if [ -f "$dest/vmlinuz" ] && ls "$dest"/lib/modules/*/kernel/net/tls/tls.ko >/dev/null 2>&1; then
    return
  fi
  options=$(apt_for "$suite")
  work=$(mktemp -d)
  names=$(kernel_packages "$options")
  # No lists yet, or stale ones naming a kernel the archive no longer has: update, retry.
  if [ -z "$names" ] || ! download; then
    # shellcheck disable=SC2086
    apt-get $options update -qq
    names=$(kernel_packages "$options")
    [ -n "$names" ] || fail "no cloud kernel in $suite"
    download || fail "could not download $names"
  fi
  mkdir -p "$work/x"
  for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$work/x"
  done
  local modules vmlinuz
  modules=$(find "$work/x/lib/modules" "$work/x/usr/lib/modules" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n1 || true)
  [ -n "$modules" ] || fail "no modules in $names"
  vmlinuz=$(find "$work/x/boot" "$modules" -maxdepth 1 -name 'vmlinuz*' 2>/dev/null | head -n1 || true)
  [ -n "$vmlinuz" ] || fail "no vmlinuz in $names"
  # Assembled beside the destination and moved in whole: an interrupted run leaves nothing
  # that looks ready.
  local stage=$dest.new
  rm -rf "$stage"
  mkdir -p "$stage/lib/modules"
  cp "$vmlinuz" "$stage/vmlinuz"
  mv "$modules" "$stage/lib/modules/"
  find "$stage/lib/modules" -name '*.ko.xz' -exec xz -d {} +
  find "$stage/lib/modules" -name '*.ko.zst' -exec zstd -q -d --rm {} +
  ls "$stage"/lib/modules/*/kernel/net/tls/tls.ko >/dev/null 2>&1 || fail "no tls.ko in $names"
  rm -rf "$dest"
  mv "$stage" "$dest"
  rm -rf "$work"
  work=
}

for suite in bookworm trixie-backports; do
  fetch_kernel "$suite"
  echo "ktls-vm: $suite $(ls "target/ktls-vm/kernels/$suite/lib/modules") ready"
done
