//! The `spec.driver` block and the wiring from it to a [`Driver`].

use std::path::PathBuf;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::amazonec2::{Amazonec2Config, Ec2Connector, Ec2Driver};
use crate::dockermachine::{DockerMachineConfig, DockerMachineDriver, Plugins};
use crate::fake::{FakeConfig, FakeDriver, FakeStore};
use crate::generic::{GenericConfig, GenericDriver};
use crate::{Credentials, Driver, DriverError, MachineRef, MemoryStateStore, StateStore};

/// `spec.driver`: exactly one block, named for its driver. The schema's CEL rules
/// (added by the controller's API types) enforce "exactly one" and immutability.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DriverSpec {
    /// Instances simulated in the controller's state directory (tests, demos, benchmarks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fake: Option<FakeConfig>,
    /// An existing host reached over SSH, as Docker Machine's `generic` driver: machinist
    /// installs the Machine's SSH key there and can reboot it, but cannot power it on or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generic: Option<Box<GenericConfig>>,
    /// An Amazon EC2 instance, as Docker Machine's `amazonec2` driver: machinist imports
    /// the Machine's SSH key, opens SSH in a security group of its own and launches the
    /// instance; Remove terminates it and deletes what was created for it.
    // Boxed, as is `generic`: every cached Machine holds a DriverSpec, and an unset
    // block should cost a pointer, not the size of the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amazonec2: Option<Box<Amazonec2Config>>,
    /// Any Docker Machine driver plugin (`docker-machine-driver-<name>` in the
    /// controller's plugin directory), driven over the plugin protocol: Hetzner, Linode,
    /// OpenStack, vSphere, docker-machine's own drivers, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_machine: Option<Box<DockerMachineConfig>>,
}

/// The one driver block a spec names.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DriverConfig<'a> {
    Fake(&'a FakeConfig),
    Generic(&'a GenericConfig),
    Amazonec2(&'a Amazonec2Config),
    DockerMachine(&'a DockerMachineConfig),
}

impl DriverSpec {
    /// The names of every driver block this build knows, as they appear in `spec.driver`.
    pub const NAMES: [&'static str; 4] = ["fake", "generic", "amazonec2", "dockerMachine"];

    /// The single block that is set; InvalidConfig when none or several are.
    pub fn config(&self) -> Result<DriverConfig<'_>, DriverError> {
        let mut set = Vec::new();
        if let Some(fake) = &self.fake {
            set.push(DriverConfig::Fake(fake));
        }
        if let Some(generic) = &self.generic {
            set.push(DriverConfig::Generic(generic));
        }
        if let Some(amazonec2) = &self.amazonec2 {
            set.push(DriverConfig::Amazonec2(amazonec2));
        }
        if let Some(docker_machine) = &self.docker_machine {
            set.push(DriverConfig::DockerMachine(docker_machine));
        }
        match set.as_slice() {
            [one] => Ok(*one),
            _ => Err(DriverError::invalid_config(
                "spec.driver",
                format!("set exactly one driver block (one of: {})", Self::NAMES.join(", ")),
            )),
        }
    }

    /// The name of the driver block, when exactly one is set.
    pub fn name(&self) -> Option<&'static str> {
        self.config().ok().map(|c| c.name())
    }
}

impl DriverConfig<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            DriverConfig::Fake(_) => "fake",
            DriverConfig::Generic(_) => "generic",
            DriverConfig::Amazonec2(_) => "amazonec2",
            DriverConfig::DockerMachine(_) => "dockerMachine",
        }
    }
}

/// Everything drivers share across Machines, wired once at start-up.
#[derive(Clone, Debug)]
pub struct Drivers {
    fake: FakeStore,
    ec2: Ec2Connector,
    plugins: Plugins,
}

impl Drivers {
    /// `fake_state_dir` is where the fake driver keeps its instances. No plugin
    /// directory: see [`Drivers::with_plugins`].
    pub fn new(fake_state_dir: impl Into<PathBuf>) -> Self {
        Drivers {
            fake: FakeStore::new(fake_state_dir),
            ec2: Ec2Connector::new(),
            plugins: Plugins::new(None, std::env::temp_dir()),
        }
    }

    /// Where Docker Machine plugins are found, and where their store directories go.
    pub fn with_plugins(mut self, plugins: Plugins) -> Self {
        self.plugins = plugins;
        self
    }

    pub fn plugins(&self) -> &Plugins {
        &self.plugins
    }

    /// Journals every fake driver call as made by `caller` (see
    /// [`FakeStore::with_call_journal`]).
    pub fn with_fake_call_journal(mut self, caller: impl Into<String>) -> Self {
        self.fake = self.fake.with_call_journal(caller);
        self
    }

    pub fn fake_store(&self) -> &FakeStore {
        &self.fake
    }

    /// The driver for one Machine, keeping driver state in memory only (see
    /// [`Drivers::driver_with_state`]).
    pub fn driver(
        &self,
        spec: &DriverSpec,
        machine: MachineRef,
        credentials: Credentials,
    ) -> Result<Arc<dyn Driver>, DriverError> {
        self.driver_with_state(spec, machine, credentials, Arc::new(MemoryStateStore::default()))
    }

    /// The driver for one Machine. Fails with InvalidConfig (naming the field) before
    /// any provider call when the config cannot work. `credentials` are the contents of
    /// the Machine's `credentialsSecretRef` (empty when it has none); `state` is where
    /// drivers that must remember something between calls keep it (the Docker Machine
    /// plugins' config and store directory).
    pub fn driver_with_state(
        &self,
        spec: &DriverSpec,
        machine: MachineRef,
        credentials: Credentials,
        state: Arc<dyn StateStore>,
    ) -> Result<Arc<dyn Driver>, DriverError> {
        match spec.config()? {
            DriverConfig::Fake(config) => Ok(Arc::new(FakeDriver::new(self.fake.clone(), machine, config.clone())?)),
            DriverConfig::Generic(config) => Ok(Arc::new(GenericDriver::new(machine, config.clone(), &credentials)?)),
            DriverConfig::Amazonec2(config) => {
                Ok(Arc::new(Ec2Driver::new(self.ec2.clone(), machine, config.clone(), &credentials)?))
            }
            DriverConfig::DockerMachine(config) => Ok(Arc::new(DockerMachineDriver::new(
                self.plugins.clone(),
                machine,
                config.clone(),
                credentials,
                state,
            )?)),
        }
    }
}
