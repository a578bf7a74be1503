//! The store's tables.

/// Created on open; every statement is idempotent.
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    source_name TEXT NOT NULL,
    ce_source TEXT NOT NULL,
    ce_id TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT,
    received_at INTEGER NOT NULL,
    body TEXT NOT NULL
);
DROP INDEX IF EXISTS events_received;
DROP TABLE IF EXISTS dedup;
CREATE TABLE IF NOT EXISTS dedup_keys (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    event_seq INTEGER NOT NULL,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    attempt_base INTEGER NOT NULL,
    ordering_key TEXT,
    next_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries(event_seq);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, id);
-- Deliveries waiting for a time (retries, and starts a rate puts off): the hot path
-- (pending with no time, running, succeeded) never touches it.
DROP INDEX IF EXISTS deliveries_retry;
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(next_at)
    WHERE state IN ('pending','retrying') AND next_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS attempts (
    delivery_id INTEGER NOT NULL,
    n INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (delivery_id, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    source TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    time TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS api_tokens (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    label TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS sessions (
    hash TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL,
    remote TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bus_bindings (
    queue TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (queue, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS trigger_pauses (
    trigger TEXT PRIMARY KEY,
    since INTEGER NOT NULL,
    reason TEXT NOT NULL,
    resumed_at INTEGER
);
CREATE TABLE IF NOT EXISTS throttles (
    trigger TEXT NOT NULL,
    key TEXT NOT NULL,
    until INTEGER NOT NULL,
    PRIMARY KEY (trigger, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS approvals (
    id INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL,
    trigger TEXT NOT NULL,
    step TEXT NOT NULL,
    state TEXT NOT NULL,
    plan TEXT NOT NULL,
    event_type TEXT NOT NULL,
    subject TEXT,
    requested_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    decided_by TEXT,
    decided_at INTEGER,
    reason TEXT,
    UNIQUE (delivery_id, step)
);
CREATE INDEX IF NOT EXISTS approvals_by_state ON approvals(state, id);
CREATE TABLE IF NOT EXISTS correlations (
    trigger TEXT NOT NULL,
    key TEXT NOT NULL,
    event_seq INTEGER NOT NULL,
    delivery_id INTEGER NOT NULL,
    at INTEGER NOT NULL,
    fired_by INTEGER
);
CREATE INDEX IF NOT EXISTS correlations_open ON correlations(trigger, key) WHERE fired_by IS NULL;
CREATE INDEX IF NOT EXISTS correlations_fired ON correlations(fired_by) WHERE fired_by IS NOT NULL;
"#;
