//! `type: schedule` — an event at each time a cron expression names, in a time zone. Each
//! firing's id is the source and the scheduled time, so a firing is stored once whichever
//! node (or restart) fires it; with several nodes the source also runs under a lease, so
//! one node fires. A firing missed while reflex was down is fired once at the next start
//! when it is within `catch_up`.

use crate::config::Duration as ConfigDuration;
use crate::config::{Config, Diagnostics, Text};
use crate::deliveries::Clock;
use crate::ingest::Ingest;
use crate::store::{Checkpoint, Store};
use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use cloudevents::{Event, EventBuilder, EventBuilderV10};
use croner::Cron;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Configuration of `type: schedule`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Unique source name.
    #[schemars(with = "String")]
    pub name: Text,
    /// A cron expression: 5 fields (minute hour day month weekday), or 6 with seconds
    /// first; `L`, `#`, `W` and names (`MON`, `JAN`) as croner reads them.
    pub cron: String,
    /// The IANA time zone the expression is read in (`Europe/Berlin`); `UTC` by default.
    #[serde(default = "utc")]
    pub timezone: String,
    /// The event type; `com.reflex.schedule` by default.
    pub event_type: Option<String>,
    /// The subject; the source's name by default.
    pub subject: Option<String>,
    /// The event's data (any YAML value); `{scheduled, source}` by default.
    pub data: Option<Value>,
    /// A firing missed while reflex was down is fired once at start if it was due within
    /// this long; `0s` (the default) fires nothing missed.
    pub catch_up: Option<ConfigDuration>,
}

fn utc() -> String {
    "UTC".into()
}

/// A compiled schedule source.
pub struct Schedule {
    name: String,
    cron: Cron,
    tz: Tz,
    event_type: String,
    subject: String,
    data: Option<Value>,
    catch_up: Duration,
}

/// Longest run of missed firings looked through at start (a per-second expression with a
/// day of catch-up is 86,400).
const MAX_MISSED_SCAN: usize = 100_000;

