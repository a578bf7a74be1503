//! The configuration file: typed structs read from YAML with positions kept, then validated
//! as a whole so that `reflex check` reports every error at once with file:line:column.

mod duration;
pub mod reference;
pub mod secret;

pub use duration::{ByteSize, Duration, Rate};
pub use secret::Secret;

use crate::actions::ActionConfig;
use crate::sources::SourceConfig;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A string with the position where it was written, for precise error messages.
pub type Text = Spanned<String>;

/// The whole `reflex.yaml`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The listener for sources (webhooks, CloudEvents).
    #[serde(default)]
    pub http: HttpConfig,
    /// The management API, metrics and health endpoints.
    #[serde(default)]
    pub api: ApiConfig,
    /// The durable store (events, deliveries, attempts): embedded SQLite or PostgreSQL.
    #[serde(default)]
    pub store: StoreConfig,
    /// How deliveries are run, across triggers.
    #[serde(default)]
    pub deliveries: DeliveriesConfig,
    /// How deliveries travel to the nodes that run them: `embedded` (the store's tables,
    /// the default) or `amqp` (RabbitMQ).
    #[serde(default)]
    pub bus: crate::bus::BusConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Named secrets usable in action templates as `secrets.NAME`.
    #[serde(default)]
    pub secrets: BTreeMap<String, Secret>,
    /// vCenters by name, used by `vcenter` sources and `vsphere.*` actions.
    #[serde(default)]
    pub vcenters: BTreeMap<String, crate::vcenters::VcenterConfig>,
    /// Where events come from (each with the position where it was written).
    #[serde(default)]
    #[schemars(with = "Vec<SourceConfig>")]
    pub sources: Vec<Spanned<SourceConfig>>,
    /// Which events go to which action, and how they are delivered.
    #[serde(default)]
    pub triggers: Vec<TriggerConfig>,
}

/// The listener that sources share.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Default largest accepted request body; a source may lower or raise it.
    pub max_body: ByteSize,
    /// Events waiting to be made durable before new requests get `503`.
    pub queue: usize,
    /// How long requests in progress get to finish when reflex stops or reloads; events of
    /// those still open after it are refused with `503` (the sender retries).
    pub drain: Duration,
    /// Time allowed for a request's headers, and for the next request on an idle
    /// kept-alive connection; a client that stalls is disconnected.
    pub header_timeout: Duration,
    /// Time allowed for a request's body once its headers are in (`408` after it).
    pub body_timeout: Duration,
    /// Connections open at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Serve HTTPS instead of HTTP (the handshake is bounded by `header_timeout`).
    pub tls: Option<TlsConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".parse().expect("static address"),
            max_body: ByteSize(1024 * 1024),
            queue: 20_000,
            drain: Duration(std::time::Duration::from_secs(10)),
            header_timeout: Duration(std::time::Duration::from_secs(15)),
            body_timeout: Duration(std::time::Duration::from_secs(30)),
            max_connections: 4096,
            tls: None,
        }
    }
}

/// How deliveries are run, across triggers.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveriesConfig {
    /// How long running attempts get to finish when reflex stops or reloads; those still
    /// running after it are recorded as interrupted and run again at the next start.
    pub drain: Duration,
    /// Every trigger in dry run: actions read what they need and record what they would
    /// do; nothing is changed anywhere.
    pub dry_run: bool,
    /// At most `max` changes within `within` by all triggers together (every trigger whose
    /// action may change something: all but notifications, `emit` and reads). Past it,
    /// those triggers pause together as `*` until `reflex triggers resume '*'`.
    pub blast_radius: Option<BlastRadiusConfig>,
}

impl Default for DeliveriesConfig {
    fn default() -> Self {
        DeliveriesConfig {
            drain: Duration(std::time::Duration::from_secs(20)),
            dry_run: false,
            blast_radius: None,
        }
    }
}

/// A TLS listener's certificate and key, read at start and at every reload (SIGHUP): a
/// renewed certificate is taken by `reflex reload` or `kill -HUP`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, PEM, the server's first.
    pub cert_file: String,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

