//! `type: vcenter` — vSphere events as CloudEvents in the Event Broker Appliance's form.
//!
//! The source reads the `latestPage` of an EventHistoryCollector over the root folder: a
//! cheap property read that works on real vCenters and on govmomi's simulator, whose
//! long-lived `ReadNextEvents` never returns new events (govmomi #2134). Between reads it
//! waits on that page with `WaitForUpdatesEx`, so a read follows an event within
//! milliseconds; `poll_interval` bounds the wait (a read at least that often, which also
//! notices a stalled stream). New events (key
//! above the checkpoint) are ingested in key order; once they are durable, the checkpoint
//! (key, time) is stored. A restart resumes after the checkpoint, skipping events older than
//! `max_replay_age`; a first start begins at "now". Failures re-create the session and the
//! collector with jittered backoff; a source that keeps failing is announced as a
//! `stalled` event, and its recovery as `reconnected`.

use crate::config::{Diagnostics, Duration as CfgDuration, Text};
use crate::ingest::Ingest;
use crate::store::{Checkpoint, Store};
use crate::telemetry::Metrics;
use crate::vcenters::Vcenters;
use cloudevents::{AttributesReader, Event, EventBuilder, EventBuilderV10};
use schemars::JsonSchema;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
// Keys are compared across their 32-bit wrap: the Event Broker Appliance stopped at the
// wrap (its issue #809); a vCenter reset (keys from 1 again, far behind the checkpoint)
// still reads as behind.
use vsphere::events::ahead;
use vsphere::{MoRef, Node};

/// Configuration of `type: vcenter`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VcenterSourceConfig {
    /// Unique source name (also the checkpoint's name).
    #[schemars(with = "String")]
    pub name: Text,
    /// Name of a vCenter under `vcenters:`.
    #[schemars(with = "String")]
    pub vcenter: Text,
    /// The longest time between two reads of the event page (default 1s). Events are read
    /// as they happen (a long poll on the page); this bounds the wait when none happen.
    pub poll_interval: Option<CfgDuration>,
    /// Events older than this are not replayed after a restart (default 1h).
    pub max_replay_age: Option<CfgDuration>,
    /// Where a first start (no checkpoint) begins: `now` (default) or `history` (every
    /// event vCenter still holds, within `max_replay_age`).
    #[serde(default)]
    pub first_start: FirstStart,
    /// `cloudevents` (default: `com.vmware.vsphere.<Class>.v0`) or `router` (the appliance's
    /// older `com.vmware.event.router/event`).
    #[serde(default)]
    pub format: Format,
    /// Consecutive failures before the source is announced as stalled (default 3).
    pub stall_after: Option<u32>,
    /// Events per collector page, 1 to 1000 (default 1000, the maximum). More events than
    /// a page between two reads are read back from a fresh collector; what vCenter no
    /// longer holds is counted as missed.
    pub page_size: Option<u32>,
}

/// Where a first start begins.
#[derive(Debug, Deserialize, JsonSchema, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FirstStart {
    /// After the newest event present at start.
    #[default]
    Now,
    /// With the events vCenter still holds.
    History,
}

/// The CloudEvent form.
#[derive(Debug, Deserialize, JsonSchema, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `com.vmware.vsphere.<Class>.v0`, subject the class.
    #[default]
    Cloudevents,
    /// `com.vmware.event.router/event`, subject the class.
    Router,
}

/// A compiled vCenter source.
pub struct VcenterSource {
    name: String,
    vcenter: String,
    poll: Duration,
    max_age: Duration,
    first_start: FirstStart,
    format: Format,
    stall_after: u32,
    page_size: u32,
}

