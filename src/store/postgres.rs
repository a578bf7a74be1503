//! The store and bus on PostgreSQL, shared by every node with the same URL.
//!
//! Events, deliveries, attempts, dedup keys, throttle windows and checkpoints live in the
//! database, so every node sees the same history and dedup holds across nodes (a unique
//! index on the events, not memory). Ingest batches concurrent requests into one statement
//! (group commit). A node runs a delivery only after claiming it: one `UPDATE` that succeeds for
//! a single node, and for a delivery with an ordering key only once every earlier delivery
//! of that key is finished. A claim carries a lease that the node renews while the attempt
//! runs; a node that dies leaves its running deliveries to the others once the lease ends.

use super::{
    now_ms, Approval, ApprovalChange, ApprovalState, AttemptRecord, Checkpoint, DeliveryQuery,
    DeliveryRecord, EventDetail, EventQuery, EventSummary, NewApproval, NewEvent, OpenDelivery,
    PausedTrigger, Retention, State, StoreError, Stored,
};
use super::{ApiToken, AuditEntry, NewAudit, Session};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

/// Most events committed in one ingest transaction.
const MAX_BATCH_EVENTS: usize = 1000;
/// Ingest statements in flight at once (each takes a batch of requests). Two: measured
/// with 64 concurrent senders on 2 cores (`reflex-bench pg-store`), one writer held 31k
/// events/s, two 48–50k, three 52k, four 38k; two keep one batch filling while the other
/// waits for its commit.
const WRITERS: usize = 2;
/// How long a request waits for a connection before it is answered "unavailable".
const POOL_WAIT: Duration = Duration::from_secs(5);

/// The schema, one migration per version, applied in order at start. A migration is never
/// changed once released: a change is a new migration.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "events, deliveries, attempts, dedup keys, throttles, checkpoints, nodes, leases",
        r#"
CREATE TABLE events (
    seq BIGSERIAL PRIMARY KEY,
    source_name TEXT NOT NULL,
    ce_source TEXT NOT NULL,
    ce_id TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT,
    received_at BIGINT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX events_received ON events (received_at);
CREATE TABLE dedup_keys (
    key BYTEA PRIMARY KEY,
    at BIGINT NOT NULL
);
CREATE INDEX dedup_keys_at ON dedup_keys (at);
CREATE TABLE deliveries (
    id BIGSERIAL PRIMARY KEY,
    event_seq BIGINT NOT NULL,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    attempt_base INTEGER NOT NULL DEFAULT 0,
    ordering_key TEXT,
    next_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_error TEXT,
    owner TEXT,
    lease_until BIGINT
);
CREATE INDEX deliveries_event ON deliveries (event_seq);
CREATE INDEX deliveries_state ON deliveries (state, id);
CREATE INDEX deliveries_open ON deliveries (id) WHERE state IN ('pending', 'retrying', 'running');
CREATE INDEX deliveries_due ON deliveries (next_at)
    WHERE state IN ('pending', 'retrying') AND next_at IS NOT NULL;
CREATE INDEX deliveries_key ON deliveries (trigger, ordering_key, id)
    WHERE ordering_key IS NOT NULL AND state IN ('pending', 'retrying', 'running');
CREATE INDEX deliveries_owner ON deliveries (owner) WHERE state = 'running';
CREATE TABLE attempts (
    delivery_id BIGINT NOT NULL,
    n INTEGER NOT NULL,
    started_at BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    node TEXT,
    PRIMARY KEY (delivery_id, n)
);
CREATE TABLE checkpoints (
    source TEXT PRIMARY KEY,
    position BIGINT NOT NULL,
    time TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE throttles (
    trigger TEXT NOT NULL,
    key TEXT NOT NULL,
    until BIGINT NOT NULL,
    PRIMARY KEY (trigger, key)
);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    version TEXT NOT NULL
);
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    until BIGINT NOT NULL,
    fence BIGINT NOT NULL
);
"#,
    ),
    (
        2,
        "dedup keys held by the events themselves",
        // One unique index on the events instead of a table of its own: an event and its
        // key are one row, one index entry and no second lookup. Keys of the events already
        // stored are computed as `dedup_key` in the code computes them; where one key was
        // stored twice (after its window had passed), the later event holds it.
        r#"
ALTER TABLE events ADD COLUMN dedup_key BYTEA;
UPDATE events e SET dedup_key = k.key FROM (
    SELECT DISTINCT ON (key) seq, key FROM (
        SELECT seq, substring(sha256(
            int8send(octet_length(convert_to(source_name, 'UTF8'))::int8) || convert_to(source_name, 'UTF8') ||
            int8send(octet_length(convert_to(ce_source, 'UTF8'))::int8) || convert_to(ce_source, 'UTF8') ||
            convert_to(ce_id, 'UTF8')) from 1 for 16) AS key
        FROM events
    ) x ORDER BY key, seq DESC
) k WHERE e.seq = k.seq;
CREATE UNIQUE INDEX events_dedup ON events (dedup_key) WHERE dedup_key IS NOT NULL;
DROP TABLE dedup_keys;
"#,
    ),
    (
        3,
        "paused triggers",
        r#"
CREATE TABLE trigger_pauses (
    trigger TEXT PRIMARY KEY,
    since BIGINT NOT NULL,
    reason TEXT NOT NULL,
    resumed_at BIGINT
);
"#,
    ),
    (
        4,
        "approvals",
        r#"
CREATE TABLE approvals (
    id BIGSERIAL PRIMARY KEY,
    delivery_id BIGINT NOT NULL,
    trigger TEXT NOT NULL,
    step TEXT NOT NULL,
    state TEXT NOT NULL,
    plan TEXT NOT NULL,
    event_type TEXT NOT NULL,
    subject TEXT,
    requested_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    decided_by TEXT,
    decided_at BIGINT,
    reason TEXT,
    UNIQUE (delivery_id, step)
);
CREATE INDEX approvals_by_state ON approvals (state, id);
"#,
    ),
    (
        5,
        "correlation windows",
        r#"
CREATE TABLE correlations (
    trigger TEXT NOT NULL,
    key TEXT NOT NULL,
    event_seq BIGINT NOT NULL,
    delivery_id BIGINT NOT NULL,
    at BIGINT NOT NULL,
    fired_by BIGINT
);
CREATE INDEX correlations_open ON correlations (trigger, key) WHERE fired_by IS NULL;
CREATE INDEX correlations_fired ON correlations (fired_by) WHERE fired_by IS NOT NULL;
"#,
    ),
    (
        6,
        "API tokens, console sessions, audit log",
        r#"
CREATE TABLE api_tokens (
    id BIGSERIAL PRIMARY KEY,
    "user" TEXT NOT NULL,
    label TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE sessions (
    hash TEXT PRIMARY KEY,
    "user" TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE audit_log (
    id BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL,
    remote TEXT NOT NULL
);
"#,
    ),
    (
        7,
        "the AMQP bus's bindings, to unbind the ones a configuration no longer implies",
        r#"
CREATE TABLE bus_bindings (
    queue TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (queue, key)
);
"#,
    ),
];

/// Any number serves, as long as every node uses the same: start-ups take it in turn.
const MIGRATION_LOCK: i64 = 0x7265_666c_6578; // "reflex"

/// How to reach the server, from `store.url`.
#[derive(Clone)]
pub struct PgOptions {
    /// The URL (it may hold a password: never shown).
    pub url: String,
    /// Most connections.
    pub pool_size: usize,
    /// Lease of a claimed delivery.
    pub lease: Duration,
    /// This node's name.
    pub node: String,
    /// Dedup window.
    pub dedup_window: Duration,
}

/// The PostgreSQL store and bus; cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Writes that must be durable (ingest, attempt records, replay, checkpoints).
    pool: Pool,
    /// Claims, leases and put-off times: a crash that loses one only makes a delivery
    /// open again, so these commit without waiting for the disk.
    fast: Pool,
    ingest: mpsc::Sender<IngestOp>,
    /// Claims, taken in batches: one statement claims what is waiting.
    claims: mpsc::Sender<Op<i64, bool>>,
    /// Attempt records, taken in batches: one durable statement records what is waiting.
    finishes: mpsc::Sender<Op<Finish, ()>>,
    node: String,
    lease_ms: i64,
    /// Nodes whose heartbeat is within a lease, this one included: they share each
    /// trigger's `rate:`.
    live_nodes: std::sync::atomic::AtomicU32,
    dedup_window_ms: i64,
}

/// A request to a batching task and where its answer goes.
type Op<T, R> = (T, oneshot::Sender<Result<R, StoreError>>);