/// The management API listener.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to listen on; loopback by default.
    pub listen: SocketAddr,
    /// Bearer token required by `/api/*`; mandatory when `listen` is not a loopback address.
    pub token: Option<Secret>,
    /// Require the token for `/metrics` too (Prometheus sends it with `authorization`).
    pub metrics_token: bool,
    /// People who sign in to the console (`/ui`) or use API tokens of their own (`reflex
    /// tokens create`). With any user (or `token`) set, every API request must be
    /// authenticated; `token` stays an admin token for scripts.
    pub users: Vec<UserConfig>,
    /// How long a console session lasts after signing in.
    pub session_ttl: Duration,
    /// Serve the API and the console over HTTPS (session cookies are then `Secure`).
    pub tls: Option<TlsConfig>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:9090".parse().expect("static address"),
            token: None,
            metrics_token: false,
            users: Vec::new(),
            session_ttl: Duration(std::time::Duration::from_secs(8 * 3600)),
            tls: None,
        }
    }
}

/// A person who uses the console or the API.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The name they sign in with (recorded in the audit log).
    pub name: String,
    /// What they may do: `viewer` reads; `operator` also replays, approves, pauses and
    /// resumes; `admin` also reloads and manages tokens.
    pub role: Role,
    /// Their password's argon2 hash in PHC form (`reflex user hash` makes one); without
    /// it the user has API tokens only and cannot sign in to the console.
    pub password_hash: Option<String>,
}

/// A user's role; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything the API and the console show.
    Viewer,
    /// Replays, approves and rejects, pauses and resumes.
    Operator,
    /// Reloads the configuration, manages API tokens.
    Admin,
}

impl Role {
    /// Its name, as in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// The store: embedded SQLite by default, or a PostgreSQL server shared by several nodes.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The SQLite database file (created with its directory); unused when `url` is set.
    pub path: PathBuf,
    /// A PostgreSQL server instead of the embedded file, e.g.
    /// `postgres://reflex:${env:PGPASSWORD}@db.example.com/reflex?sslmode=require`. Every
    /// node with the same URL shares events, deliveries, history and checkpoints.
    pub url: Option<Secret>,
    /// Most connections to PostgreSQL this node opens.
    pub pool_size: usize,
    /// How long a node keeps a delivery it runs, or a source that must run once, without
    /// renewing its lease; after it, another node takes over (PostgreSQL only).
    pub lease: Duration,
    /// This node's name among several sharing PostgreSQL (default: host name and API port).
    pub node: Option<String>,
    /// A repeated (source, id) within this window is accepted but not delivered again.
    pub dedup_window: Duration,
    /// Most dedup keys remembered (each costs 20–40 bytes of memory); beyond it the oldest
    /// are forgotten early, with a warning.
    pub dedup_max_keys: usize,
    /// Most open deliveries held in memory; the rest wait in the store and are read back
    /// in order as room frees up.
    pub deliveries_in_memory: usize,
    /// How long and how many events to keep in history.
    pub retention: RetentionConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("reflex-data/reflex.db"),
            url: None,
            pool_size: 16,
            lease: Duration(std::time::Duration::from_secs(15)),
            node: None,
            dedup_window: Duration(std::time::Duration::from_secs(3600)),
            dedup_max_keys: crate::store::DedupLimits::DEFAULT_MAX_KEYS,
            deliveries_in_memory: 10_000,
            retention: RetentionConfig::default(),
        }
    }
}

/// History retention; finished events older than `max_age` or beyond `max_events` are removed.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Oldest finished event kept.
    pub max_age: Option<Duration>,
    /// Most events kept.
    pub max_events: Option<u64>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_age: Some(Duration(std::time::Duration::from_secs(7 * 86400))),
            max_events: Some(1_000_000),
        }
    }
}

/// Logging options.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `reflex=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A trigger: which events (filters, expression) go to which action, with its delivery policy.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    /// Unique name, used in metrics, the API and the CLI.
    #[schemars(with = "String")]
    pub name: Text,
    /// Attribute filters (Knative vocabulary); all must match.
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// Optional CEL expression over `event` that must be true, e.g. `event.data.severity == "critical"`.
    #[schemars(with = "Option<String>")]
    pub when: Option<Text>,
    /// What to do with a matching event.
    pub action: ActionConfig,
    /// Retries, timeout, concurrency, ordering and throttling.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Dry run (a shadow of a live trigger): its action reads the current state and records
    /// exactly what it would change; nothing is changed anywhere.
    #[serde(default)]
    pub dry_run: bool,
    /// At most `max` changes (succeeded attempts) `within` a window, across all nodes; the
    /// trigger pauses when it would make more (its deliveries wait; `reflex triggers resume`).
    pub blast_radius: Option<BlastRadiusConfig>,
    /// Fire on vCenter events caused by reflex's own changes too (the loop guard skips them
    /// by default: they carry `reflexcaused`).
    #[serde(default)]
    pub own_effects: bool,
    /// Fire once `count` matching events with the same key arrived within a window, with
    /// all of them given to the action (`events` in its templates).
    pub correlate: Option<CorrelateConfig>,
    /// The action waits for a person to approve it (`reflex approvals`, `reflex approve
    /// ID`), shown its plan (its dry run); rejected or not decided in time, nothing changes.
    pub approval: Option<ApprovalConfig>,
}

