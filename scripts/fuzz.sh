#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, one after the other, from the
# seed corpus in fuzz/corpus/TARGET; what the fuzzer finds goes to fuzz/corpus-run/TARGET
# (not committed; kept between runs). A crash stops the run and leaves its input in
# fuzz/artifacts/TARGET/: copy it to fuzz/regressions/TARGET/ (the suite replays every file
# there, see tests/it/fuzz_regressions.rs) and fix it.
#
#   bash scripts/fuzz.sh 600               # every target, 10 minutes each
#   bash scripts/fuzz.sh 60 soap config    # these two, a minute each
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --version ^0.13`).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(config cloudevents webhook soap syslog)
fi
cargo +nightly fuzz build -O
for t in "${targets[@]}"; do
    echo "== $t: ${secs}s"
    # -rss_limit_mb bounds what one input may make reflex hold; -max_len lets bodies grow
    # past libFuzzer's 4 KiB default (the limits under test are larger).
    mkdir -p "corpus-run/$t" "artifacts/$t"
    # The built binary itself, so that editing the sources meanwhile rebuilds nothing.
    "target/x86_64-unknown-linux-gnu/release/$t" "corpus-run/$t" "corpus/$t" \
        -artifact_prefix="artifacts/$t/" -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        2>&1 | tee "/tmp/reflex-fuzz-$t.log" | grep -E "^#[0-9]+.*(DONE|pulse)|stat::|ERROR|SUMMARY|crash-" || true
    if grep -q "ERROR: libFuzzer\|SUMMARY: .*Sanitizer" "/tmp/reflex-fuzz-$t.log"; then
        echo "$t: a crash; its input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
