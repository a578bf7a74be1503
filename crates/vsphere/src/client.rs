//! The SOAP client: envelopes, faults, session cookie, re-login, property reads and tasks.

use crate::xml::Node;
use crate::Error;
use quick_xml::writer::Writer;
use std::time::Duration;
use tokio::sync::{Mutex, RwLock};

const SOAP_ENV: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const COOKIE: &str = "vmware_soap_session";

/// A managed object reference: kind (`VirtualMachine`) and id (`vm-57`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MoRef {
    /// The managed object type.
    pub kind: String,
    /// Its id.
    pub value: String,
}

impl MoRef {
    /// A reference.
    pub fn new(kind: &str, value: &str) -> MoRef {
        MoRef {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// Reads a reference from an element with a `type` attribute.
    pub fn from_node(n: &Node) -> Option<MoRef> {
        Some(MoRef {
            kind: n.type_attr.clone()?,
            value: n.text.clone(),
        })
    }

    /// As an element named `name`.
    pub fn node(&self, name: &str) -> Node {
        Node::moref(name, &self.kind, &self.value)
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// The service's entry points, read once at connect.
#[derive(Debug, Clone)]
pub struct ServiceContent {
    /// Root folder.
    pub root_folder: MoRef,
    /// The property collector.
    pub property_collector: MoRef,
    /// View manager (container views).
    pub view_manager: MoRef,
    /// Search index.
    pub search_index: MoRef,
    /// Session manager.
    pub session_manager: MoRef,
    /// Event manager.
    pub event_manager: MoRef,
    /// `about.apiVersion`.
    pub api_version: String,
    /// `about.instanceUuid`.
    pub instance_uuid: String,
}

/// How to reach and trust a vCenter.
#[derive(Clone)]
pub struct ConnectOptions {
    /// The SDK URL, e.g. `https://vcenter.example.com/sdk`.
    pub url: String,
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Accept any certificate (labs only; logged as a warning).
    pub insecure: bool,
    /// Extra trusted CA certificates, PEM.
    pub ca_pem: Option<Vec<u8>>,
    /// Trust exactly the certificate with this SHA-1 or SHA-256 thumbprint (`AA:BB:…`).
    pub thumbprint: Option<String>,
    /// Time allowed for one call.
    pub timeout: Duration,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// A logged-in vCenter client; share it (`Arc`) between tasks.
pub struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) opts: ConnectOptions,
    pub(crate) rest_session: Mutex<Option<String>>,
    session: RwLock<Option<String>>,
    login_lock: Mutex<u64>,
    /// Entry points.
    pub content: ServiceContent,
}

/// Most bytes read from one vCenter answer (SOAP or REST). A history page of 1000 events is
/// about 2 MB; an answer past this is refused instead of being held in memory.
pub const MAX_RESPONSE: usize = 64 << 20;

/// Reads an answer's body up to `limit` bytes (refused early when its length says more).
pub(crate) async fn read_bounded(
    mut resp: reqwest::Response,
    limit: usize,
    method: &str,
    url: &str,
) -> Result<String, Error> {
    let too_large = || {
        Error::Protocol {
        method: method.into(),
        message: format!(
            "the answer is larger than {} MiB; reflex does not read it (narrow the request, e.g. a smaller page)",
            limit >> 20
        ),
    }
    };
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| conn_err(method, url, &e))? {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| Error::Protocol {
        method: method.into(),
        message: "the answer is not UTF-8".into(),
    })
}

fn conn_err(what: &str, url: &str, e: &reqwest::Error) -> Error {
    let mut s = format!("{what} {url}: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    Error::Connection(s)
}

impl Client {
    /// Connects, reads the service content and logs in.
    pub async fn connect(opts: ConnectOptions) -> Result<Client, Error> {
        let mut b = reqwest::Client::builder()
            .timeout(opts.timeout)
            .user_agent(concat!("reflex-vsphere/", env!("CARGO_PKG_VERSION")));
        if opts.insecure {
            tracing::warn!(url = %opts.url, "TLS certificate verification is disabled for this vCenter (insecure: true)");
            b = b.danger_accept_invalid_certs(true);
        }
        if let Some(t) = &opts.thumbprint {
            let pin = crate::pin::parse_thumbprint(t).map_err(Error::Invalid)?;
            b = b
                .tls_backend_preconfigured(crate::pin::pinned_config(pin).map_err(Error::Invalid)?);
        }
        if let Some(pem) = &opts.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Invalid(format!("invalid CA bundle: {e}")))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        let http = b
            .build()
            .map_err(|e| Error::Invalid(format!("HTTP client: {e}")))?;
        let sc = Self::raw_call(
            &http,
            &opts.url,
            None,
            "RetrieveServiceContent",
            &MoRef::new("ServiceInstance", "ServiceInstance"),
            vec![],
        )
        .await?
        .0;
        let rv = sc
            .child("returnval")
            .ok_or_else(|| proto("RetrieveServiceContent", "no returnval"))?;
        let mo = |name: &str| {
            rv.child(name)
                .and_then(MoRef::from_node)
                .ok_or_else(|| proto("RetrieveServiceContent", &format!("no {name}")))
        };
        let content = ServiceContent {
            root_folder: mo("rootFolder")?,
            property_collector: mo("propertyCollector")?,
            view_manager: mo("viewManager")?,
            search_index: mo("searchIndex")?,
            session_manager: mo("sessionManager")?,
            event_manager: mo("eventManager")?,
            api_version: rv
                .path(&["about", "apiVersion"])
                .map(|n| n.text.clone())
                .unwrap_or_default(),
            instance_uuid: rv
                .path(&["about", "instanceUuid"])
                .map(|n| n.text.clone())
                .unwrap_or_default(),
        };
        let client = Client {
            http,
            opts,
            session: RwLock::new(None),
            rest_session: Mutex::new(None),
            login_lock: Mutex::new(0),
            content,
        };
        client.login().await?;
        Ok(client)
    }

    /// The SDK URL.
    pub fn url(&self) -> &str {
        &self.opts.url
    }

    async fn login(&self) -> Result<(), Error> {
        let args = vec![
            Node::text("userName", &self.opts.username),
            Node::text("password", &self.opts.password),
        ];
        let (_, cookie) = Self::raw_call(
            &self.http,
            &self.opts.url,
            None,
            "Login",
            &self.content.session_manager,
            args,
        )
        .await?;
        let cookie = cookie.ok_or_else(|| proto("Login", "no session cookie in the answer"))?;
        *self.session.write().await = Some(cookie);
        Ok(())
    }

    /// Logs out (best effort).
    pub async fn logout(&self) {
        let _ = self
            .call("Logout", &self.content.session_manager, vec![])
            .await;
    }

    /// Calls a method on `this` with argument elements; returns the `…Response` element.
    /// An expired session is re-established once (one login shared by concurrent callers).
    pub async fn call(&self, method: &str, this: &MoRef, args: Vec<Node>) -> Result<Node, Error> {
        let cookie = self.session.read().await.clone();
        match Self::raw_call(
            &self.http,
            &self.opts.url,
            cookie.as_deref(),
            method,
            this,
            args.clone(),
        )
        .await
        {
            Err(Error::Fault { name, .. }) if name == "NotAuthenticated" => {
                self.relogin(cookie).await?;
                let cookie = self.session.read().await.clone();
                Ok(Self::raw_call(
                    &self.http,
                    &self.opts.url,
                    cookie.as_deref(),
                    method,
                    this,
                    args,
                )
                .await?
                .0)
            }
            r => r.map(|(n, _)| n),
        }
    }

    /// Logs in again unless another caller already did since `stale` was current.
    async fn relogin(&self, stale: Option<String>) -> Result<(), Error> {
        let mut logins = self.login_lock.lock().await;
        if *self.session.read().await != stale {
            return Ok(());
        }
        tracing::info!(url = %self.opts.url, "vCenter session expired; logging in again");
        self.login().await?;
        *logins += 1;
        Ok(())
    }

    /// How many times the session was re-established.
    pub async fn relogins(&self) -> u64 {
        *self.login_lock.lock().await
    }

    /// Forgets the session cookie (tests: simulate an expired session).
    pub async fn drop_session_for_test(&self) {
        *self.session.write().await = Some("expired".into());
    }

    async fn raw_call(
        http: &reqwest::Client,
        url: &str,
        cookie: Option<&str>,
        method: &str,
        this: &MoRef,
        args: Vec<Node>,
    ) -> Result<(Node, Option<String>), Error> {
        let body = envelope(method, this, &args);
        let mut req = http
            .post(url)
            .header("content-type", "text/xml; charset=utf-8")
            .header("soapaction", "\"urn:vim25/6.5\"")
            .body(body);
        if let Some(c) = cookie {
            req = req.header("cookie", format!("{COOKIE}={c}"));
        }
        let resp = req.send().await.map_err(|e| conn_err(method, url, &e))?;
        let status = resp.status();
        let new_cookie = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                v.strip_prefix(&format!("{COOKIE}="))
                    .map(|r| r.split(';').next().unwrap_or("").to_string())
            });
        let text = read_bounded(resp, MAX_RESPONSE, method, url).await?;
        let env = Node::parse(&text).map_err(|e| Error::Protocol {
            method: method.into(),
            message: format!("HTTP {status}: {e}"),
        })?;
        let body = env
            .child("Body")
            .ok_or_else(|| proto(method, "no SOAP Body"))?;
        if let Some(f) = body.child("Fault") {
            return Err(fault(method, f));
        }
        let resp = body
            .children
            .first()
            .cloned()
            .ok_or_else(|| proto(method, &format!("empty SOAP Body (HTTP {status})")))?;
        Ok((resp, new_cookie))
    }