impl VcenterSource {
    /// Checks that the vCenter is configured.
    pub fn build(
        c: &VcenterSourceConfig,
        loc: &serde_saphyr::Location,
        config: &crate::config::Config,
        diags: &mut Diagnostics,
    ) -> Option<VcenterSource> {
        if !config.vcenters.contains_key(&c.vcenter.value) {
            diags.at(
                loc,
                format!(
                    "source `{}`: vcenter `{}` is not configured under `vcenters:` (configured: {:?})",
                    c.name.value,
                    c.vcenter.value,
                    config.vcenters.keys().collect::<Vec<_>>()
                ),
            );
            return None;
        }
        let page_size = c.page_size.unwrap_or(vsphere::events::MAX_COUNT);
        if !(1..=vsphere::events::MAX_COUNT).contains(&page_size) {
            diags.at(
                loc,
                format!(
                    "source `{}`: page_size must be between 1 and 1000, got {page_size}",
                    c.name.value
                ),
            );
            return None;
        }
        Some(VcenterSource {
            page_size,
            name: c.name.value.clone(),
            vcenter: c.vcenter.value.clone(),
            poll: c
                .poll_interval
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(1)),
            max_age: c
                .max_replay_age
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(3600)),
            first_start: c.first_start,
            format: c.format,
            stall_after: c.stall_after.unwrap_or(3).max(1),
        })
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Polls until `shutdown`, on one node at a time: the node holding the source's lease
    /// polls; the others wait to take it over (from the checkpoint) when it lapses.
    pub async fn run(
        self,
        ingest: Ingest,
        store: Arc<dyn Store>,
        vcenters: Vcenters,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let lease = format!("source:{}", self.name);
        let renew = store.lease_time() / 3;
        let mut waiting = false;
        loop {
            match store.hold_lease(&lease).await {
                Ok(Some(fence)) => {
                    if waiting {
                        tracing::info!(source = %self.name, "this node takes the source over from its checkpoint");
                    }
                    let held = Held {
                        store: store.as_ref(),
                        lease: &lease,
                        fence,
                        renewed: tokio::time::Instant::now(),
                    };
                    if !self
                        .run_held(held, &ingest, &vcenters, &metrics, &shutdown)
                        .await
                    {
                        // A clean stop hands the source over at once, not after the lease.
                        if let Err(e) = store.release_lease(&lease).await {
                            tracing::warn!(source = %self.name, error = %e, "cannot give the source's lease up; another node takes over when it lapses");
                        }
                        return;
                    }
                }
                Ok(None) => {
                    if !waiting {
                        tracing::info!(source = %self.name, "another node runs this source; this one stands by");
                    }
                }
                Err(e) => {
                    tracing::warn!(source = %self.name, error = %e, "cannot take the source's lease; trying again")
                }
            }
            waiting = true;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(renew) => {}
            }
        }
    }

    /// Polls while this node holds the lease; `false` once `shutdown`, `true` when the
    /// lease is lost.
    async fn run_held(
        &self,
        mut held: Held<'_>,
        ingest: &Ingest,
        vcenters: &Vcenters,
        metrics: &Arc<Metrics>,
        shutdown: &CancellationToken,
    ) -> bool {
        let store = held.store;
        let mut state = PollState {
            last_key: match store.checkpoint(&self.name).await {
                Ok(c) => c.map(|c| c.position),
                Err(e) => {
                    tracing::error!(source = %self.name, error = %e, "cannot read the checkpoint; trying again");
                    return true;
                }
            },
            collector: None,
            watch: None,
            failures: 0,
            stalled: false,
        };
        // After a good read: wait on the watch (or the poll interval without one); after a
        // failure: back off.
        let mut delay = Some(Duration::ZERO);
        let mut lost = false;
        // The wait stays within a third of the lease, which is renewed between reads.
        let longest_wait = self.poll.min(store.lease_time() / 3);
        loop {
            match (delay, &mut state.watch, &state.collector) {
                (None, Some(watch), Some((client, _))) => {
                    let client = client.clone();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        woke = client.wait_for_change(watch, longest_wait) => {
                            if let Err(e) = woke {
                                // The read that follows finds out whether the session is gone.
                                tracing::debug!(source = %self.name, error = %e, "waiting for vCenter events failed; reading the page with a new collector");
                                state.watch = None;
                                state.collector = None;
                            }
                        }
                    }
                }
                (delay, _, _) => {
                    let d = delay.unwrap_or_else(|| jitter(self.poll));
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(d) => {}
                    }
                }
            }
            if !held.renew().await {
                tracing::warn!(source = %self.name, "this node lost the source's lease; it stops polling and stands by");
                lost = true;
                break;
            }
            match self
                .poll_once(&mut state, ingest, store, held.fence, vcenters, metrics)
                .await
            {
                Ok(()) => {
                    if state.stalled {
                        state.stalled = false;
                        tracing::info!(source = %self.name, "vCenter event stream reconnected");
                        self.announce(
                            ingest,
                            vcenters,
                            "reconnected",
                            "the event stream is flowing again",
                        )
                        .await;
                    }
                    state.failures = 0;
                    metrics.source_up(&self.name, true);
                    delay = None;
                }
                Err(e) => {
                    state.failures += 1;
                    state.collector = None;
                    state.watch = None;
                    vcenters.reset(&self.vcenter).await;
                    metrics.source_up(&self.name, false);
                    tracing::warn!(source = %self.name, failures = state.failures, error = %e, "reading vCenter events failed; will reconnect");
                    if state.failures >= self.stall_after && !state.stalled {
                        state.stalled = true;
                        metrics.source_stalled(&self.name);
                        self.announce(
                            ingest,
                            vcenters,
                            "stalled",
                            &format!("{} consecutive failures; last: {e}", state.failures),
                        )
                        .await;
                    }
                    let backoff = self
                        .poll
                        .saturating_mul(1 << state.failures.min(6))
                        .min(Duration::from_secs(60));
                    delay = Some(jitter(backoff));
                }
            }
        }
        if let Some((client, c)) = state.collector.take() {
            if let Some(w) = state.watch.take() {
                client.unwatch(w).await;
            }
            client.destroy_collector(&c).await;
        }
        lost
    }

    async fn poll_once(
        &self,
        st: &mut PollState,
        ingest: &Ingest,
        store: &dyn Store,
        fence: i64,
        vcenters: &Vcenters,
        metrics: &Metrics,
    ) -> Result<(), String> {
        let (client, collector) = match &st.collector {
            Some(c) => c.clone(),
            None => {
                let client = vcenters
                    .client(&self.vcenter)
                    .await
                    .map_err(|e| e.to_string())?;
                let c = client
                    .create_event_collector(self.page_size)
                    .await
                    .map_err(|e| e.to_string())?;
                st.watch = match client.watch(&c, &["latestPage"]).await {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::warn!(source = %self.name, error = %e, "this vCenter does not let reflex wait for events; polling every poll_interval instead");
                        None
                    }
                };
                st.collector = Some((client.clone(), c.clone()));
                (client, c)
            }
        };
        let mut page = client
            .latest_page(&collector)
            .await
            .map_err(|e| e.to_string())?;
        // Before there is a position to order by: by creation time (keys may have wrapped).
        let by_time = |e: &&Node| {
            (
                e.child_text("createdTime")
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
                vsphere::events::key(e).unwrap_or(0),
            )
        };
        let newest = page
            .iter()
            .max_by_key(by_time)
            .and_then(vsphere::events::key);
        let Some(last) = st.last_key else {
            // First start.
            if self.first_start == FirstStart::Now {
                let k = newest.unwrap_or(0);
                store
                    .set_checkpoint(
                        &self.name,
                        Checkpoint {
                            position: k,
                            time: String::new(),
                        },
                        fence,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                st.last_key = Some(k);
                tracing::info!(source = %self.name, key = k, "first start: reading events after the newest one present");
                return Ok(());
            }
            // `history`: from just before the oldest event of the page.
            let oldest = page
                .iter()
                .min_by_key(by_time)
                .and_then(vsphere::events::key)
                .unwrap_or(1);
            st.last_key = Some(ahead_by(oldest, -1));
            return Box::pin(self.poll_once(st, ingest, store, fence, vcenters, metrics)).await;
        };
        let missed = match standing(&mut page, last, self.page_size as usize) {
            Standing::Behind(n) => {
                tracing::warn!(source = %self.name, checkpoint = last, newest = n, "vCenter event keys went backwards (a new or reset vCenter); resuming after its newest event");
                store
                    .set_checkpoint(
                        &self.name,
                        Checkpoint {
                            position: n,
                            time: String::new(),
                        },
                        fence,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                st.last_key = Some(n);
                return Ok(());
            }
            Standing::Ahead { missed, .. } => missed,
        };
        if missed > 0 {
            // More events than a page since the last read: the range between the checkpoint
            // and the page is read from a fresh collector before going on.
            let older = client.events_since(last, GAP_LIMIT).await.map_err(|e| {
                format!(
                    "reading the {missed} events between the checkpoint and the latest page: {e}"
                )
            })?;
            tracing::info!(source = %self.name, missed, recovered = older.len(), "more events than one page since the last read; read the ones before the page");
            page.extend(older);
            page.sort_by_key(vsphere::events::key);
            page.dedup_by_key(|e| vsphere::events::key(e));
        }
        let new = match standing(&mut page, last, usize::MAX) {
            Standing::Ahead { new, .. } => new,
            Standing::Behind(_) => Vec::new(),
        };
        if let Some(first) = new.first().and_then(|e| vsphere::events::key(e)) {
            let lost = ahead(first, last) - 1;
            if missed > 0 && lost > 0 {
                tracing::warn!(source = %self.name, lost, "vCenter no longer holds some events between the checkpoint and the latest page; lower poll_interval or raise page_size");
                metrics.vcenter_missed(&self.name, lost as u64);
            }
        }
        let oldest_allowed = chrono::Utc::now()
            - chrono::Duration::from_std(self.max_age).unwrap_or(chrono::Duration::hours(1));
        let mut events = Vec::new();
        let mut skipped = 0;
        for e in &new {
            let own = vcenters.own_user(&self.vcenter);
            let ce = match self.to_cloudevent(e, client.url(), &client.content.api_version, own) {
                Ok(ce) => ce,
                Err(err) => {
                    tracing::warn!(source = %self.name, error = %err, "vSphere event cannot be converted; skipped");
                    continue;
                }
            };
            if ce.time().is_some_and(|t| *t < oldest_allowed) {
                skipped += 1;
                continue;
            }
            events.push(ce);
        }
        if skipped > 0 {
            tracing::info!(source = %self.name, skipped, "events older than max_replay_age were not replayed");
        }
        if let Some(e) = new.last() {
            let key = vsphere::events::key(e).unwrap_or(last);
            let time = e.child_text("createdTime").unwrap_or("").to_string();
            if !events.is_empty() {
                ingest
                    .submit(&self.name, events)
                    .await
                    .map_err(|e| format!("ingest: {e}"))?;
            }
            // Only now that the events are durable does the position move.
            store
                .set_checkpoint(
                    &self.name,
                    Checkpoint {
                        position: key,
                        time: time.clone(),
                    },
                    fence,
                )
                .await
                .map_err(|e| e.to_string())?;
            st.last_key = Some(key);
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&time) {
                if let Ok(now) = client.current_time().await {
                    metrics.vcenter_lag(
                        &self.name,
                        (now - t.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0,
                    );
                }
            }
        }
        Ok(())
    }

    /// Converts a vSphere event to the appliance's CloudEvent.
    /// `own_user`: the user reflex's actions log in as; an event by that user is marked
    /// `reflexcaused` (the loop guard).
    pub fn to_cloudevent(
        &self,
        e: &Node,
        url: &str,
        api_version: &str,
        own_user: Option<&str>,
    ) -> Result<Event, String> {
        let class = vsphere::events::class(e);
        let key = vsphere::events::key(e).ok_or("event without key")?;
        let (eventclass, type_name) = match class.as_str() {
            "EventEx" => (
                "eventex",
                e.child_text("eventTypeId").unwrap_or("EventEx").to_string(),
            ),
            "ExtendedEvent" => (
                "extendedevent",
                e.child_text("eventTypeId")
                    .unwrap_or("ExtendedEvent")
                    .to_string(),
            ),
            _ => ("event", class.clone()),
        };
        let ty = match self.format {
            Format::Cloudevents => format!("com.vmware.vsphere.{type_name}.v0"),
            Format::Router => "com.vmware.event.router/event".to_string(),
        };
        let mut b = EventBuilderV10::new()
            .id(key.to_string())
            .source(url.to_string())
            .ty(ty)
            .subject(class)
            .extension("eventclass", eventclass)
            .extension("vsphereapiversion", api_version.to_string())
            .data("application/json", vsphere::events::event_data(e));
        if let (Some(own), Some(by)) = (own_user, e.child_text("userName")) {
            if same_user(own, by) {
                b = b.extension(crate::router::REFLEX_CAUSED, true);
            }
        }
        if let Some(t) = e
            .child_text("createdTime")
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        {
            b = b.time(t.with_timezone(&chrono::Utc));
        }
        b.build().map_err(|e| e.to_string())
    }

    async fn announce(&self, ingest: &Ingest, vcenters: &Vcenters, what: &str, detail: &str) {
        let ev = EventBuilderV10::new()
            .id(uuid::Uuid::now_v7().to_string())
            .source(format!("/reflex/sources/{}", self.name))
            .ty(format!("com.reflex.source.{what}"))
            .subject(self.name.clone())
            .time(chrono::Utc::now())
            .data(
                "application/json",
                serde_json::json!({"source": self.name, "vcenter": self.vcenter, "url": vcenters.url(&self.vcenter), "detail": detail}),
            )
            .build();
        if let Ok(ev) = ev {
            if let Err(e) = ingest.submit(&self.name, vec![ev]).await {
                tracing::error!(source = %self.name, error = %e, "cannot record the `{what}` event");
            }
        }
    }
}

