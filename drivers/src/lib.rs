//! The machinist driver contract and its drivers.
//!
//! One async trait, [`Driver`], models the Docker Machine Driver Specification v1:
//! Create, Remove, Start, Stop, Kill, Restart, Status (GetState), the addressing calls,
//! and a look-up of an existing instance by the owning Machine's UID (for adoption).
//!
//! This crate has no Kubernetes client: the controller resolves Secrets and hands each
//! driver plain values ([`MachineRef`], [`Credentials`]). Each driver's typed config
//! lives with the driver and derives `JsonSchema`, so the controller's CRD embeds it.
//!
//! Drivers: [`fake`] (instances as files), [`generic`] (an existing host over SSH),
//! [`amazonec2`] (an EC2 instance, on the AWS SDK for Rust) and [`dockermachine`] (any
//! Docker Machine driver plugin, over its own protocol).
//! [`ssh`] is the SSH client the drivers and the controller share.

pub mod amazonec2;
mod contract;
pub mod dockermachine;
mod error;
pub mod fake;
pub mod generic;
mod registry;
pub mod ssh;

pub use contract::{
    Address, AddressType, CreateRequest, Credentials, Driver, HostKeys, Instance, MachineRef, MemoryStateStore,
    Operation, Removal, SshEndpoint, State, StateStore,
};
pub use error::{CREDENTIALS_FIELD, DriverError};
pub use registry::{DriverConfig, DriverSpec, Drivers};