    /// Reads properties of one object. A property vCenter could not read is absent, except
    /// `NotAuthenticated` in `missingSet` (an expired session, answered with HTTP 200),
    /// which re-establishes the session once.
    pub async fn properties(
        &self,
        obj: &MoRef,
        paths: &[&str],
    ) -> Result<Vec<(String, Node)>, Error> {
        match self.properties_once(obj, paths).await {
            Err(Error::Fault { name, .. }) if name == "NotAuthenticated" => {
                let stale = self.session.read().await.clone();
                self.relogin(stale).await?;
                self.properties_once(obj, paths).await
            }
            r => r,
        }
    }

    async fn properties_once(
        &self,
        obj: &MoRef,
        paths: &[&str],
    ) -> Result<Vec<(String, Node)>, Error> {
        let mut prop = Node::new("propSet")
            .with(Node::text("type", &obj.kind))
            .with(Node::text("all", "false"));
        for p in paths {
            prop = prop.with(Node::text("pathSet", *p));
        }
        let spec = Node::new("specSet").with(prop).with(
            Node::new("objectSet")
                .with(obj.node("obj"))
                .with(Node::text("skip", "false")),
        );
        let resp = self
            .call(
                "RetrievePropertiesEx",
                &self.content.property_collector,
                vec![spec, Node::new("options")],
            )
            .await?;
        let mut out = Vec::new();
        let Some(objects) = resp.path(&["returnval", "objects"]) else {
            return Ok(out);
        };
        for missing in objects.children_named("missingSet") {
            let fault_name = missing
                .path(&["fault", "fault"])
                .and_then(|f| f.xsi_type.clone())
                .unwrap_or_default();
            if fault_name == "NotAuthenticated" {
                return Err(Error::Fault {
                    method: "RetrievePropertiesEx".into(),
                    name: fault_name,
                    message: "session expired (reported in missingSet)".into(),
                });
            }
            if fault_name == "ManagedObjectNotFound" {
                return Err(Error::NotFound(obj.to_string()));
            }
        }
        for p in objects.children_named("propSet") {
            if let (Some(name), Some(val)) = (p.child_text("name"), p.child("val")) {
                out.push((name.to_string(), val.clone()));
            }
        }
        Ok(out)
    }

