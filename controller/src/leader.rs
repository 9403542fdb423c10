//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection does: one replica reconciles; a standby takes over once the leader's
//! Lease has gone unrenewed for its duration, judged by the standby's own clock; a leader
//! that could not renew by its renew deadline stops acting at once ([`Fence`]) and exits.
//!
//! Why this is safe without comparing clocks: a renewal sent at `t` holds the leader's
//! fence open until `t + renew_deadline`. A standby sees that renewal no earlier than `t`
//! and waits `lease_duration` from then by its own clock. With `renew_deadline <
//! lease_duration`, the old leader has stopped before the new one starts, whatever the
//! two clocks say (only their rates must roughly agree).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::api::FIELD_MANAGER;

/// Who competes for which Lease, and how fast.
#[derive(Clone, Debug)]
pub struct LeaderElectionConfig {
    pub namespace: String,
    pub lease_name: String,
    /// This replica's name in the Lease (unique per process).
    pub identity: String,
    pub timings: LeaseTimings,
}

/// client-go's three leader-election timings (its defaults: 15 s, 10 s, 2 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How long a standby waits, by its own clock, after it last saw the Lease renewed.
    pub lease_duration: Duration,
    /// How long the leader keeps acting after its last successful renewal was sent;
    /// shorter than `lease_duration`, so it stops before any standby can start.
    pub renew_deadline: Duration,
    /// How often the leader renews, and a standby looks.
    pub retry_period: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        LeaseTimings {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl LeaseTimings {
    /// client-go's proportions for a given lease duration (15 s gives 10 s and 2 s).
    pub fn for_lease_duration(lease_duration: Duration) -> Self {
        LeaseTimings {
            lease_duration,
            renew_deadline: lease_duration.mul_f64(2.0 / 3.0),
            retry_period: lease_duration.div_f64(7.5),
        }
    }

    /// The timings must leave the leader time to stop before a standby starts.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({:?}), or two replicas could act at once",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(format!(
                "the retry period ({:?}) must be above zero and shorter than the renew deadline ({:?})",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// Whether this replica may start acting on instances. Without leader election it is
/// always open; with it, it is open until the renew deadline of the last renewal that
/// succeeded, and closes by itself when that passes, whatever the renewing task is doing.
#[derive(Clone, Debug, Default)]
pub struct Fence(Option<Arc<Mutex<Option<Instant>>>>);

impl Fence {
    /// Never closes (no leader election).
    pub fn unfenced() -> Fence {
        Fence(None)
    }

    /// Closed until a renewal opens it.
    pub fn closed() -> Fence {
        Fence(Some(Arc::new(Mutex::new(None))))
    }

    fn until(&self) -> Option<Option<Instant>> {
        self.0.as_ref().map(|until| *until.lock().expect("not poisoned"))
    }

    /// Open until `until` (a renewal sent at `until - renew_deadline` succeeded).
    fn open_until(&self, until: Instant) {
        if let Some(slot) = &self.0 {
            let mut slot = slot.lock().expect("not poisoned");
            *slot = Some(slot.map_or(until, |before| before.max(until)));
        }
    }

    fn close(&self) {
        if let Some(slot) = &self.0 {
            *slot.lock().expect("not poisoned") = None;
        }
    }

    pub fn is_open(&self) -> bool {
        match self.until() {
            None => true,
            Some(until) => until.is_some_and(|until| Instant::now() < until),
        }
    }

    /// Completes when the fence is closed (never, when unfenced).
    pub async fn wait_closed(&self) {
        loop {
            match self.until() {
                None => std::future::pending::<()>().await,
                Some(None) => return,
                Some(Some(until)) if Instant::now() >= until => return,
                Some(Some(until)) => tokio::time::sleep_until(until).await,
            }
        }
    }

    /// Runs `work` only if the fence is open, and cuts it short the moment it closes.
    pub async fn guard<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        if !self.is_open() {
            return None;
        }
        tokio::select! {
            biased;
            () = self.wait_closed() => None,
            result = work => Some(result),
        }
    }
}

/// What to do about the Lease, decided from what it says now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    /// No Lease yet: create it holding it.
    Create,
    /// Take it over (free or expired); `transitions` is the new count.
    Acquire { transitions: i32 },
    /// It is ours: renew it.
    Renew,
    /// Another holder's lease is valid for this long still.
    Wait(Duration),
}