impl Schedule {
    /// Parses the expression and the time zone.
    pub fn build(
        c: &ScheduleConfig,
        loc: &serde_saphyr::Location,
        _config: &Config,
        diags: &mut Diagnostics,
    ) -> Option<Schedule> {
        let name = &c.name.value;
        let cron = match Cron::from_str(c.cron.trim()) {
            Ok(cron) => Some(cron),
            Err(e) => {
                diags.at(
                    loc,
                    format!(
                        "source `{name}`: cron `{}` is not a cron expression: {e}",
                        c.cron
                    ),
                );
                None
            }
        };
        let tz = match Tz::from_str(&c.timezone) {
            Ok(tz) => Some(tz),
            Err(_) => {
                diags.at(
                    loc,
                    format!(
                        "source `{name}`: timezone `{}` is not an IANA time zone name (e.g. `UTC`, `Europe/Berlin`, `America/New_York`)",
                        c.timezone
                    ),
                );
                None
            }
        };
        let cron = cron?;
        let tz = tz?;
        if cron
            .find_next_occurrence(&Utc::now().with_timezone(&tz), false)
            .is_err()
        {
            diags.at(
                loc,
                format!("source `{name}`: cron `{}` never fires", c.cron),
            );
            return None;
        }
        Some(Schedule {
            name: name.clone(),
            cron,
            tz,
            event_type: c
                .event_type
                .clone()
                .unwrap_or_else(|| "com.reflex.schedule".into()),
            subject: c.subject.clone().unwrap_or_else(|| name.clone()),
            data: c.data.clone(),
            catch_up: c.catch_up.map(|d| d.0).unwrap_or_default(),
        })
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The first firing after `after` (ms since the epoch), in ms since the epoch.
    fn next_after(&self, after: i64) -> Option<i64> {
        let t = self.tz.timestamp_millis_opt(after).single()?;
        self.cron
            .find_next_occurrence(&t, false)
            .ok()
            .map(|n| n.timestamp_millis())
    }

    /// The last firing missed between the previous one fired (`last`, if known) and `now`
    /// that is within the catch-up window.
    fn missed(&self, last: Option<i64>, now: i64) -> Option<i64> {
        let window = self.catch_up.as_millis() as i64;
        if window == 0 {
            return None;
        }
        let mut from = now - window - 1;
        if let Some(last) = last {
            from = from.max(last);
        }
        let mut found = None;
        for _ in 0..MAX_MISSED_SCAN {
            match self.next_after(from) {
                Some(t) if t <= now => {
                    found = Some(t);
                    from = t;
                }
                _ => break,
            }
        }
        found
    }

    /// The event of the firing scheduled at `at` (ms since the epoch).
    fn event(&self, at: i64, catch_up: bool) -> Event {
        let when: DateTime<Utc> = Utc.timestamp_millis_opt(at).single().unwrap_or_default();
        let scheduled = when.with_timezone(&self.tz).to_rfc3339();
        let data = self.data.clone().unwrap_or_else(|| {
            serde_json::json!({"scheduled": scheduled, "source": self.name, "catch_up": catch_up})
        });
        EventBuilderV10::new()
            .id(format!("{}@{}", self.name, when.to_rfc3339()))
            .source(format!("/reflex/sources/{}", self.name))
            .ty(self.event_type.clone())
            .subject(self.subject.clone())
            .time(when)
            .data("application/json", data)
            .build()
            .expect("a schedule's event has every required attribute")
    }

    /// Fires until `shutdown`. `emit` stores one event (false: it was not stored, try
    /// again); the checkpoint keeps the last firing stored, for catch-up after a restart.
    pub async fn run(
        self,
        ingest: Ingest,
        store: Arc<dyn Store>,
        clock: Clock,
        shutdown: CancellationToken,
    ) {
        let emit = |e: Event| {
            let ingest = ingest.clone();
            let name = self.name.clone();
            async move {
                match ingest.submit(&name, vec![e]).await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(source = %name, error = %e, "cannot store the schedule's event; trying again");
                        false
                    }
                }
            }
        };
        self.fire(store.as_ref(), clock, &shutdown, emit).await
    }

    /// Fires on the node holding the source's lease: the holder renews it between firings;
    /// a node that takes it (at start, or over from a node that stopped or died) first fires
    /// the last time missed since the checkpoint, within `catch_up`.
    async fn fire<F, Fut>(
        &self,
        store: &dyn Store,
        clock: Clock,
        shutdown: &CancellationToken,
        emit: F,
    ) where
        F: Fn(Event) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let lease = format!("source:{}", self.name);
        let renew = (store.lease_time() / 3).as_millis().max(1) as i64;
        let mut fence: Option<i64> = None;
        let mut next = self.next_after(clock.now_ms());
        // A firing that is due, until it is stored (or another node holds the lease).
        let mut due: Option<i64> = None;
        loop {
            let mut retry = false;
            match store.hold_lease(&lease).await {
                Ok(Some(f)) => {
                    if fence.is_none() {
                        match self.catch_up(store, f, clock, due, &emit).await {
                            Ok(()) => fence = Some(f),
                            Err(()) => retry = true,
                        }
                    }
                    if let (Some(f), Some(at)) = (fence, due) {
                        if self.store_firing(store, f, at, false, &emit).await {
                            due = None;
                        } else {
                            retry = true;
                        }
                    }
                }
                Ok(None) => {
                    if fence.take().is_some() {
                        tracing::info!(source = %self.name, "another node fires this schedule now");
                    }
                    due = None;
                }
                Err(e) => {
                    tracing::warn!(source = %self.name, error = %e, "cannot take the schedule's lease; trying again");
                    fence = None;
                    retry = true;
                }
            }
            let now = clock.now_ms();
            let wake = match (retry, next) {
                (true, _) => now + 1000,
                (false, Some(n)) => n.min(now + renew),
                (false, None) => now + renew,
            };
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // A clean stop hands the schedule over at once, not after the lease.
                    if fence.is_some() {
                        if let Err(e) = store.release_lease(&lease).await {
                            tracing::warn!(source = %self.name, error = %e, "cannot give the schedule's lease up; another node takes over when it lapses");
                        }
                    }
                    return;
                }
                _ = clock.sleep_until_ms(wake) => {}
            }
            if let Some(n) = next.filter(|&n| clock.now_ms() >= n) {
                if due.is_some_and(|d| d != n) {
                    tracing::warn!(source = %self.name, "a firing could not be stored before the next was due; it is skipped");
                }
                due = Some(n);
                next = self.next_after(n);
                if next.is_none() {
                    tracing::warn!(source = %self.name, "the schedule has no further firing");
                }
            } else if next.is_none() && due.is_none() {
                return;
            }
        }
    }

    /// On taking the lease: fires the last time missed since the checkpoint (before `due`,
    /// which is fired as itself); `Err` when the store could not be read or written.
    async fn catch_up<F, Fut>(
        &self,
        store: &dyn Store,
        fence: i64,
        clock: Clock,
        due: Option<i64>,
        emit: &F,
    ) -> Result<(), ()>
    where
        F: Fn(Event) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let last = match store.checkpoint(&self.name).await {
            Ok(c) => c.map(|c| c.position),
            Err(e) => {
                tracing::warn!(source = %self.name, error = %e, "cannot read the schedule's checkpoint; trying again");
                return Err(());
            }
        };
        let until = due.map_or(clock.now_ms(), |d| d - 1);
        let Some(at) = self.missed(last, until) else {
            return Ok(());
        };
        tracing::info!(source = %self.name, "firing once for the last time missed while no node ran this schedule");
        if self.store_firing(store, fence, at, true, emit).await {
            Ok(())
        } else {
            Err(())
        }
    }

    /// Stores the firing at `at` and makes it the checkpoint; `false` when it was not stored.
    async fn store_firing<F, Fut>(
        &self,
        store: &dyn Store,
        fence: i64,
        at: i64,
        catch_up: bool,
        emit: &F,
    ) -> bool
    where
        F: Fn(Event) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        if !emit(self.event(at, catch_up)).await {
            return false;
        }
        let cp = Checkpoint {
            position: at,
            time: Utc
                .timestamp_millis_opt(at)
                .single()
                .unwrap_or_default()
                .to_rfc3339(),
        };
        if let Err(e) = store.set_checkpoint(&self.name, cp, fence).await {
            tracing::warn!(source = %self.name, error = %e, "cannot record the schedule's checkpoint; a takeover may fire this time again (as a duplicate)");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(cron: &str, tz: &str, catch_up: u64) -> Schedule {
        Schedule {
            name: "s".into(),
            cron: Cron::from_str(cron).unwrap(),
            tz: Tz::from_str(tz).unwrap(),
            event_type: "t".into(),
            subject: "s".into(),
            data: None,
            catch_up: Duration::from_secs(catch_up),
        }
    }

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn the_expression_is_read_in_its_time_zone() {
        // 02:00 in Berlin is 01:00 UTC in winter and 00:00 UTC in summer.
        let s = schedule("0 2 * * *", "Europe/Berlin", 0);
        assert_eq!(
            s.next_after(ms("2026-11-30T12:00:00Z")),
            Some(ms("2026-12-01T01:00:00Z"))
        );
        assert_eq!(
            s.next_after(ms("2026-07-01T12:00:00Z")),
            Some(ms("2026-07-02T00:00:00Z"))
        );
    }

    #[test]
    fn only_the_last_missed_firing_within_the_window_is_caught_up() {
        let s = schedule("0 * * * *", "UTC", 3 * 3600);
        let now = ms("2026-11-30T12:30:00Z");
        // Fired last at 08:00: 09:00–12:00 were missed; only 12:00 is fired.
        assert_eq!(
            s.missed(Some(ms("2026-11-30T08:00:00Z")), now),
            Some(ms("2026-11-30T12:00:00Z"))
        );
        // Already fired at 12:00: nothing.
        assert_eq!(s.missed(Some(ms("2026-11-30T12:00:00Z")), now), None);
        // No catch-up window: nothing.
        let s = schedule("0 * * * *", "UTC", 0);
        assert_eq!(s.missed(Some(ms("2026-11-30T08:00:00Z")), now), None);
        // The window ends before the missed time: nothing.
        let s = schedule("0 0 * * *", "UTC", 3600);
        assert_eq!(s.missed(Some(ms("2026-11-28T00:00:00Z")), now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_each_time_on_paused_time_and_catches_up_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(
                &dir.path().join("s.db"),
                crate::store::DedupLimits::window(Duration::from_secs(3600)),
            )
            .unwrap(),
        );
        let clock = Clock::tokio();
        let start = clock.now_ms();
        // Every 10 s; a checkpoint 35 s ago means three firings were missed.
        let s = schedule("*/10 * * * * *", "UTC", 60);
        let last = s.next_after(start - 45_000).unwrap();
        store
            .set_checkpoint(
                "s",
                Checkpoint {
                    position: last,
                    time: String::new(),
                },
                1,
            )
            .await
            .unwrap();
        // Firings are awaited, not slept for: the test holds no timer of its own, so paused
        // time moves only to the schedule's next firing.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let task = {
            let (stop, store) = (stop.clone(), store.clone());
            tokio::spawn(async move {
                s.fire(store.as_ref(), clock, &stop, |e: Event| {
                    let tx = tx.clone();
                    async move {
                        use cloudevents::AttributesReader;
                        let catch_up = crate::event::data_json(&e)["catch_up"] == true;
                        let at = e.time().unwrap().timestamp_millis();
                        let _ = tx.send((at, e.id().to_string(), catch_up, clock.now_ms()));
                        true
                    }
                })
                .await
            })
        };
        let mut fired = Vec::new();
        for _ in 0..4 {
            fired.push(rx.recv().await.unwrap());
        }
        // The last firing's checkpoint is written right after it (before the next sleep).
        let last = fired[3].0;
        // The store's writer is an OS thread, not on paused time: give it real time (a busy
        // machine may take a while), without letting tokio's clock run on.
        for _ in 0..2000 {
            store.flush().await;
            if store.checkpoint("s").await.unwrap().map(|c| c.position) == Some(last) {
                break;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        stop.cancel();
        task.await.unwrap();
        let times: Vec<i64> = fired.iter().map(|f| f.0).collect();
        // One catch-up (the last time missed, at or before the start), then every 10 s, each
        // fired at its time.
        assert!(fired[0].2 && fired[1..].iter().all(|f| !f.2), "{fired:?}");
        assert_eq!(times[0] % 10_000, 0, "{fired:?}");
        assert!(times[0] > start - 10_000 && times[0] <= start, "{fired:?}");
        assert!(times.windows(2).all(|w| w[1] - w[0] == 10_000), "{fired:?}");
        assert!(
            fired[1..].iter().all(|f| f.3 >= f.0 && f.3 - f.0 < 50),
            "{fired:?}"
        );
        assert!(fired[0].1.starts_with("s@"), "{fired:?}");
        let cp = store.checkpoint("s").await.unwrap().unwrap();
        assert_eq!(cp.position, last);
    }
}