/// `approval:` of a trigger or a workflow step: `required` (someone decides within an
/// hour), or `{timeout: 30m}`. Without a decision by then, the change is rejected.
#[derive(Debug, Deserialize, JsonSchema, Clone, Copy)]
#[serde(try_from = "ApprovalWritten")]
#[schemars(with = "ApprovalWritten")]
pub struct ApprovalConfig {
    /// How long the change waits for a decision.
    pub timeout: std::time::Duration,
}

/// How `approval:` is written.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ApprovalWritten {
    /// `required`: decided within an hour.
    Word(String),
    /// With its own timeout.
    Within {
        /// How long the change waits for a decision, e.g. `30m`.
        timeout: Duration,
    },
}

/// How long a change waits for an approval unless its `approval:` says otherwise.
pub const DEFAULT_APPROVAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

impl TryFrom<ApprovalWritten> for ApprovalConfig {
    type Error = String;
    fn try_from(w: ApprovalWritten) -> Result<Self, String> {
        match w {
            ApprovalWritten::Word(w) if w == "required" => Ok(ApprovalConfig {
                timeout: DEFAULT_APPROVAL_TIMEOUT,
            }),
            ApprovalWritten::Word(w) => Err(format!(
                "approval: `{w}` is not a setting; write `approval: required` or `approval: {{timeout: 30m}}`"
            )),
            ApprovalWritten::Within { timeout } if timeout.0.is_zero() => {
                Err("approval: timeout must be longer than 0s".into())
            }
            ApprovalWritten::Within { timeout } => Ok(ApprovalConfig { timeout: timeout.0 }),
        }
    }
}

/// `blast_radius:` of a trigger.
#[derive(Debug, Deserialize, JsonSchema, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct BlastRadiusConfig {
    /// Most changes within the window.
    pub max: u32,
    /// The window, e.g. `1h`.
    pub within: Duration,
}

/// A Knative-style attribute filter.
#[derive(Debug, Deserialize, JsonSchema, Clone)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Filter {
    /// Every attribute equals its value.
    Exact(BTreeMap<String, String>),
    /// Every attribute starts with its value.
    Prefix(BTreeMap<String, String>),
    /// Every attribute ends with its value.
    Suffix(BTreeMap<String, String>),
    /// All nested filters match.
    All(Vec<Filter>),
    /// At least one nested filter matches.
    Any(Vec<Filter>),
    /// The nested filter does not match.
    Not(Box<Filter>),
}

impl std::fmt::Display for Filter {
    /// As an operator reads it: `type = disk.full`, `type starts with vro.`, `not (…)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pairs = |f: &mut std::fmt::Formatter<'_>, m: &BTreeMap<String, String>, op: &str| {
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {op} {v}")).collect();
            write!(f, "{}", parts.join(" and "))
        };
        let list = |f: &mut std::fmt::Formatter<'_>, l: &[Filter], join: &str| {
            let parts: Vec<String> = l.iter().map(|x| format!("({x})")).collect();
            write!(f, "{}", parts.join(join))
        };
        match self {
            Filter::Exact(m) => pairs(f, m, "="),
            Filter::Prefix(m) => pairs(f, m, "starts with"),
            Filter::Suffix(m) => pairs(f, m, "ends with"),
            Filter::All(l) => list(f, l, " and "),
            Filter::Any(l) => list(f, l, " or "),
            Filter::Not(x) => write!(f, "not ({x})"),
        }
    }
}

