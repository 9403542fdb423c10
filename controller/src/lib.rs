//! machinist: a Kubernetes controller that reconciles `Machine` resources through
//! pluggable drivers (Docker Machine Driver Specification v1).
//!
//! - [`api`]: the Machine API types; the CRD is generated from them.
//! - [`reconcile`]: the pure decision (no I/O), where the behaviour lives.
//! - [`k8s`]: the Kubernetes side of one reconcile.
//! - [`run`]: the controller loop, as `machinist run` starts it.

pub mod api;
pub mod conformance;
#[cfg(test)]
pub mod fixtures;
pub mod k8s;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod run;
