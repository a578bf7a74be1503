#!/usr/bin/env bash
# Profiles issue 13's (a) — ingest only, the webhook mapping, durable, no trigger — under
# the wrk load of `reflex-bench wrk`, with `perf record -e cpu-clock`.
# Needs: a release build (cargo build --release --workspace), wrk and linux-perf.
# Prints wrk's rate and the CPU by thread and object; perf.data stays in $DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$PWD/target/release/reflex}
DIR=${DIR:-$(mktemp -d)}
HTTP=${HTTP:-18080}; API=${API:-19090}
# The same 512 bodies of 1 KB as bench/src/wrk.rs.
sed -n '/^const LUA: &str = r#"/,/^"#;/p' bench/src/wrk.rs | sed '1d;$d' > "$DIR/bodies.lua"
cat > "$DIR/a.yaml" <<YAML
http: {listen: "127.0.0.1:$HTTP", queue: 100000}
api: {listen: "127.0.0.1:$API"}
log: {level: warn}
store: {path: "$DIR/data/wrk.db"}
sources:
  - name: hook
    type: webhook
    path: /hook
    mapping: {type: "alert.{{ body.alert }}", subject: "{{ body.vm }}"}
YAML
"$BIN" run -c "$DIR/a.yaml" & pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$API/readyz" >/dev/null && break; sleep 0.1; done
wrk -t2 -c64 -d3s -s "$DIR/bodies.lua" "http://127.0.0.1:$HTTP/hook" > /dev/null
(sleep 3; perf record -e cpu-clock -F 999 -g -p $pid -o "$DIR/perf.data" -- sleep 6 >/dev/null 2>&1) &
wrk -t2 -c64 -d12s -s "$DIR/bodies.lua" "http://127.0.0.1:$HTTP/hook" | grep -E "Requests/sec|requests in"
wait %2 2>/dev/null || true
perf report -i "$DIR/perf.data" --no-children --sort comm,dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -10
echo "perf.data in $DIR"
