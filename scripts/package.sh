#!/usr/bin/env bash
# Builds the Debian package: target/debian/reflex_VERSION-1_ARCH.deb.
# Needs cargo-deb (`cargo install --locked cargo-deb`). What goes in, besides the release
# binary: the systemd unit (packaging/reflex.service), /etc/reflex/reflex.yaml made from
# examples/quickstart.yaml (its store moved to /var/lib/reflex), the man page and the shell
# completions, both generated from the CLI by the binary itself.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --quiet
out=target/pkg
rm -rf "$out" && mkdir -p "$out/completions"
bin=target/release/reflex
"$bin" man > "$out/reflex.1"
"$bin" completions bash > "$out/completions/reflex.bash"
"$bin" completions zsh > "$out/completions/_reflex"
"$bin" completions fish > "$out/completions/reflex.fish"
sed -e 's#^  path: reflex-data/quickstart.db#  path: /var/lib/reflex/reflex.db#' \
    -e 's#^\# Run:  cargo run --release -- run -c examples/quickstart.yaml#\# Run:  systemctl enable --now reflex   (this file: /etc/reflex/reflex.yaml)#' \
    examples/quickstart.yaml > "$out/reflex.yaml"
grep -q '^  path: /var/lib/reflex/reflex.db' "$out/reflex.yaml" || {
  echo "package.sh: examples/quickstart.yaml no longer has the store path this script moves" >&2
  exit 1
}
cargo deb --no-build --locked --quiet "$@"
ls target/debian/*.deb
