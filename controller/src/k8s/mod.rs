//! The Kubernetes side: watching Machines, the finalizer, status writes, Events, and
//! driver calls performed as the pure decision (`crate::reconcile`) says.

mod client;
mod crd;
mod driver_state;
mod events;
mod finalizer;
mod machine;
mod secrets;
mod ssh;
mod status;
mod wire;

pub use client::{namespaced_or_all, with_request_timeout};
pub use crd::{CrdError, wait_for_crd};
pub use events::{EventNote, EventPublisher, EventWorkers};
pub use machine::{Context, Error, error_policy, reconcile};
pub use secrets::{SecretCache, SweepFrom, sweep as sweep_secrets};
pub use ssh::{MachineKey, generated_secret_name};
pub use status::{WrittenStatuses, patch_status};
pub use wire::{MachineMeta, WatchedMachine, into_guarded};