struct PollState {
    last_key: Option<i64>,
    collector: Option<(Arc<vsphere::Client>, MoRef)>,
    /// A watch on the collector's `latestPage`: the source waits on it between reads, so
    /// an event is read when it happens (`None`: the vCenter refused one; plain polling).
    watch: Option<vsphere::watch::Watch>,
    failures: u32,
    stalled: bool,
}

/// Most events read back to fill one gap (a hundred pages).
const GAP_LIMIT: usize = 100_000;

/// Where a page stands against the checkpoint `last`.
#[derive(Debug)]
enum Standing<'a> {
    /// Every event is behind the checkpoint: a new or reset vCenter (its newest key).
    Behind(i64),
    /// The events after the checkpoint, oldest first, and how many between the checkpoint
    /// and the first of them are not on the page (a full page that does not reach back).
    Ahead { new: Vec<&'a Node>, missed: i64 },
}

/// Orders `page` in chain order from `last` (across a wrap of the keys) and finds what is
/// new in it.
fn standing(page: &mut [Node], last: i64, page_size: usize) -> Standing<'_> {
    page.sort_by_key(|e| vsphere::events::key(e).map_or(i64::MIN, |k| ahead(k, last)));
    let full = page.len() >= page_size;
    if let Some(n) = page.last().and_then(vsphere::events::key) {
        if ahead(n, last) < 0 {
            return Standing::Behind(n);
        }
    }
    let new: Vec<&Node> = page
        .iter()
        .filter(|e| vsphere::events::key(e).is_some_and(|k| ahead(k, last) > 0))
        .collect();
    let missed = match new.first().and_then(|e| vsphere::events::key(e)) {
        Some(first) if full && ahead(first, last) > 1 => ahead(first, last) - 1,
        _ => 0,
    };
    Standing::Ahead { new, missed }
}

