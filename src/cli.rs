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
    /// Print the configuration reference (Markdown, as docs/reference.md).
    Docs,
    /// Print shell completions (bash, zsh, fish, elvish or powershell), as the package
    /// installs them.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), as the package installs it in section 1.
    Man,
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
    /// List the triggers (paused ones with why), or pause or resume one.
    Triggers {
        /// `pause` or `resume`; the list when absent.
        #[arg(value_parser = ["pause", "resume"])]
        verb: Option<String>,
        /// The trigger.
        name: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the paused scopes of vCenters with the changes each holds; pause one (`add
    /// --vcenter V --cluster|--folder|--tag|--resource-pool NAME`), lift one (`lift KEY`: the
    /// changes it held run), or discard what one holds (`discard KEY`: they end dead).
    Pauses {
        /// `add`, `lift` or `discard`; the list when absent.
        #[arg(value_parser = ["add", "lift", "discard"])]
        verb: Option<String>,
        /// The pause's key (`scope:VCENTER:KIND:NAME`, as listed), for `lift` and `discard`.
        key: Option<String>,
        /// The vCenter (for `add`).
        #[arg(long)]
        vcenter: Option<String>,
        /// A cluster's name (for `add`).
        #[arg(long)]
        cluster: Option<String>,
        /// A folder's name (for `add`).
        #[arg(long)]
        folder: Option<String>,
        /// A tag, `CATEGORY/TAG` or `TAG` (for `add`).
        #[arg(long)]
        tag: Option<String>,
        /// A resource pool's name (for `add`).
        #[arg(long)]
        resource_pool: Option<String>,
        /// Why (for `add`).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the approvals (waiting ones by default) with the plan each would run.
    Approvals {
        /// `waiting`, `approved`, `rejected`, `expired` or `all`.
        #[arg(long, default_value = "waiting", value_parser = ["waiting", "approved", "rejected", "expired", "all"])]
        state: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Approve a waiting change: its delivery runs it once its plan still holds.
    Approve {
        /// The approval's number (`reflex approvals`).
        id: i64,
        /// Why (recorded).
        #[arg(long)]
        reason: Option<String>,
        /// Who approves (recorded); default: your user name on this host.
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Reject a waiting change: its delivery ends dead, nothing changed.
    Reject {
        /// The approval's number (`reflex approvals`).
        id: i64,
        /// Why (recorded; required).
        #[arg(long)]
        reason: String,
        /// Who rejects (recorded); default: your user name on this host.
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the nodes sharing the store, their last heartbeat and the singletons each holds.
    Nodes {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Users of the console and the API: `reflex user hash` makes a password hash for
    /// `api.users`.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// List, create or revoke users' API tokens (admin): `create --user NAME [--label
    /// TEXT]` prints the new token once; `revoke ID`.
    Tokens {
        /// `create` or `revoke`; the list when absent.
        #[arg(value_parser = ["create", "revoke"])]
        verb: Option<String>,
        /// The token's number, for `revoke`.
        id: Option<i64>,
        /// The user of api.users the token acts as (for `create`).
        #[arg(long)]
        user: Option<String>,
        /// What the token is for (for `create`).
        #[arg(long, default_value = "")]
        label: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The audit log: who changed what, when and from where, newest first.
    Audit {
        /// How many entries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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

#[derive(Subcommand)]
enum UserCmd {
    /// Print an argon2 hash of a password for `api.users[].password_hash`. The password is
    /// read from standard input (one line), so that it stays out of the shell's history.
    Hash,
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
        Command::Docs => {
            print!("{}", config::reference::markdown());
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "reflex", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
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
        Command::Approvals { state, api } => runtime()?.block_on(approvals(state, api)),
        Command::Approve {
            id,
            reason,
            by,
            api,
        } => runtime()?.block_on(decide(id, true, reason, by, api)),
        Command::Reject {
            id,
            reason,
            by,
            api,
        } => runtime()?.block_on(decide(id, false, Some(reason), by, api)),
        Command::Triggers { verb, name, api } => runtime()?.block_on(triggers(verb, name, api)),
        Command::Pauses {
            verb,
            key,
            vcenter,
            cluster,
            folder,
            tag,
            resource_pool,
            reason,
            api,
        } => {
            let body = json!({"vcenter": vcenter, "cluster": cluster, "folder": folder, "tag": tag,
                              "resource_pool": resource_pool, "reason": reason});
            runtime()?.block_on(pauses(verb, key, body, api))
        }
        Command::Migrate { config, dry_run } => runtime()?.block_on(migrate(config, dry_run)),
        Command::User { cmd: UserCmd::Hash } => user_hash(),
        Command::Tokens {
            verb,
            id,
            user,
            label,
            api,
        } => runtime()?.block_on(tokens(verb, id, user, label, api)),
        Command::Audit { limit, json, api } => runtime()?.block_on(audit(limit, json, api)),
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

async fn approvals(state: String, api: ApiArgs) -> Result<ExitCode> {
    let path = match state.as_str() {
        "all" => "/api/v1/approvals".to_string(),
        st => format!("/api/v1/approvals?state={st}"),
    };
    let v = get(&api, &path).await?;
    let list = v["approvals"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no {} approvals", if state == "all" { "" } else { &state });
        return Ok(ExitCode::SUCCESS);
    }
    for a in list {
        let step = a["step"].as_str().filter(|s| !s.is_empty());
        println!(
            "#{} {} — trigger {}{} — delivery {} — {} {}",
            a["id"],
            s(&a["state"]),
            s(&a["trigger"]),
            step.map(|st| format!(" step {st}")).unwrap_or_default(),
            a["delivery_id"],
            s(&a["event_type"]),
            a["subject"].as_str().unwrap_or(""),
        );
        match a["state"].as_str() {
            Some("waiting") => println!("  expires {}", s(&a["expires_at"])),
            _ => println!(
                "  by {} at {}{}",
                a["decided_by"].as_str().unwrap_or("-"),
                a["decided_at"].as_str().unwrap_or("-"),
                a["reason"]
                    .as_str()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
        }
        println!("  plan: {}", s(&a["plan"]));
    }
    Ok(ExitCode::SUCCESS)
}

async fn decide(
    id: i64,
    approve: bool,
    reason: Option<String>,
    by: Option<String>,
    api: ApiArgs,
) -> Result<ExitCode> {
    let by = by.unwrap_or_else(|| {
        let user = std::env::var("USER").unwrap_or_else(|_| "someone".into());
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{user}@{} (CLI)", host.trim())
    });
    let verb = if approve { "approve" } else { "reject" };
    let resp = client(&api)
        .post(format!("{}/api/v1/approvals/{id}/{verb}", api.api))
        .json(&serde_json::json!({"by": by, "reason": reason}))
        .send()
        .await
        .with_context(|| unreachable(&api))?;
    answered(resp, &format!("{verb} refused: "), |body| {
        println!("approval #{id}: {}", s(&body["state"]));
        println!("  plan: {}", s(&body["plan"]));
    })
    .await
}

fn user_hash() -> Result<ExitCode> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        eprint!("password (not echoed to a file; end with Enter): ");
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.chars().count() < 8 {
        eprintln!("refused: the password is shorter than 8 characters");
        return Ok(ExitCode::from(2));
    }
    let hash = reflex::api::auth::hash_password(password).map_err(anyhow::Error::msg)?;
    println!("{hash}");
    Ok(ExitCode::SUCCESS)
}

async fn tokens(
    verb: Option<String>,
    id: Option<i64>,
    user: Option<String>,
    label: String,
    api: ApiArgs,
) -> Result<ExitCode> {
    match verb.as_deref() {
        None => {
            let v = get(&api, "/api/v1/tokens").await?;
            println!(
                "{:<6} {:<20} {:<26} {:<26} LABEL",
                "ID", "USER", "CREATED", "REVOKED"
            );
            for t in v["tokens"].as_array().into_iter().flatten() {
                println!(
                    "{:<6} {:<20} {:<26} {:<26} {}",
                    t["id"],
                    s(&t["user"]),
                    s(&t["created_at"]),
                    t["revoked_at"].as_str().unwrap_or("-"),
                    s(&t["label"])
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Some("create") => {
            let Some(user) = user else {
                bail!("`reflex tokens create` needs --user NAME (a user of api.users)");
            };
            let resp = client(&api)
                .post(format!("{}/api/v1/tokens", api.api))
                .json(&json!({"user": user, "label": label}))
                .send()
                .await
                .with_context(|| unreachable(&api))?;
            answered(resp, "token not created: ", |b| {
                eprintln!(
                    "token #{} for {} ({}); it is shown this once:",
                    b["id"],
                    s(&b["user"]),
                    s(&b["role"])
                );
                println!("{}", s(&b["token"]));
            })
            .await
        }
        _ => {
            let Some(id) = id else {
                bail!("`reflex tokens revoke` needs the token's number (`reflex tokens`)");
            };
            let resp = client(&api)
                .post(format!("{}/api/v1/tokens/{id}/revoke", api.api))
                .send()
                .await
                .with_context(|| unreachable(&api))?;
            answered(resp, "not revoked: ", |_| println!("token #{id} revoked")).await
        }
    }
}

async fn audit(limit: u32, json: bool, api: ApiArgs) -> Result<ExitCode> {
    let v = get(&api, &format!("/api/v1/audit?limit={limit}")).await?;
    let entries = v["entries"].as_array().cloned().unwrap_or_default();
    if json {
        for e in &entries {
            println!("{e}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<26} {:<16} {:<9} {:<18} {:<40} {:<16} RESULT",
        "WHEN", "WHO", "ROLE", "ACTION", "TARGET", "FROM"
    );
    for e in entries {
        println!(
            "{:<26} {:<16} {:<9} {:<18} {:<40} {:<16} {}",
            s(&e["at"]),
            s(&e["actor"]),
            s(&e["role"]),
            s(&e["action"]),
            s(&e["target"]),
            s(&e["remote"]),
            s(&e["detail"])
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints what a state-changing API request answered: `done` with the body on success,
/// else `refused` and the API's reason (exit code 1).
async fn answered(
    resp: reqwest::Response,
    refused: &str,
    done: impl FnOnce(&Value),
) -> Result<ExitCode> {
    let ok = resp.status().is_success();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if ok {
        done(&body);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{refused}{}",
            body["error"]["message"].as_str().unwrap_or("unknown error")
        );
        Ok(ExitCode::from(1))
    }
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

async fn pauses(
    verb: Option<String>,
    key: Option<String>,
    body: Value,
    api: ApiArgs,
) -> Result<ExitCode> {
    let Some(verb) = verb else {
        let v = get(&api, "/api/v1/pauses").await?;
        println!("{:<48} {:<22} HELD  REASON", "KEY", "SINCE");
        for p in v["pauses"].as_array().into_iter().flatten() {
            println!(
                "{:<48} {:<22} {:<5} {}",
                s(&p["key"]),
                s(&p["since"]),
                p["held"].as_array().map_or(0, Vec::len),
                s(&p["reason"])
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    let req = if verb == "add" {
        let body: serde_json::Map<String, Value> = body
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        client(&api)
            .post(format!("{}/api/v1/pauses", api.api))
            .json(&body)
    } else {
        let Some(key) = key else {
            bail!("give the pause's key: reflex pauses {verb} KEY (`reflex pauses` lists them)");
        };
        client(&api).post(format!(
            "{}/api/v1/pauses/{}/{verb}",
            api.api,
            urlencode(&key)
        ))
    };
    let resp = req.send().await.with_context(|| unreachable(&api))?;
    answered(resp, &format!("{verb} refused: "), |body| {
        println!("{body}")
    })
    .await
}

async fn triggers(verb: Option<String>, name: Option<String>, api: ApiArgs) -> Result<ExitCode> {
    let Some(verb) = verb else {
        let v = get(&api, "/api/v1/triggers").await?;
        println!("{:<32} {:<22} {:<8} PAUSED", "TRIGGER", "ACTION", "DRY RUN");
        for t in v["triggers"].as_array().into_iter().flatten() {
            println!(
                "{:<32} {:<22} {:<8} {}",
                s(&t["name"]),
                s(&t["action"]),
                if t["dry_run"] == true { "yes" } else { "" },
                t["paused"]["reason"].as_str().unwrap_or("")
            );
        }
        if let Some(why) = v["all_paused"]["reason"].as_str() {
            println!("\nevery trigger that may change something is paused (`*`): {why}");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let Some(name) = name else {
        bail!("give the trigger's name: reflex triggers {verb} NAME");
    };
    let resp = client(&api)
        .post(format!(
            "{}/api/v1/triggers/{}/{verb}",
            api.api,
            urlencode(&name)
        ))
        .send()
        .await
        .with_context(|| unreachable(&api))?;
    answered(resp, &format!("{verb} refused: "), |_| {
        println!("trigger {name}: {verb}d")
    })
    .await
}

async fn reload(api: ApiArgs) -> Result<ExitCode> {
    let resp = client(&api)
        .post(format!("{}/api/v1/reload", api.api))
        .send()
        .await
        .with_context(|| unreachable(&api))?;
    answered(resp, "reload refused; the running configuration stays:\n", |_| {
        println!("reloading: intake pauses while running deliveries finish, then the new configuration runs")
    })
    .await
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
