//! reflex: events in (webhooks, CloudEvents…), made durable, matched by triggers and
//! delivered to actions, at least once. [`run`] is the server; the binary only binds
//! listeners and passes a shutdown signal, and tests call it the same way.

pub mod actions;
pub mod api;
pub mod config;
pub mod deliveries;
pub mod event;
pub mod ingest;
pub mod router;
pub mod sources;
pub mod store;
pub mod telemetry;
pub mod template;
pub mod vcenters;

use anyhow::Context;
use config::{Config, ConfigError, Diagnostics};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A configuration that passed every check, ready to run.
pub struct Compiled {
    /// The configuration as read.
    pub config: Config,
    /// The triggers.
    pub router: Arc<router::Router>,
    /// The sources.
    pub sources: Vec<sources::Source>,
    /// The vCenters (not connected yet).
    pub vcenters: vcenters::Vcenters,
}

/// Reads and checks a configuration file, reporting every problem at once. Touches no
/// network and starts nothing (`reflex check`).
pub fn compile_file(path: &std::path::Path) -> Result<Compiled, ConfigError> {
    let config = config::load(path)?;
    compile(path.display().to_string(), config)
}

/// Checks a parsed configuration.
pub fn compile(file: String, config: Config) -> Result<Compiled, ConfigError> {
    let mut diags = Diagnostics::default();
    config.check_common(&mut diags);
    let sources = sources::build(&config, &mut diags);
    let router = router::Router::build(&config, &mut diags);
    let vcenters = vcenters::Vcenters::build(&config.vcenters, &mut diags);
    if !diags.0.is_empty() {
        let mut d = diags.0;
        d.sort_by_key(|d| (d.line, d.column));
        return Err(ConfigError {
            file,
            diagnostics: d,
        });
    }
    Ok(Compiled {
        config,
        router: Arc::new(router),
        sources,
        vcenters,
    })
}

/// The two listeners: sources (webhooks, CloudEvents) and the management API.
pub struct Listeners {
    /// Sources listener.
    pub http: TcpListener,
    /// API listener.
    pub api: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let http = TcpListener::bind(config.http.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on http.listen {} (is another process using it?)",
                    config.http.listen
                )
            })?;
        let api = TcpListener::bind(config.api.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on api.listen {} (is another process using it?)",
                    config.api.listen
                )
            })?;
        Ok(Listeners { http, api })
    }
}

/// How long running deliveries get to finish after shutdown is requested.
pub const DRAIN: Duration = Duration::from_secs(20);

/// Runs reflex until `shutdown` is cancelled, then drains deliveries and returns.
pub async fn run(
    compiled: Compiled,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Compiled {
        config,
        router,
        sources,
        vcenters,
    } = compiled;
    let dedup = store::DedupLimits {
        window: config.store.dedup_window.0,
        max_keys: config.store.dedup_max_keys,
    };
    let store = store::Store::open(&config.store.path, dedup)
        .with_context(|| format!("opening the store at {}", config.store.path.display()))?;
    let metrics = Arc::new(telemetry::Metrics::new());
    let (dispatch_tx, dispatch_rx) = tokio::sync::mpsc::unbounded_channel();
    let ingest = ingest::Ingest::new(
        store.clone(),
        router.clone(),
        metrics.clone(),
        config.http.queue,
        dispatch_tx.clone(),
    );
    let client = reqwest::Client::builder()
        .user_agent(concat!("reflex/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the HTTP client")?;
    let secrets: serde_json::Map<String, serde_json::Value> = config
        .secrets
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.expose().to_string())))
        .collect();
    let ctx = actions::ActionContext {
        client,
        ingest: ingest.clone(),
        secrets: Arc::new(serde_json::Value::Object(secrets)),
        vcenters: vcenters.clone(),
    };
    let dispatcher = deliveries::Dispatcher::new(
        router.clone(),
        store.clone(),
        ctx,
        metrics.clone(),
        dispatch_rx,
        config.store.deliveries_in_memory,
    );

    let state = Arc::new(api::AppState {
        store: store.clone(),
        router: router.clone(),
        metrics: metrics.clone(),
        ingest: ingest.clone(),
        dispatch: dispatch_tx,
        token: config.api.token.clone(),
        ready: Default::default(),
        max_body: config.http.max_body.0,
    });
    let (http_routes, pollers) = sources::routes(sources, ingest.clone());
    let http_routes = http_routes.route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let api_routes = api::routes(state.clone());

    let stop_http = CancellationToken::new();
    let http_addr = listeners.http.local_addr()?;
    let api_addr = listeners.api.local_addr()?;
    let http_server = {
        let stop = stop_http.clone();
        tokio::spawn(async move {
            axum::serve(listeners.http, http_routes)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };
    let api_server = {
        let stop = stop_http.clone();
        tokio::spawn(async move {
            axum::serve(listeners.api, api_routes)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };
    let retention = store::Retention {
        max_age: config.store.retention.max_age.map(|d| d.0),
        max_events: config.store.retention.max_events,
        dedup,
    };
    let pruner = {
        let store = store.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => match store.prune(retention).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(removed = n, "retention: old events removed"),
                        Err(e) => tracing::warn!(error = %e, "retention failed"),
                    },
                }
            }
        })
    };
    let stop_pollers = CancellationToken::new();
    let mut poller_tasks = Vec::new();
    for p in pollers {
        tracing::info!(source = p.name(), "starting the vCenter event source");
        poller_tasks.push(tokio::spawn(p.run(
            ingest.clone(),
            store.clone(),
            vcenters.clone(),
            metrics.clone(),
            stop_pollers.clone(),
        )));
    }
    let dispatcher_stop = CancellationToken::new();
    let dispatcher_task = tokio::spawn(dispatcher.run(dispatcher_stop.clone(), DRAIN));
    state.ready.store(true, Ordering::Release);
    tracing::info!(sources = %http_addr, api = %api_addr, triggers = router.triggers.len(), "reflex is running");

    shutdown.cancelled().await;
    tracing::info!("shutting down: no new requests; draining deliveries");
    // Stop accepting first so that every acknowledged event is in the store, then drain.
    state.ready.store(false, Ordering::Release);
    stop_http.cancel();
    stop_pollers.cancel();
    for t in poller_tasks {
        let _ = t.await;
    }
    let _ = http_server.await;
    let _ = api_server.await;
    dispatcher_stop.cancel();
    let _ = dispatcher_task.await;
    let _ = pruner.await;
    store.flush().await;
    tracing::info!("stopped");
    Ok(())
}