/// An attempt to record: (delivery, record, new state, next attempt time).
type Finish = (i64, AttemptRecord, State, Option<i64>);

/// Most requests one batched claim or attempt-record statement takes.
const MAX_BATCH_OPS: usize = 512;

/// Runs `run` over batches of what waits in `rx` (one batch at a time: while a statement
/// is in flight the next batch gathers), answering each request with its own result.
fn spawn_batcher<T, R, F, Fut>(
    inner: std::sync::Weak<Inner>,
    mut rx: mpsc::Receiver<Op<T, R>>,
    run: F,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Arc<Inner>, Vec<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<R>, StoreError>> + Send,
{
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_OPS {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let Some(inner) = inner.upgrade() else { return };
            let (items, replies): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
            match run(inner, items).await {
                Ok(results) => {
                    for (reply, r) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(r));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(same_error(&e)));
                    }
                }
            }
        }
    });
}

/// Claims a batch of deliveries for this node; `true` for each one it got.
async fn claim_batch(inner: Arc<Inner>, ids: Vec<i64>) -> Result<Vec<bool>, StoreError> {
    let err = |e| pg_error("claiming deliveries", e);
    let now = now_ms();
    let client = inner.fast.get().await.map_err(pool_error)?;
    // A retry may be claimed up to 100 ms early: a node's timer and the database's clock
    // are read at different moments. A keyed delivery waits for every earlier open one of
    // its key (within a batch too: the statement sees the earlier one still open).
    let st = client
        .prepare_cached(
            "UPDATE deliveries d SET state = 'running', owner = $2, lease_until = $3, updated_at = $4
             WHERE d.id = ANY($1::int8[])
               AND ((d.state IN ('pending', 'retrying') AND (d.next_at IS NULL OR d.next_at <= $4::int8 + 100))
                    OR (d.state = 'running' AND (d.owner = $2 OR d.lease_until < $4)))
               AND (d.ordering_key IS NULL OR NOT EXISTS (
                    SELECT 1 FROM deliveries o
                    WHERE o.trigger = d.trigger AND o.ordering_key = d.ordering_key AND o.id < d.id
                      AND o.state IN ('pending', 'retrying', 'running')))
             RETURNING d.id",
        )
        .await
        .map_err(err)?;
    let claimed: HashSet<i64> = client
        .query(&st, &[&ids, &inner.node, &(now + inner.lease_ms), &now])
        .await
        .map_err(err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The same delivery asked twice in one batch (two copies of its message) is given once.
    let mut given = HashSet::with_capacity(ids.len());
    Ok(ids
        .iter()
        .map(|id| claimed.contains(id) && given.insert(*id))
        .collect())
}

/// Records a batch of attempts and their deliveries' new states in one durable statement.
async fn finish_batch(inner: Arc<Inner>, done: Vec<Finish>) -> Result<Vec<()>, StoreError> {
    let err = |e| pg_error("recording attempts", e);
    let n = done.len();
    let mut id = Vec::with_capacity(n);
    let mut attempt = Vec::with_capacity(n);
    let mut started_at = Vec::with_capacity(n);
    let mut duration_ms = Vec::with_capacity(n);
    let mut outcome = Vec::with_capacity(n);
    let mut detail = Vec::with_capacity(n);
    let mut state = Vec::with_capacity(n);
    let mut next_at = Vec::with_capacity(n);
    let mut last_error: Vec<Option<String>> = Vec::with_capacity(n);
    // One row per delivery: a record kept back and sent again can meet its own retry.
    let mut seen = HashSet::new();
    for (d, record, st, next) in done.into_iter().rev() {
        if !seen.insert((d, record.n)) {
            continue;
        }
        id.push(d);
        attempt.push(record.n as i32);
        started_at.push(record.started_at);
        duration_ms.push(record.duration_ms);
        last_error.push((record.outcome != "succeeded").then(|| record.detail.clone()));
        outcome.push(record.outcome);
        detail.push(record.detail);
        state.push(st.as_str());
        next_at.push(next);
    }
    let client = inner.pool.get().await.map_err(pool_error)?;
    // Planned for each batch (an unnamed statement, one round trip), not prepared: a
    // prepared statement's generic plan, made while the table was small (a new database),
    // kept a hash join over a sequential scan of every delivery — 13,798 rows read to
    // update 2, 15–25 ms a batch, seen with auto_explain under load.
    //
    // The state changes only while this node holds the delivery (or nobody does, for a
    // delivery dead-lettered without running): a node whose lease ran out and was taken
    // over does not overwrite the new owner's outcome. The latest attempt of a delivery
    // sets its state, and a record written again (its first answer was lost) or late (a
    // later attempt was recorded first) changes nothing.
    const FINISH: &str = "WITH a AS (
                INSERT INTO attempts (delivery_id, n, started_at, duration_ms, outcome, detail, node)
                SELECT u.id, u.n, u.started_at, u.duration_ms, u.outcome, u.detail, $10
                FROM UNNEST($1::int8[], $2::int4[], $3::int8[], $4::int8[], $5::text[], $6::text[])
                     AS u(id, n, started_at, duration_ms, outcome, detail)
                ON CONFLICT (delivery_id, n) DO NOTHING),
             latest AS (
                SELECT DISTINCT ON (u.id) u.*
                FROM UNNEST($1::int8[], $2::int4[], $7::text[], $8::int8[], $9::text[])
                     AS u(id, n, state, next_at, last_error)
                ORDER BY u.id, u.n DESC)
             UPDATE deliveries d SET state = l.state, attempts = l.n, next_at = l.next_at,
                    updated_at = $11, last_error = l.last_error, owner = NULL, lease_until = NULL
             FROM latest l
             WHERE d.id = l.id AND (d.owner = $10 OR d.owner IS NULL) AND d.attempts < l.n";
    use tokio_postgres::types::Type;
    client
        .execute_typed(
            FINISH,
            &[
                (&id, Type::INT8_ARRAY),
                (&attempt, Type::INT4_ARRAY),
                (&started_at, Type::INT8_ARRAY),
                (&duration_ms, Type::INT8_ARRAY),
                (&outcome, Type::TEXT_ARRAY),
                (&detail, Type::TEXT_ARRAY),
                (&state, Type::TEXT_ARRAY),
                (&next_at, Type::INT8_ARRAY),
                (&last_error, Type::TEXT_ARRAY),
                (&inner.node, Type::TEXT),
                (&now_ms(), Type::INT8),
            ],
        )
        .await
        .map_err(err)?;
    Ok(vec![(); n])
}

type IngestOp = (
    Vec<NewEvent>,
    oneshot::Sender<Result<Vec<Stored>, StoreError>>,
);

/// Maps a driver error to the store's: connection trouble is "unavailable" (retry later).
fn pg_error(what: &str, e: tokio_postgres::Error) -> StoreError {
    let lost = e.is_closed()
        || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
        || e.to_string().contains("timeout");
    let unavailable = match e.as_db_error() {
        None => lost,
        // 08: connection exception; 57P0x: the server is shutting down or starting;
        // 53: insufficient resources.
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
        }
    };
    let message = match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    };
    if unavailable {
        StoreError::Unavailable {
            backend: "postgres",
            message: format!("{what}: {message}"),
        }
    } else {
        StoreError::Backend {
            backend: "postgres",
            what: what.to_string(),
            message,
        }
    }
}

/// The same failure for each request of a batch.
fn same_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable { backend, message } => StoreError::Unavailable {
            backend,
            message: message.clone(),
        },
        StoreError::Backend {
            backend,
            what,
            message,
        } => StoreError::Backend {
            backend,
            what: what.clone(),
            message: message.clone(),
        },
        other => StoreError::Backend {
            backend: "postgres",
            what: "storing events".into(),
            message: other.to_string(),
        },
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error("connecting", e),
        e => StoreError::Unavailable {
            backend: "postgres",
            message: format!("no connection: {e}"),
        },
    }
}

