//! The Kubernetes side: watching Machines, the finalizer, status writes, Events, and
//! driver calls performed as the pure decision (`crate::reconcile`) says.

mod crd;
mod machine;
mod status;

pub use crd::{CrdError, wait_for_crd};
pub use machine::{Context, Error, error_policy, reconcile};
pub use status::{WrittenStatuses, patch_status};
