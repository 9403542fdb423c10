//! The fake driver: a real implementation of the contract whose instances are files
//! (see [`store`]). Operations take the configured latency and can be made to fail.

mod config;
pub mod store;

use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;

pub use config::{FailureRule, FakeConfig, FakeErrorKind, FakeLatency, FakeSshEndpoint, GracefulStop, INSTANCE_TYPES};
pub use store::{FakeCall, FakeStore, InstanceRecord};

use crate::{
    Address, AddressType, CreateRequest, Driver, DriverError, Instance, MachineRef, Operation, Removal, SshEndpoint,
    State,
};

/// The fake driver bound to one Machine.
pub struct FakeDriver {
    store: FakeStore,
    machine: MachineRef,
    config: FakeConfig,
}

impl FakeDriver {
    pub fn new(store: FakeStore, machine: MachineRef, config: FakeConfig) -> Result<Self, DriverError> {
        config.validate()?;
        Ok(FakeDriver { store, machine, config })
    }

    /// Runs one `Driver` method, journaled when the store keeps a call journal.
    async fn journaled<T>(&self, method: &'static str, call: impl Future<Output = T>) -> T {
        let journal = self.store.journal_call(&self.machine.uid, method);
        journal.complete(call.await)
    }

    /// Takes the operation's latency, failing instead when an injected failure applies.
    async fn call(&self, operation: Operation) -> Result<(), DriverError> {
        let failure = self.injected_failure(operation)?;
        let latency = self.config.latency(operation);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn injected_failure(&self, operation: Operation) -> Result<Option<DriverError>, DriverError> {
        let rules: Vec<(usize, &FailureRule)> =
            self.config.failures.iter().enumerate().filter(|(_, r)| r.operation == operation).collect();
        if rules.is_empty() {
            return Ok(None);
        }
        for (index, rule) in rules {
            let fails = if let Some(count) = rule.count {
                // The counter is keyed by the rule itself, so a changed rule starts afresh.
                let key = format!("{index}:{}", serde_json::to_string(rule).expect("rules serialize"));
                let mut counts = self.store.failure_counts(&self.machine.uid)?;
                let used = counts.entry(key).or_default();
                if *used < count {
                    *used += 1;
                    self.store.put_failure_counts(&self.machine.uid, &counts)?;
                    true
                } else {
                    false
                }
            } else {
                rand::random::<f64>() < rule.probability.unwrap_or(0.0)
            };
            if fails {
                return Ok(Some(injected_error(operation, index, rule)));
            }
        }
        Ok(None)
    }

    fn load(&self, id: &str) -> Result<InstanceRecord, DriverError> {
        let mut record = self
            .store
            .get(&self.machine.uid, id)?
            .ok_or_else(|| DriverError::NotFound { message: format!("fake instance {id} does not exist") })?;
        record.settle(Timestamp::now());
        Ok(record)
    }

    /// Moves an instance to `to`, showing `via` for the operation's latency.
    /// The provider accepts the change at once and completes it after the latency, so a
    /// controller killed meanwhile leaves a change that still happens, as a cloud would.
    async fn transition(&self, id: &str, operation: Operation, via: State, to: State) -> Result<(), DriverError> {
        let latency = self.config.latency(operation);
        if let Some(error) = self.injected_failure(operation)? {
            tokio::time::sleep(latency).await;
            return Err(error);
        }
        let mut record = self.load(id)?;
        let now = Timestamp::now();
        record.begin(now, via, to, latency);
        record.power_changed_at = Some(now);
        record.count(operation.as_str());
        self.store.put(&record)?;
        tokio::time::sleep(latency).await;
        Ok(())
    }
}

fn injected_error(operation: Operation, index: usize, rule: &FailureRule) -> DriverError {
    let message = rule
        .message
        .clone()
        .unwrap_or_else(|| format!("injected failure of {operation} (spec.driver.fake.failures[{index}])"));
    match rule.error {
        FakeErrorKind::Transient => DriverError::Transient { message, retry_after: None },
        FakeErrorKind::RateLimited => DriverError::RateLimited {
            message,
            retry_after: Duration::from_secs(rule.retry_after_seconds.unwrap_or(5).into()),
        },
        FakeErrorKind::InvalidConfig => {
            DriverError::InvalidConfig { field: format!("spec.driver.fake.failures[{index}]"), message }
        }
        FakeErrorKind::NotSupported => DriverError::NotSupported { operation, message },
        FakeErrorKind::NotFound => DriverError::NotFound { message },
    }
}

/// A documentation-range (TEST-NET-1) address derived from the id: never routed.
fn fake_address(id: &str) -> String {
    let n = id.bytes().fold(0u32, |acc, b| acc.wrapping_mul(31).wrapping_add(b.into()));
    format!("192.0.2.{}", 1 + n % 254)
}

#[async_trait]
impl Driver for FakeDriver {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn offers_ssh(&self) -> bool {
        self.config.ssh_endpoint.is_some()
    }