/// How deliveries of a trigger are attempted.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Attempts before the delivery is dead (dead-lettered).
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each time, with jitter.
    pub backoff: Duration,
    /// Longest delay between attempts.
    pub max_backoff: Duration,
    /// Delays before the second, third… attempt instead of doubling `backoff` (e.g.
    /// `[10s, 1m, 5m]`); the last one repeats. Each is capped by `max_backoff`.
    #[schemars(with = "Vec<String>")]
    pub delays: Vec<Duration>,
    /// Share of each delay taken off at random, from 0 (none) to 1; the default 0.5 spreads
    /// the retries of a burst over [delay/2, delay].
    pub jitter: f64,
    /// Longest `Retry-After` (from a 429 or 503 answer) honoured; a longer one is cut to this.
    pub max_retry_after: Duration,
    /// Least delay after a 429 Too Many Requests, with or without `Retry-After`.
    pub min_backoff_after_429: Duration,
    /// Time allowed for one attempt: 30s, and 11m for vSphere actions (a vCenter task may
    /// take up to 10m; an attempt cut short leaves its task running and the retry would
    /// start the operation again).
    pub timeout: Option<Duration>,
    /// Attempts of this trigger running at once.
    pub concurrency: usize,
    /// Most attempts started per period, evenly spaced (e.g. `10/s`, `100/min`), to spare
    /// the API an action calls; retries count. Nodes sharing a PostgreSQL store share it:
    /// each of N live nodes starts at most the rate / N.
    pub rate: Option<Rate>,
    /// Template of a key; deliveries with the same key run one at a time, in order.
    #[schemars(with = "Option<String>")]
    pub ordering_key: Option<Text>,
    /// Deliver at most once within a window per templated key.
    pub throttle: Option<ThrottleConfig>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            max_attempts: 5,
            backoff: Duration(std::time::Duration::from_secs(1)),
            max_backoff: Duration(std::time::Duration::from_secs(300)),
            delays: Vec::new(),
            jitter: 0.5,
            max_retry_after: Duration(std::time::Duration::from_secs(3600)),
            min_backoff_after_429: Duration(std::time::Duration::from_secs(5)),
            timeout: None,
            concurrency: 16,
            rate: None,
            ordering_key: None,
            throttle: None,
        }
    }
}

/// `correlate:` of a trigger: it fires once `count` matching events with the same `key`
/// arrived `within` a window; the events before are recorded as held (`throttled`, with
/// why), and the one that completes the count runs the action with all of them. The
/// window is kept in the store, so it survives a restart and is shared by nodes.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CorrelateConfig {
    /// Template of the key, e.g. `{{ event.subject }}`.
    #[schemars(with = "String")]
    pub key: Text,
    /// Events needed (at least 2).
    pub count: u32,
    /// The window, e.g. `10m`.
    pub within: Duration,
}

/// `once_within` a window per key: later matches are recorded as `throttled`, not run.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Template of the key, e.g. `{{ event.subject }}`.
    #[schemars(with = "String")]
    pub key: Text,
    /// The window.
    pub once_within: Duration,
}

/// One problem found in the configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Every problem found in a configuration file.
#[derive(Debug)]
pub struct ConfigError {
    /// The file that was read.
    pub file: String,
    /// All problems, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if d.line > 0 {
                write!(f, "{}:{}:{}: {}", self.file, d.line, d.column, d.message)?;
            } else {
                write!(f, "{}: {}", self.file, d.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Collects diagnostics during validation.
#[derive(Default, Debug)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Records a problem at a position.
    pub fn at(&mut self, loc: &Location, message: impl Into<String>) {
        self.0.push(Diagnostic {
            line: loc.line(),
            column: loc.column(),
            message: message.into(),
        });
    }
}

/// Parses YAML text into a [`Config`] (no semantic checks yet).
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    serde_saphyr::from_str::<Config>(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let message = strip_location(&e.to_string());
        ConfigError {
            file: file.to_string(),
            diagnostics: vec![Diagnostic {
                line,
                column,
                message,
            }],
        }
    })
}

/// serde-saphyr appends its own position and a source snippet; we print ours as a prefix.
fn strip_location(msg: &str) -> String {
    let first = msg.lines().next().unwrap_or(msg).trim();
    let first = match first.find(" at line ") {
        Some(i) => &first[..i],
        None => first,
    };
    let first = first.trim_start_matches("error: ");
    // Drop a leading "line N column M: " (we print the position ourselves).
    match first.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((pos, rest)) if pos.contains(" column ") => rest.to_string(),
        _ => first.to_string(),
    }
}