    /// Reads one property (`None` when unset).
    pub async fn property(&self, obj: &MoRef, path: &str) -> Result<Option<Node>, Error> {
        Ok(self
            .properties(obj, &[path])
            .await?
            .into_iter()
            .next()
            .map(|(_, v)| v))
    }

    /// Reads a property of every object of `kind` under the root folder (a container view).
    pub async fn list(
        &self,
        kind: &str,
        paths: &[&str],
    ) -> Result<Vec<(MoRef, Vec<(String, Node)>)>, Error> {
        let view = self
            .call(
                "CreateContainerView",
                &self.content.view_manager,
                vec![
                    self.content.root_folder.node("container"),
                    Node::text("type", kind),
                    Node::text("recursive", "true"),
                ],
            )
            .await?;
        let view = view
            .child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| proto("CreateContainerView", "no view"))?;
        let mut prop = Node::new("propSet")
            .with(Node::text("type", kind))
            .with(Node::text("all", "false"));
        for p in paths {
            prop = prop.with(Node::text("pathSet", *p));
        }
        let traversal = Node::new("selectSet")
            .typed("TraversalSpec")
            .with(Node::text("name", "traverseView"))
            .with(Node::text("type", "ContainerView"))
            .with(Node::text("path", "view"))
            .with(Node::text("skip", "false"));
        let spec = Node::new("specSet").with(prop).with(
            Node::new("objectSet")
                .with(view.node("obj"))
                .with(Node::text("skip", "true"))
                .with(traversal),
        );
        let result = self
            .call(
                "RetrievePropertiesEx",
                &self.content.property_collector,
                vec![spec, Node::new("options")],
            )
            .await;
        let _ = self.call("DestroyView", &view, vec![]).await;
        let resp = result?;
        let mut out = Vec::new();
        let mut page = resp.child("returnval").cloned();
        while let Some(rv) = page {
            for o in rv.children_named("objects") {
                let Some(obj) = o.child("obj").and_then(MoRef::from_node) else {
                    continue;
                };
                let props = o
                    .children_named("propSet")
                    .filter_map(|p| {
                        Some((p.child_text("name")?.to_string(), p.child("val")?.clone()))
                    })
                    .collect();
                out.push((obj, props));
            }
            page = match rv.child_text("token") {
                Some(token) => self
                    .call(
                        "ContinueRetrievePropertiesEx",
                        &self.content.property_collector,
                        vec![Node::text("token", token)],
                    )
                    .await?
                    .child("returnval")
                    .cloned(),
                None => None,
            };
        }
        Ok(out)
    }

    /// vCenter's clock (`ServiceInstance.CurrentTime`).
    pub async fn current_time(&self) -> Result<chrono::DateTime<chrono::Utc>, Error> {
        let r = self
            .call(
                "CurrentTime",
                &MoRef::new("ServiceInstance", "ServiceInstance"),
                vec![],
            )
            .await?;
        let t = r.child_text("returnval").unwrap_or("");
        chrono::DateTime::parse_from_rfc3339(t)
            .map(|t| t.with_timezone(&chrono::Utc))
            .map_err(|_| proto("CurrentTime", &format!("not a time: `{t}`")))
    }

    /// Waits for a task to finish; its error becomes [`Error::Task`] with the fault's name.
    /// A task still running after the first look is awaited with a watch on its state
    /// (a long poll), not by polling; where a watch cannot be had, by polling with backoff.
    pub async fn wait_task(
        &self,
        task: &MoRef,
        what: &str,
        timeout: Duration,
    ) -> Result<Option<Node>, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut watch: Option<crate::watch::Watch> = None;
        let mut watching = true;
        let mut delay = Duration::from_millis(50);
        let result = loop {
            match self.task_outcome(task, what).await {
                Ok(Some(done)) => break done,
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break Err(Error::Connection(format!(
                    "task {} ({what}) did not finish within {timeout:?}",
                    task.value
                )));
            }
            if watching && watch.is_none() {
                match self.watch(task, &["info.state"]).await {
                    Ok(w) => watch = Some(w),
                    Err(_) => watching = false,
                }
            }
            match &mut watch {
                Some(w) => {
                    let left = (deadline - now).min(Duration::from_secs(30));
                    if self.wait_for_change(w, left).await.is_err() {
                        watch = None;
                        watching = false;
                    }
                }
                None => {
                    tokio::time::sleep(delay.min(deadline - now)).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        };
        if let Some(w) = watch {
            self.unwatch(w).await;
        }
        result
    }

    /// A task's outcome if it finished: its result, or its error as [`Error::Task`].
    async fn task_outcome(
        &self,
        task: &MoRef,
        what: &str,
    ) -> Result<Option<Result<Option<Node>, Error>>, Error> {
        let props = self
            .properties(task, &["info.state", "info.error", "info.result"])
            .await?;
        let get = |n: &str| props.iter().find(|(k, _)| k == n).map(|(_, v)| v);
        Ok(match get("info.state").map(|n| n.text.as_str()) {
            Some("success") => Some(Ok(get("info.result").cloned())),
            Some("error") => {
                let err = get("info.error");
                let name = err
                    .and_then(|e| e.child("fault"))
                    .and_then(|f| f.xsi_type.clone())
                    .unwrap_or_else(|| "TaskError".into());
                let message = err
                    .and_then(|e| e.child_text("localizedMessage"))
                    .unwrap_or("")
                    .to_string();
                Some(Err(Error::Task {
                    task: task.value.clone(),
                    what: what.into(),
                    name,
                    message,
                }))
            }
            _ => None,
        })
    }

    /// Calls a `*_Task` method and waits for the task.
    pub async fn run_task(
        &self,
        method: &str,
        this: &MoRef,
        args: Vec<Node>,
        timeout: Duration,
    ) -> Result<Option<Node>, Error> {
        if crate::journal::TaskJournal::is_planning() {
            crate::journal::TaskJournal::plan(format!("{method} on {this}"));
            return Ok(None);
        }
        let resp = self.call(method, this, args).await?;
        let task = resp
            .child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| proto(method, "no task in the answer"))?;
        crate::journal::TaskJournal::started(&task.value);
        let result = self.wait_task(&task, method, timeout).await;
        if matches!(result, Ok(_) | Err(Error::Task { .. })) {
            crate::journal::TaskJournal::ended(&task.value);
        }
        result
    }

    /// Waits for the task an earlier try of the same work left running (see
    /// [`crate::journal`]) before this try changes anything, so that one change is not
    /// started twice. Answers what became of it, in words (`None` when no earlier task was
    /// left): it succeeded, failed, or vCenter no longer knows it. Either way the caller then
    /// reads the state afresh and does what is still to do. An error (the task still runs
    /// after `timeout`, vCenter unreachable) keeps the task noted for the next try.
    pub async fn await_earlier_task(&self, timeout: Duration) -> Result<Option<String>, Error> {
        let Some(key) = crate::journal::TaskJournal::earlier() else {
            return Ok(None);
        };
        let task = MoRef::new("Task", &key);
        crate::journal::TaskJournal::started(&key);
        let what = "the task an earlier attempt started";
        let known = match self.properties(&task, &["info.state"]).await {
            Ok(props) => !props.is_empty(),
            Err(Error::NotFound(_)) => false,
            Err(Error::Fault { name, .. }) if name == "ManagedObjectNotFound" => false,
            Err(e) => return Err(e),
        };
        let note = if !known {
            format!("task {key}, left running by an earlier attempt, is no longer known to vCenter")
        } else {
            match self.wait_task(&task, what, timeout).await {
                Ok(_) => format!(
                    "waited for task {key}, left running by an earlier attempt: it succeeded"
                ),
                Err(Error::Task { name, .. }) => format!(
                    "waited for task {key}, left running by an earlier attempt: it failed ({name})"
                ),
                Err(e) => return Err(e),
            }
        };
        crate::journal::TaskJournal::ended(&key);
        Ok(Some(note))
    }
}