    async fn find(&self) -> Result<Option<Instance>, DriverError> {
        self.journaled("find", async {
            self.call(Operation::Status).await?;
            let now = Timestamp::now();
            Ok(self
                .store
                .instances_of(&self.machine.uid)?
                .into_iter()
                .next()
                .map(|r| Instance { state: r.state_at(now), id: r.id }))
        })
        .await
    }

    async fn create(&self, request: &CreateRequest) -> Result<String, DriverError> {
        self.journaled("create", async {
            let latency = self.config.latency(Operation::Create);
            if let Some(error) = self.injected_failure(Operation::Create)? {
                tokio::time::sleep(latency).await;
                return Err(error);
            }
            let id = format!("fake-{:012x}", rand::random::<u64>() >> 16);
            let now = Timestamp::now();
            let mut record = InstanceRecord {
                address: fake_address(&id),
                id: id.clone(),
                machine_uid: self.machine.uid.clone(),
                machine_name: self.machine.name.clone(),
                namespace: self.machine.namespace.clone(),
                instance_type: self.config.instance_type().to_string(),
                created_at: now,
                state: State::Starting,
                transition: None,
                authorized_keys: request.ssh_public_key.iter().cloned().collect(),
                power_changed_at: None,
                calls: Default::default(),
            };
            // The instance exists (tagged) from the first moment and boots during the
            // latency, so a controller killed meanwhile finds it again.
            record.begin(now, State::Starting, State::Running, latency);
            record.count(Operation::Create.as_str());
            self.store.put(&record)?;
            tokio::time::sleep(latency).await;
            Ok(id)
        })
        .await
    }

