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
# PostgreSQL: the suite runs once per store backend.
command -v pg_ctlcluster >/dev/null 2>&1 || need_apt+=(postgresql)
command -v pg_isready >/dev/null 2>&1 || need_apt+=(postgresql-client)
# openssl makes the syslog TLS test's certificate; util-linux's logger sends syslog.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# util-linux's logger: the syslog source's tests send with it.
command -v logger >/dev/null 2>&1 || need_apt+=(bsdutils)
# Prometheus Alertmanager: the alertmanager source's test has the real sender notify reflex.
[ -x /usr/bin/prometheus-alertmanager ] || need_apt+=(prometheus-alertmanager)
# RabbitMQ: the amqp source and action talk to a real broker.
[ -x /usr/sbin/rabbitmq-server ] || need_apt+=(rabbitmq-server)
# Chromium and its WebDriver: the console's browser tests (tests/it/browser.rs).
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust (https://rustup.rs) and re-run" >&2
  exit 1
fi

echo "==> PostgreSQL on 127.0.0.1:5432"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if [ -z "$version" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    $SUDO pg_createcluster "$version" main
  fi
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
  pg_isready -h 127.0.0.1 -p 5432
fi
# A role of the suite's own, with a password (a fresh cluster asks one on TCP); each test
# creates its own database, and the databases of earlier runs are dropped here.
as_postgres psql -qtAc "SELECT 1 FROM pg_roles WHERE rolname = 'reflex'" | grep -q 1 \
  || as_postgres psql -qc "CREATE ROLE reflex LOGIN CREATEDB PASSWORD 'reflex'"
as_postgres psql -qtAc "SELECT datname FROM pg_database WHERE datname LIKE 'reflex\_t\_%'" \
  | while read -r db; do [ -n "$db" ] && as_postgres dropdb --if-exists "$db" || true; done
export REFLEX_TEST_PG=postgres://reflex:reflex@127.0.0.1:5432/postgres
# How the restart test stops and starts this server (a Debian cluster).
export REFLEX_TEST_PG_CTL="$SUDO pg_ctlcluster --skip-systemctl-redirect $version main"

echo "==> RabbitMQ on 127.0.0.1:5672"
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! rabbit_up; then
  $SUDO rabbitmq-server -detached || true
  for _ in $(seq 1 120); do rabbit_up && break; sleep 0.5; done
  rabbit_up || { echo "RabbitMQ did not start on 127.0.0.1:5672" >&2; exit 1; }
fi
# The suite connects as guest/guest, which RabbitMQ allows from loopback only.
export REFLEX_TEST_AMQP=amqp://guest:guest@127.0.0.1:5672/%2f

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
  VCENTER_USER=example VCENTER_PASSWORD=example LOGINSIGHT_TOKEN=example ALERTMANAGER_TOKEN=example SLACK_SIGNING_SECRET=example SLACK_APPROVALS_WEBHOOK=https://hooks.slack.com/services/example CHAT_WEBHOOK_PATH=example VROPS_PASSWORD=example \
    AMQP_URL=amqp://example:example@rabbitmq.example.com:5672/%2f REFLEX_ADMIN_TOKEN=example-admin-token \
    REFLEX_PG_URL=postgres://reflex:example@db.example.com/reflex ./target/debug/reflex check -c "$f"
done
echo "==> cargo test (embedded SQLite store)"
cargo test --locked --workspace
echo "==> cargo test (PostgreSQL store): the integration suite again, REFLEX_TEST_STORE=postgres"
REFLEX_TEST_STORE=postgres cargo test --locked --test it
echo "==> cargo test (RabbitMQ bus): the integration suite again, REFLEX_TEST_BUS=amqp on PostgreSQL"
# In a virtual host of its own, made afresh and deleted after: each test declares its own
# exchange and quorum queues, and none of them outlives the run.
$SUDO rabbitmqctl -q delete_vhost reflex_test >/dev/null 2>&1 || true
$SUDO rabbitmqctl -q add_vhost reflex_test
$SUDO rabbitmqctl -q set_permissions -p reflex_test guest ".*" ".*" ".*"
REFLEX_TEST_STORE=postgres REFLEX_TEST_BUS=amqp REFLEX_TEST_AMQP=amqp://guest:guest@127.0.0.1:5672/reflex_test \
  cargo test --locked --test it
$SUDO rabbitmqctl -q delete_vhost reflex_test || true
echo "==> PostgreSQL restarted under load (alone: it restarts the shared server)"
REFLEX_TEST_STORE=postgres cargo test --locked --test it postgres_restarted_under_load -- --ignored
echo "==> RabbitMQ stopped and started under load (alone: it stops the shared broker)"
REFLEX_TEST_STORE=postgres cargo test --locked --test it rabbitmq_restarted_under_load -- --ignored
rabbit_up || { $SUDO rabbitmqctl start_app || true; }
pg_isready -q -h 127.0.0.1 -p 5432
echo "==> the Debian package: built, installed with dpkg, checked, removed"
command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb
bash scripts/package.sh
deb=$(ls -t target/debian/reflex_*.deb | head -n 1)
REFLEX_TEST_DEB="$PWD/$deb" cargo test --locked --test it the_package_installs -- --ignored