/// The key `n` places after `key` in the chain (wrapping like vCenter's).
fn ahead_by(key: i64, n: i32) -> i64 {
    i64::from((key as i32).wrapping_add(n))
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + rand::random::<f64>() * 0.4)
}

/// A source's lease while this node holds it.
struct Held<'a> {
    store: &'a dyn Store,
    lease: &'a str,
    fence: i64,
    renewed: tokio::time::Instant,
}

impl Held<'_> {
    /// Renews the lease when a third of it has passed; `false` when another node has it.
    async fn renew(&mut self) -> bool {
        if self.renewed.elapsed() < self.store.lease_time() / 3 {
            return true;
        }
        match self.store.hold_lease(self.lease).await {
            Ok(Some(fence)) => {
                self.fence = fence;
                self.renewed = tokio::time::Instant::now();
                true
            }
            Ok(None) => false,
            // Unreachable store: keep polling; the checkpoint write is fenced anyway.
            Err(e) => {
                tracing::warn!(lease = self.lease, error = %e, "cannot renew the lease");
                true
            }
        }
    }
}

/// Whether a vCenter event's `userName` is the configured user: case aside, and with the
/// domain written either way (`VSPHERE.LOCAL\\reflex` is `reflex@vsphere.local`).
fn same_user(configured: &str, event: &str) -> bool {
    fn parts(u: &str) -> (String, Option<String>) {
        let u = u.trim().to_lowercase();
        if let Some((d, n)) = u.split_once('\\') {
            return (n.to_string(), Some(d.to_string()));
        }
        if let Some((n, d)) = u.split_once('@') {
            return (n.to_string(), Some(d.to_string()));
        }
        (u, None)
    }
    let (a, ad) = parts(configured);
    let (b, bd) = parts(event);
    !a.is_empty() && a == b && (ad.is_none() || bd.is_none() || ad == bd)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_own_user_is_recognized_however_its_domain_is_written() {
        use super::same_user;
        assert!(same_user("reflex-svc", "reflex-svc"));
        assert!(same_user("reflex@vsphere.local", "VSPHERE.LOCAL\\reflex"));
        assert!(same_user("reflex@vsphere.local", "reflex"));
        assert!(!same_user("reflex@vsphere.local", "OTHER\\reflex"));
        assert!(!same_user("reflex", "administrator"));
        assert!(!same_user("", ""));
    }

    use super::*;

    fn source(format: Format) -> VcenterSource {
        VcenterSource {
            name: "vc".into(),
            vcenter: "vc1".into(),
            poll: Duration::from_secs(1),
            max_age: Duration::from_secs(3600),
            first_start: FirstStart::Now,
            format,
            stall_after: 3,
            page_size: 1000,
        }
    }

    fn recorded_alarm() -> Node {
        let xml = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/crates/vsphere/tests/samples/18-ReadNextEvents-AlarmStatusChangedEvent.response.xml"
        ))
        .unwrap();
        Node::parse(&xml)
            .unwrap()
            .path(&["Body", "ReadNextEventsResponse", "returnval"])
            .unwrap()
            .clone()
    }

    /// A page as vCenter lists it (newest first): the recorded event with these keys.
    fn page(keys: &[i64]) -> Vec<Node> {
        keys.iter()
            .map(|k| {
                let mut e = recorded_alarm();
                e.set_child_text("key", &k.to_string());
                e
            })
            .collect()
    }

    fn keys(s: &Standing<'_>) -> (Vec<i64>, i64) {
        match s {
            Standing::Ahead { new, missed } => (
                new.iter().filter_map(|e| vsphere::events::key(e)).collect(),
                *missed,
            ),
            Standing::Behind(n) => panic!("behind at {n}"),
        }
    }

    /// Keys wrap from 2^31 - 1 to -2^31: what follows the checkpoint is still new, in chain
    /// order, and nothing is taken for a reset.
    #[test]
    fn the_position_survives_the_key_wrap() {
        const MAX: i64 = i32::MAX as i64;
        const MIN: i64 = i32::MIN as i64;
        let mut p = page(&[MIN + 1, MIN, MAX, MAX - 1]);
        assert_eq!(
            keys(&standing(&mut p, MAX - 1, 1000)),
            (vec![MAX, MIN, MIN + 1], 0)
        );
        let mut p = page(&[MIN + 1, MIN, MAX, MAX - 1]);
        assert_eq!(keys(&standing(&mut p, MIN, 1000)), (vec![MIN + 1], 0));
        let mut p = page(&[MIN + 1, MIN, MAX, MAX - 1]);
        assert_eq!(keys(&standing(&mut p, MIN + 1, 1000)), (vec![], 0));
        // A full page that does not reach back to the checkpoint, across the wrap.
        let mut p = page(&[MIN + 1, MIN, MAX, MAX - 1]);
        assert_eq!(
            keys(&standing(&mut p, MAX - 10, 4)),
            (vec![MAX - 1, MAX, MIN, MIN + 1], 8)
        );
        // A reset vCenter (keys from 1 again) is still behind the checkpoint.
        let mut p = page(&[3, 2, 1]);
        assert!(matches!(standing(&mut p, 5_000, 1000), Standing::Behind(3)));
        let mut p = page(&[3, 2, 1]);
        assert!(matches!(
            standing(&mut p, MAX - 5, 1000),
            Standing::Behind(3)
        ));
    }

    #[test]
    fn appliance_form_from_a_recorded_event() {
        let ev = source(Format::Cloudevents)
            .to_cloudevent(&recorded_alarm(), "https://vc/sdk", "8.0", None)
            .unwrap();
        assert_eq!(ev.ty(), "com.vmware.vsphere.AlarmStatusChangedEvent.v0");
        assert_eq!(ev.subject(), Some("AlarmStatusChangedEvent"));
        assert_eq!(ev.source().to_string(), "https://vc/sdk");
        assert_eq!(
            crate::event::attribute(&ev, "eventclass").as_deref(),
            Some("event")
        );
        assert_eq!(
            crate::event::attribute(&ev, "vsphereapiversion").as_deref(),
            Some("8.0")
        );
        assert!(ev.time().is_some());
        let data = crate::event::data_json(&ev);
        assert_eq!(data["Key"].to_string(), ev.id());
        assert_eq!(data["Alarm"]["Name"], "VM CPU Usage");
    }

    #[test]
    fn router_form_and_eventex() {
        let ev = source(Format::Router)
            .to_cloudevent(&recorded_alarm(), "https://vc/sdk", "8.0", None)
            .unwrap();
        assert_eq!(ev.ty(), "com.vmware.event.router/event");
        assert_eq!(ev.subject(), Some("AlarmStatusChangedEvent"));
        let ex = Node::new("returnval")
            .typed("EventEx")
            .with(Node::text("key", "77"))
            .with(Node::text("createdTime", "2026-11-25T10:00:00Z"))
            .with(Node::text(
                "eventTypeId",
                "com.vmware.vc.HA.ClusterFailoverActionInitiatedEvent",
            ));
        let ev = source(Format::Cloudevents)
            .to_cloudevent(&ex, "https://vc/sdk", "8.0", None)
            .unwrap();
        assert_eq!(
            ev.ty(),
            "com.vmware.vsphere.com.vmware.vc.HA.ClusterFailoverActionInitiatedEvent.v0"
        );
        assert_eq!(
            crate::event::attribute(&ev, "eventclass").as_deref(),
            Some("eventex")
        );
        assert_eq!(ev.id(), "77");
    }
}
