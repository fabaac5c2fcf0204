#!/usr/bin/env bash
# Installs what building and testing xhost needs, skipping what is there.
# Safe to run any number of times. docs/building.md says why each piece is
# needed:
#   - a Rust compiler with the `core` sources for the eBPF target: rustup's
#     nightly with rust-src if present, else Debian's rustc-web +
#     rust-web-src, linked into rustup as the toolchain `xhost-bpf`;
#   - bpf-linker 0.13 built against LLVM 22;
#   - the network and Docker tools the tests and the demo drive;
#   - for the kernel matrix (`cargo xtask test` boots older kernels in qemu):
#     qemu-system-x86 from bookworm-backports, cpio, busybox-static, and
#     Debian's cloud kernel packages (5.10 from bullseye, 6.1 from bookworm,
#     6.12 from bookworm-backports), downloaded once into the kernel cache
#     ($XHOST_KERNELS_DIR, else target/kernels) and never installed.
#   - etcd (server and etcdctl) for cluster mode's tests, and protoc with the
#     well-known .proto files (libprotobuf-dev, only "Recommended" by
#     protobuf-compiler, so named here) that the etcd-client crate builds with;
#   - for the kernel matrix (`cargo xtask test` boots older kernels in qemu):
#     qemu-system-x86 from bookworm-backports, cpio, busybox-static, and
#     Debian's cloud kernel packages (5.10 from bullseye, 6.1 from bookworm,
#     6.12 from bookworm-backports), downloaded once into the kernel cache
#     ($XHOST_KERNELS_DIR, else target/kernels) and never installed.
set -euo pipefail

cd "$(dirname "$0")/.."

BPF_LINKER_VERSION=0.13.0
LLVM=/usr/lib/llvm-22
# systemd: `systemd-analyze verify` checks dist/xhost.service; util-linux:
# setpriv runs the agent with only the unit's capabilities.
APT_TOOLS=(iproute2 iputils-ping iperf3 sockperf tcpdump iptables ethtool conntrack bpftool
           docker.io busybox-static curl ca-certificates cpio procps util-linux systemd
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

# The kernel matrix. Its own apt configuration (sources, lists and archives under the
# kernel cache) reaches bullseye and bookworm-backports without touching the system's
# sources; the system's dpkg database is only written by the qemu install.
KERNELS_DIR=${XHOST_KERNELS_DIR:-$PWD/target/kernels}
KERNEL_SUITES=(bullseye bookworm bookworm-backports)
MIRROR=http://deb.debian.org/debian
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
APT_DIR=$KERNELS_DIR/apt
apt_private() { APT_CONFIG=$APT_DIR/apt.conf "$@"; }
apt_private_ready=
prepare_private_apt() {
  [ -n "$apt_private_ready" ] && return
  mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/archives/partial" \
           "$APT_DIR/sources.list.d" "$APT_DIR/preferences.d"
  local s
  : > "$APT_DIR/sources.list"
  for s in "${KERNEL_SUITES[@]}"; do
    echo "deb [signed-by=$KEYRING] $MIRROR $s main" >> "$APT_DIR/sources.list"
  done
  cat > "$APT_DIR/apt.conf" <<EOF
Dir::Etc::SourceList "$APT_DIR/sources.list";
Dir::Etc::SourceParts "$APT_DIR/sources.list.d";
Dir::Etc::PreferencesParts "$APT_DIR/preferences.d";
Dir::State::Lists "$APT_DIR/lists";
Dir::Cache::Archives "$APT_DIR/archives";
EOF
  say "updating the kernel matrix's own package lists ($APT_DIR)"
  apt_private apt-get update -q >/dev/null
  apt_private_ready=1
}

if ! command -v qemu-system-x86_64 >/dev/null; then
  # bookworm's qemu 7.2 would remove the machine's qemu-utils from backports.
  prepare_private_apt
  say "installing qemu-system-x86 from bookworm-backports"
  DEBIAN_FRONTEND=noninteractive apt_private apt-get install -y -q --no-install-recommends \
    -t bookworm-backports qemu-system-x86 >/dev/null
fi

# One cloud kernel per suite: the one its linux-image-cloud-amd64 names. A suite whose
# directory holds a .deb is not asked again, so a second run downloads nothing.
for suite in "${KERNEL_SUITES[@]}"; do
  dir=$KERNELS_DIR/debs/$suite
  if compgen -G "$dir/linux-image-*.deb" >/dev/null; then continue; fi
  prepare_private_apt
  # The metapackage's version in exactly this suite, then the image that version names.
  meta=$(apt_private apt-cache madison linux-image-cloud-amd64 |
         awk -F' *[|] *' -v s=" $suite/main " 'index($3, s) { print $2; exit }')
  dep=
  if [ -n "$meta" ]; then
    dep=$(apt_private apt-cache show "linux-image-cloud-amd64=$meta" |
          sed -n 's/^Depends: \(linux-image-[^ ,]*\) (= \([^)]*\)).*/\1=\2/p' | head -n1)
  fi
  if [ -z "$dep" ]; then
    say "no linux-image-cloud-amd64 in $suite"
    exit 1
  fi
  say "downloading $dep ($suite) into $dir"
  rm -rf "$dir.partial" && mkdir -p "$dir.partial"
  # apt-get download writes into the current directory.
  if ! (cd "$dir.partial" && apt_private apt-get download -q "$dep" >/dev/null 2>&1); then
    rm -rf "$dir.partial"
    say "apt-get download $dep failed"
    exit 1
  fi
  rm -rf "$dir" && mv "$dir.partial" "$dir"
done

# Pins live on bpffs; mount it where the kernel expects it if nothing has.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi
say "ready"
