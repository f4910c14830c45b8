#!/usr/bin/env bash
# Idempotent set-up for building and testing natt-monitor on Debian bookworm (root).
# Installs only what is missing: apt packages, the pinned Rust toolchains, bpf-linker on LLVM 22.
# Every step checks first, so a second run costs a few seconds.
#
#   scripts/setup.sh          # what building and running the monitor needs
#   scripts/setup.sh --test   # plus what the test suite needs
#   scripts/setup.sh --bench  # plus what `cargo xtask bench` needs (iperf3, tshark)
set -euo pipefail

# The toolchains are pinned in one place each: rust-toolchain.toml (userspace) and
# monitor-ebpf/rust-toolchain.toml (eBPF, whose LLVM must match bpf-linker's).
ROOT=$(cd "$(dirname "$0")/.." && pwd)
channel_of() { sed -n 's/^channel = "\(.*\)"$/\1/p' "$1"; }
STABLE=$(channel_of "$ROOT/rust-toolchain.toml")
NIGHTLY=$(channel_of "$ROOT/monitor-ebpf/rust-toolchain.toml")
if [ -z "$STABLE" ] || [ -z "$NIGHTLY" ]; then
  echo "setup.sh: no channel in rust-toolchain.toml or monitor-ebpf/rust-toolchain.toml" >&2
  exit 1
fi
BPF_LINKER_VERSION=0.13.0
LLVM=22

want_test=0
want_bench=0
for a in "$@"; do
  case "$a" in
    --test) want_test=1 ;;
    --bench) want_test=1; want_bench=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$a' (expected --test or --bench)" >&2; exit 2 ;;
  esac
done

log() { printf '[setup] %s\n' "$*" >&2; }

export DEBIAN_FRONTEND=noninteractive
export PATH="$HOME/.cargo/bin:$PATH"

pkgs=(llvm-${LLVM}-dev libpolly-${LLVM}-dev libzstd-dev zlib1g-dev)
if [ "$want_test" = 1 ]; then
  # Namespace tests: ip netns / veth, and ethtool to switch offloads per veth. prometheus:
  # promtool for the rule pack, and a real server for the end-to-end alert test.
  pkgs+=(iproute2 ethtool prometheus)
  # The VM suite (cargo xtask vm-test): QEMU for Debian's kernels, busybox and nft for the
  # guest's initramfs, xz for compressed modules. (qemu-system-x86 replaces a backported
  # qemu-utils if one is installed; the suite needs neither qemu-img nor qemu-nbd.)
  pkgs+=(qemu-system-x86 busybox-static nftables xz-utils)
  # cargo xtask dist (run by the tests): strip for the static binary, file for its check.
  # openssl and curl: a test certificate and real TLS handshakes against the endpoint.
  pkgs+=(binutils file openssl curl)
  # jsonnet: the mixin that generates the rule pack and the dashboard.
  pkgs+=(jsonnet)
  # The container image, built and run by the tests: podman, with runc (crun refuses hosts
  # whose cgroup v2 is mounted beside v1) and netavark (podman's network helper).
  pkgs+=(podman runc netavark)
  # The VM suite's systemd guest: a Debian root file system with systemd as PID 1, made by
  # mmdebstrap and written to an ext4 image by mke2fs (e2fsprogs).
  pkgs+=(mmdebstrap e2fsprogs)
fi
if [ "$want_bench" = 1 ]; then
  pkgs+=(iperf3 tshark)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The prometheus package starts a server on :9090 where systemd runs; the tests start their
  # own on a free loopback port and do not need it.
  if printf '%s\n' "${missing[@]}" | grep -qx prometheus; then
    systemctl disable --now prometheus >/dev/null 2>&1 || pkill -x prometheus || true
  fi
else
  log "apt: all present"
fi

if ! command -v rustup >/dev/null; then
  echo "setup.sh: rustup not found; install it first (https://rustup.rs)" >&2
  exit 1
fi
have_tc() { rustup toolchain list | grep -q "^$1"; }
if ! have_tc "$STABLE"; then
  log "rustup: installing $STABLE"
  rustup toolchain install "$STABLE" --profile minimal -c clippy,rustfmt
fi
if ! have_tc "$NIGHTLY" || ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q "^clippy"; then
  log "rustup: installing $NIGHTLY with rust-src, rustfmt, clippy"
  rustup toolchain install "$NIGHTLY" --profile minimal -c rust-src,rustfmt,clippy
fi

if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "cargo: installing bpf-linker $BPF_LINKER_VERSION (llvm-$LLVM)"
  PATH="/usr/lib/llvm-${LLVM}/bin:$PATH" cargo +"$STABLE" install --locked bpf-linker \
    --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-${LLVM}" --force
else
  log "bpf-linker $BPF_LINKER_VERSION present"
fi

log "done"