/// Splits what tokio-postgres does not read off the URL: `sslrootcert` (a CA file) and
/// the `verify-ca`/`verify-full` modes (certificates are always verified here).
fn parse_url(raw: &str) -> Result<(tokio_postgres::Config, Option<PathBuf>), String> {
    let mut url = url::Url::parse(raw).map_err(|e| {
        format!("store.url: not a URL ({e}); expected postgres://USER:PASSWORD@HOST:PORT/DATABASE")
    })?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "store.url: scheme `{}` is not supported; expected postgres://",
            url.scheme()
        ));
    }
    let mut ca = None;
    let mut mode = None;
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut kept = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "sslrootcert" => ca = Some(PathBuf::from(v)),
            "sslmode" => mode = Some(v),
            _ => kept.push((k, v)),
        }
    }
    let loopback = match url.host() {
        None => true,
        // `postgres:` is not a special scheme to the URL parser: addresses come as names.
        Some(url::Host::Domain(d)) => {
            d == "localhost"
                || d.trim_matches(|c| c == '[' || c == ']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
    };
    // TLS by default off loopback; on loopback, plain unless asked for.
    let mode = match mode.as_deref() {
        None if loopback => "disable",
        None => "require",
        Some("disable") => "disable",
        Some("prefer") => "prefer",
        Some("require" | "verify-ca" | "verify-full") => "require",
        Some(other) => {
            return Err(format!(
                "store.url: sslmode `{other}` is not supported; use disable, prefer, require, verify-ca or verify-full"
            ))
        }
    };
    kept.push(("sslmode".into(), mode.into()));
    url.query_pairs_mut().clear().extend_pairs(kept);
    let config: tokio_postgres::Config = url.as_str().parse().map_err(|e| {
        format!("store.url: {e}; expected postgres://USER:PASSWORD@HOST:PORT/DATABASE")
    })?;
    if config.get_dbname().is_none() {
        return Err(
            "store.url: no database name; expected postgres://USER:PASSWORD@HOST:PORT/DATABASE"
                .into(),
        );
    }
    Ok((config, ca))
}

/// Verifies the server's certificate against the system's CAs and `sslrootcert`.
fn tls(ca: Option<&PathBuf>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("store.url sslrootcert {}: {e}", path.display()))?;
        for cert in certs {
            let cert =
                cert.map_err(|e| format!("store.url sslrootcert {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("store.url sslrootcert {}: {e}", path.display()))?;
        }
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn pool(
    mut config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    size: usize,
    options: &str,
) -> Result<Pool, String> {
    config
        .connect_timeout(POOL_WAIT)
        .application_name("reflex")
        .options(options);
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(2))
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(POOL_WAIT))
        .recycle_timeout(Some(POOL_WAIT))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| format!("store.url: {e}"))
}

/// The migrations not yet applied to the database at `url`, as (version, name, SQL).
pub async fn pending_migrations(url: &str) -> Result<Vec<(i32, String, String)>, StoreError> {
    let (config, ca) = parse_url(url).map_err(StoreError::Config)?;
    let pool = pool(config, tls(ca.as_ref()).map_err(StoreError::Config)?, 1, "")
        .map_err(StoreError::Config)?;
    let client = pool.get().await.map_err(pool_error)?;
    let applied = applied_migrations(&client).await?;
    Ok(MIGRATIONS
        .iter()
        .filter(|(v, _, _)| !applied.contains(v))
        .map(|(v, n, sql)| (*v, n.to_string(), sql.to_string()))
        .collect())
}

/// Applies the pending migrations to the database at `url`; returns how many ran.
pub async fn apply_migrations(url: &str) -> Result<usize, StoreError> {
    let pending = pending_migrations(url).await?.len();
    let (config, ca) = parse_url(url).map_err(StoreError::Config)?;
    let pool = pool(config, tls(ca.as_ref()).map_err(StoreError::Config)?, 1, "")
        .map_err(StoreError::Config)?;
    let mut client = pool.get().await.map_err(pool_error)?;
    migrate(&mut client).await?;
    Ok(pending)
}

