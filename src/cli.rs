//! The command line: `run`, `check`, `schema`, `send`, `events`, `deliveries`, `replay`.
//! Read commands use the running server's REST API.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use reflex::config;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "reflex",
    version,
    about = "A self-healing, event-driven datacenter in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ApiArgs {
    /// The API of a running reflex.
    #[arg(long, env = "REFLEX_API", default_value = "http://127.0.0.1:9090")]
    api: String,
    /// The API token, when the server requires one.
    #[arg(long, env = "REFLEX_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Run {
        /// The configuration file.
        #[arg(short, long, default_value = "reflex.yaml")]
        config: PathBuf,
    },
    /// Check a configuration file without starting anything.
    Check {
        /// The configuration file.
        #[arg(short, long, default_value = "reflex.yaml")]
        config: PathBuf,
    },
    /// Print the JSON Schema of the configuration file.
    Schema,
    /// Send a test event to a running server.
    Send {
        /// Event type.
        #[arg(long = "type")]
        ty: String,
        /// Event subject.
        #[arg(long)]
        subject: Option<String>,
        /// Event source.
        #[arg(long, default_value = "/reflex/cli")]
        source: String,
        /// Event id (a new UUID by default).
        #[arg(long)]
        id: Option<String>,
        /// JSON data, or `@file` to read it from a file.
        #[arg(long)]
        data: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List or show events.
    Events {
        #[command(subcommand)]
        cmd: Option<ListShow>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List or show deliveries.
    Deliveries {
        #[command(subcommand)]
        cmd: Option<ListShow>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Replay dead deliveries: one by id, or every dead one with `--all-dead`.
    Replay {
        /// Delivery id.
        id: Option<i64>,
        /// Replay every dead delivery (of `--trigger` if given).
        #[arg(long)]
        all_dead: bool,
        /// Only this trigger's deliveries (with `--all-dead`).
        #[arg(long)]
        trigger: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Follow new events as they arrive (Ctrl-C stops).
    Tail {
        #[command(flatten)]
        filter: EventFilter,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Make a running server re-read its configuration file (like SIGHUP).
    Reload {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the nodes sharing the store, their last heartbeat and the singletons each holds.
    Nodes {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Apply the store's schema migrations (PostgreSQL; `reflex run` applies them too).
    Migrate {
        /// The configuration file (its `store.url`).
        #[arg(short, long, default_value = "reflex.yaml")]
        config: PathBuf,
        /// Print the migrations that would run, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Event search (events list, tail).
#[derive(clap::Args, Default)]
struct EventFilter {
    /// Only this type (events).
    #[arg(long = "type")]
    ty: Option<String>,
    /// Only this subject (events).
    #[arg(long)]
    subject: Option<String>,
    /// Only this CloudEvents source (events).
    #[arg(long)]
    source: Option<String>,
    /// Only events containing this text, in attributes or data (events).
    #[arg(short, long = "query")]
    q: Option<String>,
    /// Only events received at or after this RFC 3339 time (events).
    #[arg(long)]
    since: Option<String>,
}

impl EventFilter {
    fn query(&self) -> String {
        let mut q = String::new();
        for (k, v) in [
            ("type", &self.ty),
            ("subject", &self.subject),
            ("source", &self.source),
            ("q", &self.q),
            ("since", &self.since),
        ] {
            if let Some(v) = v {
                q.push_str(&format!("&{k}={}", urlencode(v)));
            }
        }
        q
    }
}

#[derive(Subcommand)]
enum ListShow {
    /// List, newest first.
    List {
        /// Only this state (deliveries): pending, running, retrying, succeeded, dead, throttled.
        #[arg(long)]
        state: Option<String>,
        /// Only this trigger (deliveries).
        #[arg(long)]
        trigger: Option<String>,
        #[command(flatten)]
        filter: EventFilter,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one in full (JSON).
    Show {
        /// Event seq or delivery id.
        id: i64,
    },
}

/// Runs the command line; errors are printed with their causes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Check { config } => match reflex::compile_file(&config) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("{}: warning: {w}", config.display());
                }
                println!(
                    "{}: ok ({} sources, {} triggers)",
                    config.display(),
                    c.sources.len(),
                    c.router.triggers.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Schema => {
            println!("{}", serde_json::to_string_pretty(&config::json_schema())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            let compiled = match reflex::compile_file(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(2));
                }
            };
            reflex::telemetry::init_logging(&compiled.config.log);
            runtime()?.block_on(async move {
                let listeners = reflex::Listeners::bind(&compiled.config).await?;
                let shutdown = CancellationToken::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    signal.cancel();
                });
                let reload = reflex::Reload::new(config.clone());
                let requests = reload.requests.clone();
                tokio::spawn(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    let Ok(mut hup) = signal(SignalKind::hangup()) else {
                        return;
                    };
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reloading the configuration");
                        let (answer, _) = tokio::sync::oneshot::channel();
                        if requests.send(answer).await.is_err() {
                            break;
                        }
                    }
                });
                reflex::run_with_reload(compiled, listeners, shutdown, Some(reload)).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Send {
            ty,
            subject,
            source,
            id,
            data,
            api,
        } => runtime()?.block_on(async move {
            let data: Value = match data {
                None => Value::Null,
                Some(d) => {
                    let text = match d.strip_prefix('@') {
                        Some(path) => std::fs::read_to_string(path)
                            .with_context(|| format!("reading --data file {path}"))?,
                        None => d,
                    };
                    serde_json::from_str(&text).context("--data is not valid JSON")?
                }
            };
            let mut ev = json!({
                "specversion": "1.0", "id": id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
                "source": source, "type": ty, "time": chrono::Utc::now().to_rfc3339(),
            });
            if let Some(s) = subject {
                ev["subject"] = json!(s);
            }
            if !data.is_null() {
                ev["datacontenttype"] = json!("application/json");
                ev["data"] = data;
            }
            let resp = client(&api)
                .post(format!("{}/api/v1/events", api.api))
                .header("content-type", "application/cloudevents+json")
                .body(ev.to_string())
                .send()
                .await
                .with_context(|| unreachable(&api))?;
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                bail!("reflex answered {status}: {body}");
            }
            println!("accepted: {}", body["ids"][0].as_str().unwrap_or("?"));
            Ok(ExitCode::SUCCESS)
        }),
        Command::Events { cmd, api } => runtime()?.block_on(list_show("events", cmd, api)),
        Command::Deliveries { cmd, api } => runtime()?.block_on(list_show("deliveries", cmd, api)),
        Command::Replay {
            id,
            all_dead,
            trigger,
            api,
        } => runtime()?.block_on(replay(id, all_dead, trigger, api)),
        Command::Reload { api } => runtime()?.block_on(reload(api)),
        Command::Nodes { api } => runtime()?.block_on(nodes(api)),
        Command::Migrate { config, dry_run } => runtime()?.block_on(migrate(config, dry_run)),
        Command::Tail { filter, json, api } => runtime()?.block_on(tail(filter, json, api)),
    }
}

fn client(api: &ApiArgs) -> reqwest::RequestBuilderFactory {
    reqwest::RequestBuilderFactory {
        client: reqwest::Client::new(),
        token: api.token.clone(),
    }
}

async fn get(api: &ApiArgs, path: &str) -> Result<Value> {
    let resp = client(api)
        .get(format!("{}{path}", api.api))
        .send()
        .await
        .with_context(|| unreachable(api))?;
    let status = resp.status();
    let body: Value = resp
        .json()
        .await
        .context("the API answered something that is not JSON")?;
    if !status.is_success() {
        bail!(
            "reflex answered {status}: {}",
            body["error"]["message"]
                .as_str()
                .unwrap_or(&body.to_string())
        );
    }
    Ok(body)
}

async fn list_show(kind: &str, cmd: Option<ListShow>, api: ApiArgs) -> Result<ExitCode> {
    let cmd = cmd.unwrap_or(ListShow::List {
        state: None,
        trigger: None,
        filter: EventFilter::default(),
        limit: 50,
        json: false,
    });
    match cmd {
        ListShow::Show { id } => {
            let v = get(&api, &format!("/api/v1/{kind}/{id}")).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        ListShow::List {
            state,
            trigger,
            filter,
            limit,
            json,
        } => {
            let mut q = format!("?limit={limit}");
            for (k, v) in [("state", state), ("trigger", trigger)] {
                if let Some(v) = v {
                    q.push_str(&format!("&{k}={}", urlencode(&v)));
                }
            }
            q.push_str(&filter.query());
            let v = get(&api, &format!("/api/v1/{kind}{q}")).await?;
            let rows = v[kind].as_array().cloned().unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if kind == "events" {
                print_event_header();
                for r in rows {
                    print_event(&r);
                }
            } else {
                println!(
                    "{:>8}  {:<20}  {:<10}  {:>8}  {:<36}  LAST ERROR",
                    "ID", "TRIGGER", "STATE", "ATTEMPTS", "EVENT"
                );
                for r in rows {
                    println!(
                        "{:>8}  {:<20}  {:<10}  {:>8}  {:<36}  {}",
                        r["id"].to_string(),
                        s(&r["trigger"]),
                        s(&r["state"]),
                        r["attempts"].to_string(),
                        s(&r["event_id"]),
                        s(&r["last_error"])
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_event_header() {
    println!(
        "{:>8}  {:<29}  {:<40}  {:<20}  ID",
        "SEQ", "RECEIVED", "TYPE", "SUBJECT"
    );
}

fn print_event(r: &Value) {
    println!(
        "{:>8}  {:<29}  {:<40}  {:<20}  {}",
        r["seq"].to_string(),
        s(&r["received_at"]),
        s(&r["type"]),
        s(&r["subject"]),
        s(&r["id"])
    );
}

/// Follows new events as they are stored, until interrupted.
async fn tail(filter: EventFilter, json: bool, api: ApiArgs) -> Result<ExitCode> {
    use std::io::Write;
    // Start after the newest event stored now, whatever the filter.
    let newest = get(&api, "/api/v1/events?limit=1").await?;
    let mut after = newest["events"][0]["seq"].as_i64().unwrap_or(0);
    let search = filter.query();
    if !json {
        print_event_header();
    }
    loop {
        // Up to the newest event now, so that events the filter skips are not scanned again.
        let page = async {
            let newest = get(&api, "/api/v1/events?limit=1").await?;
            let upto = newest["events"][0]["seq"].as_i64().unwrap_or(after);
            let q = format!(
                "/api/v1/events?after={after}&before={}&limit=1000{search}",
                upto + 1
            );
            let rows = get(&api, &q).await?["events"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            anyhow::Ok((upto, rows))
        };
        let (upto, rows) = match page.await {
            Ok(p) => p,
            Err(e) => {
                // A reload or restart is a moment's gap: keep following.
                eprintln!("{e:#}; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        for r in &rows {
            if json {
                println!("{r}");
            } else {
                print_event(r);
            }
        }
        std::io::stdout().flush()?;
        match rows.last() {
            Some(last) if rows.len() == 1000 => after = last["seq"].as_i64().unwrap_or(upto),
            _ => {
                after = upto.max(after);
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}

/// Why a command could not talk to the server.
fn unreachable(api: &ApiArgs) -> String {
    format!(
        "cannot reach reflex at {} (is it running? see --api)",
        api.api
    )
}

fn s(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_default()
}

fn urlencode(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

async fn replay(
    id: Option<i64>,
    all_dead: bool,
    trigger: Option<String>,
    api: ApiArgs,
) -> Result<ExitCode> {
    let ids: Vec<i64> = match (id, all_dead) {
        (Some(id), false) => vec![id],
        (None, true) => {
            let mut ids = Vec::new();
            let mut before = i64::MAX;
            loop {
                let mut q = format!("/api/v1/deliveries?state=dead&limit=1000&before={before}");
                if let Some(t) = &trigger {
                    q.push_str(&format!("&trigger={}", urlencode(t)));
                }
                let v = get(&api, &q).await?;
                let page: Vec<i64> = v["deliveries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|d| d["id"].as_i64())
                    .collect();
                let Some(&last) = page.last() else { break };
                ids.extend(page);
                before = last;
            }
            ids
        }
        _ => bail!("give a delivery id or --all-dead"),
    };
    let total = ids.len();
    let mut failed = 0;
    for (i, id) in ids.into_iter().enumerate() {
        let resp = client(&api)
            .post(format!("{}/api/v1/deliveries/{id}/replay", api.api))
            .send()
            .await
            .with_context(|| unreachable(&api))?;
        if resp.status().is_success() {
            if total > 1 {
                eprint!("\rreplayed {}/{total}", i + 1);
            } else {
                println!("delivery {id}: replaying");
            }
        } else {
            failed += 1;
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            eprintln!(
                "\ndelivery {id}: {}",
                body["error"]["message"].as_str().unwrap_or("failed")
            );
        }
    }
    if total > 1 {
        eprintln!();
    }
    if total == 0 {
        println!("no dead deliveries");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn nodes(api: ApiArgs) -> Result<ExitCode> {
    let v = get(&api, "/api/v1/nodes").await?;
    println!(
        "{:<28} {:<26} {:<26} {:<10} SINGLETONS",
        "NODE", "STARTED", "HEARTBEAT", "VERSION"
    );
    for n in v["nodes"].as_array().into_iter().flatten() {
        let singletons: Vec<String> = n["singletons"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        println!(
            "{:<28} {:<26} {:<26} {:<10} {}",
            s(&n["id"]),
            s(&n["started_at"]),
            s(&n["heartbeat_at"]),
            s(&n["version"]),
            singletons.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn migrate(config: PathBuf, dry_run: bool) -> Result<ExitCode> {
    let compiled = match reflex::compile_file(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let Some(url) = &compiled.config.store.url else {
        println!("the embedded store creates its tables when reflex starts: nothing to migrate");
        return Ok(ExitCode::SUCCESS);
    };
    let url = url.expose().to_string();
    if dry_run {
        let pending = reflex::store::postgres::pending_migrations(&url).await?;
        if pending.is_empty() {
            println!("the database is up to date");
        }
        for (version, name, sql) in pending {
            println!("-- migration {version}: {name}\n{}", sql.trim());
        }
    } else {
        let applied = reflex::store::postgres::apply_migrations(&url).await?;
        println!("{applied} migrations applied; the database is up to date");
    }
    Ok(ExitCode::SUCCESS)
}

async fn reload(api: ApiArgs) -> Result<ExitCode> {
    let resp = client(&api)
        .post(format!("{}/api/v1/reload", api.api))
        .send()
        .await
        .with_context(|| unreachable(&api))?;
    let ok = resp.status().is_success();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if ok {
        println!("reloading: intake pauses while running deliveries finish, then the new configuration runs");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "reload refused; the running configuration stays:\n{}",
            body["error"]["message"].as_str().unwrap_or("unknown error")
        );
        Ok(ExitCode::from(1))
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

mod reqwest {
    //! A client that adds the API token to every request.
    pub use ::reqwest::*;

    pub struct RequestBuilderFactory {
        pub client: Client,
        pub token: Option<String>,
    }

    impl RequestBuilderFactory {
        fn with_token(&self, b: RequestBuilder) -> RequestBuilder {
            match &self.token {
                Some(t) => b.bearer_auth(t),
                None => b,
            }
        }
        pub fn get(&self, url: String) -> RequestBuilder {
            self.with_token(self.client.get(url))
        }
        pub fn post(&self, url: String) -> RequestBuilder {
            self.with_token(self.client.post(url))
        }
    }
}
