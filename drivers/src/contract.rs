//! The Docker Machine Driver Specification v1 as one Rust trait.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::DriverError;

/// The state of an instance: Docker Machine's states plus `NotFound`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum State {
    /// The driver could not tell (Docker Machine's `None`).
    #[default]
    None,
    Running,
    Paused,
    Saved,
    Stopped,
    Stopping,
    Starting,
    Error,
    Timeout,
    /// The instance does not exist at the provider.
    NotFound,
}

impl State {
    pub const ALL: [State; 10] = [
        State::None,
        State::Running,
        State::Paused,
        State::Saved,
        State::Stopped,
        State::Stopping,
        State::Starting,
        State::Error,
        State::Timeout,
        State::NotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::None => "None",
            State::Running => "Running",
            State::Paused => "Paused",
            State::Saved => "Saved",
            State::Stopped => "Stopped",
            State::Stopping => "Stopping",
            State::Starting => "Starting",
            State::Error => "Error",
            State::Timeout => "Timeout",
            State::NotFound => "NotFound",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A driver operation. `Status` covers the read-only calls (GetState, the addressing
/// calls and the look-up by Machine UID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum Operation {
    Create,
    Remove,
    Start,
    Stop,
    Kill,
    Restart,
    Status,
}

impl Operation {
    pub const ALL: [Operation; 7] = [
        Operation::Create,
        Operation::Remove,
        Operation::Start,
        Operation::Stop,
        Operation::Kill,
        Operation::Restart,
        Operation::Status,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "Create",
            Operation::Remove => "Remove",
            Operation::Start => "Start",
            Operation::Stop => "Stop",
            Operation::Kill => "Kill",
            Operation::Restart => "Restart",
            Operation::Status => "Status",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which Machine a driver works for. Instances are tagged with `uid` so that a
/// Machine's instance can be found again (adoption) whatever happened to the controller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineRef {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// When the controller recorded the instance id (from Create or adoption), if it has
    /// one. A provider whose reads are eventually consistent (EC2) answers NotFound for a
    /// fresh id for a while: a driver reads NotFound for a younger id as "not visible
    /// yet", never as "gone".
    pub instance_recorded: Option<SystemTime>,
    /// When the Machine was created, for waits bounded from its start (IAM propagation).
    pub created: Option<SystemTime>,
    /// The SSH host keys (`SHA256:...` fingerprints) the Machine's host is trusted to
    /// present: the pinned one, and one the user accepted. Empty before the first contact.
    /// A driver that logs in to the host itself disconnects from a host presenting any
    /// other key before it authenticates: no credential is offered, no command runs.
    pub trusted_host_keys: Vec<String>,
}

/// Provider credentials resolved by the controller from `credentialsSecretRef`, read
/// afresh for every driver call so that rotation needs no restart. Never logged.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials(pub BTreeMap<String, Vec<u8>>);

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys only: the values are secrets.
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// What Create needs besides the driver's own config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateRequest {
    /// The OpenSSH public key to install on the instance, when the Machine has one.
    pub ssh_public_key: Option<String>,
    /// The port the controller will reach SSH on (`spec.ssh.port`), for drivers that open
    /// it in a firewall; `None` for the driver's default.
    pub ssh_port: Option<u16>,
}

/// What a driver knows of an instance's SSH host keys from a source other than the SSH
/// connection itself (a cloud console), so that the first contact is verified instead of
/// trusted ([`Driver::host_keys`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeys {
    /// The driver has no such source: the first SSH contact is trusted and pinned.
    NotOffered,
    /// The source has not shown them yet (a booting instance's console); ask again
    /// later. Says what is awaited, for the SSHReady message.
    Pending(String),
    /// The source will not show them (an image without cloud-init, a console that stayed
    /// silent past the driver's bounded wait): the first contact is trusted, and this says
    /// why, for the SSHReady message.
    Unavailable(String),
    /// The fingerprints (`SHA256:...`, as `ssh-keygen -lf` prints them) of the host's
    /// keys; the host must present one of them. `source` names where they come from
    /// (e.g. "the console output of i-0abc").
    Known { fingerprints: Vec<String>, source: String },
}

/// What a call to [`Driver::remove`] achieved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// The instance and everything created for it are gone.
    Done,
    /// Removal is under way at the provider (an instance still terminating, a firewall
    /// group still held by it): nothing to wait for inside the call; call Remove again
    /// later. Says what it waits for, e.g. "waiting for i-0abc to terminate (shutting-down)".
    Waiting(String),
}

/// Where a driver keeps what it must remember about one Machine's instance between
/// calls, across controller restarts and failovers (a Docker Machine plugin's config and
/// store directory). The controller keeps it in a Secret owned by the Machine; it can hold
/// credentials, so it is never logged or shown.
#[async_trait]
pub trait StateStore: Send + Sync {
    async fn load(&self) -> Result<Option<Vec<u8>>, DriverError>;
    async fn save(&self, state: &[u8]) -> Result<(), DriverError>;
    /// Forgets the state (after Remove): nothing is left to remember.
    async fn clear(&self) -> Result<(), DriverError>;
}