async fn applied_migrations(client: &tokio_postgres::Client) -> Result<HashSet<i32>, StoreError> {
    let exists = client
        .query_one("SELECT to_regclass('reflex_migrations') IS NOT NULL", &[])
        .await
        .map_err(|e| pg_error("reading the schema version", e))?;
    if !exists.get::<_, bool>(0) {
        return Ok(HashSet::new());
    }
    let rows = client
        .query("SELECT version FROM reflex_migrations", &[])
        .await
        .map_err(|e| pg_error("reading the schema version", e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), StoreError> {
    let err = |e| pg_error("migrating the schema", e);
    let tx = client.transaction().await.map_err(err)?;
    // Several nodes starting at once apply each migration once.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS reflex_migrations (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .await
    .map_err(err)?;
    let applied: HashSet<i32> = tx
        .query("SELECT version FROM reflex_migrations", &[])
        .await
        .map_err(err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(newer) = applied
        .iter()
        .find(|v| !MIGRATIONS.iter().any(|m| m.0 == **v))
    {
        return Err(StoreError::Config(format!(
            "the database has schema version {newer}, which this reflex does not know: it was written by a newer release; run that release"
        )));
    }
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tracing::info!(version, name, "applying a store migration");
        tx.batch_execute(sql).await.map_err(err)?;
        tx.execute(
            "INSERT INTO reflex_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            &[version, name, &now_ms()],
        )
        .await
        .map_err(err)?;
    }
    tx.commit().await.map_err(err)
}

impl PgStore {
    /// Connects, applies pending migrations, registers this node and starts its ingest
    /// writers and lease renewal. A bad URL or refused login is reported with the setting.
    pub async fn open(o: PgOptions) -> Result<PgStore, StoreError> {
        let (config, ca) = parse_url(&o.url).map_err(StoreError::Config)?;
        let tls = tls(ca.as_ref()).map_err(StoreError::Config)?;
        let target = format!(
            "{}@{:?}/{}",
            config.get_user().unwrap_or("?"),
            config.get_hosts().first(),
            config.get_dbname().unwrap_or("?")
        );
        let pool_size = o.pool_size.max(4);
        let durable = pool(
            config.clone(),
            tls.clone(),
            pool_size,
            "-c statement_timeout=30000 -c client_min_messages=warning",
        )
        .map_err(StoreError::Config)?;
        let fast = pool(
            config,
            tls,
            pool_size,
            "-c synchronous_commit=off -c statement_timeout=30000 -c client_min_messages=warning",
        )
        .map_err(StoreError::Config)?;
        let mut client = durable.get().await.map_err(|e| {
            StoreError::Config(format!(
                "store.url: cannot connect to PostgreSQL as {target}: {}; check the host, port, user, password and database",
                pool_error(e)
            ))
        })?;
        migrate(&mut client).await?;
        let now = now_ms();
        // A node restarted under the same name runs again what it was running.
        client
            .execute(
                "UPDATE deliveries SET state = CASE WHEN attempts > attempt_base THEN 'retrying' ELSE 'pending' END,
                        owner = NULL, lease_until = NULL
                 WHERE state = 'running' AND owner = $1",
                &[&o.node],
            )
            .await
            .map_err(|e| pg_error("releasing this node's deliveries", e))?;
        client
            .execute(
                "INSERT INTO nodes (id, started_at, heartbeat_at, version) VALUES ($1, $2, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET started_at = $2, heartbeat_at = $2, version = $3",
                &[&o.node, &now, &env!("CARGO_PKG_VERSION")],
            )
            .await
            .map_err(|e| pg_error("registering this node", e))?;
        drop(client);
        let (tx, rx) = mpsc::channel(65_536);
        let (claims, claims_rx) = mpsc::channel(65_536);
        let (finishes, finishes_rx) = mpsc::channel(65_536);
        let inner = Arc::new(Inner {
            pool: durable,
            fast,
            ingest: tx,
            claims,
            finishes,
            node: o.node,
            lease_ms: o.lease.as_millis() as i64,
            live_nodes: std::sync::atomic::AtomicU32::new(1),
            dedup_window_ms: o.dedup_window.as_millis() as i64,
        });
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..WRITERS {
            tokio::spawn(writer(Arc::downgrade(&inner), rx.clone()));
        }
        spawn_batcher(Arc::downgrade(&inner), claims_rx, claim_batch);
        spawn_batcher(Arc::downgrade(&inner), finishes_rx, finish_batch);
        tokio::spawn(renew_leases(Arc::downgrade(&inner), o.lease));
        Ok(PgStore { inner })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.inner.pool.get().await.map_err(pool_error)
    }

    /// Hands a request to its batching task and waits for the answer.
    async fn batched<T, R>(&self, to: &mpsc::Sender<Op<T, R>>, item: T) -> Result<R, StoreError> {
        let (reply, answer) = oneshot::channel();
        to.send((item, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn fast(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.inner.fast.get().await.map_err(pool_error)
    }

    async fn query(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(sql)
            .await
            .map_err(|e| pg_error(what, e))?;
        client
            .query(&st, params)
            .await
            .map_err(|e| pg_error(what, e))
    }
}

/// Renews the leases of the deliveries this node runs, and its heartbeat, three times a
/// lease; stops with the store.
async fn renew_leases(inner: std::sync::Weak<Inner>, lease: Duration) {
    let mut tick = tokio::time::interval((lease / 3).max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = now_ms();
        let result = async {
            let client = inner.fast.get().await.map_err(pool_error)?;
            client
                .execute(
                    "UPDATE deliveries SET lease_until = $2 WHERE owner = $1 AND state = 'running'",
                    &[&inner.node, &(now + inner.lease_ms)],
                )
                .await
                .map_err(|e| pg_error("renewing leases", e))?;
            client
                .execute(
                    "UPDATE nodes SET heartbeat_at = $2 WHERE id = $1",
                    &[&inner.node, &now],
                )
                .await
                .map_err(|e| pg_error("heartbeat", e))?;
            let live: i64 = client
                .query_one(
                    "SELECT count(*) FROM nodes WHERE heartbeat_at >= $1",
                    &[&(now - inner.lease_ms)],
                )
                .await
                .map_err(|e| pg_error("counting live nodes", e))?
                .get(0);
            let live = live.clamp(1, i64::from(u32::MAX)) as u32;
            let before = inner
                .live_nodes
                .swap(live, std::sync::atomic::Ordering::Relaxed);
            if before != live {
                tracing::info!(
                    nodes = live,
                    "live nodes changed; each trigger's rate is shared by them"
                );
            }
            Ok::<_, StoreError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot renew this node's leases; other nodes may take its deliveries over");
        }
    }
}

/// Takes batches of ingest requests and commits each batch in one transaction.
async fn writer(inner: std::sync::Weak<Inner>, rx: Arc<Mutex<mpsc::Receiver<IngestOp>>>) {
    loop {
        let mut batch: Vec<IngestOp> = Vec::new();
        {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(op) => batch.push(op),
                None => return,
            }
            let mut events = batch[0].0.len();
            while events < MAX_BATCH_EVENTS {
                match rx.try_recv() {
                    Ok(op) => {
                        events += op.0.len();
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let sizes: Vec<usize> = batch.iter().map(|(e, _)| e.len()).collect();
        let (events, replies): (Vec<Vec<NewEvent>>, Vec<_>) = batch.into_iter().unzip();
        let events: Vec<NewEvent> = events.into_iter().flatten().collect();
        match ingest(&inner, events).await {
            Ok(stored) => {
                let mut stored = stored.into_iter();
                for (reply, n) in replies.into_iter().zip(sizes) {
                    let _ = reply.send(Ok(stored.by_ref().take(n).collect()));
                }
            }
            Err(e) => {
                // Each sender is answered 503 and logs it; the batch is not logged again.
                for reply in replies {
                    let _ = reply.send(Err(same_error(&e)));
                }
            }
        }
    }
}

/// Stores a batch of events and their deliveries, in one statement when no trigger
/// throttles (see [`INSERT_EVENTS`]).
async fn ingest(inner: &Inner, events: Vec<NewEvent>) -> Result<Vec<Stored>, StoreError> {
    let client = inner.pool.get().await.map_err(pool_error)?;
    let result = ingest_on(&client, inner, events).await;
    if result.is_err() {
        // The transaction may still be open on this connection: do not give it back.
        let _ = deadpool_postgres::Object::take(client);
    }
    result
}

async fn ingest_on(
    client: &deadpool_postgres::Client,
    inner: &Inner,
    events: Vec<NewEvent>,
) -> Result<Vec<Stored>, StoreError> {
    let now = now_ms();
    // Only the first of a key in this batch can be new; the database decides whether it is.
    let mut seen = HashSet::new();
    let mut rows: Vec<EventRow> = Vec::with_capacity(events.len());
    let mut place: Vec<Option<usize>> = Vec::with_capacity(events.len());
    for e in events {
        let key = dedup_key(&e.source_name, &e.ce_source, &e.ce_id);
        if seen.insert(key) {
            place.push(Some(rows.len()));
            rows.push(EventRow {
                key,
                e,
                seq: None,
                deliveries: vec![],
            });
        } else {
            place.push(None);
        }
    }
    insert_events(client, rows.iter_mut().collect(), now).await?;
    // A key is held by the last event stored with it. Once that event is older than the
    // window the key is released (here, when it is met again) and the new event takes it.
    let held: Vec<&[u8]> = rows
        .iter()
        .filter(|r| r.seq.is_none())
        .map(|r| r.key.as_slice())
        .collect();
    if !held.is_empty() {
        let released: HashSet<Vec<u8>> = client
            .query(
                "UPDATE events e SET dedup_key = NULL
                 FROM (SELECT seq, dedup_key FROM events
                       WHERE dedup_key = ANY($1) AND received_at < $2 FOR UPDATE) old
                 WHERE e.seq = old.seq
                 RETURNING old.dedup_key",
                &[&held, &(now - inner.dedup_window_ms)],
            )
            .await
            .map_err(|e| pg_error("releasing dedup keys past their window", e))?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        if !released.is_empty() {
            let again = rows
                .iter_mut()
                .filter(|r| released.contains(r.key.as_slice()))
                .collect();
            insert_events(client, again, now).await?;
        }
    }
    let mut rows: Vec<Option<EventRow>> = rows.into_iter().map(Some).collect();
    Ok(place
        .into_iter()
        .map(|at| match at.and_then(|i| rows[i].take()) {
            Some(EventRow {
                seq: Some(seq),
                deliveries,
                ..
            }) => Stored {
                seq,
                duplicate: false,
                deliveries,
            },
            _ => Stored {
                seq: 0,
                duplicate: true,
                deliveries: vec![],
            },
        })
        .collect())
}

/// The dedup key as this store keeps it: the first 16 bytes of SHA-256 over (big-endian
/// length, receiving source, big-endian length, CloudEvents source, id). Migration 2
/// computes the same in SQL for the events stored before it.
fn dedup_key(received_by: &str, source: &str, id: &str) -> [u8; 16] {
    super::dedup::digest(received_by, source, id, u64::to_be_bytes)
}

/// An event on its way in; `seq` and `deliveries` are set once it is stored.
struct EventRow {
    key: [u8; 16],
    e: NewEvent,
    seq: Option<i64>,
    deliveries: Vec<(i64, State)>,
}

/// One statement stores each event whose dedup key is free, with its deliveries, and
/// answers the numbers given. Numbers follow the order of arrival (`nextval` runs after
/// the `ORDER BY`), so a request's events and a key's deliveries keep their order; rows go
/// into the unique index in key order, so that concurrent batches wait for each other's
/// keys in the same order instead of deadlocking.
const INSERT_EVENTS: &str = "
WITH e AS (
    SELECT nextval('events_seq_seq') AS seq, u.*
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[])
         WITH ORDINALITY AS u(source_name, ce_source, ce_id, type, subject, body, dedup_key, ord)
    ORDER BY u.ord
),
ev AS (
    INSERT INTO events (seq, source_name, ce_source, ce_id, type, subject, body, dedup_key, received_at)
    SELECT seq, source_name, ce_source, ce_id, type, subject, body, dedup_key, $8 FROM e ORDER BY dedup_key
    ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
    RETURNING seq
),
d AS (
    SELECT nextval('deliveries_id_seq') AS id, x.*
    FROM UNNEST($9::int8[], $10::text[], $11::text[], $12::text[])
         WITH ORDINALITY AS x(event, trigger, state, ordering_key, ord)
    ORDER BY x.ord
),
dv AS (
    INSERT INTO deliveries (id, event_seq, trigger, state, ordering_key, created_at, updated_at)
    SELECT d.id, e.seq, d.trigger, d.state, d.ordering_key, $8, $8
    FROM d JOIN e ON e.ord = d.event JOIN ev ON ev.seq = e.seq
    RETURNING id
)
SELECT 0, e.ord, e.seq FROM e JOIN ev ON ev.seq = e.seq
UNION ALL
SELECT 1, d.ord, d.id FROM d JOIN dv ON dv.id = d.id";

/// Stores `rows` whose key is free, with their deliveries, and sets the numbers of those
/// stored. Without throttles this is one statement, its own transaction. A throttled
/// delivery's state depends on a throttle window taken only for a stored event, so then the
/// statement, the windows and the states are one transaction.
async fn insert_events(
    client: &deadpool_postgres::Client,
    mut rows: Vec<&mut EventRow>,
    now: i64,
) -> Result<(), StoreError> {
    let err = |e| pg_error("storing events", e);
    if rows.is_empty() {
        return Ok(());
    }
    let statement = client.prepare_cached(INSERT_EVENTS).await.map_err(err)?;
    let mut ev = EventColumns::default();
    let mut dv = DeliveryColumns::default();
    for (i, r) in rows.iter().enumerate() {
        let e = &r.e;
        ev.source_name.push(&e.source_name);
        ev.ce_source.push(&e.ce_source);
        ev.ce_id.push(&e.ce_id);
        ev.ty.push(&e.ty);
        ev.subject.push(e.subject.as_deref());
        ev.body.push(&e.body);
        ev.key.push(&r.key);
        for d in &e.deliveries {
            dv.event.push(i as i64 + 1);
            dv.trigger.push(&d.trigger);
            dv.state.push(State::Pending.as_str());
            dv.ordering_key.push(d.ordering_key.as_deref());
        }
    }
    let params: [&(dyn ToSql + Sync); 12] = [
        &ev.source_name,
        &ev.ce_source,
        &ev.ce_id,
        &ev.ty,
        &ev.subject,
        &ev.body,
        &ev.key,
        &now,
        &dv.event,
        &dv.trigger,
        &dv.state,
        &dv.ordering_key,
    ];
    let throttled = rows.iter().any(|r| {
        r.e.deliveries
            .iter()
            .any(|d| d.throttle.is_some() || d.correlate.is_some())
    });
    if throttled {
        client.batch_execute("BEGIN").await.map_err(err)?;
    }
    let numbered = client.query(&statement, &params).await.map_err(err)?;
    let mut ids = vec![None; dv.event.len()];
    for n in numbered {
        let (kind, ord, number): (i32, i64, i64) = (n.get(0), n.get(1), n.get(2));
        match kind {
            0 => rows[ord as usize - 1].seq = Some(number),
            _ => ids[ord as usize - 1] = Some(number),
        }
    }
    let mut ids = ids.into_iter();
    for r in rows.iter_mut() {
        for _ in &r.e.deliveries {
            if let Some(id) = ids.next().flatten() {
                r.deliveries.push((id, State::Pending));
            }
        }
    }
    if !throttled {
        return Ok(());
    }
    let throttle = client
        .prepare_cached(
            "INSERT INTO throttles (trigger, key, until) VALUES ($1, $2, $3)
             ON CONFLICT (trigger, key) DO UPDATE SET until = EXCLUDED.until WHERE throttles.until <= $4
             RETURNING 1",
        )
        .await
        .map_err(err)?;
    let mut held_back: Vec<i64> = Vec::new();
    for r in rows.iter_mut().filter(|r| r.seq.is_some()) {
        for (d, (id, state)) in r.e.deliveries.iter().zip(r.deliveries.iter_mut()) {
            if let Some((key, window)) = &d.throttle {
                let until = now + window.as_millis() as i64;
                let took = client
                    .query(&throttle, &[&d.trigger, key, &until, &now])
                    .await
                    .map_err(err)?;
                if took.is_empty() {
                    *state = State::Throttled;
                    held_back.push(*id);
                }
            }
        }
    }
    if !held_back.is_empty() {
        client
            .execute(
                "UPDATE deliveries SET state = $2 WHERE id = ANY($1)",
                &[&held_back, &State::Throttled.as_str()],
            )
            .await
            .map_err(err)?;
    }
    for r in rows.iter_mut() {
        let Some(seq) = r.seq else { continue };
        for (d, (id, state)) in r.e.deliveries.iter().zip(r.deliveries.iter_mut()) {
            if let Some(c) = &d.correlate {
                *state = correlate(client, &d.trigger, c, seq, *id, now).await?;
            }
        }
    }
    client.batch_execute("COMMIT").await.map_err(err)
}

/// Counts delivery `id` (of event `seq`) in its trigger's correlation window for its key,
/// within the ingest transaction: `Pending` when it completes the count (the window's
/// events are then its own), otherwise `Throttled`, with why. Nodes ingesting the same key
/// at once take turns (a transaction lock on the key).
async fn correlate(
    client: &deadpool_postgres::Client,
    trigger: &str,
    c: &super::Correlate,
    seq: i64,
    id: i64,
    now: i64,
) -> Result<State, StoreError> {
    let err = |e| pg_error("counting a correlation", e);
    let since = now - c.within.as_millis().min(i64::MAX as u128) as i64;
    let lock = format!("correlation\u{1f}{trigger}\u{1f}{}", c.key);
    client
        .execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&lock],
        )
        .await
        .map_err(err)?;
    client
        .execute(
            "DELETE FROM correlations WHERE trigger = $1 AND key = $2 AND fired_by IS NULL AND at < $3",
            &[&trigger, &c.key, &since],
        )
        .await
        .map_err(err)?;
    let n: i64 = client
        .query_one(
            "WITH ins AS (INSERT INTO correlations (trigger, key, event_seq, delivery_id, at)
                          VALUES ($1, $2, $3, $4, $5) RETURNING 1)
             SELECT 1 + count(*) FROM correlations WHERE trigger = $1 AND key = $2 AND fired_by IS NULL",
            &[&trigger, &c.key, &seq, &id, &now],
        )
        .await
        .map_err(err)?
        .get(0);
    if n >= i64::from(c.count) {
        client
            .execute(
                "UPDATE correlations SET fired_by = $3 WHERE trigger = $1 AND key = $2 AND fired_by IS NULL",
                &[&trigger, &c.key, &id],
            )
            .await
            .map_err(err)?;
        return Ok(State::Pending);
    }
    client
        .execute(
            "UPDATE deliveries SET state = 'throttled', last_error = $2 WHERE id = $1",
            &[&id, &super::correlation_note(c, n as u32)],
        )
        .await
        .map_err(err)?;
    Ok(State::Throttled)
}

/// Events as column arrays, for `UNNEST`.
#[derive(Default)]
struct EventColumns<'a> {
    source_name: Vec<&'a str>,
    ce_source: Vec<&'a str>,
    ce_id: Vec<&'a str>,
    ty: Vec<&'a str>,
    subject: Vec<Option<&'a str>>,
    body: Vec<&'a str>,
    key: Vec<&'a [u8]>,
}

/// Deliveries as column arrays, for `UNNEST`; `event` is the 1-based place of its event.
#[derive(Default)]
struct DeliveryColumns<'a> {
    event: Vec<i64>,
    trigger: Vec<&'a str>,
    state: Vec<&'static str>,
    ordering_key: Vec<Option<&'a str>>,
}

const APPROVAL_COLUMNS: &str = "id, delivery_id, trigger, step, state, plan, event_type, subject, requested_at, expires_at, decided_by, decided_at, reason";

fn approval_row(r: &Row) -> Result<Approval, StoreError> {
    let state: String = r.get(4);
    Ok(Approval {
        id: r.get(0),
        delivery_id: r.get(1),
        trigger: r.get(2),
        step: r.get(3),
        state: ApprovalState::parse(&state).ok_or_else(|| StoreError::Backend {
            backend: "postgres",
            what: "reading an approval".into(),
            message: format!("unknown approval state `{state}`"),
        })?,
        plan: r.get(5),
        event_type: r.get(6),
        subject: r.get(7),
        requested_at: r.get(8),
        expires_at: r.get(9),
        decided_by: r.get(10),
        decided_at: r.get(11),
        reason: r.get(12),
    })
}

const OPEN_COLUMNS: &str =
    "d.id, d.trigger, d.ordering_key, d.attempts, d.attempt_base, d.next_at, e.body, e.received_at, d.last_error";

fn open_row(r: &Row) -> OpenDelivery {
    OpenDelivery {
        id: r.get(0),
        trigger: r.get(1),
        ordering_key: r.get(2),
        attempts: r.get::<_, i32>(3) as u32,
        attempt_base: r.get::<_, i32>(4) as u32,
        next_at: r.get(5),
        event_body: r.get(6),
        received_at: r.get(7),
        last_error: r.get(8),
    }
}

const DELIVERY_COLUMNS: &str = "d.id, d.event_seq, d.trigger, d.state, d.attempts, d.ordering_key, d.next_at, d.created_at, d.updated_at, d.last_error, e.ce_id, e.type";

fn delivery_row(r: &Row) -> Result<DeliveryRecord, StoreError> {
    let state: String = r.get(3);
    Ok(DeliveryRecord {
        id: r.get(0),
        event_seq: r.get(1),
        trigger: r.get(2),
        state: State::parse(&state).ok_or_else(|| StoreError::Backend {
            backend: "postgres",
            what: "reading deliveries".into(),
            message: format!("unknown delivery state `{state}`"),
        })?,
        attempts: r.get::<_, i32>(4) as u32,
        ordering_key: r.get(5),
        next_at: r.get(6),
        created_at: r.get(7),
        updated_at: r.get(8),
        last_error: r.get(9),
        event_id: r.get(10),
        event_type: r.get(11),
    })
}

#[async_trait::async_trait]
impl super::Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ingest(&self, events: Vec<NewEvent>) -> Result<Vec<Stored>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .ingest
            .send((events, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn events(&self, q: EventQuery) -> Result<Vec<EventSummary>, StoreError> {
        let (bound, order, from) = match q.after {
            Some(after) => ("seq > $1 AND seq < $9", "ASC", after),
            None => (
                "seq < $1 AND seq < $9",
                "DESC",
                q.before.unwrap_or(i64::MAX),
            ),
        };
        let before = q.before.unwrap_or(i64::MAX);
        let text = q
            .text
            .as_ref()
            .map(|t| format!("%{}%", super::sqlite::escape_like(t)));
        let sql = format!(
            "SELECT seq, ce_id, ce_source, type, subject, source_name, received_at FROM events
             WHERE {bound} AND ($2::text IS NULL OR type = $2) AND ($3::text IS NULL OR subject = $3)
               AND ($4::text IS NULL OR ce_source = $4) AND ($5::text IS NULL OR ce_id = $5)
               AND ($6::text IS NULL OR body ILIKE $6 ESCAPE '\\') AND ($7::int8 IS NULL OR received_at >= $7)
             ORDER BY seq {order} LIMIT $8"
        );
        let rows = self
            .query(
                "searching events",
                &sql,
                &[
                    &from,
                    &q.ty,
                    &q.subject,
                    &q.source,
                    &q.id,
                    &text,
                    &q.since,
                    &i64::from(q.limit),
                    &before,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| EventSummary {
                seq: r.get(0),
                id: r.get(1),
                source: r.get(2),
                ty: r.get(3),
                subject: r.get(4),
                received_by: r.get(5),
                received_at: r.get(6),
            })
            .collect())
    }

    async fn event(&self, seq: i64) -> Result<Option<EventDetail>, StoreError> {
        let rows = self
            .query(
                "reading an event",
                "SELECT seq, source_name, received_at, body FROM events WHERE seq = $1",
                &[&seq],
            )
            .await?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let deliveries = self
            .query(
                "reading an event's deliveries",
                &format!(
                    "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
                     WHERE d.event_seq = $1 ORDER BY d.id"
                ),
                &[&seq],
            )
            .await?
            .iter()
            .map(delivery_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(EventDetail {
            seq: r.get(0),
            received_by: r.get(1),
            received_at: r.get(2),
            body: r.get(3),
            deliveries,
        }))
    }

    async fn deliveries(&self, q: DeliveryQuery) -> Result<Vec<DeliveryRecord>, StoreError> {
        let before = q.before.unwrap_or(i64::MAX);
        let state = q.state.map(State::as_str);
        self.query(
            "listing deliveries",
            &format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
                 WHERE d.id < $1 AND ($2::text IS NULL OR d.state = $2) AND ($3::text IS NULL OR d.trigger = $3)
                 ORDER BY d.id DESC LIMIT $4"
            ),
            &[&before, &state, &q.trigger, &i64::from(q.limit)],
        )
        .await?
        .iter()
        .map(delivery_row)
        .collect()
    }

    async fn delivery(
        &self,
        id: i64,
    ) -> Result<Option<(DeliveryRecord, Vec<AttemptRecord>)>, StoreError> {
        let rows = self
            .query(
                "reading a delivery",
                &format!("SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.id = $1"),
                &[&id],
            )
            .await?;
        let Some(d) = rows.first() else {
            return Ok(None);
        };
        let attempts = self
            .query(
                "reading attempts",
                "SELECT n, started_at, duration_ms, outcome, detail FROM attempts WHERE delivery_id = $1 ORDER BY n",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| AttemptRecord {
                n: r.get::<_, i32>(0) as u32,
                started_at: r.get(1),
                duration_ms: r.get(2),
                outcome: r.get(3),
                detail: r.get(4),
            })
            .collect();
        Ok(Some((delivery_row(d)?, attempts)))
    }

    async fn set_checkpoint(
        &self,
        source: &str,
        cp: Checkpoint,
        fence: i64,
    ) -> Result<(), StoreError> {
        // Written only while this node holds the source's lease with this token.
        let rows = self
            .query(
                "storing a checkpoint",
                "INSERT INTO checkpoints (source, position, time, updated_at)
                 SELECT $1, $2, $3, $4 WHERE EXISTS (
                     SELECT 1 FROM leases WHERE name = 'source:' || $1 AND node = $5 AND fence = $6)
                 ON CONFLICT (source) DO UPDATE SET position = EXCLUDED.position, time = EXCLUDED.time, updated_at = EXCLUDED.updated_at
                 RETURNING 1",
                &[&source, &cp.position, &cp.time, &now_ms(), &self.inner.node, &fence],
            )
            .await?;
        if rows.is_empty() {
            return Err(StoreError::Conflict(format!(
                "source {source}: this node ({}) no longer holds its lease; another node runs it now",
                self.inner.node
            )));
        }
        Ok(())
    }

    async fn hold_lease(&self, name: &str) -> Result<Option<i64>, StoreError> {
        let now = now_ms();
        // A new holder gets the next fencing token; the holder renewing keeps its own.
        let rows = self
            .query(
                "taking a lease",
                "INSERT INTO leases (name, node, until, fence) VALUES ($1, $2, $3, 1)
                 ON CONFLICT (name) DO UPDATE SET node = $2, until = $3,
                     fence = CASE WHEN leases.node = $2 AND leases.until >= $4 THEN leases.fence ELSE leases.fence + 1 END
                 WHERE leases.node = $2 OR leases.until < $4
                 RETURNING fence",
                &[&name, &self.inner.node, &(now + self.inner.lease_ms), &now],
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    async fn release_lease(&self, name: &str) -> Result<(), StoreError> {
        self.query(
            "giving a lease up",
            "DELETE FROM leases WHERE name = $1 AND node = $2",
            &[&name, &self.inner.node],
        )
        .await
        .map(|_| ())
    }

    fn lease_time(&self) -> Duration {
        Duration::from_millis(self.inner.lease_ms as u64)
    }

    async fn pause_trigger(&self, name: &str, reason: &str) -> Result<bool, StoreError> {
        self.query(
            "pausing a trigger",
            "INSERT INTO trigger_pauses(trigger, since, reason) VALUES ($1, $2, $3)
             ON CONFLICT (trigger) DO UPDATE SET since = excluded.since, reason = excluded.reason, resumed_at = NULL
             WHERE trigger_pauses.resumed_at IS NOT NULL
             RETURNING trigger",
            &[&name, &now_ms(), &reason],
        )
        .await
        .map(|rows| !rows.is_empty())
    }

    async fn resume_trigger(&self, name: &str) -> Result<(), StoreError> {
        self.query(
            "resuming a trigger",
            "UPDATE trigger_pauses SET resumed_at = $2 WHERE trigger = $1 AND resumed_at IS NULL",
            &[&name, &now_ms()],
        )
        .await
        .map(|_| ())
    }

    async fn paused_triggers(&self) -> Result<Vec<PausedTrigger>, StoreError> {
        let rows = self
            .query(
                "reading paused triggers",
                "SELECT trigger, since, reason FROM trigger_pauses WHERE resumed_at IS NULL ORDER BY trigger",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| PausedTrigger {
                trigger: r.get(0),
                since: r.get(1),
                reason: r.get(2),
            })
            .collect())
    }

    async fn changes_since(
        &self,
        pause: &str,
        triggers: &[String],
        since: i64,
    ) -> Result<u64, StoreError> {
        let triggers = triggers.to_vec();
        let rows = self
            .query(
                "counting triggers' changes",
                "SELECT count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
                 WHERE d.trigger = ANY($1) AND a.outcome = 'succeeded'
                   AND a.started_at >= GREATEST($2, COALESCE((SELECT resumed_at FROM trigger_pauses WHERE trigger = $3), 0))",
                &[&triggers, &since, &pause],
            )
            .await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)) as u64)
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>, StoreError> {
        let rows = self
            .query(
                "reading a checkpoint",
                "SELECT position, time FROM checkpoints WHERE source = $1",
                &[&source],
            )
            .await?;
        Ok(rows.first().map(|r| Checkpoint {
            position: r.get(0),
            time: r.get(1),
        }))
    }

    async fn prune(&self, r: Retention) -> Result<u64, StoreError> {
        let err = |e| pg_error("applying retention", e);
        let now = now_ms();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(err)?;
        // Console sessions past their end (a person who never signed out).
        tx.execute("DELETE FROM sessions WHERE expires_at < $1", &[&now])
            .await
            .map_err(err)?;
        let mut cutoff: i64 = 0;
        if let Some(age) = r.max_age {
            let before = now - age.as_millis() as i64;
            let row = tx
                .query_one(
                    "SELECT COALESCE(MAX(seq), 0) FROM events WHERE received_at < $1",
                    &[&before],
                )
                .await
                .map_err(err)?;
            cutoff = cutoff.max(row.get(0));
        }
        if let Some(max) = r.max_events {
            let row = tx
                .query_one("SELECT COALESCE(MAX(seq), 0) FROM events", &[])
                .await
                .map_err(err)?;
            cutoff = cutoff.max(row.get::<_, i64>(0) - max as i64);
        }
        let mut removed = 0;
        if cutoff > 0 {
            // Events with unfinished deliveries are kept whatever their age.
            const OPEN: &str =
                "SELECT event_seq FROM deliveries WHERE state IN ('pending', 'running', 'retrying') AND event_seq <= $1";
            tx.execute(
                &format!("DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_seq <= $1 AND event_seq NOT IN ({OPEN}))"),
                &[&cutoff],
            )
            .await
            .map_err(err)?;
            tx.execute("DELETE FROM correlations WHERE event_seq <= $1", &[&cutoff])
                .await
                .map_err(err)?;
            tx.execute(
                &format!("DELETE FROM approvals WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_seq <= $1 AND event_seq NOT IN ({OPEN}))"),
                &[&cutoff],
            )
            .await
            .map_err(err)?;
            tx.execute(
                &format!(
                    "DELETE FROM deliveries WHERE event_seq <= $1 AND event_seq NOT IN ({OPEN})"
                ),
                &[&cutoff],
            )
            .await
            .map_err(err)?;
            removed = tx
                .execute(
                    &format!("DELETE FROM events WHERE seq <= $1 AND seq NOT IN ({OPEN})"),
                    &[&cutoff],
                )
                .await
                .map_err(err)?;
        }
        tx.execute("DELETE FROM throttles WHERE until < $1", &[&now])
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(removed)
    }

    async fn flush(&self) {
        // Every write is committed before its call returns.
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.query("checking the connection", "SELECT 1", &[])
            .await
            .map(|_| ())
    }

    async fn correlated_events(&self, delivery: i64) -> Result<Vec<String>, StoreError> {
        let rows = self
            .query(
                "reading a correlation's events",
                "SELECT e.body FROM correlations c JOIN events e ON e.seq = c.event_seq
                 WHERE c.fired_by = $1 ORDER BY c.event_seq",
                &[&delivery],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn request_approval(&self, a: NewApproval) -> Result<Approval, StoreError> {
        self.query(
            "asking for an approval",
            "INSERT INTO approvals (delivery_id, trigger, step, state, plan, event_type, subject, requested_at, expires_at)
             VALUES ($1, $2, $3, 'waiting', $4, $5, $6, $7, $8) ON CONFLICT (delivery_id, step) DO NOTHING",
            &[&a.delivery_id, &a.trigger, &a.step, &a.plan, &a.event_type, &a.subject, &now_ms(), &a.expires_at],
        )
        .await?;
        self.approval_for(a.delivery_id, &a.step)
            .await?
            .ok_or_else(|| {
                StoreError::NotFound(format!("the approval of delivery {}", a.delivery_id))
            })
    }

    async fn approval_for(
        &self,
        delivery: i64,
        step: &str,
    ) -> Result<Option<Approval>, StoreError> {
        let rows = self
            .query(
                "reading an approval",
                &format!(
                    "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE delivery_id = $1 AND step = $2"
                ),
                &[&delivery, &step],
            )
            .await?;
        rows.first().map(approval_row).transpose()
    }

    async fn approval(&self, id: i64) -> Result<Option<Approval>, StoreError> {
        let rows = self
            .query(
                "reading an approval",
                &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1"),
                &[&id],
            )
            .await?;
        rows.first().map(approval_row).transpose()
    }

    async fn approvals(
        &self,
        state: Option<ApprovalState>,
        limit: u32,
    ) -> Result<Vec<Approval>, StoreError> {
        let state = state.map(ApprovalState::as_str);
        let rows = self
            .query(
                "listing approvals",
                &format!(
                    "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE ($1::text IS NULL OR state = $1)
                     ORDER BY id DESC LIMIT $2"
                ),
                &[&state, &i64::from(limit)],
            )
            .await?;
        rows.iter().map(approval_row).collect()
    }

    async fn change_approval(
        &self,
        id: i64,
        change: ApprovalChange,
    ) -> Result<Option<Approval>, StoreError> {
        let (from, to) = change.states();
        let (from, to) = (from.as_str(), to.as_str());
        let now = now_ms();
        let what = "changing an approval";
        let rows = match &change {
            ApprovalChange::Decide { by, reason, .. } => {
                self.query(
                    what,
                    &format!("UPDATE approvals SET state = $2, decided_by = $3, decided_at = $4, reason = $5
                              WHERE id = $1 AND state = $6 RETURNING {APPROVAL_COLUMNS}"),
                    &[&id, &to, by, &now, reason, &from],
                )
                .await?
            }
            ApprovalChange::Replan {
                plan,
                reason,
                expires_at,
            } => {
                self.query(
                    what,
                    &format!("UPDATE approvals SET state = $2, plan = $3, reason = $4, requested_at = $5, expires_at = $6,
                                     decided_by = NULL, decided_at = NULL
                              WHERE id = $1 AND state = $7 RETURNING {APPROVAL_COLUMNS}"),
                    &[&id, &to, plan, reason, &now, expires_at, &from],
                )
                .await?
            }
            ApprovalChange::Expire => {
                self.query(
                    what,
                    &format!("UPDATE approvals SET state = $2, decided_at = $3, reason = 'nobody decided before it expired'
                              WHERE id = $1 AND state = $4 RETURNING {APPROVAL_COLUMNS}"),
                    &[&id, &to, &now, &from],
                )
                .await?
            }
        };
        rows.first().map(approval_row).transpose()
    }

    async fn create_api_token(
        &self,
        user: &str,
        label: &str,
        hash: &str,
    ) -> Result<i64, StoreError> {
        let rows = self
            .query(
                "keeping an API token",
                r#"INSERT INTO api_tokens("user", label, hash, created_at) VALUES ($1, $2, $3, $4) RETURNING id"#,
                &[&user, &label, &hash, &now_ms()],
            )
            .await?;
        Ok(rows.first().map_or(0, |r| r.get(0)))
    }

    async fn api_token(&self, hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let rows = self
            .query(
                "reading an API token",
                r#"SELECT id, "user", label, created_at, revoked_at FROM api_tokens WHERE hash = $1 AND revoked_at IS NULL"#,
                &[&hash],
            )
            .await?;
        Ok(rows.first().map(api_token_row))
    }

    async fn api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let rows = self
            .query(
                "reading API tokens",
                r#"SELECT id, "user", label, created_at, revoked_at FROM api_tokens ORDER BY id DESC"#,
                &[],
            )
            .await?;
        Ok(rows.iter().map(api_token_row).collect())
    }

    async fn revoke_api_token(&self, id: i64) -> Result<bool, StoreError> {
        let rows = self
            .query(
                "revoking an API token",
                "UPDATE api_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL RETURNING id",
                &[&id, &now_ms()],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn create_session(&self, hash: &str, s: &Session) -> Result<(), StoreError> {
        self.query(
            "opening a session",
            r#"INSERT INTO sessions(hash, "user", csrf, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)"#,
            &[&hash, &s.user, &s.csrf, &now_ms(), &s.expires_at],
        )
        .await
        .map(|_| ())
    }

    async fn session(&self, hash: &str, now: i64) -> Result<Option<Session>, StoreError> {
        let rows = self
            .query(
                "reading a session",
                r#"SELECT "user", csrf, expires_at FROM sessions WHERE hash = $1 AND expires_at > $2"#,
                &[&hash, &now],
            )
            .await?;
        Ok(rows.first().map(|r| Session {
            user: r.get(0),
            csrf: r.get(1),
            expires_at: r.get(2),
        }))
    }

    async fn end_session(&self, hash: &str) -> Result<(), StoreError> {
        self.query(
            "ending a session",
            "DELETE FROM sessions WHERE hash = $1 OR expires_at < $2",
            &[&hash, &now_ms()],
        )
        .await
        .map(|_| ())
    }

    async fn record_audit(&self, e: &NewAudit) -> Result<(), StoreError> {
        self.query(
            "writing the audit log",
            "INSERT INTO audit_log(at, actor, role, action, target, detail, remote) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[&now_ms(), &e.actor, &e.role, &e.action, &e.target, &e.detail, &e.remote],
        )
        .await
        .map(|_| ())
    }

    async fn audit_log(
        &self,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = self
            .query(
                "reading the audit log",
                "SELECT id, at, actor, role, action, target, detail, remote FROM audit_log
                 WHERE id < $1 ORDER BY id DESC LIMIT $2",
                &[&before.unwrap_or(i64::MAX), &i64::from(limit)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                id: r.get(0),
                at: r.get(1),
                actor: r.get(2),
                role: r.get(3),
                action: r.get(4),
                target: r.get(5),
                detail: r.get(6),
                remote: r.get(7),
            })
            .collect())
    }

    async fn bus_bindings(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self
            .query(
                "reading the bus's bindings",
                "SELECT queue, key FROM bus_bindings ORDER BY queue, key",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn set_bus_bindings(&self, queue: &str, keys: &[String]) -> Result<(), StoreError> {
        // Two idempotent statements: a repeat after a failure between them ends the same.
        self.query(
            "recording the bus's bindings",
            "DELETE FROM bus_bindings WHERE queue = $1 AND NOT (key = ANY($2::text[]))",
            &[&queue, &keys],
        )
        .await?;
        self.query(
            "recording the bus's bindings",
            "INSERT INTO bus_bindings (queue, key) SELECT $1, k FROM unnest($2::text[]) AS k ON CONFLICT DO NOTHING",
            &[&queue, &keys],
        )
        .await
        .map(|_| ())
    }

    async fn nodes(&self) -> Result<Vec<super::NodeInfo>, StoreError> {
        let rows = self
            .query(
                "listing nodes",
                "SELECT n.id, n.started_at, n.heartbeat_at, n.version,
                        COALESCE(array_agg(l.name ORDER BY l.name) FILTER (WHERE l.name IS NOT NULL), '{}')
                 FROM nodes n LEFT JOIN leases l ON l.node = n.id AND l.until >= $1
                 GROUP BY n.id ORDER BY n.id",
                &[&now_ms()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| super::NodeInfo {
                id: r.get(0),
                started_at: r.get(1),
                heartbeat_at: r.get(2),
                version: r.get(3),
                singletons: r.get(4),
            })
            .collect())
    }

    async fn size_bytes(&self) -> Option<u64> {
        let rows = self
            .query(
                "measuring the database",
                "SELECT pg_database_size(current_database())",
                &[],
            )
            .await
            .ok()?;
        rows.first().map(|r| r.get::<_, i64>(0).max(0) as u64)
    }
}

#[async_trait::async_trait]
impl super::Bus for PgStore {
    async fn claim(&self, id: i64) -> Result<bool, StoreError> {
        self.batched(&self.inner.claims, id).await
    }

    async fn defer(&self, id: i64, at: i64) -> Result<(), StoreError> {
        let client = self.fast().await?;
        client
            .execute(
                "UPDATE deliveries SET next_at = $2 WHERE id = $1 AND state IN ('pending', 'retrying')",
                &[&id, &at],
            )
            .await
            .map_err(|e| pg_error("putting off a delivery", e))?;
        Ok(())
    }

    async fn finish_attempt(
        &self,
        id: i64,
        attempt: AttemptRecord,
        state: State,
        next_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.batched(&self.inner.finishes, (id, attempt, state, next_at))
            .await
    }

    async fn wake(&self, id: i64) -> Result<Option<OpenDelivery>, StoreError> {
        let rows = self
            .query(
                "waking a delivery",
                &format!(
                    "WITH d AS (UPDATE deliveries SET next_at = $2, attempt_base = attempt_base + 1, updated_at = $2
                                WHERE id = $1 AND state = 'retrying' RETURNING *)
                     SELECT {OPEN_COLUMNS} FROM d JOIN events e ON e.seq = d.event_seq"
                ),
                &[&id, &now_ms()],
            )
            .await?;
        Ok(rows.first().map(open_row))
    }

    async fn replay(&self, id: i64) -> Result<OpenDelivery, StoreError> {
        let err = |e| pg_error("replaying a delivery", e);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(err)?;
        let row = tx
            .query_opt(
                "SELECT state FROM deliveries WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(err)?;
        match row.map(|r| r.get::<_, String>(0)).as_deref() {
            None => return Err(StoreError::NotFound(format!("delivery {id}"))),
            Some("dead") | Some("throttled") => {}
            Some(s) => {
                return Err(StoreError::Conflict(format!(
                    "delivery {id} is {s}; only dead or throttled deliveries can be replayed"
                )))
            }
        }
        tx.execute(
            "UPDATE deliveries SET state = 'pending', attempt_base = attempts, next_at = NULL, updated_at = $2,
                    owner = NULL, lease_until = NULL WHERE id = $1",
            &[&id, &now_ms()],
        )
        .await
        .map_err(err)?;
        let row = tx
            .query_one(
                &format!("SELECT {OPEN_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.id = $1"),
                &[&id],
            )
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(open_row(&row))
    }

    async fn open_deliveries(
        &self,
        after: i64,
        limit: usize,
        due_by: i64,
    ) -> Result<Vec<OpenDelivery>, StoreError> {
        // Running ones whose node let its lease run out (it died) are open again.
        let rows = self
            .query(
                "reading open deliveries",
                &format!(
                    "SELECT {OPEN_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
                     WHERE d.id > $1 AND d.state IN ('pending', 'retrying', 'running')
                       AND ((d.state <> 'running' AND (d.next_at IS NULL OR d.next_at <= $3 OR d.ordering_key IS NOT NULL))
                            OR (d.state = 'running' AND d.lease_until < $4))
                     ORDER BY d.id LIMIT $2"
                ),
                &[&after, &(limit as i64), &due_by, &now_ms()],
            )
            .await?;
        Ok(rows.iter().map(open_row).collect())
    }

    async fn due_deliveries(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<OpenDelivery>, StoreError> {
        let rows = self
            .query(
                "reading due retries",
                &format!(
                    "SELECT {OPEN_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
                     WHERE d.state IN ('pending', 'retrying') AND d.next_at IS NOT NULL
                       AND d.next_at <= $1 AND d.ordering_key IS NULL
                     ORDER BY d.next_at LIMIT $2"
                ),
                &[&now, &(limit as i64)],
            )
            .await?;
        Ok(rows.iter().map(open_row).collect())
    }

    async fn next_due_after(&self, now: i64) -> Result<Option<i64>, StoreError> {
        let rows = self
            .query(
                "reading the next retry time",
                "SELECT MIN(next_at) FROM deliveries
                 WHERE state IN ('pending', 'retrying') AND next_at IS NOT NULL
                   AND next_at > $1 AND ordering_key IS NULL",
                &[&now],
            )
            .await?;
        Ok(rows.first().and_then(|r| r.get(0)))
    }

    async fn flush(&self) {}

    fn rate_share(&self) -> u32 {
        self.inner
            .live_nodes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }
}

/// Counts per delivery state, for tests and `reflex nodes`.
pub async fn delivery_counts(store: &PgStore) -> Result<HashMap<String, i64>, StoreError> {
    let rows = store
        .query(
            "counting deliveries",
            "SELECT state, COUNT(*) FROM deliveries GROUP BY state",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn api_token_row(r: &Row) -> ApiToken {
    ApiToken {
        id: r.get(0),
        user: r.get(1),
        label: r.get(2),
        created_at: r.get(3),
        revoked_at: r.get(4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_with_clear_errors() {
        assert!(parse_url("mysql://x/y").unwrap_err().contains("scheme"));
        assert!(parse_url("postgres://u@h")
            .unwrap_err()
            .contains("database"));
        assert!(parse_url("postgres://u@h/db?sslmode=bogus")
            .unwrap_err()
            .contains("sslmode"));
        let (c, ca) = parse_url(
            "postgres://u:p@db.example.com/reflex?sslmode=verify-full&sslrootcert=/ca.pem",
        )
        .unwrap();
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(ca, Some(PathBuf::from("/ca.pem")));
        let (c, _) = parse_url("postgres://u@db.example.com/reflex").unwrap();
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        let (c, _) = parse_url("postgres://u@127.0.0.1/reflex").unwrap();
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
    }
}