fn proto(method: &str, message: &str) -> Error {
    Error::Protocol {
        method: method.into(),
        message: message.into(),
    }
}

fn fault(method: &str, f: &Node) -> Error {
    let message = f.child_text("faultstring").unwrap_or("").to_string();
    let detail = f.child("detail").and_then(|d| d.children.first());
    let name = detail
        .map(|d| {
            d.xsi_type
                .clone()
                .unwrap_or_else(|| d.name.trim_end_matches("Fault").to_string())
        })
        .unwrap_or_else(|| f.child_text("faultcode").unwrap_or("Fault").to_string());
    Error::Fault {
        method: method.into(),
        name,
        message,
    }
}

/// Builds a SOAP envelope for `method` on `this` with `args`.
pub(crate) fn envelope(method: &str, this: &MoRef, args: &[Node]) -> String {
    let mut w = Writer::new(Vec::new());
    let write = |w: &mut Writer<Vec<u8>>| -> std::io::Result<()> {
        use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, Event};
        w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
        let mut env = BytesStart::new("soapenv:Envelope");
        env.push_attribute(("xmlns:soapenv", SOAP_ENV));
        env.push_attribute(("xmlns:xsi", "http://www.w3.org/2001/XMLSchema-instance"));
        env.push_attribute(("xmlns:xsd", "http://www.w3.org/2001/XMLSchema"));
        w.write_event(Event::Start(env))?;
        w.write_event(Event::Start(BytesStart::new("soapenv:Body")))?;
        let mut m = BytesStart::new(method);
        m.push_attribute(("xmlns", "urn:vim25"));
        w.write_event(Event::Start(m))?;
        this.node("_this").write_to(w)?;
        for a in args {
            a.write_to(w)?;
        }
        w.write_event(Event::End(BytesEnd::new(method)))?;
        w.write_event(Event::End(BytesEnd::new("soapenv:Body")))?;
        w.write_event(Event::End(BytesEnd::new("soapenv:Envelope")))
    };
    write(&mut w).expect("writing to a Vec cannot fail");
    String::from_utf8(w.into_inner()).expect("quick-xml writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/samples");

    /// A server that answers every request with `head` and then `body_len` bytes of body.
    async fn oversized(head: &'static str, body_len: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 1 << 20];
                    let mut sent = 0;
                    while sent < body_len {
                        let n = chunk.len().min(body_len - sent);
                        // Chunked framing when the head says so.
                        let ok = if head.contains("chunked") {
                            s.write_all(format!("{n:x}\r\n").as_bytes()).await.is_ok()
                                && s.write_all(&chunk[..n]).await.is_ok()
                                && s.write_all(b"\r\n").await.is_ok()
                        } else {
                            s.write_all(&chunk[..n]).await.is_ok()
                        };
                        if !ok {
                            return;
                        }
                        sent += n;
                    }
                    let _ = s.write_all(b"0\r\n\r\n").await;
                });
            }
        });
        format!("http://{addr}/sdk")
    }

    #[tokio::test]
    async fn oversized_answers_are_refused() {
        let http = reqwest::Client::new();
        let si = MoRef::new("ServiceInstance", "ServiceInstance");
        // Announced too large: refused before reading.
        let url = oversized(
            "HTTP/1.1 200 OK\r\ncontent-type: text/xml\r\ncontent-length: 100000000\r\n\r\n",
            1 << 20,
        )
        .await;
        let e = Client::raw_call(&http, &url, None, "RetrieveServiceContent", &si, vec![])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than 64 MiB"), "{e}");
        // No length, more than the bound streamed: refused at the bound.
        let url = oversized(
            "HTTP/1.1 200 OK\r\ncontent-type: text/xml\r\ntransfer-encoding: chunked\r\n\r\n",
            MAX_RESPONSE + (1 << 20),
        )
        .await;
        let e = Client::raw_call(&http, &url, None, "RetrieveServiceContent", &si, vec![])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than 64 MiB"), "{e}");
    }

    fn sample(name: &str) -> String {
        std::fs::read_to_string(format!("{SAMPLES}/{name}")).unwrap()
    }

    #[test]
    fn faults_carry_their_name() {
        let env = Node::parse(&sample("04-Login-InvalidLogin-fault.response.xml")).unwrap();
        let e = fault("Login", env.path(&["Body", "Fault"]).unwrap());
        assert_eq!(e.fault_name(), Some("InvalidLogin"));
        assert!(e.to_string().contains("Login failure"));
        let env = Node::parse(&sample(
            "19-PowerOffVM_Task-NotAuthenticated-fault.response.xml",
        ))
        .unwrap();
        assert_eq!(
            fault("PowerOffVM_Task", env.path(&["Body", "Fault"]).unwrap()).fault_name(),
            Some("NotAuthenticated")
        );
    }

    #[test]
    fn envelope_matches_the_recorded_request_shape() {
        let xml = envelope(
            "Login",
            &MoRef::new("SessionManager", "SessionManager"),
            &[Node::text("userName", "u<&>"), Node::text("password", "p")],
        );
        let env = Node::parse(&xml).unwrap();
        let login = env.path(&["Body", "Login"]).unwrap();
        assert_eq!(
            login.child("_this").unwrap().type_attr.as_deref(),
            Some("SessionManager")
        );
        assert_eq!(login.child_text("userName"), Some("u<&>"));
        let recorded = Node::parse(&sample("03-Login.request.xml")).unwrap();
        let names = |n: &Node| {
            n.path(&["Body", "Login"])
                .unwrap()
                .children
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&env), names(&recorded));
    }

    #[test]
    fn devices_parse_with_the_simulators_prefix() {
        let env = Node::parse(&sample(
            "05-RetrievePropertiesEx-config.hardware.device.response.xml",
        ))
        .unwrap();
        let val = env
            .path(&[
                "Body",
                "RetrievePropertiesExResponse",
                "returnval",
                "objects",
                "propSet",
                "val",
            ])
            .unwrap();
        assert_eq!(val.xsi_type.as_deref(), Some("ArrayOfVirtualDevice"));
        let nic = val
            .children
            .iter()
            .find(|d| d.xsi_type.as_deref() == Some("VirtualE1000"))
            .unwrap();
        assert_eq!(nic.child_text("key"), Some("4000"));
        assert_eq!(
            nic.path(&["connectable", "connected"])
                .map(|n| n.text.as_str()),
            Some("true")
        );
    }
}
