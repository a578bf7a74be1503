//! The embedded store: events, deliveries (the embedded bus's queue), attempts, dedup and
//! throttle windows in one SQLite database (WAL, `synchronous=FULL`). One writer thread
//! applies every write in batches: one fsync commits many events (group commit).

use super::dedup::{self, Dedup, DedupLimits};
use super::sqlite_schema as schema;
use super::{
    now_ms, Approval, ApprovalChange, ApprovalState, AttemptRecord, Checkpoint, DeliveryQuery,
    DeliveryRecord, EventDetail, EventQuery, EventSummary, NewApproval, NewEvent, OpenDelivery,
    PausedTrigger, Retention, State, StoreError, Stored,
};
use super::{ApiToken, AuditEntry, NewAudit, Session};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Most operations applied in one transaction.
const MAX_BATCH: usize = 2048;

fn sqlite_error(path: &str, source: rusqlite::Error) -> StoreError {
    StoreError::Backend {
        backend: "sqlite",
        what: path.to_string(),
        message: source.to_string(),
    }
}

enum Op {
    Ingest(
        Vec<NewEvent>,
        oneshot::Sender<Result<Vec<Stored>, StoreError>>,
    ),
    Running(i64),
    Defer(i64, i64),
    Finish {
        id: i64,
        attempt: AttemptRecord,
        state: State,
        next_at: Option<i64>,
    },
    Replay(i64, oneshot::Sender<Result<OpenDelivery, StoreError>>),
    Prune(Retention, oneshot::Sender<Result<u64, StoreError>>),
    Flush(oneshot::Sender<()>),
    Checkpoint(String, i64, String, oneshot::Sender<Result<(), StoreError>>),
    /// Pause (with a reason) or resume (`None`) a trigger.
    Pause(
        String,
        Option<String>,
        oneshot::Sender<Result<bool, StoreError>>,
    ),
    /// Ask for an approval (`Ok`) or change one (`Err`: its id and the change).
    Approval(
        Result<NewApproval, (i64, ApprovalChange)>,
        oneshot::Sender<Result<Option<Approval>, StoreError>>,
    ),
    Wake(
        i64,
        oneshot::Sender<Result<Option<OpenDelivery>, StoreError>>,
    ),
    /// A rare write (tokens, sessions, audit, bus bindings), answered with a number (an
    /// id, or the rows changed).
    Rare(RareWrite, oneshot::Sender<Result<i64, StoreError>>),
}

/// A write of [`Op::Rare`].
type RareWrite = Box<dyn FnOnce(&rusqlite::Transaction) -> rusqlite::Result<i64> + Send>;

/// The SQLite store and bus; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    tx: mpsc::Sender<Op>,
    reader: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
    started_at: i64,
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let p = path.display().to_string();
    let err = |source| sqlite_error(&p, source);
    let conn = Connection::open(path).map_err(err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(err)?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the store and starts its writer thread. Deliveries left
    /// `running` by a crash return to `pending`.
    pub fn open(path: &Path, dedup: DedupLimits) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: path.display().to_string(),
                source,
            })?;
        }
        let conn = open(path)?;
        let p = path.display().to_string();
        let err = |source| sqlite_error(&p, source);
        conn.execute_batch(schema::SCHEMA).map_err(err)?;
        conn.execute(
            "UPDATE deliveries SET state='pending' WHERE state='running'",
            [],
        )
        .map_err(err)?;
        // Checkpoint less often than SQLite's default (1000 pages): fewer stalls of the writer.
        conn.pragma_update(None, "wal_autocheckpoint", 8000)
            .map_err(err)?;
        let reader = open(path)?;
        let keys = load_dedup(&conn, dedup).map_err(err)?;
        let (tx, rx) = mpsc::channel(65_536);
        let writer_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("reflex-store-writer".into())
            .spawn(move || writer(conn, rx, writer_path, keys))
            .map_err(|source| StoreError::Io {
                path: path.display().to_string(),
                source,
            })?;
        Ok(SqliteStore {
            tx,
            reader: Arc::new(Mutex::new(reader)),
            path: Arc::new(path.to_path_buf()),
            started_at: now_ms(),
        })
    }

    /// Sends a write to the writer thread and waits for its answer.
    async fn call<T>(&self, op: impl FnOnce(oneshot::Sender<T>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(op(tx)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Runs a write of [`Op::Rare`] in the writer's next commit.
    async fn rare(
        &self,
        write: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<i64> + Send + 'static,
    ) -> Result<i64, StoreError> {
        self.call(|tx| Op::Rare(Box::new(write), tx)).await?
    }

    /// Runs a read on the reader connection off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn).map_err(|source| sqlite_error(&path.display().to_string(), source))
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// Counts the rows of one of the store's tables (for tests of the backend).
    #[cfg(test)]
    async fn count(&self, table: &'static str) -> i64 {
        self.read(move |c| c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)))
            .await
            .unwrap()
    }
}

