#!/usr/bin/env bash
# Installs what building and testing xhost needs, skipping what is there.
# Safe to run any number of times. docs/building.md says why each piece is
# needed:
#   - a Rust compiler with the `core` sources for the eBPF target: rustup's
#     nightly with rust-src if present, else Debian's rustc-web +
#     rust-web-src, linked into rustup as the toolchain `xhost-bpf`;
#   - bpf-linker 0.13 built against LLVM 22;
#   - the network and Docker tools the tests and the demo drive;
#   - etcd (server and etcdctl) for cluster mode's tests, and protoc with the
#     well-known .proto files (libprotobuf-dev, only "Recommended" by
#     protobuf-compiler, so named here) that the etcd-client crate builds with.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
LLVM=/usr/lib/llvm-22
# systemd: `systemd-analyze verify` checks dist/xhost.service; util-linux:
# setpriv runs the agent with only the unit's capabilities.
APT_TOOLS=(iproute2 iputils-ping iperf3 sockperf tcpdump iptables ethtool conntrack bpftool
           docker.io busybox-static curl ca-certificates systemd util-linux
           etcd-server etcd-client protobuf-compiler libprotobuf-dev)
APT_RUST=(rustc-web cargo-web rust-web-src)
APT_LLVM=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev)

say() { printf 'setup: %s\n' "$*" >&2; }
missing_pkgs() { for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"; done; }

nightly_has_src() {
  command -v rustup >/dev/null || return 1
  local root; root=$(rustup run nightly rustc --print sysroot 2>/dev/null) || return 1
  [ -d "$root/lib/rustlib/src/rust/library/core" ]
}
have_bpf_linker() { command -v bpf-linker >/dev/null && bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; }

want=("${APT_TOOLS[@]}")
nightly_has_src || want+=("${APT_RUST[@]}")
have_bpf_linker || want+=("${APT_LLVM[@]}")

if [ ! -r /etc/debian_version ] || [ "$(id -u)" != 0 ]; then
  # Not a Debian machine we may change: say exactly what is needed.
  miss=()
  command -v dpkg-query >/dev/null && mapfile -t miss < <(missing_pkgs "${want[@]}")
  if [ ${#miss[@]} -gt 0 ] || ! have_bpf_linker || ! command -v rustup >/dev/null; then
    say "cannot install here (needs root on Debian). Install:"
    say "  packages (Debian names): ${want[*]}"
    say "  rustup nightly with rust-src: rustup toolchain install nightly --component rust-src"
    say "  bpf-linker: cargo install bpf-linker --version $BPF_LINKER_VERSION"
    exit 1
  fi
  exit 0
fi

mapfile -t miss < <(missing_pkgs "${want[@]}")
if [ ${#miss[@]} -gt 0 ]; then
  say "installing ${miss[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${miss[@]}" >/dev/null
fi

if ! have_bpf_linker; then
  say "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about 2 minutes)"
  # bpf-linker's build script finds LLVM through LLVM_PREFIX / llvm-config,
  # llvm-sys through LLVM_SYS_221_PREFIX: give it both.
  PATH="$LLVM/bin:$PATH" LLVM_PREFIX="$LLVM" LLVM_SYS_221_PREFIX="$LLVM" \
    cargo install bpf-linker --version "$BPF_LINKER_VERSION" --no-default-features --features llvm-22 -q
fi

if ! nightly_has_src && command -v rustup >/dev/null; then
  if ! rustup run xhost-bpf rustc --version >/dev/null 2>&1; then
    say "linking Debian's rustc-web as rustup toolchain xhost-bpf"
    rustup toolchain link xhost-bpf /usr
  fi
fi

# Pins live on bpffs; mount it where the kernel expects it if nothing has.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi
say "ready"