/// Pure: the decision for `identity`, where `unchanged_for` is how long this replica has
/// seen the Lease exactly as it is now, by its own clock. The Lease's `renewTime` is
/// never compared with the local clock.
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, unchanged_for: Duration) -> LeaseDecision {
    let Some(spec) = lease else { return LeaseDecision::Create };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    let transitions = spec.lease_transitions.unwrap_or(0);
    if holder == identity {
        return LeaseDecision::Renew;
    }
    if holder.is_empty() {
        return LeaseDecision::Acquire { transitions: transitions + 1 };
    }
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1).unsigned_abs().into());
    match duration.checked_sub(unchanged_for) {
        Some(left) if !left.is_zero() => LeaseDecision::Wait(left),
        _ => LeaseDecision::Acquire { transitions: transitions + 1 },
    }
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// We hold the Lease now.
    Held,
    /// Another replica holds it.
    HeldByOther,
    /// Someone wrote the Lease between our read and our write: look again.
    Conflict,
}

/// The Lease as last seen, and when (by this replica's clock) it last changed.
struct Observed {
    record: Option<LeaseSpec>,
    since: Instant,
}

pub struct LeaderElector {
    config: LeaderElectionConfig,
    api: Api<Lease>,
    fence: Fence,
    observed: Mutex<Option<Observed>>,
}

impl LeaderElector {
    /// `fence` is opened by each successful renewal and closes at its renew deadline.
    pub fn new(client: kube::Client, config: LeaderElectionConfig, fence: Fence) -> Self {
        let api = Api::namespaced(client, &config.namespace);
        LeaderElector { config, api, fence, observed: Mutex::new(None) }
    }

    /// How long the Lease has looked exactly like `record` to this replica.
    fn unchanged_for(&self, record: Option<&LeaseSpec>, now: Instant) -> Duration {
        let mut observed = self.observed.lock().expect("not poisoned");
        match observed.as_ref() {
            Some(o) if o.record.as_ref() == record => now - o.since,
            _ => {
                *observed = Some(Observed { record: record.cloned(), since: now });
                Duration::ZERO
            }
        }
    }

    /// One attempt to hold the lease.
    async fn try_hold(&self) -> Result<Attempt, kube::Error> {
        let current = self.api.get_opt(&self.config.lease_name).await?;
        // Seen now, not when we asked: a renewal that landed meanwhile was sent before now.
        let seen = Instant::now();
        let record = current.as_ref().and_then(|l| l.spec.as_ref());
        let unchanged_for = self.unchanged_for(record, seen);
        let decision = decide(record, &self.config.identity, unchanged_for);
        let seconds = i32::try_from(self.config.timings.lease_duration.as_secs()).unwrap_or(i32::MAX).max(1);
        let now = Timestamp::now();
        let mut spec = record.cloned().unwrap_or_default();
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        match decision {
            LeaseDecision::Wait(_) => return Ok(Attempt::HeldByOther),
            LeaseDecision::Renew => {}
            LeaseDecision::Create | LeaseDecision::Acquire { .. } => {
                spec.holder_identity = Some(self.config.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(match decision {
                    LeaseDecision::Acquire { transitions } => transitions,
                    _ => 0,
                });
            }
        }
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.config.lease_name.clone()), ..Default::default() },
                    spec: Some(spec.clone()),
                };
                self.api.create(&post_params(), &lease).await
            }
            Some(mut lease) => {
                // Replace with the resourceVersion we read: a concurrent change is a 409.
                lease.spec = Some(spec.clone());
                self.api.replace(&self.config.lease_name, &post_params(), &lease).await
            }
        };
        match result {
            Ok(_) => {
                *self.observed.lock().expect("not poisoned") = Some(Observed { record: Some(spec), since: seen });
                Ok(Attempt::Held)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
            Err(e) => Err(e),
        }
    }

    /// One attempt, given up at `deadline`; on success the fence opens until the renew
    /// deadline counted from the attempt's start.
    async fn attempt(&self, deadline: Instant) -> Result<Attempt, String> {
        let started = Instant::now();
        match tokio::time::timeout_at(deadline, self.try_hold()).await {
            Ok(Ok(Attempt::Held)) => {
                self.fence.open_until(started + self.config.timings.renew_deadline);
                Ok(Attempt::Held)
            }
            Ok(Ok(other)) => Ok(other),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", deadline - started)),
        }
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self) {
        let mut announced = false;
        loop {
            let deadline = Instant::now() + self.config.timings.renew_deadline;
            match self.attempt(deadline).await {
                Ok(Attempt::Held) => {
                    info!(lease = %self.config.lease_name, identity = %self.config.identity, "became the leader");
                    return;
                }
                Ok(_) => {
                    if !announced {
                        info!(lease = %self.config.lease_name, "another replica leads; standing by");
                        announced = true;
                    }
                }
                Err(error) => warn!(%error, "reading the leader-election Lease failed"),
            }
            tokio::time::sleep(self.config.timings.retry_period).await;
        }
    }

    /// Renews the lease while it can; returns (why) once leadership is lost: another
    /// replica holds the Lease, or no renewal succeeded by the renew deadline. The fence
    /// is closed by then.
    pub async fn hold(&self) -> String {
        let timings = self.config.timings;
        loop {
            tokio::select! {
                biased;
                () = self.fence.wait_closed() => break,
                () = tokio::time::sleep(timings.retry_period) => {}
            }
            // An attempt may take until the fence would close, no longer.
            let deadline = Instant::now() + timings.renew_deadline;
            // The moment the fence closes, leadership is lost, even mid-attempt: the
            // caller then stops everything, status writes included.
            let attempt = tokio::select! {
                biased;
                () = self.fence.wait_closed() => break,
                attempt = self.attempt(deadline) => attempt,
            };
            match attempt {
                Ok(Attempt::Held) => debug!("renewed the lease"),
                Ok(Attempt::HeldByOther) => {
                    self.fence.close();
                    return format!("another replica holds the Lease {}", self.config.lease_name);
                }
                Ok(Attempt::Conflict) => debug!("the Lease changed while renewing it; trying again"),
                Err(error) => warn!(%error, "renewing the leader-election Lease failed"),
            }
        }
        format!(
            "could not renew the Lease {} within its renew deadline of {:?}",
            self.config.lease_name, timings.renew_deadline
        )
    }

    /// Gives the lease up on a clean shutdown, so a standby takes over at once.
    pub async fn release(&self) {
        self.fence.close();
        let timeout = self.config.timings.renew_deadline;
        let released = tokio::time::timeout(timeout, async {
            let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else { return Ok(false) };
            let Some(spec) = lease.spec.as_mut() else { return Ok(false) };
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(false);
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api.replace(&self.config.lease_name, &post_params(), &lease).await.map(|_| true)
        });
        match released.await {
            Ok(Ok(true)) => info!("released the leader-election Lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(error = %e, "releasing the leader-election Lease failed"),
            Err(_) => warn!("releasing the leader-election Lease timed out; a standby takes over when it expires"),
        }
    }
}

