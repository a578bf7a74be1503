#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with a Rust toolchain.
# Installs and starts what the tests need, then runs: format, lint, example configs, tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"; else sudo apt-get update -qq && sudo apt-get install -y -qq "${need_apt[@]}"; fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust (https://rustup.rs) and re-run" >&2
  exit 1
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "==> one crypto provider (no ring)"
if cargo tree -i ring --locked 2>/dev/null | grep -q '^ring'; then
  echo "ring is in the dependency graph; keep a single rustls provider (aws-lc-rs)" >&2
  exit 1
fi
echo "==> reflex check examples/*.yaml"
cargo build --locked --quiet
for f in examples/*.yaml; do ./target/debug/reflex check -c "$f"; done
echo "==> cargo test"
cargo test --locked --workspace
