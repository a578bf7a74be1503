//! reflex: events in (webhooks, CloudEvents…), made durable, matched by triggers and
//! delivered to actions, at least once. [`run`] is the server; the binary only binds
//! listeners and passes a shutdown signal, and tests call it the same way.

pub mod actions;
pub mod amqp;
pub mod api;
pub mod bus;
pub mod config;
pub mod deliveries;
pub mod event;
#[doc(hidden)]
pub mod fuzzing;
pub mod ingest;
pub mod listener;
pub mod router;
pub mod sources;
pub mod store;
pub mod telemetry;
pub mod template;
pub mod vcenters;

use anyhow::Context;
use config::{Config, ConfigError, Diagnostics};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// What runs but deserves the operator's attention (`reflex check` prints it, `run`
    /// logs it).
    pub warnings: Vec<String>,
}

/// Findings that do not stop reflex: sources that take unauthenticated events from
/// beyond this machine; vSphere actions whose attempts may end before their vCenter task.
fn warnings(config: &Config) -> Vec<String> {
    let listen = config.http.listen;
    let mut out: Vec<String> = Vec::new();
    if !listen.ip().is_loopback() {
        out.extend(config.sources.iter().filter(|s| s.value.unauthenticated()).map(|s| {
            format!(
                "source `{}` accepts events without authentication (auth: none) on {listen}, which is not a loopback address: anyone who can reach it can send events; set `auth`",
                s.value.name().value
            )
        }));
    }
    for t in &config.triggers {
        if let Some(timeout) = t.delivery.timeout {
            if t.action.runs_vcenter_tasks() && timeout.0 < actions::vsphere::TASK_ATTEMPT {
                out.push(format!(
                    "trigger `{}`: delivery.timeout {:?} is shorter than a vCenter task may take (10m): an attempt cut short leaves its task running, and the retry starts the operation again; leave timeout unset (11m for vSphere actions)",
                    t.name.value,
                    timeout.0,
                ));
            }
        }
    }
    out
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
        warnings: warnings(&config),
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

/// A request to re-read the configuration file; answered once the new file is checked
/// (`Ok` means the restart on it has begun, `Err` holds every problem found).
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Where reloads come from: the file to re-read and the requests (SIGHUP, the API).
pub struct Reload {
    /// The configuration file.
    pub path: std::path::PathBuf,
    /// Sender for the API's `POST /api/v1/reload`.
    pub requests: tokio::sync::mpsc::Sender<ReloadRequest>,
    /// Where requests arrive.
    pub incoming: tokio::sync::mpsc::Receiver<ReloadRequest>,
}

impl Reload {
    /// Reloads of the configuration at `path`.
    pub fn new(path: std::path::PathBuf) -> Reload {
        let (requests, incoming) = tokio::sync::mpsc::channel(8);
        Reload {
            path,
            requests,
            incoming,
        }
    }
}

/// Runs reflex until `shutdown` is cancelled, then drains deliveries and returns.
pub async fn run(
    compiled: Compiled,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_reload(compiled, listeners, shutdown, None).await
}

/// Like [`run`]; each reload request re-reads the configuration and, when it passes every
/// check, restarts the pipeline on the same sockets: intake pauses (connections wait in the
/// listen backlog, none is refused), running deliveries finish, the store is reopened and
/// open deliveries resume under the new triggers. A file with errors changes nothing.
pub async fn run_with_reload(
    mut compiled: Compiled,
    listeners: Listeners,
    shutdown: CancellationToken,
    mut reload: Option<Reload>,
) -> anyhow::Result<()> {
    let http = listeners.http.into_std()?;
    let api = listeners.api.into_std()?;
    let metrics = Arc::new(telemetry::Metrics::new());
    let fixed = Fixed::of(&compiled.config);
    let mut restarting = false;
    loop {
        let listeners = Listeners {
            http: TcpListener::from_std(http.try_clone()?)?,
            api: TcpListener::from_std(api.try_clone()?)?,
        };
        let requests = reload.as_ref().map(|r| r.requests.clone());
        let config_path = reload.as_ref().map(|r| r.path.clone());
        let running =
            match Running::start(compiled, listeners, metrics.clone(), requests, config_path).await
            {
                Ok(r) => r,
                Err(e) => {
                    // The file passed its checks; what failed is the machine (disk, descriptors).
                    let path = match &reload {
                        Some(r) if restarting => r.path.clone(),
                        _ => return Err(e),
                    };
                    tracing::error!("the pipeline could not restart: {e:#}; retrying in 2 s");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                    // Requests that came meanwhile are answered: this start reads the file anew.
                    if let Some(r) = reload.as_mut() {
                        while let Ok(answer) = r.incoming.try_recv() {
                            let _ = answer.send(Err(
                                "the pipeline is restarting; ask again once it runs".into(),
                            ));
                        }
                    }
                    compiled = loop {
                        match reloaded(&path, &fixed) {
                            Ok(c) => break c,
                            Err(e) => {
                                tracing::error!(
                                    "the pipeline is stopped until the file is fixed:\n{e}"
                                );
                                tokio::select! {
                                    _ = shutdown.cancelled() => return Ok(()),
                                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                                }
                            }
                        }
                    };
                    continue;
                }
            };
        let next = loop {
            let request = async {
                match reload.as_mut() {
                    Some(r) => r.incoming.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break None,
                Some(answer) = request => {
                    let path = &reload.as_ref().expect("a request came").path;
                    match reloaded(path, &fixed) {
                        Ok(c) => {
                            let _ = answer.send(Ok(()));
                            break Some(c);
                        }
                        Err(e) => {
                            tracing::error!("reload refused; the running configuration stays:\n{e}");
                            let _ = answer.send(Err(e));
                        }
                    }
                }
            }
        };
        // Requests that come while stopping are refused at once: an API handler waiting
        // for an answer would hold up the graceful shutdown of the server it runs on.
        let stopping = running.stop(next.is_some());
        tokio::pin!(stopping);
        loop {
            let request = async {
                match reload.as_mut() {
                    Some(r) => r.incoming.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut stopping => break,
                Some(answer) = request => {
                    tracing::warn!("reload refused: a reload or shutdown is in progress");
                    let _ = answer.send(Err(
                        "a reload or shutdown is in progress; ask again once it is done".into(),
                    ));
                }
            }
        }
        match next {
            Some(c) if !shutdown.is_cancelled() => {
                compiled = c;
                restarting = true;
            }
            _ => return Ok(()),
        }
    }
}

/// What a reload cannot change: the sockets and the store.
struct Fixed {
    http: std::net::SocketAddr,
    api: std::net::SocketAddr,
    store: (std::path::PathBuf, Option<String>),
}

impl Fixed {
    fn of(c: &Config) -> Fixed {
        Fixed {
            http: c.http.listen,
            api: c.api.listen,
            store: (
                c.store.path.clone(),
                c.store.url.as_ref().map(|u| u.expose().to_string()),
            ),
        }
    }
}

/// Reads the file again; refuses what a restart on the same sockets and store cannot do.
fn reloaded(path: &std::path::Path, current: &Fixed) -> Result<Compiled, String> {
    let c = compile_file(path).map_err(|e| e.to_string())?;
    let mut fixed = Vec::new();
    if c.config.http.listen != current.http {
        fixed.push("http.listen");
    }
    if c.config.api.listen != current.api {
        fixed.push("api.listen");
    }
    if c.config.store.path != current.store.0 {
        fixed.push("store.path");
    }
    if c.config.store.url.as_ref().map(|u| u.expose()) != current.store.1.as_deref() {
        fixed.push("store.url");
    }
    if !fixed.is_empty() {
        return Err(format!(
            "{}: {} cannot change on reload; restart reflex to change them",
            path.display(),
            fixed.join(", ")
        ));
    }
    Ok(c)
}

/// One running pipeline: listeners served, sources polling, the dispatcher, retention.
struct Running {
    http_drain: Duration,
    ingest: ingest::Ingest,
    state: Arc<api::AppState>,
    store: Arc<dyn store::Store>,
    stop_http: CancellationToken,
    stop_tasks: CancellationToken,
    servers: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    pollers: Vec<tokio::task::JoinHandle<()>>,
    pruner: tokio::task::JoinHandle<()>,
    dispatcher_stop: CancellationToken,
    dispatcher: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(
        compiled: Compiled,
        listeners: Listeners,
        metrics: Arc<telemetry::Metrics>,
        reload: Option<tokio::sync::mpsc::Sender<ReloadRequest>>,
        config_path: Option<std::path::PathBuf>,
    ) -> anyhow::Result<Running> {
        let Compiled {
            config,
            router,
            sources,
            vcenters,
            warnings,
        } = compiled;
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let dedup = store::DedupLimits {
            window: config.store.dedup_window.0,
            max_keys: config.store.dedup_max_keys,
        };
        let backend = store::Backend::open(&config.store, listeners.api.local_addr()?)
            .await
            .with_context(|| match &config.store.url {
                Some(_) => "opening the PostgreSQL store (store.url)".to_string(),
                None => format!("opening the store at {}", config.store.path.display()),
            })?;
        let mut backend = backend;
        // On the AMQP bus the broker carries deliveries; the dispatcher below then finds
        // nothing to do and each trigger's consumer runs them instead.
        let amqp = match &config.bus {
            bus::BusConfig::Embedded => None,
            bus::BusConfig::Amqp(c) => {
                let amqp = bus::amqp::AmqpBus::open(
                    c,
                    backend.store.clone(),
                    backend.bus.clone(),
                    &router,
                )
                .await
                .map_err(anyhow::Error::msg)
                .context("opening the AMQP bus (bus.url)")?;
                let swept = amqp
                    .sweep(&router)
                    .await
                    .map_err(anyhow::Error::msg)
                    .context("publishing the deliveries the store holds open to the bus")?;
                if swept > 0 {
                    tracing::info!(
                        deliveries = swept,
                        "open deliveries published to the bus again"
                    );
                }
                backend.bus = amqp.clone();
                Some(amqp)
            }
        };
        let store = backend.store.clone();
        let (dispatch_tx, dispatch_rx) = tokio::sync::mpsc::unbounded_channel();
        let ingest = ingest::Ingest::new(
            store.clone(),
            router.clone(),
            metrics.clone(),
            config.http.queue,
            dispatch_tx.clone(),
            amqp.clone(),
        );
        // Redirects are not followed: a redirect would carry an action's headers (its
        // tokens) to wherever the target points; the attempt records it instead.
        let client = reqwest::Client::builder()
            .user_agent(concat!("reflex/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the HTTP client")?;
        let secrets: serde_json::Map<String, serde_json::Value> = config
            .secrets
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.expose().to_string())))
            .collect();
        // Paused triggers, as the store has them (a pause outlives a restart).
        let pauses = deliveries::Pauses::default();
        match store.paused_triggers().await {
            Ok(list) => {
                for p in &list {
                    tracing::warn!(trigger = %p.trigger, reason = %p.reason, "trigger paused; its deliveries wait until it is resumed");
                }
                pauses.set(list.into_iter().map(|p| p.trigger));
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the paused triggers yet"),
        }
        let ctx = actions::ActionContext {
            pauses: pauses.clone(),
            client,
            ingest: ingest.clone(),
            secrets: Arc::new(serde_json::Value::Object(secrets)),
            vcenters: vcenters.clone(),
            budget_locks: vcenters::BudgetLocks::new(backend.store.clone()),
        };
        let ctx_for_bus = ctx.clone();
        let mut dispatcher = deliveries::Dispatcher::new(
            router.clone(),
            backend.bus.clone(),
            ctx,
            metrics.clone(),
            dispatch_rx,
            config.store.deliveries_in_memory,
        );

        let state = Arc::new(api::AppState {
            backend: backend.clone(),
            router: router.clone(),
            metrics: metrics.clone(),
            ingest: ingest.clone(),
            dispatch: dispatch_tx,
            token: config.api.token.clone(),
            ready: Default::default(),
            store_ok: AtomicBool::new(true),
            max_body: config.http.max_body.0,
            metrics_token: config.api.metrics_token,
            reload,
            pauses: pauses.clone(),
            loopback_only: config.api.listen.ip().is_loopback(),
            vcenters: vcenters.clone(),
            people: api::auth::People::new(
                &config.api.users,
                config.api.token.is_some(),
                config.api.session_ttl.0,
            ),
            config_path,
            tls: config.api.tls.is_some(),
        });
        let decider = deliveries::approval::Decider::new(
            backend.store.clone(),
            backend.bus.clone(),
            state.dispatch.clone(),
        );
        let (http_routes, mut pollers) = sources::routes(sources, ingest.clone(), decider);
        for p in &mut pollers {
            p.bind().await?;
        }
        let http_routes = http_routes.route("/healthz", axum::routing::get(|| async { "ok\n" }));
        let api_routes = api::routes(state.clone());

        let stop_http = CancellationToken::new();
        let http_addr = listeners.http.local_addr()?;
        let api_addr = listeners.api.local_addr()?;
        let serve = |l: TcpListener, routes: axum::Router, limits: listener::Limits| {
            tokio::spawn(listener::serve(l, routes, limits, stop_http.clone()))
        };
        // A body that trickles in is cut off (408) rather than holding its connection.
        let http_routes = http_routes.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            config.http.body_timeout.0,
        ));
        // Certificates are read at every start, so a reload (SIGHUP) takes renewed ones.
        let tls = |t: &Option<config::TlsConfig>, what: &str| -> anyhow::Result<_> {
            t.as_ref()
                .map(listener::tls_acceptor)
                .transpose()
                .map_err(|e| anyhow::anyhow!("{what}: {e}"))
        };
        let http_limits = listener::Limits {
            max_connections: config.http.max_connections,
            header_timeout: config.http.header_timeout.0,
            tls: tls(&config.http.tls, "http.tls")?,
        };
        // The API serves operators and scrapers: few connections.
        let api_limits = listener::Limits {
            max_connections: 256,
            header_timeout: config.http.header_timeout.0,
            tls: tls(&config.api.tls, "api.tls")?,
        };
        let servers = vec![
            serve(listeners.http, http_routes, http_limits),
            serve(listeners.api, api_routes, api_limits),
        ];
        let retention = store::Retention {
            max_age: config.store.retention.max_age.map(|d| d.0),
            max_events: config.store.retention.max_events,
            dedup,
        };
        let stop_tasks = CancellationToken::new();
        // `/readyz` turns unready while the store does not answer (a load balancer then
        // sends events to a node that can make them durable).
        {
            let (store, state, stop) = (store.clone(), state.clone(), stop_tasks.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let ok = matches!(
                        tokio::time::timeout(Duration::from_secs(2), store.health()).await,
                        Ok(Ok(()))
                    );
                    if state.store_ok.swap(ok, Ordering::AcqRel) != ok {
                        if ok {
                            tracing::info!("the store answers again");
                        } else {
                            tracing::error!("the store does not answer: /readyz is unready and events are refused with 503 until it does");
                        }
                    }
                }
            });
        }
        // Pauses and resumes by other nodes reach this one within a second.
        {
            let (store, pauses, stop) = (store.clone(), pauses.clone(), stop_tasks.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    if let Ok(list) = store.paused_triggers().await {
                        pauses.set(list.into_iter().map(|p| p.trigger));
                    }
                }
            });
        }
        let pruner = {
            let store = store.clone();
            let stop = stop_tasks.clone();
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
        let mut poller_tasks = Vec::new();
        for p in pollers {
            tracing::info!(source = p.name(), "starting the source's task");
            poller_tasks.push(tokio::spawn(p.run(
                ingest.clone(),
                store.clone(),
                vcenters.clone(),
                metrics.clone(),
                stop_tasks.clone(),
            )));
        }
        let mut consumers = Vec::new();
        if let Some(amqp) = &amqp {
            tokio::spawn(amqp.clone().republish(stop_tasks.clone()));
            consumers = amqp.consume(
                router.clone(),
                ctx_for_bus.clone(),
                metrics.clone(),
                stop_tasks.clone(),
                config.deliveries.drain.0,
            );
        }
        poller_tasks.extend(consumers);
        // Ready only once what the last run left open is back in hand.
        dispatcher.recover().await;
        let dispatcher_stop = CancellationToken::new();
        let dispatcher =
            tokio::spawn(dispatcher.run(dispatcher_stop.clone(), config.deliveries.drain.0));
        state.ready.store(true, Ordering::Release);
        tracing::info!(sources = %http_addr, api = %api_addr, triggers = router.triggers.len(), "reflex is running");
        Ok(Running {
            http_drain: config.http.drain.0,
            ingest,
            state,
            store,
            stop_http,
            stop_tasks,
            servers,
            pollers: poller_tasks,
            pruner,
            dispatcher_stop,
            dispatcher,
        })
    }

    /// Stops intake first, so that every acknowledged event is in the store, then drains.
    async fn stop(self, reloading: bool) {
        if reloading {
            tracing::info!("reloading: pausing intake and finishing running deliveries");
        } else {
            tracing::info!("shutting down: no new requests; draining deliveries");
        }
        self.state.ready.store(false, Ordering::Release);
        self.stop_http.cancel();
        self.stop_tasks.cancel();
        for t in self.pollers {
            let _ = t.await;
        }
        // A client that never finishes its request must not hold up the stop: after the
        // deadline the servers stop waiting for it, and `close` below refuses its event.
        let deadline = tokio::time::Instant::now() + self.http_drain;
        for t in self.servers {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                tracing::warn!(
                    "requests still open after {:?}; their events will be refused (503)",
                    self.http_drain
                );
                abort.abort();
            }
        }
        self.dispatcher_stop.cancel();
        let _ = self.dispatcher.await;
        // Emits of draining attempts could still ingest; from here on nothing is acknowledged
        // that this pipeline would not deliver (the next start reads what is stored).
        self.ingest.close().await;
        let _ = self.pruner.await;
        self.store.flush().await;
        if !reloading {
            tracing::info!("stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vSphere actions get attempts longer than a vCenter task by default, and a shorter
    /// one set by hand is a finding of `check`; other actions keep 30 s.
    #[test]
    fn vsphere_attempts_outlast_their_tasks() {
        let yaml = r#"
vcenters:
  vc1: {url: "https://127.0.0.1:1/sdk", username: u, password: p, insecure: true}
triggers:
  - name: web
    action: {type: http, url: "http://127.0.0.1:1/"}
  - name: off
    action: {type: vsphere.power, vcenter: vc1, op: "off", vm: {name: x}}
  - name: short
    action: {type: vsphere.power, vcenter: vc1, op: "off", vm: {name: x}}
    delivery: {timeout: 30s}
"#;
        let compiled = compile("t.yaml".into(), config::parse("t.yaml", yaml).unwrap()).unwrap();
        let timeout = |name: &str| {
            compiled
                .router
                .triggers
                .iter()
                .find(|t| t.name == name)
                .unwrap()
                .policy
                .timeout
        };
        assert_eq!(timeout("web"), Duration::from_secs(30));
        assert_eq!(timeout("off"), actions::vsphere::TASK_ATTEMPT);
        assert_eq!(timeout("short"), Duration::from_secs(30));
        assert_eq!(compiled.warnings.len(), 1, "{:?}", compiled.warnings);
        assert!(compiled.warnings[0].contains("trigger `short`"));
    }
}