/// Every Lease write under machinist's field manager.
fn post_params() -> PostParams {
    PostParams { field_manager: Some(FIELD_MANAGER.to_string()), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, duration: i32, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(duration),
            // Far in the past and in the future alike: the decision never reads it.
            renew_time: Some(MicroTime(Timestamp::from_second(1_800_000_000).unwrap())),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    #[test]
    fn no_lease_is_created() {
        assert_eq!(decide(None, "a", Duration::ZERO), LeaseDecision::Create);
    }

    #[test]
    fn own_lease_is_renewed_however_long_unchanged() {
        assert_eq!(decide(Some(&lease(Some("a"), 15, 3)), "a", Duration::from_secs(100)), LeaseDecision::Renew);
    }

    #[test]
    fn another_holder_is_waited_for_a_full_lease_by_our_own_clock() {
        let other = lease(Some("b"), 15, 3);
        assert_eq!(decide(Some(&other), "a", Duration::ZERO), LeaseDecision::Wait(Duration::from_secs(15)));
        assert_eq!(decide(Some(&other), "a", Duration::from_secs(5)), LeaseDecision::Wait(Duration::from_secs(10)));
        assert_eq!(decide(Some(&other), "a", Duration::from_secs(15)), LeaseDecision::Acquire { transitions: 4 });
    }

    #[test]
    fn a_released_lease_is_taken_over_at_once() {
        assert_eq!(decide(Some(&lease(None, 1, 3)), "a", Duration::ZERO), LeaseDecision::Acquire { transitions: 4 });
    }

    #[test]
    fn timings_must_stop_the_leader_before_a_standby_starts() {
        let defaults = LeaseTimings::default();
        assert_eq!(defaults, LeaseTimings::for_lease_duration(Duration::from_secs(15)));
        assert!(defaults.validate().is_ok());
        let late = LeaseTimings { renew_deadline: Duration::from_secs(15), ..defaults };
        assert!(late.validate().unwrap_err().contains("two replicas"));
        let slow = LeaseTimings { retry_period: Duration::from_secs(10), ..defaults };
        assert!(slow.validate().is_err());
    }

    #[tokio::test]
    async fn the_fence_closes_at_the_deadline_and_cuts_work_short() {
        assert!(Fence::unfenced().is_open());
        let fence = Fence::closed();
        assert!(!fence.is_open());
        assert_eq!(fence.guard(async { 1 }).await, None, "nothing starts behind a closed fence");

        let deadline = Instant::now() + Duration::from_millis(300);
        fence.open_until(deadline);
        assert!(fence.is_open());
        assert_eq!(fence.guard(async { 2 }).await, Some(2));
        // An earlier deadline never shortens a later one.
        fence.open_until(Instant::now() + Duration::from_millis(10));
        let long = fence.guard(tokio::time::sleep(Duration::from_secs(60))).await;
        assert_eq!(long, None, "work in flight at the deadline is cut short");
        let now = Instant::now();
        assert!(now >= deadline && now < deadline + Duration::from_secs(5), "cut at the deadline");
        assert!(!fence.is_open());
        fence.wait_closed().await;
    }
}