#[async_trait::async_trait]
impl super::Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ingest(&self, events: Vec<NewEvent>) -> Result<Vec<Stored>, StoreError> {
        self.call(|tx| Op::Ingest(events, tx)).await?
    }

    async fn events(&self, q: EventQuery) -> Result<Vec<EventSummary>, StoreError> {
        // Newest first below `before`, or oldest first above `after` (to follow new events).
        let (bound, order, from) = match q.after {
            Some(after) => ("seq > ?1 AND seq < ?9", "ASC", after),
            None => (
                "seq < ?1 AND seq < ?9",
                "DESC",
                q.before.unwrap_or(i64::MAX),
            ),
        };
        let before = q.before.unwrap_or(i64::MAX);
        // The text is matched as plain text: LIKE's wildcards in it are escaped.
        let text = q.text.as_ref().map(|t| format!("%{}%", escape_like(t)));
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT seq, ce_id, ce_source, type, subject, source_name, received_at FROM events
                 WHERE {bound} AND (?2 IS NULL OR type = ?2) AND (?3 IS NULL OR subject = ?3)
                   AND (?4 IS NULL OR ce_source = ?4) AND (?5 IS NULL OR ce_id = ?5)
                   AND (?6 IS NULL OR body LIKE ?6 ESCAPE '\\') AND (?7 IS NULL OR received_at >= ?7)
                 ORDER BY seq {order} LIMIT ?8"
            ))?;
            let params =
                params![from, q.ty, q.subject, q.source, q.id, text, q.since, q.limit, before];
            let rows = st.query_map(params, |r| {
                Ok(EventSummary {
                    seq: r.get(0)?,
                    id: r.get(1)?,
                    source: r.get(2)?,
                    ty: r.get(3)?,
                    subject: r.get(4)?,
                    received_by: r.get(5)?,
                    received_at: r.get(6)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn event(&self, seq: i64) -> Result<Option<EventDetail>, StoreError> {
        self.read(move |c| {
            let ev = c
                .query_row(
                    "SELECT seq, source_name, received_at, body FROM events WHERE seq=?1",
                    [seq],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            let Some((seq, received_by, received_at, body)) = ev else {
                return Ok(None);
            };
            let mut st = c.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
                 WHERE d.event_seq=?1 ORDER BY d.id"
            ))?;
            let deliveries = st
                .query_map([seq], delivery_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some(EventDetail {
                seq,
                received_by,
                received_at,
                body,
                deliveries,
            }))
        })
        .await
    }

    async fn deliveries(&self, q: DeliveryQuery) -> Result<Vec<DeliveryRecord>, StoreError> {
        let before = q.before.unwrap_or(i64::MAX);
        let state = q.state.map(State::as_str);
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
                 WHERE d.id < ?1 AND (?2 IS NULL OR d.state = ?2) AND (?3 IS NULL OR d.trigger = ?3)
                 ORDER BY d.id DESC LIMIT ?4"
            ))?;
            let rows = st.query_map(params![before, state, q.trigger, q.limit], delivery_row)?;
            rows.collect()
        })
        .await
    }

    async fn delivery(
        &self,
        id: i64,
    ) -> Result<Option<(DeliveryRecord, Vec<AttemptRecord>)>, StoreError> {
        self.read(move |c| {
            let d = c
                .query_row(
                    &format!("SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.id=?1"),
                    [id],
                    delivery_row,
                )
                .optional()?;
            let Some(d) = d else { return Ok(None) };
            let mut st = c.prepare_cached(
                "SELECT n, started_at, duration_ms, outcome, detail FROM attempts WHERE delivery_id=?1 ORDER BY n",
            )?;
            let attempts = st
                .query_map([id], |r| {
                    Ok(AttemptRecord {
                        n: r.get(0)?,
                        started_at: r.get(1)?,
                        duration_ms: r.get(2)?,
                        outcome: r.get(3)?,
                        detail: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some((d, attempts)))
        })
        .await
    }

    /// One process owns the file: it holds every lease.
    async fn hold_lease(&self, _name: &str) -> Result<Option<i64>, StoreError> {
        Ok(Some(1))
    }

    async fn release_lease(&self, _name: &str) -> Result<(), StoreError> {
        Ok(())
    }

    fn lease_time(&self) -> Duration {
        Duration::from_secs(3600)
    }

    async fn set_checkpoint(
        &self,
        source: &str,
        cp: Checkpoint,
        _fence: i64,
    ) -> Result<(), StoreError> {
        let source = source.to_string();
        self.call(|tx| Op::Checkpoint(source, cp.position, cp.time, tx))
            .await?
    }

    async fn pause_trigger(&self, name: &str, reason: &str) -> Result<bool, StoreError> {
        let (name, reason) = (name.to_string(), reason.to_string());
        self.call(|tx| Op::Pause(name, Some(reason), tx)).await?
    }

    async fn resume_trigger(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_string();
        self.call(|tx| Op::Pause(name, None, tx)).await?.map(|_| ())
    }

    async fn paused_triggers(&self) -> Result<Vec<PausedTrigger>, StoreError> {
        self.read(|c| {
            let mut st =
                c.prepare_cached("SELECT trigger, since, reason FROM trigger_pauses WHERE resumed_at IS NULL ORDER BY trigger")?;
            let rows = st.query_map([], |r| {
                Ok(PausedTrigger {
                    trigger: r.get(0)?,
                    since: r.get(1)?,
                    reason: r.get(2)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn changes_since(
        &self,
        pause: &str,
        triggers: &[String],
        since: i64,
    ) -> Result<u64, StoreError> {
        let pause = pause.to_string();
        let triggers = serde_json::to_string(triggers).unwrap_or_else(|_| "[]".into());
        self.read(move |c| {
            c.query_row(
                "SELECT count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
                 WHERE d.trigger IN (SELECT value FROM json_each(?1)) AND a.outcome = 'succeeded'
                   AND a.started_at >= MAX(?2, COALESCE((SELECT resumed_at FROM trigger_pauses WHERE trigger = ?3), 0))",
                params![triggers, since, pause],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n as u64)
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>, StoreError> {
        let source = source.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT position, time FROM checkpoints WHERE source=?1",
                [source],
                |r| {
                    Ok(Checkpoint {
                        position: r.get(0)?,
                        time: r.get(1)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn prune(&self, r: Retention) -> Result<u64, StoreError> {
        self.call(|tx| Op::Prune(r, tx)).await?
    }

    async fn flush(&self) {
        let _ = self.call(Op::Flush).await;
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    async fn correlated_events(&self, delivery: i64) -> Result<Vec<String>, StoreError> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT e.body FROM correlations c JOIN events e ON e.seq = c.event_seq
                 WHERE c.fired_by = ?1 ORDER BY c.event_seq",
            )?;
            let rows = st.query_map([delivery], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    async fn request_approval(&self, a: NewApproval) -> Result<Approval, StoreError> {
        self.call(|tx| Op::Approval(Ok(a), tx))
            .await??
            .ok_or_else(|| StoreError::NotFound("the approval just asked for".into()))
    }

    async fn approval_for(
        &self,
        delivery: i64,
        step: &str,
    ) -> Result<Option<Approval>, StoreError> {
        let step = step.to_string();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE delivery_id=?1 AND step=?2"
            ))?
            .query_row(params![delivery, step], approval_row)
            .optional()
        })
        .await
    }

    async fn approval(&self, id: i64) -> Result<Option<Approval>, StoreError> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id=?1"
            ))?
            .query_row([id], approval_row)
            .optional()
        })
        .await
    }

    async fn approvals(
        &self,
        state: Option<ApprovalState>,
        limit: u32,
    ) -> Result<Vec<Approval>, StoreError> {
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE (?1 IS NULL OR state = ?1)
                 ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows = st.query_map(
                params![state.map(ApprovalState::as_str), limit],
                approval_row,
            )?;
            rows.collect()
        })
        .await
    }

    async fn change_approval(
        &self,
        id: i64,
        change: ApprovalChange,
    ) -> Result<Option<Approval>, StoreError> {
        self.call(|tx| Op::Approval(Err((id, change)), tx)).await?
    }

    async fn create_api_token(
        &self,
        user: &str,
        label: &str,
        hash: &str,
    ) -> Result<i64, StoreError> {
        let (user, label, hash) = (user.to_string(), label.to_string(), hash.to_string());
        self.rare(move |tx| {
            tx.prepare_cached(
                "INSERT INTO api_tokens(user, label, hash, created_at) VALUES (?1,?2,?3,?4)",
            )?
            .execute(params![user, label, hash, now_ms()])?;
            Ok(tx.last_insert_rowid())
        })
        .await
    }

    async fn api_token(&self, hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let hash = hash.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT id, user, label, created_at, revoked_at FROM api_tokens WHERE hash = ?1 AND revoked_at IS NULL",
            )?
            .query_row([hash], api_token_row)
            .optional()
        })
        .await
    }

    async fn api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT id, user, label, created_at, revoked_at FROM api_tokens ORDER BY id DESC",
            )?
            .query_map([], api_token_row)?
            .collect()
        })
        .await
    }

    async fn revoke_api_token(&self, id: i64) -> Result<bool, StoreError> {
        self.rare(move |tx| {
            let n = tx
                .prepare_cached(
                    "UPDATE api_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                )?
                .execute(params![id, now_ms()])?;
            Ok(n as i64)
        })
        .await
        .map(|n| n > 0)
    }

    async fn create_session(&self, hash: &str, s: &Session) -> Result<(), StoreError> {
        let (hash, s) = (hash.to_string(), s.clone());
        self.rare(move |tx| {
            tx.prepare_cached(
                "INSERT INTO sessions(hash, user, csrf, created_at, expires_at) VALUES (?1,?2,?3,?4,?5)",
            )?
            .execute(params![hash, s.user, s.csrf, now_ms(), s.expires_at])?;
            Ok(0)
        })
        .await
        .map(|_| ())
    }

    async fn session(&self, hash: &str, now: i64) -> Result<Option<Session>, StoreError> {
        let hash = hash.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT user, csrf, expires_at FROM sessions WHERE hash = ?1 AND expires_at > ?2",
            )?
            .query_row(params![hash, now], |r| {
                Ok(Session {
                    user: r.get(0)?,
                    csrf: r.get(1)?,
                    expires_at: r.get(2)?,
                })
            })
            .optional()
        })
        .await
    }

    async fn end_session(&self, hash: &str) -> Result<(), StoreError> {
        let hash = hash.to_string();
        self.rare(move |tx| {
            tx.prepare_cached("DELETE FROM sessions WHERE hash = ?1 OR expires_at < ?2")?
                .execute(params![hash, now_ms()])?;
            Ok(0)
        })
        .await
        .map(|_| ())
    }

    async fn record_audit(&self, e: &NewAudit) -> Result<(), StoreError> {
        let e = e.clone();
        self.rare(move |tx| {
            tx.prepare_cached(
                "INSERT INTO audit_log(at, actor, role, action, target, detail, remote) VALUES (?1,?2,?3,?4,?5,?6,?7)",
            )?
            .execute(params![now_ms(), e.actor, e.role, e.action, e.target, e.detail, e.remote])?;
            Ok(0)
        })
        .await
        .map(|_| ())
    }

    async fn audit_log(
        &self,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |c| {
            c.prepare_cached(
                "SELECT id, at, actor, role, action, target, detail, remote FROM audit_log
                 WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
            )?
            .query_map(params![before.unwrap_or(i64::MAX), limit], |r| {
                Ok(AuditEntry {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    actor: r.get(2)?,
                    role: r.get(3)?,
                    action: r.get(4)?,
                    target: r.get(5)?,
                    detail: r.get(6)?,
                    remote: r.get(7)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn bus_bindings(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT queue, key FROM bus_bindings ORDER BY queue, key")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
        .await
    }

    async fn set_bus_bindings(&self, queue: &str, keys: &[String]) -> Result<(), StoreError> {
        let (queue, keys) = (queue.to_string(), keys.to_vec());
        self.rare(move |tx| {
            tx.prepare_cached("DELETE FROM bus_bindings WHERE queue = ?1")?
                .execute([&queue])?;
            let mut st = tx
                .prepare_cached("INSERT OR IGNORE INTO bus_bindings(queue, key) VALUES (?1, ?2)")?;
            for k in &keys {
                st.execute([&queue, k])?;
            }
            Ok(0)
        })
        .await
        .map(|_| ())
    }

    async fn nodes(&self) -> Result<Vec<super::NodeInfo>, StoreError> {
        Ok(vec![super::NodeInfo {
            id: "embedded".into(),
            started_at: self.started_at,
            heartbeat_at: now_ms(),
            version: env!("CARGO_PKG_VERSION").into(),
            singletons: Vec::new(),
        }])
    }

    async fn size_bytes(&self) -> Option<u64> {
        let base = self.path.display().to_string();
        Some(
            [base.clone(), format!("{base}-wal")]
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum(),
        )
    }
}

#[async_trait::async_trait]
impl super::Bus for SqliteStore {
    /// One process owns the file: the claim always succeeds, and costs no write (a crash
    /// leaves the delivery pending, and it runs again at the next start either way).
    async fn claim(&self, _id: i64) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Not awaited, and only for an attempt still running after [`super::RUNNING_MARK_AFTER`]:
    /// the mark is for operators, not for recovery.
    async fn mark_running(&self, id: i64) -> Result<(), StoreError> {
        self.tx
            .send(Op::Running(id))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Not awaited: a crash leaves the delivery due at once.
    async fn defer(&self, id: i64, at: i64) -> Result<(), StoreError> {
        self.tx
            .send(Op::Defer(id, at))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Queued for the writer, which keeps it until a commit takes it (a failed commit is
    /// retried): the dispatcher need not wait for the fsync.
    async fn finish_attempt(
        &self,
        id: i64,
        attempt: AttemptRecord,
        state: State,
        next_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.tx
            .send(Op::Finish {
                id,
                attempt,
                state,
                next_at,
            })
            .await
            .map_err(|_| StoreError::Closed)
    }

    async fn replay(&self, id: i64) -> Result<OpenDelivery, StoreError> {
        self.call(|tx| Op::Replay(id, tx)).await?
    }

    async fn wake(&self, id: i64) -> Result<Option<OpenDelivery>, StoreError> {
        self.call(|tx| Op::Wake(id, tx)).await?
    }

    async fn open_deliveries(
        &self,
        after: i64,
        limit: usize,
        due_by: i64,
    ) -> Result<Vec<OpenDelivery>, StoreError> {
        // Each state is read along its index, so a large history costs nothing.
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT d.id, d.trigger, d.ordering_key, d.attempts, d.attempt_base, d.next_at, e.body, e.received_at, d.last_error
                 FROM deliveries d JOIN events e ON e.seq = d.event_seq
                 WHERE d.state = ?1 AND d.id > ?2
                   AND (d.next_at IS NULL OR d.next_at <= ?4 OR d.ordering_key IS NOT NULL)
                 ORDER BY d.id LIMIT ?3",
            )?;
            let mut all = Vec::new();
            for state in ["pending", "retrying"] {
                let rows = st.query_map(
                    params![state, after, limit as i64, due_by],
                    open_delivery_row,
                )?;
                for r in rows {
                    all.push(r?);
                }
            }
            all.sort_by_key(|d| d.id);
            all.truncate(limit);
            Ok(all)
        })
        .await
    }

    async fn due_deliveries(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<OpenDelivery>, StoreError> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT d.id, d.trigger, d.ordering_key, d.attempts, d.attempt_base, d.next_at, e.body, e.received_at, d.last_error
                 FROM deliveries d JOIN events e ON e.seq = d.event_seq
                 WHERE d.state IN ('pending','retrying') AND d.next_at IS NOT NULL
                   AND d.next_at <= ?1 AND d.ordering_key IS NULL
                 ORDER BY d.next_at LIMIT ?2",
            )?;
            let rows = st.query_map(params![now, limit as i64], open_delivery_row)?;
            rows.collect()
        })
        .await
    }

    async fn next_due_after(&self, now: i64) -> Result<Option<i64>, StoreError> {
        self.read(move |c| {
            c.query_row(
                "SELECT MIN(next_at) FROM deliveries
                 WHERE state IN ('pending','retrying') AND next_at IS NOT NULL
                   AND next_at > ?1 AND ordering_key IS NULL",
                [now],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn flush(&self) {
        let _ = self.call(Op::Flush).await;
    }

    fn poll_interval(&self) -> Option<Duration> {
        None
    }
}

/// `text` with LIKE's wildcards and escape character escaped (escape `\`).
pub(super) fn escape_like(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

const DELIVERY_COLUMNS: &str = "d.id, d.event_seq, d.trigger, d.state, d.attempts, d.ordering_key, d.next_at, d.created_at, d.updated_at, d.last_error, e.ce_id, e.type";

fn delivery_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRecord> {
    let state: String = r.get(3)?;
    Ok(DeliveryRecord {
        id: r.get(0)?,
        event_seq: r.get(1)?,
        trigger: r.get(2)?,
        state: State::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                3,
                rusqlite::types::Type::Text,
                format!("unknown delivery state `{state}`").into(),
            )
        })?,
        attempts: r.get(4)?,
        ordering_key: r.get(5)?,
        next_at: r.get(6)?,
        created_at: r.get(7)?,
        updated_at: r.get(8)?,
        last_error: r.get(9)?,
        event_id: r.get(10)?,
        event_type: r.get(11)?,
    })
}

fn open_delivery_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OpenDelivery> {
    Ok(OpenDelivery {
        id: r.get(0)?,
        trigger: r.get(1)?,
        ordering_key: r.get(2)?,
        attempts: r.get(3)?,
        attempt_base: r.get(4)?,
        next_at: r.get(5)?,
        event_body: r.get(6)?,
        received_at: r.get(7)?,
        last_error: r.get(8)?,
    })
}

enum Reply {
    Ingest(
        oneshot::Sender<Result<Vec<Stored>, StoreError>>,
        Result<Vec<Stored>, rusqlite::Error>,
    ),
    Replay(
        oneshot::Sender<Result<OpenDelivery, StoreError>>,
        Result<OpenDelivery, StoreError>,
    ),
    Prune(
        oneshot::Sender<Result<u64, StoreError>>,
        Result<u64, rusqlite::Error>,
    ),
    Done(oneshot::Sender<Result<(), StoreError>>),
    Paused(oneshot::Sender<Result<bool, StoreError>>, bool),
    Approval(
        oneshot::Sender<Result<Option<Approval>, StoreError>>,
        Result<Option<Approval>, rusqlite::Error>,
    ),
    Wake(
        oneshot::Sender<Result<Option<OpenDelivery>, StoreError>>,
        Result<Option<OpenDelivery>, rusqlite::Error>,
    ),
    Flush(oneshot::Sender<()>),
    Rare(
        oneshot::Sender<Result<i64, StoreError>>,
        Result<i64, rusqlite::Error>,
    ),
}

/// Times a dispatcher write (claim, defer, attempt record) is tried again after failed
/// commits before it is given up with an error in the log.
const MAX_CARRY: u32 = 20;

fn writer(mut conn: Connection, mut rx: mpsc::Receiver<Op>, path: PathBuf, mut keys: Dedup) {
    let p = path.display().to_string();
    let sqlite_err = |source| sqlite_error(&p, source);
    // Dispatcher writes of a failed commit, tried again with the next batch: an attempt
    // record is not lost to a transient failure (a full disk, a lock held too long).
    let mut carried: Vec<(Op, u32)> = Vec::new();
    loop {
        let mut batch: Vec<(Op, u32)> = std::mem::take(&mut carried);
        if batch.is_empty() {
            match rx.blocking_recv() {
                Some(first) => batch.push((first, 0)),
                None => return,
            }
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push((op, 0)),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut retry = Vec::new();
        let now = now_ms();
        keys.expire(now);
        let mut added = Vec::new();
        let result = (|| -> rusqlite::Result<()> {
            let mut tx = conn.transaction()?;
            for (op, tries) in batch {
                match op {
                    Op::Ingest(events, reply) => {
                        // A request's events are stored whole or not at all, whatever the
                        // rest of the batch does: a failure must not leave a dedup key (or
                        // an event) behind that the sender's retry would meet as a duplicate.
                        let mark = added.len();
                        let mut sp = tx.savepoint()?;
                        let r = ingest(&sp, events, now, &mut keys, &mut added);
                        if r.is_ok() {
                            sp.commit()?;
                        } else {
                            sp.set_drop_behavior(rusqlite::DropBehavior::Rollback);
                            sp.finish()?;
                            for k in added.drain(mark..) {
                                keys.remove(k);
                            }
                        }
                        replies.push(Reply::Ingest(reply, r));
                    }
                    Op::Running(id) => {
                        tx.prepare_cached(
                            "UPDATE deliveries SET state='running', updated_at=?2 WHERE id=?1 AND state IN ('pending','retrying')",
                        )?
                        .execute(params![id, now])?;
                        retry.push((Op::Running(id), tries));
                    }
                    Op::Defer(id, at) => {
                        tx.prepare_cached(
                            "UPDATE deliveries SET next_at=?2 WHERE id=?1 AND state IN ('pending','retrying')",
                        )?
                        .execute(params![id, at])?;
                        retry.push((Op::Defer(id, at), tries));
                    }
                    Op::Finish {
                        id,
                        attempt,
                        state,
                        next_at,
                    } => {
                        tx.prepare_cached(
                            "INSERT OR REPLACE INTO attempts(delivery_id, n, started_at, duration_ms, outcome, detail) VALUES (?1,?2,?3,?4,?5,?6)",
                        )?
                        .execute(params![id, attempt.n, attempt.started_at, attempt.duration_ms, attempt.outcome, attempt.detail])?;
                        let last_error =
                            (attempt.outcome != "succeeded").then_some(attempt.detail.as_str());
                        tx.prepare_cached(
                            "UPDATE deliveries SET state=?2, attempts=?3, next_at=?4, updated_at=?5, last_error=?6 WHERE id=?1",
                        )?
                        .execute(params![id, state.as_str(), attempt.n, next_at, now, last_error])?;
                        retry.push((
                            Op::Finish {
                                id,
                                attempt,
                                state,
                                next_at,
                            },
                            tries,
                        ));
                    }
                    Op::Replay(id, reply) => {
                        let r = replay(&tx, id, now);
                        replies.push(Reply::Replay(reply, r));
                    }
                    Op::Prune(r, reply) => {
                        let res = prune(&tx, r, now, &keys);
                        replies.push(Reply::Prune(reply, res));
                    }
                    Op::Flush(reply) => replies.push(Reply::Flush(reply)),
                    Op::Pause(trigger, reason, reply) => {
                        let changed = match reason {
                            Some(reason) => tx
                                .prepare_cached(
                                    "INSERT INTO trigger_pauses(trigger, since, reason) VALUES (?1,?2,?3)
                                     ON CONFLICT(trigger) DO UPDATE SET since=excluded.since, reason=excluded.reason, resumed_at=NULL
                                     WHERE trigger_pauses.resumed_at IS NOT NULL",
                                )?
                                .execute(params![trigger, now, reason])?,
                            None => tx
                                .prepare_cached("UPDATE trigger_pauses SET resumed_at=?2 WHERE trigger=?1 AND resumed_at IS NULL")?
                                .execute(params![trigger, now])?,
                        };
                        replies.push(Reply::Paused(reply, changed > 0));
                    }
                    Op::Approval(op, reply) => {
                        let r = match op {
                            Ok(new) => request_approval(&tx, &new, now).map(Some),
                            Err((id, change)) => change_approval(&tx, id, &change, now),
                        };
                        replies.push(Reply::Approval(reply, r));
                    }
                    Op::Wake(id, reply) => {
                        replies.push(Reply::Wake(reply, wake(&tx, id, now)));
                    }
                    Op::Rare(write, reply) => {
                        replies.push(Reply::Rare(reply, write(&tx)));
                    }
                    Op::Checkpoint(source, position, time, reply) => {
                        tx.prepare_cached(
                            "INSERT INTO checkpoints(source, position, time, updated_at) VALUES (?1,?2,?3,?4)
                             ON CONFLICT(source) DO UPDATE SET position=excluded.position, time=excluded.time, updated_at=excluded.updated_at",
                        )?
                        .execute(params![source, position, time, now])?;
                        replies.push(Reply::Done(reply));
                    }
                }
            }
            tx.commit()
        })();
        if let Err(e) = &result {
            for k in added {
                keys.remove(k);
            }
            for (op, tries) in retry {
                if tries + 1 < MAX_CARRY {
                    carried.push((op, tries + 1));
                } else {
                    tracing::error!(store = %p, error = %e, "a delivery's state could not be recorded after {MAX_CARRY} tries; it is given up (the delivery may run again at the next start)");
                }
            }
        }
        for reply in replies {
            match reply {
                Reply::Ingest(tx, r) => {
                    let r = match (&result, r) {
                        (Ok(()), Ok(v)) => Ok(v),
                        (Err(e), _) => Err(sqlite_err(clone_err(e))),
                        (_, Err(e)) => Err(sqlite_err(e)),
                    };
                    let _ = tx.send(r);
                }
                Reply::Replay(tx, r) => {
                    let r = match &result {
                        Ok(()) => r,
                        Err(e) => Err(sqlite_err(clone_err(e))),
                    };
                    let _ = tx.send(r);
                }
                Reply::Prune(tx, r) => {
                    let r = match (&result, r) {
                        (Ok(()), Ok(v)) => Ok(v),
                        (Err(e), _) => Err(sqlite_err(clone_err(e))),
                        (_, Err(e)) => Err(sqlite_err(e)),
                    };
                    let _ = tx.send(r);
                }
                Reply::Done(tx) => {
                    let _ = tx.send(match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(sqlite_err(clone_err(e))),
                    });
                }
                Reply::Paused(tx, changed) => {
                    let _ = tx.send(match &result {
                        Ok(()) => Ok(changed),
                        Err(e) => Err(sqlite_err(clone_err(e))),
                    });
                }
                Reply::Approval(tx, r) => {
                    let _ = tx.send(match (&result, r) {
                        (Ok(()), Ok(v)) => Ok(v),
                        (Err(e), _) => Err(sqlite_err(clone_err(e))),
                        (_, Err(e)) => Err(sqlite_err(e)),
                    });
                }
                Reply::Wake(tx, r) => {
                    let _ = tx.send(match (&result, r) {
                        (Ok(()), Ok(v)) => Ok(v),
                        (Err(e), _) => Err(sqlite_err(clone_err(e))),
                        (_, Err(e)) => Err(sqlite_err(e)),
                    });
                }
                Reply::Flush(tx) => {
                    let _ = tx.send(());
                }
                Reply::Rare(tx, r) => {
                    let _ = tx.send(match (&result, r) {
                        (Ok(()), Ok(v)) => Ok(v),
                        (Err(e), _) => Err(sqlite_err(clone_err(e))),
                        (_, Err(e)) => Err(sqlite_err(e)),
                    });
                }
            }
        }
        if let Err(e) = result {
            tracing::error!(store = %p, error = %e, "store commit failed; the writes of this batch were not acknowledged");
        }
    }
}

fn clone_err(e: &rusqlite::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(e.to_string().into())
}

/// Reads back the keys of the dedup window at start-up.
fn load_dedup(conn: &Connection, limits: DedupLimits) -> rusqlite::Result<Dedup> {
    let mut keys = Dedup::new(limits);
    let now = now_ms();
    let tx = conn.unchecked_transaction()?;
    let from = first_kept_key(&tx, now, &keys, limits.max_keys)?;
    let mut st = tx.prepare("SELECT at, key FROM dedup_keys WHERE seq > ?1 ORDER BY seq")?;
    let mut rows = st.query([from])?;
    while let Some(r) = rows.next()? {
        let at: i64 = r.get(0)?;
        let key: Vec<u8> = r.get(1)?;
        if let Ok(k) = <[u8; 16]>::try_from(key.as_slice()) {
            keys.insert(u128::from_le_bytes(k), at);
        }
    }
    keys.expire(now);
    Ok(keys)
}

/// The last `dedup_keys` seq that is out of the window or beyond the key limit.
fn first_kept_key(
    tx: &Connection,
    now: i64,
    keys: &Dedup,
    max_keys: usize,
) -> rusqlite::Result<i64> {
    let by_age = last_seq_before(tx, "dedup_keys", "at", now - keys.window_ms())?;
    let max: Option<i64> = tx.query_row("SELECT MAX(seq) FROM dedup_keys", [], |r| r.get(0))?;
    Ok(by_age.max(max.unwrap_or(0) - max_keys as i64))
}

fn ingest(
    tx: &Connection,
    events: Vec<NewEvent>,
    now: i64,
    keys: &mut Dedup,
    added: &mut Vec<dedup::Key>,
) -> rusqlite::Result<Vec<Stored>> {
    let mut out = Vec::with_capacity(events.len());
    let mut remember = tx.prepare_cached("INSERT INTO dedup_keys(at, key) VALUES (?1, ?2)")?;
    let mut ins_event = tx.prepare_cached(
        "INSERT INTO events(source_name, ce_source, ce_id, type, subject, received_at, body) VALUES (?1,?2,?3,?4,?5,?6,?7)",
    )?;
    let mut throttle = tx.prepare_cached(
        "INSERT INTO throttles(trigger, key, until) VALUES (?1, ?2, ?3)
         ON CONFLICT(trigger, key) DO UPDATE SET until = excluded.until WHERE throttles.until <= ?4",
    )?;
    let mut ins_delivery = tx.prepare_cached(
        "INSERT INTO deliveries(event_seq, trigger, state, attempts, attempt_base, ordering_key, created_at, updated_at)
         VALUES (?1, ?2, ?3, 0, 0, ?4, ?5, ?5)",
    )?;
    for e in events {
        let key = dedup::key(&e.source_name, &e.ce_source, &e.ce_id);
        if keys.contains(key) {
            out.push(Stored {
                seq: 0,
                duplicate: true,
                deliveries: vec![],
            });
            continue;
        }
        remember.execute(params![now, key.to_le_bytes()])?;
        keys.insert(key, now);
        added.push(key);
        ins_event.execute(params![
            e.source_name,
            e.ce_source,
            e.ce_id,
            e.ty,
            e.subject,
            now,
            e.body
        ])?;
        let seq = tx.last_insert_rowid();
        let mut deliveries = Vec::with_capacity(e.deliveries.len());
        for d in e.deliveries {
            let state = match &d.throttle {
                Some((key, window)) => {
                    let until = now + window.as_millis() as i64;
                    if throttle.execute(params![d.trigger, key, until, now])? == 0 {
                        State::Throttled
                    } else {
                        State::Pending
                    }
                }
                None => State::Pending,
            };
            ins_delivery.execute(params![seq, d.trigger, state.as_str(), d.ordering_key, now])?;
            let id = tx.last_insert_rowid();
            let state = match &d.correlate {
                Some(c) => correlate(tx, &d.trigger, c, seq, id, now)?,
                None => state,
            };
            deliveries.push((id, state));
        }
        out.push(Stored {
            seq,
            duplicate: false,
            deliveries,
        });
    }
    Ok(out)
}

/// Counts delivery `id` (of event `seq`) in its trigger's correlation window for its key:
/// `Pending` when it completes the count (the window's events are then its own), otherwise
/// `Throttled`, with why, until more come.
fn correlate(
    tx: &Connection,
    trigger: &str,
    c: &super::Correlate,
    seq: i64,
    id: i64,
    now: i64,
) -> rusqlite::Result<State> {
    let since = now - c.within.as_millis().min(i64::MAX as u128) as i64;
    tx.prepare_cached(
        "DELETE FROM correlations WHERE trigger=?1 AND key=?2 AND fired_by IS NULL AND at < ?3",
    )?
    .execute(params![trigger, c.key, since])?;
    tx.prepare_cached(
        "INSERT INTO correlations(trigger, key, event_seq, delivery_id, at) VALUES (?1,?2,?3,?4,?5)",
    )?
    .execute(params![trigger, c.key, seq, id, now])?;
    let n: u32 = tx
        .prepare_cached(
            "SELECT count(*) FROM correlations WHERE trigger=?1 AND key=?2 AND fired_by IS NULL",
        )?
        .query_row(params![trigger, c.key], |r| r.get(0))?;
    if n >= c.count {
        tx.prepare_cached(
            "UPDATE correlations SET fired_by=?3 WHERE trigger=?1 AND key=?2 AND fired_by IS NULL",
        )?
        .execute(params![trigger, c.key, id])?;
        return Ok(State::Pending);
    }
    tx.prepare_cached("UPDATE deliveries SET state='throttled', last_error=?2 WHERE id=?1")?
        .execute(params![id, super::correlation_note(c, n)])?;
    Ok(State::Throttled)
}

fn replay(tx: &rusqlite::Transaction<'_>, id: i64, now: i64) -> Result<OpenDelivery, StoreError> {
    let q = |source| sqlite_error("replay", source);
    let state: Option<String> = tx
        .query_row("SELECT state FROM deliveries WHERE id=?1", [id], |r| {
            r.get(0)
        })
        .optional()
        .map_err(q)?;
    match state.as_deref() {
        None => return Err(StoreError::NotFound(format!("delivery {id}"))),
        Some("dead") | Some("throttled") => {}
        Some(s) => {
            return Err(StoreError::Conflict(format!(
                "delivery {id} is {s}; only dead or throttled deliveries can be replayed"
            )))
        }
    }
    tx.execute(
        "UPDATE deliveries SET state='pending', attempt_base=attempts, next_at=NULL, updated_at=?2 WHERE id=?1",
        params![id, now],
    )
    .map_err(q)?;
    tx.query_row(
        "SELECT d.id, d.trigger, d.ordering_key, d.attempts, d.attempt_base, d.next_at, e.body, e.received_at, d.last_error
         FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.id=?1",
        [id],
        open_delivery_row,
    )
    .map_err(q)
}

const APPROVAL_COLUMNS: &str = "id, delivery_id, trigger, step, state, plan, event_type, subject, requested_at, expires_at, decided_by, decided_at, reason";

fn approval_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Approval> {
    let state: String = r.get(4)?;
    Ok(Approval {
        id: r.get(0)?,
        delivery_id: r.get(1)?,
        trigger: r.get(2)?,
        step: r.get(3)?,
        state: ApprovalState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                4,
                rusqlite::types::Type::Text,
                format!("unknown approval state `{state}`").into(),
            )
        })?,
        plan: r.get(5)?,
        event_type: r.get(6)?,
        subject: r.get(7)?,
        requested_at: r.get(8)?,
        expires_at: r.get(9)?,
        decided_by: r.get(10)?,
        decided_at: r.get(11)?,
        reason: r.get(12)?,
    })
}

fn request_approval(tx: &Connection, a: &NewApproval, now: i64) -> rusqlite::Result<Approval> {
    tx.prepare_cached(
        "INSERT INTO approvals(delivery_id, trigger, step, state, plan, event_type, subject, requested_at, expires_at)
         VALUES (?1,?2,?3,'waiting',?4,?5,?6,?7,?8) ON CONFLICT(delivery_id, step) DO NOTHING",
    )?
    .execute(params![a.delivery_id, a.trigger, a.step, a.plan, a.event_type, a.subject, now, a.expires_at])?;
    tx.prepare_cached(&format!(
        "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE delivery_id=?1 AND step=?2"
    ))?
    .query_row(params![a.delivery_id, a.step], approval_row)
}

fn change_approval(
    tx: &Connection,
    id: i64,
    change: &ApprovalChange,
    now: i64,
) -> rusqlite::Result<Option<Approval>> {
    let (from, to) = change.states();
    let (from, to) = (from.as_str(), to.as_str());
    let changed = match change {
        ApprovalChange::Decide { by, reason, .. } => tx
            .prepare_cached(
                "UPDATE approvals SET state=?2, decided_by=?3, decided_at=?4, reason=?5 WHERE id=?1 AND state=?6",
            )?
            .execute(params![id, to, by, now, reason, from])?,
        ApprovalChange::Replan {
            plan,
            reason,
            expires_at,
        } => tx
            .prepare_cached(
                "UPDATE approvals SET state=?2, plan=?3, reason=?4, requested_at=?5, expires_at=?6,
                        decided_by=NULL, decided_at=NULL WHERE id=?1 AND state=?7",
            )?
            .execute(params![id, to, plan, reason, now, expires_at, from])?,
        ApprovalChange::Expire => tx
            .prepare_cached(
                "UPDATE approvals SET state=?2, decided_at=?3, reason='nobody decided before it expired' WHERE id=?1 AND state=?4",
            )?
            .execute(params![id, to, now, from])?,
    };
    if changed == 0 {
        return Ok(None);
    }
    tx.prepare_cached(&format!(
        "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id=?1"
    ))?
    .query_row([id], approval_row)
    .optional()
}

fn wake(tx: &Connection, id: i64, now: i64) -> rusqlite::Result<Option<OpenDelivery>> {
    let changed = tx
        .prepare_cached(
            "UPDATE deliveries SET next_at=?2, attempt_base=attempt_base+1, updated_at=?2 WHERE id=?1 AND state='retrying'",
        )?
        .execute(params![id, now])?;
    if changed == 0 {
        return Ok(None);
    }
    tx.query_row(
        "SELECT d.id, d.trigger, d.ordering_key, d.attempts, d.attempt_base, d.next_at, e.body, e.received_at, d.last_error
         FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.id=?1",
        [id],
        open_delivery_row,
    )
    .optional()
}

/// The highest seq received before `before_ms`, by binary search over seq: `received_at`
/// grows with seq (one writer stamps each batch), so no index on it is kept, which saves a
/// B-tree update on every ingested event.
fn last_seq_before(
    tx: &Connection,
    table: &str,
    time: &str,
    before_ms: i64,
) -> rusqlite::Result<i64> {
    let (min, max): (Option<i64>, Option<i64>) = tx.query_row(
        &format!("SELECT MIN(seq), MAX(seq) FROM {table}"),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (Some(mut lo), Some(mut hi)) = (min, max) else {
        return Ok(0);
    };
    let mut at = tx.prepare_cached(&format!(
        "SELECT seq, {time} FROM {table} WHERE seq >= ?1 ORDER BY seq LIMIT 1"
    ))?;
    let mut first = |seq: i64| -> rusqlite::Result<(i64, i64)> {
        at.query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
    };
    if first(lo)?.1 >= before_ms {
        return Ok(0);
    }
    // Invariant: the event at or after `lo` is older than the cutoff; answer in [lo, hi].
    let mut best = first(lo)?.0;
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        let (seq, received) = first(mid)?;
        if received < before_ms {
            best = seq;
            lo = seq.max(mid);
        } else {
            hi = mid - 1;
        }
    }
    Ok(best)
}

fn prune(
    tx: &rusqlite::Transaction<'_>,
    r: Retention,
    now: i64,
    keys: &Dedup,
) -> rusqlite::Result<u64> {
    // Console sessions past their end (a person who never signed out).
    tx.prepare_cached("DELETE FROM sessions WHERE expires_at < ?1")?
        .execute([now])?;
    let mut cutoff_seq: i64 = 0;
    if let Some(age) = r.max_age {
        let before = now - age.as_millis() as i64;
        cutoff_seq = cutoff_seq.max(last_seq_before(tx, "events", "received_at", before)?);
    }
    if let Some(max) = r.max_events {
        let s: Option<i64> = tx.query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))?;
        cutoff_seq = cutoff_seq.max(s.unwrap_or(0) - max as i64);
    }
    // The newest event and the newest delivery are always kept: SQLite hands out max+1,
    // and the dispatcher relies on ids never being reused.
    let newest: Option<i64> = tx.query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))?;
    cutoff_seq = cutoff_seq.min(newest.unwrap_or(0) - 1);
    let mut removed = 0;
    if cutoff_seq > 0 {
        // Events with unfinished deliveries are kept whatever their age, and the newest
        // delivery's event (so that delivery ids are never reused).
        const KEEP: &str =
            "SELECT event_seq FROM deliveries WHERE state IN ('pending','running','retrying')
             UNION SELECT event_seq FROM deliveries WHERE id = (SELECT MAX(id) FROM deliveries)";
        tx.execute(
            &format!("DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_seq <= ?1 AND event_seq NOT IN ({KEEP}))"),
            [cutoff_seq],
        )?;
        tx.execute(
            "DELETE FROM correlations WHERE event_seq <= ?1",
            [cutoff_seq],
        )?;
        tx.execute(
            &format!("DELETE FROM approvals WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_seq <= ?1 AND event_seq NOT IN ({KEEP}))"),
            [cutoff_seq],
        )?;
        tx.execute(
            &format!("DELETE FROM deliveries WHERE event_seq <= ?1 AND event_seq NOT IN ({KEEP})"),
            [cutoff_seq],
        )?;
        removed = tx.execute(
            &format!("DELETE FROM events WHERE seq <= ?1 AND seq NOT IN ({KEEP})"),
            [cutoff_seq],
        )? as u64;
    }
    let forgotten = first_kept_key(tx, now, keys, r.dedup.max_keys)?;
    tx.execute("DELETE FROM dedup_keys WHERE seq <= ?1", [forgotten])?;
    tx.execute("DELETE FROM throttles WHERE until < ?1", [now])?;
    Ok(removed)
}

