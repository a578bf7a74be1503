//! Faults injected into the store itself (a database trigger that refuses one event), on
//! the backend the suite runs on.

use reflex::store::NewEvent;

fn event(id: &str) -> NewEvent {
    NewEvent {
        source_name: "ce".into(),
        ce_source: "/t".into(),
        ce_id: id.into(),
        ty: "t".into(),
        subject: None,
        body: "{}".into(),
        deliveries: vec![],
    }
}

/// Runs SQL on the test's database beside the open store.
async fn execute(dir: &std::path::Path, sqlite: &str, postgres: &str) {
    match crate::common::pg_admin_url() {
        Some(_) => {
            let url = crate::common::pg_url_for(dir);
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client.batch_execute(postgres).await.unwrap();
        }
        None => {
            let c = rusqlite::Connection::open(dir.join("reflex.db")).unwrap();
            c.execute_batch(sqlite).unwrap();
        }
    }
}

/// A request whose write fails leaves nothing behind, neither its events nor their dedup
/// keys, even when other requests in the same batch are committed: the sender's retry is
/// stored, not answered as a duplicate of something that was never kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_leaves_no_dedup_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::common::open_backend(dir.path()).await.store;
    execute(
        dir.path(),
        "CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.ce_id = 'poison'
         BEGIN SELECT RAISE(ABORT, 'injected fault'); END;",
        "CREATE FUNCTION poison() RETURNS trigger AS $$
         BEGIN IF NEW.ce_id = 'poison' THEN RAISE EXCEPTION 'injected fault'; END IF; RETURN NEW; END
         $$ LANGUAGE plpgsql;
         CREATE TRIGGER poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION poison();",
    )
    .await;
    // Requests at once, so that they share batches: the poisoned one with an event before
    // it, and clean ones beside it.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let events = if i == 10 {
                vec![event("before-poison"), event("poison")]
            } else {
                vec![event(&format!("clean-{i}"))]
            };
            (i, store.ingest(events).await)
        }));
    }
    let mut stored_clean = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        if i == 10 {
            assert!(r.is_err(), "the poisoned request must fail");
        } else if let Ok(s) = r {
            // On PostgreSQL a batch is one statement: its neighbours fail with it (and are
            // retried by their senders); on SQLite they are committed.
            assert!(!s[0].duplicate);
            stored_clean.push(i);
        }
    }
    execute(
        dir.path(),
        "DROP TRIGGER poison;",
        "DROP TRIGGER poison ON events;",
    )
    .await;
    // The retry of the failed request is new, both of its events.
    let retry = store
        .ingest(vec![event("before-poison"), event("poison")])
        .await
        .unwrap();
    assert!(retry.iter().all(|s| !s.duplicate && s.seq > 0), "{retry:?}");
    // Requests that were answered as stored are duplicates now; the others are new.
    for i in (0..20).filter(|i| *i != 10) {
        let again = store
            .ingest(vec![event(&format!("clean-{i}"))])
            .await
            .unwrap();
        assert_eq!(again[0].duplicate, stored_clean.contains(&i), "clean-{i}");
    }
    store.flush().await;
}