/// A [`StateStore`] in memory, for drivers that keep no state and for tests: lost with
/// the process.
#[derive(Debug, Default)]
pub struct MemoryStateStore(std::sync::Mutex<Option<Vec<u8>>>);

#[async_trait]
impl StateStore for MemoryStateStore {
    async fn load(&self) -> Result<Option<Vec<u8>>, DriverError> {
        Ok(self.0.lock().unwrap().clone())
    }

    async fn save(&self, state: &[u8]) -> Result<(), DriverError> {
        *self.0.lock().unwrap() = Some(state.to_vec());
        Ok(())
    }

    async fn clear(&self) -> Result<(), DriverError> {
        *self.0.lock().unwrap() = None;
        Ok(())
    }
}

/// An instance found by [`Driver::find`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AddressType {
    ExternalIP,
    InternalIP,
    Hostname,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Address {
    #[serde(rename = "type")]
    pub kind: AddressType,
    pub address: String,
}

/// Where an instance answers SSH (GetSSHHostname, GetSSHPort, GetSSHUsername).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshEndpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
}

/// One driver, bound to one Machine and its config.
///
/// Every call returns a typed [`DriverError`] on failure, so the controller can tell a
/// transient fault from a bad config or an unsupported operation. Calls that change the
/// instance ensure the change (as the specification asks) or fail.
#[async_trait]
pub trait Driver: Send + Sync {
    /// The driver's name, as the key of its block under `spec.driver`.
    fn name(&self) -> &'static str;

    /// Whether this driver's instances are maintained over SSH.
    fn offers_ssh(&self) -> bool;

    /// The instance tagged with this Machine's UID, if one exists (adoption).
    async fn find(&self) -> Result<Option<Instance>, DriverError>;

    /// Launches a new instance ready for provisioning and returns its id as soon as the
    /// provider has assigned one. Callers look for an existing instance first.
    async fn create(&self, request: &CreateRequest) -> Result<String, DriverError>;

    /// Removes the instance and everything created for it, or starts to and says what is
    /// left ([`Removal::Waiting`]): a call never waits on the provider beyond one round
    /// of requests. A missing instance is done (but see
    /// [`MachineRef::instance_recorded`]).
    async fn remove(&self, id: &str) -> Result<Removal, DriverError>;

    /// Removes what Create made for this Machine when no instance exists: a Create that
    /// failed after making a key pair or a firewall rule, or was interrupted. Called when a
    /// Machine without an instance is deleted.
    async fn remove_leftovers(&self) -> Result<Removal, DriverError> {
        Ok(Removal::Done)
    }

    async fn start(&self, id: &str) -> Result<(), DriverError>;

    /// Graceful stop.
    async fn stop(&self, id: &str) -> Result<(), DriverError>;

    /// Forced stop.
    async fn kill(&self, id: &str) -> Result<(), DriverError>;

    async fn restart(&self, id: &str) -> Result<(), DriverError>;

    /// Whether the provider accepted a power change of the instance (a restart, stop, kill
    /// or start) at or after `since`: `Some(true)` it did, `Some(false)` it certainly did
    /// not, `None` it cannot tell (the default). machinist asks only after a restart
    /// whose call may have been made but whose result was never recorded (a crash between
    /// the call and the status write): a driver that can tell makes that restart exactly
    /// once; for the others it is at most once.
    async fn power_changed_since(&self, _id: &str, _since: jiff::Timestamp) -> Result<Option<bool>, DriverError> {
        Ok(None)
    }

    /// GetState. A missing instance is `Ok(State::NotFound)`.
    async fn status(&self, id: &str) -> Result<State, DriverError>;

    /// GetIP and friends: the instance's addresses, best first.
    async fn addresses(&self, id: &str) -> Result<Vec<Address>, DriverError>;

    /// Where the instance answers SSH, for drivers that offer it.
    async fn ssh_endpoint(&self, id: &str) -> Result<Option<SshEndpoint>, DriverError>;

    /// The instance's SSH host keys as a source other than SSH shows them, asked before
    /// the first SSH contact so that it is verified, not trusted.
    async fn host_keys(&self, _id: &str) -> Result<HostKeys, DriverError> {
        Ok(HostKeys::NotOffered)
    }

    /// The SSH private key the driver made for the instance itself (Docker Machine plugins
    /// generate their own), to become the Machine's key. `None` for drivers that install
    /// the Machine's key ([`CreateRequest::ssh_public_key`]), the default.
    async fn own_ssh_key(&self, _id: &str) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, DriverError> {
        Ok(None)
    }

    /// Whether [`Driver::own_ssh_key`] gives the Machine's key: then machinist makes none.
    fn makes_own_ssh_key(&self) -> bool {
        false
    }

    /// The host key this driver's own SSH logins trusted at first contact in this
    /// driver's lifetime (the generic driver's bootstrap login at Create), for the
    /// controller to pin. `None` when it made no such login, or the key was already pinned.
    fn first_contact_host_key(&self) -> Option<String> {
        None
    }
}