fn api_token_row(r: &rusqlite::Row) -> rusqlite::Result<ApiToken> {
    Ok(ApiToken {
        id: r.get(0)?,
        user: r.get(1)?,
        label: r.get(2)?,
        created_at: r.get(3)?,
        revoked_at: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Bus, NewDelivery, Store};

    fn event(id: &str, trigger: Option<&str>) -> NewEvent {
        NewEvent {
            source_name: "t".into(),
            ce_source: "/t".into(),
            ce_id: id.into(),
            ty: "t".into(),
            subject: None,
            body: "{}".into(),
            deliveries: trigger
                .map(|t| NewDelivery {
                    trigger: t.into(),
                    ordering_key: None,
                    throttle: None,
                    correlate: None,
                })
                .into_iter()
                .collect(),
        }
    }

    async fn count(store: &SqliteStore, table: &'static str) -> i64 {
        store.count(table).await
    }

    #[tokio::test]
    async fn retention_keeps_unfinished_work_and_dedup_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &dir.path().join("s.db"),
            DedupLimits::window(Duration::from_secs(2)),
        )
        .unwrap();
        // Five finished events (no deliveries) and one with a pending delivery, oldest.
        store
            .ingest(vec![event("pending", Some("fn"))])
            .await
            .unwrap();
        for i in 0..5 {
            store
                .ingest(vec![event(&format!("e{i}"), None)])
                .await
                .unwrap();
        }
        let r = Retention {
            max_age: None,
            max_events: Some(2),
            dedup: DedupLimits::window(Duration::from_secs(2)),
        };
        let removed = store.prune(r).await.unwrap();
        assert_eq!(
            removed, 3,
            "6 events, keep 2 newest, and the pending one whatever its age"
        );
        assert_eq!(count(&store, "events").await, 3);
        assert_eq!(count(&store, "deliveries").await, 1);
        // Age: everything finished is older than 0s.
        let r = Retention {
            max_age: Some(Duration::ZERO),
            max_events: None,
            dedup: DedupLimits::window(Duration::from_secs(2)),
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        store.prune(r).await.unwrap();
        assert_eq!(
            count(&store, "events").await,
            2,
            "the pending one, and the newest (ids are never reused)"
        );
        // Even once its delivery is done, the newest delivery and its event stay, so the next
        // delivery gets a larger id.
        let first = store.ingest(vec![event("f", Some("fn"))]).await.unwrap();
        let id = first[0].deliveries[0].0;
        let rec = AttemptRecord {
            n: 1,
            started_at: now_ms(),
            duration_ms: 1,
            outcome: "succeeded".into(),
            detail: String::new(),
        };
        store
            .finish_attempt(id, rec, State::Succeeded, None)
            .await
            .unwrap();
        store.ingest(vec![event("h", None)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        store.prune(r).await.unwrap();
        let next = store.ingest(vec![event("g", Some("fn"))]).await.unwrap();
        assert!(next[0].deliveries[0].0 > id);
        // Within the window a repeat is a duplicate; after it, it is new again. (The window
        // is 2 s, not less: a slow CI machine took longer than 200 ms to get here.)
        let again = store.ingest(vec![event("e4", None)]).await.unwrap();
        assert!(again[0].duplicate);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        store.prune(r).await.unwrap();
        let again = store.ingest(vec![event("e4", None)]).await.unwrap();
        assert!(!again[0].duplicate);
    }

    #[tokio::test]
    async fn dedup_keys_survive_a_restart_and_the_key_limit_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let limits = DedupLimits {
            window: Duration::from_secs(60),
            max_keys: 3,
        };
        {
            let store = SqliteStore::open(&path, limits).unwrap();
            let first = store
                .ingest(vec![event("a", None), event("a", None)])
                .await
                .unwrap();
            assert!(
                !first[0].duplicate && first[1].duplicate,
                "a repeat in one batch"
            );
            store.ingest(vec![event("b", None)]).await.unwrap();
            Store::flush(&store).await;
        }
        let store = SqliteStore::open(&path, limits).unwrap();
        let again = store
            .ingest(vec![event("a", None), event("b", None), event("c", None)])
            .await
            .unwrap();
        assert!(again[0].duplicate && again[1].duplicate && !again[2].duplicate);
        // Retention trims the persisted keys to the limit: the newest three stay.
        for id in ["d", "e"] {
            store.ingest(vec![event(id, None)]).await.unwrap();
        }
        let r = Retention {
            max_age: None,
            max_events: None,
            dedup: limits,
        };
        store.prune(r).await.unwrap();
        assert_eq!(count(&store, "dedup_keys").await, 3);
    }

    #[tokio::test]
    async fn sessions_expire_and_retention_forgets_them() {
        use crate::store::Store;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &dir.path().join("s.db"),
            DedupLimits::window(Duration::from_secs(60)),
        )
        .unwrap();
        let now = now_ms();
        for (hash, end) in [("live", now + 60_000), ("ended", now - 1)] {
            let s = Session {
                user: "ana".into(),
                csrf: "c".into(),
                expires_at: end,
            };
            store.create_session(hash, &s).await.unwrap();
        }
        assert!(store.session("live", now).await.unwrap().is_some());
        assert!(store.session("ended", now).await.unwrap().is_none());
        let r = Retention {
            max_age: None,
            max_events: None,
            dedup: DedupLimits::window(Duration::from_secs(60)),
        };
        store.prune(r).await.unwrap();
        assert_eq!(count(&store, "sessions").await, 1);
        store.end_session("live").await.unwrap();
        assert_eq!(count(&store, "sessions").await, 0);
    }

    #[tokio::test]
    async fn retention_by_age_finds_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &dir.path().join("s.db"),
            DedupLimits::window(Duration::from_secs(60)),
        )
        .unwrap();
        for i in 0..37 {
            store
                .ingest(vec![event(&format!("old{i}"), None)])
                .await
                .unwrap();
        }
        // A second between the two groups, and a cutoff in its middle: a slow machine may
        // take a few hundred ms to store the second group and prune.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for i in 0..23 {
            store
                .ingest(vec![event(&format!("new{i}"), None)])
                .await
                .unwrap();
        }
        let r = Retention {
            max_age: Some(Duration::from_millis(1000)),
            max_events: None,
            dedup: DedupLimits::window(Duration::from_secs(60)),
        };
        assert_eq!(store.prune(r).await.unwrap(), 37);
        assert_eq!(count(&store, "events").await, 23);
        assert_eq!(store.prune(r).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn replay_only_dead_or_throttled() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &dir.path().join("s.db"),
            DedupLimits::window(Duration::from_secs(60)),
        )
        .unwrap();
        let s = store.ingest(vec![event("a", Some("fn"))]).await.unwrap();
        let id = s[0].deliveries[0].0;
        assert!(matches!(
            Bus::replay(&store, id).await,
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            Bus::replay(&store, 999).await,
            Err(StoreError::NotFound(_))
        ));
        let rec = AttemptRecord {
            n: 1,
            started_at: now_ms(),
            duration_ms: 1,
            outcome: "failed".into(),
            detail: "boom".into(),
        };
        store
            .finish_attempt(id, rec, State::Dead, None)
            .await
            .unwrap();
        let open = Bus::replay(&store, id).await.unwrap();
        assert_eq!((open.attempts, open.attempt_base), (1, 1));
        assert_eq!(
            store.open_deliveries(0, 10, i64::MAX).await.unwrap().len(),
            1
        );
    }
}
