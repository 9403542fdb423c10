//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection does: one replica reconciles, standbys take over once the leader's
//! lease expires, and a leader that cannot renew in time stops at once.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tracing::{debug, info, warn};

use crate::api::FIELD_MANAGER;

/// Who competes for which Lease, and how fast.
#[derive(Clone, Debug)]
pub struct LeaderElectionConfig {
    pub namespace: String,
    pub lease_name: String,
    /// This replica's name in the Lease (unique per process).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub lease_duration: Duration,
}

impl LeaderElectionConfig {
    /// Renew this often (a third of the lease, as client-go's defaults).
    fn retry_period(&self) -> Duration {
        (self.lease_duration / 3).max(Duration::from_millis(200))
    }

    /// Give up leading when no renewal succeeded for this long: before the lease can
    /// expire, so two replicas never reconcile at once.
    fn renew_deadline(&self) -> Duration {
        self.lease_duration.mul_f64(2.0 / 3.0)
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

/// Pure: the decision for `identity` at `now`.
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> LeaseDecision {
    let Some(spec) = lease else { return LeaseDecision::Create };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    let transitions = spec.lease_transitions.unwrap_or(0);
    if holder == identity {
        return LeaseDecision::Renew;
    }
    if holder.is_empty() {
        return LeaseDecision::Acquire { transitions: transitions + 1 };
    }
    let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into());
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| t.0);
    match renewed {
        Some(at) if at + duration > now => {
            LeaseDecision::Wait(Duration::try_from(at + duration - now).unwrap_or(Duration::ZERO))
        }
        _ => LeaseDecision::Acquire { transitions: transitions + 1 },
    }
}

pub struct LeaderElector {
    config: LeaderElectionConfig,
    api: Api<Lease>,
}

impl LeaderElector {
    pub fn new(client: kube::Client, config: LeaderElectionConfig) -> Self {
        let api = Api::namespaced(client, &config.namespace);
        LeaderElector { config, api }
    }

    /// One attempt to hold the lease. `Ok(true)`: we hold it now.
    async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.config.lease_name).await?;
        let decision = decide(current.as_ref().and_then(|l| l.spec.as_ref()), &self.config.identity, now);
        let seconds = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX).max(1);
        let mut spec = current.as_ref().and_then(|l| l.spec.clone()).unwrap_or_default();
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        match decision {
            LeaseDecision::Wait(_) => return Ok(false),
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
                    spec: Some(spec),
                };
                self.api.create(&post_params(), &lease).await
            }
            Some(mut lease) => {
                // Replace with the resourceVersion we read: a concurrent change is a 409.
                lease.spec = Some(spec);
                self.api.replace(&self.config.lease_name, &post_params(), &lease).await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self) {
        let mut announced = false;
        loop {
            match self.try_hold().await {
                Ok(true) => {
                    info!(lease = %self.config.lease_name, identity = %self.config.identity, "became the leader");
                    return;
                }
                Ok(false) => {
                    if !announced {
                        info!(lease = %self.config.lease_name, "another replica leads; standing by");
                        announced = true;
                    }
                }
                Err(e) => warn!(error = %e, "reading the leader-election Lease failed"),
            }
            tokio::time::sleep(self.config.retry_period()).await;
        }
    }

    /// Renews the lease while it can; returns (why) once leadership is lost.
    pub async fn hold(&self) -> String {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period()).await;
            match self.try_hold().await {
                Ok(true) => {
                    debug!("renewed the lease");
                    last_renewal = tokio::time::Instant::now();
                }
                Ok(false) => return format!("another replica holds the Lease {}", self.config.lease_name),
                Err(e) => {
                    warn!(error = %e, "renewing the leader-election Lease failed");
                    if last_renewal.elapsed() >= self.config.renew_deadline() {
                        return format!(
                            "could not renew the Lease {} for {}s: {e}",
                            self.config.lease_name,
                            self.config.renew_deadline().as_secs()
                        );
                    }
                }
            }
        }
    }

    /// Gives the lease up on a clean shutdown, so a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.lease_name).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self.api.replace(&self.config.lease_name, &post_params(), &lease).await {
            Ok(_) => info!("released the leader-election Lease"),
            Err(e) => warn!(error = %e, "releasing the leader-election Lease failed"),
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

    fn lease(holder: Option<&str>, renewed_secs_ago: i64, duration: i32, transitions: i32) -> LeaseSpec {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn no_lease_is_created() {
        assert_eq!(decide(None, "a", now()), LeaseDecision::Create);
    }

    #[test]
    fn own_lease_is_renewed_even_when_expired() {
        assert_eq!(decide(Some(&lease(Some("a"), 100, 15, 3)), "a", now()), LeaseDecision::Renew);
    }

    #[test]
    fn valid_lease_of_another_is_waited_for() {
        assert_eq!(decide(Some(&lease(Some("b"), 5, 15, 3)), "a", now()), LeaseDecision::Wait(Duration::from_secs(10)));
    }

    #[test]
    fn expired_or_released_lease_is_taken_over() {
        assert_eq!(decide(Some(&lease(Some("b"), 16, 15, 3)), "a", now()), LeaseDecision::Acquire { transitions: 4 });
        assert_eq!(decide(Some(&lease(None, 0, 1, 3)), "a", now()), LeaseDecision::Acquire { transitions: 4 });
    }

    #[test]
    fn renew_deadline_comes_before_expiry() {
        let config = LeaderElectionConfig {
            namespace: "ns".into(),
            lease_name: "l".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(15),
        };
        assert!(config.renew_deadline() < config.lease_duration);
        assert_eq!(config.retry_period(), Duration::from_secs(5));
    }
}
