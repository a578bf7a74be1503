#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with a Rust toolchain.
# Installs and starts what the tests need, then runs: format, lint, example configs, tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# govmomi's vCenter simulator, built from Debian's packages (GOPATH mode).
command -v go >/dev/null 2>&1 || need_apt+=(golang-go)
[ -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ] || need_apt+=(golang-github-vmware-govmomi-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust (https://rustup.rs) and re-run" >&2
  exit 1
fi

echo "==> building the vCenter simulator (crates/vsphere/vcsim)"
mkdir -p target
GO111MODULE=off GOPATH=/usr/share/gocode go build -o target/vcsim ./crates/vsphere/vcsim
export VCSIM_BIN="$PWD/target/vcsim"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> one crypto provider (no ring)"
if cargo tree -i ring --locked 2>/dev/null | grep -q '^ring'; then
  echo "ring is in the dependency graph; keep a single rustls provider (aws-lc-rs)" >&2
  exit 1
fi
echo "==> reflex check examples/*.yaml"
cargo build --locked --quiet
# The examples read credentials from the environment, as an operator's would.
for f in examples/*.yaml; do
  VCENTER_USER=example VCENTER_PASSWORD=example LOGINSIGHT_TOKEN=example ./target/debug/reflex check -c "$f"
done
echo "==> cargo test"
cargo test --locked --workspace