    async fn remove(&self, id: &str) -> Result<Removal, DriverError> {
        self.journaled("remove", async {
            self.call(Operation::Remove).await?;
            match self.store.delete(&self.machine.uid, id) {
                // An id the store cannot even name is gone too.
                Ok(_) | Err(DriverError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            self.store.forget_machine_if_empty(&self.machine.uid)?;
            Ok(Removal::Done)
        })
        .await
    }

    // Overridden only to be journaled: the fake leaves nothing behind a failed Create.
    async fn remove_leftovers(&self) -> Result<Removal, DriverError> {
        self.journaled("remove_leftovers", async { Ok(Removal::Done) }).await
    }

    async fn start(&self, id: &str) -> Result<(), DriverError> {
        self.journaled("start", async { self.transition(id, Operation::Start, State::Starting, State::Running).await })
            .await
    }

    async fn stop(&self, id: &str) -> Result<(), DriverError> {
        self.journaled("stop", async {
            if self.config.graceful_stop != GracefulStop::Honor {
                // The guest ignores the shutdown request: stuck in Stopping (or, as the
                // provider sees it, still Running) until killed.
                self.call(Operation::Stop).await?;
                let mut record = self.load(id)?;
                if record.state == State::Running && self.config.graceful_stop == GracefulStop::Ignore {
                    record.state = State::Stopping;
                }
                record.count(Operation::Stop.as_str());
                record.power_changed_at = Some(Timestamp::now());
                return self.store.put(&record);
            }
            self.transition(id, Operation::Stop, State::Stopping, State::Stopped).await
        })
        .await
    }

    async fn kill(&self, id: &str) -> Result<(), DriverError> {
        self.journaled("kill", async { self.transition(id, Operation::Kill, State::Stopping, State::Stopped).await })
            .await
    }

    async fn restart(&self, id: &str) -> Result<(), DriverError> {
        self.journaled("restart", async {
            self.transition(id, Operation::Restart, State::Starting, State::Running).await
        })
        .await
    }

    async fn power_changed_since(&self, id: &str, since: Timestamp) -> Result<Option<bool>, DriverError> {
        self.journaled("power_changed_since", async {
            self.call(Operation::Status).await?;
            Ok(Some(self.load(id)?.power_changed_at.is_some_and(|at| at >= since)))
        })
        .await
    }

    async fn status(&self, id: &str) -> Result<State, DriverError> {
        self.journaled("status", async {
            self.call(Operation::Status).await?;
            match self.store.get(&self.machine.uid, id) {
                Ok(Some(record)) => Ok(record.state_at(Timestamp::now())),
                Ok(None) | Err(DriverError::NotFound { .. }) => Ok(State::NotFound),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn addresses(&self, id: &str) -> Result<Vec<Address>, DriverError> {
        self.journaled("addresses", async {
            self.call(Operation::Status).await?;
            let record = self.load(id)?;
            Ok(vec![
                Address { kind: AddressType::InternalIP, address: record.address },
                Address { kind: AddressType::Hostname, address: format!("{}.fake.machinist.internal", record.id) },
            ])
        })
        .await
    }

    async fn ssh_endpoint(&self, id: &str) -> Result<Option<SshEndpoint>, DriverError> {
        self.journaled("ssh_endpoint", async {
            let Some(endpoint) = &self.config.ssh_endpoint else { return Ok(None) };
            self.load(id)?;
            Ok(Some(SshEndpoint {
                host: endpoint.host.clone(),
                port: endpoint.port.unwrap_or(22),
                user: endpoint.user.clone().unwrap_or_else(|| "root".into()),
            }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn driver(store: FakeStore, status_latency: u32) -> FakeDriver {
        let machine =
            MachineRef { uid: "uid-1".into(), name: "m".into(), namespace: "default".into(), ..Default::default() };
        let latency = FakeLatency { status: Some(status_latency), ..Default::default() };
        let config = FakeConfig { latency_millis: Some(Box::new(latency)), ..Default::default() };
        FakeDriver::new(store, machine, config).unwrap()
    }

    #[tokio::test]
    async fn fake_call_journal_records_callers_and_cancelled_calls() {
        let dir = tempfile::tempdir().unwrap();
        let a = driver(FakeStore::new(dir.path()).with_call_journal("a"), 0);
        let b = driver(FakeStore::new(dir.path()).with_call_journal("b"), 500);
        let quiet = driver(FakeStore::new(dir.path()), 0);

        let id = a.create(&CreateRequest::default()).await.unwrap();
        assert_eq!(a.status(&id).await.unwrap(), State::Running);
        // Dropped mid-latency: journaled as not completed.
        assert!(tokio::time::timeout(Duration::from_millis(20), b.status(&id)).await.is_err());
        b.start(&id).await.unwrap();
        quiet.status(&id).await.unwrap();

        let calls = FakeStore::new(dir.path()).call_journal();
        let seen: Vec<_> = calls.iter().map(|c| (c.caller.as_str(), c.operation.as_str(), c.completed)).collect();
        assert_eq!(seen, [("a", "create", true), ("a", "status", true), ("b", "status", false), ("b", "start", true)]);
        assert!(calls.iter().all(|c| c.machine_uid == "uid-1" && c.started <= c.ended));
        assert!(calls.windows(2).all(|w| w[0].ended <= w[1].started));
    }

    #[test]
    fn fake_call_journal_missing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FakeStore::new(dir.path().join("nowhere")).call_journal().is_empty());
    }
}