/// Reads a file and parses it.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        diagnostics: vec![Diagnostic {
            line: 0,
            column: 0,
            message: format!("cannot read the configuration: {e}"),
        }],
    })?;
    parse(&file, &text)
}

impl Config {
    /// Checks what serde cannot: names, listeners and the API token rule.
    pub fn check_common(&self, diags: &mut Diagnostics) {
        let api_loopback = self.api.listen.ip().is_loopback();
        if !api_loopback && self.api.token.is_none() && self.api.users.is_empty() {
            diags.0.push(Diagnostic {
                line: 0,
                column: 0,
                message: format!(
                    "api.listen is {} (not loopback) but neither api.token nor api.users is set; set api.token (e.g. `${{env:REFLEX_API_TOKEN}}`), add api.users, or listen on 127.0.0.1",
                    self.api.listen
                ),
            });
        }
        for (name, tls) in [("http.tls", &self.http.tls), ("api.tls", &self.api.tls)] {
            if let Some(t) = tls {
                if let Err(e) = crate::listener::tls_acceptor(t) {
                    diags.0.push(Diagnostic {
                        line: 0,
                        column: 0,
                        message: format!("{name}: {e}"),
                    });
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for u in &self.api.users {
            let mut problem = |message: String| {
                diags.0.push(Diagnostic {
                    line: 0,
                    column: 0,
                    message,
                })
            };
            if u.name.is_empty()
                || u.name.len() > 64
                || !u
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c))
            {
                problem(format!(
                    "api.users: `{}` is not a valid user name (1 to 64 letters, digits, `.`, `_`, `@` or `-`)",
                    u.name
                ));
            }
            if !names.insert(u.name.as_str()) {
                problem(format!("api.users: `{}` is listed twice", u.name));
            }
            if let Some(h) = &u.password_hash {
                if let Err(e) = argon2::PasswordHash::new(h) {
                    problem(format!(
                        "api.users: the password_hash of `{}` is not an argon2 hash in PHC form ({e}); make one with `reflex user hash`",
                        u.name
                    ));
                }
            }
        }
        if self.api.listen == self.http.listen && self.api.listen.port() != 0 {
            diags.0.push(Diagnostic {
                line: 0,
                column: 0,
                message: format!(
                    "api.listen and http.listen are both {}; give the management API its own port",
                    self.api.listen
                ),
            });
        }
        if let crate::bus::BusConfig::Amqp(b) = &self.bus {
            let mut problem = |message: String| {
                diags.0.push(Diagnostic {
                    line: 0,
                    column: 0,
                    message,
                })
            };
            if self.store.url.is_none() {
                problem("bus: amqp needs the shared PostgreSQL store (store.url): the broker hands a delivery to any node, and the store's claim makes sure it runs once".into());
            }
            if let Err(e) = crate::amqp::Broker::new(b.url.clone(), b.ca_file.as_deref(), "bus") {
                problem(e);
            }
            for (what, v) in [("exchange", &b.exchange), ("prefix", &b.prefix)] {
                if v.is_empty() || v.len() > 200 {
                    problem(format!("bus.{what} must be a name of 1 to 200 bytes"));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.triggers {
            if t.name.value.is_empty() {
                diags.at(&t.name.referenced, "trigger name is empty");
            } else if !names.insert(t.name.value.as_str()) {
                diags.at(
                    &t.name.referenced,
                    format!(
                        "duplicate trigger name `{}`; names must be unique",
                        t.name.value
                    ),
                );
            }
            if t.delivery.max_attempts == 0 {
                diags.at(
                    &t.name.referenced,
                    format!(
                        "trigger `{}`: delivery.max_attempts must be at least 1",
                        t.name.value
                    ),
                );
            }
            if !(0.0..=1.0).contains(&t.delivery.jitter) {
                diags.at(
                    &t.name.referenced,
                    format!(
                        "trigger `{}`: delivery.jitter is {}; it must be between 0 and 1",
                        t.name.value, t.delivery.jitter
                    ),
                );
            }
            if t.delivery.concurrency == 0 {
                diags.at(
                    &t.name.referenced,
                    format!(
                        "trigger `{}`: delivery.concurrency must be at least 1",
                        t.name.value
                    ),
                );
            }
        }
    }
}

/// The JSON Schema of the configuration file, for editors.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Config)).expect("schema serializes")
}
